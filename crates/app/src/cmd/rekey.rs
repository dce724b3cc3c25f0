//! `walnut rekey [--confirm]`: re-encrypt what the repository holds to the configured recipients
//! (the use case is `walnut_core::rekey`). Without `--confirm` it prints what it would do.

use super::Ctx;
use anyhow::{Result, anyhow, bail};
use std::collections::BTreeMap;
use std::sync::Arc;
use walnut_core::rekey::{self, Kind};

pub async fn run(ctx: &Ctx, confirm: bool) -> Result<()> {
    let to = ctx.config.codec.seal.clone().ok_or_else(|| {
        anyhow!(
            "rekey re-encrypts to [encryption] recipients and none are configured: set encryption.recipients (or \
             recipients_file) to the public keys objects should be encrypted to"
        )
    })?;
    let repo = ctx.repository()?;
    if repo.identity().await?.is_none() {
        bail!("{} holds no walnut repository (no walnut.json): nothing to re-encrypt", repo.describe());
    }
    let parallel = ctx.config.backup_parallel.max(4);
    let plan = rekey::plan(&repo, &to, parallel).await?;
    if !ctx.global.json {
        print_plan(&plan);
    }
    if !confirm || (plan.todo.is_empty() && plan.leftovers.is_empty()) {
        if ctx.global.json {
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "confirm": confirm, "plan": plan }))?);
        } else if !plan.todo.is_empty() || !plan.leftovers.is_empty() {
            println!("nothing changed: add --confirm to re-encrypt the above");
        }
        return Ok(());
    }
    let progress = Arc::new(walnut_core::backup::Progress::default());
    let started = std::time::Instant::now();
    let report = {
        let _bar = crate::output::Bar::start("re-encrypting", progress.clone(), ctx.global.quiet || ctx.global.json);
        rekey::run(&repo, to, parallel, progress).await?
    };
    // Planned again under the lock: the same, unless something changed in between.
    let (plan, report) = report;
    let took = started.elapsed();
    if ctx.global.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "confirm": confirm, "plan": plan, "report": report }))?
        );
    } else {
        println!(
            "re-encrypted {} object(s), {} stored, in {:.1?}; {} backup(s) switched to their re-encrypted parts; {} WAL \
             index object(s) updated; {} leftover(s) deleted",
            report.rekeyed,
            crate::output::bytes(report.bytes),
            took,
            report.backups,
            report.index_objects,
            report.leftovers_deleted
        );
        for d in &report.failures {
            println!("  LEFT AS IT WAS {}: {}", d.object, d.reason);
        }
    }
    if !report.failures.is_empty() {
        bail!(
            "rekey left {} object(s) as they were (see above): they stay readable with the keys they were encrypted to",
            report.failures.len()
        );
    }
    Ok(())
}

fn print_plan(plan: &rekey::Plan) {
    let mut by_kind: BTreeMap<Kind, (usize, u64)> = BTreeMap::new();
    let mut by_from: BTreeMap<String, usize> = BTreeMap::new();
    for i in &plan.todo {
        let e = by_kind.entry(i.kind).or_default();
        e.0 += 1;
        e.1 += i.stored_bytes;
        let from = if i.recipients.is_empty() { "clear (not encrypted)".to_string() } else { i.recipients.join(", ") };
        *by_from.entry(from).or_default() += 1;
    }
    let kind = |k: Kind| match k {
        Kind::Wal => "WAL object(s)",
        Kind::Part => "backup part(s)",
        Kind::Manifest => "backup manifest(s)",
    };
    println!("recipients: {}", plan.to.join(", "));
    if plan.todo.is_empty() {
        println!("nothing to re-encrypt: all {} object(s) are encrypted to exactly these recipients", plan.current);
    } else {
        let list: Vec<String> =
            by_kind.iter().map(|(k, (n, b))| format!("{n} {} ({})", kind(*k), crate::output::bytes(*b))).collect();
        println!("to re-encrypt: {}; {} object(s) already encrypted to them", list.join(", "), plan.current);
        for (from, n) in &by_from {
            println!("  now {from}: {n} object(s)");
        }
    }
    if !plan.leftovers.is_empty() {
        println!(
            "{} object(s) in backups' data directories that no manifest names (left by an interrupted rekey) to delete",
            plan.leftovers.len()
        );
    }
    for d in &plan.unreadable {
        println!("  UNREADABLE {}: {}", d.object, d.reason);
    }
}
