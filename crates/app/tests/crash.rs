//! walnut killed (SIGKILL, no cleanup) at each stage of wal-push, backup-push, backup-fetch and
//! the agent, on a cluster with `fsync = on`: nothing acknowledged is lost, no backup with a
//! missing object is ever DONE, and the next run (PostgreSQL's retry, the next backup, a re-run
//! of the restore) succeeds.

mod common;

use common::*;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};
use std::time::Duration;
use walnut_testkit::PgCluster;
use walnut_testkit::pg::PgOptions;

const WAIT: Duration = Duration::from_secs(60);

fn killed(o: &Output, at: &str) {
    // SIGKILL, or SIGABRT where no `kill` program exists: either way no cleanup ran.
    assert!(matches!(o.status.signal(), Some(9 | 6)), "{at}: walnut was killed there: {}", stderr(o));
    assert!(stderr(o).contains(&format!("crash point {at}")), "{}", stderr(o));
}

fn crashing(env: &Env, at: &str, args: &[&str], pg: Option<&PgCluster>) -> Output {
    let mut c = Command::new(walnut_bin());
    c.arg("--config").arg(&env.config).args(args).env("WALNUT_CRASH_AT", at);
    if let Some(pg) = pg {
        c.env("PGHOST", "127.0.0.1").env("PGPORT", pg.port.to_string()).env("PGUSER", "postgres");
    }
    c.output().unwrap()
}

fn list(env: &Env) -> Vec<serde_json::Value> {
    let o = env.walnut(&["--json", "backup-list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap().as_array().unwrap().clone()
}

#[test]
fn killed_at_every_stage_nothing_is_lost_and_the_next_run_succeeds() {
    // The per-process path: the named wal-push stages are in it (the worker has its own crash
    // test in tests/walworker.rs).
    let env = Env::with_extra(
        Backend::File,
        "[backup]\nparallel = 1\npart_size_mb = 1\narchive_wait = \"30s\"\n[wal]\nworker = false",
    );
    let pg = PgCluster::start(PgOptions {
        archive_command: Some(env.archive_command()),
        extra_conf: "fsync = on\n".into(),
        ..Default::default()
    });
    assert_eq!(pg.sql("SHOW fsync").trim(), "on");
    pg.sql("CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 60000) g");
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, WAIT);
    let mut crashes = 0;

    // wal-push: a segment that is not archived yet, pushed by hand, killed at each stage; then
    // pushed again as PostgreSQL would retry: stored, and fetched back byte-identical.
    let scratch = walnut_testkit::shared_tempdir("walnut-crash-");
    let pg_wal = scratch.path().join("pg_wal");
    std::fs::create_dir_all(&pg_wal).unwrap();
    // Archiving held back (proved by the archiver failing), so these segments are ours to push.
    let failed = pg.archiver().2;
    pg.sql("ALTER SYSTEM SET archive_command = 'false'");
    pg.sql("SELECT pg_reload_conf()");
    pg.switch_wal();
    PgCluster::wait_for("archiving to be held back", WAIT, || pg.archiver().2 > failed);
    let segs: Vec<String> = (0..3).map(|_| pg.switch_wal()).collect();
    for (at, s) in ["wal-push:before-upload", "put-before-commit:wal", "wal-push:after-upload"].iter().zip(&segs) {
        let key = env.object_path(&wal_key(s));
        assert!(!key.exists(), "{s} is not archived yet");
        let path = pg_wal.join(s);
        std::fs::copy(pg.pgdata.join("pg_wal").join(s), &path).unwrap();
        let o = crashing(&env, at, &["wal-push", path.to_str().unwrap()], None);
        killed(&o, at);
        crashes += 1;
        assert_eq!(key.exists(), *at == "wal-push:after-upload", "{at}: stored only once the upload completed");
        let o = env.walnut(&["wal-push", path.to_str().unwrap()]);
        assert!(o.status.success(), "{at}: the retry archives it: {}", stderr(&o));
        let back = scratch.path().join(format!("{s}.back"));
        let o = env.walnut(&["wal-fetch", s, back.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(std::fs::read(&back).unwrap() == std::fs::read(&path).unwrap(), "{at}: byte-identical");
    }
    pg.sql(&format!("ALTER SYSTEM SET archive_command = '{}'", env.archive_command().replace('\'', "''")));
    pg.sql("SELECT pg_reload_conf()");
    let last = pg.switch_wal();
    pg.wait_archived(&last, WAIT);

    // backup-push killed at its start, after a part, just before the manifest: never DONE.
    for at in ["backup-push:started", "backup-push:after-a-part", "backup-push:before-manifest"] {
        let o = crashing(&env, at, &["backup-push", "--pgdata", pg.pgdata.to_str().unwrap()], Some(&pg));
        killed(&o, at);
        crashes += 1;
        assert!(!list(&env).iter().any(|b| b["status"] == "DONE"), "{at}: no DONE backup");
    }
    // The next backup runs (the dead holder's lock is stale at once on this host) and is DONE.
    let o = backup_push(&env, &pg, Some("after-crashes"));
    assert!(o.status.success(), "{}", stderr(&o));
    let done: Vec<_> = list(&env).into_iter().filter(|b| b["status"] == "DONE").collect();
    assert_eq!(done.len(), 1, "{done:?}");

    // A restore killed after extracting a part leaves an interrupted DEST; re-running starts over.
    pg.sql("INSERT INTO t VALUES (0, 'last')");
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, WAIT);
    let (_d, dest) = restore_dir("crashed-restore");
    let o = crashing(&env, "backup-fetch:after-a-part", &["restore", dest.to_str().unwrap()], None);
    killed(&o, "backup-fetch:after-a-part");
    crashes += 1;
    assert!(dest.join(".walnut-restore-in-progress").exists(), "the interrupted restore is marked");
    let o = env.walnut(&["restore", dest.to_str().unwrap(), "--start"]);
    assert!(o.status.success(), "a re-run starts over: {}{}", stdout(&o), stderr(&o));
    assert!(!dest.join(".walnut-restore-in-progress").exists());
    let r = Restored::from_dir(&dest);
    assert_eq!(r.sql("SELECT count(*) FROM t"), "60001");
    drop(r);
    // A directory that is not an interrupted restore is still refused, and left alone.
    let (_d, other) = restore_dir("someone-elses");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("precious"), "keep").unwrap();
    let o = env.walnut(&["restore", other.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("not empty"), "{}", stderr(&o));
    assert_eq!(std::fs::read_to_string(other.join("precious")).unwrap(), "keep");

    // The agent killed in the middle of its scheduled backup: the next agent takes it, DONE.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let agent = |crash: Option<&str>| {
        let mut c = Command::new(walnut_bin());
        c.arg("--config").arg(&env.config).args(["agent", "--listen", &format!("127.0.0.1:{port}")]);
        c.env("PGHOST", "127.0.0.1").env("PGPORT", pg.port.to_string()).env("PGUSER", "postgres");
        c.env("PGDATA", &pg.pgdata);
        if let Some(at) = crash {
            c.env("WALNUT_CRASH_AT", at);
        }
        c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap()
    };
    // No scheduled backup yet in this repository: the agent starts one at once, and dies in it.
    let mut a = agent(Some("backup-push:after-a-part"));
    let mut status = None;
    PgCluster::wait_for("the agent to die at its crash point", WAIT, || {
        status = a.try_wait().unwrap();
        status.is_some()
    });
    assert!(matches!(status.unwrap().signal(), Some(9 | 6)));
    crashes += 1;
    let mut a = agent(None);
    PgCluster::wait_for("the next agent's scheduled backup", Duration::from_secs(90), || {
        list(&env).iter().filter(|b| b["status"] == "DONE").count() == 2
    });
    let _ = a.kill();
    let _ = a.wait();
    let o = env.walnut(&["wal-verify"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    summary_line(
        "crashes",
        &format!(
            "crashes: {crashes} kills at named stages, acknowledged WAL lost 0, backups DONE with a missing object 0"
        ),
    );
}
