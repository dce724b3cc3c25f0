//! walnut's WAL decoder against PostgreSQL's own `pg_waldump`, on WAL a real PostgreSQL 15
//! wrote under a mixed workload; and corrupt WAL refused by `wal-push`.

mod common;

use common::*;
use std::collections::BTreeMap;
use walnut_pg::walrec::{self, Event, XactKind};
use walnut_pg::{Lsn, WalFileName, WalSegSize};
use walnut_testkit::PgCluster;
use walnut_testkit::pg::PgOptions;

fn waldump(pg: &PgCluster, start: Lsn, end: Lsn) -> String {
    pg_waldump(pg, start, end, &[])
}

#[test]
fn decoder_agrees_with_pg_waldump() {
    let pg = PgCluster::start(PgOptions {
        wal_segsize_mb: 1,
        extra_conf: "max_prepared_transactions = 5\nwal_keep_size = 512MB\n".into(),
        ..Default::default()
    });
    pg.sql("CREATE TABLE t(id int primary key, v text)");
    pg.sql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 5000) g");
    pg.sql("UPDATE t SET v = v || 'x' WHERE id % 3 = 0");
    pg.sql("DELETE FROM t WHERE id % 7 = 0");
    pg.sql("SELECT pg_create_restore_point('before-migration')");
    pg.sql("ALTER TABLE t ADD COLUMN w int DEFAULT 7");
    pg.sql("CREATE INDEX ON t(v)");
    pg.sql("BEGIN; INSERT INTO t VALUES (100001, 'p1'); PREPARE TRANSACTION 'tx1'");
    pg.sql("COMMIT PREPARED 'tx1'");
    pg.sql("BEGIN; INSERT INTO t VALUES (100002, 'p2'); PREPARE TRANSACTION 'tx2'");
    pg.sql("ROLLBACK PREPARED 'tx2'");
    pg.sql("BEGIN; INSERT INTO t VALUES (100003, 'a'); ROLLBACK");
    pg.sql("SELECT pg_switch_wal()");
    pg.sql("INSERT INTO t SELECT g, repeat('y', 500) FROM generate_series(200000, 204000) g");
    pg.sql("SELECT pg_create_restore_point('after-load')");
    pg.sql("CHECKPOINT");
    pg.sql("SELECT pg_switch_wal()");
    pg.sql("INSERT INTO t VALUES (300000, 'tail')");

    let seg_size = WalSegSize::new(1 << 20).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(pg.pgdata.join("pg_wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24)
        .collect();
    // Only written segments: pg_wal also holds recycled files under future names.
    let current = pg.sql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())").trim().to_string();
    names.retain(|n| *n <= current);
    names.sort();
    assert!(names.len() >= 4, "{names:?}");
    let (mut total_records, mut total_commits, mut points, mut prepared_commits) = (0u64, 0u64, vec![], 0);
    // Every segment but the one being written.
    for w in names.windows(2) {
        let seg = WalFileName::parse(&w[0]).unwrap().segment().unwrap();
        let start = seg_size.start_lsn(seg.segno(seg_size).unwrap());
        let end = Lsn(start.0 + seg_size.bytes());
        let data = std::fs::read(pg.pgdata.join("pg_wal").join(&w[0])).unwrap();
        let next = std::fs::read(pg.pgdata.join("pg_wal").join(&w[1])).unwrap();
        let d = walrec::decode_segment(&data, start, Some(&next));
        assert_ne!(d.end, walrec::End::Invalid, "{}: {:?}", w[0], d.invalid_reason);

        // pg_waldump prints records that end by -e; ours are those that begin in the segment
        // (the last one completed from the next segment): end at our end of valid WAL.
        assert!(d.end_of_valid.0 + 8 > end.0 || d.end == walrec::End::Switch, "{}: {:?}", w[0], d.end);
        let dump = waldump(&pg, start, d.end_of_valid);
        let mut theirs: BTreeMap<String, u64> = BTreeMap::new();
        let mut their_commits = vec![];
        let mut their_points = vec![];
        for line in dump.lines().filter(|l| l.starts_with("rmgr:")) {
            let rmgr = line.split_whitespace().nth(1).unwrap().to_string();
            *theirs.entry(rmgr.clone()).or_default() += 1;
            let desc = line.split("desc: ").nth(1).unwrap_or("");
            if rmgr == "Transaction" && (desc.starts_with("COMMIT ") || desc.starts_with("COMMIT_PREPARED ")) {
                // "COMMIT 2026-11-22 04:01:02.123456 UTC; ..." or "COMMIT_PREPARED 5: 2026-..."
                let after = desc.split_once(' ').unwrap().1;
                let after = if desc.starts_with("COMMIT_PREPARED") { after.split_once(": ").unwrap().1 } else { after };
                their_commits.push(after[..26].to_string());
            }
            if rmgr == "XLOG" && desc.starts_with("RESTORE_POINT ") {
                let lsn: Lsn = line.split("lsn: ").nth(1).unwrap().split(',').next().unwrap().parse().unwrap();
                let lsn = lsn.to_string();
                their_points.push((desc["RESTORE_POINT ".len()..].trim().to_string(), lsn));
            }
        }
        let mut ours: BTreeMap<String, u64> = BTreeMap::new();
        for (id, n) in d.per_rmgr.iter().enumerate().filter(|(_, n)| **n > 0) {
            ours.insert(walrec::RMGR_NAMES.get(id).unwrap_or(&"?").to_string(), *n);
        }
        assert_eq!(ours, theirs, "records per resource manager in {}", w[0]);
        // The last record that begins here: where a pinned recovery target (inclusive) points.
        let their_last: Option<Lsn> = dump
            .lines()
            .filter(|l| l.starts_with("rmgr:"))
            .filter_map(|l| l.split("lsn: ").nth(1)?.split(',').next()?.trim().parse().ok())
            .next_back();
        assert_eq!(d.last_record, their_last, "the last record beginning in {}", w[0]);
        let our_commits: Vec<String> = d
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Xact { kind: XactKind::Commit | XactKind::CommitPrepared, time, .. } => {
                    let t = chrono::DateTime::from_timestamp_micros(time.unix_micros()).unwrap();
                    Some(t.format("%Y-%m-%d %H:%M:%S%.6f").to_string())
                }
                _ => None,
            })
            .collect();
        assert_eq!(our_commits, their_commits, "commit timestamps in {}", w[0]);
        prepared_commits +=
            d.events.iter().filter(|e| matches!(e, Event::Xact { kind: XactKind::CommitPrepared, .. })).count();
        let our_points: Vec<(String, String)> = d
            .events
            .iter()
            .filter_map(|e| match e {
                Event::RestorePoint { name, lsn, .. } => Some((name.clone(), lsn.to_string())),
                _ => None,
            })
            .collect();
        assert_eq!(our_points, their_points, "restore points in {}", w[0]);
        total_records += d.records;
        total_commits += our_commits.len() as u64;
        points.extend(our_points);
    }
    assert!(total_records > 1000 && total_commits >= 10, "{total_records} records, {total_commits} commits");
    assert_eq!(points.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(), ["before-migration", "after-load"]);
    assert_eq!(prepared_commits, 1);
}

#[test]
fn wal_push_refuses_a_segment_with_a_flipped_byte_in_a_record() {
    let env = Env::new(Backend::File);
    let pg = env.cluster();
    pg.sql("CREATE TABLE t AS SELECT g, md5(g::text) FROM generate_series(1, 2000) g");
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, std::time::Duration::from_secs(60));
    let good = std::fs::read(pg.pgdata.join("pg_wal").join(&seg)).unwrap();
    let dir = walnut_testkit::shared_tempdir("walnut-flip-");
    std::fs::create_dir_all(dir.path().join("pg_wal")).unwrap();
    // Re-pushing the good copy elsewhere is fine (identical).
    let path = dir.path().join("pg_wal").join(&seg);
    std::fs::write(&path, &good).unwrap();
    let o = env.walnut(&["wal-push", path.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    // One flipped byte inside the first record that begins in the segment (after the tail of a
    // record continued from the previous segment, if any), so the CRC check is what refuses it.
    let mut bad = good.clone();
    let info = u16::from_le_bytes([good[2], good[3]]);
    let rem = u32::from_le_bytes(good[16..20].try_into().unwrap()) as usize;
    let first = if info & 1 != 0 { (40 + rem).div_ceil(8) * 8 } else { 40 };
    assert!(first + 64 < 8192, "the first record begins on the first page");
    bad[first + 30] ^= 0x01;
    let next = format!("{}{:08X}", &seg[..16], u32::from_str_radix(&seg[16..], 16).unwrap() + 50);
    // Give the corrupt copy a name and header of its own (an unarchived segment number).
    let segno = u64::from_str_radix(&next[8..16], 16).unwrap() * 256 + u64::from_str_radix(&next[16..], 16).unwrap();
    bad[8..16].copy_from_slice(&(segno << 24).to_le_bytes());
    let bad_path = dir.path().join("pg_wal").join(&next);
    std::fs::write(&bad_path, &bad).unwrap();
    let o = env.walnut(&["wal-push", bad_path.to_str().unwrap()]);
    assert!(!o.status.success(), "a corrupt segment must be refused");
    // The specific cause: a renamed copy also has later page headers that disagree with its name,
    // so "corrupt" alone would pass even without the CRC check.
    assert!(stderr(&o).contains("fails its CRC check"), "{}", stderr(&o));
    assert!(!env.object_path(&wal_key(&next)).exists());
}
