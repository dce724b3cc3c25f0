//! Repository-wide locks: one holder at a time, across processes and hosts.
//!
//! A lock is an object taken create-only (put-if-absent), refreshed by its holder's heartbeat
//! every [`HEARTBEAT`], and stale once three heartbeats were missed, or at once when its holder
//! ran on this host and its process is gone (killed). A stale lock is taken over create-only
//! again, so of two takers one wins.
//!
//! Two locks exist: [`layout::BACKUP_LOCK`] (one base backup of a cluster at a time; the backup
//! refreshes it with its own RUNNING marker) and [`layout::MAINTENANCE_LOCK`]: `rekey` and
//! retention's deletions exclude each other, because a rekey that rewrites a manifest retention
//! has just deleted would bring back a backup whose parts are gone.

use crate::backup::HEARTBEAT;
use crate::envelope::{self, Codec};
use crate::layout;
use crate::repo::Repository;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use walnut_storage::{PutMode, StorageError};

/// Who holds a lock (the backup lock holds a backup's RUNNING marker, which has these fields).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Holder {
    pub started_at: String,
    pub host: String,
    pub pid: u32,
    /// What the holder is doing ("rekey", "retention"); absent in the backup lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub what: Option<String>,
}

impl Holder {
    /// This process, starting `what` now.
    pub fn me(what: &str) -> Holder {
        Holder {
            started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            host: this_host(),
            pid: std::process::id(),
            what: Some(what.to_string()),
        }
    }

    fn describe(&self) -> String {
        let what = self.what.as_deref().map(|w| format!("{w} ")).unwrap_or_default();
        format!("{what}started {} on host {} by pid {}", self.started_at, self.host, self.pid)
    }
}

/// The host name as lock holders record it.
pub fn this_host() -> String {
    std::fs::read_to_string("/etc/hostname").unwrap_or_default().trim().to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Held by someone alive: who, and since when.
    #[error("{0}")]
    Held(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// A small JSON record as a clear, uncompressed object (locks and markers are read without keys).
pub fn json_record(v: &impl Serialize) -> Bytes {
    let body = serde_json::to_vec_pretty(v).expect("serialisable");
    envelope::encode(
        &body,
        &serde_json::Value::Null,
        Codec { compression: crate::Compression::None, level: 0, seal: None },
    )
}

/// Takes the lock `key` by writing `body` (whose holder fields are `me`'s) create-only; a
/// stale lock is taken over. Returns who holds it when someone alive does.
pub async fn take(repo: &Repository, key: &str, body: Bytes, me: &Holder) -> Result<(), LockError> {
    for _ in 0..2 {
        match repo.store().put(key, body.clone(), PutMode::Create).await {
            Ok(()) => return Ok(()),
            Err(StorageError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let held = repo.store().head(key).await?;
        let fresh = held.as_ref().is_some_and(|i| {
            chrono::Utc::now() - i.last_modified < chrono::Duration::from_std(HEARTBEAT * 3).unwrap_or_default()
        });
        let holder = match repo.get_object(key).await {
            Ok(d) => serde_json::from_slice::<Holder>(&d.content).ok(),
            Err(_) => None,
        };
        // A holder on this host whose process is gone (killed) is stale at once.
        let gone = holder.as_ref().is_some_and(|h| {
            h.host == me.host && !h.host.is_empty() && !std::path::Path::new(&format!("/proc/{}", h.pid)).exists()
        });
        if held.is_some() && fresh && !gone {
            let who = holder.map(|h| h.describe()).unwrap_or_else(|| "(its lock is unreadable)".into());
            return Err(LockError::Held(who));
        }
        // Stale (or gone in between): take it over, create-only again, so one taker wins.
        if held.is_some() {
            let _ = repo.store().delete(key).await;
        }
    }
    Err(LockError::Held("another process took the lock at the same moment".into()))
}

/// A lock held by this process, refreshed until released (or dropped: then it is deleted in the
/// background, best effort; a killed holder's lock goes stale).
pub struct Guard {
    repo: Repository,
    key: String,
    heartbeat: Option<tokio::task::JoinHandle<()>>,
}

impl Guard {
    /// Releases the lock.
    pub async fn release(mut self) {
        if let Some(h) = self.heartbeat.take() {
            h.abort();
        }
        let _ = self.repo.store().delete(&self.key).await;
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let Some(h) = self.heartbeat.take() else { return };
        h.abort();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (repo, key) = (self.repo.clone(), self.key.clone());
            rt.spawn(async move {
                let _ = repo.store().delete(&key).await;
            });
        }
    }
}

/// Takes the maintenance lock for `what` and keeps it fresh until the guard goes.
pub async fn maintenance(repo: &Repository, what: &str) -> Result<Guard, LockError> {
    let me = Holder::me(what);
    let body = json_record(&me);
    take(repo, layout::MAINTENANCE_LOCK, body.clone(), &me).await?;
    let heartbeat = {
        let repo = repo.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(HEARTBEAT).await;
                let _ = repo.store().put(layout::MAINTENANCE_LOCK, body.clone(), PutMode::Overwrite).await;
            }
        })
    };
    Ok(Guard { repo: repo.clone(), key: layout::MAINTENANCE_LOCK.into(), heartbeat: Some(heartbeat) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> Repository {
        Repository::new(walnut_storage::open("memory://", &Default::default()).unwrap())
    }

    #[tokio::test]
    async fn one_holder_at_a_time_and_released_for_the_next() {
        let repo = repo();
        let held = maintenance(&repo, "rekey").await.unwrap();
        // This process is alive, so its lock is not stale to a second taker on this host.
        let e = maintenance(&repo, "retention").await.err().expect("held").to_string();
        assert!(e.contains("rekey started") && e.contains(&format!("pid {}", std::process::id())), "{e}");
        held.release().await;
        maintenance(&repo, "retention").await.unwrap().release().await;
        assert!(repo.store().head(layout::MAINTENANCE_LOCK).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_lock_whose_process_is_gone_is_taken_over() {
        let repo = repo();
        // A holder on this host with a pid that cannot exist (above the kernel's pid_max).
        let dead = Holder { pid: u32::MAX, ..Holder::me("rekey") };
        repo.store().put(layout::MAINTENANCE_LOCK, json_record(&dead), PutMode::Create).await.unwrap();
        maintenance(&repo, "retention").await.unwrap().release().await;
    }
}
