//! Base backups and point-in-time restore, end to end: a real PostgreSQL 15, `file://`, the
//! local S3 server and Azurite. (A long file on purpose: one scenario per test, each starting its own cluster,
//! with the shared helpers at the top.)

mod common;

use common::*;
use std::time::Duration;
use walnut_testkit::PgCluster;

const WAIT: Duration = Duration::from_secs(60);

fn sleep(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// Switches WAL and waits until it is archived.
fn flush_archive(pg: &PgCluster) {
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, WAIT);
}

fn restore(env: &Env, dest: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["restore", dest.to_str().unwrap()];
    all.extend_from_slice(args);
    env.walnut(&all)
}

fn assert_ok(o: &std::process::Output, what: &str) {
    assert!(o.status.success(), "{what} failed:\nstdout: {}\nstderr: {}", stdout(o), stderr(o));
}

fn dest_is_empty(dest: &std::path::Path) -> bool {
    !dest.exists() || std::fs::read_dir(dest).unwrap().next().is_none()
}

/// The drop-table story, `--target-name` with an on-demand backup, and the refusals, on one source.
fn story(backend: Backend) {
    let env = Env::new(backend);
    let pg = env.cluster();
    pg.sql("CREATE TABLE customers(id int primary key, name text)");
    pg.sql("INSERT INTO customers SELECT g, 'c' || g FROM generate_series(1, 5) g");
    let o = backup_push(&env, &pg, Some("pre-migration"));
    assert_ok(&o, "backup-push");
    assert!(stdout(&o).contains("DONE"), "{}", stdout(&o));
    pg.sql("INSERT INTO customers SELECT g, 'c' || g FROM generate_series(6, 8) g");
    sleep(1100);
    let t = now_utc();
    sleep(1100);
    pg.sql("DROP TABLE customers");
    pg.sql("CREATE TABLE later AS SELECT g FROM generate_series(1, 100) g");
    flush_archive(&pg);

    // backup-list shows it
    let o = env.walnut(&["backup-list"]);
    assert_ok(&o, "backup-list");
    let list = stdout(&o);
    assert!(
        list.contains("ID") && list.contains("BEGIN WAL") && list.contains("pre-migration") && list.contains("DONE"),
        "{list}"
    );

    // The drop-table story.
    let (_d, dest) = restore_dir("story");
    let o = restore(&env, &dest, &["--target-time", &t, "--start"]);
    assert_ok(&o, "restore --target-time --start");
    let r = Restored::from_dir(&dest);
    assert_eq!(r.sql("SELECT count(*) FROM customers"), "8");
    assert_eq!(r.sql("SELECT to_regclass('later') IS NULL"), "t", "none of the later changes");
    assert_eq!(r.sql("SELECT pg_is_in_recovery()"), "f");
    r.sql("INSERT INTO customers VALUES (100, 'writable')");
    assert!(stdout(&o).contains("does not archive"), "says it does not archive: {}", stdout(&o));
    drop(r);

    // --target-name with the on-demand backup's name: exactly the state at that backup.
    let (_d2, dest2) = restore_dir("named");
    let o = restore(&env, &dest2, &["--target-name", "pre-migration", "--start"]);
    assert_ok(&o, "restore --target-name");
    let r = Restored::from_dir(&dest2);
    assert_eq!(r.sql("SELECT count(*) FROM customers"), "5");
    drop(r);

    // A target before the oldest backup is refused with the range; DEST stays empty.
    let (_d3, dest3) = restore_dir("too-early");
    let o = restore(&env, &dest3, &["--target-time", "2020-01-01T00:00:00Z"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("before the oldest backup") && e.contains("earliest:") && e.contains("latest:"), "{e}");
    assert!(dest_is_empty(&dest3));
    // A time without a zone is an error.
    let o = restore(&env, &dest3, &["--target-time", "2026-01-01 00:00:00"]);
    assert!(!o.status.success() && stderr(&o).contains("no time zone"), "{}", stderr(&o));
    // A non-empty DEST is refused.
    let o = restore(&env, &dest, &[]);
    assert!(!o.status.success() && stderr(&o).contains("not empty"), "{}", stderr(&o));
}

#[test]
fn file_backup_and_point_in_time_restore() {
    story(Backend::File);
}

#[test]
fn s3_backup_and_point_in_time_restore() {
    story(Backend::S3);
}

#[test]
fn azure_backup_and_point_in_time_restore() {
    story(Backend::Azure);
}

/// --target-lsn, --target-immediate, --exclusive, --target-action pause and shutdown.
#[test]
fn lsn_immediate_exclusive_and_actions() {
    let env = Env::new(Backend::File);
    let pg = env.cluster();
    pg.sql("CREATE TABLE t(x int)");
    assert_ok(&backup_push(&env, &pg, None), "backup-push");
    pg.sql("INSERT INTO t VALUES (1)");
    let lsn = pg.sql("SELECT pg_current_wal_insert_lsn()").trim().to_string();
    pg.sql("INSERT INTO t VALUES (2)");
    // A transaction whose commit is the target: inclusive sees it, exclusive does not.
    let out = pg.sql("BEGIN; INSERT INTO t VALUES (3); SELECT txid_current(); COMMIT;");
    let xid = out
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
        .unwrap()
        .to_string();
    pg.sql("INSERT INTO t VALUES (4)");
    flush_archive(&pg);

    let (_d, dest) = restore_dir("lsn");
    let before_pw = pg.sql("SELECT coalesce(rolpassword, '') FROM pg_authid WHERE rolname = 'postgres'");
    let o = std::process::Command::new(walnut_bin())
        .arg("--config")
        .arg(&env.config)
        .args(["restore", dest.to_str().unwrap(), "--target-lsn", &lsn, "--start", "--set-password", "postgres"])
        .env("WALNUT_NEW_PASSWORD", "n3w-pa55word")
        .output()
        .unwrap();
    assert_ok(&o, "restore --target-lsn --set-password");
    assert!(
        !stdout(&o).contains("n3w-pa55word") && !stderr(&o).contains("n3w-pa55word"),
        "the password is never printed"
    );
    let r = Restored::from_dir(&dest);
    assert_eq!(r.sql("SELECT string_agg(x::text, ',' ORDER BY x) FROM t"), "1");
    let after_pw = r.sql("SELECT coalesce(rolpassword, '') FROM pg_authid WHERE rolname = 'postgres'");
    assert!(after_pw.starts_with("SCRAM-SHA-256$") && after_pw != before_pw.trim(), "password changed: {after_pw}");
    drop(r);
    // Without the variable, --set-password is refused before anything is written.
    let (_d, dest_np) = restore_dir("no-password");
    let o = restore(&env, &dest_np, &["--start", "--set-password", "postgres"]);
    assert!(!o.status.success() && stderr(&o).contains("WALNUT_NEW_PASSWORD"), "{}", stderr(&o));
    assert!(dest_is_empty(&dest_np));
    // A role that does not exist: the statement fails, and the server logs it (STATEMENT: ...).
    // Only a SCRAM verifier computed by walnut is ever sent, so the password is in no file.
    let (_d, dest_bad) = restore_dir("bad-role");
    let o = std::process::Command::new(walnut_bin())
        .arg("--config")
        .arg(&env.config)
        .args([
            "restore",
            dest_bad.to_str().unwrap(),
            "--target-lsn",
            &lsn,
            "--start",
            "--set-password",
            "no_such_role",
        ])
        .env("WALNUT_NEW_PASSWORD", "s3cr3t-n0t-in-l0gs")
        .output()
        .unwrap();
    assert!(!o.status.success(), "a role that does not exist fails: {}", stdout(&o));
    assert!(stderr(&o).contains("no_such_role"), "{}", stderr(&o));
    let r = Restored::from_dir(&dest_bad);
    r.sql("SELECT 1"); // the server logged the failed statement by now
    let mut stack = vec![dest_bad.clone()];
    let mut logged = false;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                let text = String::from_utf8_lossy(&bytes);
                assert!(!text.contains("s3cr3t-n0t-in-l0gs"), "the password is in {}", p.display());
                logged |= text.contains("no_such_role");
            }
        }
    }
    assert!(logged, "the server log holds the failed statement (so the check above means something)");
    drop(r);

    let (_d, dest) = restore_dir("immediate");
    assert_ok(&restore(&env, &dest, &["--target-immediate", "--start"]), "restore --target-immediate");
    let r = Restored::from_dir(&dest);
    assert_eq!(r.sql("SELECT count(*) FROM t"), "0");
    drop(r);

    let (_d, dest) = restore_dir("xid-inclusive");
    assert_ok(&restore(&env, &dest, &["--target-xid", &xid, "--start"]), "restore --target-xid");
    let r = Restored::from_dir(&dest);
    assert_eq!(r.sql("SELECT string_agg(x::text, ',' ORDER BY x) FROM t"), "1,2,3");
    drop(r);

    let (_d, dest) = restore_dir("xid-exclusive");
    assert_ok(&restore(&env, &dest, &["--target-xid", &xid, "--exclusive", "--start"]), "restore --exclusive");
    let r = Restored::from_dir(&dest);
    assert_eq!(r.sql("SELECT string_agg(x::text, ',' ORDER BY x) FROM t"), "1,2");
    drop(r);

    let (_d, dest) = restore_dir("pause");
    let o = restore(&env, &dest, &["--target-lsn", &lsn, "--target-action", "pause", "--start"]);
    assert_ok(&o, "restore --target-action pause");
    let r = Restored::from_dir(&dest);
    assert_eq!(r.sql("SELECT pg_is_in_recovery()"), "t");
    assert_eq!(r.sql("SELECT pg_get_wal_replay_pause_state()"), "paused");
    assert_eq!(r.sql("SELECT count(*) FROM t"), "1");
    drop(r);

    let (_d, dest) = restore_dir("shutdown");
    let o = restore(&env, &dest, &["--target-lsn", &lsn, "--target-action", "shutdown", "--start"]);
    assert_ok(&o, "restore --target-action shutdown");
    assert!(stdout(&o).contains("shut down"), "{}", stdout(&o));
    assert!(!dest.join("postmaster.pid").exists(), "the server is down");
}

/// An idle database restored to "now"; the latest state after the primary is killed; a gap.
#[test]
fn idle_now_crash_latest_and_gaps() {
    let env = Env::new(Backend::File);
    let pg = env.cluster();
    pg.sql("CREATE TABLE t(x int)");
    assert_ok(&backup_push(&env, &pg, None), "backup-push");
    pg.sql("INSERT INTO t SELECT generate_series(1, 10)");
    flush_archive(&pg);
    sleep(1500);
    // Idle now: nothing was written since the last archived segment.
    let (_d, dest) = restore_dir("idle-now");
    let o = restore(&env, &dest, &["--target-time", &now_utc(), "--start"]);
    assert_ok(&o, "restore to now on an idle database");
    assert!(stdout(&o).contains("end of the archive"), "says so: {}", stdout(&o));
    let r = Restored::from_dir(&dest);
    assert_eq!(r.sql("SELECT count(*) FROM t"), "10");
    drop(r);

    // Kill the primary: everything whose WAL was archived comes back.
    pg.sql("INSERT INTO t SELECT generate_series(11, 20)");
    flush_archive(&pg);
    let mut pg = pg;
    pg.stop("immediate");
    let (_d, dest) = restore_dir("latest");
    assert_ok(&restore(&env, &dest, &["--start"]), "restore latest");
    let r = Restored::from_dir(&dest);
    assert_eq!(r.sql("SELECT count(*) FROM t"), "20");
    drop(r);

    // Before any damage the archive verifies, deeply too, and wal-show reports no gap.
    let o = env.walnut(&["wal-verify", "--deep"]);
    assert_ok(&o, "wal-verify --deep");
    assert!(stdout(&o).contains("PITR possible up to"), "{}", stdout(&o));
    let o = env.walnut(&["wal-show"]);
    assert_ok(&o, "wal-show");
    assert!(stdout(&o).contains("timeline 1") && !stdout(&o).contains("GAP"), "{}", stdout(&o));
    let list: serde_json::Value = serde_json::from_str(&stdout(&env.walnut(&["--json", "backup-list"]))).unwrap();
    let backup_id = list[0]["id"].as_str().unwrap().to_string();

    // A gap: delete a segment in the middle; a target beyond it is refused, DEST stays empty.
    let wal_dir = env.dir.path().join("repo/wal/00000001");
    let mut segs: Vec<String> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24)
        .collect();
    segs.sort();
    let victim = segs[segs.len() - 2].clone();
    std::fs::remove_file(wal_dir.join(&victim)).unwrap();
    let (_d, dest) = restore_dir("gap");
    let o = restore(&env, &dest, &["--target-time", &now_utc()]);
    assert!(!o.status.success(), "a target beyond a gap must be refused");
    let e = stderr(&o);
    assert!(e.contains("gap") && e.contains(&victim) && e.contains("earliest:"), "{e}");
    assert!(dest_is_empty(&dest));
    // wal-show reports the gap; wal-verify fails naming the segment and the backup.
    let o = env.walnut(&["wal-show"]);
    assert!(stdout(&o).contains("GAP") && stdout(&o).contains(&victim), "{}", stdout(&o));
    let o = env.walnut(&["wal-verify"]);
    assert!(!o.status.success(), "wal-verify must fail on a gap");
    let out = stdout(&o);
    assert!(out.contains(&victim) && out.contains(&backup_id), "names the segment and the backup: {out}");
    // A restore to an xid never archived is refused with the range.
    let o = restore(&env, &dest, &["--target-xid", "4000000000"]);
    assert!(!o.status.success() && stderr(&o).contains("not in the archived WAL"), "{}{}", stdout(&o), stderr(&o));
}

/// A time inside a gap (after the last commit before a missing segment, before the next one) is
/// refused with the restorable range, and DEST stays empty; a time before the gap is accepted.
#[test]
fn time_inside_a_gap_is_refused() {
    let env = Env::new(Backend::File);
    let pg = env.cluster();
    pg.sql("CREATE TABLE t(x int)");
    assert_ok(&backup_push(&env, &pg, None), "backup-push");
    sleep(1200);
    let before_gap = now_utc();
    sleep(1200);
    pg.sql("INSERT INTO t VALUES (1)");
    flush_archive(&pg);
    sleep(1200);
    let inside_gap = now_utc();
    sleep(1200);
    pg.sql("INSERT INTO t VALUES (2)");
    let missing = pg.switch_wal();
    pg.wait_archived(&missing, WAIT);
    pg.sql("INSERT INTO t VALUES (3)");
    flush_archive(&pg);
    std::fs::remove_file(env.object_path(&wal_key(&missing))).unwrap();

    let (_d, dest) = restore_dir("inside-gap");
    let o = restore(&env, &dest, &["--target-time", &inside_gap]);
    assert!(!o.status.success(), "a time inside a gap must be refused: {}", stdout(&o));
    let e = stderr(&o);
    assert!(e.contains("gap") && e.contains(&missing) && e.contains("earliest:"), "{e}");
    assert!(dest_is_empty(&dest));
    let o = restore(&env, &dest, &["--dry-run", "--target-time", &before_gap]);
    assert_ok(&o, "a time before the gap");
    assert!(dest_is_empty(&dest));
}

/// Restore + promote + --archive: the new timeline archives into the repository (history file
/// included) and a second restore to a point on the new timeline works. pg_verifybackup checks a
/// fetched backup; a corrupted part is refused by name; an interrupted backup is never DONE.
#[test]
fn new_timeline_verifybackup_corruption_and_interrupted_backup() {
    let env = Env::new(Backend::File);
    let pg = env.cluster();
    pg.sql("CREATE TABLE t(x int)");
    pg.sql("INSERT INTO t SELECT generate_series(1, 5)");
    assert_ok(&backup_push(&env, &pg, None), "backup-push");
    pg.sql("INSERT INTO t SELECT generate_series(6, 10)");
    flush_archive(&pg);
    let mut pg = pg;
    pg.stop("fast");

    // Replace the lost primary: restore with --archive, write on timeline 2.
    let (_d, dest) = restore_dir("new-primary");
    let o = restore(&env, &dest, &["--archive", "--start"]);
    assert_ok(&o, "restore --archive");
    assert!(stdout(&o).contains("archives to"), "{}", stdout(&o));
    let r = Restored::from_dir(&dest);
    assert_eq!(r.sql("SELECT timeline_id FROM pg_control_checkpoint()"), "2");
    r.sql("INSERT INTO t SELECT generate_series(11, 15)");
    sleep(1100);
    let t2 = now_utc();
    sleep(1100);
    r.sql("INSERT INTO t SELECT generate_series(16, 20)");
    let seg = r.sql("SELECT pg_walfile_name(pg_switch_wal())");
    PgCluster::wait_for("timeline 2 archiving", WAIT, || env.dir.path().join("repo/wal/00000002").join(&seg).exists());
    assert!(env.dir.path().join("repo/wal/00000002/00000002.history").exists(), "history file archived");
    drop(r);

    let (_d, dest2) = restore_dir("on-timeline-2");
    assert_ok(&restore(&env, &dest2, &["--target-time", &t2, "--start"]), "restore on timeline 2");
    let r = Restored::from_dir(&dest2);
    assert_eq!(r.sql("SELECT count(*) FROM t"), "15");
    drop(r);

    // wal-verify agrees with the history file (the end-of-recovery record decoded at push sits at
    // its switch point); without the history file it fails, naming it.
    assert_ok(&env.walnut(&["wal-verify"]), "wal-verify with two timelines");
    let history = env.dir.path().join("repo/wal/00000002/00000002.history");
    let aside = env.dir.path().join("history.aside");
    std::fs::rename(&history, &aside).unwrap();
    let o = env.walnut(&["wal-verify"]);
    assert!(!o.status.success() && stdout(&o).contains("00000002.history"), "{}{}", stdout(&o), stderr(&o));
    std::fs::rename(&aside, &history).unwrap();

    // backup-fetch + pg_verifybackup -n
    let (_d, fetched) = restore_dir("fetched");
    let o = env.walnut(&["backup-fetch", fetched.to_str().unwrap(), "LATEST"]);
    assert_ok(&o, "backup-fetch");
    let v = std::process::Command::new(walnut_testkit::pg::bindir().join("pg_verifybackup"))
        .arg("-n")
        .arg(&fetched)
        .output()
        .unwrap();
    assert!(v.status.success(), "pg_verifybackup: {}{}", stdout(&v), stderr(&v));

    // Corrupt a part: restore refuses it by name and leaves DEST empty.
    let parts_dir =
        std::fs::read_dir(env.dir.path().join("repo/backups")).unwrap().next().unwrap().unwrap().path().join("data");
    let part = std::fs::read_dir(&parts_dir).unwrap().next().unwrap().unwrap().path();
    let mut bytes = std::fs::read(&part).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    std::fs::write(&part, bytes).unwrap();
    let (_d, dest3) = restore_dir("corrupt");
    let o = restore(&env, &dest3, &[]);
    assert!(!o.status.success(), "a corrupt part must be refused");
    let part_name = part.file_name().unwrap().to_string_lossy().into_owned();
    assert!(stderr(&o).contains(&part_name), "names the bad object: {}", stderr(&o));
    assert!(dest_is_empty(&dest3));
}

/// A backup killed half-way never shows as DONE, and the next backup succeeds.
#[test]
fn interrupted_backup_is_never_done() {
    let env = Env::with_extra(Backend::File, "[backup]\nparallel = 1\npart_size_mb = 1\n");
    let pg = env.cluster();
    pg.sql("CREATE TABLE big AS SELECT g, md5(g::text) AS h FROM generate_series(1, 300000) g");
    let mut child = backup_push_cmd(&env, &pg).spawn().unwrap();
    // Kill it once it has written a part (a file below backups/<id>/data/).
    let backups = env.dir.path().join("repo/backups");
    PgCluster::wait_for("the backup to write a part", WAIT, || {
        std::fs::read_dir(&backups).into_iter().flatten().flatten().any(|b| {
            std::fs::read_dir(b.path().join("data"))
                .map(|mut r| r.any(|e| e.is_ok_and(|e| !e.file_name().to_string_lossy().starts_with('.'))))
                .unwrap_or(false)
        })
    });
    child.kill().unwrap();
    let _ = child.wait();
    let o = env.walnut(&["--json", "backup-list"]);
    assert_ok(&o, "backup-list");
    let list: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(!list.as_array().unwrap().iter().any(|b| b["status"] == "DONE"), "{list}");
    assert_ok(&backup_push(&env, &pg, None), "the next backup");
    let o = env.walnut(&["--json", "backup-list"]);
    let list: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(list.as_array().unwrap().iter().filter(|b| b["status"] == "DONE").count(), 1, "{list}");
}

/// `walnut restore-point before-migration`, then changes, then `restore --target-name
/// before-migration --start` gives the state at the restore point.
#[test]
fn restore_point_round_trip() {
    let env = Env::new(Backend::File);
    let pg = env.cluster();
    pg.sql("CREATE TABLE t(x int)");
    assert_ok(&backup_push(&env, &pg, None), "backup-push");
    pg.sql("INSERT INTO t SELECT generate_series(1, 7)");
    let o = std::process::Command::new(walnut_bin())
        .arg("--config")
        .arg(&env.config)
        .args(["restore-point", "before-migration"])
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", pg.port.to_string())
        .env("PGUSER", "postgres")
        .output()
        .unwrap();
    assert_ok(&o, "restore-point");
    assert!(stdout(&o).contains("before-migration") && stdout(&o).contains("LSN"), "{}", stdout(&o));
    pg.sql("ALTER TABLE t ADD COLUMN y int; INSERT INTO t SELECT generate_series(8, 10)");
    flush_archive(&pg);
    let (_d, dest) = restore_dir("at-restore-point");
    assert_ok(&restore(&env, &dest, &["--target-name", "before-migration", "--start"]), "restore --target-name");
    let r = Restored::from_dir(&dest);
    assert_eq!(r.sql("SELECT count(*) FROM t"), "7");
    assert_eq!(r.sql("SELECT count(*) FROM information_schema.columns WHERE table_name = 't'"), "1");
}

/// Three backups; `delete retain 1` prints and deletes nothing; with --confirm it removes the two
/// older backups and the WAL only they needed; the remaining backup still restores to the latest.
#[test]
fn delete_retain_one_keeps_the_newest_restorable() {
    let env = Env::new(Backend::File);
    let pg = env.cluster();
    pg.sql("CREATE TABLE t(x int)");
    for i in 0..3 {
        pg.sql(&format!("INSERT INTO t SELECT generate_series(1, 10); SELECT {i}"));
        flush_archive(&pg);
        assert_ok(&backup_push(&env, &pg, None), "backup-push");
        sleep(1100); // distinct backup IDs
    }
    pg.sql("INSERT INTO t SELECT generate_series(1, 5)");
    flush_archive(&pg);
    let wal_dir = env.dir.path().join("repo/wal/00000001");
    let count_wal =
        || std::fs::read_dir(&wal_dir).unwrap().filter(|e| e.as_ref().unwrap().file_name().len() == 24).count();
    let before = count_wal();

    let o = env.walnut(&["delete", "retain", "1"]);
    assert_ok(&o, "delete retain 1 (dry)");
    assert!(stdout(&o).contains("DELETE") && stdout(&o).contains("nothing deleted"), "{}", stdout(&o));
    assert_eq!(count_wal(), before);

    let o = env.walnut(&["--json", "delete", "retain", "1", "--confirm"]);
    assert_ok(&o, "delete retain 1 --confirm");
    let list: serde_json::Value = serde_json::from_str(&stdout(&env.walnut(&["--json", "backup-list"]))).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let remaining_start_wal = list[0]["start_wal"].as_str().unwrap().to_string();
    let names: Vec<String> = std::fs::read_dir(&wal_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24)
        .collect();
    assert!(names.len() < before, "old WAL deleted ({} -> {})", before, names.len());
    assert!(
        names.iter().all(|n| *n >= remaining_start_wal),
        "only WAL before {remaining_start_wal} deleted: {names:?}"
    );
    assert_eq!(env.walnut(&["delete", "retain", "0"]).status.code(), Some(1), "retain 0 is refused");

    let (_d, dest) = restore_dir("after-retention");
    assert_ok(&restore(&env, &dest, &["--start"]), "restore latest after retention");
    let r = Restored::from_dir(&dest);
    assert_eq!(r.sql("SELECT count(*) FROM t"), "35");
}

/// `walnut check` passes on a working setup and fails with the repository line when the
/// credentials are wrong (without printing the secret).
#[test]
fn check_reports_wrong_credentials() {
    let env = Env::new(Backend::S3);
    let pg = env.cluster();
    flush_archive(&pg);
    assert_ok(&backup_push(&env, &pg, None), "backup-push");
    let run = |secret: Option<&str>| {
        let mut c = std::process::Command::new(walnut_bin());
        c.arg("--config").arg(&env.config).arg("check");
        c.env("PGHOST", "127.0.0.1").env("PGPORT", pg.port.to_string()).env("PGUSER", "postgres");
        if let Some(s) = secret {
            c.env("AWS_SECRET_ACCESS_KEY", s);
        }
        c.output().unwrap()
    };
    let o = run(None);
    assert_ok(&o, "walnut check");
    assert!(stdout(&o).contains("✔ archive_command points at walnut"), "{}", stdout(&o));
    let o = run(Some("wrong-secret-value-123"));
    assert!(!o.status.success(), "wrong credentials must fail the check");
    let out = stdout(&o);
    assert!(out.contains("✗ repository reachable and writable"), "{out}");
    assert!(
        !out.contains("wrong-secret-value-123") && !stderr(&o).contains("wrong-secret-value-123"),
        "no secret in output"
    );
}

/// `walnut enable --restart` on a cluster with archiving off: it restarts, WAL reaches the
/// repository and a first backup is DONE; a second run changes nothing.
#[test]
fn enable_sets_up_archiving_and_takes_the_first_backup() {
    let env = Env::new(Backend::File);
    let pg = PgCluster::start(walnut_testkit::pg::PgOptions::default());
    assert_eq!(pg.sql("SHOW archive_mode").trim(), "off");
    let run = || {
        std::process::Command::new(walnut_bin())
            .arg("--config")
            .arg(&env.config)
            .args(["enable", "--restart"])
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", pg.port.to_string())
            .env("PGUSER", "postgres")
            .output()
            .unwrap()
    };
    let o = run();
    assert_ok(&o, "walnut enable --restart");
    let out = stdout(&o);
    assert!(out.contains("archive_mode = on") && out.contains("restarted") && out.contains("archiving works"), "{out}");
    assert_eq!(pg.sql("SHOW archive_mode").trim(), "on");
    let list: serde_json::Value = serde_json::from_str(&stdout(&env.walnut(&["--json", "backup-list"]))).unwrap();
    assert_eq!(list.as_array().unwrap().iter().filter(|b| b["status"] == "DONE").count(), 1, "{list}");
    let o = run();
    assert_ok(&o, "second walnut enable");
    assert!(stdout(&o).contains("nothing to change"), "{}", stdout(&o));
}

/// A tablespace is backed up and restored to a directory given with --tablespace-map (never over
/// the source's directory, which is in use); `--standby --start` gives a read-only follower that keeps replaying what
/// the primary archives.
#[test]
fn tablespaces_and_a_standby_that_follows_the_archive() {
    let env = Env::new(Backend::File);
    let pg = env.cluster();
    let ts = walnut_testkit::shared_tempdir("walnut-tablespace-");
    walnut_testkit::pg::give_to_postgres_user(ts.path());
    pg.sql(&format!("CREATE TABLESPACE extra LOCATION '{}'", ts.path().display()));
    pg.sql("CREATE TABLE t(x int) TABLESPACE extra");
    pg.sql("INSERT INTO t SELECT generate_series(1, 100)");
    assert_ok(&backup_push(&env, &pg, None), "backup-push");
    pg.sql("INSERT INTO t SELECT generate_series(101, 150)");
    flush_archive(&pg);

    // The source's tablespace directory is in use: restoring over it is refused before anything
    // is written, with the fix; --tablespace-map puts it elsewhere.
    let (_d, dest) = restore_dir("tablespace");
    let o = restore(&env, &dest, &["--start"]);
    assert!(!o.status.success(), "restoring over the source's tablespace must be refused");
    let e = stderr(&o);
    assert!(e.contains("tablespace extra") && e.contains("not empty") && e.contains("--tablespace-map extra="), "{e}");
    assert!(dest_is_empty(&dest));
    let o = restore(&env, &dest, &["--tablespace-map", "nope=/tmp/x"]);
    assert!(!o.status.success() && stderr(&o).contains("extra (oid"), "{}", stderr(&o));
    let (_t, ts_dir) = restore_dir("tablespace-dir");
    let map = format!("extra={}", ts_dir.display());
    assert_ok(&restore(&env, &dest, &["--tablespace-map", &map, "--start"]), "restore with a tablespace");
    let r = Restored::from_dir(&dest);
    assert_eq!(r.sql("SELECT count(*) FROM t"), "150");
    let ts_of_t =
        "SELECT s.spcname FROM pg_class c JOIN pg_tablespace s ON s.oid = c.reltablespace WHERE relname = 't'";
    assert_eq!(r.sql(ts_of_t), "extra");
    r.sql("INSERT INTO t SELECT generate_series(1000, 1099)");
    assert_eq!(r.sql("SELECT count(*) FROM t"), "250");
    let oid = r.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'extra'");
    assert_eq!(std::fs::read_link(dest.join("pg_tblspc").join(&oid)).unwrap(), ts_dir);
    assert_eq!(r.sql(&format!("SELECT pg_tablespace_location({oid})")), ts_dir.display().to_string());
    drop(r);
    assert_eq!(pg.sql("SELECT count(*) FROM t").trim(), "150", "the source's tablespace is untouched");

    let (_d2, sdest) = restore_dir("standby");
    let (_t2, ts_dir2) = restore_dir("standby-tablespace");
    let map = format!("{oid}={}", ts_dir2.display());
    let o = restore(&env, &sdest, &["--standby", "--tablespace-map", &map, "--start"]);
    assert_ok(&o, "restore --standby --start");
    let s = Restored::from_dir(&sdest);
    assert_eq!(s.sql("SELECT pg_is_in_recovery()"), "t");
    PgCluster::wait_for("the standby to reach the archive's end", WAIT, || {
        s.psql("SELECT count(*) FROM t").status.success() && stdout(&s.psql("SELECT count(*) FROM t")).trim() == "150"
    });
    pg.sql("INSERT INTO t SELECT generate_series(151, 200)");
    flush_archive(&pg);
    PgCluster::wait_for("the standby to replay newly archived WAL", WAIT, || {
        stdout(&s.psql("SELECT count(*) FROM t")).trim() == "200"
    });
    let o = s.psql("INSERT INTO t VALUES (0)");
    assert!(!o.status.success() && stderr(&o).contains("read-only"), "a standby is read-only: {}", stderr(&o));
}

/// A point-in-time restore that stops mid-segment and keeps archiving (`--archive`): timeline 2's
/// first segment begins with pages copied from timeline 1 up to the switch point. It must archive
/// (wal-push refused it before: archiving stopped for good and pg_wal filled), and a second restore
/// follows timeline 2 through it.
#[test]
fn mid_segment_promotion_keeps_archiving() {
    let env = Env::new(Backend::File);
    let pg = env.cluster();
    pg.sql("CREATE TABLE t(x int)");
    assert_ok(&backup_push(&env, &pg, None), "backup-push");
    pg.sql("INSERT INTO t SELECT generate_series(1, 5)");
    sleep(1100);
    let t1 = now_utc();
    sleep(1100);
    pg.sql("INSERT INTO t SELECT generate_series(6, 10)");
    flush_archive(&pg);

    let (_d, dest) = restore_dir("mid-segment");
    let o = restore(&env, &dest, &["--target-time", &t1, "--archive", "--start"]);
    assert_ok(&o, "restore --target-time --archive --start");
    let r = Restored::from_dir(&dest);
    assert_eq!(r.sql("SELECT count(*) FROM t"), "5");
    assert_eq!(r.sql("SELECT timeline_id FROM pg_control_checkpoint()"), "2");
    r.sql("INSERT INTO t SELECT generate_series(100, 104)");
    sleep(1100);
    let t2 = now_utc();
    sleep(1100);
    r.sql("INSERT INTO t SELECT generate_series(200, 204)");
    let seg = r.sql("SELECT pg_walfile_name(pg_switch_wal())");
    assert!(seg.starts_with("00000002"), "{seg}");
    // This is the case under test: the segment's first page still says timeline 1.
    let head = std::fs::read(dest.join("pg_wal").join(&seg)).unwrap();
    assert_eq!(u32::from_le_bytes(head[4..8].try_into().unwrap()), 1, "{seg} starts with timeline 1's pages");
    let key = env.dir.path().join("repo").join(wal_key(&seg));
    PgCluster::wait_for(&format!("{seg} to be archived"), WAIT, || key.exists());
    drop(r);

    let (_d2, dest2) = restore_dir("follows-timeline-2");
    assert_ok(&restore(&env, &dest2, &["--target-time", &t2, "--start"]), "restore on timeline 2");
    let r = Restored::from_dir(&dest2);
    assert_eq!(r.sql("SELECT count(*) FROM t"), "10", "timeline 1 to the switch, then timeline 2's first insert");
    assert_eq!(r.sql("SELECT count(*) FROM t WHERE x >= 200"), "0");
    drop(r);
    assert_ok(&env.walnut(&["wal-verify"]), "wal-verify across the mid-segment switch");
}

/// Starts a restored (not yet started) data directory and waits until it accepts writes.
fn start_restored(dest: &std::path::Path) -> Restored {
    let r = Restored::from_dir(dest);
    let out = walnut_testkit::pg::as_postgres(&r.bindir.join("pg_ctl"))
        .arg("-D")
        .arg(dest)
        .arg("-l")
        .arg(dest.join("test-start.log"))
        .args(["-w", "-t", "60", "start"])
        .output()
        .unwrap();
    assert!(out.status.success(), "pg_ctl start: {}{}", stdout(&out), stderr(&out));
    PgCluster::wait_for("recovery to finish", WAIT, || {
        r.psql("SELECT pg_is_in_recovery()").status.success() && r.sql("SELECT pg_is_in_recovery()") == "f"
    });
    r
}

/// A time after the last archived commit is the end of the archive *as planned*: the segment with
/// the DROP, archived between planning and the start (as archive_timeout does), is not replayed.
/// And when walnut can reach the primary, commits it has not archived yet are archived first, so
/// the target is exact.
#[test]
fn a_disaster_archived_after_planning_is_not_replayed() {
    let env = Env::new(Backend::File);
    let pg = env.cluster();
    pg.sql("CREATE TABLE precious AS SELECT generate_series(1, 5) AS x");
    assert_ok(&backup_push(&env, &pg, None), "backup-push");
    pg.sql("INSERT INTO precious VALUES (6)");
    flush_archive(&pg);
    sleep(1100);
    let t = now_utc();
    sleep(1100);
    pg.sql("DROP TABLE precious");

    // The primary is out of reach (no connection settings): the end of the archive is pinned.
    let (_d, dest) = restore_dir("pinned");
    let port = walnut_testkit::free_port().to_string();
    let o = restore(&env, &dest, &["--target-time", &t, "--port", &port]);
    assert_ok(&o, "restore --target-time after the last archived commit");
    assert!(stdout(&o).contains("not replayed"), "{}", stdout(&o));
    flush_archive(&pg); // the DROP reaches the archive before the restored cluster starts
    let r = start_restored(&dest);
    assert_eq!(r.sql("SELECT count(*) FROM precious"), "6", "the DROP archived after planning is not replayed");
    r.sql("INSERT INTO precious VALUES (7)");
    drop(r);

    // Reachable primary: a commit before the target that is not archived yet is archived first.
    pg.sql("CREATE TABLE later AS SELECT 1 AS x");
    flush_archive(&pg);
    pg.sql("INSERT INTO later VALUES (2)");
    sleep(1100);
    let t2 = now_utc();
    sleep(1100);
    pg.sql("DROP TABLE later");
    let (_d2, dest2) = restore_dir("caught-up");
    let o = std::process::Command::new(walnut_bin())
        .arg("--config")
        .arg(&env.config)
        .args(["restore", dest2.to_str().unwrap(), "--target-time", &t2, "--start"])
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", pg.port.to_string())
        .env("PGUSER", "postgres")
        .output()
        .unwrap();
    assert_ok(&o, "restore with the primary reachable");
    assert!(stdout(&o).contains("switched WAL"), "{}", stdout(&o));
    let r = Restored::from_dir(&dest2);
    assert_eq!(r.sql("SELECT count(*) FROM later"), "2", "the unarchived commit before the target is restored");
}

/// Two `backup-push` processes of one cluster started together: one runs, the other is refused
/// at once with a clear message (before, both ran, and two started in the same second shared an
/// ID and overwrote each other's parts). Archiving is held back so the first is surely still
/// running when the second asks.
#[test]
fn two_backups_at_once_one_is_refused() {
    let env = Env::new(Backend::File);
    let pg = env.cluster();
    flush_archive(&pg);
    pg.sql("ALTER SYSTEM SET archive_command = 'false'");
    pg.sql("SELECT pg_reload_conf()");
    let spawn = || {
        backup_push_cmd(&env, &pg)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    // One of them is refused quickly; the other waits for its WAL to be archived.
    let mut children = vec![a, b];
    let mut refused = None;
    PgCluster::wait_for("one backup-push to be refused", WAIT, || {
        for (i, c) in children.iter_mut().enumerate() {
            if c.try_wait().unwrap().is_some() {
                refused = Some(i);
                return true;
            }
        }
        false
    });
    let loser = children.remove(refused.unwrap()).wait_with_output().unwrap();
    assert!(!loser.status.success(), "{}", stdout(&loser));
    assert!(stderr(&loser).contains("another backup is already running"), "{}", stderr(&loser));
    pg.sql(&format!("ALTER SYSTEM SET archive_command = '{}'", env.archive_command().replace('\'', "''")));
    pg.sql("SELECT pg_reload_conf()");
    let winner = children.pop().unwrap().wait_with_output().unwrap();
    assert_ok(&winner, "the backup that ran");
    let o = env.walnut(&["--json", "backup-list"]);
    let list: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "the refused one left nothing behind: {list:?}");
    assert_eq!(list[0]["status"], "DONE");
    // The lock is released: the next backup runs.
    assert_ok(&backup_push(&env, &pg, None), "the next backup");
}

/// A restore run as the user the restored server runs as starts the prefetcher at the backup's
/// first segment: recovery's first request is served from the spool, not fetched while a
/// prefetcher gets going (the first segments used to be fetched one by one).
#[test]
fn a_restore_spools_the_first_segments_before_the_server_asks() {
    let env = Env::new(Backend::File);
    let pg = env.cluster();
    pg.sql("CREATE TABLE t(x int)");
    assert_ok(&backup_push(&env, &pg, None), "backup-push");
    for i in 0..3 {
        pg.sql(&format!("INSERT INTO t SELECT generate_series(1, 1000); SELECT {i}"));
        flush_archive(&pg);
    }
    // The restore's own config, with a state directory the postgres user owns (the server's
    // restore_command runs as that user and uses the same file).
    let state = env.dir.path().join("restore-state");
    let config = env.dir.path().join("restore.toml");
    let text = std::fs::read_to_string(&env.config).unwrap();
    let text = text.replace(&env.dir.path().join("state").display().to_string(), &state.display().to_string());
    assert!(text.contains("restore-state"), "{text}");
    std::fs::write(&config, text).unwrap();
    walnut_testkit::pg::give_to_postgres_user(env.dir.path());
    // Twice: the second restore's recovery starts where the first one's ended (a prefetcher
    // may still follow the first, and the spool remembers its last request).
    for round in 0..2 {
        let (d, dest) = restore_dir(&format!("prespooled-{round}"));
        walnut_testkit::pg::give_to_postgres_user(d.path());
        let port = walnut_testkit::free_port().to_string();
        let o = walnut_testkit::pg::as_postgres(std::path::Path::new(&walnut_bin()))
            .arg("--config")
            .arg(&config)
            .args(["restore", dest.to_str().unwrap(), "--port", &port])
            .output()
            .unwrap();
        assert_ok(&o, "restore as the postgres user");
        let label = std::fs::read_to_string(dest.join("backup_label")).unwrap();
        let first =
            label.split("(file ").nth(1).and_then(|s| s.split(')').next()).expect("backup_label names its file");
        let spooled = |name: &str| {
            walkdir(&state)
                .iter()
                .any(|p| p.file_name().is_some_and(|n| n == name) && p.to_string_lossy().contains("spool"))
        };
        PgCluster::wait_for("the first segment in the spool", WAIT, || spooled(first));
        let r = start_restored(&dest);
        assert_eq!(r.sql("SELECT count(*) FROM t"), "3000");
        let log = std::fs::read_to_string(dest.join("test-start.log")).unwrap();
        assert!(log.contains(&format!("{first}: restored from the prefetch spool")), "round {round}: {log}");
    }
}

fn walkdir(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    let Ok(rd) = std::fs::read_dir(dir) else { return out };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walkdir(&p));
        } else {
            out.push(p);
        }
    }
    out
}
