//! `walnut restore`: plan, validate, fetch, configure recovery, and optionally start and wait.

use super::Ctx;
use super::backup::fetch_into;
use crate::output;
use crate::pgserver;
use anyhow::{Context, Result, bail};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use walnut_core::backup;
use walnut_core::plan::{self, Plan, RecoveryTarget, Request, Target, TimelineChoice};
use walnut_core::restore::{self, CatchUp, RecoveryConf, RecoveryOptions, check_dest, clean_dest, tablespace_targets};
use walnut_pg::TimelineId;

#[derive(Debug, Clone, clap::Args)]
pub struct RestoreArgs {
    /// The new data directory (absent or empty).
    pub dest: PathBuf,
    /// Recover everything archived (the default).
    #[arg(long, group = "target")]
    pub target_latest: bool,
    /// A time with a zone: 2024-07-15T15:17:54Z or '2024-07-15 15:17:54+00'.
    #[arg(long, group = "target", value_name = "TIME")]
    pub target_time: Option<String>,
    /// A named restore point, or a backup ID or name (that backup's consistency point).
    #[arg(long, group = "target", value_name = "NAME")]
    pub target_name: Option<String>,
    /// A WAL position, like 16/B374D848.
    #[arg(long, group = "target", value_name = "LSN")]
    pub target_lsn: Option<String>,
    /// A transaction ID.
    #[arg(long, group = "target", value_name = "XID")]
    pub target_xid: Option<u32>,
    /// The chosen backup's consistency point.
    #[arg(long, group = "target")]
    pub target_immediate: bool,
    /// Use this base backup (ID, name or LATEST).
    #[arg(long, value_name = "REF")]
    pub backup: Option<String>,
    /// Stop just before the target (default: include it).
    #[arg(long)]
    pub exclusive: bool,
    /// What the server does at the target.
    #[arg(long, default_value = "promote", value_parser = ["promote", "pause", "shutdown"])]
    pub target_action: String,
    /// latest, current, or a timeline ID.
    #[arg(long, default_value = "latest")]
    pub target_timeline: String,
    /// A follower: standby.signal, keeps replaying from the archive.
    #[arg(long)]
    pub standby: bool,
    /// Start the restored cluster and wait until recovery is over.
    #[arg(long)]
    pub start: bool,
    /// Port for the restored cluster.
    #[arg(long)]
    pub port: Option<u16>,
    /// Keep archiving to the same repository (replacing a lost primary).
    #[arg(long)]
    pub archive: bool,
    /// Change this role's password once the cluster accepts writes (value from WALNUT_NEW_PASSWORD).
    #[arg(long, value_name = "ROLE")]
    pub set_password: Option<String>,
    /// Print the plan and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Restore a tablespace elsewhere than its source location: NAME=DIR or OID=DIR (repeatable).
    #[arg(long, value_name = "NAME=DIR")]
    pub tablespace_map: Vec<String>,
}

/// Parses a target time (see [`walnut_core::plan::parse_target_time`]).
pub fn parse_time(text: &str) -> Result<chrono::DateTime<chrono::Utc>> {
    plan::parse_target_time(text).map_err(|e| anyhow::anyhow!(e))
}

fn request(a: &RestoreArgs) -> Result<Request> {
    let target = if let Some(t) = &a.target_time {
        Target::Time(parse_time(t)?)
    } else if let Some(n) = &a.target_name {
        Target::Name(n.clone())
    } else if let Some(l) = &a.target_lsn {
        Target::Lsn(l.parse()?)
    } else if let Some(x) = a.target_xid {
        Target::Xid(x)
    } else if a.target_immediate {
        Target::Immediate
    } else {
        Target::Latest
    };
    let timeline =
        match a.target_timeline.as_str() {
            "latest" => TimelineChoice::Latest,
            "current" => TimelineChoice::Current,
            n => TimelineChoice::Id(TimelineId(n.parse().map_err(|_| {
                anyhow::anyhow!("--target-timeline must be latest, current or a timeline ID, got {n:?}")
            })?)),
        };
    if a.standby && !matches!(target, Target::Latest) {
        bail!("--standby follows the archive and takes no recovery target");
    }
    Ok(Request { target, backup: a.backup.clone(), timeline })
}

fn describe_target(t: &RecoveryTarget) -> String {
    restore::describe_target(t)
}

fn recovery_options(ctx: &Ctx, a: &RestoreArgs, port: Option<u16>) -> Result<RecoveryOptions> {
    Ok(RecoveryOptions {
        walnut: ctx.walnut_command(true)?,
        exclusive: a.exclusive,
        action: a.target_action.parse().map_err(|e: String| anyhow::anyhow!(e))?,
        standby: a.standby,
        archive: a.archive,
        port,
    })
}

pub async fn run(ctx: &Ctx, a: &RestoreArgs) -> Result<()> {
    let req = request(a)?;
    if a.set_password.is_some() && std::env::var("WALNUT_NEW_PASSWORD").map(|v| v.is_empty()).unwrap_or(true) {
        bail!(
            "--set-password needs the new password in the environment variable WALNUT_NEW_PASSWORD (never on the command line)"
        );
    }
    if a.set_password.is_some() && !a.start {
        bail!("--set-password needs --start (the password is changed once the cluster accepts writes)");
    }
    check_dest(&a.dest)?;
    let repo = ctx.repository()?;
    let say = |s: String| {
        if !ctx.global.quiet && !ctx.global.json {
            println!("{s}");
        }
    };
    let (mut p, mut m) = restore::prepare(&repo, &req, chrono::Utc::now()).await?;
    if matches!(p.recovery_target, RecoveryTarget::PinnedEnd(_) | RecoveryTarget::EndOfArchive)
        && matches!(req.target, Target::Time(_))
    {
        // The target is after the last archived commit: is the archive really caught up?
        match catch_up_with_primary(ctx, &repo).await {
            CatchUp::Switched(seg) => {
                say(format!(
                    "the primary had WAL that was not archived yet: walnut switched WAL and waited until {seg} was archived, and planned again"
                ));
                (p, m) = restore::prepare(&repo, &req, chrono::Utc::now()).await?;
            }
            CatchUp::CaughtUp => say("the primary has no WAL beyond the archive: the archive is caught up".into()),
            CatchUp::Unknown(why) => say(format!(
                "note: {why}, so walnut cannot tell whether it holds commits before the target that are not archived yet: \
                 the restore ends at the end of the archive as it is now"
            )),
        }
    }
    say(format!(
        "plan: backup {}{} (timeline {}, consistent at {}), then WAL to {} on timeline {} ({} segments checked present)",
        p.backup_id,
        p.backup_name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default(),
        p.backup_timeline,
        p.backup_end_lsn,
        describe_target(&p.recovery_target),
        p.target_timeline,
        p.segments
    ));
    say(format!("restorable range: {}", p.restorable));
    for n in &p.notes {
        say(format!("note: {n}"));
    }
    let tablespaces = tablespace_targets(&m, &a.dest, &a.tablespace_map)?;
    for t in &tablespaces {
        say(format!("tablespace {} (oid {}) -> {}", t.name, t.oid, t.dir.display()));
    }
    if a.dry_run {
        if ctx.global.json {
            let mut v = serde_json::to_value(&p)?;
            v["tablespaces"] = serde_json::to_value(&tablespaces)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        return Ok(());
    }
    let existed = a.dest.exists();
    let took = fetch_into(ctx, &repo, &m, &a.dest, &tablespaces).await?;
    for t in &tablespaces {
        pgserver::prepare_ownership(&t.dir)?;
    }
    say(format!("fetched backup {} ({}) in {:.1?}", m.id, output::bytes(m.data_bytes), took));
    let configured = configure(ctx, a, &p);
    if let Err(e) = configured {
        clean_dest(&a.dest, existed);
        for t in &tablespaces {
            t.clean();
        }
        return Err(e);
    }
    let port = configured.expect("checked");
    // Complete: the data directory is no longer an interrupted restore that a re-run may wipe.
    for t in &tablespaces {
        restore::mark_done(&t.dir)?;
    }
    restore::mark_done(&a.dest)?;
    say(if a.archive {
        format!("the restored cluster archives to {} on its new timeline (--archive)", repo.describe())
    } else {
        "the restored cluster does not archive (archive_mode = off): a fork must not write into the source's history; use --archive to replace a lost primary".to_string()
    });
    if !a.start {
        say(format!(
            "ready: start it with pg_ctl -D {} start; recovery replays WAL to {} and then {}",
            a.dest.display(),
            describe_target(&p.recovery_target),
            if a.standby { "keeps following the archive".to_string() } else { action_text(a, &p) }
        ));
        if ctx.global.json {
            println!("{}", serde_json::json!({"plan": p, "dest": a.dest, "started": false}));
        }
        return Ok(());
    }
    let port = port.expect("start chooses a port");
    start_and_wait(ctx, a, &p, &m, port).await?;
    if ctx.global.json {
        println!("{}", serde_json::json!({"plan": p, "dest": a.dest, "started": true, "port": port}));
    }
    Ok(())
}

/// Asks the primary, when it can be reached (`[postgres] url` or the libpq variables), whether it
/// holds WAL not archived yet ([`restore::catch_up`]).
async fn catch_up_with_primary(ctx: &Ctx, repo: &walnut_core::Repository) -> CatchUp {
    let Ok(cfg) = pgserver::pg_config(ctx.config.pg_url.as_deref()) else {
        return CatchUp::Unknown("the PostgreSQL connection settings are invalid".into());
    };
    match tokio::time::timeout(Duration::from_secs(5), pgserver::connect(&cfg)).await {
        Ok(Ok(client)) => restore::catch_up(repo, &client, ctx.config.backup_archive_wait).await,
        _ => CatchUp::Unknown("the primary is not reachable from here".into()),
    }
}

fn action_text(a: &RestoreArgs, p: &Plan) -> String {
    if p.recovery_target == RecoveryTarget::EndOfArchive {
        return "promotes".into();
    }
    match a.target_action.as_str() {
        "pause" => "pauses (inspect it, then SELECT pg_wal_replay_resume() to promote)".into(),
        "shutdown" => "shuts down".into(),
        _ => "promotes".into(),
    }
}

/// Writes the recovery configuration and signal file; returns the port when one is set.
fn configure(ctx: &Ctx, a: &RestoreArgs, p: &Plan) -> Result<Option<u16>> {
    let port = match (a.port, a.start) {
        (Some(p), _) => Some(p),
        (None, true) => Some(pgserver::free_port()?),
        (None, false) => None,
    };
    RecoveryConf::from_plan(p, &recovery_options(ctx, a, port)?).write(&a.dest)?;
    pgserver::prepare_ownership(&a.dest)?;
    Ok(port)
}

async fn start_and_wait(ctx: &Ctx, a: &RestoreArgs, p: &Plan, m: &backup::Manifest, port: u16) -> Result<()> {
    let bindir = pgserver::bindir(ctx.config.pg_bindir.as_deref(), m.pg_major.0)?;
    let log = a.dest.join("log").join("walnut-restore-start.log");
    std::fs::create_dir_all(log.parent().expect("parent"))?;
    pgserver::prepare_ownership(&a.dest.join("log"))?;
    let t0 = Instant::now();
    pgserver::pg_ctl_start(&bindir, &a.dest, &log, &format!("-p {port} -c listen_addresses=127.0.0.1"), false)?;
    // pg_ctl -W returns at once: wait for the postmaster to exist before watching it.
    let appeared = Instant::now();
    while !pgserver::running(&a.dest) {
        if appeared.elapsed() > Duration::from_secs(30) {
            bail!("the restored server did not start{}", pgserver::tail(&log, 20));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Connect to the restored server only: the configured URL points at the source.
    let source = pgserver::pg_config(ctx.config.pg_url.as_deref())?;
    let user = source.get_user().unwrap_or("postgres").to_string();
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1").port(port).user(&user).dbname("postgres").connect_timeout(Duration::from_secs(5));
    if let Some(pw) = source.get_password() {
        cfg.password(pw);
    }
    let tty = std::io::stderr().is_terminal() && !ctx.global.quiet;
    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut last_report = Instant::now() - Duration::from_secs(10);
    let target_lsn = match &p.recovery_target {
        RecoveryTarget::Lsn(l) | RecoveryTarget::PinnedEnd(l) => *l,
        _ => p.restorable.latest_lsn,
    };
    loop {
        if Instant::now() > deadline {
            bail!(
                "recovery did not finish within an hour; the server is still running on port {port}{}",
                pgserver::tail(&log, 10)
            );
        }
        if !pgserver::running(&a.dest) {
            let log_text = std::fs::read_to_string(&log).unwrap_or_default();
            // PostgreSQL logs this when it stops as asked (not on a crash or a failed recovery).
            if a.target_action == "shutdown" && log_text.contains("shutdown at recovery target") {
                println!(
                    "recovery reached {} and the server shut down as asked ({:.1?})",
                    describe_target(&p.recovery_target),
                    t0.elapsed()
                );
                return Ok(());
            }
            bail!("the restored server stopped during recovery{}", pgserver::tail(&log, 20));
        }
        let state = match pgserver::connect(&cfg).await {
            Ok(c) => {
                let row = c
                    .query_one(
                        "SELECT pg_is_in_recovery(), coalesce(pg_last_wal_replay_lsn()::text, ''), \
                         CASE WHEN pg_is_in_recovery() THEN pg_get_wal_replay_pause_state() ELSE '' END",
                        &[],
                    )
                    .await;
                match row {
                    Ok(r) => Some((c, r.get::<_, bool>(0), r.get::<_, String>(1), r.get::<_, String>(2))),
                    Err(_) => None,
                }
            }
            Err(_) => None,
        };
        if let Some((client, in_recovery, replayed, pause)) = state {
            if last_report.elapsed() > Duration::from_secs(if tty { 1 } else { 10 }) && in_recovery {
                eprintln!(
                    "recovering: replayed up to {replayed} (archive end {target_lsn}), {:.0?} elapsed",
                    t0.elapsed()
                );
                last_report = Instant::now();
            }
            if a.standby && in_recovery {
                println!("standby is running on port {port}, replaying from the archive (replayed {replayed})");
                return Ok(());
            }
            if in_recovery && pause == "paused" && a.target_action == "pause" {
                println!(
                    "recovery paused at {} (replayed {replayed}) in {:.1?}; inspect, then SELECT pg_wal_replay_resume() to promote. psql -h 127.0.0.1 -p {port} -U {user}",
                    describe_target(&p.recovery_target),
                    t0.elapsed()
                );
                return Ok(());
            }
            if !in_recovery {
                // Prove the server accepts writes: assigning a transaction ID needs a writable server.
                client.query_one("SELECT txid_current()", &[]).await.context("the promoted server refused a write")?;
                if let Some(role) = &a.set_password {
                    let pw = std::env::var("WALNUT_NEW_PASSWORD").unwrap_or_default();
                    let ident = format!("\"{}\"", role.replace('"', "\"\""));
                    // Only a SCRAM-SHA-256 verifier computed here reaches the server: a failing
                    // statement or log_statement never writes the password into a log.
                    let verifier = postgres_protocol::password::scram_sha_256(pw.as_bytes());
                    client.batch_execute(&format!("ALTER ROLE {ident} PASSWORD '{verifier}'")).await.map_err(|e| {
                        anyhow::anyhow!("set the password of {role}: {}", walnut_core::backup::pg_error(&e))
                    })?;
                    println!("password of role {role} changed");
                }
                println!(
                    "recovered to {} and promoted in {:.1?}: the cluster accepts writes. Connect: psql -h 127.0.0.1 -p {port} -U {user} (data directory {})",
                    describe_target(&p.recovery_target),
                    t0.elapsed(),
                    a.dest.display()
                );
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn target_times() {
        let want = chrono::DateTime::parse_from_rfc3339("2024-07-15T15:17:54Z").unwrap();
        for t in [
            "2024-07-15T15:17:54Z",
            "2024-07-15 15:17:54+00",
            "2024-07-15 15:17:54+00:00",
            "2024-07-15T17:17:54+02:00",
            "2024-07-15 17:17:54+0200",
        ] {
            assert_eq!(parse_time(t).unwrap(), want, "{t}");
        }
        assert!(parse_time("2024-07-15 15:17:54.5+00").is_ok());
        let e = parse_time("2024-07-15 15:17:54").unwrap_err().to_string();
        assert!(e.contains("no time zone"), "{e}");
        assert!(parse_time("yesterday").is_err());
    }
}
