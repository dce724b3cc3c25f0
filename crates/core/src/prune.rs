//! Retention, the use case: from a rule (a policy, `retain N`, `before T`, `garbage`) to deleted
//! objects. The decision is [`crate::retention::plan`] (pure, with reasons); this module gathers
//! its inputs from the repository and carries it out.
//!
//! Order of deletion: manifests first (from then on those backups no longer exist for any
//! reader), then the backups' other objects, WAL last, so an interrupted run never leaves a
//! listed backup without its WAL.

use crate::backup::{self, BackupError};
use crate::layout;
use crate::repo::{RepoError, Repository};
use crate::retention::{self, Candidate, RetentionPlan, Rule};
use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use walnut_pg::Lsn;
use walnut_storage::StorageError;

/// Deletes run this many at a time (a million WAL objects one by one would take hours on a
/// remote store).
const DELETE_CONCURRENCY: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(
        "the repository's maintenance lock is held ({0}); retention deletes nothing meanwhile: run it again once \
         that has finished"
    )]
    Busy(String),
}

/// What a rule decides for this repository now: the backups (keep or delete, with reasons) and
/// the WAL objects no kept backup needs.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub plan: RetentionPlan,
    pub wal_delete: Vec<String>,
}

impl Outcome {
    /// The IDs of the backups to delete.
    pub fn deleting(&self) -> Vec<&str> {
        self.plan.backups.iter().filter(|d| !d.keep).map(|d| d.id.as_str()).collect()
    }
}

/// Every backup as retention sees it. A backup without a manifest (RUNNING or FAILED) has no
/// known start: it pins all WAL while it runs.
pub async fn candidates(repo: &Repository) -> Result<Vec<Candidate>, PruneError> {
    let mut out = Vec::new();
    for b in backup::list(repo).await? {
        let state = b.status;
        let parent = b.manifest.as_ref().and_then(|m| m.parent.clone());
        let (time, start) = match &b.manifest {
            Some(m) => (m.end_time, m.start_lsn),
            None => {
                let t = repo
                    .store()
                    .head(&layout::backup_running(&b.id))
                    .await?
                    .map(|i| i.last_modified)
                    .unwrap_or(DateTime::<Utc>::MIN_UTC);
                (t, Lsn(u64::MAX))
            }
        };
        out.push(Candidate { id: b.id, state, time, start, parent });
    }
    Ok(out)
}

/// Decides what `rule` deletes now (nothing is deleted).
pub async fn decide(repo: &Repository, rule: &Rule, now: DateTime<Utc>) -> Result<Outcome, PruneError> {
    let cands = candidates(repo).await?;
    let plan = retention::plan(&cands, rule, now);
    let needed: Option<Lsn> = plan.wal_needed_from;
    let wal_delete = match repo.identity().await? {
        Some(id) => {
            let mut objects = repo.store().list(layout::WAL_DIR).await?;
            objects.extend(repo.store().list(layout::WAL_INDEX_DIR).await?);
            retention::wal_to_delete(objects.iter().map(|o| o.key.as_str()), needed, id.seg_size())
        }
        None => Vec::new(),
    };
    Ok(Outcome { plan, wal_delete })
}

/// Carries out a decision (in the order of the module docs). Returns (backups, WAL objects)
/// deleted.
///
/// Holds the maintenance lock while it deletes: a `rekey` that rewrote a manifest retention had
/// just deleted would bring back a backup without its parts.
pub async fn execute(repo: &Repository, outcome: &Outcome) -> Result<(usize, usize), PruneError> {
    let deleting = outcome.deleting();
    if deleting.is_empty() && outcome.wal_delete.is_empty() {
        return Ok((0, 0));
    }
    let lock = crate::lock::maintenance(repo, "retention").await.map_err(|e| match e {
        crate::lock::LockError::Held(who) => PruneError::Busy(who),
        crate::lock::LockError::Storage(e) => e.into(),
    })?;
    let done = delete_planned(repo, outcome, &deleting).await;
    lock.release().await;
    done
}

async fn delete_planned(repo: &Repository, outcome: &Outcome, deleting: &[&str]) -> Result<(usize, usize), PruneError> {
    delete_all(repo, deleting.iter().map(|id| layout::backup_manifest(id)).collect()).await?;
    let mut objects = Vec::new();
    for id in deleting {
        objects.extend(repo.store().list(&layout::backup_dir(id)).await?.into_iter().map(|o| o.key));
    }
    delete_all(repo, objects).await?;
    delete_all(repo, outcome.wal_delete.clone()).await?;
    Ok((deleting.len(), outcome.wal_delete.len()))
}

async fn delete_all(repo: &Repository, keys: Vec<String>) -> Result<(), PruneError> {
    futures::stream::iter(keys)
        .map(|key| async move { repo.store().delete(&key).await })
        .buffer_unordered(DELETE_CONCURRENCY)
        .try_collect::<()>()
        .await?;
    Ok(())
}
