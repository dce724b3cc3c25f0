//! The WAL worker: one long-running archiver beside a cluster's `pg_wal`, so that a segment does
//! not pay a process start, a new storage client and an identity read each.
//!
//! It watches `pg_wal/archive_status` for `.ready` segments and stores them, in parallel (the
//! same validation, decoding and create-only store as `wal-push`), keeping the storage clients
//! and the repository identity between segments. `wal-push` becomes a thin client: it asks the
//! worker over a Unix socket in the state directory, and the worker answers only once that
//! segment is stored. When no worker answers (none running, it died, a request timed out),
//! `wal-push` stores the segment itself: archiving never depends on the worker.
//!
//! What the worker keeps is in memory only: the segments it stored, each with the stamp (size,
//! modification time, inode) of the file it read. A segment marked `.ready` is complete and
//! PostgreSQL does not change it before it is archived, so a request for a file with the same
//! stamp is answered at once; any other file is read and stored again (create-only: an identical
//! stored copy is success, a different one a conflict). A crash loses nothing: PostgreSQL asks
//! again, and the client or a new worker finds the object there. The identity is re-read every
//! [`REVALIDATE`]: a repository re-created at the same URL empties what the worker knows.
//!
//! ```text
//! <state_dir>/workers/<hash>.sock   the socket (the state directory is the user's own, 0700)
//! <state_dir>/workers/<hash>.lock   held by the one worker of this pg_wal and repository
//! ```
//! The protocol is one JSON line each way: `{"push": NAME, "fingerprint": F}` then
//! `{"ok": true, "how": "stored"|"identical"|"stored-ahead"}` or `{"ok": false, "error": ...}`.
//! The fingerprint (repository URL and codec) makes a worker started with other settings refuse.

use crate::repo::{Identity, Repository};
use crate::wal::{WalError, WalPusher};
use crate::{Codec, envelope};
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{Notify, Semaphore};
use walnut_pg::WalFileName;

/// How often the worker re-reads the repository identity.
pub const REVALIDATE: Duration = Duration::from_secs(10);
/// How often `archive_status` is scanned when nothing wakes the worker.
const SCAN: Duration = Duration::from_millis(200);

/// Where the worker of `pg_wal` for the repository `repo` listens, below `state_base`.
pub fn socket_path(state_base: &Path, repo: &str, pg_wal: &Path) -> PathBuf {
    let pg_wal = std::fs::canonicalize(pg_wal).unwrap_or_else(|_| pg_wal.to_path_buf());
    let key = format!("{repo}\0{}", pg_wal.display());
    let hash = hex::encode(&envelope::sha256(key.as_bytes())[..8]);
    state_base.join("workers").join(format!("{hash}.sock"))
}

/// What makes two walnut invocations store a segment alike: a worker refuses requests from a
/// client whose fingerprint differs (another repository, another codec).
pub fn fingerprint(repo: &str, codec: &Codec) -> String {
    hex::encode(&envelope::sha256(format!("{repo}\0{codec:?}").as_bytes())[..8])
}

#[derive(Debug, Serialize, Deserialize)]
struct Request {
    push: String,
    fingerprint: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    how: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// What identifies the file a segment was read from, without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime_ns: i128,
    ino: u64,
}

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok(Stamp {
        len: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ino: m.ino(),
    })
}

type Upload = Shared<BoxFuture<'static, Result<Stamp, String>>>;

/// The worker of one `pg_wal` and one repository.
pub struct Worker {
    pusher: WalPusher,
    pg_wal: PathBuf,
    fingerprint: String,
    parallel: Arc<Semaphore>,
    /// Segments stored by this worker, with the stamp of the file it read.
    done: Mutex<HashMap<String, Stamp>>,
    inflight: Mutex<HashMap<String, Upload>>,
    /// The identity it works for (`None` until the repository has one).
    identity: Mutex<Option<Identity>>,
    wake: Notify,
    last_request: Mutex<Instant>,
    /// Set when a client asked with other settings (its configuration changed): this worker
    /// stores nothing more and exits, so that the next `wal-push` starts one with them.
    outdated: std::sync::atomic::AtomicBool,
}

/// Whether the settings a worker was started with are still the configured ones (the app
/// re-reads its configuration file when it changed).
pub type StillCurrent = Box<dyn FnMut() -> bool + Send>;

impl Worker {
    /// `tails`: where the last pages of pushed segments are kept (`WalPusher::tails`).
    pub fn new(
        repo: Repository,
        codec: Codec,
        repo_url: &str,
        pg_wal: PathBuf,
        parallel: usize,
        tails: Option<PathBuf>,
    ) -> Arc<Worker> {
        Arc::new(Worker {
            pusher: WalPusher { repo, codec: codec.clone(), state_base: None, upload_ahead: 0, tails },
            pg_wal,
            fingerprint: fingerprint(repo_url, &codec),
            parallel: Arc::new(Semaphore::new(parallel.max(1))),
            done: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            identity: Mutex::new(None),
            wake: Notify::new(),
            last_request: Mutex::new(Instant::now()),
            outdated: Default::default(),
        })
    }

    /// Stores `name` (a file in `pg_wal`) unless this worker already stored this very file.
    /// Returns how: "stored-ahead" (stored before it was asked for, same file), "stored" (now,
    /// or found identical in the repository).
    pub async fn archive(self: &Arc<Self>, name: &str) -> Result<&'static str, String> {
        let path = self.pg_wal.join(name);
        let now = stamp(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if self.done.lock().unwrap().get(name) == Some(&now) {
            return Ok("stored-ahead");
        }
        let upload = {
            let mut inflight = self.inflight.lock().unwrap();
            inflight
                .entry(name.to_string())
                .or_insert_with(|| {
                    let me = self.clone();
                    let name = name.to_string();
                    async move { me.upload(&name).await }.boxed().shared()
                })
                .clone()
        };
        let result = upload.clone().await;
        {
            // Only this upload's entry: a later one for the same name may have taken its place.
            let mut inflight = self.inflight.lock().unwrap();
            if inflight.get(name).is_some_and(|u| u.ptr_eq(&upload)) {
                inflight.remove(name);
            }
        }
        let stored = result?;
        if stored == now {
            self.done.lock().unwrap().insert(name.to_string(), stored);
            Ok("stored")
        } else {
            // The file changed while it was read (not a .ready segment's behaviour): read again.
            Box::pin(self.archive(name)).await
        }
    }

    /// Reads, validates and stores one file; returns the stamp of what it read.
    async fn upload(&self, name: &str) -> Result<Stamp, String> {
        let _permit = self.parallel.acquire().await.map_err(|e| e.to_string())?;
        let path = self.pg_wal.join(name);
        let before = stamp(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let identity = self.identity.lock().unwrap().clone();
        let stored = self.pusher.store_file(&path, identity.as_ref()).await.map_err(|e: WalError| e.to_string())?;
        walnut_storage::crashpoint::hit("wal-worker:after-upload");
        let mut known = self.identity.lock().unwrap();
        if known.is_none() {
            *known = Some(stored);
        }
        Ok(before)
    }

    /// Scans `archive_status` and starts uploads of `.ready` segments not stored yet; forgets
    /// segments PostgreSQL has finished with (no `.ready` any more).
    fn scan(self: &Arc<Self>) -> std::io::Result<()> {
        let mut ready = Vec::new();
        for e in std::fs::read_dir(self.pg_wal.join("archive_status"))? {
            let e = e?;
            let file = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = file.strip_suffix(".ready")
                && WalFileName::parse(n).is_ok_and(|w| w.segment().is_some())
            {
                ready.push(n.to_string());
            }
        }
        ready.sort();
        self.done.lock().unwrap().retain(|n, _| ready.contains(n));
        for name in ready.iter() {
            let known =
                self.done.lock().unwrap().contains_key(name) || self.inflight.lock().unwrap().contains_key(name);
            if !known {
                let me = self.clone();
                let name = name.clone();
                tokio::spawn(async move {
                    if let Err(e) = me.archive(&name).await {
                        tracing::warn!("{name}: {e} (the archive command will report it)");
                    }
                });
            }
        }
        Ok(())
    }

    /// Re-reads the repository identity: a repository re-created at the same URL (another
    /// instance) empties what this worker knows. Returns false when the worker must stop.
    async fn revalidate(&self) -> bool {
        let known = self.identity.lock().unwrap().clone();
        match self.pusher.repo.identity().await {
            Ok(Some(now)) => {
                if known.as_ref().is_some_and(|k| k.state_key() != now.state_key()) {
                    tracing::warn!("the repository was re-created; stopping");
                    self.done.lock().unwrap().clear();
                    return false;
                }
                *self.identity.lock().unwrap() = Some(now);
                true
            }
            Ok(None) if known.is_some() => {
                tracing::warn!("the repository's identity is gone; stopping");
                self.done.lock().unwrap().clear();
                false
            }
            Ok(None) => true,
            Err(e) => {
                tracing::warn!("cannot re-read the repository identity: {e}");
                true
            }
        }
    }

    /// Serves on `socket` (already bound) and archives until no request came for `idle`,
    /// `pg_wal` is gone, the repository was re-created, or its settings are outdated (a client
    /// asked with others, or `still_current` says the configuration changed): a worker never
    /// stores with settings that are no longer the configured ones (say, after encryption
    /// was switched on or the recipients changed).
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::UnixListener,
        idle: Duration,
        mut still_current: StillCurrent,
    ) {
        let accept = {
            let me = self.clone();
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let me = me.clone();
                    tokio::spawn(async move { me.answer(stream).await });
                }
            })
        };
        let mut last_check = Instant::now() - REVALIDATE;
        loop {
            // It works ahead for PostgreSQL only while PostgreSQL asks: with no request for
            // `idle` (archiving switched to another command, or paused, or the server stopped)
            // it stops, whatever `.ready` files are left.
            if self.last_request.lock().unwrap().elapsed() >= idle && self.inflight.lock().unwrap().is_empty() {
                tracing::info!("idle for {idle:?} (no archive request); stopping");
                break;
            }
            if self.outdated.load(std::sync::atomic::Ordering::Relaxed) || !still_current() {
                self.outdated.store(true, std::sync::atomic::Ordering::Relaxed);
                if self.inflight.lock().unwrap().is_empty() {
                    tracing::info!("the configuration changed (repository or codec); stopping");
                    break;
                }
                tokio::time::sleep(SCAN).await;
                continue;
            }
            if last_check.elapsed() >= REVALIDATE {
                last_check = Instant::now();
                if !self.revalidate().await {
                    break;
                }
            }
            if let Err(e) = self.scan() {
                tracing::info!("{}: {e}; stopping", self.pg_wal.display());
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(SCAN) => {}
                _ = self.wake.notified() => {}
            }
        }
        accept.abort();
    }

    async fn answer(self: Arc<Self>, stream: tokio::net::UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        if BufReader::new(read).read_line(&mut line).await.is_err() {
            return;
        }
        *self.last_request.lock().unwrap() = Instant::now();
        let answer = match serde_json::from_str::<Request>(&line) {
            Err(e) => Answer { ok: false, how: None, error: Some(format!("bad request: {e}")) },
            Ok(r) if r.fingerprint != self.fingerprint => {
                self.outdated.store(true, std::sync::atomic::Ordering::Relaxed);
                self.wake.notify_one();
                Answer {
                    ok: false,
                    how: None,
                    error: Some("this worker stores with other settings (repository or codec); it stops".into()),
                }
            }
            Ok(_) if self.outdated.load(std::sync::atomic::Ordering::Relaxed) => {
                Answer { ok: false, how: None, error: Some("this worker's settings are outdated; it stops".into()) }
            }
            Ok(r) if r.push.contains('/') || WalFileName::parse(&r.push).is_err() => {
                Answer { ok: false, how: None, error: Some(format!("{:?} is not a WAL file name", r.push)) }
            }
            Ok(r) => {
                self.wake.notify_one();
                match self.archive(&r.push).await {
                    Ok(how) => Answer { ok: true, how: Some(how.into()), error: None },
                    Err(e) => Answer { ok: false, how: None, error: Some(e) },
                }
            }
        };
        let mut text = serde_json::to_string(&answer).expect("serialisable");
        text.push('\n');
        let _ = write.write_all(text.as_bytes()).await;
    }
}

/// Why the worker did not store a segment for the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No worker answers at `socket` (none running, or a stale socket).
    #[error("no worker at {0}")]
    NoWorker(PathBuf),
    /// The worker answered with a failure (the client then stores the file itself, which
    /// reports the failure in full).
    #[error("the worker could not store it: {0}")]
    Refused(String),
    /// The worker went away or did not answer within the time given.
    #[error("the worker did not answer: {0}")]
    Lost(String),
}

/// Asks the worker at `socket` to store `name`; `Ok(how)` once it is stored.
pub async fn push_via(socket: &Path, name: &str, fingerprint: &str, wait: Duration) -> Result<String, ClientError> {
    let stream = tokio::net::UnixStream::connect(socket).await.map_err(|_| ClientError::NoWorker(socket.into()))?;
    let talk = async {
        let (read, mut write) = stream.into_split();
        let mut text = serde_json::to_string(&Request { push: name.into(), fingerprint: fingerprint.into() })
            .expect("serialisable");
        text.push('\n');
        write.write_all(text.as_bytes()).await.map_err(|e| ClientError::Lost(e.to_string()))?;
        let mut line = String::new();
        BufReader::new(read).read_line(&mut line).await.map_err(|e| ClientError::Lost(e.to_string()))?;
        let a: Answer = serde_json::from_str(&line).map_err(|e| ClientError::Lost(format!("answer {line:?}: {e}")))?;
        match a {
            Answer { ok: true, how, .. } => Ok(how.unwrap_or_default()),
            Answer { error, .. } => Err(ClientError::Refused(error.unwrap_or_default())),
        }
    };
    tokio::time::timeout(wait, talk).await.unwrap_or_else(|_| Err(ClientError::Lost(format!("no answer in {wait:?}"))))
}

/// Creates the directory of `socket` (and the state directory above it) private to the user:
/// 0700, refused when another user owns it.
pub fn private_socket_dir(socket: &Path) -> std::io::Result<()> {
    let dir = socket.parent().ok_or_else(|| std::io::Error::other("socket path without a directory"))?;
    if let Some(base) = dir.parent() {
        crate::state::private_dir(base)?;
    }
    crate::state::private_dir(dir)
}

/// Takes the worker lock beside `socket` and binds the socket: `None` when another worker of
/// the same pg_wal and repository holds the lock. The lock file stays open for the worker's life.
pub fn bind(socket: &Path) -> std::io::Result<Option<(std::fs::File, tokio::net::UnixListener)>> {
    use fs2::FileExt;
    private_socket_dir(socket)?;
    let lock =
        std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(socket.with_extension("lock"))?;
    if lock.try_lock_exclusive().is_err() {
        return Ok(None);
    }
    // Ours now: a socket file left there is a dead worker's.
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket)?;
    Ok(Some((lock, listener)))
}
