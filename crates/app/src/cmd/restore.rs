//! `walnut restore`: the command line over core's restore use case ([`walnut_core::restore`]),
//! and what only the binary does: starting the restored server and watching its recovery.

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
use walnut_pg::{Lsn, TimelineId};

/// `println!` unless `--quiet` (a drill restores quietly).
macro_rules! tell {
    ($ctx:expr, $($arg:tt)*) => {
        if !$ctx.global.quiet {
            println!($($arg)*)
        }
    };
}

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
    #[arg(long, group = "target", value_name = "NAME", value_parser = parse_target_name)]
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
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    /// With --start: give up waiting for recovery after this long, however it progresses
    /// (default: no bound; see --stall-timeout).
    #[arg(long, value_name = "DURATION", value_parser = parse_wait)]
    pub start_timeout: Option<Duration>,
    /// With --start: give up when replay has not moved for this long.
    #[arg(long, value_name = "DURATION", default_value = "10min", value_parser = parse_wait)]
    pub stall_timeout: Duration,
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

/// A `--target-name`: a restore point name, or a backup ID or name; never empty.
fn parse_target_name(text: &str) -> Result<String, String> {
    if text.trim().is_empty() {
        return Err("cannot be empty: give a restore point name, or a backup ID or name".into());
    }
    Ok(text.to_string())
}

/// A wait bound: a duration of at least one second.
fn parse_wait(text: &str) -> Result<Duration, String> {
    let d = crate::config::parse_config_duration(text)?;
    if d < Duration::from_secs(1) {
        return Err(format!("{text:?} is too short: at least 1s"));
    }
    Ok(d)
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
    let timeline = match a.target_timeline.as_str() {
        "latest" => TimelineChoice::Latest,
        "current" => TimelineChoice::Current,
        n => match n.parse::<u32>() {
            Ok(0) => bail!("--target-timeline {n:?} is not a timeline: timeline IDs start at 1"),
            Ok(id) => TimelineChoice::Id(TimelineId(id)),
            Err(_) => bail!("--target-timeline must be latest, current or a timeline ID, got {n:?}"),
        },
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
        match catch_up_with_primary(ctx, &repo, p.restorable.latest_lsn).await {
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
    prespool(ctx, &repo, &m, &a.dest).await;
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

/// Aims the prefetch spool at the backup's first WAL segment (starting a prefetcher if none
/// runs), so that the segments recovery asks for first are spooled when the server starts
/// (otherwise they are fetched one by one while a prefetcher gets going, and a prefetcher still
/// following an earlier recovery would not serve this one). Only when this user is the one the
/// restored server runs as: the spool is below its state directory, which must be that user's.
async fn prespool(ctx: &Ctx, repo: &walnut_core::Repository, m: &backup::Manifest, dest: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    if ctx.config.prefetch == 0 {
        return;
    }
    let owner = std::fs::metadata(dest).map(|d| d.uid()).ok();
    if owner.is_none() || owner != walnut_storage::local::effective_uid() {
        return;
    }
    let Ok(size) = walnut_pg::lsn::WalSegSize::new(m.wal_segment_size) else { return };
    let first = size.segno(m.start_lsn).0;
    if first == 0 {
        return;
    }
    // The prefetcher keeps the segments after the one named.
    let before = walnut_pg::names::SegName::new(m.timeline, walnut_pg::lsn::SegNo(first - 1), size).to_string();
    match walnut_core::wal::aim_prefetch(repo, &ctx.config.state_dir, &before).await {
        Ok(true) => super::wal::spawn_prefetcher(ctx, &before),
        Ok(false) => {}
        Err(e) => tracing::debug!("no WAL prefetch before the start: {e}"),
    }
}

/// Asks the primary, when it can be reached (`[postgres] url` or the libpq variables), whether it
/// holds WAL not archived yet ([`restore::catch_up`]).
async fn catch_up_with_primary(ctx: &Ctx, repo: &walnut_core::Repository, archived_end: walnut_pg::Lsn) -> CatchUp {
    let Ok(cfg) = pgserver::pg_config(ctx.config.pg_url.as_deref()) else {
        return CatchUp::Unknown("the PostgreSQL connection settings are invalid".into());
    };
    match tokio::time::timeout(Duration::from_secs(5), pgserver::connect(&cfg)).await {
        Ok(Ok(client)) => restore::catch_up(repo, &client, archived_end, ctx.config.backup_archive_wait).await,
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
    // What this start logs comes after what the file held (a backup of a restored cluster
    // carries that restore's log).
    let log_from = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let this_start = || {
        let text = std::fs::read(&log).unwrap_or_default();
        String::from_utf8_lossy(text.get(log_from as usize..).unwrap_or_default()).into_owned()
    };
    pgserver::pg_ctl_start(&bindir, &a.dest, &log, &format!("-p {port} -c listen_addresses=127.0.0.1"), false)?;
    // pg_ctl -W returns at once: wait for the postmaster to exist before watching it, or for
    // its log to say it already ended (a short recovery that shuts down at its target can be
    // over before the first look).
    let appeared = Instant::now();
    while !pgserver::running(&a.dest) {
        let text = this_start();
        if text.contains("database system is shut down") || text.contains("FATAL:") {
            break;
        }
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
    let mut last_report = Instant::now() - Duration::from_secs(10);
    // An LSN target is where replay ends; otherwise the end of the archive bounds it.
    let (target_lsn, target_what) = match &p.recovery_target {
        RecoveryTarget::Lsn(l) | RecoveryTarget::PinnedEnd(l) => (*l, "target"),
        _ => (p.restorable.latest_lsn, "archive end"),
    };
    let mut watch = ReplayWatch::new(a.start_timeout, a.stall_timeout, Some(target_lsn));
    let mut restored_log = LogCounter::default();
    loop {
        if !pgserver::running(&a.dest) {
            // PostgreSQL logs this when it stops as asked (not on a crash or a failed recovery).
            if a.target_action == "shutdown" && this_start().contains("shutdown at recovery target") {
                tell!(
                    ctx,
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
        // Replay progresses when the replayed LSN moves or, before the server accepts
        // connections (not consistent yet), when it restores another segment from the archive.
        let replayed_lsn = state.as_ref().and_then(|(_, _, r, _)| r.parse::<Lsn>().ok());
        let sample = Sample { at: t0.elapsed(), lsn: replayed_lsn, restored: restored_log.count(&log) };
        if let Verdict::GiveUp(why) = watch.observe(sample) {
            bail!(
                "{why}; the server is still running on port {port} (stop it with pg_ctl -D {} stop){}",
                a.dest.display(),
                pgserver::tail(&log, 10)
            );
        }
        if let Some((client, in_recovery, replayed, pause)) = state {
            if last_report.elapsed() > Duration::from_secs(if tty { 1 } else { 10 }) && in_recovery {
                if !ctx.global.quiet {
                    eprintln!("recovering: replayed up to {replayed}{}", watch.progress(target_what));
                }
                last_report = Instant::now();
            }
            if a.standby && in_recovery {
                tell!(ctx, "standby is running on port {port}, replaying from the archive (replayed {replayed})");
                return Ok(());
            }
            if in_recovery && pause == "paused" && a.target_action == "pause" {
                tell!(
                    ctx,
                    "recovery paused at {} (replayed {replayed}) in {:.1?}; inspect, then SELECT pg_wal_replay_resume() to promote. psql -h 127.0.0.1 -p {port} -U {user}",
                    describe_target(&p.recovery_target),
                    t0.elapsed()
                );
                return Ok(());
            }
            if !in_recovery {
                // Prove the server accepts writes: assigning a transaction ID needs a writable server.
                client.query_one("SELECT txid_current()", &[]).await.context("the promoted server refused a write")?;
                record_replay(ctx, m, &replayed, t0.elapsed()).await;
                if let Some(role) = &a.set_password {
                    let pw = std::env::var("WALNUT_NEW_PASSWORD").unwrap_or_default();
                    let ident = format!("\"{}\"", role.replace('"', "\"\""));
                    // Only a SCRAM-SHA-256 verifier computed here reaches the server: a failing
                    // statement or log_statement never writes the password into a log.
                    let verifier = postgres_protocol::password::scram_sha_256(pw.as_bytes());
                    client.batch_execute(&format!("ALTER ROLE {ident} PASSWORD '{verifier}'")).await.map_err(|e| {
                        anyhow::anyhow!("set the password of {role}: {}", walnut_core::backup::pg_error(&e))
                    })?;
                    tell!(ctx, "password of role {role} changed");
                }
                tell!(
                    ctx,
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

/// Keeps this restore's replay rate (from the backup's start to where replay ended, over the
/// time from the server's start to its promotion) for the agent's replay-time estimate.
async fn record_replay(ctx: &Ctx, m: &backup::Manifest, replayed: &str, took: Duration) {
    let Ok(end) = replayed.parse::<Lsn>() else { return };
    let recorded = async {
        let repo = ctx.repository()?;
        let identity = repo.identity().await?.ok_or_else(|| anyhow::anyhow!("no repository identity"))?;
        let state = walnut_core::state::StateDir::open(&ctx.config.state_dir, ctx.config.repo_url()?, &identity)?;
        let bytes = end.0.saturating_sub(m.start_lsn.0);
        anyhow::Ok(walnut_core::replay::record(&state, bytes, took.as_secs_f64(), chrono::Utc::now())?)
    };
    match recorded.await {
        Ok(true) => tracing::debug!("replay rate recorded"),
        Ok(false) => {}
        Err(e) => tracing::debug!("replay rate not recorded: {e:#}"),
    }
}

/// One look at a recovering server: when (since the start), the replayed LSN if the server
/// answered, and how many segments it has restored from the archive so far (from its log).
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Duration,
    lsn: Option<Lsn>,
    restored: usize,
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    KeepWaiting,
    GiveUp(String),
}

/// The wait for recovery, pure: keeps waiting as long as replay progresses, gives up after
/// `stall` without progress or, when set, after `limit` in all. Keeps the recent samples for the
/// replay rate and the ETA.
#[derive(Debug)]
struct ReplayWatch {
    limit: Option<Duration>,
    stall: Duration,
    target: Option<Lsn>,
    last: Option<Sample>,
    last_progress: Duration,
    /// (time, LSN) over the last [`RATE_WINDOW`], oldest first.
    recent: std::collections::VecDeque<(Duration, Lsn)>,
}

const RATE_WINDOW: Duration = Duration::from_secs(60);

impl ReplayWatch {
    fn new(limit: Option<Duration>, stall: Duration, target: Option<Lsn>) -> ReplayWatch {
        ReplayWatch { limit, stall, target, last: None, last_progress: Duration::ZERO, recent: Default::default() }
    }

    fn observe(&mut self, s: Sample) -> Verdict {
        let moved = match self.last {
            None => true,
            Some(l) => {
                s.lsn.zip(l.lsn).is_some_and(|(now, before)| now > before)
                    || (s.lsn.is_some() && l.lsn.is_none())
                    || s.restored > l.restored
            }
        };
        if moved {
            self.last_progress = s.at;
        }
        if let Some(lsn) = s.lsn {
            if self.recent.back().is_none_or(|&(_, l)| lsn >= l) {
                self.recent.push_back((s.at, lsn));
            }
            while self.recent.len() > 2 && self.recent.front().is_some_and(|&(t, _)| s.at - t > RATE_WINDOW) {
                self.recent.pop_front();
            }
        }
        self.last = Some(s);
        let human = |d: Duration| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string();
        if let Some(limit) = self.limit
            && s.at >= limit
        {
            return Verdict::GiveUp(format!(
                "recovery did not finish within --start-timeout {} (replayed up to {})",
                human(limit),
                s.lsn.map(|l| l.to_string()).unwrap_or_else(|| "an unknown position".into())
            ));
        }
        if s.at.saturating_sub(self.last_progress) >= self.stall {
            return Verdict::GiveUp(format!(
                "recovery made no progress for {} (--stall-timeout; replay stuck at {}): read the server log below",
                human(self.stall),
                s.lsn.map(|l| l.to_string()).unwrap_or_else(|| "an unknown position, before consistency".into())
            ));
        }
        Verdict::KeepWaiting
    }

    /// Replay speed in bytes a second over the recent samples.
    fn rate(&self) -> Option<f64> {
        let (&(t0, l0), &(t1, l1)) = (self.recent.front()?, self.recent.back()?);
        let secs = (t1 - t0).as_secs_f64();
        (secs > 0.0 && l1 > l0).then(|| (l1.0 - l0.0) as f64 / secs)
    }

    /// `, 12.5 MiB/s, ETA 3m 20s to target 0/5000000, 40s elapsed` (what is known of it).
    fn progress(&self, target_what: &str) -> String {
        let mut out = String::new();
        let rate = self.rate();
        if let Some(r) = rate {
            out += &format!(", {}/s", crate::output::bytes(r as u64));
        }
        if let Some(t) = self.target {
            let now = self.last.and_then(|s| s.lsn);
            match (now, rate) {
                (Some(n), Some(r)) if n < t => {
                    let eta = Duration::from_secs(((t.0 - n.0) as f64 / r).ceil() as u64);
                    out += &format!(", ETA {} to {target_what} {t}", humantime::format_duration(eta));
                }
                _ => out += &format!(" ({target_what} {t})"),
            }
        }
        let at = self.last.map(|s| s.at).unwrap_or_default();
        out += &format!(", {} elapsed", humantime::format_duration(Duration::from_secs(at.as_secs())));
        out
    }
}

/// Counts the server log's "restored log file" lines, reading only what was added since.
#[derive(Debug, Default)]
struct LogCounter {
    offset: u64,
    count: usize,
    partial: String,
}

impl LogCounter {
    fn count(&mut self, log: &std::path::Path) -> usize {
        use std::io::{Read, Seek};
        let Ok(mut f) = std::fs::File::open(log) else { return self.count };
        if f.seek(std::io::SeekFrom::Start(self.offset)).is_err() {
            return self.count;
        }
        let mut added = Vec::new();
        if f.take(8 << 20).read_to_end(&mut added).is_err() {
            return self.count;
        }
        self.offset += added.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&added));
        // Whole lines only: keep an unfinished last line for the next read.
        let keep = self.partial.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let done: String = self.partial.drain(..keep).collect();
        self.count += done.lines().filter(|l| l.contains("restored log file")).count();
        self.count
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, lsn: Option<u64>, restored: usize) -> Sample {
        Sample { at: Duration::from_secs(secs), lsn: lsn.map(Lsn), restored }
    }

    #[test]
    fn waits_while_replay_moves_and_gives_up_after_the_stall_bound() {
        let mut w = ReplayWatch::new(None, Duration::from_secs(600), Some(Lsn(100 << 20)));
        // Before consistency: no LSN, but segments keep arriving from the archive.
        for i in 0..100 {
            assert_eq!(w.observe(at(i * 60, None, i as usize)), Verdict::KeepWaiting, "minute {i}");
        }
        // Hours of steady replay: no fixed bound.
        for i in 0..300u64 {
            assert_eq!(w.observe(at(6000 + i * 60, Some(i << 20), 100)), Verdict::KeepWaiting);
        }
        let stuck = 6000 + 299 * 60;
        assert_eq!(w.observe(at(stuck + 599, Some(299 << 20), 100)), Verdict::KeepWaiting);
        let Verdict::GiveUp(why) = w.observe(at(stuck + 600, Some(299 << 20), 100)) else {
            panic!("ten minutes without progress must give up")
        };
        assert!(why.contains("no progress for 10m") && why.contains("--stall-timeout"), "{why}");
        assert!(why.contains(&Lsn(299 << 20).to_string()), "{why}");
    }

    #[test]
    fn a_failing_restore_command_is_no_progress() {
        // The log grows with errors but no segment is restored and the LSN stands still.
        let mut w = ReplayWatch::new(None, Duration::from_secs(120), None);
        assert_eq!(w.observe(at(0, Some(5), 3)), Verdict::KeepWaiting);
        assert_eq!(w.observe(at(119, Some(5), 3)), Verdict::KeepWaiting);
        assert!(matches!(w.observe(at(120, Some(5), 3)), Verdict::GiveUp(_)));
    }

    #[test]
    fn the_overall_bound_applies_even_while_progressing() {
        let mut w = ReplayWatch::new(Some(Duration::from_secs(3600)), Duration::from_secs(600), None);
        for i in 0..60u64 {
            assert_eq!(w.observe(at(i * 60, Some(i << 20), 0)), Verdict::KeepWaiting);
        }
        let Verdict::GiveUp(why) = w.observe(at(3600, Some(61 << 20), 0)) else { panic!("the bound is an hour") };
        assert!(why.contains("--start-timeout 1h"), "{why}");
    }

    #[test]
    fn progress_reports_the_rate_and_the_eta() {
        let mut w = ReplayWatch::new(None, Duration::from_secs(600), Some(Lsn(200 << 20)));
        w.observe(at(10, Some(100 << 20), 0));
        w.observe(at(20, Some(110 << 20), 0));
        let line = w.progress("target");
        // 10 MiB in 10 s: 1 MiB/s, 90 MiB left: 90 s.
        assert!(line.contains("1.0 MiB/s") || line.contains("1 MiB/s"), "{line}");
        assert!(line.contains("ETA 1m 30s to target"), "{line}");
        assert!(line.contains("20s elapsed"), "{line}");
        // Nothing known yet: no rate, no ETA, still the target.
        let w = ReplayWatch::new(None, Duration::from_secs(600), Some(Lsn(1)));
        assert!(!w.progress("archive end").contains("ETA"));
    }
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
