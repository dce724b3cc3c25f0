//! `walnut delete ...` and `walnut retention apply`: print the plan (with reasons), and delete
//! only with `--confirm`, manifest first.

use super::Ctx;
use super::backup::print_table;
use anyhow::{Result, bail};
use walnut_core::backup::{self, Status};
use walnut_core::layout;
use walnut_core::retention::{self, Candidate, Policy, Rule, State};
use walnut_pg::Lsn;

#[derive(Debug, Clone, clap::Subcommand)]
pub enum DeleteWhat {
    /// Keep the N newest DONE backups (at least 1).
    Retain {
        n: u32,
        #[arg(long)]
        confirm: bool,
    },
    /// Delete backups consistent before a backup (ID or name) or a time.
    Before {
        reference: String,
        #[arg(long)]
        confirm: bool,
    },
    /// Remove leftovers of failed backups and WAL no backup needs.
    Garbage {
        #[arg(long)]
        confirm: bool,
    },
}

pub async fn delete(ctx: &Ctx, what: &DeleteWhat) -> Result<()> {
    let repo = ctx.repository()?;
    let (rule, confirm) = match what {
        DeleteWhat::Retain { n, confirm } => {
            if *n == 0 {
                bail!("delete retain 0 would delete the newest backup: keep at least 1");
            }
            (Rule::Retain(*n), *confirm)
        }
        DeleteWhat::Before { reference, confirm } => {
            let t = match super::restore::parse_time(reference) {
                Ok(t) => t,
                Err(_) => {
                    let m = backup::resolve(&repo, reference).await?;
                    chrono::DateTime::parse_from_rfc3339(&m.end_time)?.with_timezone(&chrono::Utc)
                }
            };
            (Rule::Before(t), *confirm)
        }
        DeleteWhat::Garbage { confirm } => (Rule::Garbage, *confirm),
    };
    apply(ctx, &repo, &rule, confirm).await
}

pub async fn apply_policy(ctx: &Ctx, confirm: bool) -> Result<()> {
    let repo = ctx.repository()?;
    let s = &ctx.config.settings;
    let rule = Rule::Policy(Policy { recovery_window: s.recovery_window, minimum_redundancy: s.minimum_redundancy });
    apply(ctx, &repo, &rule, confirm).await
}

/// Applies the policy with --confirm semantics and returns how many backups were deleted.
pub async fn apply_policy_count(ctx: &Ctx) -> Result<u64> {
    let repo = ctx.repository()?;
    let s = &ctx.config.settings;
    let rule = Rule::Policy(Policy { recovery_window: s.recovery_window, minimum_redundancy: s.minimum_redundancy });
    let before = backup::list(&repo).await?.len();
    apply(ctx, &repo, &rule, true).await?;
    let after = backup::list(&repo).await?.len();
    Ok(before.saturating_sub(after) as u64)
}

async fn candidates(repo: &walnut_core::Repository) -> Result<Vec<Candidate>> {
    let mut out = Vec::new();
    for b in backup::list(repo).await? {
        let state = match b.status {
            Status::Done => State::Done,
            Status::Running => State::Running,
            Status::Failed => State::Failed,
        };
        let (time, start) = match &b.manifest {
            Some(m) => {
                (chrono::DateTime::parse_from_rfc3339(&m.end_time)?.with_timezone(&chrono::Utc), m.start_lsn.parse()?)
            }
            None => {
                let t = repo
                    .store()
                    .head(&layout::backup_running(&b.id))
                    .await?
                    .map(|i| i.last_modified)
                    .unwrap_or(chrono::DateTime::<chrono::Utc>::MIN_UTC);
                (t, Lsn(u64::MAX))
            }
        };
        out.push(Candidate { id: b.id, state, time, start });
    }
    Ok(out)
}

async fn apply(ctx: &Ctx, repo: &walnut_core::Repository, rule: &Rule, confirm: bool) -> Result<()> {
    let cands = candidates(repo).await?;
    let plan = retention::plan(&cands, rule, chrono::Utc::now());
    let identity = repo.identity().await?;
    let needed: Option<Lsn> = plan.wal_needed_from.as_ref().and_then(|l| l.parse().ok());
    let wal_delete = match &identity {
        Some(id) => {
            let mut objects = repo.store().list(layout::WAL_DIR).await?;
            objects.extend(repo.store().list(layout::WAL_INDEX_DIR).await?);
            retention::wal_to_delete(objects.iter().map(|o| o.key.as_str()), needed, id.seg_size())
        }
        None => Vec::new(),
    };
    let deleting: Vec<&str> = plan.backups.iter().filter(|d| !d.keep).map(|d| d.id.as_str()).collect();
    if ctx.global.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "confirm": confirm, "backups": plan.backups, "wal_needed_from": plan.wal_needed_from,
                "wal_objects_to_delete": wal_delete.len(),
                "first_wal_to_delete": wal_delete.first(), "last_wal_to_delete": wal_delete.last(),
            }))?
        );
    } else {
        let rows: Vec<Vec<String>> = plan
            .backups
            .iter()
            .map(|d| vec![d.id.clone(), if d.keep { "keep".into() } else { "DELETE".into() }, d.reason.clone()])
            .collect();
        print_table(&["ID", "ACTION", "REASON"], &rows);
        println!(
            "WAL: {} object(s) before {} are needed by no kept backup{}",
            wal_delete.len(),
            plan.wal_needed_from.as_deref().unwrap_or("-"),
            if wal_delete.is_empty() {
                String::new()
            } else {
                format!(" ({} .. {})", wal_delete[0], wal_delete[wal_delete.len() - 1])
            }
        );
    }
    if !confirm {
        if !ctx.global.json {
            println!("nothing deleted: add --confirm to delete the above");
        }
        return Ok(());
    }
    // Manifests first: from then on those backups no longer exist for any reader; then their
    // objects; WAL last, so an interrupted run never leaves a listed backup without its WAL.
    let manifests: Vec<String> = deleting.iter().map(|id| layout::backup_manifest(id)).collect();
    delete_all(repo, manifests).await?;
    let mut objects = Vec::new();
    for id in &deleting {
        objects.extend(repo.store().list(&layout::backup_dir(id)).await?.into_iter().map(|o| o.key));
    }
    delete_all(repo, objects).await?;
    delete_all(repo, wal_delete.clone()).await?;
    if !ctx.global.json {
        println!("deleted {} backup(s) and {} WAL object(s)", deleting.len(), wal_delete.len());
    }
    Ok(())
}

/// Deletes objects, `DELETE_CONCURRENCY` at a time (a million WAL objects one by one would take
/// hours on a remote store).
async fn delete_all(repo: &walnut_core::Repository, keys: Vec<String>) -> Result<()> {
    use futures::{StreamExt, TryStreamExt};
    const DELETE_CONCURRENCY: usize = 32;
    futures::stream::iter(keys)
        .map(|key| async move { repo.store().delete(&key).await })
        .buffer_unordered(DELETE_CONCURRENCY)
        .try_collect::<()>()
        .await?;
    Ok(())
}
