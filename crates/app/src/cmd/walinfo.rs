//! `wal-show` and `wal-verify`: what the archive holds, read from segment summaries.

use super::Ctx;
use anyhow::{Result, bail};
use futures::StreamExt;
use serde::Serialize;
use walnut_core::backup::{self, Status};
use walnut_core::plan::{self, BackupPoint, Request, Target, TimelineChoice, WalInventory};
use walnut_core::{envelope, layout};
use walnut_pg::names::SegName;
use walnut_pg::{SegNo, TimelineId, WalFileName, WalSegSize};

#[derive(Debug, Serialize)]
struct SegRange {
    first: String,
    last: String,
    segments: u64,
}

#[derive(Debug, Serialize)]
struct TimelineReport {
    timeline: u32,
    parent: Option<u32>,
    switchpoint: Option<String>,
    ranges: Vec<SegRange>,
    gaps: Vec<String>,
    first_commit: Option<String>,
    last_commit: Option<String>,
    restore_points: Vec<walnut_core::summary::RestorePoint>,
    backups: Vec<String>,
    restorable: Option<String>,
}

async fn load(ctx: &Ctx) -> Result<(walnut_core::Repository, WalSegSize, WalInventory, Vec<BackupPoint>)> {
    let repo = ctx.repository()?;
    let identity =
        repo.identity().await?.ok_or_else(|| anyhow::anyhow!("{} is empty: nothing archived yet", repo.describe()))?;
    let inv = walnut_core::wal::inventory(&repo, true).await?;
    let mut points = Vec::new();
    for b in backup::list(&repo).await?.into_iter().filter(|b| b.status == Status::Done) {
        let m = b.manifest.expect("DONE has a manifest");
        points.push(BackupPoint {
            id: b.id,
            name: m.name,
            tli: TimelineId(m.timeline),
            start: m.start_lsn.parse()?,
            end: m.end_lsn.parse()?,
            end_time: chrono::DateTime::parse_from_rfc3339(&m.end_time)?.with_timezone(&chrono::Utc),
        });
    }
    Ok((repo, identity.seg_size(), inv, points))
}

fn seg_name(t: TimelineId, s: SegNo, size: WalSegSize) -> String {
    SegName::new(t, s, size).to_string()
}

fn report(inv: &WalInventory, points: &[BackupPoint], size: WalSegSize) -> Vec<TimelineReport> {
    let mut tlis: Vec<TimelineId> = inv.segments.keys().chain(inv.histories.keys()).copied().collect();
    tlis.sort();
    tlis.dedup();
    let mut out = Vec::new();
    for t in tlis {
        let segs = inv.segments.get(&t).cloned().unwrap_or_default();
        let mut ranges: Vec<SegRange> = Vec::new();
        let mut gaps = Vec::new();
        let mut prev: Option<SegNo> = None;
        for s in segs.keys() {
            match prev {
                Some(p) if s.0 == p.0 + 1 => {
                    let r = ranges.last_mut().expect("open range");
                    r.last = seg_name(t, *s, size);
                    r.segments += 1;
                }
                _ => {
                    if let Some(p) = prev {
                        gaps.push(format!(
                            "{}..{}",
                            seg_name(t, SegNo(p.0 + 1), size),
                            seg_name(t, SegNo(s.0 - 1), size)
                        ));
                    }
                    ranges.push(SegRange { first: seg_name(t, *s, size), last: seg_name(t, *s, size), segments: 1 });
                }
            }
            prev = Some(*s);
        }
        let sums = inv.summaries.get(&t);
        let commits: Vec<_> = sums.into_iter().flat_map(|m| m.values()).collect();
        let first_commit = commits.iter().filter_map(|s| s.first_commit).min();
        let last_commit = commits.iter().filter_map(|s| s.last_commit).max();
        let restore_points = commits.iter().flat_map(|s| s.restore_points.clone()).collect();
        let parent = inv.histories.get(&t).and_then(|h| h.last()).copied();
        let on_tli: Vec<&BackupPoint> = points.iter().filter(|b| b.tli == t).collect();
        let restorable = plan::plan(
            points,
            inv,
            size,
            &Request { target: Target::Latest, backup: None, timeline: TimelineChoice::Id(t) },
            chrono::Utc::now(),
        )
        .ok()
        .map(|p| format!("{} .. {}", p.restorable.earliest_time.to_rfc3339(), p.restorable.latest_time.to_rfc3339()));
        out.push(TimelineReport {
            timeline: t.0,
            parent: parent.map(|p| p.tli.0),
            switchpoint: parent.map(|p| p.switchpoint.to_string()),
            ranges,
            gaps,
            first_commit: first_commit.map(|t| t.to_rfc3339()),
            last_commit: last_commit.map(|t| t.to_rfc3339()),
            restore_points,
            backups: on_tli.iter().map(|b| b.id.clone()).collect(),
            restorable,
        });
    }
    out
}

pub async fn show(ctx: &Ctx) -> Result<()> {
    let (_repo, size, inv, points) = load(ctx).await?;
    let r = report(&inv, &points, size);
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
    let (repo, size, inv, points) = load(ctx).await?;
    let mut problems: Vec<String> = Vec::new();
    let mut per_backup = Vec::new();
    // Continuity: every backup must reach the end of its timeline (and of the timelines after it).
    let newest_tli = inv.segments.keys().chain(inv.histories.keys()).max().copied();
    for b in &points {
        let (last, gap) = continuity(&inv, b, size);
        let p = plan::plan(
            points.as_slice(),
            &inv,
            size,
            &Request { target: Target::Latest, backup: Some(b.id.clone()), timeline: TimelineChoice::Latest },
            chrono::Utc::now(),
        );
        let status = match (&p, gap) {
            (Ok(p), None) => format!(
                "PITR possible up to {} (LSN {})",
                p.restorable.latest_time.to_rfc3339(),
                p.restorable.latest_lsn
            ),
            (Ok(p), Some(missing)) => {
                problems.push(format!("backup {} cannot reach the end of the archive: {missing} is missing", b.id));
                format!("PITR possible only up to LSN {} ({missing} missing)", p.last_segment_lsn)
            }
            (Err(e), _) => {
                problems.push(format!("backup {}: {e}", b.id));
                format!("not restorable: {e}")
            }
        };
        let _ = last;
        per_backup.push(serde_json::json!({ "backup": b.id, "timeline": b.tli.0, "status": status }));
    }
    // History files agree with the segments: the parent exists and the child starts at the switch.
    for (t, h) in &inv.histories {
        if let Some(parent) = h.last() {
            let parent_known =
                inv.segments.contains_key(&parent.tli) || inv.histories.contains_key(&parent.tli) || parent.tli.0 == 1;
            if !parent_known {
                problems.push(format!("timeline {} names parent {} which is not in the archive", t.0, parent.tli.0));
            }
            if let Some(first) = inv.segments.get(t).and_then(|m| m.keys().next())
                && first.0 < size.segno(parent.switchpoint).0
            {
                problems.push(format!(
                    "timeline {} has segment {} before its switch point {}",
                    t.0,
                    seg_name(*t, *first, size),
                    parent.switchpoint
                ));
            }
        }
    }
    // The other way round: every timeline after the first has its history file, and each
    // end-of-recovery record (decoded at push) sits where that history file says the switch is.
    for (t, m) in &inv.segments {
        if t.0 != 1 && !inv.histories.contains_key(t) {
            let first = m.keys().next().map(|s| seg_name(*t, *s, size)).unwrap_or_default();
            problems.push(format!(
                "timeline {} has WAL (from {first}) but no history file {:08X}.history: restores cannot follow it",
                t.0, t.0
            ));
        }
    }
    for (t, sums) in &inv.summaries {
        for (segno, sum) in sums {
            for &new_tli in &sum.new_timelines {
                let here = seg_name(*t, *segno, size);
                match inv.histories.get(&walnut_pg::TimelineId(new_tli)).and_then(|h| h.last()) {
                    // On its own timeline, a missing history file is reported above.
                    None if new_tli != t.0 => problems.push(format!(
                        "segment {here} ends recovery onto timeline {new_tli}, but {new_tli:08X}.history is not in the archive"
                    )),
                    Some(parent) if size.segno(parent.switchpoint) != *segno => problems.push(format!(
                        "{new_tli:08X}.history puts the switch from timeline {} at {}, but the end-of-recovery record is in {here}",
                        parent.tli.0, parent.switchpoint
                    )),
                    _ => {}
                }
            }
        }
    }
    // Checksums: every segment object is a readable walnut object; --deep decodes all of it.
    let keys: Vec<String> = inv
        .segments
        .iter()
        .flat_map(|(t, m)| m.keys().map(move |s| layout::wal_key(&WalFileName::Segment(SegName::new(*t, *s, size)))))
        .collect();
    let checked = keys.len();
    let results: Vec<Option<String>> = futures::stream::iter(keys)
        .map(|key| {
            let repo = repo.clone();
            async move {
                if deep {
                    match repo.get_object(&key).await {
                        Ok(d) => {
                            let name = key.rsplit('/').next().unwrap_or_default().to_string();
                            let seg = WalFileName::parse(&name).ok()?.segment()?;
                            let start = size.start_lsn(seg.segno(size)?);
                            walnut_core::summary::summarize(&d.content, start).err().map(|e| format!("{key}: {e}"))
                        }
                        Err(e) => Some(e.to_string()),
                    }
                } else {
                    match repo.store().get_range(&key, 0..64).await {
                        Ok(b) if envelope::meta_from_prefix(&b).is_ok() => None,
                        Ok(_) => Some(format!("{key}: not a walnut object")),
                        Err(e) => Some(format!("{key}: {e}")),
                    }
                }
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    problems.extend(results.into_iter().flatten());
    if ctx.global.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "ok": problems.is_empty(), "problems": problems, "backups": per_backup,
                "segments_checked": checked, "deep": deep, "newest_timeline": newest_tli.map(|t| t.0),
            }))?
        );
    } else {
        for b in &per_backup {
            println!(
                "backup {} (timeline {}): {}",
                b["backup"].as_str().unwrap_or(""),
                b["timeline"],
                b["status"].as_str().unwrap_or("")
            );
        }
        println!("{checked} segments checked{}", if deep { " (downloaded and decoded)" } else { "" });
        for p in &problems {
            println!("PROBLEM: {p}");
        }
    }
    if !problems.is_empty() {
        bail!("wal-verify found {} problem(s)", problems.len());
    }
    if !ctx.global.json && !ctx.global.quiet {
        println!("OK");
    }
    Ok(())
}

/// From a backup's start, along the newest timeline descending from it: the last contiguous
/// segment and the first missing one when segments exist beyond it.
fn continuity(inv: &WalInventory, b: &BackupPoint, size: WalSegSize) -> (Option<SegNo>, Option<String>) {
    let newest =
        inv.segments.keys().chain(inv.histories.keys()).copied().filter(|t| *t >= b.tli).max().unwrap_or(b.tli);
    let mut path: Vec<(TimelineId, walnut_pg::Lsn)> = Vec::new();
    let mut begin = walnut_pg::Lsn(0);
    if let Some(h) = inv.histories.get(&newest) {
        for e in h {
            path.push((e.tli, begin));
            begin = e.switchpoint;
        }
    }
    path.push((newest, begin));
    let tli_for =
        |s: SegNo| path.iter().rev().find(|(_, bg)| size.segno(*bg) <= s).map(|(t, _)| *t).unwrap_or(path[0].0);
    let mut s = size.segno(b.start);
    let mut last = None;
    while inv.segments.get(&tli_for(s)).is_some_and(|m| m.contains_key(&s)) {
        last = Some(s);
        s = SegNo(s.0 + 1);
    }
    let beyond = path.iter().any(|(t, _)| inv.segments.get(t).is_some_and(|m| m.range(s..).next().is_some()));
    (last, beyond.then(|| seg_name(tli_for(s), s, size)))
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
