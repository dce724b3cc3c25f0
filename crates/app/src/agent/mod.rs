//! `walnut agent`: scheduled full backups, retention, the HTTP admin API and metrics.
//!
//! Shape: one scheduler task that sleeps until the next backup or retention deadline (or until
//! settings change), and an axum server. A backup runs under one lock, so two backups of a
//! cluster never run at once (the API answers 409 while one runs).
//!
//! Shutdown (SIGTERM/SIGINT): no new backup starts and the API stops accepting connections; a
//! running backup gets `[agent] shutdown_timeout` to finish, then it is abandoned and marked
//! FAILED (a second signal abandons it at once). It is never left looking DONE.

use crate::config::{Settings, parse_duration};
use crate::ctx::Ctx;
use crate::pgserver;
use anyhow::Result;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, Notify, RwLock};
use tokio_util::sync::CancellationToken;
use walnut_core::backup::{self, Status};
use walnut_core::schedule::{self, ScheduleState};

mod api;
mod logical;
mod metrics;

pub use api::is_loopback;
use api::*;
use metrics::*;

const MAX_BODY: usize = 64 * 1024;

#[derive(Default)]
struct Metrics {
    last_backup_end: Option<chrono::DateTime<chrono::Utc>>,
    last_backup_duration: f64,
    last_backup_bytes: u64,
    scheduled_failures: u64,
    retention_deletions: u64,
    retention_runs: u64,
    retention_failures: u64,
    last_error: Option<String>,
    verify: Option<VerifyOutcome>,
    verify_runs: u64,
    drill: Option<crate::cmd::drill::Report>,
    drill_runs: u64,
    drill_failures: u64,
    drill_last_success: Option<chrono::DateTime<chrono::Utc>>,
    /// Incremental backups the agent took (incremental_frequency, max_replay).
    incremental_backups: u64,
}

/// The last `verify` the agent ran.
struct VerifyOutcome {
    at: chrono::DateTime<chrono::Utc>,
    seconds: f64,
    /// Defects found (0: every backup restorable and whole); `None` when verify could not run.
    defects: Option<usize>,
    /// The first defects, named, for the health report.
    summary: String,
    last_success: Option<chrono::DateTime<chrono::Utc>>,
}

pub struct Agent {
    ctx: Ctx,
    repo: walnut_core::Repository,
    settings: RwLock<Settings>,
    settings_path: std::path::PathBuf,
    backup_lock: Mutex<()>,
    metrics: Mutex<Metrics>,
    schedule: Mutex<ScheduleState>,
    wake: Notify,
    token: Option<String>,
    /// Cancelled when a shutdown is requested: nothing new starts.
    stop: CancellationToken,
    /// Cancelled when running backups must be abandoned.
    abandon: CancellationToken,
    /// Held by retention and verify, so verify never reports as missing what retention is
    /// deleting at that moment.
    maintenance: Mutex<()>,
    /// Backups started through the API: tasks of the agent's own, so a client that goes away
    /// does not cancel them half-way; a shutdown waits for them.
    tasks: tokio_util::task::TaskTracker,
    /// The last replay-time estimate, and when it was made.
    replay_cache: Mutex<Option<(Instant, Option<walnut_core::replay::Estimate>)>>,
    /// The logical capture this agent runs (one at a time).
    logical: Mutex<Option<logical::RunningCapture>>,
    logical_metrics: Mutex<logical::LogicalMetrics>,
    /// When the next scheduled logical capture is due.
    logical_next: Mutex<Option<chrono::DateTime<chrono::Utc>>>,
}

/// How long a replay-time estimate is served before it is made again.
const REPLAY_ESTIMATE_TTL: Duration = Duration::from_secs(10);

fn err(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Agent {
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(token) = &self.token else { return true };
        let given = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes()))
    }

    async fn next_due(&self) -> chrono::DateTime<chrono::Utc> {
        let freq = self.settings.read().await.full_backup_frequency;
        schedule::next_due(&*self.schedule.lock().await, freq, chrono::Utc::now())
    }

    /// Reads the anchor from the repository: the newest DONE scheduled backup.
    async fn refresh_anchor(&self) -> Result<()> {
        let list = backup::list(&self.repo).await?;
        self.schedule.lock().await.last_scheduled = schedule_anchor(&list);
        if self.metrics.lock().await.last_backup_end.is_none() {
            let newest = list.iter().filter_map(|b| b.manifest.as_ref()).map(|m| m.end_time).max();
            self.metrics.lock().await.last_backup_end = newest;
        }
        Ok(())
    }

    /// Takes a backup under the lock (None if one is running and `wait` is false).
    async fn take_backup(&self, name: Option<String>, scheduled: bool, wait: bool) -> Option<Result<backup::Manifest>> {
        self.take_backup_of(name, scheduled, wait, false).await
    }

    /// [`Agent::take_backup`], incremental when `incremental` (a full one when there is nothing
    /// to build on).
    async fn take_backup_of(
        &self,
        name: Option<String>,
        scheduled: bool,
        wait: bool,
        incremental: bool,
    ) -> Option<Result<backup::Manifest>> {
        let _guard = if wait {
            self.backup_lock.lock().await
        } else {
            match self.backup_lock.try_lock() {
                Ok(g) => g,
                Err(_) => return None,
            }
        };
        let t = Instant::now();
        let r = async {
            let mut opts = self.ctx.push_options(None, name, scheduled)?;
            opts.cancel = self.abandon.clone();
            if incremental {
                opts.incremental = Some(backup::IncrementalOptions {
                    parent: None,
                    max_chain: self.ctx.config.backup_max_chain,
                    tails: self.ctx.tails_dir(),
                });
            }
            let progress = Arc::new(backup::Progress::default());
            Ok(backup::push(&self.repo, &opts, progress).await?)
        }
        .await;
        let mut m = self.metrics.lock().await;
        match &r {
            Ok(man) => {
                m.last_backup_end = Some(chrono::Utc::now());
                m.last_backup_duration = t.elapsed().as_secs_f64();
                m.last_backup_bytes = man.data_bytes;
                m.last_error = None;
                tracing::info!("backup {} DONE ({} bytes, {:.1}s)", man.id, man.data_bytes, m.last_backup_duration);
            }
            Err(e) => {
                m.last_error = Some(format!("{e:#}"));
                tracing::error!("backup failed: {e:#}");
            }
        }
        Some(r)
    }

    /// How long a restore to the latest point would replay (see `walnut_core::replay`): from
    /// the newest DONE backup's start to the server's current WAL position (its archive's end
    /// when the server cannot be asked). `None` without a DONE backup.
    async fn replay_estimate(&self) -> Option<walnut_core::replay::Estimate> {
        // Health and metrics are polled often: one computation per REPLAY_ESTIMATE_TTL.
        let mut cached = self.replay_cache.lock().await;
        if let Some((at, e)) = cached.as_ref()
            && at.elapsed() < REPLAY_ESTIMATE_TTL
        {
            return e.clone();
        }
        let e = self.compute_replay_estimate().await;
        *cached = Some((Instant::now(), e.clone()));
        e
    }

    async fn compute_replay_estimate(&self) -> Option<walnut_core::replay::Estimate> {
        let list = backup::list(&self.repo).await.ok()?;
        let (id, start) = list
            .iter()
            .filter(|b| b.status == Status::Done)
            .filter_map(|b| b.manifest.as_ref().map(|m| (b.id.to_string(), m.start_lsn)))
            .max_by_key(|(_, start)| *start)?;
        let latest = match current_lsn(&self.ctx).await {
            Ok(l) => l,
            Err(_) => walnut_core::replay::archive_end(&self.repo).await?,
        };
        let identity = self.repo.identity().await.ok().flatten()?;
        let measured = self
            .ctx
            .config
            .repo_url()
            .ok()
            .and_then(|url| walnut_core::state::StateDir::open(&self.ctx.config.state_dir, url, &identity).ok())
            .and_then(|state| walnut_core::replay::measured(&state));
        Some(walnut_core::replay::estimate(&id, start, latest, measured.as_ref()))
    }

    async fn retention(&self) {
        let _maintenance = self.maintenance.lock().await;
        let s = self.settings.read().await.clone();
        let rule = walnut_core::retention::Rule::Policy(walnut_core::retention::Policy {
            recovery_window: s.recovery_window,
            minimum_redundancy: s.minimum_redundancy,
        });
        let run = async {
            let outcome = walnut_core::prune::decide(&self.repo, &rule, chrono::Utc::now()).await?;
            walnut_core::prune::execute(&self.repo, &outcome).await
        };
        match run.await {
            Ok((backups, _wal)) => {
                let mut m = self.metrics.lock().await;
                m.retention_deletions += backups as u64;
                m.retention_runs += 1;
            }
            Err(e) => {
                self.metrics.lock().await.retention_failures += 1;
                tracing::warn!("retention: {e:#}");
            }
        }
        // Keep the WAL summary index current, so that wal-show, wal-verify and restore planning
        // (often on another host, in a hurry) read a few index objects, not one per segment.
        if let Err(e) = walnut_core::wal::inventory(&self.repo, true).await {
            tracing::warn!("update the WAL summary index: {e}");
        }
    }
}

/// Runs `verify` of the whole repository every `[agent] verify_interval`.
async fn verifier(agent: Arc<Agent>) {
    let interval = agent.ctx.config.agent_verify_interval;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = agent.stop.cancelled() => return,
        }
        let started = std::time::Instant::now();
        let opts = walnut_core::verify::Options { backup: None, deep: false, parallel: 2 };
        let progress = Arc::new(backup::Progress::default());
        let run = {
            let _maintenance = agent.maintenance.lock().await;
            tokio::select! {
                r = walnut_core::verify::run(&agent.repo, &opts, progress, chrono::Utc::now()) => r,
                _ = agent.stop.cancelled() => return,
            }
        };
        let now = chrono::Utc::now();
        let mut m = agent.metrics.lock().await;
        let last_success = m.verify.as_ref().and_then(|v| v.last_success);
        let outcome = match run {
            Ok(r) => {
                let named: Vec<String> = r
                    .backups
                    .iter()
                    .flat_map(|b| b.defects.iter().map(move |d| format!("backup {}: {}: {}", b.id, d.object, d.reason)))
                    .chain(r.problems.iter().cloned())
                    .take(3)
                    .collect();
                let defects = if r.ok { 0 } else { r.defects().max(1) };
                if defects > 0 {
                    tracing::error!("verify found {defects} defect(s): {}", named.join("; "));
                } else {
                    tracing::info!("verify: {} backup(s) restorable and whole", r.backups.len());
                }
                VerifyOutcome {
                    at: now,
                    seconds: started.elapsed().as_secs_f64(),
                    defects: Some(defects),
                    summary: named.join("; "),
                    last_success: if defects == 0 { Some(now) } else { last_success },
                }
            }
            Err(e) => {
                tracing::error!("verify could not run: {e:#}");
                VerifyOutcome {
                    at: now,
                    seconds: started.elapsed().as_secs_f64(),
                    defects: None,
                    summary: format!("{e:#}"),
                    last_success,
                }
            }
        };
        m.verify = Some(outcome);
        m.verify_runs += 1;
    }
}

/// Runs a restore drill every `[drill] interval` (when set), the first that long after start.
async fn driller(agent: Arc<Agent>) {
    let Some(interval) = agent.ctx.config.drill_interval else { return };
    let base = crate::cmd::drill::scratch_base(&agent.ctx, None);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = agent.stop.cancelled() => return,
        }
        // The drill's own clean-up (stop its server, remove its directory) runs when it ends;
        // a shutdown waits for the drill rather than leave a server behind.
        let r = crate::cmd::drill::run_once(&agent.ctx, &base, agent.ctx.config.drill_port).await;
        match &r.reason {
            None => tracing::info!(
                "drill passed: backup {} restored in {:.1} s",
                r.backup.as_deref().unwrap_or("?"),
                r.recovery_seconds
            ),
            Some(why) => tracing::error!("drill failed: {why}"),
        }
        let mut m = agent.metrics.lock().await;
        m.drill_runs += 1;
        if r.ok {
            m.drill_last_success = Some(chrono::Utc::now());
        } else {
            m.drill_failures += 1;
        }
        m.drill = Some(r);
    }
}

/// Where the agent keeps its settings: per repository URL and cluster (repository identity).
fn settings_path(
    state_dir: &std::path::Path,
    repo: &walnut_core::Repository,
    identity: Option<&walnut_core::repo::Identity>,
) -> std::path::PathBuf {
    let url: String =
        walnut_core::envelope::sha256(repo.describe().as_bytes())[..8].iter().map(|b| format!("{b:02x}")).collect();
    let cluster = identity.map(|i| i.system_identifier.to_string()).unwrap_or_else(|| "new".into());
    state_dir.join("agent").join(format!("{url}-{cluster}")).join("settings.json")
}

/// The schedule's anchor: the *start* of the newest DONE scheduled backup. Anchored on starts, a
/// backup that takes 9 hours with a 24 h frequency still starts every 24 h (anchored on its end,
/// it would start every 33 h).
fn schedule_anchor(list: &[backup::BackupInfo]) -> Option<chrono::DateTime<chrono::Utc>> {
    list.iter()
        .filter(|b| b.status == Status::Done)
        .filter_map(|b| b.manifest.as_ref())
        .filter(|m| m.scheduled && m.kind == "full")
        .map(|m| m.start_time)
        .max()
}

/// The incremental schedule's anchor: the start of the newest DONE backup, of any type.
fn incremental_anchor(list: &[backup::BackupInfo]) -> Option<chrono::DateTime<chrono::Utc>> {
    list.iter().filter(|b| b.status == Status::Done).filter_map(|b| b.manifest.as_ref()).map(|m| m.start_time).max()
}

/// The server's current WAL position (on a standby: what it received).
async fn current_lsn(ctx: &Ctx) -> Result<walnut_pg::Lsn> {
    let client = pgserver::connect(&pgserver::pg_config(ctx.config.pg_url.as_deref())?).await?;
    let row = client
        .query_one(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() ELSE pg_current_wal_lsn() END)::text",
            &[],
        )
        .await
        .map_err(|e| anyhow::anyhow!("{}", backup::pg_error(&e)))?;
    let text: Option<String> = row.get(0);
    text.and_then(|t| t.parse().ok()).ok_or_else(|| anyhow::anyhow!("no WAL position"))
}

/// How often the RTO bound is checked.
fn replay_check_interval(max_replay: Duration) -> Duration {
    (max_replay / 4).clamp(Duration::from_secs(5), Duration::from_secs(60))
}

async fn scheduler(agent: Arc<Agent>) {
    let interval = agent.ctx.config.agent_retention_interval;
    let mut next_retention = tokio::time::Instant::now() + interval;
    let mut next_replay_check = tokio::time::Instant::now();
    // Incremental backups (by [agent] incremental_frequency or the max_replay bound): their
    // anchor is the newest backup's start; failures back off as scheduled full backups do.
    let mut incremental = ScheduleState::default();
    let at = |t: chrono::DateTime<chrono::Utc>| {
        tokio::time::Instant::now() + (t - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO)
    };
    loop {
        if let Err(e) = agent.refresh_anchor().await {
            tracing::warn!("read the repository: {e:#}");
        }
        let settings = agent.settings.read().await.clone();
        let backup_at = at(agent.next_due().await);
        let newest = backup::list(&agent.repo).await.ok().and_then(|l| incremental_anchor(&l));
        incremental.last_scheduled = newest;
        // No backup at all: the full schedule takes the first.
        let incremental_at =
            schedule::next_incremental(&incremental, settings.incremental_frequency, chrono::Utc::now()).map(at);
        let retry_at = (incremental.failures > 0)
            .then(|| {
                incremental
                    .last_failure
                    .map(|f| at(schedule::saturating_add(f, schedule::retry_delay(incremental.failures))))
            })
            .flatten();
        let replay_at = settings
            .max_replay
            .filter(|_| newest.is_some())
            .map(|_| next_replay_check.max(retry_at.unwrap_or(next_replay_check)));
        let wake_at = [Some(backup_at), Some(next_retention), incremental_at, replay_at]
            .into_iter()
            .flatten()
            .min()
            .expect("deadlines");
        tokio::select! {
            _ = tokio::time::sleep_until(wake_at) => {}
            _ = agent.wake.notified() => continue,
            _ = agent.stop.cancelled() => return,
        }
        let now = tokio::time::Instant::now();
        // Not raced against `stop`: a shutdown lets the backup finish or abandons it (see `run`).
        if now >= backup_at {
            match agent.take_backup(None, true, true).await {
                Some(Ok(m)) => {
                    let mut s = agent.schedule.lock().await;
                    s.failures = 0;
                    s.last_failure = None;
                    // The new anchor, at once (the repository says the same on the next refresh).
                    s.last_scheduled = Some(m.start_time);
                    drop(s);
                    agent.retention().await;
                    next_retention = tokio::time::Instant::now() + interval;
                }
                Some(Err(_)) => {
                    let mut s = agent.schedule.lock().await;
                    s.failures += 1;
                    s.last_failure = Some(chrono::Utc::now());
                    agent.metrics.lock().await.scheduled_failures += 1;
                }
                None => {}
            }
        } else if incremental_at.is_some_and(|t| now >= t) || replay_at.is_some_and(|t| now >= t) {
            let by_frequency = incremental_at.is_some_and(|t| now >= t);
            let mut why = by_frequency.then(|| "incremental_frequency".to_string());
            if !by_frequency && let Some(max) = settings.max_replay {
                next_replay_check = now + replay_check_interval(max);
                match agent.compute_replay_estimate().await {
                    Some(e) if e.seconds > max.as_secs_f64() => {
                        why = Some(format!(
                            "a restore to the latest point would replay {:.0}s of WAL ({} bytes since backup {}), over max_replay {}",
                            e.seconds,
                            e.wal_bytes,
                            e.backup,
                            humantime::format_duration(max)
                        ));
                    }
                    _ => {}
                }
            }
            if let Some(why) = why {
                tracing::info!("incremental backup: {why}");
                match agent.take_backup_of(None, true, true, true).await {
                    Some(Ok(_)) => {
                        incremental.failures = 0;
                        incremental.last_failure = None;
                        agent.metrics.lock().await.incremental_backups += 1;
                        agent.retention().await;
                        next_retention = tokio::time::Instant::now() + interval;
                    }
                    Some(Err(_)) => {
                        incremental.failures += 1;
                        incremental.last_failure = Some(chrono::Utc::now());
                        agent.metrics.lock().await.scheduled_failures += 1;
                    }
                    None => {}
                }
            }
        } else if now >= next_retention {
            agent.retention().await;
            next_retention = tokio::time::Instant::now() + interval;
        }
        if agent.stop.is_cancelled() {
            return;
        }
    }
}

impl Agent {
    /// The agent's state, from the configuration and the API token (if any). The persisted
    /// settings are this repository's and this cluster's (several clusters run as one OS user
    /// share a state directory); `archive_timeout` is reconciled with PostgreSQL at once, so what
    /// `GET /v1/settings` reports is what is in force.
    pub async fn new(ctx: Ctx, token: Option<String>) -> Result<Arc<Agent>> {
        let repo = ctx.repository()?;
        let identity = match repo.identity().await {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!("read the repository identity: {e}");
                None
            }
        };
        let settings_path = settings_path(&ctx.config.state_dir, &repo, identity.as_ref());
        let settings = load_persisted(&settings_path, &ctx.config.settings);
        Ok(Arc::new(Agent {
            repo,
            settings: RwLock::new(settings),
            settings_path,
            backup_lock: Mutex::new(()),
            maintenance: Mutex::new(()),
            metrics: Mutex::new(Metrics::default()),
            schedule: Mutex::new(ScheduleState::default()),
            wake: Notify::new(),
            token,
            stop: CancellationToken::new(),
            abandon: CancellationToken::new(),
            tasks: tokio_util::task::TaskTracker::new(),
            replay_cache: Mutex::new(None),
            logical: Mutex::new(None),
            logical_metrics: Mutex::new(Default::default()),
            logical_next: Mutex::new(None),
            ctx,
        }))
    }

    /// Makes PostgreSQL run the agent's `archive_timeout` (it may have been changed by hand, or
    /// by an agent of another cluster before settings were kept per cluster).
    pub async fn reconcile(&self) {
        let want = self.settings.read().await.archive_timeout;
        let running = async {
            let client = pgserver::connect(&pgserver::pg_config(self.ctx.config.pg_url.as_deref())?).await?;
            let row = client
                .query_one("SELECT setting::int FROM pg_settings WHERE name = 'archive_timeout'", &[])
                .await
                .map_err(|e| anyhow::anyhow!("{}", backup::pg_error(&e)))?;
            Ok::<i32, anyhow::Error>(row.get(0))
        };
        match running.await {
            Ok(secs) if i64::from(secs) == want.as_secs().max(1) as i64 => {}
            Ok(secs) => {
                tracing::info!("PostgreSQL runs archive_timeout = {secs}s; applying the agent's {}s", want.as_secs());
                if let Err(e) = apply_archive_timeout(&self.ctx, want).await {
                    tracing::warn!("apply archive_timeout: {e:#}");
                }
            }
            Err(e) => tracing::warn!("read PostgreSQL's archive_timeout: {e:#}"),
        }
    }

    /// Asks the agent to stop: the API closes, no backup starts, a running one may finish.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Abandons running backups (they are marked FAILED).
    pub fn abandon(&self) {
        self.abandon.cancel();
    }
}

/// The HTTP API over an agent state.
pub fn router(state: Arc<Agent>) -> Router {
    Router::new()
        .route("/v1/settings", get(settings_get).patch(settings_patch))
        .route("/v1/backups", get(backups_get).post(backups_post))
        .route("/v1/backups/{reference}", get(backup_get))
        .route("/v1/logical", get(logical::captures_get).post(logical::captures_post))
        .route("/v1/logical/{reference}", get(logical::capture_get).delete(logical::capture_delete))
        .route("/v1/logical/{reference}/cancel", axum::routing::post(logical::capture_cancel))
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            err(
                StatusCode::NOT_FOUND,
                "no such endpoint: see GET /v1/health, /v1/settings, /v1/backups, /v1/logical, /metrics",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY + 1))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Runs the agent: the scheduler and the API on `listener`, until [`Agent::stop`]; then waits
/// for running backups (finished, or abandoned by [`Agent::abandon`]) and returns.
pub async fn serve(state: Arc<Agent>, listener: tokio::net::TcpListener) -> Result<()> {
    tracing::info!("walnut agent listening on http://{}", listener.local_addr()?);
    let sched = tokio::spawn(scheduler(state.clone()));
    let verifier = tokio::spawn(verifier(state.clone()));
    let driller = tokio::spawn(driller(state.clone()));
    let captures = tokio::spawn(logical::logical_scheduler(state.clone()));
    let grace = state.ctx.config.agent_shutdown_timeout;
    let stopping = state.stop.clone();
    axum::serve(listener, router(state.clone()))
        .with_graceful_shutdown(async move { stopping.cancelled().await })
        .await?;
    verifier.abort();
    if tokio::time::timeout(grace + Duration::from_secs(30), driller).await.is_err() {
        tracing::error!("the restore drill did not stop in time");
    }
    if tokio::time::timeout(grace + Duration::from_secs(30), captures).await.is_err() {
        tracing::error!("the logical capture scheduler did not stop in time");
    }
    // The server is closed; the scheduler returns once a running backup is DONE or abandoned.
    if tokio::time::timeout(grace + Duration::from_secs(30), sched).await.is_err() {
        tracing::error!("the scheduler did not stop in time");
    }
    // Backups started through the API whose clients went away: DONE or abandoned (FAILED) too.
    state.tasks.close();
    if tokio::time::timeout(grace + Duration::from_secs(30), state.tasks.wait()).await.is_err() {
        tracing::error!("a backup started through the API did not stop in time");
    }
    if let Some(e) = &state.metrics.lock().await.last_error {
        tracing::info!("stopped; last backup error: {e}");
    } else {
        tracing::info!("stopped");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for ok in ["127.0.0.1", "127.0.0.1:5500", "localhost", "LOCALHOST:80", "[::1]", "[::1]:5500", "127.1.2.3:9"] {
            assert!(loopback_host(ok), "{ok}");
        }
        for bad in ["", "evil.example", "evil.example:5500", "10.0.0.1:5500", "127.0.0.1.evil.example", "[::2]:80"] {
            assert!(!loopback_host(bad), "{bad}");
        }
    }

    fn info(id: &str, scheduled: bool, start: &str, end: &str) -> backup::BackupInfo {
        backup::BackupInfo {
            id: walnut_core::backup::BackupId::parse(id).expect("a backup ID"),
            status: Status::Done,
            error: None,
            chain_stored_bytes: None,
            manifest: Some(backup::ManifestSummary {
                name: None,
                scheduled,
                timeline: walnut_pg::TimelineId(1),
                start_lsn: walnut_pg::Lsn(0x2000028),
                end_lsn: walnut_pg::Lsn(0x2000100),
                start_wal: "000000010000000000000002".into(),
                end_wal: "000000010000000000000002".into(),
                start_time: chrono::DateTime::parse_from_rfc3339(start).unwrap().into(),
                end_time: chrono::DateTime::parse_from_rfc3339(end).unwrap().into(),
                data_bytes: 1,
                stored_bytes: 1,
                files: 1,
                pg_version_num: 150000,
                kind: "full".into(),
                parent: None,
                chain: vec![],
            }),
        }
    }

    /// A 9-hour scheduled backup with a 24 h frequency: the next one is due 24 h after the
    /// last one *started* (on its end, it would be 33 h).
    #[test]
    fn the_schedule_is_anchored_on_starts() {
        let list = [
            info("20260101T000000", true, "2026-01-01T00:00:00Z", "2026-01-01T09:00:00Z"),
            info("20260101T120000", false, "2026-01-01T12:00:00Z", "2026-01-01T12:10:00Z"),
        ];
        let anchor = schedule_anchor(&list).unwrap();
        assert_eq!(anchor.to_rfc3339(), "2026-01-01T00:00:00+00:00");
        let state = ScheduleState { last_scheduled: Some(anchor), ..Default::default() };
        let due = schedule::next_due(&state, Duration::from_secs(24 * 3600), anchor);
        assert_eq!(due.to_rfc3339(), "2026-01-02T00:00:00+00:00");
    }
}
