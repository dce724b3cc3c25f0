//! The agent as a real process on loopback, with a real PostgreSQL 15 and a file repository.

mod common;

use common::*;
use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};
use walnut_testkit::PgCluster;

use walnut_testkit::free_port;

#[test]
fn agent_schedules_serves_the_api_and_keeps_settings() {
    let env = Env::with_extra(Backend::File, "[agent]\nretention_interval = \"1s\"");
    let pg = env.cluster();
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, Duration::from_secs(60));
    let port = free_port();
    let agent = start_agent(&env, &pg, port, None);

    // A repository with no scheduled backup gets one at start.
    PgCluster::wait_for("the first scheduled backup", Duration::from_secs(90), || {
        let (_, b) = http(port, "GET", "/v1/backups", "", None);
        json_of(&b).as_array().is_some_and(|a| a.iter().any(|x| x["status"] == "DONE"))
    });
    let mut h = String::new();
    PgCluster::wait_for("the next scheduled backup to be a frequency away", Duration::from_secs(30), || {
        let (status, body) = http(port, "GET", "/v1/health", "", None);
        h = body;
        status == 200 && json_of(&h)["next_scheduled_backup"].as_str().is_some_and(|t| t > now_utc().as_str())
    });
    let next_before = json_of(&h)["next_scheduled_backup"].clone();

    // On demand: DONE with its name, listed by the API and the CLI, schedule unchanged.
    let (status, b) = http(port, "POST", "/v1/backups", r#"{"name":"pre-migration"}"#, None);
    assert_eq!(status, 201, "{b}");
    assert_eq!(json_of(&b)["name"], "pre-migration");
    let (_, list) = http(port, "GET", "/v1/backups", "", None);
    assert!(list.contains("pre-migration"), "{list}");
    assert!(stdout(&env.walnut(&["backup-list"])).contains("pre-migration"));
    let (_, one) = http(port, "GET", "/v1/backups/pre-migration", "", None);
    assert_eq!(json_of(&one)["name"], "pre-migration");
    assert_eq!(http(port, "GET", "/v1/backups/nope", "", None).0, 404);
    let (_, h) = http(port, "GET", "/v1/health", "", None);
    assert_eq!(json_of(&h)["next_scheduled_backup"], next_before, "an on-demand backup never shifts the schedule");
    // Names are unique.
    assert_eq!(http(port, "POST", "/v1/backups", r#"{"name":"pre-migration"}"#, None).0, 409);

    // Bad settings: 400 naming the problem, nothing changed.
    let (_, before) = http(port, "GET", "/v1/settings", "", None);
    for (body, needle) in [
        (r#"{"recovery_window":"12h"}"#, "recovery_window must be at least 1d"),
        (r#"{"archive_timeout":"0s"}"#, "archive_timeout"),
        (r#"{"full_backup_frequency":5}"#, "full_backup_frequency must be a duration"),
        (r#"{"minimum_redundancy":-1}"#, "minimum_redundancy"),
        (r#"{"bogus":"1d"}"#, "unknown setting"),
        (r#"{"recovery_window":"7d","archive_timeout":"banana"}"#, "archive_timeout"),
        ("{not json", "malformed JSON"),
        (r#"["archive_timeout"]"#, "JSON object"),
        (r#"{"recovery_window":"100000y"}"#, "absurd"),
    ] {
        let (status, b) = http(port, "PATCH", "/v1/settings", body, None);
        assert_eq!(status, 400, "{body}: {b}");
        assert!(b.contains(needle), "{body}: {b}");
    }
    let big = format!(r#"{{"x":"{}"}}"#, "a".repeat(100_000));
    let (status, b) = http(port, "PATCH", "/v1/settings", &big, None);
    assert_eq!(status, 413);
    assert!(json_of(&b)["error"].is_string(), "413 is JSON too: {b}");
    // Every error is JSON, even axum's own.
    let (status, b) = http(port, "GET", "/nope", "", None);
    assert_eq!(status, 404);
    assert!(json_of(&b)["error"].is_string(), "{b}");
    let (status, b) = http(port, "DELETE", "/v1/settings", "", None);
    assert_eq!(status, 405);
    assert!(json_of(&b)["error"].is_string(), "{b}");
    // A web page cannot drive the loopback API: a foreign Host (DNS rebinding) is refused, and
    // so is a mutating request that is not application/json (a cross-site text/plain POST).
    let backups_before = backups_json(&env).len();
    let (status, b) = http_raw(port, "GET /v1/settings HTTP/1.1\r\nHost: evil.example:5500", "");
    assert_eq!(status, 403, "{b}");
    assert!(json_of(&b)["error"].as_str().unwrap_or("").contains("evil.example"), "{b}");
    let (status, b) =
        http_raw(port, "POST /v1/backups HTTP/1.1\r\nHost: evil.example\r\nContent-Type: application/json", "{}");
    assert_eq!(status, 403, "{b}");
    let (status, b) = http_raw(port, "POST /v1/backups HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain", "{}");
    assert_eq!(status, 415, "{b}");
    let (status, b) = http_raw(port, "PATCH /v1/settings HTTP/1.1\r\nHost: localhost", r#"{"recovery_window":"30d"}"#);
    assert_eq!(status, 415, "{b}");
    assert_eq!(backups_json(&env).len(), backups_before, "no backup was started");
    assert_eq!(http(port, "GET", "/v1/settings", "", None).1, before, "nothing changed");

    // A valid change applies at runtime without a restart, and survives an agent restart.
    let started = pg.sql("SELECT pg_postmaster_start_time()");
    let (status, b) = http(port, "PATCH", "/v1/settings", r#"{"archive_timeout":"5s"}"#, None);
    assert_eq!(status, 200, "{b}");
    assert_eq!(pg.sql("SHOW archive_timeout").trim(), "5s");
    assert_eq!(pg.sql("SELECT pg_postmaster_start_time()"), started, "PostgreSQL was not restarted");

    // Metrics parse as Prometheus text and move after a backup and after archiving.
    let metric = |name: &str| -> f64 {
        let (_, m) = http(port, "GET", "/metrics", "", None);
        for line in m.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let mut parts = line.split_whitespace();
            let (n, v) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(v.parse::<f64>().is_ok(), "unparsable sample {line:?}");
            if n == name {
                return v.parse().unwrap();
            }
        }
        -1.0
    };
    let archived = metric("walnut_wal_archived_total");
    let archived_bytes = metric("walnut_wal_archived_bytes_total");
    let bytes_before = metric("walnut_last_backup_timestamp_seconds");
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, Duration::from_secs(60));
    let archived_now = metric("walnut_wal_archived_total");
    assert!(archived_now > archived);
    // Bytes: the archived count times the cluster's WAL segment size (16 MiB here).
    assert!(archived_bytes >= 0.0, "walnut_wal_archived_bytes_total is exposed");
    let segment: f64 = pg.sql("SELECT pg_size_bytes(current_setting('wal_segment_size'))").trim().parse().unwrap();
    let bytes_now = metric("walnut_wal_archived_bytes_total");
    assert!(bytes_now > archived_bytes, "the archived bytes move after a switch: {archived_bytes} -> {bytes_now}");
    // Read after the count (archiving may go on in between): at least count x segment size.
    assert!(bytes_now >= archived_now * segment && bytes_now % segment == 0.0, "{bytes_now} vs {archived_now}");
    // A second backup in the same second as the last gets an ID of its own (no sleep needed).
    let count = |port| json_of(&http(port, "GET", "/v1/backups", "", None).1).as_array().map_or(0, Vec::len);
    let before = count(port);
    assert_eq!(http(port, "POST", "/v1/backups", "", None).0, 201);
    assert_eq!(count(port), before + 1);
    // Whole seconds: the new backup may end in the same second as the last.
    assert!(metric("walnut_last_backup_timestamp_seconds") >= bytes_before);
    assert!(metric("walnut_ready_backlog") >= 0.0);
    // Retention also runs periodically, between backups.
    let runs = metric("walnut_retention_runs_total");
    PgCluster::wait_for("a periodic retention run", Duration::from_secs(20), || {
        metric("walnut_retention_runs_total") > runs
    });
    assert_eq!(metric("walnut_retention_failures_total"), 0.0);

    drop(agent);
    let agent = start_agent(&env, &pg, port, None);
    let (_, s) = http(port, "GET", "/v1/settings", "", None);
    assert_eq!(json_of(&s)["archive_timeout"], "5s", "settings survive a restart: {s}");
    drop(agent);

    // With a token, requests without it get 401.
    let port2 = free_port();
    let _agent = start_agent(&env, &pg, port2, Some("s3cret-token"));
    assert_eq!(http(port2, "GET", "/v1/settings", "", None).0, 401);
    assert_eq!(http(port2, "GET", "/v1/settings", "", Some("wrong")).0, 401);
    assert_eq!(http(port2, "GET", "/v1/settings", "", Some("s3cret-token")).0, 200);
    for (method, path) in [("GET", "/metrics"), ("GET", "/v1/health"), ("GET", "/v1/backups"), ("POST", "/v1/backups")]
    {
        assert_eq!(http(port2, method, path, "", None).0, 401, "{method} {path} without the token");
    }
    assert_eq!(http(port2, "GET", "/metrics", "", Some("s3cret-token")).0, 200);
}

#[test]
fn non_loopback_without_a_token_refuses_to_start() {
    let env = Env::new(Backend::File);
    let o = Command::new(walnut_bin())
        .arg("--config")
        .arg(&env.config)
        .args(["agent", "--listen", "0.0.0.0:0"])
        .env_remove("WALNUT_AGENT_TOKEN")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("without a token"), "{}", stderr(&o));
}

fn backups_json(env: &Env) -> Vec<serde_json::Value> {
    let o = env.walnut(&["--json", "backup-list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap().as_array().unwrap().clone()
}

fn set_archive_command(pg: &PgCluster, cmd: &str) {
    pg.sql(&format!("ALTER SYSTEM SET archive_command = '{}'", cmd.replace('\'', "''")));
    pg.sql("SELECT pg_reload_conf()");
}

/// Sends SIGTERM and returns how long the agent took to exit, asserting it exited cleanly.
fn terminate(agent: &mut AgentProc, within: Duration) -> Duration {
    let t = Instant::now();
    let ok = Command::new("kill").args(["-TERM", &agent.0.id().to_string()]).status().unwrap().success();
    assert!(ok, "kill -TERM");
    loop {
        if let Some(status) = agent.0.try_wait().unwrap() {
            assert!(status.success(), "the agent exits 0 after SIGTERM, got {status}");
            return t.elapsed();
        }
        assert!(t.elapsed() < within, "the agent did not exit within {within:?} of SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A backup running when SIGTERM arrives finishes within `shutdown_timeout` (DONE), or is
/// abandoned after it and marked FAILED; the agent exits 0 either way and accepts nothing new.
#[test]
fn sigterm_lets_a_backup_finish_or_abandons_it_cleanly() {
    let mut env =
        // No WAL worker: part 2 breaks archiving with `false`, and a worker started in part 1
        // would go on storing the .ready segments the backup waits for.
        Env::with_extra(Backend::File, "[backup]\narchive_wait = \"120s\"\n[agent]\nshutdown_timeout = \"60s\"\n[wal]\nworker = false");
    let pg = env.cluster();
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, Duration::from_secs(60));
    let port = free_port();
    let mut agent = start_agent(&env, &pg, port, None);
    PgCluster::wait_for("the first scheduled backup", Duration::from_secs(90), || {
        backups_json(&env).iter().any(|b| b["status"] == "DONE")
    });
    let running = |env: &Env| backups_json(env).iter().any(|b| b["status"] == "RUNNING");

    // 1. Archiving broken: an on-demand backup waits for its WAL. SIGTERM, then archiving comes
    //    back inside the grace period: the backup finishes DONE and the request gets its answer.
    let failed = pg.archiver().2;
    set_archive_command(&pg, "false");
    let post = std::thread::spawn(move || http(port, "POST", "/v1/backups", r#"{"name":"during-shutdown"}"#, None));
    PgCluster::wait_for("the backup to be RUNNING", Duration::from_secs(30), || running(&env));
    // Past pg_backup_stop, waiting for its WAL: the archiver fails on the backup's last segment.
    PgCluster::wait_for("the backup to wait for its WAL", Duration::from_secs(30), || pg.archiver().2 > failed);
    let ok = Command::new("kill").args(["-TERM", &agent.0.id().to_string()]).status().unwrap().success();
    assert!(ok);
    PgCluster::wait_for("the agent to stop accepting connections", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
    });
    assert!(agent.0.try_wait().unwrap().is_none(), "the agent waits for the running backup");
    set_archive_command(&pg, &env.archive_command());
    let (status, body) = post.join().unwrap();
    assert_eq!(status, 201, "the backup finished inside the grace period: {body}");
    terminate(&mut agent, Duration::from_secs(30));
    let done = backups_json(&env);
    assert!(done.iter().any(|b| b["status"] == "DONE" && b["name"] == "during-shutdown"), "{done:?}");

    // 2. Archiving stays broken past a short grace period: the backup is abandoned, marked
    //    FAILED at once (not left RUNNING), and the agent exits shortly after the grace period.
    env.write_config("[backup]\narchive_wait = \"120s\"\n[agent]\nshutdown_timeout = \"3s\"\n[wal]\nworker = false");
    let port = free_port();
    let mut agent = start_agent(&env, &pg, port, None);
    let failed = pg.archiver().2;
    set_archive_command(&pg, "false");
    let post = std::thread::spawn(move || http(port, "POST", "/v1/backups", r#"{"name":"abandoned"}"#, None));
    PgCluster::wait_for("the backup to be RUNNING", Duration::from_secs(30), || running(&env));
    PgCluster::wait_for("the backup to wait for its WAL", Duration::from_secs(30), || pg.archiver().2 > failed);
    let took = terminate(&mut agent, Duration::from_secs(30));
    assert!(took >= Duration::from_secs(3), "the backup had its grace period ({took:?})");
    let (status, body) = post.join().unwrap();
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("abandoned"), "{body}");
    let after = backups_json(&env);
    let b = after.iter().find(|b| b["status"] != "DONE").expect("the abandoned backup is listed");
    assert_eq!(b["status"], "FAILED", "{after:?}");
    assert!(b["error"].as_str().unwrap_or("").contains("abandoned"), "{b}");
    assert!(!after.iter().any(|b| b["name"] == "abandoned"), "never DONE: {after:?}");

    // The cluster and the repository are fine afterwards.
    set_archive_command(&pg, &env.archive_command());
    let o = backup_push(&env, &pg, Some("after"));
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A client that sends `POST /v1/backups` and goes away after a second must not leave the backup
/// RUNNING for ever (a RUNNING backup pins all WAL from retention): the backup is the agent's
/// task, and it finishes DONE once its WAL is archived.
#[test]
fn a_backup_outlives_the_request_that_started_it() {
    let env = Env::with_extra(Backend::File, "[backup]\narchive_wait = \"120s\"");
    let pg = env.cluster();
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, Duration::from_secs(60));
    let port = free_port();
    let _agent = start_agent(&env, &pg, port, None);
    PgCluster::wait_for("the first scheduled backup", Duration::from_secs(90), || {
        backups_json(&env).iter().any(|b| b["status"] == "DONE")
    });
    let running = |env: &Env| backups_json(env).iter().any(|b| b["status"] == "RUNNING");

    // Archiving broken: the backup waits for its WAL while the client gives up and disconnects.
    let failed = pg.archiver().2;
    set_archive_command(&pg, "false");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    let body = r#"{"name":"orphan"}"#;
    write!(
        s,
        "POST /v1/backups HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    PgCluster::wait_for("the backup to be RUNNING", Duration::from_secs(30), || running(&env));
    // Past pg_backup_stop, waiting for its WAL, when the client goes away.
    PgCluster::wait_for("the backup to wait for its WAL", Duration::from_secs(30), || pg.archiver().2 > failed);
    s.shutdown(std::net::Shutdown::Both).unwrap();
    drop(s);
    // The agent notices the closed connection on its next read; the backup must go on
    // regardless, and it cannot finish before archiving is back.
    let (status, _) = http(port, "GET", "/v1/health", "", None);
    assert!(status == 200 || status == 503);
    set_archive_command(&pg, &env.archive_command());
    PgCluster::wait_for("the orphaned backup to finish DONE", Duration::from_secs(90), || {
        let list = backups_json(&env);
        !list.iter().any(|b| b["status"] == "RUNNING") && list.iter().any(|b| b["name"] == "orphan")
    });
    let list = backups_json(&env);
    let b = list.iter().find(|b| b["name"] == "orphan").unwrap();
    assert_eq!(b["status"], "DONE", "{list:?}");
}

/// Two clusters run by one OS user share a state directory: each agent keeps its own settings
/// (before, the second cluster's agent started with the first one's), and an agent makes
/// PostgreSQL run its archive_timeout at start, so GET /v1/settings is what is in force.
#[test]
fn settings_belong_to_one_cluster_and_are_in_force() {
    let env_a = Env::new(Backend::File);
    let pg_a = env_a.cluster();
    let seg = pg_a.switch_wal();
    pg_a.wait_archived(&seg, Duration::from_secs(60));
    let port = free_port();
    let agent = start_agent(&env_a, &pg_a, port, None);
    let (status, b) = http(port, "PATCH", "/v1/settings", r#"{"recovery_window":"30d","archive_timeout":"7s"}"#, None);
    assert_eq!(status, 200, "{b}");
    drop(agent);

    // Cluster b: its own repository, the same state directory.
    let env_b = Env::new(Backend::File);
    let shared = env_a.dir.path().join("state");
    let text = std::fs::read_to_string(&env_b.config).unwrap();
    let text =
        text.lines()
            .map(|l| {
                if l.starts_with("state_dir") { format!("state_dir = \"{}\"", shared.display()) } else { l.to_string() }
            })
            .collect::<Vec<_>>()
            .join("\n");
    std::fs::write(&env_b.config, text).unwrap();
    let pg_b = env_b.cluster();
    let seg = pg_b.switch_wal();
    pg_b.wait_archived(&seg, Duration::from_secs(60));
    pg_b.sql("ALTER SYSTEM SET archive_timeout = '13s'");
    pg_b.sql("SELECT pg_reload_conf()");
    let port = free_port();
    let _agent = start_agent(&env_b, &pg_b, port, None);
    let (_, s) = http(port, "GET", "/v1/settings", "", None);
    let s = json_of(&s);
    let window = humantime::parse_duration(s["recovery_window"].as_str().unwrap()).unwrap();
    assert_ne!(window, Duration::from_secs(30 * 86400), "cluster a's settings are not cluster b's: {s}");
    assert_ne!(s["archive_timeout"], "7s", "{s}");
    let want = humantime::parse_duration(s["archive_timeout"].as_str().unwrap()).unwrap().as_secs();
    let running: u64 =
        pg_b.sql("SELECT setting FROM pg_settings WHERE name = 'archive_timeout'").trim().parse().unwrap();
    assert_eq!(running, want, "PostgreSQL runs the agent's archive_timeout");
}

/// The value of a metric in a Prometheus exposition (`None` when absent).
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[test]
fn the_agent_verifies_on_its_interval_and_a_defect_fails_health() {
    let env = Env::with_extra(Backend::File, "[agent]\nverify_interval = \"1s\"");
    let pg = env.cluster();
    let o = backup_push(&env, &pg, None);
    assert!(o.status.success(), "{}", stderr(&o));
    let port = free_port();
    let _agent = start_agent(&env, &pg, port, None);
    let runs = |at_least: f64| {
        PgCluster::wait_for("verify runs", Duration::from_secs(60), || {
            metric(&http(port, "GET", "/metrics", "", None).1, "walnut_verify_runs_total").unwrap_or(0.0) >= at_least
        });
        http(port, "GET", "/metrics", "", None).1
    };
    let m = runs(1.0);
    assert_eq!(metric(&m, "walnut_verify_defects"), Some(0.0), "{m}");
    assert!(metric(&m, "walnut_verify_last_success_timestamp_seconds").is_some(), "{m}");
    let (status, body) = http(port, "GET", "/v1/health", "", None);
    assert_eq!(status, 200, "{body}");

    // A flipped byte in a part: the next run finds it, health names it.
    let data = env.dir.path().join("repo/backups");
    let id = std::fs::read_dir(&data).unwrap().next().unwrap().unwrap().file_name();
    let part = std::fs::read_dir(data.join(&id).join("data")).unwrap().next().unwrap().unwrap().path();
    let mut bytes = std::fs::read(&part).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&part, bytes).unwrap();
    let done = metric(&http(port, "GET", "/metrics", "", None).1, "walnut_verify_runs_total").unwrap();
    let m = runs(done + 2.0);
    assert!(metric(&m, "walnut_verify_defects").unwrap() >= 1.0, "{m}");
    let (status, body) = http(port, "GET", "/v1/health", "", None);
    assert_eq!(status, 503, "{body}");
    let part_name = part.file_name().unwrap().to_string_lossy().into_owned();
    assert!(body.contains("verify") && body.contains(&part_name), "health names the part: {body}");
}

#[test]
fn the_agent_drills_on_its_interval_and_a_failed_drill_fails_health() {
    let mut env = Env::new(Backend::File);
    let scratch = env.dir.path().join("drills");
    env.write_config(&format!("[drill]\ninterval = \"1s\"\nscratch_dir = \"{}\"", scratch.display()));
    let pg = env.cluster();
    pg.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g");
    let o = backup_push(&env, &pg, None);
    assert!(o.status.success(), "{}", stderr(&o));
    let port = free_port();
    let _agent = start_agent(&env, &pg, port, None);
    let get = || http(port, "GET", "/metrics", "", None).1;
    let log = || std::fs::read_to_string(env.dir.path().join("agent.log")).unwrap_or_default();
    PgCluster::wait_for("a drill", Duration::from_secs(120), || {
        metric(&get(), "walnut_drill_runs_total").unwrap_or(0.0) >= 1.0 || log().contains("drill failed")
    });
    let m = get();
    assert_eq!(metric(&m, "walnut_drill_success"), Some(1.0), "{m}\n{}", log());
    assert!(metric(&m, "walnut_drill_last_success_timestamp").is_some(), "{m}");
    assert!(metric(&m, "walnut_drill_recovery_seconds").unwrap() > 0.0, "{m}");
    let (status, body) = http(port, "GET", "/v1/health", "", None);
    assert_eq!(status, 200, "{body}");

    // Break the backups (the agent may have taken a scheduled one too): the next drill fails
    // and health says so.
    let data = env.dir.path().join("repo/backups");
    for b in std::fs::read_dir(&data).unwrap() {
        let parts = b.unwrap().path().join("data");
        for part in std::fs::read_dir(&parts).into_iter().flatten() {
            let part = part.unwrap().path();
            let mut bytes = std::fs::read(&part).unwrap();
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0x08;
            std::fs::write(&part, bytes).unwrap();
        }
    }
    PgCluster::wait_for("a failed drill", Duration::from_secs(120), || {
        metric(&get(), "walnut_drill_failures_total").unwrap_or(0.0) >= 1.0
    });
    let (status, body) = http(port, "GET", "/v1/health", "", None);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("restore drill") && body.contains("failed"), "{body}");
    assert_eq!(metric(&get(), "walnut_drill_success"), Some(0.0));
}

/// The RTO bound: with `[agent] max_replay`, once a restore to the latest point would replay
/// longer than that (here: a replay rate measured as very slow), the agent takes an incremental
/// backup; the estimate shows in health and the metrics; max_replay is a setting of the API.
#[test]
fn the_agent_takes_an_incremental_backup_when_replay_would_exceed_max_replay() {
    let env = Env::with_extra(Backend::File, "[agent]\nmax_replay = \"1min\"");
    let pg = env.cluster();
    let o = backup_push(&env, &pg, Some("first"));
    assert!(o.status.success(), "{}", stderr(&o));
    // A replay rate measured on this host as 64 MiB in ~17 hours: any WAL at all is too much.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let identity = rt.block_on(async {
        let store = walnut_storage::open(&env.repo_url, &Default::default()).unwrap();
        walnut_core::Repository::new(store).identity().await.unwrap().unwrap()
    });
    // Where the state directory keeps it (docs/repository-format.md, "Local state").
    let hash: String =
        walnut_core::envelope::sha256(env.repo_url.as_bytes())[..8].iter().map(|b| format!("{b:02x}")).collect();
    let dir = env.dir.path().join("state/repos").join(hash).join(identity.state_key());
    std::fs::create_dir_all(&dir).unwrap();
    let measured = walnut_core::replay::Measured { bytes: 64 << 20, seconds: 60_000.0, at: chrono::Utc::now() };
    std::fs::write(dir.join("replay-rate.json"), serde_json::to_vec(&measured).unwrap()).unwrap();
    walnut_testkit::pg::give_to_postgres_user(env.dir.path());
    pg.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 20000) g");
    let port = free_port();
    // As the state directory's owner (the archive command runs as postgres too).
    let _agent = start_agent_as(&env, &pg, port, true);
    let log = || std::fs::read_to_string(env.dir.path().join("agent.log")).unwrap_or_default();
    PgCluster::wait_for("an incremental backup by the RTO bound", Duration::from_secs(120), || {
        let (_, b) = http(port, "GET", "/v1/backups", "", None);
        json_of(&b).as_array().is_some_and(|a| a.iter().any(|x| x["type"] == "incremental" && x["status"] == "DONE"))
    });
    assert!(log().contains("over max_replay"), "{}", log());
    let (_, body) = http(port, "GET", "/v1/health", "", None);
    let h = json_of(&body);
    assert!(
        h["replay_estimate"]["measured"].as_bool() == Some(true) && h["replay_estimate"]["wal_bytes"].is_u64(),
        "{body}"
    );
    let m = http(port, "GET", "/metrics", "", None).1;
    assert!(metric(&m, "walnut_incremental_backups_total").unwrap_or(0.0) >= 1.0, "{m}");
    assert!(metric(&m, "walnut_replay_estimate_seconds").is_some(), "{m}");

    // The setting, through the API: validated, and null turns it off.
    let (status, body) = http(port, "PATCH", "/v1/settings", r#"{"max_replay": "10s"}"#, None);
    assert!(status == 400 && body.contains("max_replay must be at least 1min"), "{status} {body}");
    let (status, body) =
        http(port, "PATCH", "/v1/settings", r#"{"max_replay": null, "incremental_frequency": "6h"}"#, None);
    assert_eq!(status, 200, "{body}");
    let s = json_of(&body);
    assert!(s["max_replay"].is_null() && s["incremental_frequency"] == "6h", "{body}");
}
