//! What the archive holds and whether it is whole: the reports behind `wal-show` and
//! `wal-verify`, read from segment summaries (no segment is downloaded unless asked).
//!
//! `verify` checks, for every DONE backup, that WAL is contiguous from its start to the end of the
//! newest timeline descending from it (the planner's own timeline walk); that history files and
//! segments agree (parents known, no segment before a switch point, every later timeline has its
//! history file, each end-of-recovery record sits where its history file puts the switch); and
//! that every segment object is a readable walnut object whose metadata (the summary the planner
//! relies on) matches its checksum, by range reads. With `deep` it downloads every segment,
//! verifies the content's checksum and decodes all of it.

use crate::plan::{self, BackupPoint, Request, Target, TimelineChoice, WalInventory};
use crate::repo::{RepoError, Repository};
use crate::restore::{RestoreError, backup_points};
use crate::wal::WalError;
use crate::{backup, layout};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use walnut_pg::names::SegName;
use walnut_pg::{SegNo, TimelineId, WalFileName, WalSegSize};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{0} is empty: nothing archived yet")]
    Empty(String),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error(transparent)]
    Backup(#[from] backup::BackupError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
}

#[derive(Debug, Serialize)]
pub struct SegRange {
    pub first: String,
    pub last: String,
    pub segments: u64,
}

#[derive(Debug, Serialize)]
pub struct TimelineReport {
    pub timeline: u32,
    pub parent: Option<u32>,
    pub switchpoint: Option<String>,
    pub ranges: Vec<SegRange>,
    pub gaps: Vec<String>,
    pub first_commit: Option<String>,
    pub last_commit: Option<String>,
    pub restore_points: Vec<crate::summary::RestorePoint>,
    pub backups: Vec<String>,
    pub restorable: Option<String>,
}

/// What the repository holds: its segment size, WAL inventory (with summaries) and backups.
pub struct Contents {
    pub seg_size: WalSegSize,
    pub inv: WalInventory,
    pub points: Vec<BackupPoint>,
}

pub async fn load(repo: &Repository) -> Result<Contents, ArchiveError> {
    let identity = repo.identity().await?.ok_or_else(|| ArchiveError::Empty(repo.describe()))?;
    let inv = crate::wal::inventory(repo, true).await?;
    let points = backup_points(&backup::list(repo).await?)?;
    Ok(Contents { seg_size: identity.seg_size(), inv, points })
}

fn seg_name(t: TimelineId, s: SegNo, size: WalSegSize) -> String {
    SegName::new(t, s, size).to_string()
}

/// Per timeline: ranges, gaps, commits, restore points, backups, the restorable window.
pub fn timelines(c: &Contents, now: DateTime<Utc>) -> Vec<TimelineReport> {
    let (inv, points, size) = (&c.inv, &c.points, c.seg_size);
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
            match (prev, ranges.last_mut()) {
                (Some(p), Some(r)) if s.0 == p.0 + 1 => {
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
        let sums: Vec<_> = inv.summaries.get(&t).into_iter().flat_map(|m| m.values()).collect();
        let parent = inv.histories.get(&t).and_then(|h| h.last()).copied();
        let restorable = plan::plan(
            points,
            inv,
            size,
            &Request { target: Target::Latest, backup: None, timeline: TimelineChoice::Id(t) },
            now,
        )
        .ok()
        .map(|p| format!("{} .. {}", p.restorable.earliest_time.to_rfc3339(), p.restorable.latest_time.to_rfc3339()));
        out.push(TimelineReport {
            timeline: t.0,
            parent: parent.map(|p| p.tli.0),
            switchpoint: parent.map(|p| p.switchpoint.to_string()),
            ranges,
            gaps,
            first_commit: sums.iter().filter_map(|s| s.first_commit).min().map(|t| t.to_rfc3339()),
            last_commit: sums.iter().filter_map(|s| s.last_commit).max().map(|t| t.to_rfc3339()),
            restore_points: sums.iter().flat_map(|s| s.restore_points.clone()).collect(),
            backups: points.iter().filter(|b| b.tli == t).map(|b| b.id.to_string()).collect(),
            restorable,
        });
    }
    out
}

/// One backup's verdict.
#[derive(Debug, Serialize)]
pub struct BackupVerdict {
    pub backup: String,
    pub timeline: u32,
    pub status: String,
}

#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub problems: Vec<String>,
    pub backups: Vec<BackupVerdict>,
    pub segments_checked: usize,
    pub deep: bool,
    pub newest_timeline: Option<u32>,
}

/// The first missing segment after a backup's start, on the newest timeline descending from
/// it, when segments exist beyond it (a gap): the planner's walk ([`plan::contiguous`]).
pub(crate) fn first_gap(inv: &WalInventory, b: &BackupPoint, size: WalSegSize) -> Option<String> {
    let newest =
        inv.segments.keys().chain(inv.histories.keys()).copied().filter(|t| *t >= b.tli).max().unwrap_or(b.tli);
    let path = plan::path_to(inv, newest);
    let start = size.segno(b.start);
    let (last, gap) = plan::contiguous(inv, &path, start, size);
    let missing = last.map(|(s, _)| SegNo(s.0 + 1)).unwrap_or(start);
    gap.then(|| seg_name(plan::tli_for(&path, missing, size), missing, size))
}

/// History files and segments agree: parents known, no segment before a switch point, every
/// later timeline has its history file, each end-of-recovery record sits where its history file
/// puts the switch.
pub(crate) fn consistency_problems(inv: &WalInventory, size: WalSegSize) -> Vec<String> {
    let mut problems = Vec::new();
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
                match inv.histories.get(&TimelineId(new_tli)).and_then(|h| h.last()) {
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
    problems
}

/// Checks the archive (see the module docs).
pub async fn verify(repo: &Repository, deep: bool, now: DateTime<Utc>) -> Result<VerifyReport, ArchiveError> {
    let c = load(repo).await?;
    let (inv, points, size) = (&c.inv, &c.points, c.seg_size);
    let mut problems: Vec<String> = Vec::new();
    let mut backups = Vec::new();
    let newest_tli = inv.segments.keys().chain(inv.histories.keys()).max().copied();
    for b in points {
        let req = Request { target: Target::Latest, backup: Some(b.id.to_string()), timeline: TimelineChoice::Latest };
        let status = match (plan::plan(points, inv, size, &req, now), first_gap(inv, b, size)) {
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
        backups.push(BackupVerdict { backup: b.id.to_string(), timeline: b.tli.0, status });
    }
    problems.extend(consistency_problems(inv, size));
    // Objects: every segment is a readable walnut object; deep: checksummed and decoded whole.
    let keys: Vec<String> = inv
        .segments
        .iter()
        .flat_map(|(t, m)| m.keys().map(move |s| layout::wal_key(&WalFileName::Segment(SegName::new(*t, *s, size)))))
        .collect();
    let segments_checked = keys.len();
    let results: Vec<Option<String>> = futures::stream::iter(keys)
        .map(|key| async move {
            if deep {
                match repo.get_object(&key).await {
                    Ok(d) => {
                        let name = key.rsplit('/').next().unwrap_or_default().to_string();
                        let seg = WalFileName::parse(&name).ok()?.segment()?;
                        let start = size.start_lsn(seg.segno(size)?);
                        crate::summary::summarize(&d.content, start).err().map(|e| format!("{key}: {e}"))
                    }
                    Err(e) => Some(e.to_string()),
                }
            } else {
                // The header and the metadata (the summary planners rely on), checksum included.
                repo.object_meta(&key).await.err().map(|e| e.to_string())
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    problems.extend(results.into_iter().flatten());
    Ok(VerifyReport {
        ok: problems.is_empty(),
        problems,
        backups,
        segments_checked,
        deep,
        newest_timeline: newest_tli.map(|t| t.0),
    })
}
