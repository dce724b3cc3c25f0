//! `wal-push` and `wal-fetch`.
//!
//! Push: the file is validated (a segment's size and first page header must match its name), the
//! repository identity is checked (or written, on first use), then the object is stored
//! create-only. An identical object already stored is success; a different one is a conflict that
//! leaves the stored copy untouched. Because PostgreSQL runs `archive_command` one file at a time,
//! a push also uploads the next segments already marked `.ready` (upload-ahead, bounded), and
//! records each in the state directory, so the next calls confirm (one HEAD) and return at once.
//!
//! Fetch: the repository's identity is read first: "not archived" (which PostgreSQL may take as
//! the end of recovery) is said only of a repository that is there. The object is read from the
//! spool (if the prefetcher put it there, for this repository instance: checked by its CRC-32C
//! and linked into place) or the repository (verified by the SHA-256 of the decoded content,
//! written to a temporary file beside the destination and renamed). Neither is fsynced:
//! PostgreSQL fsyncs a restored file it keeps (`durable_rename` into pg_wal) and reads the others
//! once, so walnut's fsyncs only made recovery wait. [`prefetch`] is one
//! long-running process per repository instance that keeps the next segments after the last one
//! asked for verified in the spool, bounded by `[wal] prefetch` segments.

use crate::envelope::{self, Codec, EnvelopeError};
use crate::layout;
use crate::repo::{Identity, RepoError, Repository, cpu};
use crate::state::{AheadRecord, StateDir};
use bytes::Bytes;
use futures::StreamExt;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use walnut_pg::walpage::{self, SegmentError};
use walnut_pg::{ControlFile, WalFileName, names::SegName};
use walnut_storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error(transparent)]
    Name(#[from] walnut_pg::names::NameError),
    #[error("refusing to archive {0}")]
    InvalidSegment(#[from] SegmentError),
    #[error(
        "{name}: a different file with this name is already archived (stored checksum {stored}, this file {ours}); \
         the stored copy is kept. Two clusters may be archiving to one repository, or this file was modified"
    )]
    Conflict { name: String, stored: String, ours: String },
    #[error("refusing to archive {name}: {reason}; the file is corrupt (it was not archived)")]
    CorruptWal { name: String, reason: String },
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error(
        "there is no walnut repository at {0} (no identity object: missing, wiped, or the wrong URL or prefix); \
         walnut says a WAL file is not archived only when the repository is there. Check `repo`"
    )]
    NoRepository(String),
    #[error("{name} did not reach the repository within {wait:?}: check archiving (pg_stat_archiver, the server log)")]
    NotArchived { name: String, wait: std::time::Duration },
    #[error(
        "{name}: cannot tell which cluster this file belongs to: no WAL segment has been archived to this \
         repository yet and {pgdata}/global/pg_control could not be read ({reason})"
    )]
    UnknownCluster { name: String, pgdata: String, reason: String },
}

impl WalError {
    fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> WalError {
        let context = context.into();
        move |source| WalError::Io { context, source }
    }
}

/// What one push did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushReport {
    /// The file itself was uploaded now.
    pub uploaded: bool,
    /// It was already stored, identical (a re-push).
    pub already_stored: bool,
    /// It had been uploaded ahead by an earlier call, and that was confirmed.
    pub confirmed_ahead: bool,
    /// Segments uploaded ahead during this call.
    pub ahead_uploaded: Vec<String>,
}

pub struct WalPusher {
    pub repo: Repository,
    pub codec: Codec,
    /// The state directory (upload-ahead records go below it, per repository instance).
    pub state_base: Option<PathBuf>,
    /// How many `.ready` segments to upload ahead, in parallel (0 turns it off).
    pub upload_ahead: usize,
    /// Where the last pages of recently pushed segments are kept (see [`previous_tail`]).
    pub tails: Option<PathBuf>,
}

/// What storing one file did.
struct Stored {
    /// Uploaded now (else an identical copy was there).
    uploaded: bool,
    /// The stored object's size.
    size: u64,
    /// The SHA-256 of the file's content.
    sum: [u8; 32],
}

/// A validated file, ready to store.
struct Prepared {
    name: WalFileName,
    identity: Option<Identity>,
    content: Bytes,
    summary: Option<crate::summary::SegmentSummary>,
    /// The segment's changed-block map (for incremental backups), stored in its metadata.
    blocks: Option<crate::blockmap::BlockMap>,
    /// The map of the previous segment's tail record (the one continuing into this segment),
    /// made from the previous segment's last pages when they are still beside this one.
    blocks_head: Option<crate::blockmap::BlockMap>,
}

impl Prepared {
    /// The metadata stored with the file: its name, summary and block map.
    fn meta(&self) -> serde_json::Value {
        let mut meta = serde_json::json!({ "name": self.name.to_string(), "summary": self.summary });
        if let Some(map) = &self.blocks {
            meta["blocks"] = crate::backup::map_metadata(map);
        }
        if let Some(map) = &self.blocks_head {
            meta["blocks_head"] = crate::backup::map_metadata(map);
        }
        meta
    }
}

fn identity_from_control(path: &Path) -> Result<Identity, String> {
    let abs = std::fs::canonicalize(path).map_err(|e| e.to_string())?;
    let pgdata = abs.parent().and_then(Path::parent).ok_or("no parent directory")?;
    let control = std::fs::read(pgdata.join("global/pg_control")).map_err(|e| e.to_string())?;
    let c = ControlFile::parse(&control).map_err(|e| e.to_string())?;
    let major = std::fs::read_to_string(pgdata.join("PG_VERSION"))
        .ok()
        .and_then(|t| walnut_pg::PgMajor::from_version_text(&t))
        .ok_or("PG_VERSION unreadable")?;
    Ok(Identity::new(c.system_identifier, major, c.wal_seg_size))
}

/// The map of the tail record of the segment before `seg` (the record that continues into it),
/// from that segment's last pages when it is still beside `path` (see `summary`'s docs): what
/// makes the maps stored with consecutive segments tile. `None` when there is nothing to cover
/// or it cannot be made (an incremental backup then decodes that boundary from the archive).
pub(crate) fn previous_tail(
    path: &Path,
    tails: Option<&Path>,
    seg: walnut_pg::names::SegName,
    size: walnut_pg::WalSegSize,
    segno: walnut_pg::SegNo,
    content: &[u8],
) -> Option<crate::blockmap::BlockMap> {
    use std::os::unix::fs::FileExt;
    let prev_no = walnut_pg::SegNo(segno.0.checked_sub(1)?);
    let prev = walnut_pg::names::SegName::new(seg.tli, prev_no, size);
    // The previous segment itself, still in pg_wal; else its last pages kept when it was pushed
    // (a checkpoint recycles archived segments, often before the next one is complete).
    let (file, len) = match std::fs::File::open(path.with_file_name(prev.to_string())) {
        Ok(f) if f.metadata().ok()?.len() == size.bytes() => (f, size.bytes()),
        _ => {
            let f = std::fs::File::open(tails?.join(prev.to_string())).ok()?;
            let len = f.metadata().ok()?.len();
            (f, len)
        }
    };
    let mut window = (TAIL_KEPT as u64).min(len);
    loop {
        let mut buf = vec![0u8; window as usize];
        file.read_exact_at(&mut buf, len - window).ok()?;
        match crate::summary::tail_block_map_from_end(&buf, size.start_lsn(prev_no), size.bytes(), content) {
            Ok(crate::summary::TailMap::Tail(map)) => return Some(map),
            Ok(crate::summary::TailMap::NoTail(_)) => return None,
            Ok(crate::summary::TailMap::NeedMore) if window < len => window = (window * 2).min(len),
            Ok(crate::summary::TailMap::NeedMore) => return None,
            Err(e) => {
                tracing::debug!("the tail record of {prev}: {e}");
                return None;
            }
        }
    }
}

/// How much of each pushed segment's end is kept for the next push (see [`previous_tail`]).
const TAIL_KEPT: usize = 64 << 10;

/// Keeps the last [`TAIL_KEPT`] bytes of a segment being pushed in `tails` (best effort: without
/// them the next push leaves the boundary to the backup to decode), and drops what is older
/// than a few segments.
fn keep_tail(
    tails: &Path,
    seg: walnut_pg::names::SegName,
    size: walnut_pg::WalSegSize,
    segno: walnut_pg::SegNo,
    content: &[u8],
) {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let kept = (|| -> std::io::Result<()> {
        // WAL pages: private to walnut's user, like the rest of its state.
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(tails)?;
        let name = seg.to_string();
        let tmp = tails.join(format!(".{name}.{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&content[content.len().saturating_sub(TAIL_KEPT)..])?;
        drop(f);
        std::fs::rename(&tmp, tails.join(&name))?;
        for e in std::fs::read_dir(tails)?.flatten() {
            let old = WalFileName::parse(&e.file_name().to_string_lossy())
                .ok()
                .and_then(|w| w.segment())
                .and_then(|s| s.segno(size))
                .is_some_and(|s| s.0 + 16 < segno.0);
            if old {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(())
    })();
    if let Err(e) = kept {
        tracing::debug!("keep the last pages of {seg} in {}: {e}", tails.display());
    }
}

/// Validates a WAL file and works out which cluster it comes from.
fn prepare(path: &Path, content: Bytes, tails: Option<&Path>) -> Result<Prepared, WalError> {
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let name = WalFileName::parse(&file_name)?;
    let (mut summary, mut blocks, mut blocks_head) = (None, None, None);
    let identity = match name {
        WalFileName::Segment(seg) => {
            let c = walpage::check_segment(seg, &content)?;
            // Decode every record: corrupt WAL is never archived as good.
            let (s, b) = crate::summary::summarize_with_blocks(&content, c.seg_size.start_lsn(c.segno))
                .map_err(|reason| WalError::CorruptWal { name: file_name.clone(), reason })?;
            (summary, blocks) = (Some(s), Some(b));
            let tails = tails.map(|t| t.join(c.sysid.to_string()));
            blocks_head = previous_tail(path, tails.as_deref(), seg, c.seg_size, c.segno, &content);
            if let Some(t) = &tails {
                keep_tail(t, seg, c.seg_size, c.segno, &content);
            }
            Some(Identity::new(c.sysid, c.major, c.seg_size))
        }
        WalFileName::Partial(_) => {
            let (sysid, major, size) = walpage::peek_identity(&content)
                .ok_or(SegmentError::TooShort { name: file_name.clone(), len: content.len() })?;
            Some(Identity::new(sysid, major, size))
        }
        WalFileName::History(_) | WalFileName::Backup(..) => identity_from_control(path).ok(),
    };
    Ok(Prepared { name, identity, content, summary, blocks, blocks_head })
}

fn same_sum(stored: &[u8], ours: &[u8; 32]) -> Result<(), (String, String)> {
    match envelope::stored_checksum(stored) {
        Some(s) if &s == ours => Ok(()),
        Some(s) => Err((hex::encode(s), hex::encode(ours))),
        None => Err(("(unreadable)".into(), hex::encode(ours))),
    }
}

impl WalPusher {
    /// Archives the WAL file at `path` (see the module docs).
    pub async fn push(&self, path: &Path) -> Result<PushReport, WalError> {
        let content: Bytes =
            tokio::fs::read(path).await.map_err(WalError::io(format!("read {}", path.display())))?.into();
        let p = path.to_path_buf();
        let tails = self.tails.clone();
        let prepared = cpu(move || prepare(&p, content, tails.as_deref())).await?;
        let identity = match &prepared.identity {
            Some(ours) => self.repo.ensure_identity(ours).await?,
            None => match self.repo.identity().await? {
                Some(stored) => stored,
                None => {
                    let reason = identity_from_control(path).err().unwrap_or_default();
                    return Err(WalError::UnknownCluster {
                        name: prepared.name.to_string(),
                        pgdata: path.parent().and_then(Path::parent).unwrap_or(Path::new("?")).display().to_string(),
                        reason,
                    });
                }
            },
        };
        let mut report = PushReport::default();
        let name_text = prepared.name.to_string();
        let state = open_state(self.state_base.as_deref(), &self.repo, &identity);
        let state = state.as_ref();

        // Uploaded ahead by an earlier call? Confirm the object is there, with the recorded size.
        if let Some(state) = state
            && let Some(rec) = state.ahead(&name_text)
        {
            let sum = cpu({
                let c = prepared.content.clone();
                move || envelope::sha256(&c)
            })
            .await;
            let key = layout::wal_key(&prepared.name);
            if rec.sha256 == sum
                && let Some(info) = self.repo.store().head(&key).await?
                && info.size == rec.object_size
            {
                state.forget_ahead(&name_text);
                report.confirmed_ahead = true;
            }
        }

        let ahead = self.ready_segments_after(state, path, &prepared.name);
        let this = async {
            if report.confirmed_ahead {
                Ok((false, false))
            } else {
                walnut_storage::crashpoint::hit("wal-push:before-upload");
                let stored = self.store_one(&prepared).await.map(|s| (s.uploaded, !s.uploaded));
                walnut_storage::crashpoint::hit("wal-push:after-upload");
                stored
            }
        };
        let others = self.upload_ahead(state, ahead, &identity);
        let (this, ahead_done) = tokio::join!(this, others);
        let (uploaded, already) = this?;
        report.uploaded = uploaded;
        report.already_stored = already;
        report.ahead_uploaded = ahead_done;
        if let Some(state) = state {
            prune_ahead_records(state, &prepared.name);
        }
        Ok(report)
    }

    /// Reads, validates and stores the WAL file at `path` create-only (an identical stored copy
    /// is success), for the worker: the file must come from the cluster `expected` (or, when
    /// none is known yet, from the cluster the repository records, which it is recorded as on
    /// first use). Returns the identity it was checked against.
    pub(crate) async fn store_file(&self, path: &Path, expected: Option<&Identity>) -> Result<Identity, WalError> {
        let content: Bytes =
            tokio::fs::read(path).await.map_err(WalError::io(format!("read {}", path.display())))?.into();
        let p = path.to_path_buf();
        let tails = self.tails.clone();
        let prepared = cpu(move || prepare(&p, content, tails.as_deref())).await?;
        let ours = prepared.identity.clone().ok_or_else(|| WalError::UnknownCluster {
            name: prepared.name.to_string(),
            pgdata: path.parent().and_then(Path::parent).unwrap_or(Path::new("?")).display().to_string(),
            reason: "the worker archives segments only".into(),
        })?;
        let identity = match expected {
            Some(known) if known.same_cluster(&ours) => known.clone(),
            _ => self.repo.ensure_identity(&ours).await?,
        };
        self.store_one(&prepared).await?;
        Ok(identity)
    }

    /// Stores one prepared file create-only.
    async fn store_one(&self, p: &Prepared) -> Result<Stored, WalError> {
        let key = layout::wal_key(&p.name);
        let codec = self.codec.clone();
        let mut meta = p.meta();
        // A timeline history file's entries, in clear beside an encrypted content: planning and
        // listing follow timelines without the key.
        if let WalFileName::History(_) = p.name
            && let Ok(entries) = walnut_pg::history::parse_history(&String::from_utf8_lossy(&p.content))
        {
            meta["history"] = history_meta(&entries);
        }
        let content = p.content.clone();
        let (object, sum) = cpu(move || envelope::encode_with_sum(&content, &meta, codec)).await;
        let size = object.len() as u64;
        match self.repo.put_new(&key, object).await {
            Ok(()) => return Ok(Stored { uploaded: true, size, sum }),
            Err(StorageError::AlreadyExists { .. }) => {}
            // A store may refuse a create-only PUT of an existing key before it has read the body
            // (an S3 server answering 412 at once): the client then sees a broken connection, not
            // the refusal. If the object is there, this is a re-push: compare, as above; else the
            // transport error stands (PostgreSQL retries).
            Err(e) => {
                if !matches!(self.repo.store().head(&key).await, Ok(Some(_))) {
                    return Err(e.into());
                }
            }
        }
        let stored = self.repo.store().get(&key).await?;
        match same_sum(&stored, &sum) {
            Ok(()) => Ok(Stored { uploaded: false, size: stored.len() as u64, sum }),
            Err((stored, ours)) => Err(WalError::Conflict { name: p.name.to_string(), stored, ours }),
        }
    }

    /// The next segments PostgreSQL has marked `.ready`, after `current`, at most `upload_ahead`.
    fn ready_segments_after(&self, state: Option<&StateDir>, path: &Path, current: &WalFileName) -> Vec<PathBuf> {
        let Some(state) = state.filter(|_| self.upload_ahead > 0) else { return vec![] };
        let WalFileName::Segment(cur) = current else { return vec![] };
        let Some(pg_wal) = path.parent() else { return vec![] };
        let Ok(rd) = std::fs::read_dir(pg_wal.join("archive_status")) else { return vec![] };
        let mut names: Vec<SegName> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_string_lossy().strip_suffix(".ready").map(str::to_string))
            .filter_map(|n| WalFileName::parse(&n).ok()?.segment())
            .filter(|s| s > cur)
            .collect();
        names.sort();
        names
            .into_iter()
            .filter(|s| state.ahead(&s.to_string()).is_none())
            .take(self.upload_ahead)
            .map(|s| pg_wal.join(s.to_string()))
            .collect()
    }

    /// Uploads `paths` in parallel; failures are ignored (the file's own push will report them).
    async fn upload_ahead(&self, state: Option<&StateDir>, paths: Vec<PathBuf>, identity: &Identity) -> Vec<String> {
        let Some(state) = state else { return vec![] };
        futures::stream::iter(paths)
            .map(|p| async move {
                let content: Bytes = tokio::fs::read(&p).await.ok()?.into();
                let pp = p.clone();
                let tails = self.tails.clone();
                let prepared = cpu(move || prepare(&pp, content, tails.as_deref())).await.ok()?;
                if !prepared.identity.as_ref().is_some_and(|i| i.same_cluster(identity)) {
                    return None;
                }
                let stored = self.store_one(&prepared).await.ok()?;
                let name = prepared.name.to_string();
                state.record_ahead(&name, &AheadRecord { sha256: stored.sum, object_size: stored.size }).ok()?;
                Some(name)
            })
            .buffer_unordered(self.upload_ahead.max(1))
            .filter_map(|x| async move { x })
            .collect()
            .await
    }
}

/// The state of this repository instance below `base`, or `None` (with a warning) when there is
/// none to use: upload-ahead and prefetch are then off, nothing else changes.
fn open_state(base: Option<&Path>, repo: &Repository, identity: &Identity) -> Option<StateDir> {
    match StateDir::open(base?, &repo.describe(), identity) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(
                "state directory {} is not usable ({e}); upload-ahead and prefetch are off. Set state_dir to a directory of walnut's own",
                base?.display()
            );
            None
        }
    }
}

/// Drops upload-ahead records of earlier segments of the same timeline: PostgreSQL archives in
/// order, so they will not be asked for again (and a later re-push simply uploads again).
fn prune_ahead_records(state: &StateDir, current: &WalFileName) {
    let WalFileName::Segment(cur) = current else { return };
    for n in state.ahead_names() {
        if let Ok(WalFileName::Segment(s)) = WalFileName::parse(&n)
            && s.tli == cur.tli
            && s < *cur
        {
            state.forget_ahead(&n);
        }
    }
}

/// What a fetch found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchOutcome {
    /// Delivered from the repository.
    Fetched,
    /// Delivered from the prefetch spool.
    FromSpool,
    /// Not in the archive (normal at the end of recovery).
    NotFound,
}

pub struct WalFetcher {
    pub repo: Repository,
    /// The state directory (the prefetch spool is below it, per repository instance).
    pub state_base: Option<PathBuf>,
    /// Starts a prefetcher (the caller's: it owns processes). Called as soon as a fetch finds
    /// none running, before it fetches its own segment, so that the prefetcher gets going while
    /// this fetch works (`Fetched::start_prefetcher` is then false).
    pub start_prefetcher: Option<std::sync::Arc<dyn Fn() + Send + Sync>>,
}

/// What a fetch did, and whether a prefetcher should be started (none holds the spool).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fetched {
    pub outcome: FetchOutcome,
    pub start_prefetcher: bool,
}

impl WalFetcher {
    /// Fetches `name` into `dest` (see the module docs). `dest` is never created unless the
    /// content was verified.
    pub async fn fetch(&self, name: &str, dest: &Path) -> Result<Fetched, WalError> {
        let wal_name = WalFileName::parse(name)?;
        // Only a repository that is there can say "not archived"; its instance keys the spool.
        let identity = self.repo.identity().await?.ok_or_else(|| WalError::NoRepository(self.repo.describe()))?;
        let state = open_state(self.state_base.as_deref(), &self.repo, &identity);
        let mut start_prefetcher = false;
        if let Some(state) = state.filter(|_| wal_name.segment().is_some()) {
            // Tell the prefetcher where recovery is, then take what it spooled.
            state.set_wanted(name);
            start_prefetcher = !state.spool_locked();
            if start_prefetcher && let Some(start) = &self.start_prefetcher {
                start();
                start_prefetcher = false;
            }
            let (st, n, d) = (state.clone(), name.to_string(), dest.to_path_buf());
            match cpu(move || st.take_spooled(&n, &d)).await {
                Ok(true) => return Ok(Fetched { outcome: FetchOutcome::FromSpool, start_prefetcher }),
                Ok(false) => {}
                Err(e) => tracing::warn!(name, "{e}; fetching it from the repository"),
            }
        }
        let key = layout::wal_key(&wal_name);
        let decoded = match self.repo.get_object(&key).await {
            Ok(d) => d,
            Err(RepoError::Storage(e)) if e.is_not_found() => {
                return Ok(Fetched { outcome: FetchOutcome::NotFound, start_prefetcher: false });
            }
            Err(e) => return Err(e.into()),
        };
        // Whole or absent, not fsynced: PostgreSQL fsyncs the restored files it keeps.
        crate::durable::write_async(dest.to_path_buf(), decoded.content.clone(), false)
            .await
            .map_err(WalError::io(format!("write {}", dest.display())))?;
        Ok(Fetched { outcome: FetchOutcome::Fetched, start_prefetcher })
    }
}

/// Points the prefetch spool at `after` (a recovery about to start asks for the segments after
/// it first): a running prefetcher follows, and an earlier recovery's last request is forgotten.
/// Returns whether a prefetcher must be started (none holds the spool).
pub async fn aim_prefetch(repo: &Repository, state_base: &Path, after: &str) -> Result<bool, WalError> {
    let Some(identity) = repo.identity().await? else { return Ok(false) };
    let state = StateDir::open(state_base, &repo.describe(), &identity)
        .map_err(WalError::io(format!("open the state directory {}", state_base.display())))?;
    state.set_wanted(after);
    Ok(!state.spool_locked())
}

/// How often the prefetcher looks for what recovery asked for last.
const PREFETCH_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// The prefetcher: keeps the next `count` segments after the last one wal-fetch asked for (first
/// `after`) verified in the spool, fetching in parallel, until wal-fetch has asked for nothing new
/// for `idle`, or the repository changed (re-created, or gone). Only one runs per repository
/// instance (the spool's lock); a second returns at once. Returns how many it spooled.
pub async fn prefetch(
    repo: &Repository,
    state_base: &Path,
    after: &str,
    count: usize,
    idle: std::time::Duration,
) -> Result<usize, WalError> {
    let Some(mut cursor) = WalFileName::parse(after)?.segment() else { return Ok(0) };
    let Some(identity) = repo.identity().await? else { return Ok(0) };
    let state = StateDir::open(state_base, &repo.describe(), &identity)
        .map_err(WalError::io(format!("open the state directory {}", state_base.display())))?;
    let state = &state;
    let Some(_lock) = state.try_lock_spool().map_err(WalError::io("lock the prefetch spool"))? else {
        return Ok(0);
    };
    let size = identity.seg_size();
    let mut spooled = 0;
    let mut asked = tokio::time::Instant::now();
    let mut checked = tokio::time::Instant::now();
    // A segment the archive did not have (or could not give): nothing from it on is asked for
    // again before the instant given (recovery may be waiting for it to be archived).
    let mut hold: Option<(SegName, tokio::time::Instant)> = None;
    loop {
        if let Some(w) = state.wanted().and_then(|w| WalFileName::parse(&w).ok()?.segment())
            && w != cursor
        {
            cursor = w;
            asked = tokio::time::Instant::now();
        }
        if asked.elapsed() >= idle {
            break;
        }
        if checked.elapsed() >= crate::walworker::REVALIDATE {
            checked = tokio::time::Instant::now();
            if repo.identity().await?.is_none_or(|now| now.state_key() != identity.state_key()) {
                // Re-created or gone: nothing spooled from it may be handed out.
                for n in state.spooled() {
                    state.drop_spooled(&n);
                }
                return Ok(0);
            }
        }
        // Spooled segments before the cursor, or on another timeline, will not be asked for (the
        // cursor's own stays: recovery asks for the last segment again when it ends).
        for n in state.spooled() {
            if WalFileName::parse(&n).ok().and_then(|w| w.segment()).is_none_or(|s| s.tli != cursor.tli || s < cursor) {
                state.drop_spooled(&n);
            }
        }
        let mut wanted = Vec::new();
        let mut next = cursor;
        for _ in 0..count {
            let Some(n) = next.next(size) else { break };
            next = n;
            if !state.spool_path(&next.to_string()).exists() {
                wanted.push(next);
            }
        }
        match hold {
            Some((from, until)) if tokio::time::Instant::now() < until => wanted.retain(|w| *w < from),
            _ => hold = None,
        }
        let results: Vec<(SegName, Result<bool, WalError>)> = futures::stream::iter(wanted)
            .map(|seg| async move {
                let key = layout::wal_key(&WalFileName::Segment(seg));
                let r = match repo.get_object(&key).await {
                    Ok(d) => state
                        .write_spool(&seg.to_string(), &d.content)
                        .map(|()| true)
                        .map_err(WalError::io("write to the prefetch spool")),
                    Err(RepoError::Storage(e)) if e.is_not_found() => Ok(false),
                    Err(e) => Err(e.into()),
                };
                (seg, r)
            })
            .buffer_unordered(4)
            .collect()
            .await;
        for (seg, r) in results {
            if let Ok(true) = r {
                spooled += 1;
                continue;
            }
            // Not archived yet, or a failure that wal-fetch reports loudly when it gets there
            // (a corrupt object stops recovery).
            if let Err(e) = r {
                tracing::debug!("prefetch {seg}: {e}");
            }
            let from = hold.map_or(seg, |(h, _)| h.min(seg));
            hold = Some((from, tokio::time::Instant::now() + std::time::Duration::from_secs(1)));
        }
        tokio::time::sleep(PREFETCH_POLL).await;
    }
    Ok(spooled)
}

/// Waits until `name` is in the repository (polling), up to `wait`. The one "wait until
/// archived" (a backup's last segment, a restore point's, a switch forced before a restore).
pub async fn wait_archived(repo: &Repository, name: &WalFileName, wait: std::time::Duration) -> Result<(), WalError> {
    let key = layout::wal_key(name);
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match repo.store().head(&key).await {
            Ok(Some(_)) => return Ok(()),
            Ok(None) | Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await
            }
            Ok(None) => return Err(WalError::NotArchived { name: name.to_string(), wait }),
            Err(e) => return Err(WalError::Storage(e)),
        }
    }
}

/// Writes `data` to `dest` durably ([`crate::durable`]). On any failure `dest` does not exist.
pub async fn write_durably(dest: &Path, data: &Bytes) -> Result<(), WalError> {
    crate::durable::write_async(dest.to_path_buf(), data.clone(), true)
        .await
        .map_err(WalError::io(format!("write {}", dest.display())))
}

/// What the repository holds of WAL, for planning: segments per timeline with the time each was
/// stored, every timeline history file, parsed, and (if asked) each segment's summary, read from
/// the envelope metadata with a range request.
pub async fn inventory(repo: &Repository, with_summaries: bool) -> Result<crate::plan::WalInventory, WalError> {
    let mut inv = crate::plan::WalInventory::default();
    let Some(identity) = repo.identity().await? else { return Ok(inv) };
    let size = identity.seg_size();
    let mut histories = Vec::new();
    let mut sizes = HashMap::new();
    for o in repo.store().list(layout::WAL_DIR).await? {
        match layout::parse_wal_key(&o.key) {
            Some(WalFileName::Segment(s)) => {
                if let Some(segno) = s.segno(size) {
                    inv.segments.entry(s.tli).or_default().insert(segno, o.last_modified);
                    sizes.insert((s.tli, segno), o.size);
                }
            }
            Some(WalFileName::History(t)) => histories.push((t, o.key)),
            _ => {}
        }
    }
    if with_summaries {
        // The index first (see `walindex`); then the segments it does not cover, one by one.
        let known = crate::walindex::load(repo).await.unwrap_or_else(|e| {
            tracing::warn!("read the WAL summary index: {e}; reading every segment's summary");
            Default::default()
        });
        let mut uncovered = Vec::new();
        for ((t, s), stored) in &sizes {
            match known.get(&(*t, *s)) {
                Some((indexed, summary)) if indexed == stored => {
                    if let Some(summary) = summary {
                        inv.summaries.entry(*t).or_default().insert(*s, summary.clone());
                    }
                }
                _ => uncovered.push((*t, *s, *stored)),
            }
        }
        let loaded: Vec<_> = futures::stream::iter(uncovered)
            .map(|(t, s, stored)| async move {
                let key = layout::wal_key(&WalFileName::Segment(SegName::new(t, s, size)));
                let meta = repo.object_meta(&key).await?;
                let summary = serde_json::from_value::<crate::summary::SegmentSummary>(meta["summary"].clone()).ok();
                Ok::<_, WalError>((t, s, stored, summary))
            })
            .buffer_unordered(32)
            .collect()
            .await;
        let mut new_entries: BTreeMap<walnut_pg::TimelineId, Vec<crate::walindex::Entry>> = BTreeMap::new();
        for r in loaded {
            let (t, s, stored, summary) = r?;
            new_entries.entry(t).or_default().push(crate::walindex::Entry {
                segno: s.0,
                size: stored,
                summary: summary.clone(),
            });
            if let Some(summary) = summary {
                inv.summaries.entry(t).or_default().insert(s, summary);
            }
        }
        if new_entries.values().map(Vec::len).sum::<usize>() >= crate::walindex::MIN_NEW {
            for (t, entries) in new_entries {
                if let Err(e) = crate::walindex::write(repo, t, entries, size).await {
                    tracing::debug!("could not add to the WAL summary index (read-only access?): {e}");
                }
            }
        }
    }
    for (t, key) in histories {
        let corrupt = |why: String| RepoError::Corrupt { key: key.clone(), source: EnvelopeError::Corrupt(why) };
        // Read whole and checked (it is small): decoded with the key, or without it checked in
        // its stored form and its entries taken from its (checksummed) metadata.
        let raw = repo.store().get(&key).await?;
        let entries = if envelope::is_encrypted(&raw) && repo.keys().is_none() {
            repo.check_raw(&key, raw.clone()).await?;
            let meta = envelope::meta_from_prefix(&raw)
                .map_err(|source| RepoError::Corrupt { key: key.clone(), source })?
                .unwrap_or_default();
            let h = meta.get("history").ok_or_else(|| corrupt("no history entries in its metadata".into()))?;
            history_from_meta(h).map_err(corrupt)?
        } else {
            let d = repo.decode(&key, raw).await?;
            walnut_pg::history::parse_history(&String::from_utf8_lossy(&d.content))
                .map_err(|e| corrupt(e.to_string()))?
        };
        inv.histories.insert(t, entries);
    }
    Ok(inv)
}

/// A history file's entries as its metadata records them: `[{"tli": N, "switchpoint": "X/Y"}]`.
fn history_meta(entries: &[walnut_pg::history::HistoryEntry]) -> serde_json::Value {
    entries.iter().map(|e| serde_json::json!({ "tli": e.tli.0, "switchpoint": e.switchpoint.to_string() })).collect()
}

fn history_from_meta(v: &serde_json::Value) -> Result<Vec<walnut_pg::history::HistoryEntry>, String> {
    let bad = || format!("history metadata {v} is not a list of {{tli, switchpoint}}");
    v.as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|e| {
            let tli = e["tli"].as_u64().and_then(|t| u32::try_from(t).ok()).ok_or_else(bad)?;
            let switchpoint = e["switchpoint"].as_str().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
            Ok(walnut_pg::history::HistoryEntry { tli: walnut_pg::TimelineId(tli), switchpoint })
        })
        .collect()
}

/// One stage of archiving or restoring a WAL file, and how long it took.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stage {
    pub stage: &'static str,
    pub micros: u64,
}

/// Times, for the benchmarks, each stage a push and a fetch of the WAL file at `path` go
/// through, in the order walnut runs them: the identity read, reading the file, validating it
/// and decoding its records, the SHA-256 alone, compression with the checksum (the envelope),
/// the upload, the download, decompression with the check, and the durable write into
/// `scratch`. The object goes to a probe key, never to `wal/`, and is deleted after.
pub async fn stage_timings(
    repo: &Repository,
    codec: Codec,
    path: &Path,
    scratch: &Path,
) -> Result<Vec<Stage>, WalError> {
    let mut stages = Vec::new();
    let mut t = std::time::Instant::now();
    let mut lap = |stage: &'static str, stages: &mut Vec<Stage>| {
        stages.push(Stage { stage, micros: t.elapsed().as_micros() as u64 });
        t = std::time::Instant::now();
    };
    repo.identity().await?;
    lap("identity read", &mut stages);
    let content: Bytes = tokio::fs::read(path).await.map_err(WalError::io(format!("read {}", path.display())))?.into();
    lap("read the file", &mut stages);
    let p = path.to_path_buf();
    let prepared = cpu(move || prepare(&p, content, None)).await?;
    lap("validate + decode records", &mut stages);
    let c = prepared.content.clone();
    cpu(move || envelope::sha256(&c)).await;
    lap("sha256 alone", &mut stages);
    let meta = prepared.meta();
    let c = prepared.content.clone();
    let object = cpu(move || envelope::encode(&c, &meta, codec)).await;
    lap("compress + checksum", &mut stages);
    let key = format!("probe/stages-{}-{}", std::process::id(), prepared.name);
    repo.store().put(&key, object, walnut_storage::PutMode::Overwrite).await?;
    lap("upload", &mut stages);
    let raw = repo.store().get(&key).await;
    lap("download", &mut stages);
    let _ = repo.store().delete(&key).await;
    let raw = raw?;
    let decoded = repo.decode(&key, raw).await?;
    lap("decompress + verify", &mut stages);
    write_durably(&scratch.join(prepared.name.to_string()), &decoded.content).await?;
    lap("write + fsync", &mut stages);
    let _ = tokio::fs::remove_file(scratch.join(prepared.name.to_string())).await;
    Ok(stages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::Identity;
    use std::time::Duration;
    use walnut_pg::{PgMajor, SegNo, SystemId, TimelineId, WalSegSize};

    fn seg(n: u64) -> SegName {
        SegName::new(TimelineId(1), SegNo(n), WalSegSize::DEFAULT)
    }

    async fn repo_with_segments(n: u64) -> Repository {
        let repo = Repository::new(std::sync::Arc::new(walnut_storage::remote::RemoteStore::memory()));
        repo.ensure_identity(&Identity::new(SystemId(7), PgMajor(15), WalSegSize::DEFAULT)).await.unwrap();
        for s in 1..=n {
            let key = layout::wal_key(&WalFileName::Segment(seg(s)));
            let object = envelope::encode(format!("segment {s}").as_bytes(), &serde_json::json!({}), Codec::default());
            repo.store().put(&key, object, walnut_storage::PutMode::Create).await.unwrap();
        }
        repo
    }

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    /// The prefetcher keeps exactly `count` segments ahead of what recovery asked for last (the
    /// spool's bound), follows recovery, hands spooled files out by a link after their CRC check,
    /// never hands out a spooled file that fails it, and exits once nothing new is asked for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_prefetcher_stays_ahead_within_its_bound() {
        let repo = repo_with_segments(12).await;
        let base = tempfile::tempdir().unwrap();
        let identity = repo.identity().await.unwrap().unwrap();
        let state = StateDir::open(base.path(), &repo.describe(), &identity).unwrap();
        let names = |st: &StateDir| {
            let mut v = st.spooled();
            v.sort();
            v
        };
        let (r, b) = (repo.clone(), base.path().to_path_buf());
        let first = seg(1).to_string();
        let task = tokio::spawn(async move { prefetch(&r, &b, &first, 4, Duration::from_secs(2)).await });
        until("four spooled", || state.spooled().len() == 4).await;
        assert_eq!(names(&state), (2..=5).map(|n| seg(n).to_string()).collect::<Vec<_>>());
        assert!(state.spool_locked(), "the running prefetcher holds the spool");

        // wal-fetch takes segment 2 from the spool (a rename) and says it asked for it.
        let fetcher =
            WalFetcher { repo: repo.clone(), state_base: Some(base.path().to_path_buf()), start_prefetcher: None };
        let dest = base.path().join("RECOVERYXLOG");
        let f = fetcher.fetch(&seg(2).to_string(), &dest).await.unwrap();
        assert_eq!(f, Fetched { outcome: FetchOutcome::FromSpool, start_prefetcher: false });
        assert_eq!(std::fs::read(&dest).unwrap(), b"segment 2");
        // It keeps the segment handed out (recovery asks for its last one again) and 4 more.
        until("the spool to follow", || names(&state) == (2..=6).map(|n| seg(n).to_string()).collect::<Vec<_>>()).await;
        std::fs::remove_file(&dest).unwrap();
        let again = fetcher.fetch(&seg(2).to_string(), &dest).await.unwrap();
        assert_eq!(again.outcome, FetchOutcome::FromSpool, "a second request of the same segment");

        // A spooled file with a flipped byte is never handed out: it is dropped and fetched again.
        let spooled = state.spool_path(&seg(3).to_string());
        let mut bytes = std::fs::read(&spooled).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&spooled, bytes).unwrap();
        let f = fetcher.fetch(&seg(3).to_string(), &dest).await.unwrap();
        assert_eq!(f.outcome, FetchOutcome::Fetched);
        assert_eq!(std::fs::read(&dest).unwrap(), b"segment 3");

        // Near the end of the archive it holds what there is; then, asked nothing new, it exits.
        state.set_wanted(&seg(10).to_string());
        until("the tail spooled", || names(&state) == [seg(11).to_string(), seg(12).to_string()]).await;
        let spooled = tokio::time::timeout(Duration::from_secs(10), task).await.expect("exits when idle").unwrap();
        assert!(spooled.unwrap() >= 6);
        assert!(!state.spool_locked());
    }
}
