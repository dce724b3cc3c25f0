//! The fault matrix: a real PostgreSQL 15 cluster archiving through walnut to the local S3
//! server behind the fault proxy. Fault after fault (503 burst, bodies cut mid-way, a slow
//! link, a short stall, a short outage), WAL is generated and archived, backups are taken and
//! downloaded; then, with the link healthy, every segment PostgreSQL was told is archived must
//! be in the repository byte-identical, every backup listed DONE must download and verify, a
//! restore must work, and no walnut invocation (PostgreSQL's archive_command ones included) may
//! have run longer than its bound.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};
use walnut_testkit::pg::PgOptions;
use walnut_testkit::{Fault, FaultProxy, PgCluster};

const WAIT: Duration = Duration::from_secs(60);
/// `Env`'s config bounds storage: request_timeout 2s, retry_time 3s, deadline 6s.
/// A command that moves one object (wal-push, wal-fetch) does a few storage operations, each
/// bounded by the deadline; under a fault the first one to fail ends it.
const ONE_OBJECT_BOUND: Duration = Duration::from_secs(15);
/// Commands that move many objects, and `backup-push`, which may wait for WAL (archive_wait
/// 30s in `Env`'s config), are bounded by that wait plus a couple of deadlines.
const MANY_OBJECTS_BOUND: Duration = Duration::from_secs(45);
/// The slow link's rate: the backup's biggest part (the `noise` table, a few MB compressed)
/// takes longer than request_timeout (2s), retry_time (3s) and the deadline (6s) together.
const THROTTLE: u64 = 400 << 10;

/// Every walnut invocation the test made, with how long it took and its bound.
#[derive(Default)]
struct Timings(Vec<(String, Duration, Duration)>);

impl Timings {
    fn run(&mut self, env: &Env, args: &[&str]) -> Output {
        self.run_cmd(args, Command::new(walnut_bin()).arg("--config").arg(&env.config).args(args))
    }

    fn run_cmd(&mut self, args: &[&str], cmd: &mut Command) -> Output {
        let bound = match args[0] {
            "wal-push" | "wal-fetch" => ONE_OBJECT_BOUND,
            _ => MANY_OBJECTS_BOUND,
        };
        let t = Instant::now();
        let o = cmd.output().expect("run walnut");
        self.0.push((args.join(" "), t.elapsed(), bound));
        o
    }

    fn backup_push(&mut self, env: &Env, pg: &PgCluster) -> Output {
        let pgdata = pg.pgdata.display().to_string();
        let args = ["backup-push", "--pgdata", pgdata.as_str()];
        self.run_cmd(
            &args,
            Command::new(walnut_bin())
                .arg("--config")
                .arg(&env.config)
                .args(args)
                .env("PGHOST", "127.0.0.1")
                .env("PGPORT", pg.port.to_string())
                .env("PGUSER", "postgres"),
        )
    }
}

/// An archive_command that also appends `MILLISECONDS EXIT_CODE` for each call to `log`.
fn timed_archive_command(env: &Env, log: &Path) -> String {
    // `%%` is PostgreSQL's escape for a literal `%`.
    format!(
        "start=$(date +%%s%%N); {} --config {} wal-push %p; rc=$?; \
         echo $(( ($(date +%%s%%N) - start) / 1000000 )) $rc >> {}; exit $rc",
        walnut_bin(),
        env.config.display(),
        log.display()
    )
}

fn archive_timings(log: &Path) -> Vec<(Duration, i32)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (ms, rc) = l.split_once(' ')?;
            Some((Duration::from_millis(ms.parse().ok()?), rc.trim().parse().ok()?))
        })
        .collect()
}

fn done_backups(env: &Env, timings: &mut Timings) -> Vec<String> {
    let o = timings.run(env, &["--json", "backup-list"]);
    assert!(o.status.success(), "backup-list: {}", stderr(&o));
    let list: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .filter(|b| b["status"] == "DONE")
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

/// Downloads a backup into a fresh directory; whether it worked, and what it said if not.
fn fetch_backup(env: &Env, timings: &mut Timings, id: &str) -> Result<(), String> {
    let (_d, dest) = restore_dir("fetch");
    let o = timings.run(env, &["backup-fetch", dest.to_str().unwrap(), id]);
    if o.status.success() && dest.join("PG_VERSION").exists() && dest.join("global/pg_control").exists() {
        Ok(())
    } else {
        Err(format!("backup-fetch {id}: {}{}", stdout(&o), stderr(&o)))
    }
}

/// Waits (bounded) until `cond` holds, polling.
fn wait_for(what: &str, cond: impl FnMut() -> bool) {
    PgCluster::wait_for(what, WAIT, cond);
}

fn some_writes(pg: &PgCluster, row: usize) {
    pg.sql(&format!("INSERT INTO matrix SELECT {row}, g FROM generate_series(1, 2000) g"));
}

#[test]
fn fault_matrix() {
    let started = Instant::now();
    let env = Env::new(Backend::S3);
    let s3 = env.s3.as_ref().unwrap();
    let proxy = FaultProxy::start(s3.addr());
    // Everything walnut does, PostgreSQL's archive_command included, goes through the proxy.
    let config = std::fs::read_to_string(&env.config)
        .unwrap()
        .replace(&s3.config_toml(), &s3.config_toml_via(&proxy.endpoint()));
    assert!(config.contains(&proxy.endpoint()), "{config}");
    std::fs::write(&env.config, config).unwrap();
    let archive_log = env.dir.path().join("archive-times.log");
    let pg = PgCluster::start(PgOptions {
        archive_command: Some(timed_archive_command(&env, &archive_log)),
        ..Default::default()
    });
    walnut_testkit::pg::give_to_postgres_user(env.dir.path());
    pg.sql("CREATE TABLE matrix(row_no int, x int)");
    let mut t = Timings::default();

    // A first backup and archived WAL with a healthy link.
    let o = t.backup_push(&env, &pg);
    assert!(o.status.success(), "backup-push with a healthy link: {}", stderr(&o));
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, WAIT);
    // A table of hard-to-compress text, one file of about 6 MB: the backups taken from here on
    // have a part that takes seconds to download on the slow link of row 3.
    pg.sql("CREATE TABLE noise AS SELECT g, md5(random()::text) || md5(random()::text) AS t FROM generate_series(1, 60000) g");

    let mut injected = 0;
    let mut survived = 0;
    let mut report = Vec::new();

    // 1. A burst of 503 SlowDown answers while WAL is archived and a backup is taken: the
    // client's retries absorb it, nothing fails.
    {
        let before = proxy.stats();
        proxy.set(Fault::Status503Burst(4));
        some_writes(&pg, 1);
        let mut last = String::new();
        for _ in 0..2 {
            last = pg.switch_wal();
        }
        let o = t.backup_push(&env, &pg);
        pg.wait_archived(&last, WAIT);
        let answered = proxy.stats().status_503 - before.status_503;
        injected += 1;
        let ok = o.status.success() && answered > 0;
        survived += ok as u32;
        report.push(format!("503 burst: {answered} answers of 503, backup-push ok={}", o.status.success()));
        assert!(ok, "503 burst ({answered} sent): backup-push: {}", stderr(&o));
        proxy.set(Fault::PassThrough);
    }

    // 2. Response bodies cut mid-way (every other one over 64 KiB): WAL fetches and a backup
    // download resume and are byte-identical.
    {
        let before = proxy.stats();
        proxy.set(Fault::ResetMidBody { after: 64 << 10, every: 2 });
        some_writes(&pg, 2);
        let last = pg.switch_wal();
        pg.wait_archived(&last, WAIT);
        let mut ok = true;
        for s in archived_segments(&pg).iter().rev().take(3) {
            let dest = env.dir.path().join(format!("cut-{s}"));
            let o = t.run(&env, &["wal-fetch", s, dest.to_str().unwrap()]);
            let same =
                o.status.success() && std::fs::read(&dest).ok() == std::fs::read(pg.pgdata.join("pg_wal").join(s)).ok();
            assert!(same, "wal-fetch {s} with bodies cut: {}", stderr(&o));
            ok &= same;
        }
        let latest = done_backups(&env, &mut t).pop().unwrap();
        let fetched = fetch_backup(&env, &mut t, &latest);
        let resets = proxy.stats().resets - before.resets;
        ok &= fetched.is_ok() && resets > 0;
        injected += 1;
        survived += ok as u32;
        report.push(format!("reset mid-body: {resets} bodies cut, fetches ok={ok}"));
        assert!(ok, "bodies cut ({resets}): {fetched:?}");
        proxy.set(Fault::PassThrough);
    }

    // 3. A slow link: a backup download that takes longer than request_timeout (2s) and the
    // deadline (6s) succeeds while bytes keep coming (defect 6).
    {
        let latest = done_backups(&env, &mut t).pop().unwrap();
        proxy.set(Fault::Throttle(THROTTLE));
        let fetched = fetch_backup(&env, &mut t, &latest);
        let took = t.0.last().unwrap().1;
        proxy.set(Fault::PassThrough);
        injected += 1;
        let ok = fetched.is_ok();
        survived += ok as u32;
        report.push(format!("throttle {THROTTLE} B/s: backup-fetch took {took:?}, ok={ok}"));
        assert!(took > Duration::from_secs(4), "the link was slow: {took:?}");
        assert!(ok, "slow link: {fetched:?}");
    }

    // 4. The link goes silent in the middle of a backup download, for good: backup-fetch fails
    // within its bound with a timeout naming the object (not a corruption) and leaves nothing.
    {
        let latest = done_backups(&env, &mut t).pop().unwrap();
        let (_d, dest) = restore_dir("silent");
        proxy.set(Fault::Throttle(THROTTLE));
        let before = proxy.stats();
        let started = Instant::now();
        let child = Command::new(walnut_bin())
            .arg("--config")
            .arg(&env.config)
            .args(["backup-fetch", dest.to_str().unwrap(), &latest])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The manifests and listings come first (a few hundred KB); the `noise` part alone takes
        // about 9 s at this rate, so at 1.5 MB it is being downloaded.
        wait_for("the download to be under way", || proxy.stats().body_bytes - before.body_bytes > 1_500_000);
        proxy.set(Fault::Stall);
        proxy.stall_open_bodies();
        let o = child.wait_with_output().unwrap();
        let took = started.elapsed();
        t.0.push((format!("backup-fetch {latest} (link silent)"), took, MANY_OBJECTS_BOUND));
        proxy.set(Fault::PassThrough);
        let e = stderr(&o);
        let left_empty = !dest.exists() || std::fs::read_dir(&dest).unwrap().next().is_none();
        let clear =
            e.contains("backups/") && e.contains(".tar") && (e.contains("gave up after") || e.contains("timed out"));
        let ok = !o.status.success() && clear && !e.contains("corrupt") && left_empty;
        injected += 1;
        survived += ok as u32;
        report.push(format!(
            "silent mid-download: backup-fetch failed after {took:?}, clear={clear}, left empty={left_empty}: {}",
            e.trim().lines().last().unwrap_or("")
        ));
        assert!(ok, "silent link: exit {:?}, left empty {left_empty}: {e}", o.status.code());
    }

    // 5 and 6. A short stall, then a short outage: archiving fails (bounded) while it lasts and
    // catches up after; a backup-push under the fault fails in bounded time and is not DONE.
    for fault in [Fault::Stall, Fault::Outage] {
        let before = proxy.stats();
        let failed_before = pg.archiver().2;
        let done_before = done_backups(&env, &mut t).len();
        proxy.set(fault);
        some_writes(&pg, 5);
        let seg = pg.switch_wal();
        // The fault lasts until PostgreSQL has seen an archive attempt fail.
        wait_for("an archive attempt to fail under the fault", || pg.archiver().2 > failed_before);
        let o = t.backup_push(&env, &pg);
        let hit = proxy.stats().injected() - before.injected();
        proxy.set(Fault::PassThrough);
        pg.wait_archived(&seg, WAIT);
        let done_after = done_backups(&env, &mut t).len();
        // A backup-push that failed must not have listed a backup DONE.
        let consistent = o.status.success() == (done_after == done_before + 1);
        injected += 1;
        let ok = hit > 0 && consistent;
        survived += ok as u32;
        report.push(format!(
            "{fault:?}: {hit} connections hit, backup-push ok={} (DONE {done_before} -> {done_after})",
            o.status.success()
        ));
        assert!(ok, "{fault:?}: hit {hit}, backup-push {}: {}", o.status.success(), stderr(&o));
    }

    // The healthy link: everything acknowledged is there, intact.
    let last = pg.switch_wal();
    pg.wait_archived(&last, WAIT);
    let mut lost = Vec::new();
    let mut segments = archived_segments(&pg);
    let (_, last_archived, _) = pg.archiver();
    if !segments.contains(&last_archived) {
        segments.push(last_archived.clone());
    }
    let fetched_dir = tempfile::tempdir().unwrap();
    for s in &segments {
        let dest = fetched_dir.path().join(s);
        let o = t.run(&env, &["wal-fetch", s, dest.to_str().unwrap()]);
        let local = std::fs::read(pg.pgdata.join("pg_wal").join(s)).ok();
        let intact = o.status.success() && local.is_none_or(|l| std::fs::read(&dest).ok() == Some(l));
        if !intact {
            lost.push(format!("{s}: {}", stderr(&o)));
        }
    }
    let o = t.run(&env, &["wal-verify", "--deep"]);
    assert!(o.status.success(), "wal-verify --deep: {}{}", stdout(&o), stderr(&o));
    let mut corrupt = Vec::new();
    let done = done_backups(&env, &mut t);
    for id in &done {
        if let Err(e) = fetch_backup(&env, &mut t, id) {
            corrupt.push(e);
        }
    }

    // A restore from the latest backup, through the proxy with bodies cut now and then (the
    // backup's parts and the WAL PostgreSQL fetches), replays the archived WAL.
    let expected = pg.sql("SELECT count(*) FROM matrix").trim().to_string();
    let (_d, dest) = restore_dir("matrix");
    let resets_before = proxy.stats().resets;
    proxy.set(Fault::ResetMidBody { after: 32 << 10, every: 3 });
    let o = t.run(&env, &["restore", dest.to_str().unwrap(), "--start"]);
    proxy.set(Fault::PassThrough);
    let restore_cuts = proxy.stats().resets - resets_before;
    report.push(format!("restore --start with bodies cut: {restore_cuts} cut, ok={}", o.status.success()));
    assert!(o.status.success(), "restore --start: {}{}", stdout(&o), stderr(&o));
    assert!(restore_cuts > 0, "the restore's downloads were cut");
    let r = Restored::from_dir(&dest);
    assert_eq!(r.sql("SELECT count(*) FROM matrix"), expected, "the restore saw every archived change");
    drop(r);

    // Bounds: every invocation the test made, and every archive_command run.
    let mut over: Vec<String> =
        t.0.iter()
            .filter(|(_, took, bound)| took > bound)
            .map(|(c, took, b)| format!("{c}: {took:?} > {b:?}"))
            .collect();
    let archived = archive_timings(&archive_log);
    over.extend(
        archived
            .iter()
            .filter(|(took, _)| *took > ONE_OBJECT_BOUND)
            .map(|(took, rc)| format!("archive_command: {took:?} (exit {rc})")),
    );
    let slowest = t.0.iter().max_by_key(|(_, d, _)| *d).map(|(c, d, _)| format!("{c} {d:?}")).unwrap();
    let slowest_push = archived.iter().map(|(d, _)| *d).max().unwrap();
    let failed_pushes = archived.iter().filter(|(_, rc)| *rc != 0).count();

    for line in &report {
        eprintln!("  {line}");
    }
    eprintln!(
        "  {} walnut invocations, {} archive_command runs ({failed_pushes} failed under faults, slowest {slowest_push:?}), slowest invocation {slowest}; \
         {} segments and {} DONE backups checked; {:?} in all",
        t.0.len(),
        archived.len(),
        segments.len(),
        done.len(),
        started.elapsed()
    );
    summary_line(
        "fault-matrix",
        &format!(
            "fault matrix: {injected} faults injected, {survived} survived, acknowledged WAL lost {}, corrupt backups listed DONE {}",
            lost.len(),
            corrupt.len()
        ),
    );
    assert!(lost.is_empty(), "acknowledged WAL lost: {lost:?}");
    assert!(corrupt.is_empty(), "backups listed DONE that do not download: {corrupt:?}");
    assert!(over.is_empty(), "invocations over their bound: {over:?}");
    assert_eq!(survived, injected);
}
