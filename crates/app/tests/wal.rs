//! End-to-end WAL archiving with a real PostgreSQL 15 and both `file://` and the local S3 server.

mod common;

use common::*;
use std::time::{Duration, Instant};
use walnut_testkit::PgCluster;
use walnut_testkit::pg::PgOptions;

const ARCHIVE_WAIT: Duration = Duration::from_secs(60);

/// Every archived segment fetched back is byte-identical; history files round-trip; re-push of an
/// identical file succeeds; a conflicting push fails and leaves the stored copy as it was.
fn archive_and_fetch_round_trip(backend: Backend) {
    let env = Env::new(backend);
    let pg = env.cluster();
    pg.sql("CREATE TABLE t AS SELECT g, md5(g::text) FROM generate_series(1, 20000) g");
    let mut last = String::new();
    for _ in 0..3 {
        last = pg.switch_wal();
    }
    pg.wait_archived(&last, ARCHIVE_WAIT);
    let segs = archived_segments(&pg);
    assert!(segs.len() >= 3, "expected at least 3 archived segments, got {segs:?}");

    let out_dir = tempfile::tempdir().unwrap();
    for s in &segs {
        let dest = out_dir.path().join(s);
        let o = env.walnut(&["wal-fetch", s, dest.to_str().unwrap()]);
        assert!(o.status.success(), "wal-fetch {s}: {}", stderr(&o));
        let original = std::fs::read(pg.pgdata.join("pg_wal").join(s)).unwrap();
        assert!(std::fs::read(&dest).unwrap() == original, "{s} differs after the round trip");
        // stored compressed, with the checksum envelope
        if backend != Backend::Azure {
            let stored = std::fs::read(env.object_path(&wal_key(s))).unwrap();
            assert_eq!(&stored[..4], b"WLNT");
        }
    }

    // Re-pushing an identical segment succeeds.
    let seg_path = pg.pgdata.join("pg_wal").join(&segs[0]);
    let o = env.walnut(&["wal-push", seg_path.to_str().unwrap()]);
    assert!(o.status.success(), "identical re-push: {}", stderr(&o));

    // A different file under an archived name is refused; the stored copy is untouched. The
    // change is in the padding after the WAL switch, so the file is still valid WAL.
    let switched = segs.last().unwrap().clone();
    let stored_before =
        (backend != Backend::Azure).then(|| std::fs::read(env.object_path(&wal_key(&switched))).unwrap());
    let fake_dir = walnut_testkit::shared_tempdir("walnut-conflict-");
    std::fs::create_dir_all(fake_dir.path().join("pg_wal")).unwrap();
    let mut changed = std::fs::read(pg.pgdata.join("pg_wal").join(&switched)).unwrap();
    let last = changed.len() - 1;
    changed[last] ^= 0xFF;
    let fake = fake_dir.path().join("pg_wal").join(&switched);
    std::fs::write(&fake, &changed).unwrap();
    let o = env.walnut(&["wal-push", fake.to_str().unwrap()]);
    assert!(!o.status.success(), "a conflicting push must fail");
    assert!(stderr(&o).contains("different file with this name is already archived"), "{}", stderr(&o));
    if let Some(before) = stored_before {
        assert_eq!(std::fs::read(env.object_path(&wal_key(&switched))).unwrap(), before);
    }
    let refetched = out_dir.path().join("refetched");
    let o = env.walnut(&["wal-fetch", &switched, refetched.to_str().unwrap()]);
    assert!(o.status.success(), "wal-fetch {switched}: {}", stderr(&o));
    assert!(
        std::fs::read(&refetched).unwrap() == std::fs::read(pg.pgdata.join("pg_wal").join(&switched)).unwrap(),
        "the stored copy of {switched} changed"
    );

    // Timeline history files round-trip (PostgreSQL's own are covered by the restore tests).
    let hist = fake_dir.path().join("pg_wal").join("00000002.history");
    let text = format!("1\t0/{:X}\tno recovery target specified\n", 3u64 << 24);
    std::fs::write(&hist, &text).unwrap();
    let o = env.walnut(&["wal-push", hist.to_str().unwrap()]);
    assert!(o.status.success(), "push history: {}", stderr(&o));
    let dest = out_dir.path().join("RECOVERYHISTORY");
    let o = env.walnut(&["wal-fetch", "00000002.history", dest.to_str().unwrap()]);
    assert!(o.status.success(), "fetch history: {}", stderr(&o));
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), text);
}

#[test]
fn file_archive_and_fetch_round_trip() {
    archive_and_fetch_round_trip(Backend::File);
}

#[test]
fn s3_archive_and_fetch_round_trip() {
    archive_and_fetch_round_trip(Backend::S3);
}

#[test]
fn azure_archive_and_fetch_round_trip() {
    archive_and_fetch_round_trip(Backend::Azure);
}

/// A second cluster pointed at the same repository cannot archive into it; the first cluster's
/// WAL stays intact. Missing segments exit 1 quietly; corrupt objects exit above 125, no DEST.
fn foreign_cluster_missing_and_corrupt(backend: Backend) {
    let env = Env::new(backend);
    let a = env.cluster();
    let seg = a.switch_wal();
    a.wal_key_ready(&seg);
    a.wait_archived(&seg, ARCHIVE_WAIT);
    let original = std::fs::read(a.pgdata.join("pg_wal").join(&seg)).unwrap();

    let b = env.cluster();
    let b_seg = b.switch_wal();
    // PostgreSQL retries; the failure is counted and nothing is stored for b.
    PgCluster::wait_for("cluster b's archiver to fail", ARCHIVE_WAIT, || b.archiver().2 > 0);
    let o = env.walnut(&["wal-push", b.pgdata.join("pg_wal").join(&b_seg).to_str().unwrap()]);
    assert!(!o.status.success());
    let msg = stderr(&o);
    assert!(msg.contains("belongs to another cluster"), "{msg}");
    let sysid_a = a.sql("SELECT system_identifier FROM pg_control_system()").trim().to_string();
    let sysid_b = b.sql("SELECT system_identifier FROM pg_control_system()").trim().to_string();
    assert!(msg.contains(&sysid_a) && msg.contains(&sysid_b), "names both clusters: {msg}");
    let dest_dir = tempfile::tempdir().unwrap();
    let dest = dest_dir.path().join("a");
    let o = env.walnut(&["wal-fetch", &seg, dest.to_str().unwrap()]);
    assert!(o.status.success());
    assert!(std::fs::read(&dest).unwrap() == original, "cluster a's WAL is intact");

    // Missing: exit 1, nothing at error level.
    let missing = dest_dir.path().join("missing");
    let o = env.walnut(&["wal-fetch", "0000000100000000000000FE", missing.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(!stderr(&o).contains("ERROR"), "no error-level output: {}", stderr(&o));
    assert!(!missing.exists());

    // Corrupt: flip bytes in the stored object.
    let obj = env.object_path(&wal_key(&seg));
    let mut bytes = std::fs::read(&obj).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    bytes[mid + 1] ^= 0x55;
    std::fs::write(&obj, &bytes).unwrap();
    let corrupt = dest_dir.path().join("corrupt");
    let o = env.walnut(&["wal-fetch", &seg, corrupt.to_str().unwrap()]);
    let code = o.status.code().unwrap();
    assert!(code > 125, "corrupt object must be fatal for PostgreSQL, got {code}: {}", stderr(&o));
    assert!(stderr(&o).contains(&seg), "names the object: {}", stderr(&o));
    assert!(!corrupt.exists(), "DEST must not be created");
}

#[test]
fn file_foreign_cluster_missing_and_corrupt() {
    foreign_cluster_missing_and_corrupt(Backend::File);
}

#[test]
fn s3_foreign_cluster_missing_and_corrupt() {
    foreign_cluster_missing_and_corrupt(Backend::S3);
}

trait ReadyExt {
    fn wal_key_ready(&self, seg: &str);
}
impl ReadyExt for PgCluster {
    /// Waits until PostgreSQL has marked `seg` ready or done (the switch is asynchronous).
    fn wal_key_ready(&self, seg: &str) {
        let st = self.pgdata.join("pg_wal/archive_status");
        PgCluster::wait_for("archive status", ARCHIVE_WAIT, || {
            st.join(format!("{seg}.ready")).exists() || st.join(format!("{seg}.done")).exists()
        });
    }
}

/// Truncated segments and segments whose header does not match their name are refused.
#[test]
fn invalid_segments_are_refused() {
    let env = Env::new(Backend::File);
    let pg = env.cluster();
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, ARCHIVE_WAIT);
    let good = std::fs::read(pg.pgdata.join("pg_wal").join(&seg)).unwrap();
    let dir = walnut_testkit::shared_tempdir("walnut-invalid-");
    let pg_wal = dir.path().join("pg_wal");
    std::fs::create_dir_all(&pg_wal).unwrap();

    // Truncated.
    let next = format!("{}{:08X}", &seg[..16], u32::from_str_radix(&seg[16..], 16).unwrap() + 100);
    std::fs::write(pg_wal.join(&next), &good[..good.len() / 2]).unwrap();
    let o = env.walnut(&["wal-push", pg_wal.join(&next).to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("truncated"), "{}", stderr(&o));

    // Whole, but its header says it is another segment (renamed by hand).
    std::fs::write(pg_wal.join(&next), &good).unwrap();
    let o = env.walnut(&["wal-push", pg_wal.join(&next).to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("the file name says"), "{}", stderr(&o));

    // A later timeline in the header than in the name. (An earlier one is valid: the head of a
    // new timeline's first segment is copied from the old timeline; see restore.rs.)
    let other_tli = format!("{}{:08X}", &seg[..16], u32::from_str_radix(&seg[16..], 16).unwrap() + 101);
    let mut later = good.clone();
    later[4..8].copy_from_slice(&7u32.to_le_bytes());
    std::fs::write(pg_wal.join(&other_tli), &later).unwrap();
    let o = env.walnut(&["wal-push", pg_wal.join(&other_tli).to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("timeline 7, after the file name's timeline 1"), "{}", stderr(&o));

    // Not WAL at all.
    std::fs::write(pg_wal.join(&next), vec![0x42u8; good.len()]).unwrap();
    let o = env.walnut(&["wal-push", pg_wal.join(&next).to_str().unwrap()]);
    assert!(!o.status.success());
    for name in [&next, &other_tli] {
        assert!(!env.object_path(&wal_key(name)).exists(), "{name} must not be stored");
    }
}

/// With the S3 server down, wal-push fails within its bound; once it is back, PostgreSQL's next
/// attempt archives the segment and nothing is lost.
#[test]
fn s3_outage_is_bounded_and_recovers() {
    let mut env = Env::new(Backend::S3);
    let pg = env.cluster();
    let first = pg.switch_wal();
    pg.wait_archived(&first, ARCHIVE_WAIT);

    env.s3.as_mut().unwrap().stop();
    let seg = pg.switch_wal();
    let path = pg.pgdata.join("pg_wal").join(&seg);
    let t = Instant::now();
    let o = env.walnut(&["wal-push", path.to_str().unwrap()]);
    let took = t.elapsed();
    assert!(!o.status.success(), "push must fail while storage is down");
    assert!(took < Duration::from_secs(15), "bounded by the configured deadline (6s), took {took:?}");
    PgCluster::wait_for("PostgreSQL to see a failed archive attempt", ARCHIVE_WAIT, || pg.archiver().2 > 0);

    env.s3.as_mut().unwrap().restart();
    pg.wait_archived(&seg, Duration::from_secs(120));
    let dest_dir = tempfile::tempdir().unwrap();
    for s in archived_segments(&pg) {
        let dest = dest_dir.path().join(&s);
        let o = env.walnut(&["wal-fetch", &s, dest.to_str().unwrap()]);
        assert!(o.status.success(), "{s} lost: {}", stderr(&o));
        assert!(std::fs::read(&dest).unwrap() == std::fs::read(pg.pgdata.join("pg_wal").join(&s)).unwrap());
    }
}

/// A burst of segments is archived with fewer uploading process starts than segments
/// (upload-ahead), and a real recovery through restore_command reads segments from the spool
/// (prefetch).
fn upload_ahead_and_prefetch(backend: Backend) {
    // The per-process path's upload-ahead (the WAL worker has its own tests).
    let env = Env::with_extra(backend, "[wal]\nupload_ahead = 4\nprefetch = 4\nworker = false\n");
    let push_log = env.dir.path().join("push.jsonl");
    // Archiving starts failing, so a backlog of .ready segments builds up.
    let pg = PgCluster::start(PgOptions { archive_command: Some("false".into()), ..Default::default() });
    pg.sql("CREATE TABLE t(x int)");
    let set_archive_command = |cmd: &str| {
        pg.sql(&format!("ALTER SYSTEM SET archive_command = '{}'", cmd.replace('\'', "''")));
        pg.sql("SELECT pg_reload_conf()");
    };
    // A base backup with PostgreSQL's own tool (it waits for its WAL to be archived, so archiving
    // works while it runs), to recover from later.
    set_archive_command(&env.archive_command());
    let base = walnut_testkit::shared_tempdir("walnut-base-");
    let bb = walnut_testkit::pg::as_postgres(&pg.bindir.join("pg_basebackup"))
        .args(["-h", "127.0.0.1", "-U", "postgres", "-X", "none", "-c", "fast", "-D"])
        .arg(base.path().join("data"))
        .arg("-p")
        .arg(pg.port.to_string())
        .output()
        .unwrap();
    assert!(bb.status.success(), "pg_basebackup: {}", stderr(&bb));
    set_archive_command("false");
    let mut last = String::new();
    for i in 0..8 {
        pg.sql(&format!("INSERT INTO t SELECT g FROM generate_series(1, 1000) g; SELECT {i}"));
        last = pg.switch_wal();
    }
    let expected_rows = pg.sql("SELECT count(*) FROM t").trim().to_string();
    let ready = std::fs::read_dir(pg.pgdata.join("pg_wal/archive_status")).unwrap().count();
    assert!(ready >= 8, "backlog built up: {ready}");
    set_archive_command(&env.archive_command_logging(&push_log));
    pg.wait_archived(&last, ARCHIVE_WAIT);

    let reports = json_lines(&push_log);
    let uploading = reports.iter().filter(|r| r["uploaded"] == true).count();
    let confirmed = reports.iter().filter(|r| r["confirmed_ahead"] == true).count();
    let ahead: usize = reports.iter().map(|r| r["ahead_uploaded"].as_array().unwrap().len()).sum();
    assert!(reports.len() >= 8, "one call per file: {reports:?}");
    assert!(confirmed >= 4 && ahead >= 4, "upload-ahead was used: {reports:?}");
    assert!(uploading < reports.len(), "fewer uploading calls ({uploading}) than files ({})", reports.len());

    // Recover the base backup with restore_command = walnut: segments come from the spool.
    let fetch_log = env.dir.path().join("fetch.jsonl");
    let data = base.path().join("data");
    let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
    let port = walnut_testkit::free_port();
    conf += &format!(
        "\nport = {port}\narchive_mode = off\nrestore_command = '{}'\nrecovery_target_action = 'promote'\n",
        env.restore_command_logging(&fetch_log)
    );
    std::fs::write(data.join("postgresql.conf"), conf).unwrap();
    std::fs::write(data.join("recovery.signal"), "").unwrap();
    walnut_testkit::pg::give_to_postgres_user(base.path());
    let out = walnut_testkit::pg::as_postgres(&pg.bindir.join("pg_ctl"))
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(base.path().join("log"))
        .args(["-w", "-t", "120", "start"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "restored cluster starts: {}",
        std::fs::read_to_string(base.path().join("log")).unwrap_or_default()
    );
    let psql = |sql: &str| {
        let o = std::process::Command::new(pg.bindir.join("psql"))
            .args(["-X", "-A", "-t", "-h", "127.0.0.1", "-U", "postgres", "-p", &port.to_string(), "-c", sql])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    PgCluster::wait_for("recovery to finish", Duration::from_secs(120), || psql("SELECT pg_is_in_recovery()") == "f");
    assert_eq!(psql("SELECT count(*) FROM t"), expected_rows, "every archived row recovered");
    let _ = walnut_testkit::pg::as_postgres(&pg.bindir.join("pg_ctl"))
        .arg("-D")
        .arg(&data)
        .args(["-m", "immediate", "stop"])
        .output();
    let fetches = json_lines(&fetch_log);
    let spooled = fetches.iter().filter(|r| r["status"] == "from_spool").count();
    assert!(spooled >= 2, "recovery read segments from the prefetch spool: {fetches:?}");
    assert!(fetches.iter().any(|r| r["status"] == "not_found"), "recovery ran to the end of the archive");
    assert!(!fetches.iter().any(|r| r["status"] == "error"), "{fetches:?}");
}

#[test]
fn file_upload_ahead_and_prefetch() {
    upload_ahead_and_prefetch(Backend::File);
}

#[test]
fn s3_upload_ahead_and_prefetch() {
    upload_ahead_and_prefetch(Backend::S3);
}

/// "Not archived" (exit 1, which PostgreSQL may take as the end of recovery and promote) only
/// from a repository that is there: a missing or unreadable repository is a failure above 125,
/// and a read never creates a repository.
#[test]
fn wal_fetch_from_a_missing_or_unreadable_repository_stops_recovery() {
    let env = Env::new(Backend::File);
    let dest_dir = tempfile::tempdir().unwrap();
    let dest = dest_dir.path().join("seg");
    let fatal = |o: &std::process::Output, what: &str| {
        let code = o.status.code().unwrap_or(0);
        assert!(code > 125, "{what}: exit {code} (must stop recovery): {}", stderr(o));
        assert!(!dest.exists(), "{what}: nothing delivered");
    };
    // A file:// repository that does not exist: refused, and not created by the read.
    let missing = env.dir.path().join("no-such-repo");
    let url = format!("file://{}", missing.display());
    let o = env.walnut(&["--repo", &url, "wal-fetch", "000000010000000000000001", dest.to_str().unwrap()]);
    fatal(&o, "missing file:// repository");
    assert!(stderr(&o).contains("no walnut repository"), "{}", stderr(&o));
    assert!(!missing.exists(), "a read must not create the repository");

    // An S3 bucket that does not exist.
    let s3_env = Env::new(Backend::S3);
    let o = s3_env.walnut(&[
        "--repo",
        "s3://no-such-bucket/x",
        "wal-fetch",
        "000000010000000000000001",
        dest.to_str().unwrap(),
    ]);
    fatal(&o, "missing S3 bucket");

    // A repository that is there, but whose identity cannot be read.
    let pg = env.cluster();
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, ARCHIVE_WAIT);
    let o = env.walnut(&["wal-fetch", "0000000100000000000000FE", dest.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "absent from a repository that is there: {}", stderr(&o));
    let identity = env.object_path("walnut.json");
    assert!(identity.exists(), "the identity object is at {}", identity.display());
    let aside = env.dir.path().join("identity.aside");
    std::fs::rename(&identity, &aside).unwrap();
    std::fs::create_dir(&identity).unwrap(); // reads fail with EISDIR
    let o = env.walnut(&["wal-fetch", "0000000100000000000000FE", dest.to_str().unwrap()]);
    fatal(&o, "unreadable identity");
    std::fs::remove_dir(&identity).unwrap();
    std::fs::rename(&aside, &identity).unwrap();
}

fn spooled_names(state: &std::path::Path) -> Vec<String> {
    let mut out = vec![];
    let mut stack = vec![state.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.parent().is_some_and(|d| d.ends_with("spool"))
                && !e.file_name().to_string_lossy().starts_with('.')
            {
                out.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// A repository wiped and re-created at the same URL by another cluster: wal-fetch hands out only
/// the new repository's WAL, never a segment the prefetcher spooled from the old one.
#[test]
fn a_recreated_repository_never_gets_the_old_ones_spooled_wal() {
    let env = Env::new(Backend::File);
    let a = env.cluster();
    let first = a.switch_wal();
    let mut last = first.clone();
    for _ in 0..3 {
        last = a.switch_wal();
    }
    a.wait_archived(&last, ARCHIVE_WAIT);
    drop(a);
    // As the server's user, like a restore_command (the state directory is that user's).
    let fetch = |name: &str, dest: &std::path::Path| {
        walnut_testkit::pg::as_postgres(std::path::Path::new(walnut_bin()))
            .arg("--config")
            .arg(&env.config)
            .args(["wal-fetch", name, dest.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let dest_dir = walnut_testkit::shared_tempdir("walnut-fetched-");
    walnut_testkit::pg::give_to_postgres_user(dest_dir.path());
    let o = fetch(&first, &dest_dir.path().join("first"));
    assert!(o.status.success(), "{}", stderr(&o));
    // The prefetcher (a detached process) spools the next segments.
    let state = env.dir.path().join("state");
    PgCluster::wait_for("the prefetcher to spool", ARCHIVE_WAIT, || spooled_names(&state).len() >= 2);
    let spooled = spooled_names(&state);

    // The repository is wiped and another cluster archives to the same URL.
    std::fs::remove_dir_all(env.dir.path().join("repo")).unwrap();
    let b = env.cluster();
    let mut b_last = String::new();
    for _ in 0..5 {
        b_last = b.switch_wal();
    }
    b.wait_archived(&b_last, ARCHIVE_WAIT);
    let sysid_b: u64 = b.sql("SELECT system_identifier FROM pg_control_system()").trim().parse().unwrap();
    let mut checked = 0;
    for name in spooled {
        let path = dest_dir.path().join(&name);
        let o = fetch(&name, &path);
        if o.status.code() == Some(1) {
            continue; // b did not write this one
        }
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let data = std::fs::read(&path).unwrap();
        let sysid = u64::from_le_bytes(data[24..32].try_into().unwrap());
        assert_eq!(sysid, sysid_b, "{name} must come from the new repository's cluster");
        checked += 1;
    }
    assert!(checked >= 1, "at least one spooled name was re-archived by the new cluster");
}
