//! Logical captures in the agent: `[logical] schedule` with its retention, the API routes to
//! list, capture, cancel and delete, and their metrics.
//!
//! One capture runs at a time in an agent (the API answers 409 while one runs). A capture is the
//! agent's task, not a request's: a client that goes away does not cancel it; a cancel request
//! or the agent's shutdown (once `shutdown_timeout` has passed) does, and it ends FAILED.

use super::*;
use crate::cmd::logical::{self as lcmd, CaptureArgs};
use walnut_core::logical::{self, LogicalProgress};

/// The capture running in this agent.
pub(super) struct RunningCapture {
    id: String,
    name: Option<String>,
    scheduled: bool,
    started: chrono::DateTime<chrono::Utc>,
    cancel: CancellationToken,
    progress: Arc<LogicalProgress>,
}

#[derive(Default)]
pub(super) struct LogicalMetrics {
    done: u64,
    failed: u64,
    scheduled_failures: u64,
    retention_deletions: u64,
    last_success: Option<chrono::DateTime<chrono::Utc>>,
    last_seconds: f64,
    last_dump_bytes: u64,
    last_stored_bytes: u64,
    last_error: Option<String>,
}

/// Why a capture did not start.
pub(super) enum NotStarted {
    /// One runs already (its ID).
    Busy(String),
    Refused(anyhow::Error),
}

impl Agent {
    /// Claims a capture (RUNNING from here) and returns its ID and the work that runs it to DONE
    /// or FAILED.
    async fn begin_logical(
        self: &Arc<Self>,
        a: CaptureArgs,
        scheduled: bool,
    ) -> Result<(String, impl std::future::Future<Output = Result<logical::CaptureManifest>> + use<>), NotStarted> {
        let mut slot = self.logical.lock().await;
        if let Some(r) = slot.as_ref() {
            return Err(NotStarted::Busy(r.id.clone()));
        }
        if let Some(at) = &a.at {
            // A point the archive cannot reach is refused before the capture exists.
            lcmd::plan_at(&self.ctx, at).await.map_err(NotStarted::Refused)?;
        }
        let running = lcmd::begin_capture(&self.ctx, &a, scheduled).await.map_err(NotStarted::Refused)?;
        let id = running.id().to_string();
        let cancel = self.abandon.child_token();
        let progress = Arc::new(LogicalProgress::default());
        *slot = Some(RunningCapture {
            id: id.clone(),
            name: a.name.clone(),
            scheduled,
            started: chrono::Utc::now(),
            cancel: cancel.clone(),
            progress: progress.clone(),
        });
        drop(slot);
        let agent = self.clone();
        let work = async move {
            let t = Instant::now();
            let r = lcmd::run_capture(&agent.ctx, &a, running, cancel, progress, false).await;
            agent.logical.lock().await.take();
            let mut m = agent.logical_metrics.lock().await;
            match &r {
                Ok(man) => {
                    m.done += 1;
                    m.last_success = Some(man.end_time);
                    m.last_seconds = t.elapsed().as_secs_f64();
                    m.last_dump_bytes = man.dump_bytes;
                    m.last_stored_bytes = man.stored_bytes;
                    m.last_error = None;
                    tracing::info!("capture {} DONE ({} bytes, {:.1}s)", man.id, man.dump_bytes, m.last_seconds);
                }
                Err(e) => {
                    m.failed += 1;
                    m.last_error = Some(format!("{e:#}"));
                    tracing::error!("capture failed: {e:#}");
                }
            }
            r
        };
        Ok((id, work))
    }

    /// Applies `[logical]` retention to scheduled captures.
    async fn logical_retention(&self) {
        let keep = self.ctx.config.logical_keep;
        match logical::prune(&self.repo, &keep, chrono::Utc::now(), true).await {
            Ok(decisions) => {
                let deleted: Vec<&str> = decisions.iter().filter(|d| !d.keep).map(|d| d.id.as_str()).collect();
                if !deleted.is_empty() {
                    tracing::info!("logical retention deleted {} capture(s): {}", deleted.len(), deleted.join(", "));
                }
                self.logical_metrics.lock().await.retention_deletions += deleted.len() as u64;
            }
            Err(e) => tracing::warn!("logical retention: {e}"),
        }
    }

    /// What `[logical]` asks of a scheduled capture.
    fn scheduled_capture_args(&self) -> CaptureArgs {
        let c = &self.ctx.config;
        CaptureArgs {
            database: c.logical_database.clone(),
            all: c.logical_all,
            name: None,
            at: c.logical_from_archive.then(|| "latest".to_string()),
            scratch: if c.logical_from_archive { c.logical_scratch_dir.clone() } else { None },
        }
    }

    /// When the next scheduled capture is due (None without a schedule); failures back off.
    async fn next_capture_due(
        &self,
        failures: u32,
        last_failure: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Option<chrono::DateTime<chrono::Utc>> {
        let schedule = self.ctx.config.logical_schedule?;
        let now = chrono::Utc::now();
        let anchor = match logical::list(&self.repo).await {
            Ok(all) => {
                all.iter().filter_map(|c| c.catalog.as_ref()).filter(|k| k.scheduled).map(|k| k.start_time).max()
            }
            Err(e) => {
                tracing::warn!("list logical captures: {e}");
                return Some(schedule::saturating_add(now, Duration::from_secs(60)));
            }
        };
        let due = schedule.next_due(anchor, now);
        Some(match last_failure {
            Some(f) if failures > 0 => due.max(schedule::saturating_add(f, schedule::retry_delay(failures))),
            _ => due,
        })
    }
}

/// Takes the scheduled captures (`[logical] schedule`) and applies their retention after each.
pub(super) async fn logical_scheduler(agent: Arc<Agent>) {
    if agent.ctx.config.logical_schedule.is_none() {
        return;
    }
    agent.logical_retention().await;
    let mut failures = 0u32;
    let mut last_failure = None;
    loop {
        let Some(due) = agent.next_capture_due(failures, last_failure).await else { return };
        *agent.logical_next.lock().await = Some(due);
        let wait = (due - chrono::Utc::now()).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = agent.stop.cancelled() => return,
        }
        let work = match agent.begin_logical(agent.scheduled_capture_args(), true).await {
            Ok((id, work)) => {
                tracing::info!("scheduled capture {id} started");
                work
            }
            Err(NotStarted::Busy(id)) => {
                // An on-demand capture runs: the scheduled one follows it.
                tracing::info!("scheduled capture waits for capture {id}");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = agent.stop.cancelled() => return,
                }
                continue;
            }
            Err(NotStarted::Refused(e)) => {
                tracing::error!("scheduled capture refused: {e:#}");
                failures += 1;
                last_failure = Some(chrono::Utc::now());
                let mut m = agent.logical_metrics.lock().await;
                m.scheduled_failures += 1;
                m.last_error = Some(format!("{e:#}"));
                continue;
            }
        };
        // Not raced against `stop`: a shutdown abandons the capture (FAILED) through its token.
        match work.await {
            Ok(_) => {
                failures = 0;
                last_failure = None;
                agent.logical_retention().await;
            }
            Err(_) => {
                failures += 1;
                last_failure = Some(chrono::Utc::now());
                agent.logical_metrics.lock().await.scheduled_failures += 1;
            }
        }
        if agent.stop.is_cancelled() {
            return;
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewCapture {
    name: Option<String>,
    database: Option<String>,
    #[serde(default)]
    all: bool,
    at: Option<String>,
}

/// `GET /v1/logical`: every capture, as `walnut logical list --json`.
pub(super) async fn captures_get(State(a): State<Arc<Agent>>) -> Response {
    match logical::list(&a.repo).await {
        Ok(l) => {
            let running = a.logical.lock().await;
            let rows: Vec<serde_json::Value> = l.iter().map(|c| capture_json(c, running.as_ref())).collect();
            Json(rows).into_response()
        }
        Err(e) => err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// A listed capture, with the progress of the one this agent runs.
fn capture_json(c: &logical::CaptureInfo, running: Option<&RunningCapture>) -> serde_json::Value {
    // The same fields as `walnut logical list --json`.
    let mut v = lcmd::row_json(c);
    if let Some(r) = running.filter(|r| r.id == c.id) {
        let (bytes, done, total) = r.progress.snapshot();
        v["progress"] = serde_json::json!({
            "dump_bytes": bytes,
            "stored_bytes": r.progress.stored.load(std::sync::atomic::Ordering::Relaxed),
            "tables_done": done,
            "tables_total": total,
            "phase": r.progress.phase(),
            "seconds": (chrono::Utc::now() - r.started).num_milliseconds() as f64 / 1000.0,
            "scheduled": r.scheduled,
        });
        if v.get("name").is_none_or(|n| n.is_null())
            && let Some(n) = &r.name
        {
            v["name"] = serde_json::json!(n);
        }
    }
    v
}

/// `POST /v1/logical` `{"name", "database", "all", "at"}` (all optional): starts a capture and
/// answers 202 with its ID at once; `GET /v1/logical/{id}` follows it.
pub(super) async fn captures_post(State(a): State<Arc<Agent>>, body: axum::body::Bytes) -> Response {
    let req: NewCapture = if body.is_empty() {
        NewCapture { name: None, database: None, all: false, at: None }
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
    if req.all && req.database.is_some() {
        return err(StatusCode::BAD_REQUEST, "\"all\": true captures every database: leave \"database\" out");
    }
    if let Some(n) = &req.name
        && let Err(e) = logical::check_name(n)
    {
        return err(StatusCode::BAD_REQUEST, e.to_string());
    }
    if a.stop.is_cancelled() {
        return err(StatusCode::SERVICE_UNAVAILABLE, "the agent is shutting down: no new capture starts");
    }
    let args = CaptureArgs {
        database: req.database,
        all: req.all,
        name: req.name,
        scratch: req.at.as_ref().and(a.ctx.config.logical_scratch_dir.clone()),
        at: req.at,
    };
    match a.begin_logical(args, false).await {
        Ok((id, work)) => {
            a.tasks.spawn(work);
            (StatusCode::ACCEPTED, Json(serde_json::json!({ "id": id, "status": "RUNNING" }))).into_response()
        }
        Err(NotStarted::Busy(id)) => {
            err(StatusCode::CONFLICT, format!("capture {id} is running: try again when it is DONE, or cancel it"))
        }
        Err(NotStarted::Refused(e)) => {
            let msg = format!("{e:#}");
            let status = if msg.contains("already") { StatusCode::CONFLICT } else { StatusCode::BAD_REQUEST };
            err(status, msg)
        }
    }
}

/// `GET /v1/logical/{ref}`: a capture by ID (any status), name or LATEST, with its progress
/// while this agent runs it.
pub(super) async fn capture_get(State(a): State<Arc<Agent>>, UrlPath(reference): UrlPath<String>) -> Response {
    let all = match logical::list(&a.repo).await {
        Ok(l) => l,
        Err(e) => return err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let running = a.logical.lock().await;
    // By ID, else by name (DONE or not: the newest of that name), else LATEST.
    let found = all
        .iter()
        .find(|c| c.id == reference)
        .or_else(|| all.iter().rev().find(|c| c.name() == Some(reference.as_str())))
        .or_else(|| logical::find(&all, &reference));
    match found {
        Some(c) => Json(capture_json(c, running.as_ref())).into_response(),
        None => err(StatusCode::NOT_FOUND, format!("no capture {reference:?} (an ID, a name or LATEST)")),
    }
}

/// `DELETE /v1/logical/{ref}`: deletes a DONE or FAILED capture (a RUNNING one: cancel it first).
pub(super) async fn capture_delete(State(a): State<Arc<Agent>>, UrlPath(reference): UrlPath<String>) -> Response {
    match logical::delete(&a.repo, &reference).await {
        Ok(info) => Json(serde_json::json!({ "deleted": info.id })).into_response(),
        Err(e @ logical::LogicalError::NotFound(_)) => err(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ logical::LogicalError::Invalid(_)) => err(StatusCode::CONFLICT, e.to_string()),
        Err(e) => err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `POST /v1/logical/{id}/cancel`: cancels the capture this agent runs; it ends FAILED (202).
pub(super) async fn capture_cancel(State(a): State<Arc<Agent>>, UrlPath(reference): UrlPath<String>) -> Response {
    let running = a.logical.lock().await;
    match running.as_ref() {
        Some(r) if r.id == reference || r.name.as_deref() == Some(reference.as_str()) => {
            r.cancel.cancel();
            (StatusCode::ACCEPTED, Json(serde_json::json!({ "id": r.id, "status": "CANCELLING" }))).into_response()
        }
        _ => {
            drop(running);
            let listed = logical::list(&a.repo).await.unwrap_or_default();
            match listed.iter().find(|c| c.id == reference || c.name() == Some(reference.as_str())) {
                Some(c) if c.status == Status::Running => err(
                    StatusCode::CONFLICT,
                    format!(
                        "capture {} runs in another walnut process (started {}): stop that process (Ctrl-C or SIGTERM)",
                        c.id,
                        c.started_at.as_deref().unwrap_or("?")
                    ),
                ),
                Some(c) => err(StatusCode::CONFLICT, format!("capture {} is {}, not running", c.id, c.status)),
                None => err(StatusCode::NOT_FOUND, format!("no capture {reference:?}")),
            }
        }
    }
}

/// The `logical` part of `GET /v1/health`: a scheduled capture overdue is a reason.
pub(super) async fn health_part(a: &Agent, reasons: &mut Vec<String>) -> serde_json::Value {
    let m = a.logical_metrics.lock().await;
    let next = *a.logical_next.lock().await;
    let running = a.logical.lock().await.as_ref().map(|r| r.id.clone());
    if let Some(schedule) = a.ctx.config.logical_schedule
        && let Some(next) = next
        && chrono::Utc::now() > next + chrono::Duration::hours(1)
        && running.is_none()
    {
        reasons.push(format!(
            "the scheduled logical capture ({schedule}) due at {} has not started: {}",
            next.to_rfc3339(),
            m.last_error.as_deref().unwrap_or("no error recorded")
        ));
    }
    serde_json::json!({
        "schedule": a.ctx.config.logical_schedule.map(|s| s.to_string()),
        "next_capture": next.map(|t| t.to_rfc3339()),
        "running": running,
        "last_success": m.last_success.map(|t| t.to_rfc3339()),
        "last_error": m.last_error,
    })
}

/// The logical captures' Prometheus samples.
pub(super) async fn samples<'s>(a: &Agent, out: &mut Vec<(&'s str, &'s str, &'s str, String)>) {
    let m = a.logical_metrics.lock().await;
    let running = a.logical.lock().await.is_some();
    out.extend([
        (
            "walnut_logical_captures_total",
            "Logical captures this agent took that are DONE.",
            "counter",
            m.done.to_string(),
        ),
        (
            "walnut_logical_failures_total",
            "Logical captures this agent ran that failed or were cancelled.",
            "counter",
            m.failed.to_string(),
        ),
        (
            "walnut_logical_scheduled_failures_total",
            "Scheduled logical captures that failed or could not start.",
            "counter",
            m.scheduled_failures.to_string(),
        ),
        (
            "walnut_logical_retention_deletions_total",
            "Logical captures deleted by [logical] retention.",
            "counter",
            m.retention_deletions.to_string(),
        ),
        (
            "walnut_logical_running",
            "Whether a logical capture runs now (1) or not (0).",
            "gauge",
            u8::from(running).to_string(),
        ),
    ]);
    if let Some(t) = m.last_success {
        out.extend([
            (
                "walnut_logical_last_success_timestamp_seconds",
                "End of the last logical capture that is DONE.",
                "gauge",
                t.timestamp().to_string(),
            ),
            (
                "walnut_logical_last_duration_seconds",
                "Duration of the last DONE logical capture.",
                "gauge",
                format!("{:.3}", m.last_seconds),
            ),
            (
                "walnut_logical_last_dump_bytes",
                "Size of the last DONE logical capture's dumps.",
                "gauge",
                m.last_dump_bytes.to_string(),
            ),
            (
                "walnut_logical_last_stored_bytes",
                "Bytes the last DONE logical capture stored.",
                "gauge",
                m.last_stored_bytes.to_string(),
            ),
        ]);
    }
}
