//! The planner's table tests (a file of their own to keep plan.rs readable).

use super::*;
use chrono::TimeZone;

const SEG: WalSegSize = WalSegSize::DEFAULT;

fn t(min: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap() + chrono::Duration::minutes(min)
}
fn seg_lsn(s: u64) -> Lsn {
    SEG.start_lsn(SegNo(s))
}
fn backup(id: &str, tli: u32, start_seg: u64, end_time: i64) -> BackupPoint {
    BackupPoint {
        id: id.into(),
        name: Some(format!("name-{id}")),
        tli: TimelineId(tli),
        start: Lsn(seg_lsn(start_seg).0 + 0x28),
        end: Lsn(seg_lsn(start_seg).0 + 0x100),
        end_time: t(end_time),
    }
}
/// Segments `from..=to` on `tli`, segment s stored at minute s.
fn inv(ranges: &[(u32, u64, u64)]) -> WalInventory {
    let mut i = WalInventory::default();
    for &(tli, from, to) in ranges {
        let m = i.segments.entry(TimelineId(tli)).or_default();
        for s in from..=to {
            m.insert(SegNo(s), t(s as i64));
        }
    }
    i
}
fn req(target: Target) -> Request {
    Request { target, backup: None, timeline: TimelineChoice::Latest }
}

#[test]
fn picks_the_newest_backup_before_a_time_target() {
    let b = [backup("A", 1, 2, 2), backup("B", 1, 5, 5)];
    let i = inv(&[(1, 2, 10)]);
    let p = plan(&b, &i, SEG, &req(Target::Time(t(4))), t(100)).unwrap();
    assert_eq!(p.backup_id, "A");
    assert_eq!(p.recovery_target, RecoveryTarget::Time(t(4)));
    let p = plan(&b, &i, SEG, &req(Target::Time(t(7))), t(100)).unwrap();
    assert_eq!(p.backup_id, "B");
    let p = plan(&b, &i, SEG, &req(Target::Latest), t(100)).unwrap();
    assert_eq!((p.backup_id.as_str(), p.recovery_target.clone()), ("B", RecoveryTarget::EndOfArchive));
    assert_eq!(p.segments, 6);
}

#[test]
fn refuses_targets_before_the_oldest_backup_with_the_range() {
    let b = [backup("A", 1, 2, 2)];
    let i = inv(&[(1, 2, 10)]);
    let e = plan(&b, &i, SEG, &req(Target::Time(t(1))), t(100)).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("before the oldest backup") && msg.contains("earliest:") && msg.contains("latest:"), "{msg}");
    let e = plan(&b, &i, SEG, &req(Target::Lsn(Lsn(0x1000000))), t(100)).unwrap_err();
    assert!(e.to_string().contains("before the oldest backup"), "{e}");
}

#[test]
fn time_after_the_archive_is_the_end_of_the_archive_unless_there_is_a_gap() {
    let b = [backup("A", 1, 2, 2)];
    let p = plan(&b, &inv(&[(1, 2, 10)]), SEG, &req(Target::Time(t(50))), t(100)).unwrap();
    assert_eq!(p.recovery_target, RecoveryTarget::EndOfArchive, "no summaries: nothing to pin to");
    assert!(p.notes[0].contains("end of the archive") && p.notes[0].contains("would be replayed"), "{:?}", p.notes);
    // With summaries, the last commit decides: a target after it is the end of the archive.
    let mut with = inv(&[(1, 2, 10)]);
    let mut sum = crate::summary::SegmentSummary {
        last_commit: Some(t(4)),
        xid_min: Some(700),
        xid_max: Some(800),
        ..Default::default()
    };
    sum.restore_points.push(crate::summary::RestorePoint {
        name: "rp".into(),
        time: Some(t(3)),
        lsn: Lsn(seg_lsn(3).0 + 0x50),
    });
    with.summaries.entry(TimelineId(1)).or_default().insert(SegNo(3), sum);
    // Summaries without the last segment's: not pinned.
    let p = plan(&b, &with, SEG, &req(Target::Time(t(6))), t(100)).unwrap();
    assert_eq!(p.recovery_target, RecoveryTarget::EndOfArchive);
    // With it: pinned to the last record archived now, so later WAL is not replayed.
    let mut pinned = with.clone();
    let last = crate::summary::SegmentSummary { last_record: Some(Lsn(seg_lsn(10).0 + 0x1234)), ..Default::default() };
    pinned.summaries.entry(TimelineId(1)).or_default().insert(SegNo(10), last);
    let p = plan(&b, &pinned, SEG, &req(Target::Time(t(6))), t(100)).unwrap();
    assert_eq!(p.recovery_target, RecoveryTarget::PinnedEnd(Lsn(seg_lsn(10).0 + 0x1234)));
    assert!(p.notes[0].contains("not replayed"), "{:?}", p.notes);
    assert_eq!(p.last_segment_lsn, seg_lsn(10));
    let p = plan(&b, &with, SEG, &req(Target::Time(t(3))), t(100)).unwrap();
    assert_eq!(p.recovery_target, RecoveryTarget::Time(t(3)));
    let p = plan(&b, &with, SEG, &req(Target::Name("rp".into())), t(100)).unwrap();
    assert_eq!(p.recovery_target, RecoveryTarget::Name("rp".into()));
    let e = plan(&b, &with, SEG, &req(Target::Name("nope".into())), t(100)).unwrap_err().to_string();
    assert!(e.contains("rp"), "lists known restore points: {e}");
    assert!(plan(&b, &with, SEG, &req(Target::Xid(750)), t(100)).is_ok());
    let e = plan(&b, &with, SEG, &req(Target::Xid(9000)), t(100)).unwrap_err().to_string();
    assert!(e.contains("700 to 800"), "{e}");
    let gappy = inv(&[(1, 2, 6), (1, 8, 10)]);
    let e = plan(&b, &gappy, SEG, &req(Target::Time(t(9))), t(100)).unwrap_err().to_string();
    assert!(e.contains("beyond a gap") && e.contains("000000010000000000000007"), "{e}");
    let e = plan(&b, &gappy, SEG, &req(Target::Lsn(seg_lsn(9))), t(100)).unwrap_err().to_string();
    assert!(e.contains("beyond a gap"), "{e}");
    // Inside the contiguous part is fine.
    assert!(plan(&b, &gappy, SEG, &req(Target::Time(t(5))), t(100)).is_ok());
    let p = plan(&b, &gappy, SEG, &req(Target::Latest), t(100)).unwrap();
    assert!(p.notes[0].contains("gap"));
}

#[test]
fn missing_wal_for_consistency_is_refused() {
    let b = [backup("A", 1, 2, 2)];
    let e = plan(&b, &inv(&[(1, 3, 10)]), SEG, &req(Target::Latest), t(100)).unwrap_err().to_string();
    assert!(e.contains("missing"), "{e}");
}

#[test]
fn names_of_backups_restore_to_their_consistency_point() {
    let b = [backup("A", 1, 2, 2), backup("B", 1, 5, 5)];
    let i = inv(&[(1, 2, 10)]);
    let p = plan(&b, &i, SEG, &req(Target::Name("name-A".into())), t(100)).unwrap();
    assert_eq!((p.backup_id.as_str(), p.recovery_target.clone()), ("A", RecoveryTarget::Immediate));
    let p = plan(&b, &i, SEG, &req(Target::Name("B".into())), t(100)).unwrap();
    assert_eq!(p.backup_id, "B");
    let p = plan(&b, &i, SEG, &req(Target::Name("some-restore-point".into())), t(100)).unwrap();
    assert_eq!(p.recovery_target, RecoveryTarget::Name("some-restore-point".into()));
}

#[test]
fn follows_timelines_through_history_files() {
    // Timeline 2 branched from 1 in segment 6; timeline 1 continued to 9 (a fork that was abandoned).
    let b = [backup("A", 1, 2, 2)];
    let mut i = inv(&[(1, 2, 9), (2, 6, 12)]);
    i.histories
        .insert(TimelineId(2), vec![HistoryEntry { tli: TimelineId(1), switchpoint: Lsn(seg_lsn(6).0 + 0x500) }]);
    let p = plan(&b, &i, SEG, &req(Target::Latest), t(100)).unwrap();
    assert_eq!((p.target_timeline.0, p.segments), (2, 11), "segments 2..=12, switching timeline at 6");
    let p = plan(&b, &i, SEG, &Request { timeline: TimelineChoice::Current, ..req(Target::Latest) }, t(100)).unwrap();
    assert_eq!((p.target_timeline.0, p.segments), (1, 8));
    // A backup taken on timeline 2 is usable for timeline 2 but not for timeline 1.
    let b2 = [backup("A", 1, 2, 2), backup("C", 2, 10, 10)];
    let p = plan(&b2, &i, SEG, &req(Target::Latest), t(100)).unwrap();
    assert_eq!(p.backup_id, "C");
    let p = plan(&b2, &i, SEG, &Request { timeline: TimelineChoice::Id(TimelineId(1)), ..req(Target::Latest) }, t(100))
        .unwrap();
    assert_eq!(p.backup_id, "A");
}

#[test]
fn forced_backup_and_errors() {
    let b = [backup("A", 1, 2, 2), backup("B", 1, 5, 5)];
    let i = inv(&[(1, 2, 10)]);
    let p = plan(&b, &i, SEG, &Request { backup: Some("A".into()), ..req(Target::Latest) }, t(100)).unwrap();
    assert_eq!(p.backup_id, "A");
    assert!(matches!(
        plan(&b, &i, SEG, &Request { backup: Some("Z".into()), ..req(Target::Latest) }, t(100)),
        Err(PlanError::UnknownBackup(_))
    ));
    assert!(matches!(plan(&[], &i, SEG, &req(Target::Latest), t(100)), Err(PlanError::NoBackups)));
    assert!(plan(&b, &i, SEG, &req(Target::Time(t(200))), t(100)).unwrap_err().to_string().contains("future"));
}
