//! A real PostgreSQL 15 cluster for tests.
//!
//! PostgreSQL refuses to run as root; when the tests run as root (CI does), every server-side
//! command runs as the unprivileged `postgres` OS user through `setpriv`, and the cluster's
//! directories are given to that user.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const FIX: &str = "install the PostgreSQL 15 server (apt-get install postgresql-15), or run `bash .ci/run`, which installs what the tests need";

pub fn is_root() -> bool {
    // The effective UID, asked of `id` once (no libc call needed).
    static ROOT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ROOT.get_or_init(|| {
        Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
    })
}

/// Gives `path` (recursively) to the `postgres` OS user when running as root.
pub fn give_to_postgres_user(path: &Path) {
    if is_root() {
        let st = Command::new("chown").args(["-R", "postgres:postgres"]).arg(path).status().expect("run chown");
        assert!(st.success(), "chown -R postgres {}: the `postgres` OS user must exist ({FIX})", path.display());
    }
}

/// The directory with initdb, pg_ctl and postgres: `pg_config --bindir`, else Debian's path.
pub fn bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("WALNUT_TEST_PG_BINDIR") {
        return PathBuf::from(dir);
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let candidates = from_pg_config.into_iter().chain([PathBuf::from("/usr/lib/postgresql/15/bin")]);
    for c in candidates {
        if c.join("postgres").exists() && c.join("initdb").exists() {
            return c;
        }
    }
    panic!(
        "PostgreSQL 15 server binaries (initdb, postgres) not found via `pg_config --bindir` or /usr/lib/postgresql/15/bin: {FIX}"
    );
}

/// A command that runs as the `postgres` OS user when we are root.
pub fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A free TCP port on 127.0.0.1 for a server a test starts (PostgreSQL, the agent). It is picked
/// at random *below* the kernel's ephemeral range: a port from that range, free when checked,
/// can be taken as the local end of any outgoing connection (tests make many) before the server
/// binds it. Two tests may still pick the same port: [`PgCluster`] retries on another one.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|t| t.parse::<u16>().ok()))
        .unwrap_or(32768);
    const LOW: u16 = 12000;
    if ephemeral_low > LOW + 1000 {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let mut x =
            (nanos as u64) ^ (u64::from(std::process::id()) << 32) ^ SEQ.fetch_add(0x9E37_79B9, Ordering::Relaxed);
        for _ in 0..100 {
            // xorshift64: enough to spread the picks of parallel test processes.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let port = LOW + (x % u64::from(ephemeral_low - LOW)) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn check(what: &str, out: Output) -> String {
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Options for a new cluster.
pub struct PgOptions {
    /// `archive_command`, or `None` to leave archiving off.
    pub archive_command: Option<String>,
    /// `initdb --wal-segsize` in MiB.
    pub wal_segsize_mb: u32,
    /// `initdb --data-checksums`.
    pub data_checksums: bool,
    pub extra_conf: String,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions { archive_command: None, wal_segsize_mb: 16, data_checksums: false, extra_conf: String::new() }
    }
}

pub struct PgCluster {
    pub dir: tempfile::TempDir,
    pub pgdata: PathBuf,
    pub port: u16,
    pub bindir: PathBuf,
    running: bool,
}

impl PgCluster {
    /// `initdb` a new cluster in a temporary directory and start it.
    pub fn start(opts: PgOptions) -> PgCluster {
        let bindir = bindir();
        let dir = crate::shared_tempdir("walnut-pg-");
        let pgdata = dir.path().join("data");
        let out = as_postgres(&bindir.join("initdb"))
            .arg("-D")
            .arg(&pgdata)
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"])
            .arg(format!("--wal-segsize={}", opts.wal_segsize_mb))
            .args(opts.data_checksums.then_some("--data-checksums"))
            .output()
            .unwrap_or_else(|e| panic!("run initdb: {e}: {FIX}"));
        check("initdb", out);
        let port = free_port();
        let mut conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             wal_level = replica\nmax_wal_senders = 2\nfsync = off\nfull_page_writes = on\n\
             shared_buffers = 32MB\nmax_wal_size = 256MB\nlog_min_messages = info\n\
             logging_collector = off\n",
            dir.path().display()
        );
        if let Some(cmd) = &opts.archive_command {
            conf += &format!("archive_mode = on\narchive_command = '{}'\n", cmd.replace('\'', "''"));
        }
        conf += &opts.extra_conf;
        let conf_path = pgdata.join("postgresql.conf");
        let mut existing = std::fs::read_to_string(&conf_path).unwrap();
        existing += "\n# walnut test fixture\n";
        existing += &conf;
        std::fs::write(&conf_path, existing).unwrap();
        give_to_postgres_user(dir.path());
        let mut c = PgCluster { dir, pgdata, port, bindir, running: false };
        c.pg_ctl_start();
        c
    }

    /// A streaming standby of `primary` (pg_basebackup -R), started on a port of its own, with
    /// `extra_conf` appended to its configuration. It inherits the primary's archive settings,
    /// which a standby does not use (archive_mode = on archives on the primary only).
    pub fn standby_of(primary: &PgCluster, extra_conf: &str) -> PgCluster {
        let bindir = bindir();
        let dir = crate::shared_tempdir("walnut-standby-");
        give_to_postgres_user(dir.path());
        let pgdata = dir.path().join("data");
        let out = as_postgres(&bindir.join("pg_basebackup"))
            .arg("-D")
            .arg(&pgdata)
            .args(["-h", "127.0.0.1", "-U", "postgres", "-R", "-X", "stream", "-c", "fast", "--no-sync"])
            .arg("-p")
            .arg(primary.port.to_string())
            .output()
            .unwrap_or_else(|e| panic!("run pg_basebackup: {e}: {FIX}"));
        check("pg_basebackup -R", out);
        let port = free_port();
        let conf_path = pgdata.join("postgresql.conf");
        let mut conf = std::fs::read_to_string(&conf_path).unwrap();
        conf += &format!(
            "\n# walnut test standby\nport = {port}\nunix_socket_directories = '{}'\nhot_standby = on\n{extra_conf}\n",
            dir.path().display()
        );
        std::fs::write(&conf_path, conf).unwrap();
        give_to_postgres_user(dir.path());
        let mut c = PgCluster { dir, pgdata, port, bindir, running: false };
        c.pg_ctl_start();
        c
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    /// `pg_ctl start`; when another process took the port first, the server moves to another
    /// (a `port` line appended to postgresql.conf wins) and starts again.
    pub fn pg_ctl_start(&mut self) {
        for attempt in 0.. {
            let log_before = std::fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0);
            let out = as_postgres(&self.bindir.join("pg_ctl"))
                .arg("-D")
                .arg(&self.pgdata)
                .arg("-l")
                .arg(self.log_path())
                .args(["-w", "-t", "60", "start"])
                .output()
                .expect("run pg_ctl");
            if out.status.success() {
                self.running = true;
                return;
            }
            let log = std::fs::read(self.log_path()).unwrap_or_default();
            let new_lines = String::from_utf8_lossy(log.get(log_before as usize..).unwrap_or_default()).into_owned();
            if attempt < 5 && new_lines.contains("Address already in use") {
                self.port = free_port();
                let conf_path = self.pgdata.join("postgresql.conf");
                let mut conf = std::fs::read_to_string(&conf_path).unwrap();
                conf += &format!("\n# the port was taken: moved\nport = {}\n", self.port);
                std::fs::write(&conf_path, conf).unwrap();
                continue;
            }
            panic!("pg_ctl start failed: {}\n{}", String::from_utf8_lossy(&out.stderr), String::from_utf8_lossy(&log));
        }
    }

    /// `pg_ctl stop -m MODE` (smart, fast, immediate).
    pub fn stop(&mut self, mode: &str) {
        let out = as_postgres(&self.bindir.join("pg_ctl"))
            .arg("-D")
            .arg(&self.pgdata)
            .args(["-w", "-t", "60", "-m", mode, "stop"])
            .output()
            .expect("run pg_ctl");
        check("pg_ctl stop", out);
        self.running = false;
    }

    /// Runs SQL through psql and returns its unaligned, tuples-only output.
    pub fn sql(&self, sql: &str) -> String {
        check(&format!("psql {sql:?}"), self.psql(sql))
    }

    pub fn psql(&self, sql: &str) -> Output {
        psql(&self.bindir, self.port, sql)
    }

    /// A libpq connection URL for this cluster.
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Waits until `cond` holds, polling, or panics after `timeout` with `what`.
    pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            if start.elapsed() > timeout {
                panic!("timed out after {timeout:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Forces a WAL switch (after making sure the current segment has something in it) and returns
    /// the name of the segment that was completed.
    pub fn switch_wal(&self) -> String {
        self.sql("CREATE TABLE IF NOT EXISTS walnut_switch(x int); INSERT INTO walnut_switch VALUES (1)");
        self.sql("SELECT pg_walfile_name(pg_switch_wal())").trim().to_string()
    }

    /// `(archived_count, last_archived_wal, failed_count)` from `pg_stat_archiver`.
    pub fn archiver(&self) -> (u64, String, u64) {
        let out = self.sql("SELECT archived_count, coalesce(last_archived_wal,''), failed_count FROM pg_stat_archiver");
        let parts: Vec<&str> = out.trim().split('|').collect();
        (parts[0].parse().unwrap(), parts[1].to_string(), parts[2].parse().unwrap())
    }

    /// Waits until PostgreSQL reports `name` archived (or a later segment).
    pub fn wait_archived(&self, name: &str, timeout: Duration) {
        PgCluster::wait_for(&format!("{name} to be archived"), timeout, || {
            let (_, last, _) = self.archiver();
            !last.is_empty() && last.as_str() >= name
        });
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running {
            let _ = as_postgres(&self.bindir.join("pg_ctl"))
                .arg("-D")
                .arg(&self.pgdata)
                .args(["-w", "-t", "30", "-m", "immediate", "stop"])
                .output();
        }
    }
}

/// Runs SQL through psql against 127.0.0.1:`port` as `postgres` (unaligned, tuples only, stop on
/// the first error) and returns what it printed.
pub fn psql(bindir: &Path, port: u16, sql: &str) -> Output {
    Command::new(bindir.join("psql"))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
        .arg("-p")
        .arg(port.to_string())
        .arg("-c")
        .arg(sql)
        .output()
        .expect("run psql")
}
