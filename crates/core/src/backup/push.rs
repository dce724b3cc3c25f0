//! Taking a base backup: the session, the parallel tar -> compress -> upload streams, the
//! RUNNING marker and its heartbeat, and the manifest written last.

use super::*;

/// Stops a backup's heartbeat and marks it FAILED when the backup's future is dropped before it
/// finished (see [`push`]); disarmed once the backup ends normally.
pub(super) struct MarkerGuard {
    pub(super) repo: Repository,
    pub(super) id: String,
    pub(super) failed: Bytes,
    pub(super) heartbeat: Option<tokio::task::JoinHandle<()>>,
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
                let _ = repo.store().delete(layout::BACKUP_LOCK).await;
            });
        }
    }
}

/// How long a cancelled backup waits for its uploads to abort.
const UPLOADS_ABORT_WAIT: Duration = Duration::from_secs(30);

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
    /// A block-incremental backup (a full one when there is nothing to build on).
    pub incremental: Option<IncrementalOptions>,
    /// Bytes per second the data directory is read at, at most.
    pub max_rate: Option<u64>,
}

/// Progress counters, shared with whoever displays them.
#[derive(Debug, Default)]
pub struct Progress {
    pub total: AtomicU64,
    pub done: AtomicU64,
}

pub(super) enum Msg {
    Start(String),
    Data(Bytes),
    End { content_len: u64, sha256: [u8; 32], stored_sum: Option<envelope::StoredSum> },
}

/// A `Write` that hands fixed-size chunks to `send` (an upload's channel); [`ChunkWriter::finish`]
/// sends the rest.
pub(crate) struct ChunkWriter {
    send: Box<dyn FnMut(Bytes) -> std::io::Result<()> + Send>,
    buf: Vec<u8>,
}

pub(crate) const CHUNK: usize = 4 << 20;

impl ChunkWriter {
    pub(crate) fn new(send: impl FnMut(Bytes) -> std::io::Result<()> + Send + 'static) -> ChunkWriter {
        ChunkWriter { send: Box::new(send), buf: Vec::with_capacity(CHUNK) }
    }

    /// Sends what is buffered.
    pub(crate) fn finish(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        (self.send)(chunk.into())
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.finish()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The sender of an upload channel, as a [`ChunkWriter`] sends (from a blocking thread).
pub(crate) fn channel_sender<T: Send + 'static>(
    tx: mpsc::Sender<T>,
    wrap: impl Fn(Bytes) -> T + Send + 'static,
) -> impl FnMut(Bytes) -> std::io::Result<()> + Send + 'static {
    move |b| {
        tx.blocking_send(wrap(b)).map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "upload stopped"))
    }
}

type PartWriter = tar::Builder<HashingWriter<Compressor<Sealing<ChunkWriter>>>>;

pub(super) fn finish_part(builder: PartWriter, tx: &mpsc::Sender<Msg>) -> std::io::Result<()> {
    let hashing = builder.into_inner()?;
    let (compressor, content_len, sha256) = hashing.finish();
    let (mut chunks, stored_sum) = compressor.finish()?.finish()?;
    chunks.finish()?;
    tx.blocking_send(Msg::End { content_len, sha256, stored_sum })
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "upload stopped"))
}

/// One stream: tar -> hash -> compress -> chunks, rolling parts at file boundaries.
#[allow(clippy::too_many_arguments)]
pub(super) fn produce_stream(
    id: &str,
    stream: usize,
    files: Vec<SourceFile>,
    codec: Codec,
    part_size: u64,
    tx: mpsc::Sender<Msg>,
    progress: &Progress,
    throttle: Option<&Throttle>,
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
            let chunks = ChunkWriter::new(channel_sender(tx.clone(), Msg::Data));
            let mut b = tar::Builder::new(HashingWriter::new(Compressor::new(Sealing::new(chunks, &codec)?, &codec)?));
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
            let stored = f.stored_size();
            header.set_size(stored);
            // Exactly the size in the header (see SourceReader).
            let mut reader = HashingReader::new(SourceReader::new(file, &f, throttle));
            builder.append_data(&mut header, &f.rel, &mut reader)?;
            let (_, sum) = reader.finish();
            progress.done.fetch_add(stored, Ordering::Relaxed);
            entries.push(FileEntry {
                path: f.rel.clone(),
                size: f.size,
                sha256: hex::encode(sum),
                mtime: f.mtime,
                part: key.clone(),
                blocks: f.blocks.clone(),
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

/// Uploads what one stream produces. Every part's multipart upload is either finished or
/// aborted: on an upload error, when `stop` is cancelled (the backup was cancelled or its future
/// dropped), and when the producer stops in the middle of a part.
pub(super) async fn upload_stream(
    repo: Repository,
    codec: Codec,
    mut rx: mpsc::Receiver<Msg>,
    stop: tokio_util::sync::CancellationToken,
) -> Result<Vec<PartEntry>, BackupError> {
    let mut parts = Vec::new();
    let mut current: Option<(Box<dyn walnut_storage::ObjectWriter>, String, u64)> = None;
    let abandoned = || BackupError::Abandoned("walnut was asked to stop".into());
    // Only waits are raced with `stop`: starting an upload and completing one are not (each is
    // bounded by the store's deadline), since a dropped start or completion request can leave an
    // upload open that no one knows the ID of.
    let result = async {
        loop {
            let msg = tokio::select! {
                m = rx.recv() => m,
                _ = stop.cancelled() => return Err(abandoned()),
            };
            let Some(msg) = msg else { return Ok(()) };
            match msg {
                Msg::Start(key) => {
                    let w = repo.store().put_writer(&key).await?;
                    let header = envelope::stream_header(&codec);
                    let n = header.len() as u64;
                    let (w, _, _) = current.insert((w, key, n));
                    tokio::select! {
                        r = w.write(header.into()) => r?,
                        _ = stop.cancelled() => return Err(abandoned()),
                    }
                }
                Msg::Data(b) => {
                    let (w, _, n) = current.as_mut().expect("part started");
                    *n += b.len() as u64;
                    tokio::select! {
                        r = w.write(b) => r?,
                        _ = stop.cancelled() => return Err(abandoned()),
                    }
                }
                Msg::End { content_len, sha256, stored_sum } => {
                    let (w, _, n) = current.as_mut().expect("part started");
                    let trailer = envelope::stream_trailer(content_len, sha256, stored_sum);
                    let stored = *n + trailer.len() as u64;
                    tokio::select! {
                        r = w.write(trailer.into()) => r?,
                        _ = stop.cancelled() => return Err(abandoned()),
                    }
                    // finish aborts the upload itself when it fails.
                    let (w, key, _) = current.take().expect("part started");
                    w.finish().await?;
                    parts.push(PartEntry {
                        key,
                        stored_bytes: stored,
                        content_bytes: content_len,
                        content_sha256: hex::encode(sha256),
                    });
                    walnut_storage::crashpoint::hit("backup-push:after-a-part");
                }
            }
        }
    }
    .await;
    // A part still open here was cut short (an error, a stop, or a producer that failed and
    // dropped its sender; its own error is the one reported): discard its upload.
    if let Some((w, _, _)) = current.take() {
        let _ = w.abort().await;
    }
    result.map(|()| parts)
}

pub(super) fn parse_label_field<'a>(label: &'a str, field: &str) -> Option<&'a str> {
    label.lines().find_map(|l| l.strip_prefix(field)).map(str::trim)
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

    let server =
        ServerInfo { version_num: version_num as u32, major, seg, sysid: sysid_text.clone(), standby: in_recovery };
    let started = chrono::Utc::now();
    let marker = RunningMarker {
        started_at: started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        host: std::fs::read_to_string("/etc/hostname").unwrap_or_default().trim().to_string(),
        pid: std::process::id(),
        error: None,
    };
    // One backup of a cluster at a time (across processes), then an ID of its own.
    take_backup_lock(repo, &marker).await?;
    let id = match claim_backup_id(repo, started, &marker).await {
        Ok(id) => id,
        Err(e) => {
            let _ = repo.store().delete(layout::BACKUP_LOCK).await;
            return Err(e);
        }
    };
    walnut_storage::crashpoint::hit("backup-push:started");
    let heartbeat = {
        let repo = repo.clone();
        let key = layout::backup_running(&id);
        let body = json_object(&marker);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                let _ = repo.store().put(&key, body.clone(), PutMode::Overwrite).await;
                let _ = repo.store().put(layout::BACKUP_LOCK, body.clone(), PutMode::Overwrite).await;
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
    let uploads = tokio_util::task::TaskTracker::new();
    let inner = push_inner(repo, opts, &client, &id, &pgdata, started, &server, progress, &uploads);
    let result = tokio::select! {
        r = inner => r,
        _ = opts.cancel.cancelled() => Err(BackupError::Abandoned("walnut was asked to stop".into())),
    };
    // The uploads of a cancelled backup abort their multipart uploads; wait for that (each
    // abort is bounded by the store's deadline) so that nothing is left open when the process
    // exits right after.
    uploads.close();
    let _ = tokio::time::timeout(UPLOADS_ABORT_WAIT, uploads.wait()).await;
    guard.disarm();
    let _ = repo.store().delete(layout::BACKUP_LOCK).await;
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
/// What the server reported about itself when the backup began.
pub(super) struct ServerInfo {
    pub(super) version_num: u32,
    pub(super) major: PgMajor,
    pub(super) seg: WalSegSize,
    pub(super) sysid: String,
    /// A standby (in recovery): the backup is taken there, and the primary archives its WAL.
    pub(super) standby: bool,
}

/// Waits for a backup's streams: the files they stored and the parts. Upload errors first: a
/// producer's "upload stopped" is only their echo.
async fn collect_streams(
    uploaders: Vec<tokio::task::JoinHandle<Result<Vec<PartEntry>, BackupError>>>,
    producers: Vec<tokio::task::JoinHandle<std::io::Result<Vec<FileEntry>>>>,
    file_entries: &mut Vec<FileEntry>,
    parts: &mut Vec<PartEntry>,
) -> Result<(), BackupError> {
    let mut first_error: Option<BackupError> = None;
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
    first_error.map_or(Ok(()), Err)
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn push_inner(
    repo: &Repository,
    opts: &PushOptions,
    client: &tokio_postgres::Client,
    id: &str,
    pgdata: &Path,
    started: chrono::DateTime<chrono::Utc>,
    server: &ServerInfo,
    progress: Arc<Progress>,
    uploads: &tokio_util::task::TaskTracker,
) -> Result<Manifest, BackupError> {
    let ServerInfo { version_num, major, seg, sysid, standby } = server;
    let standby = *standby;
    let (version_num, major, seg) = (*version_num, *major, *seg);
    let q = |e: tokio_postgres::Error| BackupError::Postgres(pg_error(&e));
    let label = format!("walnut {id}");
    let start_lsn: String =
        client.query_one("SELECT pg_backup_start($1, true)::text", &[&label]).await.map_err(q)?.get(0);

    let start: Lsn = start_lsn.parse().map_err(|_| BackupError::Postgres(format!("bad start LSN {start_lsn}")))?;

    // An incremental backup: its parent and the blocks changed since the parent began.
    let base = match &opts.incremental {
        None => None,
        Some(inc) => {
            let tli: i64 =
                client.query_one("SELECT timeline_id::int8 FROM pg_control_checkpoint()", &[]).await.map_err(q)?.get(0);
            let pg_wal = pgdata.join("pg_wal");
            match incremental::base(repo, inc, start, TimelineId(tli as u32), seg, &pg_wal).await? {
                Ok(b) => {
                    tracing::info!(
                        "incremental backup on {} (chain of {}){}",
                        b.parent.id,
                        b.chain.len(),
                        b.notes.iter().map(|n| format!("; {n}")).collect::<String>()
                    );
                    Some(b)
                }
                Err(why) => {
                    tracing::warn!("taking a full backup instead of an incremental one: {why}");
                    None
                }
            }
        }
    };

    let root = pgdata.to_path_buf();
    let (mut files, tablespaces) = crate::repo::cpu(move || {
        let mut files = Vec::new();
        let mut ts = Vec::new();
        walk(&root, "", &mut files, &mut ts).map(|_| (files, ts))
    })
    .await
    .map_err(io_ctx(format!("read the data directory {}", pgdata.display())))?;
    let mut whole: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    if let Some(base) = &base {
        // Unlogged relations: those with an init fork.
        let unlogged: std::collections::HashSet<walnut_pg::relpath::RelFileNode> = files
            .iter()
            .filter_map(|f| walnut_pg::relpath::parse_relpath(&f.rel))
            .filter(|p| p.fork == walnut_pg::relpath::ForkNumber::INIT)
            .map(|p| p.rnode)
            .collect();
        for f in files.iter_mut().filter(|f| !f.dir) {
            let is_unlogged = walnut_pg::relpath::parse_relpath(&f.rel).is_some_and(|p| unlogged.contains(&p.rnode));
            match base.plan_file(&f.rel, f.size, is_unlogged) {
                incremental::FilePlan::Blocks(b) => f.blocks = Some(b),
                incremental::FilePlan::Whole(Some(why)) => whole.entry(why).or_default().push(f.rel.clone()),
                incremental::FilePlan::Whole(None) => {}
            }
        }
    }
    progress.total.store(files.iter().map(|f| f.stored_size()).sum(), Ordering::Relaxed);
    let throttle = opts.max_rate.map(|r| Arc::new(Throttle::new(r)));
    // pg_control is copied last, after every other file: a backup taken on a standby ends at
    // the minimum recovery point its pg_control records (PostgreSQL writes no end-of-backup
    // record there), so that copy must postdate every page copied.
    let control_at = files.iter().position(|f| f.rel == "global/pg_control");
    let control = control_at.map(|i| files.remove(i));

    let streams = balance(files, opts.parallel);
    // Cancelled with the backup, or when this future is dropped: the uploads then abort.
    let stop = opts.cancel.child_token();
    let _stop_when_dropped = stop.clone().drop_guard();
    let mut producers = Vec::new();
    let mut uploaders = Vec::new();
    for (i, files) in streams.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel(2);
        let (id, codec, part_size, progress) = (id.to_string(), opts.codec.clone(), opts.part_size, progress.clone());
        let throttle = throttle.clone();
        producers.push(tokio::task::spawn_blocking(move || {
            produce_stream(&id, i, files, codec, part_size, tx, &progress, throttle.as_deref())
        }));
        uploaders.push(uploads.spawn(upload_stream(repo.clone(), opts.codec.clone(), rx, stop.clone())));
    }
    let mut file_entries = Vec::new();
    let mut parts = Vec::new();
    collect_streams(uploaders, producers, &mut file_entries, &mut parts).await?;
    // Then pg_control, alone, in a stream of its own.
    if let Some(control) = control {
        let (tx, rx) = mpsc::channel(2);
        let (id, codec, progress, n) = (id.to_string(), opts.codec.clone(), progress.clone(), opts.parallel + 1);
        let producer = tokio::task::spawn_blocking(move || {
            produce_stream(&id, n, vec![control], codec, u64::MAX, tx, &progress, None)
        });
        let uploader = uploads.spawn(upload_stream(repo.clone(), opts.codec.clone(), rx, stop.clone()));
        collect_streams(vec![uploader], vec![producer], &mut file_entries, &mut parts).await?;
    }

    // Stop without PostgreSQL's own unbounded wait for archiving; walnut waits, bounded, below.
    let row =
        client.query_one("SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(false)", &[]).await.map_err(q)?;
    let end_lsn_text: String = row.get(0);
    let backup_label: String = row.get(1);
    let tablespace_map: String = row.get(2);
    let end_lsn: Lsn =
        end_lsn_text.parse().map_err(|_| BackupError::Postgres(format!("bad stop LSN {end_lsn_text}")))?;
    let tli: u32 = parse_label_field(&backup_label, "START TIMELINE:")
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| BackupError::Postgres("backup_label has no START TIMELINE".into()))?;
    let start_seg = SegName::new(TimelineId(tli), seg.segno(start), seg);
    let end_seg = SegName::new(TimelineId(tli), seg.segno(Lsn(end_lsn.0.saturating_sub(1).max(start.0))), seg);

    // The backup is usable only once the WAL up to its end is archived.
    match crate::wal::wait_archived(repo, &WalFileName::Segment(end_seg), opts.archive_wait).await {
        Ok(()) => {}
        Err(crate::wal::WalError::NotArchived { .. }) if standby => {
            return Err(BackupError::Invalid(format!(
                "the WAL this backup needs ({end_seg}) did not reach the repository within {:?}. The backup was taken \
                 on a standby, so the primary archives that WAL: it completes the segment after archive_timeout (set \
                 it on the primary) or once it runs pg_switch_wal(); check the primary's archiving (walnut check). \
                 The backup is not DONE",
                opts.archive_wait
            )));
        }
        Err(crate::wal::WalError::NotArchived { .. }) => {
            return Err(BackupError::ArchiveTimeout { segment: end_seg.to_string(), waited: opts.archive_wait });
        }
        Err(crate::wal::WalError::Storage(e)) => return Err(e.into()),
        Err(e) => return Err(BackupError::Invalid(e.to_string())),
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
    for paths in whole.values_mut() {
        paths.sort();
    }
    let manifest = Manifest {
        format: if base.is_some() { MANIFEST_FORMAT_INCREMENTAL } else { MANIFEST_FORMAT },
        id: BackupId::new_unchecked(id.to_string()),
        name: opts.name.clone(),
        scheduled: opts.scheduled,
        system_identifier: sysid
            .parse()
            .map(SystemId)
            .map_err(|_| BackupError::Invalid(format!("bad system identifier {sysid}")))?,
        pg_version_num: version_num,
        pg_major: major,
        wal_segment_size: seg.bytes(),
        timeline: TimelineId(tli),
        start_lsn: start,
        end_lsn,
        start_wal: start_seg.to_string(),
        end_wal: end_seg.to_string(),
        // At stored precision: the manifest in memory equals the one read back (the agent
        // anchors its schedule on start_time).
        start_time: crate::timefmt::as_stored(started),
        end_time: crate::timefmt::as_stored(chrono::Utc::now()),
        label,
        backup_label,
        tablespace_map,
        data_bytes: file_entries.iter().map(|f| f.size).sum(),
        stored_bytes: parts.iter().map(|p| p.stored_bytes).sum(),
        compression: format!("{:?}", opts.codec.compression).to_lowercase(),
        tablespaces,
        parts,
        files: file_entries,
        parent: base.as_ref().map(|b| b.parent.id.clone()),
        chain: base.as_ref().map(|b| b.chain.clone()).unwrap_or_default(),
        whole: if base.is_some() { whole } else { Default::default() },
        map_notes: base.as_ref().map(|b| b.notes.clone()).unwrap_or_default(),
    };
    // Commit: the manifest, create-only, last.
    walnut_storage::crashpoint::hit("backup-push:before-manifest");
    repo.store().put(&layout::backup_manifest(id), manifest_object(&manifest, &opts.codec), PutMode::Create).await?;
    Ok(manifest)
}
