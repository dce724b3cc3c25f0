//! Taking a capture: claim an ID (the RUNNING marker, create-only, refreshed by a heartbeat),
//! run `pg_dump` per database (and `pg_dumpall --globals-only` for `--all`) with their output
//! streamed through the envelope into the repository, then write the manifest, create-only,
//! last. A failure or a cancellation kills the programs, aborts the uploads, deletes what was
//! stored and rewrites the marker with the reason: the capture is FAILED, never DONE.

use super::tools::{self, Bindirs, Tool};
use super::*;
use crate::backup::{ChunkWriter, channel_sender, pg_error};
use crate::envelope::{Compressor, HashingWriter, Sealing};
use bytes::Bytes;
use std::ffi::OsString;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::io::AsyncBufReadExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use walnut_pg::{PgMajor, SystemId, WalSegSize};

/// Which databases a capture dumps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Databases {
    /// The connection's own database.
    Default,
    One(String),
    /// Every database that accepts connections (templates excepted), plus the globals.
    All,
}

pub struct CaptureOptions {
    /// Where to connect: the running server, or a fork restored from the archive.
    pub pg: tokio_postgres::Config,
    pub databases: Databases,
    pub bindirs: Bindirs,
    pub codec: Codec,
    pub source: Source,
    /// Cancelled: the programs are killed, the uploads aborted, the capture marked FAILED.
    pub cancel: CancellationToken,
}

/// A capture that has claimed its ID: RUNNING until [`Running::run`] commits it or marks it
/// FAILED (or [`Running::fail`] does). Dropped without either, it stops its heartbeat and marks
/// itself FAILED in the background (best effort: the marker goes stale otherwise).
pub struct Running {
    repo: Repository,
    id: String,
    name: Option<String>,
    scheduled: bool,
    marker: Marker,
    started: chrono::DateTime<chrono::Utc>,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    pub fn id(&self) -> &str {
        &self.id
    }

    fn stop_heartbeat(&mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
    }

    /// Marks the capture FAILED with `why` (what it stored is deleted; the marker stays, so
    /// listings say what happened).
    pub async fn fail(mut self, why: &str) {
        self.stop_heartbeat();
        self.mark_failed(why).await;
    }

    async fn mark_failed(&self, why: &str) {
        let failed = Marker { error: Some(why.to_string()), ..self.marker.clone() };
        if let Ok(objects) = self.repo.store().list(&layout::logical_dir(&self.id)).await {
            for o in objects.iter().filter(|o| o.key != layout::logical_running(&self.id)) {
                let _ = self.repo.store().delete(&o.key).await;
            }
        }
        if let Err(e) = self
            .repo
            .store()
            .put(&layout::logical_running(&self.id), crate::lock::json_record(&failed), PutMode::Overwrite)
            .await
        {
            tracing::warn!("mark capture {} FAILED: {e} (its marker goes stale and it lists as FAILED)", self.id);
        }
    }

    /// Dumps what `opts` says into the repository and commits the capture (DONE), or marks it
    /// FAILED and returns why.
    pub async fn run(
        mut self,
        opts: &CaptureOptions,
        progress: Arc<LogicalProgress>,
    ) -> Result<CaptureManifest, LogicalError> {
        let result = self.capture(opts, &progress).await;
        self.stop_heartbeat();
        match result {
            Ok(m) => {
                let _ = self.repo.store().delete(&layout::logical_running(&self.id)).await;
                Ok(m)
            }
            // Refused before anything was dumped (an unknown database, no client binaries):
            // a mistake to correct, not a capture that ran; it leaves no record.
            Err(e @ (LogicalError::Invalid(_) | LogicalError::Tool(_)))
                if progress.databases_done.load(Ordering::Relaxed) == 0
                    && progress.bytes.load(Ordering::Relaxed) == 0 =>
            {
                let _ = delete_objects(&self.repo, &self.id).await;
                Err(e)
            }
            Err(e) => {
                // A killed pg_dump's session may sit in a lock wait until the lock is granted:
                // end it on the server too, so nothing of the capture keeps running.
                terminate_sessions(&opts.pg, &application_name(&self.id)).await;
                self.mark_failed(&e.to_string()).await;
                Err(e)
            }
        }
    }

    async fn capture(
        &self,
        opts: &CaptureOptions,
        progress: &Arc<LogicalProgress>,
    ) -> Result<CaptureManifest, LogicalError> {
        let q = |e: tokio_postgres::Error| LogicalError::Postgres(pg_error(&e));
        let client = pg_connect(&opts.pg).await?;
        let row = client
            .query_one(
                "SELECT current_setting('server_version_num')::int, \
                 (SELECT system_identifier::text FROM pg_control_system()), \
                 (SELECT bytes_per_wal_segment FROM pg_control_init())",
                &[],
            )
            .await
            .map_err(q)?;
        let version_num: i32 = row.get(0);
        let sysid: String = row.get(1);
        let seg_bytes: i32 = row.get(2);
        let major = PgMajor::from_version_text(&version_num.to_string())
            .ok_or_else(|| LogicalError::Invalid(format!("unknown server version {version_num}")))?;
        // A repository belongs to one cluster: captures of another one are refused like its WAL.
        let seg = WalSegSize::new(seg_bytes as u64).map_err(|e| LogicalError::Invalid(e.to_string()))?;
        let sysid_num = SystemId(sysid.parse().map_err(|_| LogicalError::Invalid("bad system identifier".into()))?);
        self.repo.ensure_identity(&crate::repo::Identity::new(sysid_num, major, seg)).await?;

        let existing: Vec<(String, bool)> = client
            .query("SELECT datname::text, datallowconn AND NOT datistemplate FROM pg_database ORDER BY datname", &[])
            .await
            .map_err(q)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let names = || existing.iter().filter(|(_, ok)| *ok).map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ");
        let databases: Vec<String> = match &opts.databases {
            Databases::All => existing.iter().filter(|(_, ok)| *ok).map(|(n, _)| n.clone()).collect(),
            one => {
                let db = match one {
                    Databases::One(d) => d.clone(),
                    _ => opts.pg.get_dbname().or(opts.pg.get_user()).unwrap_or("postgres").to_string(),
                };
                match existing.iter().find(|(n, _)| *n == db) {
                    None => {
                        return Err(LogicalError::Invalid(format!(
                            "database {db:?} does not exist on the server (its databases: {}): give --database one of them",
                            names()
                        )));
                    }
                    Some((_, false)) => {
                        return Err(LogicalError::Invalid(format!(
                            "database {db:?} is a template or does not accept connections: nothing to capture"
                        )));
                    }
                    Some(_) => vec![db],
                }
            }
        };
        let pg_dump = tools::find(&opts.bindirs, "pg_dump", major.0)?;
        let pg_dumpall = if opts.databases == Databases::All {
            Some(tools::find(&opts.bindirs, "pg_dumpall", major.0)?)
        } else {
            None
        };
        // Tables whose data each dump will hold, for the progress (pg_dump --verbose names each).
        let mut total = 0u64;
        for db in &databases {
            let mut cfg = opts.pg.clone();
            cfg.dbname(db);
            let c = pg_connect(&cfg).await?;
            let n: i64 = c.query_one(COUNT_TABLES, &[]).await.map_err(q)?.get(0);
            total += n as u64;
        }
        drop(client);
        progress.tables_total.store(total, Ordering::Relaxed);
        progress.databases_total.store(databases.len() as u64, Ordering::Relaxed);

        let mut globals = None;
        if let Some(dumpall) = &pg_dumpall {
            progress.set_phase("globals (roles, tablespaces)");
            let env = with_app(tools::conn_env(&opts.pg, None), &application_name(&self.id));
            let args: Vec<OsString> = vec!["--globals-only".into()];
            let (object, _, _) = dump_object(
                &self.repo,
                &layout::logical_globals(&self.id),
                &opts.codec,
                dumpall,
                args,
                &env,
                progress,
                &opts.cancel,
            )
            .await?;
            globals = Some(object);
        }
        let mut dumps = Vec::new();
        for (i, db) in databases.iter().enumerate() {
            progress.set_phase(format!("database {db}"));
            let env = with_app(tools::conn_env(&opts.pg, Some(db)), &application_name(&self.id));
            let args: Vec<OsString> = vec!["--format=custom".into(), "--compress=0".into(), "--verbose".into()];
            let (object, tables, table_data) = dump_object(
                &self.repo,
                &layout::logical_dump(&self.id, i + 1),
                &opts.codec,
                &pg_dump,
                args,
                &env,
                progress,
                &opts.cancel,
            )
            .await?;
            dumps.push(DatabaseDump { database: db.clone(), format: "custom".into(), tables, object, table_data });
            progress.databases_done.fetch_add(1, Ordering::Relaxed);
        }
        let all_objects = dumps.iter().map(|d| &d.object).chain(globals.iter());
        let (dump_bytes, stored_bytes) =
            all_objects.fold((0, 0), |(c, s), o| (c + o.content_bytes, s + o.stored_bytes));
        let manifest = CaptureManifest {
            format: MANIFEST_FORMAT,
            id: self.id.clone(),
            name: self.name.clone(),
            scheduled: self.scheduled,
            source: opts.source.clone(),
            all: opts.databases == Databases::All,
            system_identifier: sysid,
            pg_version_num: version_num as u32,
            pg_major: major.0,
            tool_version: pg_dump.version.clone(),
            start_time: crate::timefmt::as_stored(self.started),
            end_time: crate::timefmt::as_stored(chrono::Utc::now()),
            databases: dumps,
            globals,
            dump_bytes,
            stored_bytes,
            compression: format!("{:?}", opts.codec.compression).to_lowercase(),
        };
        if opts.cancel.is_cancelled() {
            return Err(LogicalError::Abandoned("walnut was asked to stop".into()));
        }
        // Commit: the manifest, create-only, last.
        self.repo
            .store()
            .put(&layout::logical_manifest(&self.id), manifest_object(&manifest, &opts.codec), PutMode::Create)
            .await?;
        Ok(manifest)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let Some(h) = self.heartbeat.take() else { return };
        h.abort();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let failed = Marker {
                error: Some("capture abandoned: the task running it was dropped before it finished".into()),
                ..self.marker.clone()
            };
            let (repo, key) = (self.repo.clone(), layout::logical_running(&self.id));
            rt.spawn(async move {
                let _ = repo.store().put(&key, crate::lock::json_record(&failed), PutMode::Overwrite).await;
            });
        }
    }
}

/// The `application_name` of a capture's sessions (`pg_stat_activity`, the server log).
pub fn application_name(id: &str) -> String {
    format!("walnut logical capture {id}")
}

fn with_app(mut env: Vec<(&'static str, Option<OsString>)>, name: &str) -> Vec<(&'static str, Option<OsString>)> {
    if let Some(e) = env.iter_mut().find(|(k, _)| *k == "PGAPPNAME") {
        e.1 = Some(name.into());
    }
    env
}

/// Ends the server sessions named `name` (best effort, bounded).
async fn terminate_sessions(cfg: &tokio_postgres::Config, name: &str) {
    let run = async {
        let c = pg_connect(cfg).await.ok()?;
        c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", &[&name])
            .await
            .ok()
    };
    if let Ok(Some(n)) = tokio::time::timeout(std::time::Duration::from_secs(10), run).await
        && n > 0
    {
        tracing::debug!("ended {n} session(s) of {name}");
    }
}

/// Tables whose data `pg_dump` dumps: ordinary tables outside the system schemas that are not
/// members of an extension.
const COUNT_TABLES: &str = "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
    WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
    AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%' \
    AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype = 'e')";

/// Claims a new capture ID (its RUNNING marker, create-only) and starts the heartbeat.
pub async fn begin(repo: &Repository, name: Option<String>, scheduled: bool) -> Result<Running, LogicalError> {
    if let Some(n) = &name {
        check_name(n)?;
        let taken = list(repo).await?.iter().any(|c| c.catalog.as_ref().and_then(|k| k.name.as_deref()) == Some(n));
        if taken {
            return Err(LogicalError::Invalid(format!("a capture named {n:?} already exists: names are unique")));
        }
    }
    let started = chrono::Utc::now();
    let marker = Marker {
        started_at: started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        host: std::fs::read_to_string("/etc/hostname").unwrap_or_default().trim().to_string(),
        pid: std::process::id(),
        name: name.clone(),
        error: None,
    };
    let base = started.format("%Y%m%dT%H%M%S").to_string();
    let mut claimed = None;
    for n in 0..100 {
        let id = if n == 0 { base.clone() } else { format!("{base}-{n}") };
        if !repo.store().list(&layout::logical_dir(&id)).await?.is_empty() {
            continue;
        }
        match repo.store().put(&layout::logical_running(&id), crate::lock::json_record(&marker), PutMode::Create).await
        {
            Ok(()) => {
                claimed = Some(id);
                break;
            }
            Err(StorageError::AlreadyExists { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let id = claimed.ok_or_else(|| LogicalError::Invalid("too many captures started in one second".into()))?;
    let heartbeat = {
        let (repo, key, body) = (repo.clone(), layout::logical_running(&id), crate::lock::json_record(&marker));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                let _ = repo.store().put(&key, body.clone(), PutMode::Overwrite).await;
            }
        })
    };
    Ok(Running { repo: repo.clone(), id, name, scheduled, marker, started, heartbeat: Some(heartbeat) })
}

/// A child process's stderr, read line by line to its end: progress counted, the lines worth an
/// error kept in `tail`.
pub(crate) fn watch_stderr(
    stderr: tokio::process::ChildStderr,
    progress: Option<Arc<LogicalProgress>>,
    tail: Arc<std::sync::Mutex<StderrTail>>,
    on_line: impl Fn(&Line) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let parsed = match &progress {
                Some(p) => count_line(p, &line),
                None => parse_line(&line),
            };
            if let Line::Error(_) | Line::Warning(_) = parsed {
                tracing::debug!("{line}");
            }
            on_line(&parsed);
            tail.lock().expect("stderr tail").push(&line, &parsed);
        }
    })
}

/// The tail of a program's stderr once it has all been read (the watcher ends at its end).
pub(crate) async fn tail_of(watcher: tokio::task::JoinHandle<()>, tail: &std::sync::Mutex<StderrTail>) -> String {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), watcher).await;
    tail.lock().expect("stderr tail").summary()
}

/// Starts a PostgreSQL program: its own process group (a Ctrl-C reaches walnut, which stops it),
/// killed if walnut drops it, connection settings in its environment.
pub(crate) fn spawn(
    tool: &Tool,
    args: &[OsString],
    env: &[(&'static str, Option<OsString>)],
    stdin: std::process::Stdio,
) -> Result<tokio::process::Child, LogicalError> {
    let mut cmd = tokio::process::Command::new(&tool.path);
    cmd.args(args)
        .stdin(stdin)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    tools::apply_env(&mut cmd, env);
    cmd.spawn().map_err(|e| LogicalError::Tool(format!("cannot run {}: {e}", tool.path.display())))
}

/// How a program ended, for errors.
pub(crate) fn exit_text(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

/// The name of a program, for messages.
pub(crate) fn program_name(tool: &Tool) -> String {
    tool.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| tool.path.display().to_string())
}

/// Runs `tool` and stores what it writes to stdout as the streamed object `key` (hash,
/// compress, encrypt, upload in chunks). The object is finished only once the program exited
/// successfully; on a failure or a cancellation the upload is aborted and the program killed.
/// Returns the object, the tables its `--verbose` output named, and the table data sizes of a
/// custom-format dump.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn dump_object(
    repo: &Repository,
    key: &str,
    codec: &Codec,
    tool: &Tool,
    args: Vec<OsString>,
    env: &[(&'static str, Option<OsString>)],
    progress: &Arc<LogicalProgress>,
    cancel: &CancellationToken,
) -> Result<(StoredObject, u64, Option<dumpfile::DataSizes>), LogicalError> {
    let program = program_name(tool);
    let mut child = spawn(tool, &args, env, std::process::Stdio::null())?;
    let tables = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let tail = Arc::new(std::sync::Mutex::new(StderrTail::default()));
    let mut stderr = Some({
        let tables = tables.clone();
        watch_stderr(child.stderr.take().expect("piped"), Some(progress.clone()), tail.clone(), move |l| {
            if let Line::TableData(_) = l {
                tables.fetch_add(1, Ordering::Relaxed);
            }
        })
    });
    let stdout = child.stdout.take().expect("piped").into_owned_fd().map_err(io_ctx(format!("read {program}")))?;
    let input = std::fs::File::from(stdout);
    // Progress is shared through an Arc the producer thread can hold.
    let counted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (tx, mut rx) = mpsc::channel::<Bytes>(4);
    let producer = {
        let (codec, counted) = (codec.clone(), counted.clone());
        tokio::task::spawn_blocking(move || produce(input, codec, tx, &counted))
    };
    let abandoned = || LogicalError::Abandoned("walnut was asked to stop".into());
    let mut writer = repo.store().put_writer(key).await?;
    let header = envelope::stream_header(codec);
    let mut stored = header.len() as u64;
    let mut reported = 0u64;
    let upload = async {
        tokio::select! {
            r = writer.write(header.into()) => r?,
            _ = cancel.cancelled() => return Err(abandoned()),
        }
        loop {
            let chunk = tokio::select! {
                c = rx.recv() => c,
                _ = cancel.cancelled() => return Err(abandoned()),
            };
            let Some(chunk) = chunk else { return Ok(()) };
            stored += chunk.len() as u64;
            progress.stored.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            let now = counted.load(Ordering::Relaxed);
            progress.bytes.fetch_add(now - reported, Ordering::Relaxed);
            reported = now;
            tokio::select! {
                r = writer.write(chunk) => r?,
                _ = cancel.cancelled() => return Err(abandoned()),
            }
        }
    }
    .await;
    let finish = async {
        upload?;
        let (content_len, sha256, stored_sum, sizes) = match producer.await.expect("dump producer panicked") {
            Ok(t) => t,
            Err(e) => return Err(LogicalError::Io { context: format!("store the output of {program}"), source: e }),
        };
        progress.bytes.fetch_add(counted.load(Ordering::Relaxed) - reported, Ordering::Relaxed);
        // Finished only once the program said it succeeded: a dump cut short is never stored whole.
        let status = tokio::select! {
            s = child.wait() => s.map_err(io_ctx(format!("wait for {program}")))?,
            _ = cancel.cancelled() => return Err(abandoned()),
        };
        if !status.success() {
            let detail = tail_of(stderr.take().expect("watched"), &tail).await;
            return Err(LogicalError::Program { program: program.clone(), status: exit_text(status), detail });
        }
        let trailer = envelope::stream_trailer(content_len, sha256, stored_sum);
        stored += trailer.len() as u64;
        progress.stored.fetch_add(trailer.len() as u64, Ordering::Relaxed);
        Ok((trailer, content_len, sha256, sizes))
    }
    .await;
    match finish {
        Ok((trailer, content_len, sha256, sizes)) => {
            writer.write(trailer.into()).await?;
            writer.finish().await?;
            let tables = tables.load(Ordering::Relaxed);
            Ok((
                StoredObject {
                    key: key.to_string(),
                    stored_bytes: stored,
                    content_bytes: content_len,
                    content_sha256: hex::encode(sha256),
                },
                tables,
                sizes,
            ))
        }
        Err(e) => {
            let _ = child.start_kill();
            let status = child.wait().await;
            let _ = writer.abort().await;
            // A program that failed before the upload noticed: its own error is the cause.
            if let (LogicalError::Io { .. } | LogicalError::Storage(_), Ok(s)) = (&e, &status)
                && !s.success()
                && !cancel.is_cancelled()
                && let Some(watcher) = stderr.take()
            {
                let detail = tail_of(watcher, &tail).await;
                if !tail.lock().expect("stderr tail").errors().is_empty() {
                    return Err(LogicalError::Program { program, status: exit_text(*s), detail });
                }
            }
            Err(e)
        }
    }
}

/// What [`produce`] stored: the content's length and SHA-256, the stored payload's SHA-256 when
/// encrypted, and the table data sizes of a custom-format dump.
type Produced = (u64, [u8; 32], Option<envelope::StoredSum>, Option<dumpfile::DataSizes>);

/// Reads `input` to its end through hash -> compress -> encrypt -> chunks on `tx`.
fn produce(
    input: std::fs::File,
    codec: Codec,
    tx: mpsc::Sender<Bytes>,
    counted: &std::sync::atomic::AtomicU64,
) -> std::io::Result<Produced> {
    let chunks = ChunkWriter::new(channel_sender(tx, |b| b));
    let w = HashingWriter::new(Compressor::new(Sealing::new(chunks, &codec)?, &codec)?);
    let mut feed = dumpfile::Pieces::new(dumpfile::Copying::new(input, w, counted));
    let sizes = match dumpfile::data_sizes(&mut feed) {
        Ok(sizes) => Some(sizes),
        Err(dumpfile::ScanError::Io(e)) => return Err(e),
        Err(dumpfile::ScanError::Unsupported(why)) => {
            tracing::debug!("no table data sizes for this output: {why}");
            None
        }
    };
    feed.drain()?;
    let (compressor, len, sum) = feed.producer.output.finish();
    let (mut chunks, payload_sum) = compressor.finish()?.finish()?;
    chunks.finish()?;
    Ok((len, sum, payload_sum, sizes))
}
