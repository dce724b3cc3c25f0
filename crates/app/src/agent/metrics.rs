//! Health and Prometheus metrics: what the agent did, and what PostgreSQL's archiver says.

use super::*;

pub(super) struct Archiver {
    archived: i64,
    /// The cluster's WAL segment size in bytes.
    segment_bytes: i64,
    failed: i64,
    failing: bool,
    lag_seconds: f64,
}

pub(super) async fn archiver(ctx: &Ctx) -> Result<Archiver> {
    let client = pgserver::connect(&pgserver::pg_config(ctx.config.pg_url.as_deref())?).await?;
    let r = client
        .query_one(
            "SELECT archived_count, failed_count, \
             coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false), \
             coalesce(extract(epoch FROM now() - last_archived_time)::float8, -1), \
             pg_size_bytes(current_setting('wal_segment_size'))::int8 FROM pg_stat_archiver",
            &[],
        )
        .await
        .map_err(|e| anyhow::anyhow!("{}", walnut_core::backup::pg_error(&e)))?;
    Ok(Archiver {
        archived: r.get(0),
        failed: r.get(1),
        failing: r.get(2),
        lag_seconds: r.get(3),
        segment_bytes: r.get(4),
    })
}

pub(super) async fn health(State(a): State<Arc<Agent>>) -> Response {
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
    if let Some(v) = &a.metrics.lock().await.verify {
        match v.defects {
            Some(0) => {}
            Some(n) => reasons.push(format!("verify at {} found {n} defect(s): {}", v.at.to_rfc3339(), v.summary)),
            None => reasons.push(format!("verify at {} could not run: {}", v.at.to_rfc3339(), v.summary)),
        }
    }
    if let Some(d) = &a.metrics.lock().await.drill
        && !d.ok
    {
        reasons.push(format!(
            "the last restore drill ({}) failed: {}",
            d.started_at.to_rfc3339(),
            d.reason.as_deref().unwrap_or("unknown")
        ));
    }
    let estimate = a.replay_estimate().await;
    if let (Some(e), Some(max)) = (&estimate, a.settings.read().await.max_replay)
        && e.seconds > 2.0 * max.as_secs_f64()
    {
        reasons.push(format!(
            "a restore to the latest point would replay about {:.0}s of WAL, more than twice max_replay ({}): incremental backups are not keeping up",
            e.seconds,
            humantime::format_duration(max)
        ));
    }
    let logical = logical::health_part(&a, &mut reasons).await;
    let body = serde_json::json!({
        "healthy": reasons.is_empty(),
        "logical": logical,
        "replay_estimate": estimate,
        "reasons": reasons,
        "next_scheduled_backup": a.next_due().await.to_rfc3339(),
        "last_backup": last.map(|t| t.to_rfc3339()),
        "last_error": a.metrics.lock().await.last_error,
    });
    let status = if reasons.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

pub(super) async fn metrics(State(a): State<Arc<Agent>>) -> Response {
    const GAUGE: &str = "gauge";
    const COUNTER: &str = "counter";
    // (name, help, type, value), in exposition order.
    let mut samples: Vec<(&str, &str, &str, String)> = Vec::new();
    let estimate = a.replay_estimate().await;
    let m = a.metrics.lock().await;
    if let Some(e) = &estimate {
        samples.extend([
            (
                "walnut_replay_estimate_seconds",
                "How long a restore to the latest point would replay WAL (WAL since the newest backup's start over the replay rate).",
                GAUGE,
                format!("{:.1}", e.seconds),
            ),
            ("walnut_replay_wal_bytes", "WAL since the newest backup's start.", GAUGE, e.wal_bytes.to_string()),
            (
                "walnut_replay_rate_bytes_per_second",
                "The replay rate of the estimate (measured by the last restore here, else the default).",
                GAUGE,
                format!("{:.0}", e.bytes_per_second),
            ),
        ]);
    }
    samples.push((
        "walnut_incremental_backups_total",
        "Incremental backups the agent took (incremental_frequency, max_replay).",
        COUNTER,
        m.incremental_backups.to_string(),
    ));
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
        (
            "walnut_verify_runs_total",
            "Verify runs of the whole repository (every [agent] verify_interval).",
            COUNTER,
            m.verify_runs.to_string(),
        ),
    ]);
    if a.ctx.config.drill_interval.is_some() {
        samples.push(("walnut_drill_runs_total", "Restore drills run.", COUNTER, m.drill_runs.to_string()));
        samples.push((
            "walnut_drill_failures_total",
            "Restore drills that failed.",
            COUNTER,
            m.drill_failures.to_string(),
        ));
    }
    if let Some(t) = m.drill_last_success {
        samples.push((
            "walnut_drill_last_success_timestamp",
            "End of the last restore drill that passed.",
            GAUGE,
            t.timestamp().to_string(),
        ));
    }
    if let Some(d) = &m.drill {
        samples.push((
            "walnut_drill_duration_seconds",
            "Duration of the last restore drill (fetch, replay, checks, clean-up).",
            GAUGE,
            format!("{:.3}", d.duration_seconds),
        ));
        samples.push((
            "walnut_drill_recovery_seconds",
            "Fetch and replay time of the last restore drill (the measured recovery time).",
            GAUGE,
            format!("{:.3}", d.recovery_seconds),
        ));
        samples.push((
            "walnut_drill_success",
            "Whether the last restore drill passed (1) or failed (0).",
            GAUGE,
            u8::from(d.ok).to_string(),
        ));
        if let Some(lag) = d.restored_lag_seconds {
            samples.push((
                "walnut_drill_restored_lag_seconds",
                "How far the point the last drill restored was behind its start.",
                GAUGE,
                format!("{lag:.1}"),
            ));
        }
    }
    if let Some(v) = &m.verify {
        samples.push((
            "walnut_verify_last_run_timestamp_seconds",
            "End of the last verify run.",
            GAUGE,
            v.at.timestamp().to_string(),
        ));
        samples.push((
            "walnut_verify_duration_seconds",
            "Duration of the last verify run.",
            GAUGE,
            format!("{:.3}", v.seconds),
        ));
        samples.push((
            "walnut_verify_defects",
            "Defects the last verify run found (-1: it could not run).",
            GAUGE,
            v.defects.map_or("-1".to_string(), |n| n.to_string()),
        ));
        if let Some(t) = v.last_success {
            samples.push((
                "walnut_verify_last_success_timestamp_seconds",
                "End of the last verify run that found every backup whole and restorable.",
                GAUGE,
                t.timestamp().to_string(),
            ));
        }
    }
    drop(m);
    logical::samples(&a, &mut samples).await;
    if let Ok(ar) = archiver(&a.ctx).await {
        samples.push((
            "walnut_wal_archived_total",
            "WAL files archived (pg_stat_archiver).",
            COUNTER,
            ar.archived.to_string(),
        ));
        samples.push((
            "walnut_wal_archived_bytes_total",
            "Bytes of WAL archived: walnut_wal_archived_total times the cluster's WAL segment size \
             (wal_segment_size; the few small .history and .backup files count as segments too).",
            COUNTER,
            ar.archived.saturating_mul(ar.segment_bytes).to_string(),
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
