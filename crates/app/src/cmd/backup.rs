//! `backup-push`, `backup-list`, `backup-show`, `backup-fetch`.

use super::Ctx;
use crate::output::{self, Bar};
use anyhow::{Context, Result};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use walnut_core::backup::{self, Progress, Status};
use walnut_core::restore::{TablespaceTarget, check_dest, clean_dest, mark_done, mark_in_progress, tablespace_targets};

/// How `backup-push` was asked to back up, beyond the configuration.
#[derive(Debug, Clone, Default)]
pub struct PushHow {
    pub incremental: bool,
    pub parent: Option<String>,
    pub max_rate: Option<u64>,
}

pub async fn push(ctx: &Ctx, pgdata: Option<&Path>, name: Option<String>, how: PushHow) -> Result<()> {
    let repo = ctx.repository()?;
    let mut opts = ctx.push_options(pgdata, name, false)?;
    if how.incremental {
        opts.incremental = Some(backup::IncrementalOptions {
            parent: how.parent,
            max_chain: ctx.config.backup_max_chain,
            tails: ctx.tails_dir(),
        });
    }
    opts.max_rate = how.max_rate.or(opts.max_rate);
    // Ctrl-C or SIGTERM: the backup is marked FAILED at once instead of going stale.
    opts.cancel = super::stop_signal();
    let progress = Arc::new(Progress::default());
    let start = Instant::now();
    let m = {
        let _bar = Bar::start("backup", progress.clone(), ctx.global.quiet);
        backup::push(&repo, &opts, progress).await?
    };
    let took = start.elapsed();
    if ctx.global.json {
        println!("{}", serde_json::to_string_pretty(&backup::ManifestSummary::from(&m))?);
    } else if !ctx.global.quiet {
        if let Some(parent) = &m.parent {
            let blocks = m.files.iter().filter(|f| f.blocks.is_some()).count();
            let whole: usize = m.whole.values().map(Vec::len).sum();
            println!(
                "incremental on {parent} (chain of {}): {blocks} relation file(s) stored as changed blocks, {whole} \
                 stored whole although the parent holds them (see backup-show)",
                m.chain.len()
            );
            for note in &m.map_notes {
                println!("block map: {note}");
            }
        } else if how.incremental {
            println!("a full backup, not an incremental one (see the warning above)");
        }
        println!(
            "backup {}{} DONE: {} in {} files -> {} stored ({:.1}x) in {:.1?} ({}); consistent at {} (WAL {}..{})",
            m.id,
            m.name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default(),
            output::bytes(m.data_bytes),
            m.files.len(),
            output::bytes(m.stored_bytes),
            m.data_bytes as f64 / m.stored_bytes.max(1) as f64,
            took,
            output::rate(m.data_bytes, took),
            m.end_lsn,
            m.start_wal,
            m.end_wal
        );
    }
    Ok(())
}

pub async fn list(ctx: &Ctx, detail: bool) -> Result<()> {
    let repo = ctx.repository()?;
    let all = backup::list(&repo).await?;
    if ctx.global.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    if all.is_empty() {
        println!("no backups in {}", repo.describe());
        return Ok(());
    }
    let mut rows = vec![];
    let mut header = vec!["ID", "NAME", "STATUS", "END TIME", "BEGIN WAL"];
    if detail {
        header.extend(["TYPE", "PARENT", "START LSN", "END LSN", "TLI", "SIZE", "STORED", "CHAIN STORED", "DURATION"]);
    }
    for b in &all {
        let m = b.manifest.as_ref();
        let mut row = vec![
            b.id.to_string(),
            m.and_then(|m| m.name.clone()).unwrap_or_else(|| "-".into()),
            b.status.to_string(),
            m.map(|m| m.end_time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)).unwrap_or_else(|| "-".into()),
            m.map(|m| m.start_wal.clone()).unwrap_or_else(|| "-".into()),
        ];
        if detail {
            let dur =
                m.map(|m| format!("{}s", (m.end_time - m.start_time).num_seconds())).unwrap_or_else(|| "-".into());
            row.extend([
                m.map(|m| m.kind.clone()).unwrap_or_else(|| "-".into()),
                m.and_then(|m| m.parent.as_ref().map(|p| p.to_string())).unwrap_or_else(|| "-".into()),
                m.map(|m| m.start_lsn.to_string()).unwrap_or_else(|| "-".into()),
                m.map(|m| m.end_lsn.to_string()).unwrap_or_else(|| "-".into()),
                m.map(|m| m.timeline.to_string()).unwrap_or_else(|| "-".into()),
                m.map(|m| output::bytes(m.data_bytes)).unwrap_or_else(|| "-".into()),
                m.map(|m| output::bytes(m.stored_bytes)).unwrap_or_else(|| "-".into()),
                b.chain_stored_bytes.map(output::bytes).unwrap_or_else(|| "-".into()),
                dur,
            ]);
        }
        rows.push(row);
    }
    print_table(&header, &rows);
    if detail && let Some(e) = replay_estimate(ctx, &repo, &all).await {
        println!(
            "a restore to the latest point replays {} of WAL from backup {}: about {:.0}s at {}/s ({})",
            output::bytes(e.wal_bytes),
            e.backup,
            e.seconds,
            output::bytes(e.bytes_per_second as u64),
            if e.measured {
                "the rate the last restore here measured"
            } else {
                "an assumed rate: no restore here measured one"
            }
        );
    }
    Ok(())
}

/// The replay-time estimate of a restore to the end of the archive (see `walnut_core::replay`).
async fn replay_estimate(
    ctx: &Ctx,
    repo: &walnut_core::Repository,
    all: &[backup::BackupInfo],
) -> Option<walnut_core::replay::Estimate> {
    let (id, start) = all
        .iter()
        .filter(|b| b.status == Status::Done)
        .filter_map(|b| b.manifest.as_ref().map(|m| (b.id.to_string(), m.start_lsn)))
        .max_by_key(|(_, s)| *s)?;
    let end = walnut_core::replay::archive_end(repo).await?;
    let identity = repo.identity().await.ok().flatten()?;
    let measured = ctx
        .config
        .repo_url()
        .ok()
        .and_then(|url| walnut_core::state::StateDir::open(&ctx.config.state_dir, url, &identity).ok())
        .and_then(|s| walnut_core::replay::measured(&s));
    Some(walnut_core::replay::estimate(&id, start, end, measured.as_ref()))
}

pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(header.iter().map(|s| s.to_string()).collect()));
    for r in rows {
        println!("{}", line(r.clone()));
    }
}

pub async fn show(ctx: &Ctx, reference: &str) -> Result<()> {
    let repo = ctx.repository()?;
    let m = backup::resolve(&repo, reference).await?;
    if ctx.global.json {
        let mut v = serde_json::to_value(&m)?;
        v["status"] = serde_json::json!(Status::Done);
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let s = backup::ManifestSummary::from(&m);
    println!("ID:            {}", m.id);
    println!("Name:          {}", s.name.as_deref().unwrap_or("-"));
    println!("Status:        DONE{}", if m.scheduled { " (scheduled)" } else { " (on demand)" });
    println!("PostgreSQL:    {} (system identifier {})", m.pg_version_num, m.system_identifier);
    println!("Timeline:      {}", m.timeline);
    println!("Start:         {}  LSN {}  WAL {}", m.start_time, m.start_lsn, m.start_wal);
    println!("Consistent at: {}  LSN {}  WAL {}", m.end_time, m.end_lsn, m.end_wal);
    println!("Data:          {} in {} files", output::bytes(m.data_bytes), m.files.len());
    println!("Stored:        {} in {} parts ({})", output::bytes(m.stored_bytes), m.parts.len(), m.compression);
    match &m.parent {
        None => println!("Type:          full"),
        Some(parent) => {
            let chain: Vec<String> = m.chain.iter().map(|c| c.to_string()).collect();
            let as_blocks: Vec<&backup::FileEntry> = m.files.iter().filter(|f| f.blocks.is_some()).collect();
            let blocks: u64 = as_blocks.iter().filter_map(|f| f.blocks.as_ref()).map(|b| b.stored.count()).sum();
            println!("Type:          incremental on {parent}");
            println!("Chain:         {} (oldest first)", chain.join(" <- "));
            println!(
                "Blocks:        {} relation file(s) stored as {blocks} changed block(s) ({})",
                as_blocks.len(),
                output::bytes(blocks * backup::BLCKSZ)
            );
            for note in &m.map_notes {
                println!("Block map:     {note}");
            }
            if m.whole.is_empty() {
                println!("Stored whole:  none of the parent's relation files");
            } else {
                println!("Stored whole although the parent holds them, by reason:");
                for (why, paths) in &m.whole {
                    let shown: Vec<&str> = paths.iter().take(5).map(String::as_str).collect();
                    let more = if paths.len() > 5 { format!(" and {} more", paths.len() - 5) } else { String::new() };
                    println!("  {why}: {} file(s): {}{more}", paths.len(), shown.join(", "));
                }
            }
        }
    }
    if !m.tablespaces.is_empty() {
        for t in &m.tablespaces {
            println!("Tablespace:    {} (oid {}) at {}", t.display_name(), t.oid, t.location);
        }
    }
    Ok(())
}

/// Fetches `m` into `dest` (and its tablespaces into theirs) with progress; cleans up on failure.
pub async fn fetch_into(
    ctx: &Ctx,
    repo: &walnut_core::Repository,
    m: &backup::Manifest,
    dest: &Path,
    tablespaces: &[TablespaceTarget],
) -> Result<Duration> {
    let existed = check_dest(dest)?;
    // Until the caller says it is done, every directory written holds the in-progress marker:
    // a re-run after a crash starts over instead of refusing a non-empty directory.
    mark_in_progress(dest)?;
    for t in tablespaces {
        mark_in_progress(&t.dir)?;
    }
    let progress = Arc::new(Progress::default());
    let start = Instant::now();
    let dirs = tablespaces.iter().map(|t| (t.oid.clone(), t.dir.clone())).collect();
    let r = {
        let _bar = Bar::start("fetch", progress.clone(), ctx.global.quiet);
        backup::fetch(repo, m, dest, &dirs, ctx.config.backup_parallel, progress).await
    };
    if let Err(e) = r {
        clean_dest(dest, existed);
        for t in tablespaces {
            t.clean();
        }
        return Err(e).with_context(|| format!("fetch backup {} (nothing was left in {})", m.id, dest.display()));
    }
    Ok(start.elapsed())
}

pub async fn fetch(ctx: &Ctx, dest: &Path, reference: &str, tablespace_maps: &[String]) -> Result<()> {
    let repo = ctx.repository()?;
    check_dest(dest)?;
    let m = backup::resolve(&repo, reference).await?;
    let tablespaces = tablespace_targets(&m, dest, tablespace_maps)?;
    let took = fetch_into(ctx, &repo, &m, dest, &tablespaces).await?;
    let manifest = dest.join("backup_manifest");
    // An incremental backup's files rebuilt from blocks are checksummed as restored.
    let whole = if m.is_incremental() {
        let (m, dest) = (m.clone(), dest.to_path_buf());
        tokio::task::spawn_blocking(move || backup::rebuilt(&m, &dest)).await??
    } else {
        m.clone()
    };
    walnut_core::durable::write(&manifest, backup::postgres_manifest(&whole).as_bytes())
        .with_context(|| format!("write {}", manifest.display()))?;
    for t in &tablespaces {
        mark_done(&t.dir)?;
    }
    mark_done(dest)?;
    if !ctx.global.quiet {
        println!(
            "fetched backup {} into {}: {} in {:.1?} ({}). No recovery configuration was written: use `walnut restore` for PITR.",
            m.id,
            dest.display(),
            output::bytes(m.data_bytes),
            took,
            output::rate(m.data_bytes, took)
        );
    }
    Ok(())
}
