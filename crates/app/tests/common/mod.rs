//! Shared helpers for walnut's end-to-end tests: repositories on `file://` and on the local S3
//! server, config files, running the walnut binary under test.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use walnut_testkit::{Azurite, PgCluster, S3Server, pg::PgOptions, shared_tempdir};

/// The walnut binary under test, at a path the `postgres` OS user can execute: the build may sit
/// below a directory only root can enter (a checkout under /root), so it is linked (or copied)
/// once into a world-readable directory under the temp dir, keyed by the build's size and time.
pub fn walnut_bin() -> &'static str {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        let built = PathBuf::from(env!("CARGO_BIN_EXE_walnut"));
        let meta = std::fs::metadata(&built).expect("the walnut binary is built");
        let stamp = meta.modified().unwrap().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join("walnut-test-bin").join(format!("{stamp}-{}", meta.len()));
        let target = dir.join("walnut");
        if !target.exists() {
            std::fs::create_dir_all(&dir).unwrap();
            for d in [dir.parent().unwrap(), dir.as_path()] {
                std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
            }
            let tmp = dir.join(format!(".walnut.{}", std::process::id()));
            if std::fs::hard_link(&built, &tmp).is_err() {
                std::fs::copy(&built, &tmp).unwrap();
            }
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::rename(&tmp, &target).unwrap();
        }
        target.display().to_string()
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    File,
    S3,
    /// `az://` on Azurite (its objects are not plain files: no [`Env::object_path`]).
    Azure,
}

/// A repository plus a config file pointing at it, in a directory the postgres user owns.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub backend: Backend,
    pub s3: Option<S3Server>,
    pub azurite: Option<Azurite>,
    pub repo_url: String,
    pub config: PathBuf,
}

impl Env {
    pub fn new(backend: Backend) -> Env {
        Env::with_extra(backend, "")
    }

    pub fn with_extra(backend: Backend, extra: &str) -> Env {
        let dir = shared_tempdir("walnut-env-");
        let (s3, azurite, repo_url) = match backend {
            Backend::File => (None, None, format!("file://{}/repo", dir.path().display())),
            Backend::S3 => {
                let s = S3Server::start();
                let url = s.repo_url("cluster-a");
                (Some(s), None, url)
            }
            Backend::Azure => {
                let url = format!("az://{}/cluster-a", walnut_testkit::azurite::CONTAINER);
                (None, Some(Azurite::start()), url)
            }
        };
        let config = dir.path().join("walnut.toml");
        let mut env = Env { dir, backend, s3, azurite, repo_url, config };
        env.write_config(extra);
        env
    }

    /// (Re)writes the config file: repo, state dir, backend settings, short storage bounds.
    pub fn write_config(&mut self, extra: &str) {
        let mut text =
            format!("repo = \"{}\"\nstate_dir = \"{}\"\n", self.repo_url, self.dir.path().join("state").display());
        // Split `extra` into top-level keys and sections so keys land before any [section].
        let (top, sections): (Vec<&str>, Vec<&str>) = {
            let mut top = vec![];
            let mut rest = vec![];
            let mut in_section = false;
            for line in extra.lines() {
                if line.trim_start().starts_with('[') {
                    in_section = true;
                }
                if in_section { rest.push(line) } else { top.push(line) }
            }
            (top, rest)
        };
        for l in top {
            text += l;
            text += "\n";
        }
        if !extra.contains("[storage]") {
            text += "[storage]\nrequest_timeout = \"2s\"\nretry_time = \"3s\"\ndeadline = \"6s\"\n";
        }
        if !extra.contains("[backup]") {
            text += "[backup]\narchive_wait = \"30s\"\n";
        }
        if let Some(s3) = &self.s3 {
            text += &s3.config_toml();
        }
        if let Some(az) = &self.azurite {
            text += "[azure]\n";
            for (k, v) in az.settings() {
                text += &format!("{k} = \"{v}\"\n");
            }
        }
        for l in sections {
            text += l;
            text += "\n";
        }
        std::fs::write(&self.config, text).unwrap();
        walnut_testkit::pg::give_to_postgres_user(self.dir.path());
    }

    pub fn archive_command(&self) -> String {
        format!("{} --config {} wal-push %p", walnut_bin(), self.config.display())
    }

    /// An archive command that also appends walnut's JSON report of each call to `log`.
    pub fn archive_command_logging(&self, log: &Path) -> String {
        format!("{} --json --config {} wal-push %p >> {}", walnut_bin(), self.config.display(), log.display())
    }

    pub fn restore_command_logging(&self, log: &Path) -> String {
        format!("{} --json --config {} wal-fetch %f %p >> {}", walnut_bin(), self.config.display(), log.display())
    }

    pub fn cluster(&self) -> PgCluster {
        PgCluster::start(PgOptions { archive_command: Some(self.archive_command()), ..Default::default() })
    }

    /// Runs walnut with this environment's config.
    pub fn walnut(&self, args: &[&str]) -> Output {
        Command::new(walnut_bin()).arg("--config").arg(&self.config).args(args).output().expect("run walnut")
    }

    /// The on-disk file behind a stored object (both backends store objects as plain files).
    pub fn object_path(&self, key: &str) -> PathBuf {
        match self.backend {
            Backend::File => self.dir.path().join("repo").join(key),
            Backend::S3 => self.s3.as_ref().unwrap().bucket_dir().join("cluster-a").join(key),
            Backend::Azure => panic!("Azurite does not store objects as plain files"),
        }
    }
}

/// The JSON lines of a log (walnut's `--json` reports appended by an archive or restore command).
pub fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Prints a summary line of the suite (the fault matrix, the bad-input count...) and keeps it in
/// `CARGO_TARGET_TMPDIR/walnut-summary/NAME.txt`, where `scripts/test.sh` prints it at the end
/// (cargo captures a passing test's output).
pub fn summary_line(name: &str, line: &str) {
    println!("{line}");
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("walnut-summary");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(format!("{name}.txt")), format!("{line}\n"));
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Archived segment names (`.done` in archive_status) that still exist in pg_wal.
pub fn archived_segments(pg: &PgCluster) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(pg.pgdata.join("pg_wal/archive_status"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_string_lossy().strip_suffix(".done").map(str::to_string))
        .filter(|n| n.len() == 24 && pg.pgdata.join("pg_wal").join(n).exists())
        .collect();
    v.sort();
    v
}

pub fn wal_key(name: &str) -> String {
    format!("wal/{}/{name}", &name[..8])
}

/// A cluster restored by `walnut restore --start`: stopped on drop.
pub struct Restored {
    pub pgdata: PathBuf,
    pub port: u16,
    pub bindir: PathBuf,
}

impl Restored {
    /// Reads the port walnut wrote into postgresql.auto.conf.
    pub fn from_dir(pgdata: &Path) -> Restored {
        let auto = std::fs::read_to_string(pgdata.join("postgresql.auto.conf")).unwrap();
        let port = auto.lines().rev().find_map(|l| l.strip_prefix("port = ")).unwrap().trim().parse().unwrap();
        Restored { pgdata: pgdata.to_path_buf(), port, bindir: walnut_testkit::pg::bindir() }
    }

    pub fn psql(&self, sql: &str) -> Output {
        walnut_testkit::pg::psql(&self.bindir, self.port, sql)
    }

    pub fn sql(&self, sql: &str) -> String {
        let o = self.psql(sql);
        assert!(o.status.success(), "psql {sql:?} on the restored cluster: {}", stderr(&o));
        stdout(&o).trim().to_string()
    }

    pub fn running(&self) -> bool {
        self.pgdata.join("postmaster.pid").exists()
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        let _ = walnut_testkit::pg::as_postgres(&self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(&self.pgdata)
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// A fresh directory for a restore (absent, its parent owned by postgres).
pub fn restore_dir(name: &str) -> (tempfile::TempDir, PathBuf) {
    let d = shared_tempdir("walnut-restore-");
    let p = d.path().join(name);
    (d, p)
}

/// `walnut backup-push` of `pg` with this environment's config, ready to run or spawn.
pub fn backup_push_cmd(env: &Env, pg: &PgCluster) -> Command {
    let mut c = Command::new(walnut_bin());
    c.arg("--config")
        .arg(&env.config)
        .args(["backup-push", "--pgdata", pg.pgdata.to_str().unwrap()])
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", pg.port.to_string())
        .env("PGUSER", "postgres");
    c
}

/// Takes a backup with walnut against `pg`.
pub fn backup_push(env: &Env, pg: &PgCluster, name: Option<&str>) -> Output {
    let mut args = vec!["backup-push".to_string(), "--pgdata".into(), pg.pgdata.display().to_string()];
    if let Some(n) = name {
        args.push("--name".into());
        args.push(n.into());
    }
    Command::new(walnut_bin())
        .arg("--config")
        .arg(&env.config)
        .args(&args)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", pg.port.to_string())
        .env("PGUSER", "postgres")
        .output()
        .unwrap()
}

pub fn now_utc() -> String {
    let o = Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%S.%6NZ"]).output().unwrap();
    stdout(&o).trim().to_string()
}

/// `pg_waldump` of `pg`'s WAL from `start` to `end` (times in UTC), with `extra` arguments.
pub fn pg_waldump(pg: &PgCluster, start: walnut_pg::Lsn, end: walnut_pg::Lsn, extra: &[&str]) -> String {
    let o = Command::new(pg.bindir.join("pg_waldump"))
        .args(extra)
        .arg("-p")
        .arg(pg.pgdata.join("pg_wal"))
        .arg("-s")
        .arg(start.to_string())
        .arg("-e")
        .arg(end.to_string())
        .env("TZ", "UTC")
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

// The agent as a process, and a minimal HTTP client for its API.

/// A minimal HTTP/1.1 client (loopback only): returns (status, body).
pub fn http(port: u16, method: &str, path: &str, body: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(120))).unwrap();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    // Chunked bodies: keep the JSON/text part.
    (status, body)
}

/// Sends `head` (request line and headers, without the blank line) and `body` as they are.
pub fn http_raw(port: u16, head: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60))).unwrap();
    write!(s, "{head}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

pub fn json_of(body: &str) -> serde_json::Value {
    let start = body.find(['{', '[']).unwrap_or(0);
    let end = body.rfind(['}', ']']).map(|e| e + 1).unwrap_or(body.len());
    serde_json::from_str(&body[start..end]).unwrap_or(serde_json::Value::Null)
}

pub struct AgentProc(pub std::process::Child);
impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn start_agent(env: &Env, pg: &PgCluster, port: u16, token: Option<&str>) -> AgentProc {
    start_agent_with(env, pg, port, token, false)
}

/// The agent run as the `postgres` OS user (when the tests run as root), like the archive command.
pub fn start_agent_as(env: &Env, pg: &PgCluster, port: u16, as_postgres: bool) -> AgentProc {
    start_agent_with(env, pg, port, None, as_postgres)
}

pub fn start_agent_with(env: &Env, pg: &PgCluster, port: u16, token: Option<&str>, as_postgres: bool) -> AgentProc {
    let mut c = if as_postgres {
        walnut_testkit::pg::as_postgres(std::path::Path::new(walnut_bin()))
    } else {
        std::process::Command::new(walnut_bin())
    };
    c.arg("--config").arg(&env.config).args(["agent", "--listen", &format!("127.0.0.1:{port}")]);
    c.env("PGHOST", "127.0.0.1").env("PGPORT", pg.port.to_string()).env("PGUSER", "postgres");
    c.env("PGDATA", &pg.pgdata);
    if let Some(t) = token {
        c.env("WALNUT_AGENT_TOKEN", t);
    }
    // The agent's log, kept beside its config (printed by a test that fails).
    let log = std::fs::File::create(env.dir.path().join("agent.log")).unwrap();
    c.stdout(log.try_clone().unwrap()).stderr(log);
    let child = AgentProc(c.spawn().unwrap());
    let t = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < std::time::Duration::from_secs(30), "agent did not start");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    child
}
