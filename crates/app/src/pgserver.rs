//! Talking to PostgreSQL from the binary: connection settings (config URL, else libpq `PG*`
//! variables), finding the server binaries, and running `initdb`/`pg_ctl` as the data
//! directory's owner, never as root.

use anyhow::{Context, Result, bail};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Connection settings: `[postgres] url`, else the libpq variables PGHOST, PGPORT, PGUSER,
/// PGDATABASE, PGPASSWORD, else the local socket as `postgres`.
pub fn pg_config(url: Option<&str>) -> Result<tokio_postgres::Config> {
    if let Some(u) = url {
        return u.parse().map_err(|e| anyhow::anyhow!("[postgres] url is not a valid connection string: {e}"));
    }
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let mut c = tokio_postgres::Config::new();
    match env("PGHOST") {
        Some(h) => {
            for host in h.split(',') {
                c.host(host);
            }
        }
        None => {
            c.host("/var/run/postgresql");
        }
    }
    if let Some(p) = env("PGPORT") {
        c.port(p.parse().context("PGPORT is not a port number")?);
    }
    c.user(env("PGUSER").as_deref().unwrap_or("postgres"));
    if let Some(d) = env("PGDATABASE") {
        c.dbname(&d);
    }
    if let Some(p) = env("PGPASSWORD") {
        c.password(p);
    }
    c.application_name("walnut");
    c.connect_timeout(Duration::from_secs(10));
    Ok(c)
}

/// Connects (core's session: bounded, the connection driven on its own task).
pub async fn connect(c: &tokio_postgres::Config) -> Result<tokio_postgres::Client> {
    walnut_core::backup::connect(c).await.map_err(|e| match e {
        walnut_core::backup::BackupError::Postgres(m) => {
            anyhow::anyhow!("connect to PostgreSQL: {}", m.strip_prefix("connect: ").unwrap_or(&m))
        }
        other => anyhow::anyhow!("connect to PostgreSQL: {other}"),
    })
}

/// The directory holding initdb, pg_ctl and postgres.
pub fn bindir(configured: Option<&Path>, major: u32) -> Result<PathBuf> {
    if let Some(d) = configured {
        return Ok(d.to_path_buf());
    }
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let candidates = from_pg_config.into_iter().chain([PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"))]);
    for c in candidates {
        if c.join("pg_ctl").exists() && c.join("postgres").exists() {
            return Ok(c);
        }
    }
    bail!(
        "PostgreSQL {major} server binaries (pg_ctl, postgres) not found: install them (apt-get install postgresql-{major}) \
         or set [postgres] bindir"
    )
}

pub fn is_root() -> bool {
    walnut_storage::local::is_root()
}

/// The uid/gid of an OS user, via `id`.
pub fn user_ids(user: &str) -> Result<(u32, u32)> {
    let get = |flag: &str| -> Result<u32> {
        let o = Command::new("id").arg(flag).arg(user).output().context("run id")?;
        if !o.status.success() {
            bail!("OS user {user:?} does not exist (PostgreSQL cannot run as root; create the user or run as it)");
        }
        String::from_utf8_lossy(&o.stdout).trim().parse().context("parse id output")
    };
    Ok((get("-u")?, get("-g")?))
}

/// Gives `path` (recursively) to uid:gid.
pub fn chown_tree(path: &Path, uid: u32, gid: u32) -> Result<()> {
    let st = Command::new("chown").arg("-R").arg(format!("{uid}:{gid}")).arg(path).status().context("run chown")?;
    if !st.success() {
        bail!("chown -R {uid}:{gid} {} failed", path.display());
    }
    Ok(())
}

/// A command run as the owner of `dir` (when we are root), never as root itself.
pub fn as_owner_of(dir: &Path, program: &Path) -> Result<Command> {
    if !is_root() {
        return Ok(Command::new(program));
    }
    let m = std::fs::metadata(dir).with_context(|| format!("stat {}", dir.display()))?;
    if m.uid() == 0 {
        bail!("{} is owned by root: PostgreSQL must not run as root; give it to the postgres user", dir.display());
    }
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={}", m.uid()))
        .arg(format!("--regid={}", m.gid()))
        .arg("--init-groups")
        .arg("--")
        .arg(program);
    Ok(c)
}

/// When root, hands a directory we created (and everything in it) to the `postgres` OS user.
pub fn prepare_ownership(dir: &Path) -> Result<()> {
    if is_root() {
        let (uid, gid) = user_ids("postgres")?;
        chown_tree(dir, uid, gid)?;
    }
    Ok(())
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `pg_ctl start`; with `wait`, until the server accepts connections (not for long recoveries:
/// the caller polls instead).
pub fn pg_ctl_start(bindir: &Path, pgdata: &Path, log: &Path, options: &str, wait: bool) -> Result<()> {
    let out = as_owner_of(pgdata, &bindir.join("pg_ctl"))?
        .arg("-D")
        .arg(pgdata)
        .arg("-l")
        .arg(log)
        .args(["-o", options, if wait { "-w" } else { "-W" }, "-t", "120", "start"])
        // The new password is walnut's to use, never the server's environment.
        .env_remove("WALNUT_NEW_PASSWORD")
        .output()
        .context("run pg_ctl start")?;
    if !out.status.success() {
        bail!("pg_ctl start failed: {}{}", String::from_utf8_lossy(&out.stderr), tail(log, 20));
    }
    Ok(())
}

pub fn pg_ctl_stop(bindir: &Path, pgdata: &Path, mode: &str) -> Result<()> {
    let out = as_owner_of(pgdata, &bindir.join("pg_ctl"))?
        .arg("-D")
        .arg(pgdata)
        .args(["-m", mode, "-w", "-t", "60", "stop"])
        .output()
        .context("run pg_ctl stop")?;
    if !out.status.success() {
        bail!("pg_ctl stop failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Stops a throwaway server on `pgdata` (immediately: nothing of it is kept) and removes
/// `dirs`, however far its set-up got; what fails is logged as `what`'s, never raised (this
/// runs from `Drop`).
pub fn discard(what: &str, pgdata: &Path, bindir: Option<&Path>, dirs: &[&Path]) {
    if running(pgdata)
        && let Some(b) = bindir
        && let Err(e) = pg_ctl_stop(b, pgdata, "immediate")
    {
        tracing::warn!("{what}: stop the server: {e:#}");
    }
    for dir in dirs {
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(dir)
        {
            tracing::warn!("{what}: remove {}: {e}", dir.display());
        }
    }
}

/// Whether a postmaster is running on `pgdata`.
pub fn running(pgdata: &Path) -> bool {
    let Ok(pid) = std::fs::read_to_string(pgdata.join("postmaster.pid")) else { return false };
    let Some(pid) = pid.lines().next().and_then(|l| l.trim().parse::<u32>().ok()) else { return false };
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The last `n` lines of a log file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(n);
    if lines.is_empty() {
        String::new()
    } else {
        format!("\n--- {} ---\n{}", path.display(), lines[start..].join("\n"))
    }
}

/// When root, gives a directory we just created to the owner of `like`.
pub fn prepare_ownership_of_new(dir: &Path, like: &Path) -> Result<()> {
    if is_root() {
        let m = std::fs::metadata(like)?;
        chown_tree(dir, m.uid(), m.gid())?;
    }
    Ok(())
}
