//! Retention planning at scale (run by `bench/agent.sh`): a synthetic inventory of N backups and
//! M WAL objects, one plan plus the WAL selection, timed. Prints one JSON line.
//!
//! `cargo run --release -p walnut-core --example retention_scale -- [backups] [wal_objects]`

use chrono::{Duration as Days, TimeZone, Utc};
use std::time::{Duration, Instant};
use walnut_core::layout;
use walnut_core::retention::{self, Candidate, Policy, Rule, State};
use walnut_pg::{Lsn, SegNo, TimelineId, WalFileName, WalSegSize, names::SegName};

fn main() {
    let mut args = std::env::args().skip(1);
    let backups: usize = args.next().map(|a| a.parse().expect("backups")).unwrap_or(10_000);
    let wal: u64 = args.next().map(|a| a.parse().expect("wal objects")).unwrap_or(1_000_000);
    let size = WalSegSize::DEFAULT;
    let t0 = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap();
    // Backups spread evenly over the WAL, one every `step` segments, a few FAILED and one RUNNING.
    let step = (wal / backups as u64).max(1);
    let cands: Vec<Candidate> = (0..backups)
        .map(|i| {
            let state = if i == backups - 1 {
                State::Running
            } else if i % 97 == 13 {
                State::Failed
            } else {
                State::Done
            };
            Candidate {
                id: walnut_core::backup::BackupId::parse(
                    &(t0 + Days::hours(i as i64)).format("%Y%m%dT%H%M%S").to_string(),
                )
                .expect("an ID"),
                state,
                time: t0 + Days::hours(i as i64),
                start: Lsn(size.bytes() * (i as u64 * step + 1)),
                parent: None,
            }
        })
        .collect();
    let keys: Vec<String> =
        (0..wal).map(|s| layout::wal_key(&WalFileName::Segment(SegName::new(TimelineId(1), SegNo(s), size)))).collect();
    let now = t0 + Days::hours(backups as i64);
    let policy = Policy { recovery_window: Duration::from_secs(30 * 86400), minimum_redundancy: 3 };

    let start = Instant::now();
    let plan = retention::plan(&cands, &Rule::Policy(policy), now);
    let planned = start.elapsed();
    let needed = plan.wal_needed_from;
    let wal_delete = retention::wal_to_delete(keys.iter().map(String::as_str), needed, size);
    let total = start.elapsed();
    // A RUNNING backup pins all WAL; without it, the old WAL goes. Time that case too.
    let done_only: Vec<Candidate> = cands.iter().filter(|c| c.state != State::Running).cloned().collect();
    let s2 = Instant::now();
    let plan2 = retention::plan(&done_only, &Rule::Policy(policy), now);
    let needed2 = plan2.wal_needed_from;
    let wal_delete2 = retention::wal_to_delete(keys.iter().map(String::as_str), needed2, size);
    let total2 = s2.elapsed();
    println!(
        "{}",
        serde_json::json!({
            "backups": backups,
            "wal_objects": wal,
            "plan_ms": planned.as_secs_f64() * 1e3,
            "plan_and_wal_ms": total.as_secs_f64() * 1e3,
            "backups_deleted": plan.backups.iter().filter(|d| !d.keep).count(),
            "wal_deleted": wal_delete.len(),
            "no_running": {
                "plan_and_wal_ms": total2.as_secs_f64() * 1e3,
                "backups_deleted": plan2.backups.iter().filter(|d| !d.keep).count(),
                "wal_deleted": wal_delete2.len(),
            }
        })
    );
}
