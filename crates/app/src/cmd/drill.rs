//! Restore drills: the latest backup restored to the latest point into a scratch directory,
//! started, checked, timed and removed (`walnut drill`, and the agent every `[drill] interval`).

use super::Ctx;
use super::restore::{RestoreArgs, run as restore};
use crate::pgserver;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use walnut_core::backup;
use walnut_core::plan::{Request, Target, TimelineChoice};

/// What one drill found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub ok: bool,
    /// Why it failed (with the stage it failed at).
    pub reason: Option<String>,
    pub backup: Option<String>,
    #[serde(with = "walnut_core::timefmt")]
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// Fetch and replay, until the restored server accepted writes.
    pub recovery_seconds: f64,
    /// The whole drill, checks and clean-up included.
    pub duration_seconds: f64,
    /// How far the restored point (the newest archived commit) was behind the drill's start.
    pub restored_lag_seconds: Option<f64>,
    /// The configured check query's answer (its first column of its first row).
    pub query_result: Option<String>,
    /// Whether pg_amcheck ran (it is used when the server's binaries include it).
    pub amcheck: bool,
}

/// Removes the scratch data directory (stopping its server first) however the drill ends.
struct Scratch {
    dir: PathBuf,
    bindir: Option<PathBuf>,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        pgserver::discard("drill", &self.dir, self.bindir.as_deref(), &[&self.dir]);
    }
}

/// Free bytes on the filesystem holding `dir`.
pub(crate) fn free_bytes(dir: &Path) -> Result<u64> {
    let s = rustix::fs::statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// The scratch directory drills use: `--scratch`, `[drill] scratch_dir`, or `state_dir/drill`.
pub fn scratch_base(ctx: &Ctx, given: Option<&Path>) -> PathBuf {
    given
        .map(Path::to_path_buf)
        .or(ctx.config.drill_scratch_dir.clone())
        .unwrap_or_else(|| ctx.config.state_dir.join("drill"))
}

/// Runs one drill. A failed drill is a report with `ok: false`, not an error; an error is a
/// drill that could not be attempted at all.
pub async fn run_once(ctx: &Ctx, scratch: &Path, port: Option<u16>) -> Report {
    let started_at = chrono::Utc::now();
    let t0 = Instant::now();
    let mut report = Report {
        ok: false,
        reason: None,
        backup: None,
        started_at,
        recovery_seconds: 0.0,
        duration_seconds: 0.0,
        restored_lag_seconds: None,
        query_result: None,
        amcheck: false,
    };
    if let Err(e) = drill(ctx, scratch, port, &mut report).await {
        report.reason = Some(format!("{e:#}"));
    } else {
        report.ok = true;
    }
    report.duration_seconds = t0.elapsed().as_secs_f64();
    report
}

async fn drill(ctx: &Ctx, base: &Path, port: Option<u16>, report: &mut Report) -> Result<()> {
    let repo = ctx.repository()?;
    let req = Request { target: Target::Latest, backup: None, timeline: TimelineChoice::Latest };
    let (plan, manifest) = walnut_core::restore::prepare(&repo, &req, chrono::Utc::now())
        .await
        .context("plan the restore of the latest point")?;
    report.backup = Some(plan.backup_id.to_string());
    report.restored_lag_seconds =
        Some((report.started_at - plan.restorable.latest_time).num_milliseconds().max(0) as f64 / 1000.0);
    std::fs::create_dir_all(base).with_context(|| format!("create the drill scratch directory {}", base.display()))?;
    // Room for the data directory, the WAL it replays and the server's own files.
    let need = manifest.data_bytes + manifest.data_bytes / 4 + 256 * 1024 * 1024;
    let free = free_bytes(base)?;
    if free < need {
        bail!(
            "not enough room for a drill in {}: {} free, the backup needs about {} (data {} plus a quarter for WAL \
             and the server); free space there or point [drill] scratch_dir elsewhere",
            base.display(),
            crate::output::bytes(free),
            crate::output::bytes(need),
            crate::output::bytes(manifest.data_bytes)
        );
    }
    let dest = base.join(format!("drill-{}-{}", report.started_at.format("%Y%m%dT%H%M%S"), std::process::id()));
    let bindir = pgserver::bindir(ctx.config.pg_bindir.as_deref(), manifest.pg_major.0).ok();
    let _scratch = Scratch { dir: dest.clone(), bindir: bindir.clone() };
    // Tablespaces go below the scratch directory too, never to their source locations (the
    // source cluster may be on this host).
    let tablespace_map = manifest
        .tablespaces
        .iter()
        .map(|t| format!("{}={}", t.oid, dest.join("tablespaces").join(&t.oid).display()))
        .collect();
    let port = match port {
        Some(p) => p,
        None => pgserver::free_port()?,
    };
    let args = RestoreArgs {
        dest: dest.clone(),
        target_latest: true,
        target_time: None,
        target_name: None,
        target_lsn: None,
        target_xid: None,
        target_immediate: false,
        backup: None,
        exclusive: false,
        target_action: "promote".into(),
        target_timeline: "latest".into(),
        standby: false,
        start: true,
        port: Some(port),
        start_timeout: None,
        stall_timeout: Duration::from_secs(600),
        archive: false,
        set_password: None,
        dry_run: false,
        tablespace_map,
    };
    let mut quiet = ctx.clone();
    quiet.global.quiet = true;
    quiet.global.json = false;
    let t = Instant::now();
    restore(&quiet, &args).await.context("restore")?;
    report.recovery_seconds = t.elapsed().as_secs_f64();
    // Checks: it accepts connections (and writes: restore proved that), the query, amcheck.
    let source = pgserver::pg_config(ctx.config.pg_url.as_deref())?;
    let user = source.get_user().unwrap_or("postgres").to_string();
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1").port(port).user(&user).dbname("postgres").connect_timeout(Duration::from_secs(10));
    if let Some(pw) = source.get_password() {
        cfg.password(pw);
    }
    let client = pgserver::connect(&cfg).await.context("connect to the restored server")?;
    client.query_one("SELECT 1", &[]).await.context("query the restored server")?;
    if let Some(q) = &ctx.config.drill_query {
        let rows = client
            .simple_query(q)
            .await
            .map_err(|e| anyhow::anyhow!("[drill] query failed on the restored server: {}", backup::pg_error(&e)))?;
        let first = rows.iter().find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("").to_string()),
            _ => None,
        });
        report.query_result = Some(first.ok_or_else(|| anyhow::anyhow!("[drill] query returned no row"))?);
    }
    drop(client);
    if let Some(b) = &bindir
        && b.join("pg_amcheck").exists()
    {
        let out = std::process::Command::new(b.join("pg_amcheck"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                &user,
                "--all",
                "--install-missing",
                "--no-strict-names",
            ])
            .env_remove("WALNUT_NEW_PASSWORD")
            .output()
            .context("run pg_amcheck")?;
        if !out.status.success() {
            bail!(
                "pg_amcheck found corruption in the restored cluster: {}{}",
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        report.amcheck = true;
    }
    Ok(())
}

/// `walnut drill`.
pub async fn cli(ctx: &Ctx, scratch: Option<&Path>, port: Option<u16>) -> Result<()> {
    let base = scratch_base(ctx, scratch);
    let r = run_once(ctx, &base, port).await;
    if ctx.global.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else if r.ok {
        println!(
            "drill passed: backup {} restored to the latest point in {:.1} s (fetch and replay), checked{}{}, removed; \
             restored point {:.0} s behind the drill's start",
            r.backup.as_deref().unwrap_or("?"),
            r.recovery_seconds,
            if r.amcheck { " with pg_amcheck" } else { "" },
            r.query_result.as_deref().map(|q| format!(", query answered {q}")).unwrap_or_default(),
            r.restored_lag_seconds.unwrap_or(0.0)
        );
    }
    if !r.ok {
        bail!("drill failed: {}", r.reason.as_deref().unwrap_or("unknown"));
    }
    Ok(())
}
