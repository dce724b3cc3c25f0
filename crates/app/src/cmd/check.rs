//! `walnut check`: pre-flight checks, each ✔ or ✗ with the fix; non-zero exit on any ✗.

use super::Ctx;
use crate::pgserver;
use anyhow::{Result, bail};
use serde::Serialize;
use walnut_core::backup::{self, Status};
use walnut_storage::PutMode;

#[derive(Debug, Serialize)]
struct Check {
    check: &'static str,
    ok: bool,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

fn add(v: &mut Vec<Check>, check: &'static str, ok: bool, detail: impl Into<String>, fix: impl Into<String>) {
    v.push(Check { check, ok, detail: detail.into(), fix: (!ok).then(|| fix.into()) });
}

pub async fn run(ctx: &Ctx) -> Result<()> {
    let mut checks = Vec::new();
    // PostgreSQL
    let pg = match pgserver::pg_config(ctx.config.pg_url.as_deref()) {
        Ok(c) => pgserver::connect(&c).await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let mut sysid: Option<String> = None;
    match &pg {
        Ok(client) => {
            add(&mut checks, "PostgreSQL reachable", true, "connected", "");
            let row = client
                .query_one(
                    "SELECT current_setting('wal_level'), current_setting('archive_mode'), current_setting('archive_command'), \
                     (SELECT system_identifier::text FROM pg_control_system()), coalesce(last_archived_wal, ''), \
                     failed_count, coalesce(last_failed_wal, ''), \
                     coalesce(last_failed_time > last_archived_time OR (last_archived_time IS NULL AND failed_count > 0), false) \
                     FROM pg_stat_archiver",
                    &[],
                )
                .await;
            match row {
                Ok(r) => {
                    let wal_level: String = r.get(0);
                    let mode: String = r.get(1);
                    let cmd: String = r.get(2);
                    sysid = Some(r.get(3));
                    let last: String = r.get(4);
                    let failing: bool = r.get(7);
                    add(
                        &mut checks,
                        "wal_level",
                        wal_level != "minimal",
                        format!("wal_level = {wal_level}"),
                        "ALTER SYSTEM SET wal_level = replica; then restart PostgreSQL",
                    );
                    add(
                        &mut checks,
                        "archive_mode",
                        mode == "on" || mode == "always",
                        format!("archive_mode = {mode}"),
                        "ALTER SYSTEM SET archive_mode = on; then restart PostgreSQL (or run `walnut enable`)",
                    );
                    add(
                        &mut checks,
                        "archive_command points at walnut",
                        cmd.contains("walnut") && cmd.contains("wal-push"),
                        format!("archive_command = {cmd:?}"),
                        "ALTER SYSTEM SET archive_command = 'walnut --config /etc/walnut.toml wal-push %p'; SELECT pg_reload_conf()",
                    );
                    let failed_wal: String = r.get(6);
                    add(
                        &mut checks,
                        "WAL arriving",
                        !failing,
                        if failing {
                            format!("archiving is failing (last failed: {failed_wal})")
                        } else if last.is_empty() {
                            "nothing archived yet".into()
                        } else {
                            format!("last archived {last}")
                        },
                        "read the server log for the archive_command's error; `walnut wal-push` prints the cause",
                    );
                }
                Err(e) => add(
                    &mut checks,
                    "PostgreSQL settings",
                    false,
                    walnut_core::backup::pg_error(&e),
                    "connect as a superuser or a role with pg_monitor",
                ),
            }
        }
        Err(e) => add(
            &mut checks,
            "PostgreSQL reachable",
            false,
            e.clone(),
            "set [postgres] url in the config or the PGHOST/PGPORT/PGUSER variables",
        ),
    }
    // Repository
    let repo = ctx.repository();
    match &repo {
        Ok(repo) => {
            let probe = format!("probe/check-{}-{}", std::process::id(), chrono::Utc::now().timestamp_micros());
            let wrote = repo.store().put(&probe, bytes_of(b"walnut check"), PutMode::Overwrite).await;
            match wrote {
                Ok(()) => {
                    let _ = repo.store().delete(&probe).await;
                    add(&mut checks, "repository reachable and writable", true, repo.describe(), "");
                    match walnut_core::repo::create_only_honoured(repo.store().as_ref()).await {
                        Ok(honoured) => add(
                            &mut checks,
                            "create-only writes refused if taken",
                            honoured,
                            if honoured {
                                "a second create-only write of a probe object was refused".to_string()
                            } else {
                                "this store does not honour create-only writes (If-None-Match): walnut's \
                                 never-overwrite guarantee depends on it"
                                    .to_string()
                            },
                            "use a store with conditional writes (AWS S3, GCS, Azure, a MinIO or other S3-compatible \
                             server recent enough to honour If-None-Match: *) or a file:// repository",
                        ),
                        Err(e) => add(
                            &mut checks,
                            "create-only writes refused if taken",
                            false,
                            format!("the probe failed: {e}"),
                            "check the repository's permissions (walnut writes and deletes probe/ objects)",
                        ),
                    }
                    match repo.identity().await {
                        Ok(Some(id)) => {
                            let ok = sysid.as_ref().is_none_or(|s| *s == id.system_identifier.to_string());
                            add(
                                &mut checks,
                                "identity matches",
                                ok,
                                format!(
                                    "repository: {id}; cluster: system identifier {}",
                                    sysid.as_deref().unwrap_or("unknown")
                                ),
                                "this repository belongs to another cluster: point this cluster at its own repo URL or prefix",
                            );
                        }
                        Ok(None) => add(
                            &mut checks,
                            "identity matches",
                            true,
                            "new repository: the first archived file records the cluster",
                            "",
                        ),
                        Err(e) => {
                            add(&mut checks, "identity matches", false, e.to_string(), "check the repository contents")
                        }
                    }
                    match backup::list(repo).await {
                        Ok(list) => {
                            let newest = list.iter().rev().find(|b| b.status == Status::Done);
                            let limit = ctx.config.settings.full_backup_frequency * 2;
                            match newest.and_then(|b| b.manifest.as_ref()) {
                                Some(m) => {
                                    let age = chrono::Utc::now() - m.end_time;
                                    let ok = age.to_std().map(|a| a <= limit).unwrap_or(false);
                                    add(
                                        &mut checks,
                                        "last backup age",
                                        ok,
                                        format!("newest backup {} is {}s old", m.end_time, age.num_seconds()),
                                        "take one: `walnut backup-push` (or run the agent)",
                                    );
                                }
                                None => add(
                                    &mut checks,
                                    "last backup age",
                                    false,
                                    "no DONE backup",
                                    "take one: `walnut backup-push` (or run the agent)",
                                ),
                            }
                        }
                        Err(e) => add(&mut checks, "last backup age", false, e.to_string(), "check the repository"),
                    }
                }
                Err(walnut_storage::StorageError::Tls { problem, .. }) => add(
                    &mut checks,
                    "TLS certificate of the store",
                    false,
                    format!("{}: the TLS handshake was refused", repo.describe()),
                    problem.to_string(),
                ),
                Err(e) => add(
                    &mut checks,
                    "repository reachable and writable",
                    false,
                    format!("{}: {e}", repo.describe()),
                    "check the repository URL, the credentials ([s3] access_key_id/secret_access_key or AWS_*), the endpoint and permissions",
                ),
            }
        }
        Err(e) => add(
            &mut checks,
            "repository reachable and writable",
            false,
            e.to_string(),
            // A storage error names the setting and its fix; otherwise no repository is set.
            if e.downcast_ref::<walnut_storage::StorageError>().is_some() {
                "correct the setting named above in the config file (or its environment variable)"
            } else {
                "set repo in the config, WALNUT_REPO or --repo"
            },
        ),
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    if ctx.global.json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "ok": failed == 0, "checks": checks }))?);
    } else {
        for c in &checks {
            println!("{} {:<34} {}", if c.ok { "✔" } else { "✗" }, c.check, c.detail);
            if let Some(f) = &c.fix {
                println!("  {:<34} fix: {f}", "");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} check(s) failed");
    }
    Ok(())
}

fn bytes_of(b: &'static [u8]) -> bytes::Bytes {
    bytes::Bytes::from_static(b)
}
