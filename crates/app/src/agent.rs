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
    /// Backups started through the API: tasks of the agent's own, so a client that goes away
    /// does not cancel them half-way; a shutdown waits for them.
    tasks: tokio_util::task::TaskTracker,
}

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
            let newest = list
                .iter()
                .filter_map(|b| b.manifest.as_ref())
                .filter_map(|m| chrono::DateTime::parse_from_rfc3339(&m.end_time).ok())
                .map(|t| t.with_timezone(&chrono::Utc))
                .max();
            self.metrics.lock().await.last_backup_end = newest;
        }
        Ok(())
    }

    /// Takes a backup under the lock (None if one is running and `wait` is false).
    async fn take_backup(&self, name: Option<String>, scheduled: bool, wait: bool) -> Option<Result<backup::Manifest>> {
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

    async fn retention(&self) {
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

/// The schedule's anchor: the *start* of the newest DONE scheduled backup. Anchored on starts, a
/// backup that takes 9 hours with a 24 h frequency still starts every 24 h (anchored on its end,
/// it would start every 33 h).
fn schedule_anchor(list: &[backup::BackupInfo]) -> Option<chrono::DateTime<chrono::Utc>> {
    list.iter()
        .filter(|b| b.status == Status::Done)
        .filter_map(|b| b.manifest.as_ref())
        .filter(|m| m.scheduled)
        .filter_map(|m| chrono::DateTime::parse_from_rfc3339(&m.start_time).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
        .max()
}

async fn scheduler(agent: Arc<Agent>) {
    let interval = agent.ctx.config.agent_retention_interval;
    let mut next_retention = tokio::time::Instant::now() + interval;
    loop {
        if let Err(e) = agent.refresh_anchor().await {
            tracing::warn!("read the repository: {e:#}");
        }
        let due = agent.next_due().await;
        let backup_at = tokio::time::Instant::now() + (due - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = tokio::time::sleep_until(backup_at.min(next_retention)) => {}
            _ = agent.wake.notified() => continue,
            _ = agent.stop.cancelled() => return,
        }
        if tokio::time::Instant::now() < backup_at {
            agent.retention().await;
            next_retention = tokio::time::Instant::now() + interval;
            continue;
        }
        // Not raced against `stop`: a shutdown lets the backup finish or abandons it (see `run`).
        match agent.take_backup(None, true, true).await {
            Some(Ok(m)) => {
                let mut s = agent.schedule.lock().await;
                s.failures = 0;
                s.last_failure = None;
                // The new anchor, at once (the repository says the same on the next refresh).
                s.last_scheduled = m.started().or(s.last_scheduled);
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
        if agent.stop.is_cancelled() {
            return;
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewBackup {
    name: Option<String>,
}

fn parse_json(body: &[u8]) -> Result<serde_json::Value, Box<Response>> {
    if body.len() > MAX_BODY {
        return Err(Box::new(err(StatusCode::PAYLOAD_TOO_LARGE, format!("request body over {MAX_BODY} bytes"))));
    }
    serde_json::from_slice(body).map_err(|e| Box::new(err(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}"))))
}

/// Applies a settings patch: every field checked, nothing changed unless all are valid.
fn patched(current: &Settings, body: &serde_json::Value) -> Result<Settings, String> {
    let obj = body.as_object().ok_or("the body must be a JSON object of settings")?;
    let mut s = current.clone();
    for (k, v) in obj {
        let dur = |v: &serde_json::Value| -> Result<Duration, String> {
            let text = v.as_str().ok_or_else(|| format!("{k} must be a duration string like \"60s\", got {v}"))?;
            parse_duration(text).map_err(|e| format!("{k}: {e}"))
        };
        match k.as_str() {
            "archive_timeout" => s.archive_timeout = dur(v)?,
            "full_backup_frequency" => s.full_backup_frequency = dur(v)?,
            "recovery_window" => s.recovery_window = dur(v)?,
            "minimum_redundancy" => {
                let n =
                    v.as_u64().ok_or_else(|| format!("minimum_redundancy must be a non-negative integer, got {v}"))?;
                s.minimum_redundancy = u32::try_from(n)
                    .ok()
                    .filter(|n| *n <= 1000)
                    .ok_or_else(|| format!("minimum_redundancy must be at most 1000, got {n}"))?;
            }
            other => {
                return Err(format!(
                    "unknown setting {other:?}: the settings are archive_timeout, full_backup_frequency, recovery_window, minimum_redundancy"
                ));
            }
        }
    }
    for (name, d) in [
        ("archive_timeout", s.archive_timeout),
        ("full_backup_frequency", s.full_backup_frequency),
        ("recovery_window", s.recovery_window),
    ] {
        if d > Duration::from_secs(100 * 365 * 86400) {
            return Err(format!("{name} is absurdly long: at most 100y"));
        }
    }
    s.validate()?;
    Ok(s)
}

async fn apply_archive_timeout(ctx: &Ctx, d: Duration) -> Result<()> {
    let client = pgserver::connect(&pgserver::pg_config(ctx.config.pg_url.as_deref())?).await?;
    let q = |e: tokio_postgres::Error| anyhow::anyhow!("{}", walnut_core::backup::pg_error(&e));
    // Two statements: ALTER SYSTEM cannot run inside the implicit transaction of a batch.
    client.batch_execute(&format!("ALTER SYSTEM SET archive_timeout = {}", d.as_secs().max(1))).await.map_err(q)?;
    client.batch_execute("SELECT pg_reload_conf()").await.map_err(q)
}

fn persist(path: &std::path::Path, s: &Settings) -> Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(s)?)?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn load_persisted(path: &std::path::Path, base: &Settings) -> Settings {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| patched(base, &v).ok())
        .unwrap_or_else(|| base.clone())
}

async fn settings_get(State(a): State<Arc<Agent>>) -> Response {
    Json(a.settings.read().await.clone()).into_response()
}

async fn settings_patch(State(a): State<Arc<Agent>>, body: axum::body::Bytes) -> Response {
    let v = match parse_json(&body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let current = a.settings.read().await.clone();
    let new = match patched(&current, &v) {
        Ok(s) => s,
        Err(e) => return err(StatusCode::BAD_REQUEST, e),
    };
    if new.archive_timeout != current.archive_timeout
        && let Err(e) = apply_archive_timeout(&a.ctx, new.archive_timeout).await
    {
        return err(StatusCode::SERVICE_UNAVAILABLE, format!("could not apply archive_timeout to PostgreSQL: {e:#}"));
    }
    if let Err(e) = persist(&a.settings_path, &new) {
        return err(StatusCode::INTERNAL_SERVER_ERROR, format!("could not persist the settings: {e:#}"));
    }
    *a.settings.write().await = new.clone();
    a.wake.notify_one();
    Json(new).into_response()
}

async fn backups_get(State(a): State<Arc<Agent>>) -> Response {
    match backup::list(&a.repo).await {
        Ok(l) => Json(l).into_response(),
        Err(e) => err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn backups_post(State(a): State<Arc<Agent>>, body: axum::body::Bytes) -> Response {
    let req: NewBackup = if body.is_empty() {
        NewBackup { name: None }
    } else {
        let v = match parse_json(&body) {
            Ok(v) => v,
            Err(r) => return *r,
        };
        match serde_json::from_value(v) {
            Ok(r) => r,
            Err(e) => return err(StatusCode::BAD_REQUEST, format!("invalid request: {e}")),
        }
    };
    if let Some(n) = &req.name
        && let Err(e) = backup::check_name(n)
    {
        return err(StatusCode::BAD_REQUEST, e.to_string());
    }
    if a.stop.is_cancelled() {
        return err(StatusCode::SERVICE_UNAVAILABLE, "the agent is shutting down: no new backup starts");
    }
    // The backup is the agent's task, not the request's: if the client disconnects, this handler
    // is dropped but the backup goes on to DONE (or FAILED), never left RUNNING.
    let task = {
        let a = a.clone();
        a.tasks.clone().spawn(async move { a.take_backup(req.name, false, false).await })
    };
    let outcome = match task.await {
        Ok(o) => o,
        Err(e) => Some(Err(anyhow::anyhow!("the backup task failed: {e}"))),
    };
    match outcome {
        None => err(StatusCode::CONFLICT, "a backup is already running: try again when it is DONE"),
        Some(Ok(m)) => (StatusCode::CREATED, Json(backup::ManifestSummary::from(&m))).into_response(),
        Some(Err(e)) => {
            let msg = format!("{e:#}");
            let status =
                if msg.contains("already exists") { StatusCode::CONFLICT } else { StatusCode::INTERNAL_SERVER_ERROR };
            err(status, msg)
        }
    }
}

async fn backup_get(State(a): State<Arc<Agent>>, UrlPath(reference): UrlPath<String>) -> Response {
    match backup::resolve(&a.repo, &reference).await {
        Ok(m) => Json(backup::ManifestSummary::from(&m)).into_response(),
        Err(e @ backup::BackupError::NotFound(_)) => err(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

struct Archiver {
    archived: i64,
    failed: i64,
    failing: bool,
    lag_seconds: f64,
}

async fn archiver(ctx: &Ctx) -> Result<Archiver> {
    let client = pgserver::connect(&pgserver::pg_config(ctx.config.pg_url.as_deref())?).await?;
    let r = client
        .query_one(
            "SELECT archived_count, failed_count, \
             coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false), \
             coalesce(extract(epoch FROM now() - last_archived_time)::float8, -1) FROM pg_stat_archiver",
            &[],
        )
        .await
        .map_err(|e| anyhow::anyhow!("{}", walnut_core::backup::pg_error(&e)))?;
    Ok(Archiver { archived: r.get(0), failed: r.get(1), failing: r.get(2), lag_seconds: r.get(3) })
}

async fn health(State(a): State<Arc<Agent>>) -> Response {
    let mut reasons = Vec::new();
    match archiver(&a.ctx).await {
        Ok(ar) if ar.failing => reasons.push("archiving is failing (pg_stat_archiver)".to_string()),
        Ok(_) => {}
        Err(e) => reasons.push(format!("PostgreSQL is down or unreachable: {e:#}")),
    }
    if let Err(e) = a.repo.store().list("backups").await {
        reasons.push(format!("repository unreachable: {e}"));
    }
    let freq = a.settings.read().await.full_backup_frequency;
    let last = a.metrics.lock().await.last_backup_end;
    let stale = last.is_none_or(|t| (chrono::Utc::now() - t).to_std().unwrap_or_default() > freq * 2);
    if stale {
        reasons.push("no backup within twice full_backup_frequency".into());
    }
    let body = serde_json::json!({
        "healthy": reasons.is_empty(),
        "reasons": reasons,
        "next_scheduled_backup": a.next_due().await.to_rfc3339(),
        "last_backup": last.map(|t| t.to_rfc3339()),
        "last_error": a.metrics.lock().await.last_error,
    });
    let status = if reasons.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

async fn metrics(State(a): State<Arc<Agent>>) -> Response {
    const GAUGE: &str = "gauge";
    const COUNTER: &str = "counter";
    // (name, help, type, value), in exposition order.
    let mut samples: Vec<(&str, &str, &str, String)> = Vec::new();
    let m = a.metrics.lock().await;
    if let Some(t) = m.last_backup_end {
        let age = (chrono::Utc::now() - t).num_seconds();
        samples.push((
            "walnut_last_backup_timestamp_seconds",
            "End of the last successful backup.",
            GAUGE,
            t.timestamp().to_string(),
        ));
        samples.push(("walnut_last_backup_age_seconds", "Age of the last successful backup.", GAUGE, age.to_string()));
    }
    samples.extend([
        (
            "walnut_last_backup_duration_seconds",
            "Duration of the last successful backup.",
            GAUGE,
            format!("{:.3}", m.last_backup_duration),
        ),
        (
            "walnut_last_backup_bytes",
            "Data size of the last successful backup.",
            GAUGE,
            m.last_backup_bytes.to_string(),
        ),
        (
            "walnut_scheduled_backup_failures_total",
            "Failed scheduled backups.",
            COUNTER,
            m.scheduled_failures.to_string(),
        ),
        (
            "walnut_retention_deletions_total",
            "Backups deleted by retention.",
            COUNTER,
            m.retention_deletions.to_string(),
        ),
        (
            "walnut_retention_runs_total",
            "Completed retention runs (after each scheduled backup and every retention_interval).",
            COUNTER,
            m.retention_runs.to_string(),
        ),
        ("walnut_retention_failures_total", "Failed retention runs.", COUNTER, m.retention_failures.to_string()),
    ]);
    drop(m);
    if let Ok(ar) = archiver(&a.ctx).await {
        samples.push((
            "walnut_wal_archived_total",
            "WAL files archived (pg_stat_archiver).",
            COUNTER,
            ar.archived.to_string(),
        ));
        samples.push((
            "walnut_wal_failed_total",
            "Failed archive attempts (pg_stat_archiver).",
            COUNTER,
            ar.failed.to_string(),
        ));
        if ar.lag_seconds >= 0.0 {
            samples.push((
                "walnut_archive_lag_seconds",
                "Seconds since the last archived WAL file.",
                GAUGE,
                format!("{:.1}", ar.lag_seconds),
            ));
        }
    }
    if let Some(pgdata) = &a.ctx.config.pgdata
        && let Ok(rd) = std::fs::read_dir(pgdata.join("pg_wal/archive_status"))
    {
        let ready = rd.filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().ends_with(".ready")).count();
        samples.push(("walnut_ready_backlog", "WAL files waiting to be archived.", GAUGE, ready.to_string()));
    }
    let out: String = samples
        .iter()
        .map(|(name, help, kind, value)| format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"))
        .collect();
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}

/// Every route needs the bearer token when one is configured (401 otherwise). On a loopback
/// address (no token), the `Host` header must name a loopback host, so that a web page cannot
/// reach the API by DNS rebinding; and every request that changes something must be
/// `application/json`, which a cross-site form or `text/plain` POST cannot send without a
/// preflight.
async fn guard(State(a): State<Arc<Agent>>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if !a.authorized(req.headers()) {
        return err(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    if a.token.is_none() {
        let host = req.headers().get("host").and_then(|h| h.to_str().ok()).unwrap_or("");
        if !loopback_host(host) {
            return err(
                StatusCode::FORBIDDEN,
                format!(
                    "Host {host:?} is not a loopback name: the agent without a token answers 127.0.0.1, [::1] and localhost only"
                ),
            );
        }
    }
    let mutating = !matches!(*req.method(), axum::http::Method::GET | axum::http::Method::HEAD);
    let json = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json")));
    if mutating && !json {
        return err(StatusCode::UNSUPPORTED_MEDIA_TYPE, "send the request with Content-Type: application/json");
    }
    json_errors(next.run(req).await).await
}

/// `127.0.0.1`, `localhost`, `[::1]`, with or without a port.
fn loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Every error the API returns is JSON (`{"error": ...}`), including the ones axum makes itself
/// (404, 405, 413).
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if status.as_u16() < 400 || is_json {
        return resp;
    }
    let body = axum::body::to_bytes(resp.into_body(), MAX_BODY).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&body).trim().to_string();
    let msg = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_lowercase() } else { text };
    err(status, msg)
}

pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}

impl Agent {
    /// The agent's state, from the configuration and the API token (if any).
    pub fn new(ctx: Ctx, token: Option<String>) -> Result<Arc<Agent>> {
        let repo = ctx.repository()?;
        let settings_path = ctx.config.state_dir.join("agent").join("settings.json");
        let settings = load_persisted(&settings_path, &ctx.config.settings);
        Ok(Arc::new(Agent {
            repo,
            settings: RwLock::new(settings),
            settings_path,
            backup_lock: Mutex::new(()),
            metrics: Mutex::new(Metrics::default()),
            schedule: Mutex::new(ScheduleState::default()),
            wake: Notify::new(),
            token,
            stop: CancellationToken::new(),
            abandon: CancellationToken::new(),
            tasks: tokio_util::task::TaskTracker::new(),
            ctx,
        }))
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
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            err(StatusCode::NOT_FOUND, "no such endpoint: see GET /v1/health, /v1/settings, /v1/backups, /metrics")
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
    let grace = state.ctx.config.agent_shutdown_timeout;
    let stopping = state.stop.clone();
    axum::serve(listener, router(state.clone()))
        .with_graceful_shutdown(async move { stopping.cancelled().await })
        .await?;
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
            id: id.into(),
            status: Status::Done,
            error: None,
            manifest: Some(backup::ManifestSummary {
                name: None,
                scheduled,
                timeline: 1,
                start_lsn: "0/2000028".into(),
                end_lsn: "0/2000100".into(),
                start_wal: "000000010000000000000002".into(),
                end_wal: "000000010000000000000002".into(),
                start_time: start.into(),
                end_time: end.into(),
                data_bytes: 1,
                stored_bytes: 1,
                files: 1,
                pg_version_num: 150000,
            }),
        }
    }

    /// A 9-hour scheduled backup with a 24 h frequency: the next one is due 24 h after the
    /// last one *started* (on its end, it would be 33 h).
    #[test]
    fn the_schedule_is_anchored_on_starts() {
        let list = [
            info("A", true, "2026-01-01T00:00:00Z", "2026-01-01T09:00:00Z"),
            info("B", false, "2026-01-01T12:00:00Z", "2026-01-01T12:10:00Z"),
        ];
        let anchor = schedule_anchor(&list).unwrap();
        assert_eq!(anchor.to_rfc3339(), "2026-01-01T00:00:00+00:00");
        let state = ScheduleState { last_scheduled: Some(anchor), ..Default::default() };
        let due = schedule::next_due(&state, Duration::from_secs(24 * 3600), anchor);
        assert_eq!(due.to_rfc3339(), "2026-01-02T00:00:00+00:00");
    }
}
