//! The HTTP admin API: settings, backups, and the guard every request passes (token, Host,
//! content type, JSON errors).

use super::*;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewBackup {
    name: Option<String>,
}

pub(super) fn parse_json(body: &[u8]) -> Result<serde_json::Value, Box<Response>> {
    if body.len() > MAX_BODY {
        return Err(Box::new(err(StatusCode::PAYLOAD_TOO_LARGE, format!("request body over {MAX_BODY} bytes"))));
    }
    serde_json::from_slice(body).map_err(|e| Box::new(err(StatusCode::BAD_REQUEST, format!("malformed JSON: {e}"))))
}

/// Applies a settings patch: every field checked, nothing changed unless all are valid.
pub(super) fn patched(current: &Settings, body: &serde_json::Value) -> Result<Settings, String> {
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
            "incremental_frequency" | "max_replay" => {
                let d = if v.is_null() { None } else { Some(dur(v)?) };
                if k == "incremental_frequency" { s.incremental_frequency = d } else { s.max_replay = d }
            }
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
                    "unknown setting {other:?}: the settings are archive_timeout, full_backup_frequency, recovery_window, minimum_redundancy, incremental_frequency, max_replay (null turns the last two off)"
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

pub(super) async fn apply_archive_timeout(ctx: &Ctx, d: Duration) -> Result<()> {
    let client = pgserver::connect(&pgserver::pg_config(ctx.config.pg_url.as_deref())?).await?;
    let q = |e: tokio_postgres::Error| anyhow::anyhow!("{}", walnut_core::backup::pg_error(&e));
    // Two statements: ALTER SYSTEM cannot run inside the implicit transaction of a batch.
    client.batch_execute(&format!("ALTER SYSTEM SET archive_timeout = {}", d.as_secs().max(1))).await.map_err(q)?;
    client.batch_execute("SELECT pg_reload_conf()").await.map_err(q)
}

pub(super) fn persist(path: &std::path::Path, s: &Settings) -> Result<()> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p)?;
    }
    walnut_core::durable::write(path, &serde_json::to_vec_pretty(s)?)?;
    Ok(())
}

pub(super) fn load_persisted(path: &std::path::Path, base: &Settings) -> Settings {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| patched(base, &v).ok())
        .unwrap_or_else(|| base.clone())
}

pub(super) async fn settings_get(State(a): State<Arc<Agent>>) -> Response {
    Json(a.settings.read().await.clone()).into_response()
}

pub(super) async fn settings_patch(State(a): State<Arc<Agent>>, body: axum::body::Bytes) -> Response {
    let v = match parse_json(&body) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    // One PATCH at a time: read, apply, persist and publish under the write lock.
    let mut current = a.settings.write().await;
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
    *current = new.clone();
    drop(current);
    a.wake.notify_one();
    Json(new).into_response()
}

pub(super) async fn backups_get(State(a): State<Arc<Agent>>) -> Response {
    match backup::list(&a.repo).await {
        Ok(l) => Json(l).into_response(),
        Err(e) => err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

pub(super) async fn backups_post(State(a): State<Arc<Agent>>, body: axum::body::Bytes) -> Response {
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
            let status = if msg.contains("already exists") || msg.contains("already running") {
                StatusCode::CONFLICT
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            err(status, msg)
        }
    }
}

pub(super) async fn backup_get(State(a): State<Arc<Agent>>, UrlPath(reference): UrlPath<String>) -> Response {
    match backup::resolve_summary(&a.repo, &reference).await {
        Ok(b) => Json(b.manifest).into_response(),
        Err(e @ backup::BackupError::NotFound(_)) => err(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => err(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Every route needs the bearer token when one is configured (401 otherwise). On a loopback
/// address (no token), the `Host` header must name a loopback host, so that a web page cannot
/// reach the API by DNS rebinding; and every request that changes something must be
/// `application/json`, which a cross-site form or `text/plain` POST cannot send without a
/// preflight.
pub(super) async fn guard(
    State(a): State<Arc<Agent>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
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
pub(super) fn loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Every error the API returns is JSON (`{"error": ...}`), including the ones axum makes itself
/// (404, 405, 413).
pub(super) async fn json_errors(resp: Response) -> Response {
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
