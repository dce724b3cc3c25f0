//! Retention as a pure function of (inventory, policy, now): which backups to keep and which to
//! delete, each with its reason, and the WAL no kept backup needs.
//!
//! Invariants (property-tested): the newest DONE backup is always kept; every RUNNING backup is
//! kept; at least `minimum_redundancy` DONE backups are kept when that many exist; every moment
//! inside the recovery window stays restorable (the newest backup at or before the window's start
//! is kept too); no WAL segment at or after the oldest kept backup's start is deleted; every
//! backup a kept incremental backup depends on (its chain) is kept, with that reason.
//!
//! Time arithmetic saturates: a window reaching back before the calendar's start keeps everything
//! inside it, never an overflow panic.

use chrono::{DateTime, Utc};
use serde::Serialize;
use std::time::Duration;
use walnut_pg::{Lsn, SegNo, WalSegSize};

/// A backup's state, as listings say it (one enum for the catalog and for retention).
pub use crate::backup::Status as State;

#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: crate::backup::BackupId,
    pub state: State,
    /// Consistency time (DONE) or last sign of life (RUNNING/FAILED).
    pub time: DateTime<Utc>,
    pub start: Lsn,
    /// An incremental backup's parent (it cannot be restored without it).
    pub parent: Option<crate::backup::BackupId>,
}

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub recovery_window: Duration,
    pub minimum_redundancy: u32,
}

/// What to do with backups, for the manual commands.
#[derive(Debug, Clone)]
pub enum Rule {
    Policy(Policy),
    /// Keep the N newest DONE backups.
    Retain(u32),
    /// Delete DONE backups consistent before this time (never the newest).
    Before(DateTime<Utc>),
    /// Only failed leftovers and unneeded WAL.
    Garbage,
}

#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub id: crate::backup::BackupId,
    pub keep: bool,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct RetentionPlan {
    pub backups: Vec<Decision>,
    /// WAL segments before this LSN are not needed by any kept backup.
    pub wal_needed_from: Option<Lsn>,
}

/// Failed backups' leftovers are removed once older than this.
pub const FAILED_GRACE: Duration = Duration::from_secs(3600);

pub fn plan(candidates: &[Candidate], rule: &Rule, now: DateTime<Utc>) -> RetentionPlan {
    let mut done: Vec<&Candidate> = candidates.iter().filter(|c| c.state == State::Done).collect();
    done.sort_by_key(|c| c.time);
    let newest = done.last().map(|c| c.id.clone());
    // The newest backup at or before the window's start anchors the window (policy only).
    let window_start = match rule {
        Rule::Policy(p) => crate::schedule::saturating_sub(now, p.recovery_window),
        _ => DateTime::<Utc>::MIN_UTC,
    };
    let anchor = match rule {
        Rule::Policy(_) => done.iter().rev().find(|b| b.time <= window_start).map(|b| b.id.clone()),
        _ => None,
    };
    let mut decisions = Vec::with_capacity(candidates.len());
    for (i, c) in done.iter().enumerate() {
        let rank = done.len() - i; // 1 = newest
        let (keep, reason) = if Some(&c.id) == newest.as_ref() {
            (true, "the newest DONE backup is always kept".to_string())
        } else {
            match rule {
                Rule::Garbage => (true, "garbage collection keeps every DONE backup".into()),
                Rule::Retain(n) => {
                    if rank as u32 <= (*n).max(1) {
                        (true, format!("one of the {} newest backups", n.max(&1)))
                    } else {
                        (false, format!("older than the {} newest backups", n.max(&1)))
                    }
                }
                Rule::Before(t) => {
                    if c.time < *t {
                        (false, format!("consistent before {}", t.to_rfc3339()))
                    } else {
                        (true, format!("consistent at or after {}", t.to_rfc3339()))
                    }
                }
                Rule::Policy(p) => {
                    if c.time > window_start {
                        (true, "inside the recovery window".into())
                    } else if Some(&c.id) == anchor.as_ref() {
                        (true, "needed to restore to the start of the recovery window".into())
                    } else if rank as u32 <= p.minimum_redundancy {
                        (true, format!("kept for minimum_redundancy = {}", p.minimum_redundancy))
                    } else {
                        (false, "older than the recovery window and not needed for minimum redundancy".into())
                    }
                }
            }
        };
        decisions.push(Decision { id: c.id.clone(), keep, reason });
    }
    // A kept incremental backup keeps its chain, whatever the rule said of its members.
    let parents: std::collections::HashMap<&str, &crate::backup::BackupId> =
        done.iter().filter_map(|c| c.parent.as_ref().map(|p| (c.id.as_str(), p))).collect();
    let kept_now: Vec<crate::backup::BackupId> = decisions.iter().filter(|d| d.keep).map(|d| d.id.clone()).collect();
    for child in kept_now {
        let mut at = child.as_str().to_string();
        let mut seen = std::collections::HashSet::new();
        while let Some(parent) = parents.get(at.as_str()) {
            if !seen.insert(parent.as_str().to_string()) {
                break;
            }
            if let Some(d) = decisions.iter_mut().find(|d| &d.id == *parent)
                && !d.keep
            {
                d.keep = true;
                d.reason = format!("needed by incremental backup {child} (in its chain)");
            }
            at = parent.as_str().to_string();
        }
    }
    for c in candidates.iter().filter(|c| c.state != State::Done) {
        let (keep, reason) = match c.state {
            State::Running => (true, "running".to_string()),
            _ if now.signed_duration_since(c.time).to_std().is_ok_and(|age| age > FAILED_GRACE) => {
                (false, "leftovers of a failed backup".to_string())
            }
            _ => (true, "failed recently: kept for inspection during the grace period".to_string()),
        };
        decisions.push(Decision { id: c.id.clone(), keep, reason });
    }
    // A RUNNING backup pins all WAL: readers do not know its start (its marker is written before
    // pg_backup_start), and the WAL it needs may be arriving right now.
    let kept: std::collections::HashSet<&str> = decisions.iter().filter(|d| d.keep).map(|d| d.id.as_str()).collect();
    let oldest_kept_start = candidates
        .iter()
        .filter(|c| kept.contains(c.id.as_str()) && c.state != State::Failed)
        .map(|c| if c.state == State::Running { Lsn(0) } else { c.start })
        .min();
    RetentionPlan { backups: decisions, wal_needed_from: oldest_kept_start }
}

/// Whether a WAL segment (any timeline) can go: it ends before everything a kept backup needs.
pub fn wal_deletable(segno: SegNo, needed_from: Option<Lsn>, size: WalSegSize) -> bool {
    match needed_from {
        Some(l) => segno < size.segno(l),
        None => false,
    }
}

/// The WAL objects (keys under `wal/`) that no kept backup needs, sorted, and the summary index
/// objects (under `wal-index/`) all of whose segments go. History files stay: they are tiny and
/// describe every timeline.
pub fn wal_to_delete<'a>(
    keys: impl IntoIterator<Item = &'a str>,
    needed_from: Option<Lsn>,
    size: WalSegSize,
) -> Vec<String> {
    use walnut_pg::WalFileName;
    if needed_from.is_none() {
        return Vec::new();
    }
    let mut out: Vec<String> = keys
        .into_iter()
        .filter(|key| match crate::layout::parse_wal_key(key) {
            Some(WalFileName::Segment(s)) | Some(WalFileName::Partial(s)) | Some(WalFileName::Backup(s, _)) => {
                s.segno(size).is_some_and(|segno| wal_deletable(segno, needed_from, size))
            }
            Some(_) => false,
            None => crate::layout::parse_wal_index_key(key)
                .and_then(|(_, last)| last.segno(size))
                .is_some_and(|segno| wal_deletable(segno, needed_from, size)),
        })
        .map(str::to_string)
        .collect();
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn day(d: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::days(d)
    }
    fn c(id: &str, d: i64, state: State) -> Candidate {
        Candidate { id: id.into(), state, time: day(d), start: Lsn((d as u64 + 1) << 24), parent: None }
    }
    fn kept(p: &RetentionPlan) -> Vec<&str> {
        let mut v: Vec<&str> = p.backups.iter().filter(|d| d.keep).map(|d| d.id.as_str()).collect();
        v.sort();
        v
    }
    const WEEK: Policy = Policy { recovery_window: Duration::from_secs(7 * 86400), minimum_redundancy: 1 };

    #[test]
    fn window_keeps_its_anchor() {
        let bs = [c("a", 0, State::Done), c("b", 5, State::Done), c("c", 10, State::Done), c("d", 15, State::Done)];
        // now = day 20: window starts day 13; c (day 10) anchors it.
        let p = plan(&bs, &Rule::Policy(WEEK), day(20));
        assert_eq!(kept(&p), ["c", "d"]);
        assert_eq!(p.wal_needed_from, Some(Lsn(11 << 24)));
        assert!(p.backups.iter().all(|d| !d.reason.is_empty()));
    }

    #[test]
    fn redundancy_and_rules() {
        let bs = [c("a", 0, State::Done), c("b", 5, State::Done), c("c", 10, State::Done)];
        let p = plan(&bs, &Rule::Policy(Policy { minimum_redundancy: 3, ..WEEK }), day(100));
        assert_eq!(kept(&p), ["a", "b", "c"]);
        assert_eq!(kept(&plan(&bs, &Rule::Retain(1), day(100))), ["c"]);
        assert_eq!(kept(&plan(&bs, &Rule::Retain(0), day(100))), ["c"], "never below one");
        assert_eq!(kept(&plan(&bs, &Rule::Before(day(6)), day(100))), ["c"]);
        assert_eq!(kept(&plan(&bs, &Rule::Before(day(100)), day(100))), ["c"], "never the newest");
        assert_eq!(kept(&plan(&bs, &Rule::Garbage, day(100))), ["a", "b", "c"]);
    }

    #[test]
    fn a_kept_incremental_keeps_its_chain_with_the_reason() {
        let mut bs = [c("f", 0, State::Done), c("i1", 1, State::Done), c("i2", 2, State::Done), c("g", 3, State::Done)];
        bs[1].parent = Some("f".into());
        bs[2].parent = Some("i1".into());
        // g is a full backup and the newest; i2 is kept as one of the 2 newest: its chain stays.
        let p = plan(&bs, &Rule::Retain(2), day(10));
        assert_eq!(kept(&p), ["f", "g", "i1", "i2"]);
        let why = |id: &str| p.backups.iter().find(|d| d.id == id).unwrap().reason.clone();
        assert!(why("f").contains("needed by incremental backup i2"), "{}", why("f"));
        assert_eq!(p.wal_needed_from, Some(Lsn(1 << 24)), "the chain's WAL from the full backup's start");
        // Once nothing kept depends on them, they go.
        let p = plan(&bs, &Rule::Retain(1), day(10));
        assert_eq!(kept(&p), ["g"]);
    }

    #[test]
    fn running_is_kept_failed_goes_after_grace() {
        let mut bs = vec![c("a", 0, State::Done), c("r", 1, State::Running), c("f", 1, State::Failed)];
        let p = plan(&bs, &Rule::Retain(1), day(1) + chrono::Duration::minutes(5));
        assert_eq!(kept(&p), ["a", "f", "r"]);
        bs[2].time = day(0);
        let p = plan(&bs, &Rule::Retain(1), day(1));
        assert_eq!(kept(&p), ["a", "r"]);
    }

    #[test]
    fn wal_and_index_objects_go_when_no_kept_backup_needs_them() {
        use crate::layout::{wal_index_key, wal_key};
        use walnut_pg::{TimelineId, WalFileName, names::SegName};
        let size = WalSegSize::DEFAULT;
        let n = |s: u64| SegName::new(TimelineId(1), SegNo(s), size);
        let keys = [
            wal_key(&WalFileName::Segment(n(1))),
            wal_key(&WalFileName::Segment(n(2))),
            wal_key(&WalFileName::History(TimelineId(2))),
            wal_index_key(&n(1), &n(2)),
            wal_index_key(&n(1), &n(3)),
            "wal/00000001/unrelated".to_string(),
        ];
        let gone = wal_to_delete(keys.iter().map(String::as_str), Some(size.start_lsn(SegNo(3))), size);
        assert_eq!(gone, [keys[3].clone(), keys[0].clone(), keys[1].clone()]);
        assert!(wal_to_delete(keys.iter().map(String::as_str), None, size).is_empty());
    }

    #[test]
    fn a_running_backup_pins_all_wal() {
        // Its start is unknown (Lsn::MAX from a reader); the first backup of a repository runs.
        let mut r = c("r", 1, State::Running);
        r.start = Lsn(u64::MAX);
        for bs in [vec![r.clone()], vec![c("a", 0, State::Done), r]] {
            let p = plan(&bs, &Rule::Policy(WEEK), day(30));
            let needed = p.wal_needed_from;
            assert!(!wal_deletable(SegNo(1), needed, WalSegSize::DEFAULT), "{p:?}");
        }
    }

    /// A recovery window longer than the calendar reaches back to its start: everything is inside
    /// it, and nothing panics.
    #[test]
    fn huge_recovery_windows_keep_everything() {
        let bs = [c("a", 0, State::Done), c("b", 5, State::Done), c("f", 1, State::Failed)];
        for window in [
            Duration::MAX,
            Duration::from_secs(u64::MAX / 2),
            Duration::from_secs(i64::MAX as u64 / 1000 + 1),
            Duration::from_secs(300_000 * 366 * 86400),
        ] {
            let p = plan(&bs, &Rule::Policy(Policy { recovery_window: window, minimum_redundancy: 0 }), day(100));
            assert_eq!(kept(&p), ["a", "b"], "{window:?}");
        }
        // At the edges of time too.
        for now in [DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC] {
            let p = plan(&bs, &Rule::Policy(Policy { recovery_window: Duration::MAX, minimum_redundancy: 0 }), now);
            assert!(p.backups.iter().any(|d| d.keep), "{now}");
        }
    }

    proptest! {
        #[test]
        fn invariants(days in proptest::collection::vec((0i64..400, 0u8..10), 1..30), window in 1u64..60, redundancy in 0u32..5, now_day in 0i64..500) {
            let bs: Vec<Candidate> = days.iter().enumerate().map(|(i, (d, s))| {
                let state = match s { 0 => State::Running, 1 => State::Failed, _ => State::Done };
                // Some DONE backups are incrementals of an earlier one.
                let parent = (*s >= 7 && i > 0).then(|| format!("b{}", (*s as usize) % i).as_str().into());
                Candidate { id: format!("b{i}").as_str().into(), state, time: day(*d), start: Lsn((*d as u64 + 1) << 24), parent }
            }).collect();
            let policy = Policy { recovery_window: Duration::from_secs(window * 86400), minimum_redundancy: redundancy };
            let now = day(now_day.max(days.iter().map(|d| d.0).max().unwrap()));
            let p = plan(&bs, &Rule::Policy(policy), now);
            let keep = |id: &str| p.backups.iter().find(|d| d.id == id).unwrap().keep;
            let done: Vec<&Candidate> = bs.iter().filter(|c| c.state == State::Done).collect();
            if let Some(newest) = done.iter().max_by_key(|c| c.time) {
                // The newest (by time) is kept; ties share the time.
                prop_assert!(done.iter().filter(|c| c.time == newest.time).any(|c| keep(&c.id)));
            }
            for c in bs.iter().filter(|c| c.state == State::Running) {
                prop_assert!(keep(&c.id));
            }
            let kept_done = done.iter().filter(|c| keep(&c.id)).count();
            prop_assert!(kept_done >= (redundancy as usize).min(done.len()));
            // The window is restorable: some kept DONE backup is at or before the window start,
            // whenever any DONE backup is.
            let start = now - chrono::Duration::days(window as i64);
            if done.iter().any(|c| c.time <= start) {
                prop_assert!(done.iter().any(|c| c.time <= start && keep(&c.id)));
            }
            // No WAL a kept backup needs is deleted.
            let needed: Option<Lsn> = p.wal_needed_from;
            for c in bs.iter().filter(|c| keep(&c.id) && c.state != State::Failed) {
                prop_assert!(!wal_deletable(WalSegSize::DEFAULT.segno(c.start), needed, WalSegSize::DEFAULT));
            }
            if bs.iter().any(|c| c.state == State::Running) {
                prop_assert!(!wal_deletable(SegNo(0), needed, WalSegSize::DEFAULT), "a running backup pins WAL");
            }
            // A kept incremental's parent (when it is a DONE backup) is kept.
            for c in done.iter().filter(|c| keep(&c.id)) {
                if let Some(parent) = c.parent.as_ref().filter(|p| done.iter().any(|d| &d.id == *p)) {
                    prop_assert!(keep(parent), "{} kept, its parent {} not", c.id, parent);
                }
            }
        }
    }
}
