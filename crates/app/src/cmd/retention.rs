//! `walnut delete ...` and `walnut retention apply`: print the plan (with reasons), and delete
//! only with `--confirm`, manifest first.

use super::Ctx;
use super::backup::print_table;
use anyhow::{Result, bail};
use walnut_core::backup::{self, Status};
use walnut_core::layout;
use walnut_core::retention::{self, Candidate, Policy, Rule, State};
use walnut_pg::{Lsn, WalFileName};

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
    let mut wal_delete = Vec::new();
    if let Some(id) = &identity {
        let size = id.seg_size();
        for o in repo.store().list(layout::WAL_DIR).await? {
            let seg = match layout::parse_wal_key(&o.key) {
                Some(WalFileName::Segment(s)) | Some(WalFileName::Partial(s)) | Some(WalFileName::Backup(s, _)) => s,
                _ => continue, // history files are kept: they are tiny and describe every timeline
            };
            if let Some(segno) = seg.segno(size)
                && retention::wal_deletable(segno, needed, size)
            {
                wal_delete.push(o.key);
            }
        }
    }
    wal_delete.sort();
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
    for id in &deleting {
        // Manifest first: from here on the backup no longer exists for any reader.
        repo.store().delete(&layout::backup_manifest(id)).await?;
        for o in repo.store().list(&layout::backup_dir(id)).await? {
            repo.store().delete(&o.key).await?;
        }
    }
    for key in &wal_delete {
        repo.store().delete(key).await?;
    }
    if !ctx.global.json {
        println!("deleted {} backup(s) and {} WAL object(s)", deleting.len(), wal_delete.len());
    }
    Ok(())
}
