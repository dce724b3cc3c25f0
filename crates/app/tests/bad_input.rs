//! Bad input, end to end: a table of wrong command lines and config files run through the real
//! binary. Every row must fail (non-zero exit) with an error that names the cause (the key, the
//! option or the value), without a panic or a backtrace, and a restore or fetch must leave its
//! destination as it was. Only a `file://` repository in a temp dir and, for two rows, a local
//! PostgreSQL are used: no network beyond 127.0.0.1.
//!
//! Also: `show-config` never prints a password (plain and `--json`).

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use walnut_testkit::PgCluster;
use walnut_testkit::pg::PgOptions;

/// One bad input.
struct Row {
    what: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// Each must appear in stderr.
    want: Vec<String>,
    /// None may appear in stdout or stderr (secrets).
    never: Vec<String>,
    /// A destination that must be exactly as it was before (absent, or its files unchanged).
    dest: Option<PathBuf>,
}

impl Row {
    fn new<S: AsRef<str>>(what: &str, args: &[S], want: &[&str]) -> Row {
        Row {
            what: what.to_string(),
            args: args.iter().map(|s| s.as_ref().to_string()).collect(),
            env: vec![],
            want: want.iter().map(|s| s.to_string()).collect(),
            never: vec![],
            dest: None,
        }
    }
    fn env(mut self, k: &str, v: &str) -> Row {
        self.env.push((k.into(), v.into()));
        self
    }
    fn never(mut self, s: &str) -> Row {
        self.never.push(s.into());
        self
    }
    fn dest(mut self, d: &Path) -> Row {
        self.dest = Some(d.to_path_buf());
        self
    }
}

/// Every file under `p` with its content, or `None` if `p` does not exist.
fn snapshot(p: &Path) -> Option<Vec<(PathBuf, Vec<u8>)>> {
    fn walk(p: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
        if p.is_dir() {
            out.push((p.to_path_buf(), b"<dir>".to_vec()));
            let mut entries: Vec<PathBuf> = std::fs::read_dir(p).unwrap().map(|e| e.unwrap().path()).collect();
            entries.sort();
            for e in entries {
                walk(&e, out);
            }
        } else {
            out.push((p.to_path_buf(), std::fs::read(p).unwrap()));
        }
    }
    if std::fs::symlink_metadata(p).is_err() {
        return None;
    }
    let mut out = vec![];
    walk(p, &mut out);
    Some(out)
}

/// Runs one row; `Err` says what was wrong with walnut's answer.
fn run(row: &Row, scratch: &Path) -> Result<(), String> {
    let before = row.dest.as_deref().map(snapshot);
    let out_path = scratch.join("stdout");
    let err_path = scratch.join("stderr");
    let mut cmd = Command::new(walnut_bin());
    cmd.args(&row.args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        // A panic would say so, with a backtrace: the rows look for both.
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LOG", "");
    for k in [
        "WALNUT_CONFIG",
        "WALNUT_REPO",
        "WALNUT_COMPRESSION",
        "WALNUT_STATE_DIR",
        "WALNUT_AGENT_LISTEN",
        "WALNUT_AGENT_TOKEN",
        "WALNUT_NEW_PASSWORD",
        "PGDATA",
        "PGHOST",
        "PGPORT",
        "PGUSER",
        "PGPASSWORD",
        "AWS_ENDPOINT_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in &row.env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().map_err(|e| format!("spawn walnut: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err("still running after 20 s".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
    let mut problems = vec![];
    if status.success() {
        problems.push("exit 0".to_string());
    }
    for w in &row.want {
        if !stderr.contains(w.as_str()) {
            problems.push(format!("stderr lacks {w:?}"));
        }
    }
    for bad in ["panicked", "stack backtrace"] {
        if stderr.contains(bad) {
            problems.push(format!("stderr has {bad:?}"));
        }
    }
    for secret in &row.never {
        if stderr.contains(secret.as_str()) || stdout.contains(secret.as_str()) {
            problems.push(format!("the output shows {secret:?}"));
        }
    }
    if let (Some(d), Some(before)) = (&row.dest, before)
        && snapshot(d) != before
    {
        problems.push(format!("{} was written", d.display()));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("{} (exit {:?}); stderr: {}", problems.join(", "), status.code(), stderr.trim()))
    }
}

/// Writes `NAME.toml` beside the environment's config: the valid base (repository, state dir) plus `extra`.
fn config(env: &Env, name: &str, extra: &str) -> String {
    let path = env.dir.path().join(format!("{name}.toml"));
    let text =
        format!("repo = \"{}\"\nstate_dir = \"{}\"\n{extra}", env.repo_url, env.dir.path().join("state").display());
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn bad_inputs_fail_with_a_clear_error() {
    let env = Env::new(Backend::File);
    let dir = env.dir.path().to_path_buf();
    let good = env.config.display().to_string();
    let c = |args: &[&str]| -> Vec<String> {
        let mut v = vec!["--config".to_string(), good.clone()];
        v.extend(args.iter().map(|s| s.to_string()));
        v
    };
    // Destinations: absent ones, a non-empty one, a file.
    let absent = |n: &str| dir.join(format!("dest-{n}"));
    let full = dir.join("full");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::write(full.join("keep.txt"), "mine").unwrap();
    let a_file = dir.join("a-file");
    std::fs::write(&a_file, "mine").unwrap();
    let d = |p: &Path| p.display().to_string();
    let (d_full, d_file) = (d(&full), d(&a_file));
    // WAL-ish files.
    let not_wal = dir.join("notes.txt");
    std::fs::write(&not_wal, "hello").unwrap();
    let wal_dir = dir.join("pg_wal");
    std::fs::create_dir_all(&wal_dir).unwrap();
    let truncated = wal_dir.join("000000010000000000000001");
    std::fs::write(&truncated, "junk").unwrap();
    let missing_seg = wal_dir.join("000000010000000000000009");

    let mut rows: Vec<Row> = vec![];
    let mut n = 0;
    let mut restore_row = |what: &str, extra: &[&str], want: &[&str]| -> Row {
        n += 1;
        let dest = absent(&format!("restore-{n}"));
        let mut args = c(&["restore", &d(&dest)]);
        args.extend(extra.iter().map(|s| s.to_string()));
        Row::new(what, &args, want).dest(&dest)
    };

    // Repository URLs.
    rows.push(Row::new("ftp scheme", &["--repo", "ftp://x", "backup-list"], &["unknown scheme \"ftp\""]));
    rows.push(Row::new("s3 without bucket", &["--repo", "s3://", "backup-list"], &["needs a bucket name"]));
    rows.push(Row::new("gs without bucket", &["--repo", "gs://", "backup-list"], &["needs a bucket name"]));
    rows.push(Row::new(
        "relative file URL",
        &["--repo", "file://relative", "backup-list"],
        &["file URLs take an absolute path"],
    ));
    rows.push(Row::new("empty repo URL", &["--repo", "", "backup-list"], &["repository URL \"\": relative URL"]));
    rows.push(Row::new(
        "a path, not a URL",
        &["--repo", "/var/lib/walnut", "backup-list"],
        &["repository URL \"/var/lib/walnut\": relative URL"],
    ));
    let no_repo = dir.join("no-repo.toml");
    std::fs::write(&no_repo, format!("state_dir = \"{}\"\n", dir.join("state").display())).unwrap();
    rows.push(Row::new(
        "no repository at all",
        &["--config", &d(&no_repo), "backup-list"],
        &["no repository configured"],
    ));

    // Recovery targets (nothing may be written to DEST).
    rows.push(restore_row("time: a word", &["--target-time", "yesterday"], &["invalid target time \"yesterday\""]));
    rows.push(restore_row("time: no zone", &["--target-time", "2024-07-15 15:17:54"], &["has no time zone"]));
    rows.push(restore_row(
        "time: no such day",
        &["--target-time", "2024-02-30T00:00:00Z"],
        &["invalid target time \"2024-02-30T00:00:00Z\""],
    ));
    rows.push(restore_row("lsn: not hex", &["--target-lsn", "1/ZZ"], &["invalid LSN \"1/ZZ\""]));
    rows.push(restore_row("lsn: no slash", &["--target-lsn", "12345"], &["invalid LSN \"12345\""]));
    rows.push(restore_row("xid: a word", &["--target-xid", "abc"], &["'abc'", "--target-xid"]));
    rows.push(restore_row("xid: negative", &["--target-xid", "-5"], &["'-5'"]));
    rows.push(restore_row("xid: too large", &["--target-xid", "99999999999"], &["'99999999999'", "--target-xid"]));
    rows.push(restore_row(
        "two targets: lsn and time",
        &["--target-lsn", "1/0", "--target-time", "2024-07-15T15:17:54Z"],
        &["cannot be used with", "--target-time"],
    ));
    rows.push(restore_row(
        "two targets: name and immediate",
        &["--target-name", "x", "--target-immediate"],
        &["cannot be used with", "--target-immediate"],
    ));
    rows.push(restore_row("bad timeline", &["--target-timeline", "foo"], &["--target-timeline must be latest"]));
    rows.push(restore_row("bad target action", &["--target-action", "explode"], &["'explode'", "--target-action"]));
    rows.push(restore_row("port out of range", &["--port", "70000"], &["70000", "--port"]));
    rows.push(restore_row("port zero", &["--port", "0"], &["'0'", "--port", "1..=65535"]));
    rows.push(restore_row("empty target name", &["--target-name", ""], &["--target-name", "cannot be empty"]));
    rows.push(restore_row("timeline zero", &["--target-timeline", "0"], &["--target-timeline", "\"0\"", "start at 1"]));
    rows.push(restore_row(
        "standby with a target",
        &["--standby", "--target-time", "2024-07-15T15:17:54Z"],
        &["--standby follows the archive"],
    ));
    rows.push(restore_row(
        "set-password without the password",
        &["--set-password", "postgres"],
        &["WALNUT_NEW_PASSWORD"],
    ));
    rows.push(
        restore_row("set-password without --start", &["--set-password", "postgres"], &["needs --start"])
            .env("WALNUT_NEW_PASSWORD", "pw"),
    );
    rows.push(restore_row("restore from an empty repository", &[], &["is empty: nothing to restore"]));
    rows.push(Row::new("restore into a non-empty DEST", &c(&["restore", &d_full]), &["is not empty"]).dest(&full));
    rows.push(
        Row::new("restore into a file", &c(&["restore", &d_file]), &["is a file, not a directory"]).dest(&a_file),
    );

    // Backups.
    rows.push(Row::new("unknown backup", &c(&["backup-show", "nosuch"]), &["no backup matches \"nosuch\""]));
    rows.push(Row::new(
        "verify an unknown backup",
        &c(&["verify", "--backup", "nosuch"]),
        &["no backup matches \"nosuch\""],
    ));
    let bf = absent("fetch");
    rows.push(
        Row::new("fetch an unknown backup", &c(&["backup-fetch", &d(&bf), "nosuch"]), &["no backup matches"]).dest(&bf),
    );
    rows.push(
        Row::new("fetch into a non-empty DEST", &c(&["backup-fetch", &d_full, "LATEST"]), &["is not empty"])
            .dest(&full),
    );
    rows.push(Row::new(
        "backup name with a space",
        &c(&["backup-push", "--name", "bad name!"]),
        &["invalid backup name \"bad name!\""],
    ));
    rows.push(Row::new(
        "backup named LATEST",
        &c(&["backup-push", "--name", "LATEST"]),
        &["invalid backup name \"LATEST\""],
    ));
    rows.push(Row::new("retain 0", &c(&["delete", "retain", "0"]), &["delete retain 0 would delete the newest"]));
    rows.push(Row::new("retain -1", &c(&["delete", "retain", "-1"]), &["'-1'"]));
    rows.push(Row::new("empty restore point name", &c(&["restore-point", ""]), &["restore point names are 1 to 63"]));

    // WAL.
    rows.push(Row::new(
        "wal-push of a non-WAL file",
        &c(&["wal-push", &d(&not_wal)]),
        &["\"notes.txt\" is not a WAL file name"],
    ));
    rows.push(Row::new(
        "wal-push of a truncated segment",
        &c(&["wal-push", &d(&truncated)]),
        &["too short to hold a WAL page header"],
    ));
    rows.push(Row::new("wal-push of a missing file", &c(&["wal-push", &d(&missing_seg)]), &["No such file"]));
    rows.push(Row::new(
        "wal-fetch of a non-WAL name",
        &c(&["wal-fetch", "notawal", &d(&dir.join("x"))]),
        &["\"notawal\" is not a WAL file name"],
    ));
    rows.push(Row::new("wal-inspect of a missing file", &c(&["wal-inspect", &d(&missing_seg)]), &["No such file"]));
    rows.push(Row::new("unknown command", &c(&["nosuchcommand"]), &["'nosuchcommand'"]));

    // Config files and the environment.
    rows.push(Row::new(
        "missing config file",
        &["--config", &d(&dir.join("missing.toml")), "backup-list"],
        &["read config file", "missing.toml"],
    ));
    rows.push(Row::new("config file is a directory", &["--config", &d(&full), "backup-list"], &["read config file"]));
    let pgurl = config(&env, "pgurl", "[postgres]\nurl = \"postgresql://u:hunter2@h:port/db\"\n");
    rows.push(
        Row::new(
            "postgres url that does not parse (with a password)",
            &["--config", &pgurl, "backup-push"],
            &["[postgres] url is not a valid connection string"],
        )
        .never("hunter2"),
    );
    rows.push(
        Row::new(
            "compression from the environment",
            &c(&["backup-list"]),
            &["WALNUT_COMPRESSION is not valid", "brotli"],
        )
        .env("WALNUT_COMPRESSION", "brotli"),
    );
    let toml_rows: &[(&str, &str, &[&str])] = &[
        ("bad TOML", "repo2 = \n", &["line 3, column 9", "invalid string"]),
        ("duplicate key", "repo = \"file:///elsewhere\"\n", &["line 3", "duplicate key `repo`"]),
        ("level is a word", "compression_level = \"high\"\n", &["line 3, column 21", "compression_level", "\"high\""]),
        ("unknown key", "repos = 1\n", &["line 3, column 1", "repos: unknown field"]),
        ("unknown key in a section", "[s3]\nsecret = \"x\"\n", &["line 4", "[s3] secret: unknown field"]),
        ("unknown section", "[nosuch]\n", &["line 3", "nosuch: unknown field"]),
        ("unknown compression", "compression = \"brotli\"\n", &["line 3", "compression is not valid", "brotli"]),
        ("compression level 0", "compression_level = 0\n", &["line 3", "compression_level 0 is out of range"]),
        ("compression level 99", "compression_level = 99\n", &["compression_level 99 is out of range"]),
        ("zero parallel", "[backup]\nparallel = 0\n", &["line 4", "[backup] parallel must be 1 to 64, got 0"]),
        ("negative parallel", "[backup]\nparallel = -1\n", &["line 4", "[backup] parallel", "-1"]),
        ("huge parallel", "[backup]\nparallel = 100000\n", &["[backup] parallel must be 1 to 64, got 100000"]),
        ("zero part size", "[backup]\npart_size_mb = 0\n", &["line 4", "[backup] part_size_mb must be 1 to"]),
        ("huge part size", "[backup]\npart_size_mb = 99999999999999\n", &["[backup] part_size_mb must be 1 to"]),
        ("zero archive_wait", "[backup]\narchive_wait = \"0s\"\n", &["[backup] archive_wait must be at least 1s"]),
        (
            "zero request_timeout",
            "[storage]\nrequest_timeout = \"0s\"\n",
            &["line 4", "[storage] request_timeout must be at least 1s"],
        ),
        ("zero retry_time", "[storage]\nretry_time = \"0s\"\n", &["[storage] retry_time must be at least 1s"]),
        ("zero deadline", "[storage]\ndeadline = \"0s\"\n", &["[storage] deadline must be at least 1s"]),
        (
            "duration without unit",
            "[storage]\nrequest_timeout = \"5\"\n",
            &["line 4", "[storage] request_timeout", "time unit needed"],
        ),
        (
            "negative duration",
            "[storage]\nrequest_timeout = \"-5s\"\n",
            &["[storage] request_timeout", "cannot be negative"],
        ),
        (
            "unknown unit",
            "[storage]\nrequest_timeout = \"5 parsecs\"\n",
            &["[storage] request_timeout", "unknown time unit"],
        ),
        ("duration as a number", "[storage]\nrequest_timeout = 5\n", &["[storage] request_timeout: invalid type"]),
        (
            "huge frequency",
            "[settings]\nfull_backup_frequency = \"100000y\"\n",
            &["[settings] full_backup_frequency", "at most 100 years"],
        ),
        (
            "absurd window",
            "[settings]\nrecovery_window = \"1000000000000y\"\n",
            &["[settings] recovery_window", "at most 100 years"],
        ),
        (
            "frequency under 1h",
            "[settings]\nfull_backup_frequency = \"30min\"\n",
            &["[settings] full_backup_frequency must be at least 1h"],
        ),
        (
            "zero archive_timeout",
            "[settings]\narchive_timeout = \"0s\"\n",
            &["[settings] archive_timeout must be at least 1s"],
        ),
        (
            "window under 1d",
            "[settings]\nrecovery_window = \"12h\"\n",
            &["[settings] recovery_window must be at least 1d"],
        ),
        ("negative redundancy", "[settings]\nminimum_redundancy = -1\n", &["[settings] minimum_redundancy", "-1"]),
        (
            "huge redundancy",
            "[settings]\nminimum_redundancy = 100000\n",
            &["[settings] minimum_redundancy must be at most 1000"],
        ),
        (
            "zero retention_interval",
            "[agent]\nretention_interval = \"0s\"\n",
            &["[agent] retention_interval must be at least 1s"],
        ),
        (
            "huge shutdown_timeout",
            "[agent]\nshutdown_timeout = \"1000y\"\n",
            &["[agent] shutdown_timeout", "at most 100 years"],
        ),
        ("negative upload_ahead", "[wal]\nupload_ahead = -1\n", &["[wal] upload_ahead", "-1"]),
        ("huge prefetch", "[wal]\nprefetch = 100000\n", &["[wal] prefetch must be 0 to 256"]),
        ("path style as a word", "[s3]\nforce_path_style = \"yes\"\n", &["[s3] force_path_style: invalid type"]),
        ("compression as a number", "compression = 5\n", &["line 3, column 15", "compression: invalid type"]),
    ];
    let tls = format!(
        "[s3]\nendpoint = \"https://127.0.0.1:9\"\naccess_key_id = \"k\"\nsecret_access_key = \"s\"\nca_file = \"{}\"\n",
        dir.join("no-such-ca.pem").display()
    );
    let file = config(&env, "bad-ca-file", &tls);
    rows.push(Row::new(
        "ca_file that does not exist",
        &["--config", &file, "--repo", "s3://walnut/x", "backup-list"],
        &["[s3] ca_file", "no-such-ca.pem", "PEM file"],
    ));
    let toml_rows: Vec<(&str, &str, &[&str])> = toml_rows
        .iter()
        .copied()
        .chain([
            (
                "unknown azure key",
                "[azure]\nacount_name = \"x\"\n",
                &["[azure] acount_name", "not a setting of the Azure client"][..],
            ),
            ("unknown gcs key", "[gcs]\nservice_acount = \"x\"\n", &["[gcs] service_acount", "GCS client"][..]),
            ("ca_file as a number", "[s3]\nca_file = 5\n", &["[s3] ca_file: invalid type"][..]),
        ])
        .collect();
    for (i, (what, extra, want)) in toml_rows.iter().enumerate() {
        let file = config(&env, &format!("bad-{i}"), extra);
        let mut want: Vec<&str> = want.to_vec();
        want.push("config file");
        rows.push(Row::new(what, &["--config", &file, "backup-list"], &want));
    }

    // Two rows need a running server: the data directory it checks against.
    let pg = PgCluster::start(PgOptions::default());
    let port = pg.port.to_string();
    let nowhere = dir.join("no-pgdata");
    let with_server = |r: Row| r.env("PGHOST", "127.0.0.1").env("PGPORT", &port).env("PGUSER", "postgres");
    rows.push(with_server(Row::new(
        "backup-push --pgdata that does not exist",
        &c(&["backup-push", "--pgdata", &d(&nowhere)]),
        &["is not the data directory of this server", "--pgdata"],
    )));
    let empty = dir.join("empty-pgdata");
    std::fs::create_dir_all(&empty).unwrap();
    rows.push(with_server(
        Row::new(
            "PGDATA that is not a data directory",
            &c(&["backup-push"]),
            &["empty-pgdata", "is not the data directory"],
        )
        .env("PGDATA", &d(&empty)),
    ));

    let scratch = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut failures = vec![];
    for row in &rows {
        if let Err(e) = run(row, scratch.path()) {
            failures.push(format!("{}: {e}", row.what));
        }
    }
    drop(pg);
    let clear = rows.len() - failures.len();
    summary_line(
        "bad-inputs",
        &format!("bad inputs: {} run, {clear} with a clear error ({:.1?})", rows.len(), started.elapsed()),
    );
    for f in &failures {
        println!("  FAILED {f}");
    }
    assert!(rows.len() >= 40, "the matrix has {} rows", rows.len());
    assert!(
        failures.is_empty(),
        "{} of {} bad inputs without a clear error:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
}

/// `show-config` prints the resolved configuration: passwords in connection strings and URLs
/// never appear, plain or with `--json`.
#[test]
fn show_config_never_prints_passwords() {
    let env = Env::new(Backend::File);
    for (name, extra) in [
        ("url", "[postgres]\nurl = \"postgresql://walnut:hunter2-url@db.example:5432/postgres?sslmode=require\"\n"),
        ("query", "[postgres]\nurl = \"postgresql://walnut@db.example/postgres?password=hunter2-query\"\n"),
        ("keywords", "[postgres]\nurl = \"host=db.example user=walnut password='hunter2-kw' dbname=postgres\"\n"),
        (
            "endpoint",
            "[s3]\nendpoint = \"http://key:hunter2-endpoint@127.0.0.1:9000\"\nsecret_access_key = \"hunter2-s3\"\n",
        ),
        (
            "azure",
            "[azure]\naccount_name = \"acct\"\naccount_key = \"hunter2-az\"\nsas_key = \"sv=hunter2-sas\"\nendpoint = \"http://127.0.0.1:10000/acct\"\n",
        ),
        (
            "gcs",
            "[gcs]\nservice_account_key = \"{\\\"private_key\\\": \\\"hunter2-gcs\\\"}\"\n[postgres]\nurl = \"host=db.example\"\n",
        ),
    ] {
        let file = config(&env, name, extra);
        for json in [false, true] {
            let mut cmd = Command::new(walnut_bin());
            if json {
                cmd.arg("--json");
            }
            let o = cmd.args(["--config", &file, "show-config"]).env_remove("WALNUT_CONFIG").output().unwrap();
            let (out, err) = (stdout(&o), stderr(&o));
            assert!(o.status.success(), "{name}: {err}");
            assert!(
                !out.contains("hunter2") && !err.contains("hunter2"),
                "{name} (json {json}) shows a password:\n{out}"
            );
            assert!(out.contains("[redacted]"), "{name}: says it redacted:\n{out}");
            assert!(out.contains("db.example") || out.contains("127.0.0.1"), "{name}: the rest is shown:\n{out}");
        }
    }
}
