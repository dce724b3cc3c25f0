//! Retention of scheduled captures as a pure function: keep the newest capture of each of the
//! last N days, ISO weeks and months that have one (UTC), each decision with its reason.
//!
//! Invariants (tested): the newest DONE scheduled capture is kept; RUNNING captures are kept;
//! on-demand captures are never deleted by retention (their owner deletes them); a FAILED
//! capture's leftovers are deleted once [`FAILED_GRACE`] old.

use super::Status;
use chrono::{DateTime, Datelike, Utc};
use serde::Serialize;
use std::collections::BTreeSet;
use std::time::Duration;

/// How many periods keep their newest capture (0: none of that kind).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Keep {
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
}

impl Keep {
    pub fn is_off(&self) -> bool {
        self.daily == 0 && self.weekly == 0 && self.monthly == 0
    }
}

#[derive(Debug, Clone)]
pub struct Candidate {
    pub id: String,
    pub status: Status,
    /// A DONE capture's start; a FAILED one's last sign of life.
    pub time: DateTime<Utc>,
    pub scheduled: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub id: String,
    pub keep: bool,
    pub reason: String,
}

/// FAILED captures are kept this long (to read their error), then their leftovers go.
pub const FAILED_GRACE: Duration = Duration::from_secs(3600);

pub fn plan(candidates: &[Candidate], keep: &Keep, now: DateTime<Utc>) -> Vec<Decision> {
    let mut scheduled: Vec<&Candidate> =
        candidates.iter().filter(|c| c.status == Status::Done && c.scheduled).collect();
    scheduled.sort_by(|a, b| b.time.cmp(&a.time).then(b.id.cmp(&a.id)));
    let mut reasons: std::collections::HashMap<&str, Vec<String>> = Default::default();
    if let Some(newest) = scheduled.first() {
        reasons.entry(&newest.id).or_default().push("the newest scheduled capture".into());
    }
    type PeriodOf = fn(&DateTime<Utc>) -> String;
    let periods: [(&str, u32, PeriodOf); 3] = [
        ("daily", keep.daily, |t| t.format("%Y-%m-%d").to_string()),
        ("weekly", keep.weekly, |t| {
            let w = t.iso_week();
            format!("{}-W{:02}", w.year(), w.week())
        }),
        ("monthly", keep.monthly, |t| t.format("%Y-%m").to_string()),
    ];
    for (kind, n, period_of) in periods {
        let mut seen = BTreeSet::new();
        for c in &scheduled {
            if seen.len() as u32 >= n {
                break;
            }
            let p = period_of(&c.time);
            if seen.insert(p.clone()) {
                reasons.entry(&c.id).or_default().push(format!("{kind}: the newest of {p} ({} of {n})", seen.len()));
            }
        }
    }
    let rule = format!("keep {} daily, {} weekly, {} monthly", keep.daily, keep.weekly, keep.monthly);
    let grace = chrono::Duration::from_std(FAILED_GRACE).unwrap_or_default();
    let mut out: Vec<Decision> = candidates
        .iter()
        .map(|c| {
            let (keep, reason) = match c.status {
                Status::Running => (true, "running".to_string()),
                Status::Failed if now - c.time >= grace => (false, "failed: its leftovers are removed".to_string()),
                Status::Failed => (true, "failed less than an hour ago (kept to read its error)".to_string()),
                Status::Done if !c.scheduled => {
                    (true, "taken on demand: retention keeps it (delete it with walnut logical delete)".to_string())
                }
                Status::Done => match reasons.get(c.id.as_str()) {
                    Some(r) => (true, r.join("; ")),
                    None => (false, format!("not the newest of a kept day, week or month ({rule})")),
                },
            };
            Decision { id: c.id.clone(), keep, reason }
        })
        .collect();
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn day(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
    }

    fn done(id: &str, t: DateTime<Utc>) -> Candidate {
        Candidate { id: id.into(), status: Status::Done, time: t, scheduled: true }
    }

    fn kept(plan: &[Decision]) -> Vec<&str> {
        plan.iter().filter(|d| d.keep).map(|d| d.id.as_str()).collect()
    }

    #[test]
    fn grandfather_father_son() {
        // Two captures a day for 70 days from 2026-01-01 (a Thursday), at 02:00 and 14:00.
        let mut c = Vec::new();
        for i in 0..70 {
            let d = day(2026, 1, 1, 2) + chrono::Duration::days(i);
            c.push(done(&format!("{}a", d.format("%Y%m%d")), d));
            c.push(done(&format!("{}b", d.format("%Y%m%d")), d + chrono::Duration::hours(12)));
        }
        let now = day(2026, 3, 12, 0);
        let p = plan(&c, &Keep { daily: 3, weekly: 2, monthly: 3 }, now);
        assert_eq!(p.len(), 140);
        // The last day is 2026-03-11: the three newest days keep their evening capture; the
        // newest of this ISO week (W11: Mon 9 March..) and last week (W10, ends Sun 8 March);
        // the newest of March, February, January.
        let want = ["20260131b", "20260228b", "20260308b", "20260309b", "20260310b", "20260311b"];
        assert_eq!(kept(&p), want);
        let newest = p.iter().find(|d| d.id == "20260311b").unwrap();
        assert!(newest.reason.contains("the newest scheduled capture"), "{}", newest.reason);
        assert!(newest.reason.contains("daily: the newest of 2026-03-11 (1 of 3)"), "{}", newest.reason);
        assert!(newest.reason.contains("weekly: the newest of 2026-W11 (1 of 2)"), "{}", newest.reason);
        assert!(newest.reason.contains("monthly: the newest of 2026-03 (1 of 3)"), "{}", newest.reason);
        let gone = p.iter().find(|d| d.id == "20260311a").unwrap();
        assert!(!gone.keep && gone.reason.contains("keep 3 daily, 2 weekly, 3 monthly"), "{}", gone.reason);
    }

    #[test]
    fn what_retention_never_deletes_and_failed_leftovers() {
        let now = day(2026, 3, 1, 12);
        let mut on_demand = done("manual", day(2020, 1, 1, 0));
        on_demand.scheduled = false;
        let c = vec![
            done("old", day(2026, 1, 1, 2)),
            done("newest", day(2026, 2, 1, 2)),
            on_demand,
            Candidate { id: "running".into(), status: Status::Running, time: now, scheduled: true },
            Candidate {
                id: "failed-old".into(),
                status: Status::Failed,
                time: now - chrono::Duration::hours(2),
                scheduled: true,
            },
            Candidate {
                id: "failed-new".into(),
                status: Status::Failed,
                time: now - chrono::Duration::minutes(5),
                scheduled: true,
            },
        ];
        // Nothing kept by any period: still the newest, the on-demand and the running ones.
        let p = plan(&c, &Keep::default(), now);
        assert_eq!(kept(&p), ["failed-new", "manual", "newest", "running"]);
        assert!(p.iter().find(|d| d.id == "failed-old").unwrap().reason.contains("leftovers"));
        // No scheduled capture at all: nothing to keep by period, nothing panics.
        assert!(plan(&[], &Keep { daily: 7, weekly: 4, monthly: 12 }, now).is_empty());
    }

    #[test]
    fn periods_without_captures_do_not_count() {
        // Captures on three days a month apart: keep 2 daily keeps two of them (the periods
        // that have captures), not only what the last two calendar days hold.
        let c = vec![done("a", day(2026, 1, 1, 2)), done("b", day(2026, 2, 1, 2)), done("c", day(2026, 3, 1, 2))];
        let p = plan(&c, &Keep { daily: 2, weekly: 0, monthly: 0 }, day(2026, 3, 20, 0));
        assert_eq!(kept(&p), ["b", "c"]);
    }
}
