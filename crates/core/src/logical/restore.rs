//! Restoring a dump into a database, and copying one database into another.
//!
//! A dump is first made a verified local file (from the repository: decoded, decrypted and
//! checked against its trailer; from a URL or a file: a `pg_dump` custom-format archive, or a
//! walnut object holding one), so a corrupt dump is refused before the target is touched and
//! `pg_restore` can run in parallel (`--jobs`), which needs a seekable file. The target is an
//! existing database: an empty one is restored into as it is; a non-empty one is emptied first
//! (every user schema and its objects, extensions, large objects, event triggers, publications,
//! foreign-data wrappers) only when the caller confirms, after showing what [`inspect`] found.

use super::capture::{program_name, spawn, tail_of, watch_stderr};
use super::tools::{self, Bindirs, Tool};
use super::*;
use crate::backup::{BackupError, pg_error};
use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio_util::sync::CancellationToken;

/// The first bytes of a `pg_dump` custom-format archive.
pub const CUSTOM_MAGIC: &[u8; 5] = b"PGDMP";

fn from_backup(e: BackupError) -> LogicalError {
    match e {
        BackupError::Repo(r) => LogicalError::Repo(r),
        BackupError::Storage(s) => LogicalError::Storage(s),
        BackupError::Corrupt { key, reason } => LogicalError::Corrupt { key, reason },
        BackupError::Io { context, source } => LogicalError::Io { context, source },
        other => LogicalError::Invalid(other.to_string()),
    }
}

/// Writes the content of the streamed object `key` into `dest`, decoded and checked against the
/// object's trailer (length and SHA-256): a corrupt object is an error naming it. `sync`: fsync
/// `dest` at the end (a file the user keeps; not a scratch copy read once by `pg_restore`).
pub async fn fetch_object(
    repo: &Repository,
    key: &str,
    dest: &Path,
    sync: bool,
    progress: Arc<LogicalProgress>,
) -> Result<u64, LogicalError> {
    let (k, keys, path) = (key.to_string(), repo.keys().cloned(), dest.to_path_buf());
    crate::backup::read_part(repo, key, move |reader| {
        let corrupt = |reason: String| BackupError::Corrupt { key: k.clone(), reason };
        let file = std::fs::File::create(&path)
            .map_err(|e| BackupError::Io { context: format!("create {}", path.display()), source: e })?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        let d = decode_into(reader, keys.as_deref(), &mut out, &progress, Sink::File).map_err(|e| match e {
            Decode::Object(why) => corrupt(why),
            Decode::Write(e) => BackupError::Io { context: format!("write {}", path.display()), source: e },
            Decode::Unstreamable => unreachable!("a file sink"),
        })?;
        let file = out
            .into_inner()
            .map_err(|e| BackupError::Io { context: format!("write {}", path.display()), source: e.into_error() })?;
        apply_offsets(&file, &d.patches)
            .map_err(|e| BackupError::Io { context: format!("write {}", path.display()), source: e })?;
        if sync {
            file.sync_all().map_err(|e| BackupError::Io { context: format!("write {}", path.display()), source: e })?;
        }
        Ok(d.bytes)
    })
    .await
    .map_err(from_backup)
}

enum Decode {
    /// The object is not what it says (corrupt, truncated, not an envelope, no key).
    Object(String),
    /// Writing the output failed (for a pipe: its reader is gone).
    Write(std::io::Error),
    /// [`Sink::Pipe`]: walnut does not read the dump's TOC (it stopped at once).
    Unstreamable,
}

/// What [`decode_into`] writes to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Sink {
    /// A file: the whole dump, and the data offsets its TOC lacks are found on the way
    /// ([`Decoded::patches`], to be written into the file once it is complete).
    File,
    /// A pipe into `pg_restore`: every chunk but the last goes as soon as the next one is
    /// decoded, and the last only once the trailer matched, so that `pg_restore` cannot finish
    /// a dump that turns out corrupt. The header and TOC are kept ([`Decoded::toc`]).
    Pipe,
}

struct Decoded {
    bytes: u64,
    patches: Vec<dumpfile::Patch>,
    /// The dump's header and TOC ([`Sink::Pipe`]), when walnut could read them.
    toc: Option<Vec<u8>>,
}

/// Writes the offsets [`decode_into`] found into `file`, when it is a regular file (a dump
/// written to a pipe, such as standard output, stays as it was).
fn apply_offsets(file: &std::fs::File, patches: &[dumpfile::Patch]) -> std::io::Result<()> {
    if !patches.is_empty() && file.metadata()?.is_file() {
        dumpfile::apply(file, patches)?;
    }
    Ok(())
}

/// The hashing and writing end of [`decode_into`], read by [`dumpfile`]'s scan as it goes: every
/// chunk is hashed and written (to a pipe: the one before it) when it arrives, whatever the scan
/// does with it.
struct Tee<'a, W: Write> {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    hasher: sha2::Sha256,
    n: u64,
    out: &'a mut W,
    sink: Sink,
    /// The chunks so far, while the TOC is being read ([`Sink::Pipe`]).
    kept: Option<Vec<u8>>,
    progress: &'a LogicalProgress,
}

impl<W: Write> dumpfile::Producer for Tee<'_, W> {
    /// The next chunk, hashed and written; `false` at the end.
    fn advance(&mut self) -> std::io::Result<bool> {
        use sha2::Digest;
        let Ok(chunk) = self.rx.recv() else { return Ok(false) };
        self.hasher.update(&chunk);
        if let Some(kept) = &mut self.kept {
            kept.extend_from_slice(&chunk);
        }
        match self.sink {
            Sink::File => self.out.write_all(&chunk)?,
            Sink::Pipe => self.out.write_all(&self.chunk)?,
        }
        self.n += chunk.len() as u64;
        self.progress.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        self.chunk = chunk;
        Ok(true)
    }

    fn piece(&self) -> &[u8] {
        &self.chunk
    }
}

/// Reads the dump as it goes by: the offsets a file needs, the TOC a pipe's reader needs.
fn scan_dump<W: Write>(
    src: &mut dumpfile::Pieces<Tee<'_, W>>,
) -> std::io::Result<(Vec<dumpfile::Patch>, Option<Vec<u8>>)> {
    let scanned = match src.producer.sink {
        Sink::File => dumpfile::scan(src).map(|p| (p, None)),
        Sink::Pipe => dumpfile::scan_toc(src).map(|toc| {
            let mut kept = src.producer.kept.take().unwrap_or_default();
            kept.truncate(toc.data_start as usize);
            (Vec::new(), Some(kept))
        }),
    };
    src.producer.kept = None;
    match scanned {
        Ok(found) => Ok(found),
        Err(dumpfile::ScanError::Io(e)) => Err(e),
        Err(dumpfile::ScanError::Unsupported(why)) => {
            tracing::debug!("walnut does not read this dump's TOC: {why}");
            Ok((Vec::new(), None))
        }
    }
}

/// Decodes an enveloped stream into `out`, verifying the trailer. Decoding (decryption,
/// decompression) runs on this thread, hashing and writing on another, so that a restore's
/// download goes at the pace of the slower of the two rather than of their sum. The writing
/// thread also reads the dump as it goes by ([`dumpfile`]): for a file, the data offsets its
/// TOC lacks (a dump captured through a pipe then restores in parallel as fast as one
/// `pg_dump` wrote to a file); for a pipe, its TOC.
fn decode_into(
    reader: impl Read,
    keys: Option<&crate::crypt::Identities>,
    out: &mut (impl Write + Send),
    progress: &LogicalProgress,
    sink: Sink,
) -> Result<Decoded, Decode> {
    const CHUNK: usize = 1 << 20;
    let mut payload = envelope::PayloadReader::new(reader).map_err(|e| Decode::Object(e.to_string()))?;
    let (codecs, meta) = (payload.codecs.clone(), payload.meta.clone());
    if payload.sealed() && keys.is_some() {
        // Decrypted below: age authenticates every chunk.
        payload.skip_stored_check();
    }
    let (n, sum, patches, toc, last) = {
        let buffered = std::io::BufReader::with_capacity(CHUNK, &mut payload);
        let mut decoded =
            envelope::decoder(buffered, &codecs, keys, &meta).map_err(|e| Decode::Object(e.to_string()))?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let out = &mut *out;
        std::thread::scope(|scope| {
            let writer = scope.spawn(move || {
                use sha2::Digest;
                let kept = (sink == Sink::Pipe).then(Vec::new);
                let tee = Tee { rx, chunk: Vec::new(), hasher: sha2::Sha256::new(), n: 0, out, sink, kept, progress };
                let mut src = dumpfile::Pieces::new(tee);
                let (patches, toc) = scan_dump(&mut src)?;
                if sink == Sink::Pipe && toc.is_none() {
                    // Nothing more goes to the pipe: its reader cannot be given the rest.
                    return Ok((0, [0; 32], patches, toc, Vec::new()));
                }
                src.drain()?;
                let mut tee = src.producer;
                tee.out.flush()?;
                let last = if sink == Sink::Pipe { std::mem::take(&mut tee.chunk) } else { Vec::new() };
                std::io::Result::Ok((tee.n, <[u8; 32]>::from(tee.hasher.finalize()), patches, toc, last))
            });
            let read = (|| -> std::io::Result<()> {
                loop {
                    let mut buf = vec![0u8; CHUNK];
                    let mut filled = 0;
                    while filled < CHUNK {
                        match decoded.read(&mut buf[filled..]) {
                            Ok(0) => break,
                            Ok(k) => filled += k,
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                            Err(e) => return Err(e),
                        }
                    }
                    if filled == 0 {
                        return Ok(());
                    }
                    buf.truncate(filled);
                    // The writer stopped (a write failed): its error is the one reported.
                    if tx.send(buf).is_err() {
                        return Ok(());
                    }
                }
            })();
            drop(tx);
            let written =
                writer.join().map_err(|_| Decode::Write(std::io::Error::other("the writer thread panicked")))?;
            let written = written.map_err(Decode::Write)?;
            if sink == Sink::Pipe && written.3.is_none() {
                return Err(Decode::Unstreamable);
            }
            read.map_err(|e| Decode::Object(e.to_string()))?;
            Ok(written)
        })?
    };
    let (want_n, want_sum) = payload.trailer().map_err(|e| Decode::Object(e.to_string()))?;
    if n != want_n || sum != want_sum {
        return Err(Decode::Object(format!(
            "checksum mismatch: the stored dump is corrupt (expected {want_n} bytes with SHA-256 {}, got {n} bytes with {})",
            hex::encode(want_sum),
            hex::encode(sum)
        )));
    }
    // All is checked: the reader of a pipe may have the end.
    out.write_all(&last).and_then(|()| out.flush()).map_err(Decode::Write)?;
    Ok(Decoded { bytes: n, patches, toc })
}

/// Makes `what` (a URL or a local path, named `name` in messages) a local custom-format dump
/// file: a plain file is used in place (returns `None`); anything else is written to `dest`
/// (returns `Some(bytes)`). A walnut object is decoded and checked. Anything that is not a
/// custom-format dump is refused with what it begins with.
pub async fn fetch_external(
    what: &str,
    storage: &walnut_storage::StorageOptions,
    keys: Option<Arc<crate::crypt::Identities>>,
    dest: &Path,
    progress: Arc<LogicalProgress>,
) -> Result<Option<u64>, LogicalError> {
    let local =
        if what.contains("://") { what.strip_prefix("file://").map(PathBuf::from) } else { Some(PathBuf::from(what)) };
    if let Some(path) = local {
        let head = read_head(&path).map_err(io_ctx(format!("read {}", path.display())))?;
        if head.starts_with(CUSTOM_MAGIC) {
            return Ok(None);
        }
        check_head(what, &head)?;
        let (path2, dest2, name) = (path.clone(), dest.to_path_buf(), what.to_string());
        let n = crate::repo::cpu(move || -> Result<u64, LogicalError> {
            let input = std::fs::File::open(&path2).map_err(io_ctx(format!("read {}", path2.display())))?;
            let mut out = std::fs::File::create(&dest2).map_err(io_ctx(format!("create {}", dest2.display())))?;
            let d = decode_into(input, keys.as_deref(), &mut out, &progress, Sink::File).map_err(|e| match e {
                Decode::Object(reason) => LogicalError::Corrupt { key: name, reason },
                Decode::Write(e) => LogicalError::Io { context: format!("write {}", dest2.display()), source: e },
                Decode::Unstreamable => unreachable!("a file sink"),
            })?;
            apply_offsets(&out, &d.patches).map_err(io_ctx(format!("write {}", dest2.display())))?;
            Ok(d.bytes)
        })
        .await?;
        return Ok(Some(n));
    }
    let (store, key) = walnut_storage::open_object_url(what, storage)?;
    let mut stream = store.get_stream(&key).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let forward = tokio::spawn(async move {
        use futures::StreamExt;
        while let Some(chunk) = stream.next().await {
            let stop = chunk.is_err();
            if tx.send(chunk).await.is_err() || stop {
                break;
            }
        }
    });
    let (dest2, name) = (dest.to_path_buf(), what.to_string());
    let result = tokio::task::spawn_blocking(move || -> Result<u64, LogicalError> {
        let mut reader = StreamReader { rx, cur: bytes::Bytes::new() };
        let mut head = Vec::new();
        (&mut reader)
            .take(8)
            .read_to_end(&mut head)
            .map_err(|e| LogicalError::Invalid(format!("download {name}: {e}")))?;
        let mut out = std::fs::File::create(&dest2).map_err(io_ctx(format!("create {}", dest2.display())))?;
        let whole = std::io::Cursor::new(head.clone()).chain(reader);
        if head.starts_with(CUSTOM_MAGIC) {
            // A dump as pg_dump wrote it: copied, with the offsets it lacks found on the way.
            let mut src = dumpfile::Pieces::new(dumpfile::Copying::new(whole, &mut out, &progress.bytes));
            let scanned = dumpfile::scan(&mut src);
            let failed = |e: std::io::Error, writing: bool| {
                if writing {
                    LogicalError::Io { context: format!("write {}", dest2.display()), source: e }
                } else {
                    LogicalError::Invalid(format!("download {name}: {e}"))
                }
            };
            let patches = match scanned {
                Ok(p) => p,
                Err(dumpfile::ScanError::Io(e)) => return Err(failed(e, src.producer.failed_writing)),
                Err(dumpfile::ScanError::Unsupported(why)) => {
                    tracing::debug!("the dump's data offsets are left as they are: {why}");
                    Vec::new()
                }
            };
            src.drain().map_err(|e| failed(e, src.producer.failed_writing))?;
            let n = src.producer.copied;
            apply_offsets(&out, &patches).map_err(io_ctx(format!("write {}", dest2.display())))?;
            return Ok(n);
        }
        check_head(&name, &head)?;
        let d = decode_into(whole, keys.as_deref(), &mut out, &progress, Sink::File).map_err(|e| match e {
            Decode::Object(reason) => LogicalError::Corrupt { key: name.clone(), reason },
            Decode::Write(e) => LogicalError::Io { context: format!("write {}", dest2.display()), source: e },
            Decode::Unstreamable => unreachable!("a file sink"),
        })?;
        apply_offsets(&out, &d.patches).map_err(io_ctx(format!("write {}", dest2.display())))?;
        Ok(d.bytes)
    })
    .await
    .expect("download thread panicked");
    forward.abort();
    let n = result?;
    let head = read_head(dest).map_err(io_ctx(format!("read {}", dest.display())))?;
    if !head.starts_with(CUSTOM_MAGIC) {
        check_head(what, &head)?;
        return Err(not_a_dump(what, &head));
    }
    Ok(Some(n))
}

/// A `Read` over the chunks of a download.
struct StreamReader {
    rx: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, walnut_storage::StorageError>>,
    cur: bytes::Bytes,
}

impl Read for StreamReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(std::io::Error::other(e.to_string())),
                None => return Ok(0),
            }
        }
        let n = self.cur.len().min(out.len());
        out[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

fn read_head(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    std::fs::File::open(path)?.take(8).read_to_end(&mut head)?;
    Ok(head)
}

/// Accepts the head of a walnut object (decoded next) or refuses what is not a dump.
fn check_head(name: &str, head: &[u8]) -> Result<(), LogicalError> {
    if head.starts_with(b"WLNT") { Ok(()) } else { Err(not_a_dump(name, head)) }
}

fn not_a_dump(name: &str, head: &[u8]) -> LogicalError {
    let shown = if head.is_empty() {
        "it is empty".to_string()
    } else {
        format!("it begins with {:?}", String::from_utf8_lossy(head))
    };
    LogicalError::Invalid(format!(
        "{name} is not a PostgreSQL custom-format dump ({shown}, not PGDMP): give a file made by `pg_dump --format=custom` or `walnut logical download`"
    ))
}

/// Whether a local file is a custom-format dump.
pub fn is_custom_dump(path: &Path) -> bool {
    read_head(path).is_ok_and(|h| h.starts_with(CUSTOM_MAGIC))
}

/// What a target database holds that an emptying drops.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TargetContents {
    pub database: String,
    pub server_version_num: u32,
    /// User schemas other than `public`, with the number of objects in each.
    pub schemas: Vec<(String, u64)>,
    /// Objects in `public` (described), and how many in all.
    pub public_objects: Vec<String>,
    pub public_count: u64,
    /// Extensions other than plpgsql.
    pub extensions: Vec<String>,
    pub large_objects: u64,
    pub event_triggers: Vec<String>,
    pub publications: Vec<String>,
    pub foreign_data_wrappers: Vec<String>,
}

impl TargetContents {
    pub fn is_empty(&self) -> bool {
        self.schemas.is_empty()
            && self.public_count == 0
            && self.extensions.is_empty()
            && self.large_objects == 0
            && self.event_triggers.is_empty()
            && self.publications.is_empty()
            && self.foreign_data_wrappers.is_empty()
    }

    /// What would be dropped, one line each.
    pub fn describe(&self) -> Vec<String> {
        let mut v = Vec::new();
        for (s, n) in &self.schemas {
            v.push(format!("schema {s} and its {n} object(s)"));
        }
        if self.public_count > 0 {
            let more = self.public_count.saturating_sub(self.public_objects.len() as u64);
            let listed = self.public_objects.join(", ");
            let more = if more > 0 { format!(" and {more} more") } else { String::new() };
            v.push(format!("{} object(s) in schema public: {listed}{more}", self.public_count));
        }
        for e in &self.extensions {
            v.push(format!("extension {e}"));
        }
        if self.large_objects > 0 {
            v.push(format!("{} large object(s)", self.large_objects));
        }
        for e in &self.event_triggers {
            v.push(format!("event trigger {e}"));
        }
        for p in &self.publications {
            v.push(format!("publication {p}"));
        }
        for f in &self.foreign_data_wrappers {
            v.push(format!("foreign-data wrapper {f} (and its servers and user mappings)"));
        }
        v
    }
}

const SYSTEM_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema', 'public') \
    AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'";

/// What the target database (the client's) holds.
pub async fn inspect(client: &tokio_postgres::Client) -> Result<TargetContents, LogicalError> {
    let q = |e: tokio_postgres::Error| LogicalError::Postgres(pg_error(&e));
    let row = client
        .query_one("SELECT current_database()::text, current_setting('server_version_num')::int", &[])
        .await
        .map_err(q)?;
    let mut t =
        TargetContents { database: row.get(0), server_version_num: row.get::<_, i32>(1) as u32, ..Default::default() };
    let schemas = format!(
        "SELECT n.nspname::text, (SELECT count(*) FROM pg_depend d WHERE d.refclassid = 'pg_namespace'::regclass \
         AND d.refobjid = n.oid AND d.deptype = 'n') FROM pg_namespace n WHERE {SYSTEM_SCHEMAS} ORDER BY 1"
    );
    t.schemas =
        client.query(&schemas, &[]).await.map_err(q)?.iter().map(|r| (r.get(0), r.get::<_, i64>(1) as u64)).collect();
    // Objects in public: what DROP SCHEMA public CASCADE would drop (objects depend on their schema).
    let public = "SELECT pg_describe_object(d.classid, d.objid, d.objsubid) FROM pg_depend d \
                  WHERE d.refclassid = 'pg_namespace'::regclass AND d.refobjid = 'public'::regnamespace \
                  AND d.deptype = 'n' ORDER BY 1";
    let objects: Vec<String> = client.query(public, &[]).await.map_err(q)?.iter().map(|r| r.get(0)).collect();
    t.public_count = objects.len() as u64;
    t.public_objects = objects.into_iter().take(10).collect();
    let names = |sql: &'static str| async move {
        client.query(sql, &[]).await.map(|rows| rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>())
    };
    t.extensions =
        names("SELECT extname::text FROM pg_extension WHERE extname <> 'plpgsql' ORDER BY 1").await.map_err(q)?;
    t.event_triggers = names("SELECT evtname::text FROM pg_event_trigger ORDER BY 1").await.map_err(q)?;
    t.publications = names("SELECT pubname::text FROM pg_publication ORDER BY 1").await.map_err(q)?;
    t.foreign_data_wrappers = names("SELECT fdwname::text FROM pg_foreign_data_wrapper ORDER BY 1").await.map_err(q)?;
    let lo: i64 = client.query_one("SELECT count(*) FROM pg_largeobject_metadata", &[]).await.map_err(q)?.get(0);
    t.large_objects = lo as u64;
    Ok(t)
}

fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Empties the target database: drops what [`inspect`] found, in one transaction, and gives
/// back an empty `public` schema as PostgreSQL creates it.
pub async fn empty(client: &tokio_postgres::Client, t: &TargetContents) -> Result<(), LogicalError> {
    let mut sql = String::from("BEGIN;\n");
    for e in &t.event_triggers {
        sql += &format!("DROP EVENT TRIGGER {} CASCADE;\n", ident(e));
    }
    for p in &t.publications {
        sql += &format!("DROP PUBLICATION {};\n", ident(p));
    }
    for e in &t.extensions {
        sql += &format!("DROP EXTENSION IF EXISTS {} CASCADE;\n", ident(e));
    }
    for (s, _) in &t.schemas {
        sql += &format!("DROP SCHEMA IF EXISTS {} CASCADE;\n", ident(s));
    }
    if t.public_count > 0 {
        sql += "DROP SCHEMA public CASCADE;\n";
        if t.server_version_num >= 150000 {
            sql += "CREATE SCHEMA public AUTHORIZATION pg_database_owner;\nGRANT USAGE ON SCHEMA public TO PUBLIC;\n";
        } else {
            sql += "CREATE SCHEMA public;\nGRANT ALL ON SCHEMA public TO PUBLIC;\n";
        }
        sql += "COMMENT ON SCHEMA public IS 'standard public schema';\n";
    }
    for f in &t.foreign_data_wrappers {
        sql += &format!("DROP FOREIGN DATA WRAPPER IF EXISTS {} CASCADE;\n", ident(f));
    }
    if t.large_objects > 0 {
        sql += "SELECT lo_unlink(oid) FROM pg_largeobject_metadata;\n";
    }
    sql += "COMMIT;\n";
    client.batch_execute(&sql).await.map_err(|e| {
        LogicalError::Postgres(format!("empty database {:?}: {} (nothing was dropped)", t.database, pg_error(&e)))
    })
}

/// Options of `pg_restore` walnut passes on.
#[derive(Debug, Clone, Default)]
pub struct RestoreFlags {
    pub jobs: u32,
    /// `--no-owner`: objects owned by the connecting role.
    pub no_owner: bool,
    /// `--no-privileges`: no GRANT/REVOKE.
    pub no_privileges: bool,
    /// `--role`: restore as this role.
    pub role: Option<String>,
}

impl RestoreFlags {
    fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["--verbose".into()];
        if self.jobs > 1 {
            a.push(format!("--jobs={}", self.jobs).into());
        }
        if self.no_owner {
            a.push("--no-owner".into());
        }
        if self.no_privileges {
            a.push("--no-privileges".into());
        }
        if let Some(r) = &self.role {
            a.push(format!("--role={r}").into());
        }
        a
    }
}

/// The connection to a restore target, checked: the server's major version, the `pg_restore`
/// of that version, and the client (for [`inspect`] and [`empty`]).
pub struct Target {
    pub cfg: tokio_postgres::Config,
    pub client: tokio_postgres::Client,
    pub major: u32,
    pub pg_restore: Tool,
}

/// Connects to a target and finds its `pg_restore`. `dump_major` (the PostgreSQL version that
/// made the dump, when known) must not be newer than the target's: an older `pg_restore`
/// cannot read a newer `pg_dump`'s archive.
pub async fn target(
    cfg: tokio_postgres::Config,
    bindirs: &Bindirs,
    dump_major: Option<u32>,
) -> Result<Target, LogicalError> {
    let client = pg_connect(&cfg).await?;
    let v: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(|e| LogicalError::Postgres(pg_error(&e)))?
        .get(0);
    let major = (v as u32) / 10_000;
    if let Some(d) = dump_major
        && d > major
    {
        return Err(LogicalError::Invalid(format!(
            "the dump was made by PostgreSQL {d}'s pg_dump and the target runs PostgreSQL {major}: restore it into a \
             PostgreSQL {d} server or newer (a dump moves forward across major versions, not back)"
        )));
    }
    let pg_restore = tools::find(bindirs, "pg_restore", major)?;
    Ok(Target { cfg, client, major, pg_restore })
}

/// A running `pg_restore`: the child, the task reading its messages, and their tail.
struct Running {
    child: tokio::process::Child,
    program: String,
    watcher: tokio::task::JoinHandle<()>,
    tail: Arc<std::sync::Mutex<StderrTail>>,
}

/// Starts `pg_restore` into the target with `flags` and `extra` arguments, reading `file` (or
/// its standard input, piped, when `None`). Its lines count tables and say when the index and
/// constraint phase begins.
fn start_pg_restore(
    target: &Target,
    flags: &RestoreFlags,
    extra: &[&str],
    file: Option<&Path>,
    progress: &Arc<LogicalProgress>,
) -> Result<Running, LogicalError> {
    let mut args = flags.args();
    if file.is_none() {
        // Standard input is read in order: one job.
        args.retain(|a| !a.to_string_lossy().starts_with("--jobs"));
    }
    args.extend(extra.iter().map(OsString::from));
    args.push("--dbname".into());
    // The database by name from the environment; the option only guards against a name that
    // looks like a connection string.
    let env = tools::conn_env(&target.cfg, None);
    let db = env.iter().find(|(k, _)| *k == "PGDATABASE").and_then(|(_, v)| v.clone()).unwrap_or_default();
    args.push(db);
    let stdin = match file {
        Some(f) => {
            args.push(f.as_os_str().to_owned());
            std::process::Stdio::null()
        }
        None => std::process::Stdio::piped(),
    };
    let program = program_name(&target.pg_restore);
    let mut child = spawn(&target.pg_restore, &args, &env, stdin)?;
    let tail = Arc::new(std::sync::Mutex::new(StderrTail::default()));
    let watcher = {
        let p = progress.clone();
        watch_stderr(child.stderr.take().expect("piped"), Some(progress.clone()), tail.clone(), move |l| {
            if let Line::PostData(_) = l {
                p.set_phase(POST_DATA);
            }
        })
    };
    drop(child.stdout.take());
    Ok(Running { child, program, watcher, tail })
}

impl Running {
    /// Waits for the end; an error of pg_restore's is reported with its messages. `stopped`:
    /// what a cancellation leaves in the target.
    async fn finish(mut self, cancel: &CancellationToken, stopped: &str) -> Result<(), LogicalError> {
        let status = tokio::select! {
            s = self.child.wait() => s.map_err(io_ctx(format!("wait for {}", self.program)))?,
            _ = cancel.cancelled() => {
                self.kill().await;
                return Err(LogicalError::Abandoned(format!("walnut was asked to stop; {stopped}")));
            }
        };
        let detail = tail_of(self.watcher, &self.tail).await;
        if !status.success() {
            return Err(LogicalError::Program { program: self.program, status: capture_exit(status), detail });
        }
        Ok(())
    }

    async fn kill(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// What a cancelled or failed restore of a file leaves.
const PARTLY: &str = "the target database is partly restored";

/// Runs `pg_restore` of `file` into the target, with progress (tables, then the index and
/// constraint phase). An error of pg_restore's is reported with its messages.
pub async fn run_pg_restore(
    target: &Target,
    file: &Path,
    flags: &RestoreFlags,
    progress: Arc<LogicalProgress>,
    cancel: &CancellationToken,
) -> Result<(), LogicalError> {
    progress.set_phase("tables");
    start_pg_restore(target, flags, &[], Some(file), &progress)?.finish(cancel, PARTLY).await
}

/// Whether a dump restores at least as fast as it downloads ([`restore_streaming`]) as from a
/// file. Streamed, the data is loaded by one connection; from a file, `pg_restore --jobs N`
/// loads N tables at once. That helps only when no single table holds most of the data, so a
/// dump streams with `jobs` 1, or when its largest table holds 90% of its table data or more.
/// Without the sizes (a capture older than their record) it does not.
pub fn streams_well(jobs: u32, table_data: Option<dumpfile::DataSizes>) -> bool {
    jobs <= 1 || table_data.is_some_and(|d| u128::from(d.largest) * 10 >= u128::from(d.total) * 9)
}

/// Restores the dump `key` of the repository into an empty target while it downloads, with
/// nothing written to disk but its TOC (`toc_path`):
///
/// 1. the schema and the data: the dump streamed into `pg_restore --single-transaction
///    --section=pre-data --section=data` as it is decoded. Its last chunk goes only once the
///    whole object matched its checksum, so a corrupt or truncated object never commits: the
///    transaction is rolled back and the target is left as it was (empty);
/// 2. the indexes, constraints and the rest: `pg_restore --section=post-data --jobs N` of the
///    dump's header and TOC, which is all that section reads.
///
/// A dump whose TOC walnut does not read is an error before anything was committed
/// ([`LogicalError::Unstreamable`]): the caller restores it from a file instead.
pub async fn restore_streaming(
    repo: &Repository,
    key: &str,
    toc_path: &Path,
    target: &Target,
    flags: &RestoreFlags,
    progress: Arc<LogicalProgress>,
    cancel: &CancellationToken,
) -> Result<u64, LogicalError> {
    const ROLLED_BACK: &str = "nothing was restored (pg_restore's transaction is rolled back)";
    progress.set_phase("tables");
    let mut load = start_pg_restore(
        target,
        flags,
        &["--single-transaction", "--section=pre-data", "--section=data"],
        None,
        &progress,
    )?;
    let pipe = load.child.stdin.take().expect("piped").into_owned_fd().map_err(io_ctx("write to pg_restore"))?;
    let pipe_broke = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fetched = {
        let (k, keys, p, broke) = (key.to_string(), repo.keys().cloned(), progress.clone(), pipe_broke.clone());
        crate::backup::read_part(repo, key, move |reader| {
            let mut pipe = std::fs::File::from(pipe);
            match decode_into(reader, keys.as_deref(), &mut pipe, &p, Sink::Pipe) {
                Ok(d) => Ok(Some(d)),
                Err(Decode::Unstreamable) => Ok(None),
                Err(Decode::Object(reason)) => Err(BackupError::Corrupt { key: k, reason }),
                Err(Decode::Write(e)) => {
                    broke.store(true, Ordering::Relaxed);
                    Err(BackupError::Io { context: "write to pg_restore".into(), source: e })
                }
            }
        })
    };
    let fetched = tokio::select! {
        r = fetched => r,
        _ = cancel.cancelled() => {
            load.kill().await;
            return Err(LogicalError::Abandoned(format!("walnut was asked to stop; {ROLLED_BACK}")));
        }
    };
    let decoded = match fetched {
        Ok(Some(d)) => d,
        Ok(None) => {
            load.kill().await;
            return Err(LogicalError::Unstreamable(key.to_string()));
        }
        Err(e) if pipe_broke.load(Ordering::Relaxed) => {
            // pg_restore stopped reading: what it says is the error.
            load.finish(cancel, ROLLED_BACK).await?;
            return Err(from_backup(e));
        }
        Err(e) => {
            // pg_restore never got the end of the dump: it cannot have committed.
            load.kill().await;
            return Err(match from_backup(e) {
                LogicalError::Corrupt { key, reason } => LogicalError::Corrupt { key, reason },
                other => LogicalError::Invalid(format!("{other}; {ROLLED_BACK}")),
            });
        }
    };
    let toc = decoded.toc.expect("a streamed dump's TOC");
    load.finish(cancel, ROLLED_BACK).await?;
    std::fs::write(toc_path, &toc).map_err(io_ctx(format!("write {}", toc_path.display())))?;
    progress.set_phase(POST_DATA);
    start_pg_restore(target, flags, &["--section=post-data"], Some(toc_path), &progress)?
        .finish(cancel, "the data is restored, not all of its indexes and constraints")
        .await?;
    Ok(decoded.bytes)
}

fn capture_exit(status: std::process::ExitStatus) -> String {
    super::capture::exit_text(status)
}

/// A copy's two ends.
pub struct CopyEnds {
    pub from: tokio_postgres::Config,
    pub pg_dump: Tool,
    pub to: Target,
}

/// `pg_dump | pg_restore`: the source database streamed into the target (checked and emptied
/// by the caller), bytes counted on the way. When the dump's end has passed, the phase says
/// the index and constraint phase is running.
pub async fn copy(
    ends: &CopyEnds,
    flags: &RestoreFlags,
    progress: Arc<LogicalProgress>,
    cancel: &CancellationToken,
) -> Result<(), LogicalError> {
    let dump_env = tools::conn_env(&ends.from, None);
    let dump_args: Vec<OsString> = vec!["--format=custom".into(), "--compress=0".into(), "--verbose".into()];
    let mut dump = spawn(&ends.pg_dump, &dump_args, &dump_env, std::process::Stdio::null())?;
    let restore_env = tools::conn_env(&ends.to.cfg, None);
    let mut restore_args = flags.args();
    restore_args.retain(|a| !a.to_string_lossy().starts_with("--jobs"));
    restore_args.push("--dbname".into());
    restore_args
        .push(restore_env.iter().find(|(k, _)| *k == "PGDATABASE").and_then(|(_, v)| v.clone()).unwrap_or_default());
    let mut restore = spawn(&ends.to.pg_restore, &restore_args, &restore_env, std::process::Stdio::piped())?;
    let dump_tail = Arc::new(std::sync::Mutex::new(StderrTail::default()));
    let restore_tail = Arc::new(std::sync::Mutex::new(StderrTail::default()));
    // pg_dump's lines count the tables read; pg_restore's say when post-data begins.
    let dump_watch =
        watch_stderr(dump.stderr.take().expect("piped"), Some(progress.clone()), dump_tail.clone(), |_| {});
    let restore_watch = {
        let p = progress.clone();
        watch_stderr(restore.stderr.take().expect("piped"), None, restore_tail.clone(), move |l| {
            if let Line::PostData(_) = l {
                p.post_data_done.fetch_add(1, Ordering::Relaxed);
                p.set_phase(POST_DATA);
            }
        })
    };
    drop(restore.stdout.take());
    let input =
        std::fs::File::from(dump.stdout.take().expect("piped").into_owned_fd().map_err(io_ctx("read pg_dump"))?);
    let output =
        std::fs::File::from(restore.stdin.take().expect("piped").into_owned_fd().map_err(io_ctx("write pg_restore"))?);
    progress.set_phase("tables");
    let relay = {
        let progress = progress.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let (mut input, mut output) = (input, output);
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                output.write_all(&buf[..n])?;
                progress.bytes.fetch_add(n as u64, Ordering::Relaxed);
            }
            // The dump is all in: what pg_restore does now is build indexes and constraints.
            progress.set_phase(POST_DATA);
            Ok(())
        })
    };
    let stop = |d: &mut tokio::process::Child, r: &mut tokio::process::Child| {
        let _ = d.start_kill();
        let _ = r.start_kill();
    };
    let dump_status = tokio::select! {
        s = dump.wait() => s.map_err(io_ctx("wait for pg_dump"))?,
        _ = cancel.cancelled() => {
            stop(&mut dump, &mut restore);
            let _ = dump.wait().await;
            let _ = restore.wait().await;
            return Err(LogicalError::Abandoned("walnut was asked to stop; the target database is partly restored".into()));
        }
    };
    if !dump_status.success() {
        let _ = restore.start_kill();
        let _ = restore.wait().await;
        let detail = tail_of(dump_watch, &dump_tail).await;
        return Err(LogicalError::Program { program: "pg_dump".into(), status: capture_exit(dump_status), detail });
    }
    let relayed = relay.await.expect("relay thread panicked");
    let restore_status = tokio::select! {
        s = restore.wait() => s.map_err(io_ctx("wait for pg_restore"))?,
        _ = cancel.cancelled() => {
            let _ = restore.start_kill();
            let _ = restore.wait().await;
            return Err(LogicalError::Abandoned("walnut was asked to stop; the target database is partly restored".into()));
        }
    };
    let _ = tail_of(dump_watch, &dump_tail).await;
    let detail = tail_of(restore_watch, &restore_tail).await;
    if !restore_status.success() {
        return Err(LogicalError::Program {
            program: "pg_restore".into(),
            status: capture_exit(restore_status),
            detail,
        });
    }
    relayed.map_err(io_ctx("pipe pg_dump into pg_restore"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dumpfile::DataSizes;

    #[test]
    fn a_dump_streams_when_parallel_loading_cannot_help() {
        let sizes = |largest, total| Some(DataSizes { total, largest });
        assert!(streams_well(1, None), "one job: streaming only saves the download");
        assert!(streams_well(0, sizes(1, 100)));
        assert!(!streams_well(2, None), "sizes unknown: the file and pg_restore --jobs");
        assert!(streams_well(4, sizes(95, 100)), "one table holds the data: one connection loads it anyway");
        assert!(streams_well(2, sizes(90, 100)));
        assert!(!streams_well(2, sizes(89, 100)));
        assert!(!streams_well(8, sizes(10, 100)), "ten tables alike: eight connections load them");
        assert!(streams_well(2, sizes(0, 0)), "no table data at all");
        assert!(streams_well(2, sizes(u64::MAX, u64::MAX)));
    }
}
