//! `walnut logical capture|list|show|delete|restore|copy|download`: logical backups with
//! `pg_dump`/`pg_restore` (core's [`walnut_core::logical`]), and what only the binary does:
//! `capture --at`, which restores a throwaway fork from the physical archive into a scratch
//! directory, starts it on a private unix socket (no TCP port), dumps it, stops and removes it.

use super::Ctx;
use crate::output;
use crate::pgserver;
use anyhow::{Context, Result, bail};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use walnut_core::logical::restore as lrestore;
use walnut_core::logical::tools::Bindirs;
use walnut_core::logical::{self, CaptureManifest, CaptureOptions, Databases, LogicalProgress, Source, Status};
use walnut_core::plan::{Request, Target, TimelineChoice};

#[derive(Debug, clap::Subcommand)]
pub enum LogicalCmd {
    /// Dump a database (pg_dump, custom format) into the repository, with progress; with --at,
    /// from a throwaway fork restored from the physical archive at that point (no load on the
    /// primary).
    Capture(CaptureArgs),
    /// List captures: ID, NAME, DATABASE, SOURCE, SIZE, STATUS, END TIME.
    List,
    /// Show one capture (ID, name or LATEST).
    Show { reference: String },
    /// Delete one capture (ID, name or LATEST; a FAILED one by ID).
    Delete { reference: String },
    /// Restore a dump (a capture, an https/s3/... URL, or a local file) into an existing database
    /// with pg_restore. A non-empty target is emptied first only with --confirm.
    Restore(RestoreArgs),
    /// Copy one database into another (pg_dump | pg_restore), with progress. A non-empty target
    /// is emptied first only with --confirm.
    Copy(CopyArgs),
    /// Write a capture's dump as a plain custom-format file that pg_restore reads (decrypted,
    /// decompressed); FILE defaults to ID.dump, - is standard output.
    Download {
        reference: String,
        file: Option<PathBuf>,
        /// The database of an --all capture.
        #[arg(long, conflicts_with = "globals")]
        database: Option<String>,
        /// The globals (roles, tablespaces; SQL for psql) of an --all capture.
        #[arg(long)]
        globals: bool,
    },
}

#[derive(Debug, Clone, clap::Args)]
pub struct CaptureArgs {
    /// The database (default: the connection's own).
    #[arg(long, conflicts_with = "all")]
    pub database: Option<String>,
    /// Every database plus the globals (roles, tablespaces), as one capture.
    #[arg(long)]
    pub all: bool,
    /// A unique name: [A-Za-z0-9._-]{1,64}.
    #[arg(long)]
    pub name: Option<String>,
    /// Capture the database as it was at this point, from the physical archive: a time with a
    /// zone (2026-07-15T15:17:54Z), an LSN (16/B374D848), or a restore point or backup name.
    #[arg(long, value_name = "TIME|LSN|NAME")]
    pub at: Option<String>,
    /// With --at: where the fork is restored (default state_dir/logical-scratch).
    #[arg(long, value_name = "DIR", requires = "at")]
    pub scratch: Option<PathBuf>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RestoreArgs {
    /// A capture (ID, name or LATEST), an https://, s3://, gs://, az:// or file:// URL, or a local file.
    pub source: String,
    /// The target database: postgresql://USER@HOST:PORT/DBNAME or 'host=... dbname=...'.
    #[arg(long, value_name = "CONNSTRING")]
    pub to: String,
    /// Parallel pg_restore jobs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub jobs: u32,
    /// Empty a non-empty target first (every user schema and its objects dropped).
    #[arg(long)]
    pub confirm: bool,
    /// The database of an --all capture.
    #[arg(long)]
    pub database: Option<String>,
    /// Do not restore object ownership (objects belong to the connecting role).
    #[arg(long)]
    pub no_owner: bool,
    /// Do not restore privileges (GRANT/REVOKE).
    #[arg(long)]
    pub no_privileges: bool,
    /// Restore as this role (SET ROLE).
    #[arg(long)]
    pub role: Option<String>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct CopyArgs {
    /// The source database: a connection string.
    pub from: String,
    /// The target database: a connection string.
    pub to: String,
    /// Empty a non-empty target first (every user schema and its objects dropped).
    #[arg(long)]
    pub confirm: bool,
    /// Do not restore object ownership.
    #[arg(long)]
    pub no_owner: bool,
    /// Do not restore privileges.
    #[arg(long)]
    pub no_privileges: bool,
}

pub async fn run(ctx: &Ctx, cmd: LogicalCmd) -> Result<()> {
    match cmd {
        LogicalCmd::Capture(a) => capture(ctx, &a).await,
        LogicalCmd::List => list(ctx).await,
        LogicalCmd::Show { reference } => show(ctx, &reference).await,
        LogicalCmd::Delete { reference } => delete(ctx, &reference).await,
        LogicalCmd::Restore(a) => restore(ctx, &a).await,
        LogicalCmd::Copy(a) => copy(ctx, &a).await,
        LogicalCmd::Download { reference, file, database, globals } => {
            download(ctx, &reference, file.as_deref(), database.as_deref(), globals).await
        }
    }
}

/// Where the client programs are looked for.
pub fn bindirs(ctx: &Ctx) -> Bindirs {
    let pg_config = std::process::Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    Bindirs { configured: ctx.config.pg_bindir.clone(), pg_config }
}

/// Parses a connection string given on the command line; the error never repeats it (it may
/// hold a password).
fn conn(what: &str, text: &str) -> Result<tokio_postgres::Config> {
    let mut cfg: tokio_postgres::Config = text.parse().map_err(|e| {
        anyhow::anyhow!(
            "the {what} connection string is not valid ({e}): use postgresql://USER@HOST:PORT/DBNAME or 'host=HOST port=PORT dbname=DBNAME'"
        )
    })?;
    if cfg.get_hosts().is_empty() {
        cfg.host("/var/run/postgresql");
    }
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(10));
    }
    cfg.application_name("walnut");
    Ok(cfg)
}

/// The target as messages name it: host, port and database, never a password.
fn describe_conn(cfg: &tokio_postgres::Config) -> String {
    let host = cfg
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_default();
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let db = cfg.get_dbname().or(cfg.get_user()).unwrap_or("postgres");
    format!("database {db:?} on {host}:{port}")
}

/// Shows a capture's, restore's or copy's progress until dropped: a line redrawn on a terminal,
/// a line every 10 s otherwise; the first time the phase becomes "indexes and constraints", a
/// line saying so (so that a long index build does not look hung).
struct ProgressView {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ProgressView {
    fn start(what: &'static str, progress: Arc<LogicalProgress>, quiet: bool) -> ProgressView {
        if quiet {
            return ProgressView { task: None };
        }
        let tty = std::io::stderr().is_terminal();
        let t0 = Instant::now();
        // Said as the phase begins (from the thread that sees it), so that a long index build
        // never looks hung, however short the data phase was.
        {
            let p = Arc::downgrade(&progress);
            progress.on_phase(move |phase| {
                if phase != logical::POST_DATA {
                    return;
                }
                let Some(p) = p.upgrade() else { return };
                let (bytes, done, _) = p.snapshot();
                if tty {
                    eprint!("\r\x1b[2K");
                }
                eprintln!(
                    "{what}: all data is in ({}, {done} table(s)) after {:.1?}; pg_restore is now building indexes and constraints, which can take a while",
                    output::bytes(bytes),
                    t0.elapsed()
                );
            });
        }
        let task = tokio::spawn(async move {
            let mut last_line = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(if tty { 250 } else { 500 })).await;
                let (bytes, done, total) = progress.snapshot();
                let phase = progress.phase();
                let line = format!(
                    "{what}: {phase}: tables {done}/{total}, {} ({}){}",
                    output::bytes(bytes),
                    output::rate(bytes, t0.elapsed()),
                    match progress.post_data_done.load(Ordering::Relaxed) {
                        0 => String::new(),
                        n => format!(", {n} index(es)/constraint(s) built"),
                    }
                );
                if tty {
                    eprint!("\r\x1b[2K{line}");
                } else if last_line.elapsed() >= Duration::from_secs(10) {
                    eprintln!("{line}");
                    last_line = Instant::now();
                }
            }
        });
        ProgressView { task: Some(task) }
    }
}

impl Drop for ProgressView {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            if std::io::stderr().is_terminal() {
                eprint!("\r\x1b[2K");
            }
        }
    }
}

pub async fn capture(ctx: &Ctx, a: &CaptureArgs) -> Result<()> {
    let cancel = super::stop_signal();
    let m = capture_with(ctx, a, false, cancel, !ctx.global.quiet).await?;
    if ctx.global.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
    } else if !ctx.global.quiet {
        let took = (m.end_time - m.start_time).to_std().unwrap_or_default();
        let tables: u64 = m.databases.iter().map(|d| d.tables).sum();
        println!(
            "capture {}{} DONE: {} ({} table(s)) from the {}: dump {} -> {} stored in {:.1?} ({})",
            m.id,
            m.name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default(),
            logical::database_label(m.all, &m.databases.iter().map(|d| d.database.clone()).collect::<Vec<_>>()),
            tables,
            m.source,
            output::bytes(m.dump_bytes),
            output::bytes(m.stored_bytes),
            took,
            output::rate(m.dump_bytes, took)
        );
    }
    Ok(())
}

/// Takes a capture (the CLI's and the agent's): of the running server, or with `--at` of a fork
/// restored from the archive. A capture that fails or is cancelled is marked FAILED.
pub async fn capture_with(
    ctx: &Ctx,
    a: &CaptureArgs,
    scheduled: bool,
    cancel: tokio_util::sync::CancellationToken,
    show: bool,
) -> Result<CaptureManifest> {
    if let Some(at) = &a.at {
        // A point the archive cannot reach is refused before the capture exists.
        plan_at(ctx, at).await?;
    }
    let started = begin_capture(ctx, a, scheduled).await?;
    run_capture(ctx, a, started, cancel, Arc::new(LogicalProgress::default()), show).await
}

/// Claims a capture's ID (RUNNING from here on).
pub async fn begin_capture(ctx: &Ctx, a: &CaptureArgs, scheduled: bool) -> Result<logical::Running> {
    if a.at.is_none() && a.scratch.is_some() {
        bail!("--scratch goes with --at");
    }
    let repo = ctx.repository()?;
    Ok(logical::begin(&repo, a.name.clone(), scheduled).await?)
}

/// Runs a claimed capture to DONE or FAILED.
pub async fn run_capture(
    ctx: &Ctx,
    a: &CaptureArgs,
    running: logical::Running,
    cancel: tokio_util::sync::CancellationToken,
    progress: Arc<LogicalProgress>,
    show: bool,
) -> Result<CaptureManifest> {
    let databases = match (&a.database, a.all) {
        (_, true) => Databases::All,
        (Some(d), _) => Databases::One(d.clone()),
        (None, false) => Databases::Default,
    };
    let mut opts = CaptureOptions {
        pg: pgserver::pg_config(ctx.config.pg_url.as_deref())?,
        databases,
        bindirs: bindirs(ctx),
        codec: ctx.config.codec.clone(),
        source: Source::Server,
        cancel: cancel.clone(),
    };
    if show {
        eprintln!("capture {} RUNNING", running.id());
    }
    let Some(at) = &a.at else {
        let _view = show.then(|| ProgressView::start("capture", progress.clone(), false));
        return Ok(running.run(&opts, progress).await?);
    };
    let base = a.scratch.clone().unwrap_or_else(|| ctx.config.state_dir.join("logical-scratch"));
    let id = running.id().to_string();
    let fork = tokio::select! {
        f = Fork::restore(ctx, at, &base, running.id(), show) => f,
        _ = cancel.cancelled() => Err(anyhow::anyhow!("walnut was asked to stop")),
    };
    let fork = match fork {
        Ok(f) => f,
        Err(e) => {
            let why = format!("restore the fork at {at}: {e:#}");
            running.fail(&why).await;
            bail!("capture {id} FAILED: {why}");
        }
    };
    opts.pg = fork.conn(opts.pg.get_user().unwrap_or("postgres"), opts.pg.get_dbname());
    opts.source = Source::Archive { at: at.clone(), target: fork.target.clone(), backup: fork.backup.clone() };
    let r = {
        let _view = show.then(|| ProgressView::start("capture", progress.clone(), false));
        running.run(&opts, progress).await
    };
    // The fork is stopped and removed whatever happened (also when dropped on the way).
    drop(fork);
    Ok(r?)
}

/// A throwaway fork restored from the archive: stopped and removed (with its whole work
/// directory) when dropped, however the capture ended.
struct Fork {
    work: PathBuf,
    data: PathBuf,
    sock: PathBuf,
    /// The socket directory is not below `work` (removed on its own).
    sock_outside: bool,
    bindir: Option<PathBuf>,
    target: String,
    backup: String,
}

/// The fork's server listens here (a directory of its own, reachable only by its OS user).
const FORK_PORT: u16 = 5432;

impl Drop for Fork {
    fn drop(&mut self) {
        let dirs: &[&Path] = if self.sock_outside { &[&self.work, &self.sock] } else { &[&self.work] };
        pgserver::discard("capture --at", &self.data, self.bindir.as_deref(), dirs);
    }
}

/// `--at TIME|LSN|NAME` as a recovery target: an LSN (`X/Y`), a time (it begins with a date:
/// a zone is required), else a name (a restore point, or a backup's ID or name).
fn parse_at(at: &str) -> Result<Target> {
    let t = at.trim();
    if t.is_empty() {
        bail!("--at needs a point: a time with a zone, an LSN (16/B374D848) or a restore point name");
    }
    if t.eq_ignore_ascii_case("latest") {
        return Ok(Target::Latest);
    }
    if let Ok(l) = t.parse::<walnut_pg::Lsn>()
        && t.contains('/')
    {
        return Ok(Target::Lsn(l));
    }
    let looks_like_date = t.len() >= 10 && t.as_bytes()[4] == b'-' && t[..4].bytes().all(|b| b.is_ascii_digit());
    if looks_like_date {
        return Ok(Target::Time(super::restore::parse_time(t).with_context(|| format!("--at {t:?}"))?));
    }
    Ok(Target::Name(t.to_string()))
}

/// Plans the restore of the fork at `at`: the target, the plan and the backup's manifest.
pub(crate) async fn plan_at(
    ctx: &Ctx,
    at: &str,
) -> Result<(Target, walnut_core::plan::Plan, walnut_core::backup::Manifest)> {
    let target = parse_at(at)?;
    let repo = ctx.repository()?;
    let req = Request { target: target.clone(), backup: None, timeline: TimelineChoice::Latest };
    let (plan, manifest) = walnut_core::restore::prepare(&repo, &req, chrono::Utc::now())
        .await
        .with_context(|| format!("--at {at}: the archive cannot restore to it"))?;
    Ok((target, plan, manifest))
}

impl Fork {
    async fn restore(ctx: &Ctx, at: &str, base: &Path, id: &str, show: bool) -> Result<Fork> {
        let (target, plan, manifest) = plan_at(ctx, at).await?;
        std::fs::create_dir_all(base).with_context(|| format!("create the scratch directory {}", base.display()))?;
        let need = manifest.data_bytes + manifest.data_bytes / 4 + 256 * 1024 * 1024;
        let free = super::drill::free_bytes(base)?;
        if free < need {
            bail!(
                "not enough room for the fork in {}: {} free, the backup needs about {} (data {} plus a quarter for WAL \
                 and the server); free space there or give --scratch DIR elsewhere",
                base.display(),
                output::bytes(free),
                output::bytes(need),
                output::bytes(manifest.data_bytes)
            );
        }
        let work = base.join(format!("at-{id}-{}", std::process::id()));
        let data = work.join("data");
        let mut sock = work.join("sock");
        // A unix socket path holds at most 107 bytes: under a deep scratch directory, the socket
        // goes to a private directory of its own in the system's temporary directory.
        let outside = sock.join(format!(".s.PGSQL.{FORK_PORT}")).as_os_str().len() > 100;
        if outside {
            sock = std::env::temp_dir().join(format!("walnut-fork-{}-{id}", std::process::id()));
            {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&sock)
                    .with_context(|| format!("create the fork's socket directory {}", sock.display()))?;
            }
            if sock.join(format!(".s.PGSQL.{FORK_PORT}")).as_os_str().len() > 100 {
                let _ = std::fs::remove_dir(&sock);
                bail!(
                    "the fork's socket path under {} is too long for a unix socket (PostgreSQL allows 107 bytes), and so is the temporary directory's: give --scratch a shorter directory",
                    base.display()
                );
            }
        }
        let bindir = pgserver::bindir(ctx.config.pg_bindir.as_deref(), manifest.pg_major.0).ok();
        std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
        let mut fork = Fork {
            work: work.clone(),
            data: data.clone(),
            sock: sock.clone(),
            sock_outside: outside,
            bindir: bindir.clone(),
            target: walnut_core::restore::describe_target(&plan.recovery_target),
            backup: plan.backup_id.to_string(),
        };
        if show {
            eprintln!(
                "restoring a fork of backup {} to {} into {} (archiving off, a private socket, no TCP port)",
                plan.backup_id,
                fork.target,
                work.display()
            );
        }
        let tablespace_map = manifest
            .tablespaces
            .iter()
            .map(|t| format!("{}={}", t.oid, work.join("tablespaces").join(&t.oid).display()))
            .collect();
        let (mut target_time, mut target_name, mut target_lsn, mut target_latest) = (None, None, None, false);
        match &target {
            Target::Time(_) => target_time = Some(at.trim().to_string()),
            Target::Lsn(l) => target_lsn = Some(l.to_string()),
            Target::Name(n) => target_name = Some(n.clone()),
            _ => target_latest = true,
        }
        let args = super::restore::RestoreArgs {
            dest: data.clone(),
            target_latest,
            target_time,
            target_name,
            target_lsn,
            target_xid: None,
            target_immediate: false,
            backup: None,
            exclusive: false,
            target_action: "promote".into(),
            target_timeline: "latest".into(),
            standby: false,
            start: false,
            port: None,
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
        let t0 = Instant::now();
        super::restore::run(&quiet, &args).await.context("restore")?;
        let bindir = bindir.ok_or_else(|| {
            anyhow::anyhow!(
                "PostgreSQL {} server binaries not found: install postgresql-{} or set [postgres] bindir",
                manifest.pg_major.0,
                manifest.pg_major.0
            )
        })?;
        // Only unix-socket connections, by the server's own OS user (the socket directory is
        // 0700), trusted: no password to handle, nothing reachable from the network.
        std::fs::create_dir_all(&sock)?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o700))?;
        }
        let hba = work.join("pg_hba.conf");
        std::fs::write(&hba, "# walnut logical capture --at: the fork's private socket only\nlocal all all trust\n")?;
        let log = work.join("server.log");
        std::fs::write(&log, "")?;
        for p in [&sock, &hba, &log, &work] {
            pgserver::prepare_ownership_of_new(p, &data)?;
        }
        let q = |p: &Path| crate::ctx::shell_quote(&p.display().to_string());
        let options = format!(
            "-c listen_addresses= -c unix_socket_directories={} -c port={FORK_PORT} -c hba_file={} -c archive_mode=off",
            q(&sock),
            q(&hba)
        );
        pgserver::pg_ctl_start(&bindir, &data, &log, &options, false)?;
        fork.bindir = Some(bindir);
        fork.wait_promoted(ctx, &log, show).await?;
        if show {
            eprintln!("fork restored and promoted in {:.1?}; dumping it", t0.elapsed());
        }
        Ok(fork)
    }

    /// The connection to the fork: its socket, as `user`.
    fn conn(&self, user: &str, dbname: Option<&str>) -> tokio_postgres::Config {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(&self.sock)
            .port(FORK_PORT)
            .user(user)
            .dbname(dbname.unwrap_or("postgres"))
            .application_name("walnut")
            .connect_timeout(Duration::from_secs(10));
        cfg
    }

    /// Waits until the fork has replayed to its target and promoted (accepts writes), as long
    /// as replay moves (10 minutes without progress is a stall).
    async fn wait_promoted(&self, ctx: &Ctx, log: &Path, show: bool) -> Result<()> {
        let source = pgserver::pg_config(ctx.config.pg_url.as_deref())?;
        let cfg = self.conn(source.get_user().unwrap_or("postgres"), Some("postgres"));
        let appeared = Instant::now();
        while !pgserver::running(&self.data) {
            if appeared.elapsed() > Duration::from_secs(30) {
                bail!("the fork did not start{}", pgserver::tail(log, 20));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (mut last_lsn, mut last_move, mut last_report) = (String::new(), Instant::now(), Instant::now());
        loop {
            if !pgserver::running(&self.data) {
                bail!("the fork stopped during recovery{}", pgserver::tail(log, 20));
            }
            if let Ok(c) = pgserver::connect(&cfg).await
                && let Ok(r) =
                    c.query_one("SELECT pg_is_in_recovery(), coalesce(pg_last_wal_replay_lsn()::text, '')", &[]).await
            {
                let (in_recovery, lsn): (bool, String) = (r.get(0), r.get(1));
                if !in_recovery {
                    return Ok(());
                }
                if lsn != last_lsn {
                    (last_lsn, last_move) = (lsn.clone(), Instant::now());
                }
                if show && last_report.elapsed() > Duration::from_secs(10) {
                    eprintln!("fork recovering: replayed up to {lsn}");
                    last_report = Instant::now();
                }
            }
            if last_move.elapsed() > Duration::from_secs(600) {
                bail!("the fork's recovery made no progress for 10 minutes{}", pgserver::tail(log, 20));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A capture as `list --json` shows it: the columns, then the details.
pub(crate) fn row_json(c: &logical::CaptureInfo) -> serde_json::Value {
    let k = c.catalog.as_ref();
    serde_json::json!({
        "id": c.id,
        "name": c.name(),
        "database": k.map(|k| k.database.clone()),
        "source": k.map(|k| k.source.to_string()),
        "size": k.map(|k| k.stored_bytes),
        "status": c.status,
        "end_time": k.map(|k| k.end_time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        "start_time": k.map(|k| k.start_time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)).or(c.started_at.clone()),
        "dump_bytes": k.map(|k| k.dump_bytes),
        "tables": k.map(|k| k.tables),
        "databases": k.map(|k| k.databases.clone()),
        "all": k.map(|k| k.all),
        "scheduled": k.map(|k| k.scheduled),
        "source_detail": k.map(|k| k.source.clone()),
        "error": c.error,
    })
}

async fn list(ctx: &Ctx) -> Result<()> {
    let repo = ctx.repository()?;
    let all = logical::list(&repo).await?;
    if ctx.global.json {
        println!("{}", serde_json::to_string_pretty(&all.iter().map(row_json).collect::<Vec<_>>())?);
        return Ok(());
    }
    if all.is_empty() {
        println!("no logical captures in {}", repo.describe());
        return Ok(());
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|c| {
            let k = c.catalog.as_ref();
            vec![
                c.id.clone(),
                c.name().unwrap_or("-").to_string(),
                k.map(|k| k.database.clone()).unwrap_or_else(|| "-".into()),
                k.map(|k| k.source.to_string()).unwrap_or_else(|| "-".into()),
                k.map(|k| output::bytes(k.stored_bytes)).unwrap_or_else(|| "-".into()),
                c.status.to_string(),
                k.map(|k| k.end_time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)).unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    super::backup::print_table(&["ID", "NAME", "DATABASE", "SOURCE", "SIZE", "STATUS", "END TIME"], &rows);
    for c in all.iter().filter(|c| c.status == Status::Failed) {
        println!("{} FAILED: {}", c.id, c.error.as_deref().unwrap_or("unknown"));
    }
    Ok(())
}

async fn show(ctx: &Ctx, reference: &str) -> Result<()> {
    let repo = ctx.repository()?;
    let info = logical::resolve_info(&repo, reference).await?;
    // The manifest itself needs the key when encrypted; the catalog does not.
    let manifest = logical::load_manifest(&repo, &info.id).await;
    if ctx.global.json {
        let mut v = row_json(&info);
        if let Ok(m) = &manifest {
            v["manifest"] = serde_json::to_value(m)?;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let k = info.catalog.as_ref().expect("DONE captures have a catalog");
    println!("ID:          {}", info.id);
    println!("Name:        {}", k.name.as_deref().unwrap_or("-"));
    println!("Status:      DONE{}", if k.scheduled { " (scheduled)" } else { " (on demand)" });
    println!("Database:    {}", k.database);
    println!("Source:      {}", k.source);
    if let Source::Archive { target, backup, .. } = &k.source {
        println!("             a fork restored from backup {backup} to {target}");
    }
    println!("PostgreSQL:  {}", k.pg_version_num);
    println!("Start:       {}", k.start_time);
    println!("End:         {}  ({:.1}s)", k.end_time, (k.end_time - k.start_time).num_milliseconds() as f64 / 1000.0);
    println!(
        "Dump:        {} ({} table(s)) -> {} stored",
        output::bytes(k.dump_bytes),
        k.tables,
        output::bytes(k.stored_bytes)
    );
    match manifest {
        Ok(m) => {
            println!("Made by:     {} ({} compression)", m.tool_version, m.compression);
            for d in &m.databases {
                println!(
                    "  {}: {} table(s), {} -> {} ({}, SHA-256 {})",
                    d.database,
                    d.tables,
                    output::bytes(d.object.content_bytes),
                    output::bytes(d.object.stored_bytes),
                    d.object.key,
                    &d.object.content_sha256[..16]
                );
            }
            if let Some(g) = &m.globals {
                println!("  globals (roles, tablespaces): {} ({})", output::bytes(g.content_bytes), g.key);
            }
        }
        Err(e) => println!("(the manifest itself cannot be read here: {e})"),
    }
    Ok(())
}

async fn delete(ctx: &Ctx, reference: &str) -> Result<()> {
    let repo = ctx.repository()?;
    let info = logical::delete(&repo, reference).await?;
    if ctx.global.json {
        println!("{}", serde_json::json!({ "deleted": info.id }));
    } else if !ctx.global.quiet {
        println!("capture {} deleted", info.id);
    }
    Ok(())
}

/// A temporary dump file, removed when dropped.
struct TempDump(PathBuf);

impl Drop for TempDump {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn temp_dump(ctx: &Ctx) -> Result<TempDump> {
    let dir = ctx.config.state_dir.join("logical-tmp");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    }
    Ok(TempDump(dir.join(format!("restore-{}-{:016x}.dump", std::process::id(), rand_u64()))))
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish()
}

/// Connects to a restore or copy target: its major version and pg_restore, with errors that
/// name the target without its password.
async fn open_target(ctx: &Ctx, to: &str, dump_major: Option<u32>) -> Result<lrestore::Target> {
    let cfg = conn("--to", to)?;
    let shown = describe_conn(&cfg);
    lrestore::target(cfg, &bindirs(ctx), dump_major).await.map_err(|e| match e {
        walnut_core::logical::LogicalError::Postgres(m) => {
            anyhow::anyhow!("connect to the target {shown}: {}", m.strip_prefix("connect: ").unwrap_or(&m))
        }
        other => anyhow::anyhow!("target {shown}: {other}"),
    })
}

/// Refuses a non-empty target without --confirm, printing what would be dropped; empties it
/// with --confirm. Returns what was dropped.
async fn check_target(ctx: &Ctx, target: &lrestore::Target, confirm: bool) -> Result<Vec<String>> {
    let contents = lrestore::inspect(&target.client).await?;
    if contents.is_empty() {
        return Ok(vec![]);
    }
    let lines = contents.describe();
    if !confirm {
        if !ctx.global.quiet {
            println!("database {:?} is not empty; with --confirm walnut first drops:", contents.database);
            for l in &lines {
                println!("  {l}");
            }
        }
        bail!(
            "database {:?} is not empty ({} item(s) listed above): nothing was changed; run again with --confirm to drop them and restore",
            contents.database,
            lines.len()
        );
    }
    Ok(lines)
}

async fn restore(ctx: &Ctx, a: &RestoreArgs) -> Result<()> {
    let cancel = super::stop_signal();
    let repo = ctx.repository();
    let external = a.source.contains("://") || Path::new(&a.source).exists();
    // The dump: a capture, or a URL / file.
    let (capture, name) = if external {
        (None, a.source.clone())
    } else {
        let repo = repo.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        match logical::resolve(repo, &a.source).await {
            Ok(m) => {
                let d = m.dump_of(a.database.as_deref())?.clone();
                let name = format!("capture {} (database {})", m.id, d.database);
                (Some((m, d)), name)
            }
            Err(logical::LogicalError::NotFound(r)) => bail!(
                "no logical capture matches {r:?} and no file {r:?} exists: give a capture ID, name or LATEST (walnut logical list), a URL or a dump file"
            ),
            Err(e) => return Err(e.into()),
        }
    };
    if external && a.database.is_some() {
        bail!("--database chooses a database of an --all capture: a URL or file holds one dump");
    }
    let target = open_target(ctx, &a.to, capture.as_ref().map(|(m, _)| m.pg_major)).await?;
    let dropping = check_target(ctx, &target, a.confirm).await?;
    let flags = lrestore::RestoreFlags {
        jobs: a.jobs,
        no_owner: a.no_owner,
        no_privileges: a.no_privileges,
        role: a.role.clone(),
    };
    let t0 = Instant::now();
    let temp = temp_dump(ctx)?;
    // A capture into an empty target, when pg_restore --jobs would not load it faster from a
    // file: restored as it downloads (nothing commits unless the whole dump matched its
    // checksum). Otherwise a verified local file first: a corrupt dump is refused before the
    // target is emptied or touched.
    if let Some((_, d)) = &capture
        && dropping.is_empty()
        && lrestore::streams_well(a.jobs, d.table_data)
    {
        let repo = repo.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
        let progress = Arc::new(LogicalProgress::default());
        progress.tables_total.store(d.tables, Ordering::Relaxed);
        let streamed = {
            let _view = ProgressView::start("restore", progress.clone(), ctx.global.quiet);
            lrestore::restore_streaming(repo, &d.object.key, &temp.0, &target, &flags, progress.clone(), &cancel).await
        };
        match streamed {
            Ok(size) => {
                return report_restore(ctx, a, &name, &target, size, &progress, &dropping, None, t0);
            }
            Err(logical::LogicalError::Unstreamable(_)) => {
                tracing::info!(
                    "{name}: its table of contents is of a format walnut does not read: restoring it from a file"
                );
            }
            Err(e) => {
                return Err(anyhow::Error::new(e))
                    .with_context(|| format!("restore {name} into {}", describe_conn(&target.cfg)));
            }
        }
    }
    let progress = Arc::new(LogicalProgress::default());
    let file = {
        let _view = ProgressView::start("download", progress.clone(), ctx.global.quiet);
        match &capture {
            Some((_, d)) => {
                let repo = repo.as_ref().map_err(|e| anyhow::anyhow!("{e:#}"))?;
                lrestore::fetch_object(repo, &d.object.key, &temp.0, false, progress.clone()).await?;
                temp.0.clone()
            }
            None => {
                let keys = ctx.config.identities.clone();
                match lrestore::fetch_external(&a.source, &ctx.config.storage, keys, &temp.0, progress.clone()).await? {
                    None => PathBuf::from(a.source.strip_prefix("file://").unwrap_or(&a.source)),
                    Some(_) => temp.0.clone(),
                }
            }
        }
    };
    if !lrestore::is_custom_dump(&file) {
        bail!("{name} is not a PostgreSQL custom-format dump");
    }
    if !dropping.is_empty() {
        let contents = lrestore::inspect(&target.client).await?;
        lrestore::empty(&target.client, &contents).await?;
        if !ctx.global.quiet {
            println!("emptied database {:?}: {}", contents.database, dropping.join("; "));
        }
    }
    let restore_progress = Arc::new(LogicalProgress::default());
    if let Some((_, d)) = &capture {
        restore_progress.tables_total.store(d.tables, Ordering::Relaxed);
    }
    let t1 = Instant::now();
    {
        let _view = ProgressView::start("restore", restore_progress.clone(), ctx.global.quiet);
        lrestore::run_pg_restore(&target, &file, &flags, restore_progress.clone(), &cancel)
            .await
            .with_context(|| format!("restore {name} into {}", describe_conn(&target.cfg)))?;
    }
    let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    report_restore(ctx, a, &name, &target, size, &restore_progress, &dropping, Some(t1), t0)
}

/// The closing line (or JSON) of a restore. `fetched`: when a download that came first ended
/// (none when the dump was restored as it downloaded).
#[allow(clippy::too_many_arguments)]
fn report_restore(
    ctx: &Ctx,
    a: &RestoreArgs,
    name: &str,
    target: &lrestore::Target,
    size: u64,
    progress: &LogicalProgress,
    dropping: &[String],
    fetched: Option<Instant>,
    t0: Instant,
) -> Result<()> {
    let tables = progress.tables_done.load(Ordering::Relaxed);
    let fetch_seconds = fetched.map(|t1| (t1 - t0).as_secs_f64());
    if ctx.global.json {
        println!(
            "{}",
            serde_json::json!({
                "source": name, "target": describe_conn(&target.cfg), "dump_bytes": size,
                "tables": tables, "emptied": dropping, "streamed": fetched.is_none(),
                "fetch_seconds": fetch_seconds,
                "restore_seconds": fetched.unwrap_or(t0).elapsed().as_secs_f64(),
            })
        );
    } else if !ctx.global.quiet {
        let how = match fetched {
            Some(t1) => format!("in {:.1?} (fetched and verified in {:.1?} first)", t1.elapsed(), t1 - t0),
            None => format!("in {:.1?}, as it downloaded", t0.elapsed()),
        };
        println!(
            "restored {name} ({}, {tables} table(s)) into {} with pg_restore --jobs {} {how}",
            output::bytes(size),
            describe_conn(&target.cfg),
            a.jobs,
        );
    }
    Ok(())
}

async fn copy(ctx: &Ctx, a: &CopyArgs) -> Result<()> {
    let cancel = super::stop_signal();
    let from = conn("FROM", &a.from)?;
    let to_cfg = conn("TO", &a.to)?;
    if describe_conn(&from) == describe_conn(&to_cfg) {
        bail!("FROM and TO are the same database ({}): copy into another one", describe_conn(&from));
    }
    let source = walnut_core::backup::connect(&from)
        .await
        .map_err(|e| anyhow::anyhow!("connect to the source {}: {e}", describe_conn(&from)))?;
    let v: i32 = source
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(|e| anyhow::anyhow!("{}", walnut_core::backup::pg_error(&e)))?
        .get(0);
    let tables: i64 = source
        .query_one(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r' \
             AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%'",
            &[],
        )
        .await
        .map_err(|e| anyhow::anyhow!("{}", walnut_core::backup::pg_error(&e)))?
        .get(0);
    drop(source);
    let source_major = v as u32 / 10_000;
    let pg_dump = walnut_core::logical::tools::find(&bindirs(ctx), "pg_dump", source_major)?;
    let target = open_target(ctx, &a.to, Some(source_major)).await?;
    let dropping = check_target(ctx, &target, a.confirm).await?;
    if !dropping.is_empty() {
        let contents = lrestore::inspect(&target.client).await?;
        lrestore::empty(&target.client, &contents).await?;
        if !ctx.global.quiet {
            println!("emptied database {:?}: {}", contents.database, dropping.join("; "));
        }
    }
    let progress = Arc::new(LogicalProgress::default());
    progress.tables_total.store(tables as u64, Ordering::Relaxed);
    let flags = lrestore::RestoreFlags { jobs: 1, no_owner: a.no_owner, no_privileges: a.no_privileges, role: None };
    let t0 = Instant::now();
    let ends = lrestore::CopyEnds { from: from.clone(), pg_dump, to: target };
    {
        let _view = ProgressView::start("copy", progress.clone(), ctx.global.quiet);
        lrestore::copy(&ends, &flags, progress.clone(), &cancel)
            .await
            .with_context(|| format!("copy {} into {}", describe_conn(&from), describe_conn(&ends.to.cfg)))?;
    }
    let bytes = progress.bytes.load(Ordering::Relaxed);
    if ctx.global.json {
        println!(
            "{}",
            serde_json::json!({"from": describe_conn(&from), "to": describe_conn(&ends.to.cfg), "dump_bytes": bytes,
                "tables": progress.tables_done.load(Ordering::Relaxed), "seconds": t0.elapsed().as_secs_f64(), "emptied": dropping})
        );
    } else if !ctx.global.quiet {
        println!(
            "copied {} into {}: {} ({} table(s)) in {:.1?} ({})",
            describe_conn(&from),
            describe_conn(&ends.to.cfg),
            output::bytes(bytes),
            progress.tables_done.load(Ordering::Relaxed),
            t0.elapsed(),
            output::rate(bytes, t0.elapsed())
        );
    }
    Ok(())
}

async fn download(
    ctx: &Ctx,
    reference: &str,
    file: Option<&Path>,
    database: Option<&str>,
    globals: bool,
) -> Result<()> {
    let repo = ctx.repository()?;
    let m = logical::resolve(&repo, reference).await?;
    let (object, default_name) = if globals {
        let g = m
            .globals
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("capture {} holds no globals: only an --all capture does", m.id))?;
        (g.clone(), format!("{}-globals.sql", m.id))
    } else {
        let d = m.dump_of(database)?;
        let name = if m.all { format!("{}-{}.dump", m.id, d.database) } else { format!("{}.dump", m.id) };
        (d.object.clone(), name)
    };
    let dest = file.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(&default_name));
    let to_stdout = dest.as_os_str() == "-";
    if !to_stdout && dest.exists() {
        bail!("{} exists: remove it or give another FILE", dest.display());
    }
    let progress = Arc::new(LogicalProgress::default());
    let t0 = Instant::now();
    let n = if to_stdout {
        if std::io::stdout().is_terminal() {
            bail!("standard output is a terminal: give a FILE, or redirect it");
        }
        lrestore::fetch_object(&repo, &object.key, Path::new("/dev/stdout"), false, progress).await?
    } else {
        let part = dest.with_extension("part");
        let r = {
            let _view = ProgressView::start("download", progress.clone(), ctx.global.quiet);
            lrestore::fetch_object(&repo, &object.key, &part, true, progress).await
        };
        match r {
            Ok(n) => {
                std::fs::rename(&part, &dest)
                    .with_context(|| format!("rename {} to {}", part.display(), dest.display()))?;
                n
            }
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                return Err(e.into());
            }
        }
    };
    if !ctx.global.quiet && !to_stdout {
        println!(
            "downloaded capture {} into {}: {} in {:.1?} (checked against its SHA-256){}",
            m.id,
            dest.display(),
            output::bytes(n),
            t0.elapsed(),
            if globals { "; apply it with psql -f" } else { "; restore it with pg_restore" }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_points() {
        assert!(matches!(parse_at("0/3000060").unwrap(), Target::Lsn(_)));
        assert!(matches!(parse_at("2026-07-15T15:17:54Z").unwrap(), Target::Time(_)));
        assert!(matches!(parse_at("2026-07-15 15:17:54+00").unwrap(), Target::Time(_)));
        let e = format!("{:#}", parse_at("2026-07-15 15:17:54").unwrap_err());
        assert!(e.contains("zone"), "{e}");
        assert!(matches!(parse_at("before-migration").unwrap(), Target::Name(n) if n == "before-migration"));
        assert!(matches!(parse_at("LATEST").unwrap(), Target::Latest));
        assert!(parse_at(" ").is_err());
    }

    #[test]
    fn connection_strings_never_show_passwords() {
        let e = conn("--to", "postgresql://u:s3cret@h:notaport/db").unwrap_err().to_string();
        assert!(!e.contains("s3cret") && e.contains("not valid"), "{e}");
        let c = conn("--to", "postgresql://u:s3cret@db.example:6432/app").unwrap();
        let shown = describe_conn(&c);
        assert_eq!(shown, "database \"app\" on db.example:6432");
    }
}
