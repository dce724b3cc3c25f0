//! `walnut delete ...` and `walnut retention apply`: print the plan (with reasons), and delete
//! only with `--confirm`, manifest first.

use super::Ctx;
use super::backup::print_table;
use anyhow::{Result, bail};
use walnut_core::backup;
use walnut_core::prune;
use walnut_core::retention::{Policy, Rule};

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
            let t = match walnut_core::plan::parse_target_time(reference) {
                Ok(t) => t,
                Err(_) => {
                    let b = backup::resolve_summary(&repo, reference).await?;
                    b.manifest.map(|m| m.end_time).unwrap_or_else(chrono::Utc::now)
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
    apply(ctx, &repo, &policy_rule(&ctx.config.settings), confirm).await
}

/// The configured policy as a retention rule.
pub fn policy_rule(s: &crate::config::Settings) -> Rule {
    Rule::Policy(Policy { recovery_window: s.recovery_window, minimum_redundancy: s.minimum_redundancy })
}

/// Prints the decision (with reasons); deletes only with `confirm`.
async fn apply(ctx: &Ctx, repo: &walnut_core::Repository, rule: &Rule, confirm: bool) -> Result<()> {
    let outcome = prune::decide(repo, rule, chrono::Utc::now()).await?;
    let (plan, wal_delete) = (&outcome.plan, &outcome.wal_delete);
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
            .map(|d| vec![d.id.to_string(), if d.keep { "keep".into() } else { "DELETE".into() }, d.reason.clone()])
            .collect();
        print_table(&["ID", "ACTION", "REASON"], &rows);
        println!(
            "WAL: {} object(s) before {} are needed by no kept backup{}",
            wal_delete.len(),
            plan.wal_needed_from.map(|l| l.to_string()).unwrap_or_else(|| "-".into()),
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
    let (backups, wal) = prune::execute(repo, &outcome).await?;
    if !ctx.global.json {
        println!("deleted {backups} backup(s) and {wal} WAL object(s)");
    }
    Ok(())
}
