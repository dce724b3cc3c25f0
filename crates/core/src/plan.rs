//! Restore planning: a pure function of (backups, archived WAL, request) -> plan or refusal.
//!
//! The plan picks the newest backup whose consistency point is at or before the target, on the
//! timeline path the target timeline descends through, and checks that every WAL segment from
//! that backup's start to the target exists on the right timeline. A target it cannot reach is
//! refused with the restorable range, before anything is written.
//!
//! Time bounds come from what the repository knows without decoding WAL: a backup's end time, and
//! the time each segment was stored (a commit in a segment happened before the segment was
//! archived). A time target after the newest archived segment, on an archive with no gap, is the
//! end of the archive: the plan recovers to it instead of letting PostgreSQL fail with "recovery
//! ended before configured recovery target was reached". That end is pinned to the last record
//! archived *when the plan was made* ([`RecoveryTarget::PinnedEnd`]): WAL archived between planning
//! and replay (the disaster's own segment, pushed by `archive_timeout`) is never replayed into a
//! point-in-time restore.

use chrono::{DateTime, Utc};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use walnut_pg::history::HistoryEntry;
use walnut_pg::{Lsn, SegNo, TimelineId, WalSegSize};

/// Parses a target time: RFC 3339 or PostgreSQL style; a time without a zone is an error.
pub fn parse_target_time(text: &str) -> Result<DateTime<Utc>, String> {
    let t = text.trim();
    if let Ok(d) = chrono::DateTime::parse_from_rfc3339(t) {
        return Ok(d.with_timezone(&Utc));
    }
    let mut s = t.replacen(' ', "T", 1);
    // PostgreSQL writes offsets as +00 or +05:30; RFC 3339 wants +00:00.
    if let Some(pos) = s.rfind(['+', '-']).filter(|p| *p > 10) {
        let off = &s[pos + 1..];
        if off.len() == 2 && off.bytes().all(|b| b.is_ascii_digit()) {
            s.push_str(":00");
        } else if off.len() == 4 && off.bytes().all(|b| b.is_ascii_digit()) {
            s.insert(pos + 3, ':');
        }
    }
    if let Ok(d) = chrono::DateTime::parse_from_rfc3339(&s) {
        return Ok(d.with_timezone(&Utc));
    }
    if chrono::NaiveDateTime::parse_from_str(&s, "%Y-%m-%dT%H:%M:%S%.f").is_ok() {
        return Err(format!("target time {text:?} has no time zone: add one, like {text}Z or '{text}+00'"));
    }
    Err(format!(
        "invalid target time {text:?}: use RFC 3339 (2024-07-15T15:17:54Z) or PostgreSQL style ('2024-07-15 15:17:54+00')"
    ))
}

#[derive(Debug, Clone)]
pub struct BackupPoint {
    pub id: crate::backup::BackupId,
    pub name: Option<String>,
    pub tli: TimelineId,
    pub start: Lsn,
    /// Consistency point.
    pub end: Lsn,
    pub end_time: DateTime<Utc>,
}

/// What is archived: segments per timeline (with the time each was stored) and history files.
#[derive(Debug, Clone, Default)]
pub struct WalInventory {
    pub segments: BTreeMap<TimelineId, BTreeMap<SegNo, DateTime<Utc>>>,
    pub histories: HashMap<TimelineId, Vec<HistoryEntry>>,
    /// What decoding each segment at push found (absent for objects stored without one).
    pub summaries: BTreeMap<TimelineId, BTreeMap<SegNo, crate::summary::SegmentSummary>>,
}

impl WalInventory {
    fn summary(&self, t: TimelineId, s: SegNo) -> Option<&crate::summary::SegmentSummary> {
        self.summaries.get(&t)?.get(&s)
    }

    /// Summaries of the contiguous segments `from..=to` on `path`.
    fn summaries_on(
        &self,
        path: &[(TimelineId, Lsn)],
        from: SegNo,
        to: SegNo,
        seg: WalSegSize,
    ) -> Vec<&crate::summary::SegmentSummary> {
        (from.0..=to.0).filter_map(|s| self.summary(tli_for(path, SegNo(s), seg), SegNo(s))).collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Target {
    Latest,
    Time(DateTime<Utc>),
    Name(String),
    Lsn(Lsn),
    Xid(u32),
    Immediate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimelineChoice {
    Latest,
    Current,
    Id(TimelineId),
}

#[derive(Debug, Clone)]
pub struct Request {
    pub target: Target,
    pub backup: Option<String>,
    pub timeline: TimelineChoice,
}

/// What PostgreSQL is told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum RecoveryTarget {
    /// Replay everything archived.
    EndOfArchive,
    /// The end of the archive as it was when the plan was made: replay up to and including the
    /// record that begins at this LSN (the last whole record archived then), nothing after it.
    PinnedEnd(Lsn),
    Time(DateTime<Utc>),
    Name(String),
    Lsn(Lsn),
    Xid(u32),
    Immediate,
}

#[derive(Debug, Clone, Serialize)]
pub struct Range {
    pub earliest_time: DateTime<Utc>,
    pub earliest_lsn: Lsn,
    pub latest_time: DateTime<Utc>,
    pub latest_lsn: Lsn,
    pub timeline: TimelineId,
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "earliest: {} (LSN {}), latest: {} (LSN {}) on timeline {}",
            self.earliest_time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            self.earliest_lsn,
            self.latest_time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            self.latest_lsn,
            self.timeline
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub backup_id: crate::backup::BackupId,
    pub backup_name: Option<String>,
    pub backup_timeline: TimelineId,
    pub backup_end_lsn: Lsn,
    pub target_timeline: TimelineId,
    pub recovery_target: RecoveryTarget,
    pub first_segment_lsn: Lsn,
    pub last_segment_lsn: Lsn,
    pub segments: u64,
    pub restorable: Range,
    /// Things the operator should know (said on output).
    pub notes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("the repository has no complete (DONE) backup: take one with `walnut backup-push`")]
    NoBackups,
    #[error("no backup matches {0:?}: give a backup ID, a backup name, or LATEST")]
    UnknownBackup(String),
    #[error("timeline {0} is not in the archive (no history file for it)")]
    UnknownTimeline(u32),
    #[error("{reason}; the restorable range is {range}")]
    Unreachable { reason: String, range: Box<Range> },
    #[error("{0}")]
    Invalid(String),
}

/// The timelines from the oldest ancestor to `tli`, each with the LSN where it begins.
pub(crate) fn path_to(inv: &WalInventory, tli: TimelineId) -> Vec<(TimelineId, Lsn)> {
    let mut out = Vec::new();
    let mut begin = Lsn(0);
    if let Some(h) = inv.histories.get(&tli) {
        for e in h {
            out.push((e.tli, begin));
            begin = e.switchpoint;
        }
    }
    out.push((tli, begin));
    out
}

/// The highest timeline any history file (or segment) names that descends from `from`.
fn latest_descendant(inv: &WalInventory, from: TimelineId) -> TimelineId {
    let mut best = from;
    let candidates = inv.histories.keys().chain(inv.segments.keys());
    for &t in candidates {
        if t > best && (t == from || path_to(inv, t).iter().any(|(a, _)| *a == from)) {
            best = t;
        }
    }
    best
}

/// Which timeline's copy of segment `s` recovery reads on `path`.
pub(crate) fn tli_for(path: &[(TimelineId, Lsn)], s: SegNo, seg: WalSegSize) -> TimelineId {
    path.iter().rev().find(|(_, begin)| seg.segno(*begin) <= s).map(|(t, _)| *t).unwrap_or(path[0].0)
}

/// Walks contiguous segments from `start` along `path`. Returns the last present segment (if any)
/// and whether any segment exists beyond the first missing one (a gap).
pub(crate) fn contiguous(
    inv: &WalInventory,
    path: &[(TimelineId, Lsn)],
    start: SegNo,
    seg: WalSegSize,
) -> (Option<(SegNo, DateTime<Utc>)>, bool) {
    let mut last = None;
    let mut s = start;
    loop {
        let t = tli_for(path, s, seg);
        match inv.segments.get(&t).and_then(|m| m.get(&s)) {
            Some(when) => last = Some((s, *when)),
            None => break,
        }
        s = SegNo(s.0 + 1);
    }
    let gap = path.iter().any(|(t, _)| inv.segments.get(t).is_some_and(|m| m.range(s..).next().is_some()));
    (last, gap)
}

/// What the first step settled: the timeline to recover along, and the backups usable on it.
struct Walk<'a> {
    inv: &'a WalInventory,
    seg: WalSegSize,
    target_tli: TimelineId,
    /// The timelines from the oldest ancestor to `target_tli`, each with where it begins.
    path: Vec<(TimelineId, Lsn)>,
    /// Backups on the path, by consistency point.
    on_path: Vec<&'a BackupPoint>,
    /// `--backup REF`.
    forced: Option<&'a BackupPoint>,
    /// A `--target-name` that names a backup.
    named_backup: Option<&'a BackupPoint>,
    /// The restorable range, from the oldest usable backup.
    range: Range,
}

impl Walk<'_> {
    fn unreachable(&self, reason: String) -> PlanError {
        PlanError::Unreachable { reason, range: Box::new(self.range.clone()) }
    }
}

/// Step 1: the timeline (latest descendant, current, or a given one), the backups on its
/// history, and the restorable range.
fn choose_timeline<'a>(
    backups: &'a [BackupPoint],
    inv: &'a WalInventory,
    seg: WalSegSize,
    req: &Request,
) -> Result<Walk<'a>, PlanError> {
    if backups.is_empty() {
        return Err(PlanError::NoBackups);
    }
    let mut backups: Vec<&BackupPoint> = backups.iter().collect();
    backups.sort_by_key(|b| b.end);
    let forced = match &req.backup {
        Some(r) => {
            let b = if r.eq_ignore_ascii_case("latest") {
                backups.last().copied()
            } else {
                backups.iter().find(|b| b.id == *r || b.name.as_deref() == Some(r.as_str())).copied()
            };
            Some(b.ok_or_else(|| PlanError::UnknownBackup(r.clone()))?)
        }
        None => None,
    };
    // A --target-name that names a backup means that backup's consistency point.
    let named_backup = match &req.target {
        Target::Name(n) => backups.iter().find(|b| b.id == *n || b.name.as_deref() == Some(n.as_str())).copied(),
        _ => None,
    };
    let anchor_tli = forced.or(named_backup).map(|b| b.tli).unwrap_or_else(|| backups.last().expect("non-empty").tli);
    let target_tli = match req.timeline {
        TimelineChoice::Current => anchor_tli,
        TimelineChoice::Latest => latest_descendant(inv, anchor_tli),
        TimelineChoice::Id(t) => {
            if t != anchor_tli && !inv.histories.contains_key(&t) && !inv.segments.contains_key(&t) {
                return Err(PlanError::UnknownTimeline(t.0));
            }
            t
        }
    };
    let path = path_to(inv, target_tli);
    // Backups usable on this path: on one of its timelines, before that timeline switched away.
    let on_path: Vec<&BackupPoint> = backups
        .iter()
        .copied()
        .filter(|b| {
            path.iter()
                .enumerate()
                .any(|(i, (t, _))| *t == b.tli && path.get(i + 1).is_none_or(|(_, next_begin)| b.end <= *next_begin))
        })
        .collect();
    let Some(oldest) = on_path.first().copied() else {
        return Err(PlanError::Invalid(format!(
            "no backup lies on the history of timeline {}: choose another --target-timeline",
            target_tli.0
        )));
    };
    // The restorable range, from the oldest usable backup.
    let range_from = |b: &BackupPoint| -> Range {
        let (last, _) = contiguous(inv, &path, seg.segno(b.start), seg);
        let (latest_lsn, latest_time) = match last {
            Some((s, when)) => {
                let sums = inv.summaries_on(&path, seg.segno(b.start), s, seg);
                let last_commit = sums.iter().filter_map(|x| x.last_commit).max();
                let when = if sums.is_empty() { when } else { last_commit.unwrap_or(b.end_time) };
                (seg.start_lsn(SegNo(s.0 + 1)), when.max(b.end_time))
            }
            None => (b.end, b.end_time),
        };
        Range { earliest_time: b.end_time, earliest_lsn: b.end, latest_time, latest_lsn, timeline: target_tli }
    };
    let range = range_from(oldest);

    Ok(Walk { inv, seg, target_tli, path, on_path, forced, named_backup, range })
}

/// Step 2: the backup: the one forced or named, else the newest consistent before the target.
fn choose_backup<'a>(w: &Walk<'a>, req: &Request) -> Result<&'a BackupPoint, PlanError> {
    let (inv, on_path, target_tli) = (w.inv, &w.on_path, w.target_tli);
    let unreachable = |reason: String| w.unreachable(reason);
    let chosen: &BackupPoint =
        if let Some(b) = w.forced.or(w.named_backup) {
            if !on_path.iter().any(|x| x.id == b.id) {
                return Err(unreachable(format!("backup {} is not on the history of timeline {}", b.id, target_tli.0)));
            }
            b
        } else {
            match &req.target {
                Target::Time(t) => *on_path.iter().rev().find(|b| b.end_time <= *t).ok_or_else(|| {
                    unreachable(format!(
                        "{} is before the oldest backup's consistency point",
                        t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                    ))
                })?,
                Target::Lsn(l) => {
                    let l = *l;
                    *on_path.iter().rev().find(|b| b.end <= l).ok_or_else(|| {
                        unreachable(format!("LSN {l} is before the oldest backup's consistency point"))
                    })?
                }
                Target::Name(n) => {
                    // A named restore point: the newest backup consistent before it.
                    let found = inv
                        .summaries
                        .values()
                        .flat_map(|m| m.values())
                        .flat_map(|x| x.restore_points.iter())
                        .find(|rp| rp.name == *n)
                        .map(|rp| rp.lsn);
                    match found {
                        Some(lsn) => *on_path.iter().rev().find(|b| b.end <= lsn).ok_or_else(|| {
                            unreachable(format!(
                                "restore point {n:?} (LSN {lsn}) is before the oldest backup's consistency point"
                            ))
                        })?,
                        None if inv.summaries.is_empty() => on_path.last().expect("non-empty"),
                        None => {
                            let mut known: Vec<&str> = inv
                                .summaries
                                .values()
                                .flat_map(|m| m.values())
                                .flat_map(|x| x.restore_points.iter().map(|r| r.name.as_str()))
                                .collect();
                            known.dedup();
                            return Err(PlanError::Invalid(format!(
                                "no backup and no restore point is named {n:?} (restore points in the archive: {})",
                                if known.is_empty() { "none".to_string() } else { known.join(", ") }
                            )));
                        }
                    }
                }
                _ => on_path.last().expect("non-empty"),
            }
        };
    Ok(chosen)
}

/// Step 3: the WAL from the backup to the target is archived on the path, and the target is
/// inside the archived range; what PostgreSQL is told.
fn check_target(w: &Walk<'_>, chosen: &BackupPoint, req: &Request, now: DateTime<Utc>) -> Result<Plan, PlanError> {
    let (inv, seg, path, target_tli, named_backup) = (w.inv, w.seg, &w.path, w.target_tli, w.named_backup);
    let unreachable = |reason: String| w.unreachable(reason);
    let range = w.range.clone();
    let mut notes = Vec::new();
    let start_seg = seg.segno(chosen.start);
    let end_seg = seg.segno(Lsn(chosen.end.0.saturating_sub(1).max(chosen.start.0)));
    let (last, gap) = contiguous(inv, path, start_seg, seg);
    let Some((last_seg, last_time)) = last.filter(|(s, _)| *s >= end_seg) else {
        return Err(unreachable(format!(
            "the WAL backup {} needs to become consistent ({} on timeline {}) is missing from the archive",
            chosen.id,
            walnut_pg::names::SegName::new(tli_for(path, end_seg, seg), end_seg, seg),
            tli_for(path, end_seg, seg).0
        )));
    };
    let archive_end_lsn = seg.start_lsn(SegNo(last_seg.0 + 1));
    let sums = inv.summaries_on(path, start_seg, last_seg, seg);
    // The last archived commit decides the idle case exactly when summaries exist.
    let last_time = if sums.is_empty() {
        last_time
    } else {
        sums.iter().filter_map(|x| x.last_commit).max().unwrap_or(chrono::DateTime::<Utc>::MIN_UTC)
    };
    let missing_name = |s: SegNo| walnut_pg::names::SegName::new(tli_for(path, s, seg), s, seg).to_string();

    let recovery_target = match &req.target {
        Target::Latest => {
            if gap {
                notes.push(format!(
                    "the archive has a gap after {}: recovery stops there (WAL after the gap cannot be replayed)",
                    missing_name(last_seg)
                ));
            }
            RecoveryTarget::EndOfArchive
        }
        Target::Immediate => RecoveryTarget::Immediate,
        Target::Name(n) if named_backup.is_some() => {
            notes.push(format!("{n:?} is backup {}: restoring to its consistency point", chosen.id));
            RecoveryTarget::Immediate
        }
        Target::Name(n) => RecoveryTarget::Name(n.clone()),
        Target::Xid(x) => {
            let span = |v: &[&crate::summary::SegmentSummary]| {
                let lo = v.iter().filter_map(|s| s.xid_min).min()?;
                Some((lo, v.iter().filter_map(|s| s.xid_max).max()?))
            };
            // Everything archived on the path after the backup, gaps or not.
            let all: Vec<&crate::summary::SegmentSummary> = path
                .iter()
                .filter_map(|(t, _)| inv.summaries.get(t))
                .flat_map(|m| m.range(start_seg..).map(|(_, v)| v))
                .collect();
            if let Some((lo, hi)) = span(&all)
                && (*x < lo || *x > hi)
            {
                return Err(unreachable(format!(
                    "transaction {x} is not in the archived WAL after backup {} (archived transactions {lo} to {hi})",
                    chosen.id
                )));
            }
            if gap && span(&sums).is_none_or(|(_, hi)| *x > hi) {
                return Err(unreachable(format!(
                    "transaction {x} is beyond a gap in the archive (first missing segment {})",
                    missing_name(SegNo(last_seg.0 + 1))
                )));
            }
            RecoveryTarget::Xid(*x)
        }
        Target::Lsn(l) => {
            let lsn = *l;
            if lsn > archive_end_lsn {
                let why = if gap {
                    format!(
                        "LSN {lsn} is beyond a gap in the archive (first missing segment {})",
                        missing_name(SegNo(last_seg.0 + 1))
                    )
                } else {
                    format!("LSN {lsn} is after the end of the archive")
                };
                return Err(unreachable(why));
            }
            if lsn < chosen.end {
                return Err(unreachable(format!(
                    "LSN {lsn} is before backup {}'s consistency point {}",
                    chosen.id, chosen.end
                )));
            }
            RecoveryTarget::Lsn(lsn)
        }
        Target::Time(t) => {
            if *t < chosen.end_time {
                return Err(unreachable(format!(
                    "{} is before backup {}'s consistency point",
                    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    chosen.id
                )));
            }
            if *t > now {
                return Err(PlanError::Invalid(format!(
                    "target time {} is in the future",
                    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                )));
            }
            if *t > last_time {
                if gap {
                    return Err(unreachable(format!(
                        "{} is beyond a gap in the archive (first missing segment {})",
                        t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        missing_name(SegNo(last_seg.0 + 1))
                    )));
                }
                // Pin the end: the last whole record of the last archived segment (summaries
                // record it). Without one, only the unpinned end of the archive is possible.
                let last_summary = inv.summary(tli_for(path, last_seg, seg), last_seg);
                let pin = last_summary.and_then(|_| sums.iter().filter_map(|x| x.last_record).max());
                notes.push(format!(
                    "{} is after the last archived transaction ({}): that is the end of the archive, so walnut recovers to it{}",
                    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    last_time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                    match pin {
                        Some(l) => format!(" as it is now (up to the record at {l}; WAL archived later is not replayed)"),
                        None => format!(
                            " (the summary of {} does not say where its last record begins, so WAL archived after this plan would be replayed too)",
                            missing_name(last_seg)
                        ),
                    }
                ));
                match pin {
                    Some(l) => RecoveryTarget::PinnedEnd(l),
                    None => RecoveryTarget::EndOfArchive,
                }
            } else {
                RecoveryTarget::Time(*t)
            }
        }
    };
    let segments_to = match &recovery_target {
        RecoveryTarget::Immediate => end_seg,
        RecoveryTarget::Lsn(l) => seg.segno(*l).max(end_seg).min(last_seg),
        _ => last_seg,
    };
    Ok(Plan {
        backup_id: chosen.id.clone(),
        backup_name: chosen.name.clone(),
        backup_timeline: chosen.tli,
        backup_end_lsn: chosen.end,
        target_timeline: target_tli,
        recovery_target,
        first_segment_lsn: seg.start_lsn(start_seg),
        last_segment_lsn: seg.start_lsn(segments_to),
        segments: segments_to.0 - start_seg.0 + 1,
        restorable: range,
        notes,
    })
}

pub fn plan(
    backups: &[BackupPoint],
    inv: &WalInventory,
    seg: WalSegSize,
    req: &Request,
    now: DateTime<Utc>,
) -> Result<Plan, PlanError> {
    let walk = choose_timeline(backups, inv, seg, req)?;
    let chosen = choose_backup(&walk, req)?;
    check_target(&walk, chosen, req, now)
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
