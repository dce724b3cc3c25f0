//! Restore drills: `walnut drill` restores the latest point into a scratch directory, starts
//! it, checks it (connections, pg_amcheck, the configured query), times it and removes it; a
//! drill of a broken backup fails with the reason and leaves nothing behind.

mod common;

use common::*;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn empty(dir: &std::path::Path) -> bool {
    !dir.exists() || std::fs::read_dir(dir).unwrap().next().is_none()
}

#[test]
fn a_drill_restores_checks_times_and_removes_and_a_broken_backup_fails() {
    let env = Env::with_extra(Backend::File, "[drill]\nquery = \"SELECT count(*) FROM t\"");
    let pg = env.cluster();
    pg.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1234) g");
    pg.sql("CREATE INDEX ON t (g)");
    let o = backup_push(&env, &pg, None);
    assert!(o.status.success(), "{}", stderr(&o));
    // Rows only the WAL holds: the drill replays to the latest point.
    pg.sql("INSERT INTO t SELECT g FROM generate_series(1, 100) g");
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, WAIT);

    let scratch = env.dir.path().join("scratch");
    let o = env.walnut(&["--json", "drill", "--scratch", scratch.to_str().unwrap()]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["query_result"], "1334", "the replayed rows are there: {r}");
    assert_eq!(r["amcheck"], true, "pg_amcheck ran: {r}");
    assert!(r["recovery_seconds"].as_f64().unwrap() > 0.0, "{r}");
    assert!(r["restored_lag_seconds"].as_f64().is_some(), "{r}");
    assert!(empty(&scratch), "the scratch directory is emptied");
    // The source is untouched and still archiving.
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, WAIT);

    // A broken backup: the drill fails, names the part, and leaves nothing behind.
    let data = env.dir.path().join("repo/backups");
    let id = std::fs::read_dir(&data).unwrap().next().unwrap().unwrap().file_name();
    let part = std::fs::read_dir(data.join(&id).join("data")).unwrap().next().unwrap().unwrap().path();
    let mut bytes = std::fs::read(&part).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x08;
    std::fs::write(&part, bytes).unwrap();
    let o = env.walnut(&["drill", "--scratch", scratch.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("drill failed") && e.contains(part.file_name().unwrap().to_str().unwrap()), "{e}");
    assert!(empty(&scratch), "nothing left after a failed drill");
}
