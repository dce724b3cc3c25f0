//! Restore, the use case: from a request to a data directory ready to start.
//!
//! 1. [`prepare`]: list the backups and the archived WAL, and plan ([`crate::plan::plan`], pure):
//!    the backup, every segment to the target, the target inside the archived range. A target it
//!    cannot reach is refused before anything is written.
//! 2. [`catch_up`]: when a time target lies after the last archived commit, the primary (if the
//!    caller can reach it) may hold commits before the target that are not archived yet: switch
//!    WAL, wait until archived, so the next plan covers them.
//! 3. [`dest`]: DEST and each tablespace directory checked empty, then the backup fetched
//!    ([`crate::backup::fetch`]); a failure removes what was written.
//! 4. [`RecoveryConf::from_plan`] (pure) decides every recovery setting; [`RecoveryConf::write`]
//!    writes them durably, the signal file last.
//!
//! Starting the restored server and waiting for it is the binary's (it owns processes).

mod conf;
pub mod dest;

pub use conf::{RecoveryConf, RecoveryOptions, TargetAction};
pub use dest::{
    TablespaceTarget, check_dest, clean_dest, create_dest, mark_done, mark_in_progress, tablespace_targets,
};

use crate::backup::{self, BackupError, Manifest, Status};
use crate::plan::{self, BackupPoint, Plan, PlanError, RecoveryTarget, Request};
use crate::repo::{RepoError, Repository};
use crate::wal::WalError;
use std::time::Duration;
use walnut_pg::{Lsn, WalFileName};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} is empty: nothing to restore")]
    Empty(String),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

impl RestoreError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RestoreError {
        let context = context.into();
        move |source| RestoreError::Io { context, source }
    }
}

/// How a recovery target reads in messages.
pub fn describe_target(t: &RecoveryTarget) -> String {
    match t {
        RecoveryTarget::EndOfArchive => "the end of the archive".into(),
        RecoveryTarget::PinnedEnd(l) => format!("the end of the archive as planned (the record at {l})"),
        RecoveryTarget::Time(t) => format!("time {}", t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        RecoveryTarget::Name(n) => format!("restore point {n:?}"),
        RecoveryTarget::Lsn(l) => format!("LSN {l}"),
        RecoveryTarget::Xid(x) => format!("transaction {x}"),
        RecoveryTarget::Immediate => "the backup's consistency point".into(),
    }
}

/// The planner's view of every DONE backup (the one conversion from listed manifests).
pub fn backup_points(listed: &[backup::BackupInfo]) -> Result<Vec<BackupPoint>, RestoreError> {
    let mut points = Vec::new();
    for b in listed.iter().filter(|b| b.status == Status::Done) {
        let Some(m) = b.manifest.as_ref() else { continue };
        points.push(BackupPoint {
            id: b.id.clone(),
            name: m.name.clone(),
            tli: m.timeline,
            start: m.start_lsn,
            end: m.end_lsn,
            end_time: m.end_time,
        });
    }
    Ok(points)
}

/// Plans a restore from what the repository holds (step 1 of the module docs).
pub async fn prepare(
    repo: &Repository,
    req: &Request,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<(Plan, Manifest), RestoreError> {
    let identity = repo.identity().await?.ok_or_else(|| RestoreError::Empty(repo.describe()))?;
    let points = backup_points(&backup::list(repo).await?)?;
    let inv = crate::wal::inventory(repo, true).await?;
    let p = plan::plan(&points, &inv, identity.seg_size(), req, now)?;
    let m = backup::load_manifest(repo, &p.backup_id).await?;
    Ok((p, m))
}

/// What the primary said about WAL not archived yet (step 2 of the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatchUp {
    /// Nothing written beyond the archive.
    CaughtUp,
    /// It had WAL beyond the archive; a switch was forced and this segment is archived now.
    Switched(String),
    /// Could not tell (why).
    Unknown(String),
}

/// Asks the primary behind `client` whether it has WAL beyond `archived_end` (where the plan
/// found the archive to end: no second listing of the archive); if so, switches WAL and waits up
/// to `wait` until the segment is archived. Checks first that the server is this repository's
/// cluster and a primary.
pub async fn catch_up(
    repo: &Repository,
    client: &tokio_postgres::Client,
    archived_end: Lsn,
    wait: Duration,
) -> CatchUp {
    let row = match client
        .query_one(
            "SELECT (SELECT system_identifier::text FROM pg_control_system()), pg_is_in_recovery(), \
             CASE WHEN pg_is_in_recovery() THEN '' ELSE pg_current_wal_lsn()::text END",
            &[],
        )
        .await
    {
        Ok(r) => r,
        Err(e) => return CatchUp::Unknown(format!("the primary did not answer ({})", backup::pg_error(&e))),
    };
    let (sysid, in_recovery, current): (String, bool, String) = (row.get(0), row.get(1), row.get(2));
    let identity = match repo.identity().await {
        Ok(Some(i)) => i,
        _ => return CatchUp::Unknown("the repository identity could not be read".into()),
    };
    if sysid != identity.system_identifier.to_string() {
        return CatchUp::Unknown(format!(
            "the PostgreSQL server walnut reaches is another cluster (system identifier {sysid}), not this repository's primary"
        ));
    }
    if in_recovery {
        return CatchUp::Unknown("the PostgreSQL server walnut reaches is a standby".into());
    }
    let Ok(current) = current.parse::<Lsn>() else {
        return CatchUp::Unknown("the primary's WAL position is unreadable".into());
    };
    // A segment begins with its page header: nothing after it means nothing written.
    if current.0 <= archived_end.0 + walnut_pg::walpage::SIZE_OF_LONG_PHD as u64 {
        return CatchUp::CaughtUp;
    }
    let name: String = match client.query_one("SELECT pg_walfile_name(pg_switch_wal())", &[]).await {
        Ok(r) => r.get(0),
        Err(e) => return CatchUp::Unknown(format!("the primary refused pg_switch_wal() ({})", backup::pg_error(&e))),
    };
    let Ok(wal_name) = WalFileName::parse(&name) else {
        return CatchUp::Unknown(format!("the primary named an odd WAL file {name:?}"));
    };
    match crate::wal::wait_archived(repo, &wal_name, wait).await {
        Ok(()) => CatchUp::Switched(name),
        Err(e) => CatchUp::Unknown(format!("the primary has WAL beyond the archive, but {e}")),
    }
}
