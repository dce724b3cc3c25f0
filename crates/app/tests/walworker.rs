//! The WAL worker (`[wal] worker = true`) with a real PostgreSQL 15: a backlog archived through
//! it (segments stored before PostgreSQL asks for them), the worker killed right after an upload
//! (nothing lost, no conflict: the client stores the segment itself), and the worker's exit once
//! idle.

mod common;

use common::*;
use std::path::PathBuf;
use std::time::Duration;
use walnut_testkit::PgCluster;
use walnut_testkit::pg::PgOptions;

const WAIT: Duration = Duration::from_secs(90);

/// Files below the state directory's `workers/` ending in `ext`.
fn worker_files(env: &Env, ext: &str) -> Vec<PathBuf> {
    std::fs::read_dir(env.dir.path().join("state/workers"))
        .map(|rd| {
            rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == ext)).collect()
        })
        .unwrap_or_default()
}

/// A cluster whose archiving fails until `command` is set, with a backlog of `n` segments.
fn backlog(n: usize) -> (PgCluster, String) {
    let pg = PgCluster::start(PgOptions { archive_command: Some("false".into()), ..Default::default() });
    pg.sql("CREATE TABLE t(x int)");
    let mut last = String::new();
    for i in 0..n {
        pg.sql(&format!("INSERT INTO t SELECT g FROM generate_series(1, 2000) g; SELECT {i}"));
        last = pg.switch_wal();
    }
    (pg, last)
}

fn set_archive_command(pg: &PgCluster, cmd: &str) {
    pg.sql(&format!("ALTER SYSTEM SET archive_command = '{}'", cmd.replace('\'', "''")));
    pg.sql("SELECT pg_reload_conf()");
}

/// Every archived segment fetched back is the file PostgreSQL wrote.
fn all_round_trip(env: &Env, pg: &PgCluster) -> usize {
    let segs = archived_segments(pg);
    let out = tempfile::tempdir().unwrap();
    for s in &segs {
        let dest = out.path().join(s);
        let o = env.walnut(&["wal-fetch", s, dest.to_str().unwrap()]);
        assert!(o.status.success(), "wal-fetch {s}: {}", stderr(&o));
        assert!(
            std::fs::read(&dest).unwrap() == std::fs::read(pg.pgdata.join("pg_wal").join(s)).unwrap(),
            "{s} differs"
        );
    }
    segs.len()
}

#[test]
fn a_backlog_is_archived_through_the_worker_which_exits_when_idle() {
    let env = Env::with_extra(Backend::S3, "[wal]\nworker = true\nworker_idle = \"2s\"\nupload_ahead = 4\n");
    let (pg, last) = backlog(10);
    let log = env.dir.path().join("push.jsonl");
    set_archive_command(&pg, &env.archive_command_logging(&log));
    pg.wait_archived(&last, WAIT);

    let reports = json_lines(&log);
    let via_worker: Vec<_> = reports.iter().filter(|r| r.get("worker").is_some()).collect();
    let ahead = via_worker.iter().filter(|r| r["worker"] == "stored-ahead").count();
    assert!(via_worker.len() >= reports.len() / 2, "most segments went through the worker: {reports:?}");
    assert!(ahead >= 1, "the worker stored segments before PostgreSQL asked: {reports:?}");
    assert!(all_round_trip(&env, &pg) >= 10);

    // Idle: no request and no .ready segment for worker_idle, then it exits and removes its socket.
    PgCluster::wait_for("the idle worker to exit", Duration::from_secs(30), || worker_files(&env, "sock").is_empty());
    let log = std::fs::read_to_string(&worker_files(&env, "log")[0]).unwrap();
    assert!(log.contains("idle for"), "{log}");
}

#[test]
fn a_worker_killed_after_an_upload_loses_nothing() {
    let env = Env::with_extra(Backend::S3, "[wal]\nworker = true\nworker_idle = \"2s\"\nupload_ahead = 2\n");
    let (pg, last) = backlog(6);
    let log = env.dir.path().join("push.jsonl");
    // The worker inherits the crash point from the archive command that starts it: it dies
    // (SIGKILL) right after its first upload, before it answers or records anything.
    set_archive_command(&pg, &format!("WALNUT_CRASH_AT=wal-worker:after-upload {}", env.archive_command_logging(&log)));
    pg.wait_archived(&last, WAIT);
    assert!(all_round_trip(&env, &pg) >= 6, "every segment archived and intact");
    let worker_log = std::fs::read_to_string(&worker_files(&env, "log")[0]).unwrap();
    assert!(worker_log.contains("crash point wal-worker:after-upload"), "the worker was killed: {worker_log}");
    let text = std::fs::read_to_string(pg.log_path()).unwrap();
    assert!(!text.contains("different file with this name"), "no conflict after the kill:\n{text}");
}

/// Archiving switched away from walnut (here: paused) while `.ready` segments pile up: the
/// worker stops working ahead and exits once no request came for worker_idle.
#[test]
fn the_worker_stops_when_postgresql_stops_asking() {
    let env = Env::with_extra(Backend::File, "[wal]\nworker = true\nworker_idle = \"2s\"\nupload_ahead = 2\n");
    let (pg, last) = backlog(3);
    set_archive_command(&pg, &env.archive_command());
    pg.wait_archived(&last, WAIT);
    PgCluster::wait_for("a worker", Duration::from_secs(30), || !worker_files(&env, "sock").is_empty());
    set_archive_command(&pg, "false");
    for _ in 0..3 {
        pg.sql("INSERT INTO t SELECT g FROM generate_series(1, 2000) g");
        pg.switch_wal();
    }
    PgCluster::wait_for("the worker to exit though .ready files are left", Duration::from_secs(30), || {
        worker_files(&env, "sock").is_empty()
    });
    let ready = std::fs::read_dir(pg.pgdata.join("pg_wal/archive_status")).unwrap();
    assert!(ready.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().ends_with(".ready")));
}

/// The configuration changed under a running worker (here: encryption switched on) while
/// `.ready` segments wait: the worker notices, stores nothing more with its old settings and
/// exits; what is archived from then on is encrypted.
#[test]
fn a_worker_whose_configuration_changed_stores_nothing_more() {
    let extra = "[wal]\nworker = true\nworker_idle = \"60s\"\nupload_ahead = 2\n";
    let mut env = Env::with_extra(Backend::File, extra);
    let (pg, last) = backlog(2);
    set_archive_command(&pg, &env.archive_command());
    pg.wait_archived(&last, WAIT);
    PgCluster::wait_for("a worker", Duration::from_secs(30), || !worker_files(&env, "sock").is_empty());

    let (public, _) = walnut_core::crypt::generate();
    env.write_config(&format!("{extra}[encryption]\nrecipients = [\"{public}\"]\n"));
    // Segments made while archiving is paused: only a worker would store them now.
    set_archive_command(&pg, "false");
    let mut fresh = Vec::new();
    for _ in 0..3 {
        pg.sql("INSERT INTO t SELECT g FROM generate_series(1, 2000) g");
        fresh.push(pg.switch_wal());
    }
    PgCluster::wait_for("the outdated worker to exit", Duration::from_secs(30), || {
        worker_files(&env, "sock").is_empty()
    });
    set_archive_command(&pg, &env.archive_command());
    pg.wait_archived(fresh.last().unwrap(), WAIT);
    for seg in &fresh {
        let object = std::fs::read(env.object_path(&wal_key(seg))).unwrap();
        assert!(walnut_core::envelope::is_encrypted(&object), "{seg} was stored with the old settings");
    }
    let log = std::fs::read_to_string(&worker_files(&env, "log")[0]).unwrap();
    assert!(log.contains("configuration changed"), "{log}");
}
