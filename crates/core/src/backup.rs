//! Base backups: take (non-exclusive `pg_backup_start`/`pg_backup_stop`), list, fetch.
//!
//! Push pipeline, memory bounded by configuration whatever the database size: the data directory
//! is split into `parallel` streams (balanced by size); each stream runs on a blocking thread that
//! writes tar -> SHA-256 -> compressor -> fixed-size chunks into a bounded channel, and an async
//! task uploads the chunks as a streamed (multipart) object. A stream rolls over to a new part
//! object at file boundaries once `part_size` bytes of tar went into the current one.
//!
//! Commit last: the manifest is written (create-only) after every part is stored and the WAL the
//! backup needs is archived; only then is the backup DONE. A `running.json` marker, refreshed while
//! the backup runs, lets listings show RUNNING, and FAILED once it goes stale.

use crate::envelope::{self, Codec, Compressor, HashingReader, HashingWriter, PayloadReader};
use crate::layout;
use crate::repo::{Identity, RepoError, Repository};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use walnut_pg::{Lsn, PgMajor, SystemId, TimelineId, WalFileName, WalSegSize, names::SegName};
use walnut_storage::{PutMode, StorageError};

pub const MANIFEST_FORMAT: u32 = 1;
/// A running backup refreshes its marker this often; a marker older than 3x this is FAILED.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    /// Relative to the data directory (`pg_tblspc/<oid>/...` for tablespaces).
    pub path: String,
    pub size: u64,
    /// SHA-256 of the content, hex.
    pub sha256: String,
    /// Modification time, Unix seconds.
    pub mtime: i64,
    /// The part object's key.
    pub part: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartEntry {
    pub key: String,
    pub stored_bytes: u64,
    pub content_bytes: u64,
    pub content_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tablespace {
    pub oid: String,
    pub location: String,
    /// `pg_tablespace.spcname` (absent in manifests written before walnut recorded it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Tablespace {
    /// The name when known, else the OID.
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.oid)
    }
}

/// A backup's manifest: everything needed to restore it, written last.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    pub name: Option<String>,
    /// Taken by the agent's schedule (true) or on demand (false).
    pub scheduled: bool,
    pub system_identifier: String,
    pub pg_version_num: u32,
    pub pg_major: PgMajor,
    pub wal_segment_size: u64,
    pub timeline: u32,
    pub start_lsn: String,
    /// The consistency point: recovery must replay at least to here.
    pub end_lsn: String,
    pub start_wal: String,
    pub end_wal: String,
    pub start_time: String,
    pub end_time: String,
    pub label: String,
    pub backup_label: String,
    pub tablespace_map: String,
    pub data_bytes: u64,
    pub stored_bytes: u64,
    pub compression: String,
    pub tablespaces: Vec<Tablespace>,
    pub parts: Vec<PartEntry>,
    pub files: Vec<FileEntry>,
    /// Room for incremental backups: the backup this one builds on.
    #[serde(default)]
    pub parent: Option<String>,
}

impl Manifest {
    pub fn start(&self) -> Lsn {
        self.start_lsn.parse().unwrap_or_default()
    }
    pub fn end(&self) -> Lsn {
        self.end_lsn.parse().unwrap_or_default()
    }
    pub fn tli(&self) -> TimelineId {
        TimelineId(self.timeline)
    }
    pub fn end_time(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        chrono::DateTime::parse_from_rfc3339(&self.end_time).ok().map(|t| t.with_timezone(&chrono::Utc))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Done,
    Running,
    Failed,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Done => "DONE",
            Status::Running => "RUNNING",
            Status::Failed => "FAILED",
        })
    }
}

/// One line of a listing.
#[derive(Debug, Clone, Serialize)]
pub struct BackupInfo {
    pub id: String,
    pub status: Status,
    #[serde(flatten)]
    pub manifest: Option<ManifestSummary>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A manifest without its file list.
#[derive(Debug, Clone, Serialize)]
pub struct ManifestSummary {
    pub name: Option<String>,
    pub scheduled: bool,
    pub timeline: u32,
    pub start_lsn: String,
    pub end_lsn: String,
    pub start_wal: String,
    pub end_wal: String,
    pub start_time: String,
    pub end_time: String,
    pub data_bytes: u64,
    pub stored_bytes: u64,
    pub files: usize,
    pub pg_version_num: u32,
}

impl From<&Manifest> for ManifestSummary {
    fn from(m: &Manifest) -> Self {
        ManifestSummary {
            name: m.name.clone(),
            scheduled: m.scheduled,
            timeline: m.timeline,
            start_lsn: m.start_lsn.clone(),
            end_lsn: m.end_lsn.clone(),
            start_wal: m.start_wal.clone(),
            end_wal: m.end_wal.clone(),
            start_time: m.start_time.clone(),
            end_time: m.end_time.clone(),
            data_bytes: m.data_bytes,
            stored_bytes: m.stored_bytes,
            files: m.files.len(),
            pg_version_num: m.pg_version_num,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Repo(#[from] RepoError),
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error("no backup matches {0:?}: give a backup ID, a backup name, or LATEST (see `walnut backup-list`)")]
    NotFound(String),
    #[error("backup object {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(
        "the WAL this backup needs ({segment}) did not reach the repository within {waited:?}: archiving is not \
         working. Check archive_command and pg_stat_archiver (or run `walnut check`); the backup is not DONE"
    )]
    ArchiveTimeout { segment: String, waited: Duration },
    #[error("backup abandoned: {0}; it is marked FAILED and will never be DONE")]
    Abandoned(String),
}

fn io_ctx(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackupError {
    let context = context.into();
    move |source| BackupError::Io { context, source }
}

/// Validates a backup name: `[A-Za-z0-9._-]{1,64}`, and not something that looks like an ID.
pub fn check_name(name: &str) -> Result<(), BackupError> {
    let ok = (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !layout::is_backup_id(name)
        && !name.eq_ignore_ascii_case("latest");
    if ok {
        Ok(())
    } else {
        Err(BackupError::Invalid(format!(
            "invalid backup name {name:?}: use 1 to 64 characters from A-Z a-z 0-9 . _ - (not LATEST, not a backup ID)"
        )))
    }
}

// ---------------------------------------------------------------------------------------------
// Listing and resolving

/// Stops a backup's heartbeat and marks it FAILED when the backup's future is dropped before it
/// finished (see [`push`]); disarmed once the backup ends normally.
struct MarkerGuard {
    repo: Repository,
    id: String,
    failed: Bytes,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

impl MarkerGuard {
    fn disarm(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
    }
}

impl Drop for MarkerGuard {
    fn drop(&mut self) {
        let Some(h) = self.heartbeat.take() else { return };
        h.abort();
        // Best effort: when the runtime is gone too, the marker goes stale and reads as FAILED.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (repo, key, body) = (self.repo.clone(), layout::backup_running(&self.id), self.failed.clone());
            rt.spawn(async move {
                let _ = repo.store().put(&key, body, PutMode::Overwrite).await;
            });
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
struct RunningMarker {
    started_at: String,
    host: String,
    pid: u32,
    #[serde(default)]
    error: Option<String>,
}

/// Every backup in the repository, oldest first.
pub async fn list(repo: &Repository) -> Result<Vec<BackupInfo>, BackupError> {
    let objects = repo.store().list(layout::BACKUPS_DIR).await?;
    let mut ids: HashMap<String, (bool, Option<chrono::DateTime<chrono::Utc>>)> = HashMap::new();
    for o in &objects {
        let Some(id) = layout::backup_id_of(&o.key) else { continue };
        let e = ids.entry(id.to_string()).or_default();
        if o.key == layout::backup_manifest(id) {
            e.0 = true;
        } else if o.key == layout::backup_running(id) {
            e.1 = Some(o.last_modified);
        }
    }
    let mut ids: Vec<_> = ids.into_iter().collect();
    ids.sort_by(|a, b| a.0.cmp(&b.0));
    let loaded = futures::stream::iter(ids)
        .map(|(id, (has_manifest, marker))| async move {
            if has_manifest {
                let m = load_manifest(repo, &id).await?;
                return Ok(BackupInfo { id, status: Status::Done, manifest: Some((&m).into()), error: None });
            }
            let marker_doc = match repo.get_object(&layout::backup_running(&id)).await {
                Ok(d) => serde_json::from_slice::<RunningMarker>(&d.content).ok(),
                Err(_) => None,
            };
            let fresh =
                marker.is_some_and(|t| chrono::Utc::now() - t < chrono::Duration::from_std(HEARTBEAT * 3).unwrap());
            let error = marker_doc.as_ref().and_then(|m| m.error.clone());
            let status = if fresh && error.is_none() { Status::Running } else { Status::Failed };
            let error = error.or((status == Status::Failed).then(|| "interrupted (no manifest, marker stale)".into()));
            Ok::<_, BackupError>(BackupInfo { id, status, manifest: None, error })
        })
        .buffered(8)
        .collect::<Vec<_>>()
        .await;
    loaded.into_iter().collect()
}

pub async fn load_manifest(repo: &Repository, id: &str) -> Result<Manifest, BackupError> {
    let d = repo.get_object(&layout::backup_manifest(id)).await?;
    serde_json::from_slice(&d.content)
        .map_err(|e| BackupError::Corrupt { key: layout::backup_manifest(id), reason: e.to_string() })
}

/// Finds a DONE backup by ID, name or `LATEST`.
pub async fn resolve(repo: &Repository, reference: &str) -> Result<Manifest, BackupError> {
    let all = list(repo).await?;
    let done: Vec<&BackupInfo> = all.iter().filter(|b| b.status == Status::Done).collect();
    let found = if reference.eq_ignore_ascii_case("latest") {
        done.last().copied()
    } else {
        done.iter()
            .find(|b| b.id == reference)
            .or_else(|| done.iter().find(|b| b.manifest.as_ref().and_then(|m| m.name.as_deref()) == Some(reference)))
            .copied()
    };
    match found {
        Some(b) => load_manifest(repo, &b.id).await,
        None => Err(BackupError::NotFound(reference.to_string())),
    }
}

// ---------------------------------------------------------------------------------------------
// Push

pub struct PushOptions {
    pub pg: tokio_postgres::Config,
    /// The data directory as this process sees it (default: `SHOW data_directory`).
    pub pgdata: Option<PathBuf>,
    pub name: Option<String>,
    pub scheduled: bool,
    pub codec: Codec,
    /// Parallel streams (threads compressing, uploads in flight).
    pub parallel: usize,
    /// Roll over to a new part object after this many bytes of tar.
    pub part_size: u64,
    /// How long to wait for the backup's WAL to be archived.
    pub archive_wait: Duration,
    /// Cancelled: the backup is abandoned where it stands and marked FAILED (never DONE).
    pub cancel: tokio_util::sync::CancellationToken,
}

/// Progress counters, shared with whoever displays them.
#[derive(Debug, Default)]
pub struct Progress {
    pub total: AtomicU64,
    pub done: AtomicU64,
}

#[derive(Debug, Clone)]
struct SourceFile {
    /// Path in the backup (relative, `/`-separated).
    rel: String,
    abs: PathBuf,
    size: u64,
    mtime: i64,
    mode: u32,
    dir: bool,
}

/// What a base backup leaves out (PostgreSQL docs, "Backing Up the Data Directory"; pg_basebackup).
fn exclusion(rel: &str, name: &str, is_dir: bool) -> Option<&'static str> {
    const CONTENTS_ONLY: &[&str] = &[
        "pg_wal",
        "pg_dynshmem",
        "pg_notify",
        "pg_replslot",
        "pg_serial",
        "pg_snapshots",
        "pg_stat_tmp",
        "pg_subtrans",
    ];
    const FILES: &[&str] = &[
        "postmaster.pid",
        "postmaster.opts",
        "backup_label",
        "backup_label.old",
        "tablespace_map",
        "backup_manifest",
        "recovery.signal",
        "standby.signal",
        "current_logfiles",
    ];
    if name.starts_with("pgsql_tmp") {
        return Some("temporary");
    }
    if name == "pg_internal.init" {
        return Some("relcache init file");
    }
    let parent = rel.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
    if CONTENTS_ONLY.contains(&parent) {
        return Some("contents not backed up");
    }
    if !is_dir && !rel.contains('/') && FILES.contains(&name) {
        return Some("not part of a base backup");
    }
    // Temporary relations: t<backend>_<relfilenode>[...]
    if !is_dir && let Some(rest) = name.strip_prefix('t') {
        let (a, b) = rest.split_once('_').unwrap_or(("", ""));
        if !a.is_empty() && a.bytes().all(|c| c.is_ascii_digit()) && b.starts_with(|c: char| c.is_ascii_digit()) {
            return Some("temporary relation");
        }
    }
    None
}

fn walk(
    root: &Path,
    prefix: &str,
    out: &mut Vec<SourceFile>,
    tablespaces: &mut Vec<Tablespace>,
) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut stack = vec![(root.to_path_buf(), prefix.to_string())];
    while let Some((dir, rel_dir)) = stack.pop() {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in rd {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = if rel_dir.is_empty() { name.clone() } else { format!("{rel_dir}/{name}") };
            let lmeta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            // Tablespaces: pg_tblspc/<oid> symlinks, followed and stored below pg_tblspc/<oid>.
            if lmeta.file_type().is_symlink() {
                if rel_dir == "pg_tblspc" || (prefix.is_empty() && rel_dir.is_empty() && name == "pg_wal") {
                    let target = std::fs::read_link(entry.path())?;
                    if rel_dir == "pg_tblspc" {
                        tablespaces.push(Tablespace {
                            oid: name.clone(),
                            location: target.display().to_string(),
                            name: None,
                        });
                        out.push(SourceFile {
                            rel: rel.clone(),
                            abs: entry.path(),
                            size: 0,
                            mtime: 0,
                            mode: 0o700,
                            dir: true,
                        });
                        stack.push((target, rel));
                    } else {
                        // pg_wal elsewhere: an empty pg_wal in the backup.
                        out.push(SourceFile { rel, abs: entry.path(), size: 0, mtime: 0, mode: 0o700, dir: true });
                    }
                }
                continue;
            }
            let is_dir = lmeta.is_dir();
            if exclusion(&rel, &name, is_dir).is_some() {
                continue;
            }
            if !is_dir && !lmeta.is_file() {
                continue;
            }
            out.push(SourceFile {
                rel: rel.clone(),
                abs: entry.path(),
                size: if is_dir { 0 } else { lmeta.len() },
                mtime: lmeta.mtime(),
                mode: lmeta.permissions().mode() & 0o7777,
                dir: is_dir,
            });
            if is_dir {
                stack.push((entry.path(), rel));
            }
        }
    }
    Ok(())
}

/// Splits files into `n` streams of similar total size (largest first onto the lightest).
fn balance(files: Vec<SourceFile>, n: usize) -> Vec<Vec<SourceFile>> {
    let n = n.max(1);
    let (dirs, mut regular): (Vec<_>, Vec<_>) = files.into_iter().partition(|f| f.dir);
    regular.sort_by_key(|f| std::cmp::Reverse(f.size));
    let mut streams: Vec<(u64, Vec<SourceFile>)> = (0..n).map(|_| (0, Vec::new())).collect();
    for f in regular {
        let lightest = streams.iter_mut().min_by_key(|s| s.0).expect("n >= 1");
        lightest.0 += f.size.max(512);
        lightest.1.push(f);
    }
    let mut out: Vec<Vec<SourceFile>> = streams
        .into_iter()
        .map(|(_, mut v)| {
            v.sort_by(|a, b| a.rel.cmp(&b.rel));
            v
        })
        .collect();
    // Directories first, in the first stream, parents before children.
    let mut dirs = dirs;
    dirs.sort_by(|a, b| a.rel.cmp(&b.rel));
    out[0].splice(0..0, dirs);
    out.retain(|s| !s.is_empty());
    out
}

enum Msg {
    Start(String),
    Data(Bytes),
    End { content_len: u64, sha256: [u8; 32] },
}

/// Fixed-size chunks into the upload channel.
struct ChunkWriter {
    tx: mpsc::Sender<Msg>,
    buf: Vec<u8>,
}

const CHUNK: usize = 4 << 20;

impl ChunkWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.tx
            .blocking_send(Msg::Data(chunk.into()))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "upload stopped"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

type PartWriter = tar::Builder<HashingWriter<Compressor<ChunkWriter>>>;

fn finish_part(builder: PartWriter, tx: &mpsc::Sender<Msg>) -> std::io::Result<()> {
    let hashing = builder.into_inner()?;
    let (compressor, content_len, sha256) = hashing.finish();
    let mut chunks = compressor.finish()?;
    chunks.send()?;
    tx.blocking_send(Msg::End { content_len, sha256 })
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "upload stopped"))
}

/// One stream: tar -> hash -> compress -> chunks, rolling parts at file boundaries.
fn produce_stream(
    id: &str,
    stream: usize,
    files: Vec<SourceFile>,
    codec: Codec,
    part_size: u64,
    tx: mpsc::Sender<Msg>,
    progress: &Progress,
) -> std::io::Result<Vec<FileEntry>> {
    let mut entries = Vec::new();
    let mut part_no = 0;
    let mut current: Option<(PartWriter, String)> = None;
    for f in files {
        if current.is_none() {
            part_no += 1;
            let key = layout::backup_part(id, stream, part_no);
            tx.blocking_send(Msg::Start(key.clone()))
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "upload stopped"))?;
            let chunks = ChunkWriter { tx: tx.clone(), buf: Vec::with_capacity(CHUNK) };
            let mut b = tar::Builder::new(HashingWriter::new(Compressor::new(chunks, codec)?));
            b.mode(tar::HeaderMode::Complete);
            current = Some((b, key));
        }
        let (builder, key) = current.as_mut().expect("started");
        let mut header = tar::Header::new_gnu();
        header.set_mode(f.mode);
        header.set_mtime(f.mtime.max(0) as u64);
        if f.dir {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            builder.append_data(&mut header, format!("{}/", f.rel), std::io::empty())?;
        } else {
            let file = match std::fs::File::open(&f.abs) {
                Ok(file) => file,
                // Files that vanish during the backup are normal (WAL replay recreates them).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(std::io::Error::new(e.kind(), format!("read {}: {e}", f.abs.display()))),
            };
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(f.size);
            // Exactly the size in the header: a file that shrank is padded with zeros, one that
            // grew is cut (WAL replay repairs both).
            let mut reader = HashingReader::new(file.take(f.size).chain(std::io::repeat(0)).take(f.size));
            builder.append_data(&mut header, &f.rel, &mut reader)?;
            let (_, sum) = reader.finish();
            progress.done.fetch_add(f.size, Ordering::Relaxed);
            entries.push(FileEntry {
                path: f.rel.clone(),
                size: f.size,
                sha256: hex::encode(sum),
                mtime: f.mtime,
                part: key.clone(),
            });
        }
        if builder.get_ref().count >= part_size {
            let (b, _) = current.take().expect("started");
            finish_part(b, &tx)?;
        }
    }
    if let Some((b, _)) = current.take() {
        finish_part(b, &tx)?;
    }
    Ok(entries)
}

/// Uploads what one stream produces.
async fn upload_stream(
    repo: Repository,
    codec: Codec,
    mut rx: mpsc::Receiver<Msg>,
) -> Result<Vec<PartEntry>, BackupError> {
    let mut parts = Vec::new();
    let mut current: Option<(Box<dyn walnut_storage::ObjectWriter>, String, u64)> = None;
    let result = async {
        while let Some(msg) = rx.recv().await {
            match msg {
                Msg::Start(key) => {
                    let mut w = repo.store().put_writer(&key).await?;
                    let header = envelope::stream_header(codec);
                    let n = header.len() as u64;
                    w.write(header.into()).await?;
                    current = Some((w, key, n));
                }
                Msg::Data(b) => {
                    let (w, _, n) = current.as_mut().expect("part started");
                    *n += b.len() as u64;
                    w.write(b).await?;
                }
                Msg::End { content_len, sha256 } => {
                    let (mut w, key, n) = current.take().expect("part started");
                    let trailer = envelope::stream_trailer(content_len, sha256);
                    let stored = n + trailer.len() as u64;
                    w.write(trailer.into()).await?;
                    w.finish().await?;
                    parts.push(PartEntry {
                        key,
                        stored_bytes: stored,
                        content_bytes: content_len,
                        content_sha256: hex::encode(sha256),
                    });
                }
            }
        }
        Ok::<_, BackupError>(())
    }
    .await;
    if let Err(e) = result {
        if let Some((w, _, _)) = current.take() {
            let _ = w.abort().await;
        }
        return Err(e);
    }
    Ok(parts)
}

async fn connect(pg: &tokio_postgres::Config) -> Result<tokio_postgres::Client, BackupError> {
    let (client, conn) = tokio::time::timeout(Duration::from_secs(30), pg.connect(tokio_postgres::NoTls))
        .await
        .map_err(|_| BackupError::Postgres("connect: timed out after 30s".into()))?
        .map_err(|e| BackupError::Postgres(format!("connect: {}", pg_error(&e))))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("PostgreSQL connection closed: {e}");
        }
    });
    Ok(client)
}

/// A PostgreSQL error's message, with its detail (tokio-postgres' Display hides them).
pub fn pg_error(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => match db.hint() {
            Some(h) => format!("{} (hint: {h})", db.message()),
            None => db.message().to_string(),
        },
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(inner) = src {
                s = format!("{s}: {inner}");
                src = inner.source();
            }
            s
        }
    }
}

fn parse_label_field<'a>(label: &'a str, field: &str) -> Option<&'a str> {
    label.lines().find_map(|l| l.strip_prefix(field)).map(str::trim)
}

async fn new_backup_id(repo: &Repository, now: chrono::DateTime<chrono::Utc>) -> Result<String, BackupError> {
    let base = now.format("%Y%m%dT%H%M%S").to_string();
    for n in 0..100 {
        let id = if n == 0 { base.clone() } else { format!("{base}-{n}") };
        if repo.store().list(&layout::backup_dir(&id)).await?.is_empty() {
            return Ok(id);
        }
    }
    Err(BackupError::Invalid("too many backups started in one second".into()))
}

fn json_object(v: &impl Serialize) -> Bytes {
    let body = serde_json::to_vec_pretty(v).expect("serialisable");
    envelope::encode(&body, &serde_json::Value::Null, Codec { compression: crate::Compression::None, level: 0 })
}

/// Takes a base backup of a running cluster (see the module docs).
pub async fn push(repo: &Repository, opts: &PushOptions, progress: Arc<Progress>) -> Result<Manifest, BackupError> {
    if let Some(n) = &opts.name {
        check_name(n)?;
        let taken = list(repo)
            .await?
            .into_iter()
            .any(|b| b.manifest.as_ref().and_then(|m| m.name.as_deref()) == Some(n.as_str()));
        if taken {
            return Err(BackupError::Invalid(format!("a backup named {n:?} already exists: names are unique")));
        }
    }
    let client = connect(&opts.pg).await?;
    let q = |e: tokio_postgres::Error| BackupError::Postgres(pg_error(&e));
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, (SELECT system_identifier::text FROM pg_control_system()), \
             current_setting('data_directory'), current_setting('wal_segment_size'), pg_is_in_recovery(), \
             current_setting('wal_level'), (SELECT bytes_per_wal_segment FROM pg_control_init())",
            &[],
        )
        .await
        .map_err(q)?;
    let version_num: i32 = row.get(0);
    let sysid_text: String = row.get(1);
    let data_directory: String = row.get(2);
    let in_recovery: bool = row.get(4);
    let wal_level: String = row.get(5);
    let seg_bytes: i32 = row.get(6);
    if in_recovery {
        return Err(BackupError::Invalid("the server is a standby: take base backups on the primary".into()));
    }
    if wal_level == "minimal" {
        return Err(BackupError::Invalid("wal_level is minimal: set wal_level = replica and restart".into()));
    }
    let major = PgMajor::from_version_text(&version_num.to_string())
        .ok_or_else(|| BackupError::Invalid(format!("unknown server version {version_num}")))?;
    let seg = WalSegSize::new(seg_bytes as u64).map_err(|e| BackupError::Invalid(e.to_string()))?;
    let sysid = SystemId(sysid_text.parse().map_err(|_| BackupError::Invalid("bad system identifier".into()))?);
    repo.ensure_identity(&Identity::new(sysid, major, seg)).await?;
    let pgdata = opts.pgdata.clone().unwrap_or_else(|| PathBuf::from(&data_directory));
    if !pgdata.join("PG_VERSION").exists() {
        return Err(BackupError::Invalid(format!(
            "{} is not the data directory of this server (no PG_VERSION): pass --pgdata",
            pgdata.display()
        )));
    }

    let started = chrono::Utc::now();
    let id = new_backup_id(repo, started).await?;
    let marker = RunningMarker {
        started_at: started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        host: std::fs::read_to_string("/etc/hostname").unwrap_or_default().trim().to_string(),
        pid: std::process::id(),
        error: None,
    };
    repo.store().put(&layout::backup_running(&id), json_object(&marker), PutMode::Overwrite).await?;
    let heartbeat = {
        let repo = repo.clone();
        let key = layout::backup_running(&id);
        let body = json_object(&marker);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                let _ = repo.store().put(&key, body.clone(), PutMode::Overwrite).await;
            }
        })
    };
    // If this future is dropped half-way (its caller went away), the heartbeat must not keep a
    // RUNNING marker fresh for ever: the guard stops it and marks the backup FAILED.
    let mut guard = MarkerGuard {
        repo: repo.clone(),
        id: id.clone(),
        failed: json_object(&RunningMarker {
            error: Some("backup abandoned: the task running it was dropped before it finished".into()),
            ..marker.clone()
        }),
        heartbeat: Some(heartbeat),
    };
    let inner =
        push_inner(repo, opts, &client, &id, &pgdata, started, version_num as u32, major, seg, &sysid_text, progress);
    let result = tokio::select! {
        r = inner => r,
        _ = opts.cancel.cancelled() => Err(BackupError::Abandoned("walnut was asked to stop".into())),
    };
    guard.disarm();
    match result {
        Ok(m) => {
            let _ = repo.store().delete(&layout::backup_running(&id)).await;
            Ok(m)
        }
        Err(e) => {
            let failed = RunningMarker { error: Some(e.to_string()), ..marker };
            let _ = repo.store().put(&layout::backup_running(&id), json_object(&failed), PutMode::Overwrite).await;
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn push_inner(
    repo: &Repository,
    opts: &PushOptions,
    client: &tokio_postgres::Client,
    id: &str,
    pgdata: &Path,
    started: chrono::DateTime<chrono::Utc>,
    version_num: u32,
    major: PgMajor,
    seg: WalSegSize,
    sysid: &str,
    progress: Arc<Progress>,
) -> Result<Manifest, BackupError> {
    let q = |e: tokio_postgres::Error| BackupError::Postgres(pg_error(&e));
    let label = format!("walnut {id}");
    let start_lsn: String =
        client.query_one("SELECT pg_backup_start($1, true)::text", &[&label]).await.map_err(q)?.get(0);

    let root = pgdata.to_path_buf();
    let (files, tablespaces) = crate::repo::cpu(move || {
        let mut files = Vec::new();
        let mut ts = Vec::new();
        walk(&root, "", &mut files, &mut ts).map(|_| (files, ts))
    })
    .await
    .map_err(io_ctx(format!("read the data directory {}", pgdata.display())))?;
    progress.total.store(files.iter().map(|f| f.size).sum(), Ordering::Relaxed);

    let streams = balance(files, opts.parallel);
    let mut producers = Vec::new();
    let mut uploaders = Vec::new();
    for (i, files) in streams.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel(2);
        let (id, codec, part_size, progress) = (id.to_string(), opts.codec, opts.part_size, progress.clone());
        producers
            .push(tokio::task::spawn_blocking(move || produce_stream(&id, i, files, codec, part_size, tx, &progress)));
        uploaders.push(tokio::spawn(upload_stream(repo.clone(), opts.codec, rx)));
    }
    let mut file_entries = Vec::new();
    let mut parts = Vec::new();
    let mut first_error: Option<BackupError> = None;
    // Upload errors first: a producer's "upload stopped" is only their echo.
    for u in uploaders {
        match u.await.expect("upload task panicked") {
            Ok(p) => parts.extend(p),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    for p in producers {
        match p.await.expect("backup stream panicked") {
            Ok(f) => file_entries.extend(f),
            Err(e) => {
                first_error.get_or_insert(BackupError::Io { context: "back up the data directory".into(), source: e });
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }

    // Stop without PostgreSQL's own unbounded wait for archiving; walnut waits, bounded, below.
    let row =
        client.query_one("SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)", &[]).await.map_err(q)?;
    let end_lsn_text: String = row.get(0);
    let backup_label: String = row.get(1);
    let tablespace_map: String = row.get(2);
    let end_lsn: Lsn =
        end_lsn_text.parse().map_err(|_| BackupError::Postgres(format!("bad stop LSN {end_lsn_text}")))?;
    let start: Lsn = start_lsn.parse().map_err(|_| BackupError::Postgres(format!("bad start LSN {start_lsn}")))?;
    let tli: u32 = parse_label_field(&backup_label, "START TIMELINE:")
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| BackupError::Postgres("backup_label has no START TIMELINE".into()))?;
    let start_seg = SegName::new(TimelineId(tli), seg.segno(start), seg);
    let end_seg = SegName::new(TimelineId(tli), seg.segno(Lsn(end_lsn.0.saturating_sub(1).max(start.0))), seg);

    // The backup is usable only once the WAL up to its end is archived.
    let key = layout::wal_key(&WalFileName::Segment(end_seg));
    let deadline = tokio::time::Instant::now() + opts.archive_wait;
    loop {
        if repo.store().head(&key).await?.is_some() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(BackupError::ArchiveTimeout { segment: end_seg.to_string(), waited: opts.archive_wait });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    file_entries.sort_by(|a, b| a.path.cmp(&b.path));
    parts.sort_by(|a, b| a.key.cmp(&b.key));
    let mut tablespaces = tablespaces;
    if !tablespaces.is_empty() {
        for row in client.query("SELECT oid::text, spcname::text FROM pg_tablespace", &[]).await.map_err(q)? {
            let (oid, name): (String, String) = (row.get(0), row.get(1));
            if let Some(t) = tablespaces.iter_mut().find(|t| t.oid == oid) {
                t.name = Some(name);
            }
        }
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        id: id.to_string(),
        name: opts.name.clone(),
        scheduled: opts.scheduled,
        system_identifier: sysid.to_string(),
        pg_version_num: version_num,
        pg_major: major,
        wal_segment_size: seg.bytes(),
        timeline: tli,
        start_lsn: start.to_string(),
        end_lsn: end_lsn.to_string(),
        start_wal: start_seg.to_string(),
        end_wal: end_seg.to_string(),
        start_time: started.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        end_time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        label,
        backup_label,
        tablespace_map,
        data_bytes: file_entries.iter().map(|f| f.size).sum(),
        stored_bytes: parts.iter().map(|p| p.stored_bytes).sum(),
        compression: format!("{:?}", opts.codec.compression).to_lowercase(),
        tablespaces,
        parts,
        files: file_entries,
        parent: None,
    };
    // Commit: the manifest, create-only, last.
    repo.store().put(&layout::backup_manifest(id), json_object(&manifest), PutMode::Create).await?;
    Ok(manifest)
}

// ---------------------------------------------------------------------------------------------
// Fetch

/// A `Read` over byte chunks arriving on a channel (from an async download).
struct ChannelReader {
    rx: mpsc::Receiver<Result<Bytes, StorageError>>,
    cur: Bytes,
}

impl Read for ChannelReader {
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

fn safe_relative(p: &Path) -> bool {
    p.components().all(|c| matches!(c, Component::Normal(_))) && p.components().next().is_some()
}

/// Reads what another thread sends, chunk by chunk; the sender hanging up is the end.
struct QueueReader {
    rx: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for QueueReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(chunk) => (self.cur, self.pos) = (chunk?, 0),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

struct CountingReader<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// fsyncs restored files on a few threads while extraction goes on (an fsync inside the extraction
/// loop stalled decompression on every flush). The queue is bounded, so open files never pile up.
struct Syncer {
    tx: std::sync::mpsc::SyncSender<(PathBuf, std::fs::File)>,
    workers: Vec<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Syncer {
    fn start(threads: usize) -> Syncer {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(PathBuf, std::fs::File)>(64);
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let workers = (0..threads)
            .map(|_| {
                let rx = rx.clone();
                std::thread::spawn(move || -> std::io::Result<()> {
                    loop {
                        let job = rx.lock().expect("fsync queue").recv();
                        let Ok((path, file)) = job else { return Ok(()) };
                        file.sync_data()
                            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
                    }
                })
            })
            .collect();
        Syncer { tx, workers }
    }

    fn sender(&self) -> std::sync::mpsc::SyncSender<(PathBuf, std::fs::File)> {
        self.tx.clone()
    }

    /// Waits until every queued file is synced (all senders must be dropped first).
    fn finish(self) -> std::io::Result<()> {
        drop(self.tx);
        let mut first = Ok(());
        for w in self.workers {
            let r = w.join().expect("fsync thread panicked");
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// fsyncs every directory that holds a restored file or directory (the ancestors of `files`,
/// relative to `root`, through the pg_tblspc links too).
fn sync_dirs(root: &Path, files: &[String]) -> std::io::Result<()> {
    let mut dirs = std::collections::BTreeSet::new();
    for f in files {
        let mut p = Path::new(f.as_str());
        while let Some(parent) = p.parent() {
            if !dirs.insert(root.join(parent)) {
                break;
            }
            p = parent;
        }
    }
    dirs.extend([root.to_path_buf(), root.join("pg_tblspc"), root.join("pg_wal"), root.join("pg_wal/archive_status")]);
    for d in dirs.iter().filter(|d| d.exists()) {
        std::fs::File::open(d)
            .and_then(|f| f.sync_all())
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", d.display())))?;
    }
    Ok(())
}

/// Extracts one part into `dest`, verifying every file against the manifest and the part's
/// checksum. Returns the paths written.
fn extract_part(
    key: &str,
    reader: ChannelReader,
    dest: &Path,
    expected: &HashMap<String, FileEntry>,
    progress: &Progress,
    fsync: &std::sync::mpsc::SyncSender<(PathBuf, std::fs::File)>,
) -> Result<Vec<String>, BackupError> {
    use std::os::unix::fs::PermissionsExt;
    let corrupt = |reason: String| BackupError::Corrupt { key: key.to_string(), reason };
    let mut payload = PayloadReader::new(reader).map_err(|e| corrupt(e.to_string()))?;
    let codecs = payload.codecs.clone();
    let mut written = Vec::new();
    let payload_ref = &mut payload;
    let n = std::thread::scope(|scope| -> Result<u64, BackupError> {
        // Decompression runs on its own thread, a few MiB ahead of this one (which checksums and
        // writes): a part whose sibling parts are done still uses two cores.
        let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<Vec<u8>>>(4);
        scope.spawn(move || {
            let mut decompressed =
                match envelope::decompressor(std::io::BufReader::with_capacity(1 << 20, payload_ref), &codecs) {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = tx.send(Err(std::io::Error::other(e.to_string())));
                        return;
                    }
                };
            loop {
                let mut buf = Vec::with_capacity(1 << 20);
                let r = (&mut decompressed).take(1 << 20).read_to_end(&mut buf).map(|_| buf);
                match r {
                    Ok(b) if b.is_empty() => return, // the end: the receiver sees the hang-up
                    Ok(b) => {
                        if tx.send(Ok(b)).is_err() {
                            return; // the extraction stopped
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            }
        });
        // Counts, does not hash: every file's content is checked against its SHA-256 in the
        // (itself checksummed) manifest, tar headers are checked by the parser and against the
        // manifest's paths and sizes, and nothing else in the tar is written. Hashing the whole
        // part again would add a second SHA-256 pass over every restored byte.
        let mut counting = CountingReader { inner: QueueReader { rx, cur: Vec::new(), pos: 0 }, count: 0 };
        {
            let mut archive = tar::Archive::new(&mut counting);
            for entry in archive.entries().map_err(|e| corrupt(e.to_string()))? {
                let mut entry = entry.map_err(|e| corrupt(e.to_string()))?;
                let path = entry.path().map_err(|e| corrupt(e.to_string()))?.into_owned();
                if !safe_relative(&path) {
                    return Err(corrupt(format!("unsafe path {}", path.display())));
                }
                let target = dest.join(&path);
                match entry.header().entry_type() {
                    tar::EntryType::Directory => {
                        std::fs::create_dir_all(&target).map_err(io_ctx(format!("create {}", target.display())))?;
                        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700))
                            .map_err(io_ctx(format!("chmod {}", target.display())))?;
                    }
                    tar::EntryType::Regular => {
                        let rel = path.to_string_lossy().into_owned();
                        let want = expected
                            .get(&rel)
                            .ok_or_else(|| corrupt(format!("{rel} is in the part but not in the manifest")))?;
                        if let Some(parent) = target.parent() {
                            std::fs::create_dir_all(parent).map_err(io_ctx(format!("create {}", parent.display())))?;
                        }
                        let mut file =
                            std::fs::File::create(&target).map_err(io_ctx(format!("create {}", target.display())))?;
                        let mut h = HashingReader::new(&mut entry);
                        std::io::copy(&mut h, &mut file).map_err(|e| corrupt(format!("{rel}: {e}")))?;
                        let (n, sum) = h.finish();
                        if n != want.size || hex::encode(sum) != want.sha256 {
                            return Err(corrupt(format!("{rel}: content does not match the manifest checksum")));
                        }
                        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))
                            .map_err(io_ctx(format!("chmod {}", target.display())))?;
                        let mtime = std::time::UNIX_EPOCH + Duration::from_secs(want.mtime.max(0) as u64);
                        let _ = file.set_modified(mtime);
                        progress.done.fetch_add(n, Ordering::Relaxed);
                        written.push(rel);
                        // Flushed by the syncer's threads while extraction goes on.
                        if fsync.send((target, file)).is_err() {
                            return Err(BackupError::Invalid("the fsync threads stopped".into()));
                        }
                    }
                    other => return Err(corrupt(format!("unexpected tar entry type {other:?}"))),
                }
            }
        }
        std::io::copy(&mut counting, &mut std::io::sink()).map_err(|e| corrupt(e.to_string()))?;
        Ok(counting.count)
    })?;
    let (tn, _) = payload.trailer().map_err(|e| corrupt(e.to_string()))?;
    if n != tn {
        return Err(corrupt(format!("the part holds {n} bytes of tar, its trailer says {tn}")));
    }
    Ok(written)
}

/// Downloads and extracts a backup into `dest` (which must exist and be empty), in parallel,
/// verifying everything; then writes `backup_label` (and `tablespace_map` when the tablespaces
/// are not restored in place) and the directories PostgreSQL needs.
pub async fn fetch(
    repo: &Repository,
    manifest: &Manifest,
    dest: &Path,
    tablespace_dirs: &HashMap<String, PathBuf>,
    parallel: usize,
    progress: Arc<Progress>,
) -> Result<(), BackupError> {
    progress.total.store(manifest.data_bytes, Ordering::Relaxed);
    // Tablespaces: DEST/pg_tblspc/<oid> is a symlink to the tablespace's directory (created
    // here), so their files extract through it, as PostgreSQL expects them.
    if !manifest.tablespaces.is_empty() {
        use std::os::unix::fs::PermissionsExt;
        let links = dest.join("pg_tblspc");
        std::fs::create_dir_all(&links).map_err(io_ctx(format!("create {}", links.display())))?;
        for t in &manifest.tablespaces {
            let dir = tablespace_dirs.get(&t.oid).ok_or_else(|| {
                BackupError::Invalid(format!("no directory given for tablespace {} (oid {})", t.display_name(), t.oid))
            })?;
            std::fs::create_dir_all(dir).map_err(io_ctx(format!("create {}", dir.display())))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_ctx(format!("chmod {}", dir.display())))?;
            std::os::unix::fs::symlink(dir, links.join(&t.oid)).map_err(io_ctx(format!(
                "link pg_tblspc/{} to {}",
                t.oid,
                dir.display()
            )))?;
        }
    }
    let expected: Arc<HashMap<String, FileEntry>> =
        Arc::new(manifest.files.iter().map(|f| (f.path.clone(), f.clone())).collect());
    let syncer = Syncer::start(4);
    let fsync = syncer.sender();
    let results: Vec<Result<Vec<String>, BackupError>> = futures::stream::iter(manifest.parts.clone())
        .map(|part| {
            let (repo, expected, progress, dest) =
                (repo.clone(), expected.clone(), progress.clone(), dest.to_path_buf());
            let fsync = fsync.clone();
            async move {
                let mut stream = repo.store().get_stream(&part.key).await?;
                let (tx, rx) = mpsc::channel(4);
                let forward = tokio::spawn(async move {
                    while let Some(chunk) = stream.next().await {
                        let stop = chunk.is_err();
                        if tx.send(chunk).await.is_err() || stop {
                            break;
                        }
                    }
                });
                let key = part.key.clone();
                let r = tokio::task::spawn_blocking(move || {
                    extract_part(&key, ChannelReader { rx, cur: Bytes::new() }, &dest, &expected, &progress, &fsync)
                })
                .await
                .expect("extract task panicked");
                forward.abort();
                r
            }
        })
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    drop(fsync);
    let synced = crate::repo::cpu(move || syncer.finish()).await;
    let mut seen = std::collections::HashSet::new();
    for r in results {
        seen.extend(r?);
    }
    synced.map_err(io_ctx(format!("fsync the files restored into {}", dest.display())))?;
    if let Some(missing) = manifest.files.iter().find(|f| !seen.contains(&f.path)) {
        return Err(BackupError::Corrupt { key: missing.part.clone(), reason: format!("{} is missing", missing.path) });
    }
    for d in ["pg_wal", "pg_wal/archive_status"] {
        let p = dest.join(d);
        std::fs::create_dir_all(&p).map_err(io_ctx(format!("create {}", p.display())))?;
    }
    // Durable before anything else is written: the files are synced (above), now every directory.
    let root = dest.to_path_buf();
    let files: Vec<String> = manifest.files.iter().map(|f| f.path.clone()).collect();
    crate::repo::cpu(move || sync_dirs(&root, &files))
        .await
        .map_err(io_ctx(format!("fsync the files restored into {}", dest.display())))?;

    crate::wal::write_durably(&dest.join("backup_label"), &Bytes::from(manifest.backup_label.clone()))
        .await
        .map_err(|e| BackupError::Invalid(e.to_string()))?;
    Ok(())
}

/// PostgreSQL's own `backup_manifest` (version 1) for a fetched backup, so `pg_verifybackup`
/// can check it independently.
pub fn postgres_manifest(m: &Manifest) -> String {
    use sha2::Digest;
    let mut out = String::from("{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n");
    let label_sum = hex::encode(envelope::sha256(m.backup_label.as_bytes()));
    let mut entries: Vec<(String, u64, i64, String)> =
        m.files.iter().map(|f| (f.path.clone(), f.size, f.mtime, f.sha256.clone())).collect();
    entries.push(("backup_label".into(), m.backup_label.len() as u64, chrono::Utc::now().timestamp(), label_sum));
    let n = entries.len();
    for (i, (path, size, mtime, sum)) in entries.into_iter().enumerate() {
        let when = chrono::DateTime::from_timestamp(mtime, 0).unwrap_or_default().format("%Y-%m-%d %H:%M:%S GMT");
        out += &format!(
            "{{ \"Path\": {}, \"Size\": {size}, \"Last-Modified\": \"{when}\", \"Checksum-Algorithm\": \"SHA256\", \"Checksum\": \"{sum}\" }}{}\n",
            serde_json::to_string(&path).expect("string"),
            if i + 1 < n { "," } else { "" }
        );
    }
    out += &format!(
        "],\n\"WAL-Ranges\": [\n{{ \"Timeline\": {}, \"Start-LSN\": \"{}\", \"End-LSN\": \"{}\" }}\n],\n",
        m.timeline, m.start_lsn, m.end_lsn
    );
    let sum = hex::encode(sha2::Sha256::digest(out.as_bytes()));
    out += &format!("\"Manifest-Checksum\": \"{sum}\"}}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("pre-migration").is_ok());
        assert!(check_name("a.b_c-1").is_ok());
        for bad in ["", "has space", "LATEST", "20260101T000000", &"x".repeat(65), "semi;colon"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn exclusions_follow_the_postgres_docs() {
        assert!(exclusion("pg_wal/000000010000000000000001", "000000010000000000000001", false).is_some());
        assert!(exclusion("pg_wal", "pg_wal", true).is_none(), "the directory itself is kept");
        assert!(exclusion("postmaster.pid", "postmaster.pid", false).is_some());
        assert!(exclusion("base/1/pg_internal.init", "pg_internal.init", false).is_some());
        assert!(exclusion("base/5/t3_16384", "t3_16384", false).is_some());
        assert!(exclusion("base/5/16384", "16384", false).is_none());
        assert!(exclusion("base/pgsql_tmp", "pgsql_tmp", true).is_some());
        assert!(exclusion("global/pg_control", "pg_control", false).is_none());
        assert!(exclusion("pg_replslot/slot1", "slot1", true).is_some());
    }

    #[test]
    fn balance_spreads_bytes() {
        let f = |rel: &str, size| SourceFile {
            rel: rel.into(),
            abs: PathBuf::new(),
            size,
            mtime: 0,
            mode: 0o600,
            dir: false,
        };
        let mut files = vec![f("a", 100), f("b", 90), f("c", 50), f("d", 40)];
        files.push(SourceFile { dir: true, ..f("base", 0) });
        let s = balance(files, 2);
        assert_eq!(s.len(), 2);
        let sum = |v: &Vec<SourceFile>| v.iter().map(|x| x.size).sum::<u64>();
        assert_eq!(sum(&s[0]) + sum(&s[1]), 280);
        assert!(sum(&s[0]).abs_diff(sum(&s[1])) <= 20);
        assert!(s[0][0].dir, "directories first");
    }
}
