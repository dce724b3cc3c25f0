//! `wal-show` and `wal-verify`: what the archive holds, read from segment summaries.

use super::Ctx;
use anyhow::{Result, bail};
use walnut_core::archive;
use walnut_pg::WalFileName;

pub async fn show(ctx: &Ctx) -> Result<()> {
    let contents = archive::load(&ctx.repository()?).await?;
    let r = archive::timelines(&contents, chrono::Utc::now());
    if ctx.global.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "timelines": r }))?);
        return Ok(());
    }
    for t in &r {
        match (&t.parent, &t.switchpoint) {
            (Some(p), Some(sp)) => println!("timeline {} (branched from {p} at {sp})", t.timeline),
            _ => println!("timeline {}", t.timeline),
        }
        for g in &t.ranges {
            println!("  WAL      {} .. {} ({} segments)", g.first, g.last, g.segments);
        }
        for g in &t.gaps {
            println!("  GAP      {g} missing");
        }
        if let (Some(a), Some(b)) = (&t.first_commit, &t.last_commit) {
            println!("  commits  {a} .. {b}");
        }
        for rp in &t.restore_points {
            println!(
                "  restore point {:?} at {}{}",
                rp.name,
                rp.lsn,
                rp.time.map(|t| format!(" ({})", t.to_rfc3339())).unwrap_or_default()
            );
        }
        for b in &t.backups {
            println!("  backup   {b}");
        }
        println!(
            "  restorable: {}",
            t.restorable.as_deref().unwrap_or("no (no usable backup and WAL on this timeline)")
        );
    }
    Ok(())
}

pub async fn verify(ctx: &Ctx, deep: bool) -> Result<()> {
    let r = archive::verify(&ctx.repository()?, deep, chrono::Utc::now()).await?;
    if ctx.global.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        for b in &r.backups {
            println!("backup {} (timeline {}): {}", b.backup, b.timeline, b.status);
        }
        println!(
            "{} segments checked{}",
            r.segments_checked,
            if deep {
                " (downloaded, checksummed and decoded)"
            } else {
                " (headers and summaries checked; --deep checks the content too)"
            }
        );
        for p in &r.problems {
            println!("PROBLEM: {p}");
        }
    }
    if !r.ok {
        bail!("wal-verify found {} problem(s)", r.problems.len());
    }
    if !ctx.global.json && !ctx.global.quiet {
        println!("OK");
    }
    Ok(())
}

/// `walnut verify`: every backup's objects and WAL read and checked, a verdict per backup.
pub async fn verify_all(ctx: &Ctx, backup: Option<String>, deep: bool) -> Result<()> {
    use walnut_core::verify;
    let repo = ctx.repository()?;
    let progress = std::sync::Arc::new(walnut_core::backup::Progress::default());
    let opts = verify::Options { backup, deep, parallel: ctx.config.backup_parallel.max(4) };
    let started = std::time::Instant::now();
    let r = {
        let _bar = crate::output::Bar::start("verifying", progress.clone(), ctx.global.quiet || ctx.global.json);
        verify::run(&repo, &opts, progress, chrono::Utc::now()).await?
    };
    let took = started.elapsed();
    if ctx.global.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        for b in &r.backups {
            let name = b.name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
            match &b.restorable {
                Some(w) => println!(
                    "backup {}{name}: {} to [{}, {}] (LSN {} .. {}, timeline {})",
                    b.id,
                    b.verdict,
                    w.earliest_time.to_rfc3339(),
                    w.latest_time.to_rfc3339(),
                    w.earliest_lsn,
                    w.latest_lsn,
                    w.timeline
                ),
                None => println!("backup {}{name}: {}", b.id, b.verdict),
            }
            for d in &b.defects {
                println!("  DEFECT {}: {}", d.object, d.reason);
            }
        }
        for p in &r.problems {
            println!("PROBLEM: {p}");
        }
        println!(
            "{} backup(s), {} part(s), {} WAL segment(s), {} checked in {:.1?} ({}){}",
            r.backups.len(),
            r.parts_checked,
            r.segments_checked,
            crate::output::bytes(r.bytes_checked),
            took,
            crate::output::rate(r.bytes_checked, took),
            if deep { ", every file and WAL record decoded" } else { "" }
        );
    }
    if !r.ok {
        bail!("verify found {} defect(s): see the lines above", r.defects().max(1));
    }
    if r.backups.is_empty() {
        bail!("no DONE backup to verify: take one with `walnut backup-push`");
    }
    Ok(())
}

/// Decodes segment files (no repository needed) and reports summaries and throughput.
pub fn inspect(ctx: &Ctx, paths: &[std::path::PathBuf]) -> Result<()> {
    let mut total_bytes = 0u64;
    let mut total_time = std::time::Duration::ZERO;
    let mut failed = 0;
    for p in paths {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let data = std::fs::read(p).map_err(|e| anyhow::anyhow!("read {}: {e}", p.display()))?;
        let seg = WalFileName::parse(&name)?.segment().ok_or_else(|| anyhow::anyhow!("{name} is not a WAL segment"))?;
        let check = walnut_pg::walpage::check_segment(seg, &data)?;
        let t = std::time::Instant::now();
        let summary = walnut_core::summary::summarize(&data, check.seg_size.start_lsn(check.segno));
        let took = t.elapsed();
        total_bytes += data.len() as u64;
        total_time += took;
        let mbps = data.len() as f64 / took.as_secs_f64().max(1e-9) / 1e6;
        match summary {
            Ok(s) if ctx.global.json => println!(
                "{}",
                serde_json::json!({"name": name, "decode_ms": took.as_secs_f64() * 1e3, "mb_per_s": mbps, "summary": s})
            ),
            Ok(s) => println!(
                "{name}: {} records, {} commits, {} aborts, {} restore points, end {} at {} ({:.1} ms, {mbps:.0} MB/s)",
                s.records,
                s.commits,
                s.aborts,
                s.restore_points.len(),
                s.end,
                s.end_of_valid_wal,
                took.as_secs_f64() * 1e3
            ),
            Err(e) => {
                failed += 1;
                println!("{name}: INVALID: {e}");
            }
        }
    }
    if !ctx.global.json {
        println!(
            "decoded {} in {:.1?}: {:.0} MB/s",
            crate::output::bytes(total_bytes),
            total_time,
            total_bytes as f64 / total_time.as_secs_f64().max(1e-9) / 1e6
        );
    }
    if failed > 0 {
        bail!("{failed} segment(s) are not valid WAL");
    }
    Ok(())
}

/// `walnut wal-stages FILE...`: each stage's median over the files, in milliseconds (JSON with
/// `--json`: every file's stages).
pub async fn stages(ctx: &Ctx, paths: &[std::path::PathBuf]) -> Result<()> {
    let repo = ctx.repository()?;
    let scratch = tempfile::tempdir()?;
    let mut all = Vec::new();
    for p in paths {
        all.push(walnut_core::wal::stage_timings(&repo, ctx.config.codec.clone(), p, scratch.path()).await?);
    }
    if ctx.global.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    let Some(first) = all.first() else { return Ok(()) };
    let mut total = 0.0;
    for (i, s) in first.iter().enumerate() {
        let mut v: Vec<u64> = all.iter().map(|f| f[i].micros).collect();
        v.sort_unstable();
        let median = v[v.len() / 2] as f64 / 1000.0;
        total += median;
        println!("{:<28} {median:>8.1} ms", s.stage);
    }
    println!("{:<28} {total:>8.1} ms (sum of medians, {} files)", "all stages", all.len());
    Ok(())
}
