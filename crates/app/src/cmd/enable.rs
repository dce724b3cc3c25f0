//! `walnut enable`: set up archiving on a running cluster, prove it works, take the first backup.

use super::Ctx;
use crate::pgserver;
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use walnut_core::backup::{self, Status};
use walnut_pg::WalFileName;

fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

pub async fn run(ctx: &Ctx, restart: bool) -> Result<()> {
    let repo = ctx.repository()?;
    let pgcfg = pgserver::pg_config(ctx.config.pg_url.as_deref())?;
    let client = pgserver::connect(&pgcfg).await?;
    let q = |e: tokio_postgres::Error| anyhow::anyhow!("{}", walnut_core::backup::pg_error(&e));
    let row = client
        .query_one(
            "SELECT current_setting('wal_level'), current_setting('archive_mode'), current_setting('archive_command'), \
             (SELECT setting::int FROM pg_settings WHERE name = 'archive_timeout'), current_setting('data_directory'), current_setting('server_version_num')::int",
            &[],
        )
        .await
        .map_err(q)?;
    let (wal_level, mode, command): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    let (timeout_s, data_dir, version): (i32, String, i32) = (row.get(3), row.get(4), row.get(5));
    let want_cmd = format!("{} wal-push %p", ctx.walnut_command(false)?);
    let want_timeout = ctx.config.settings.archive_timeout.as_secs().max(1) as i32;
    let mut changed = Vec::new();
    if wal_level == "minimal" {
        client.batch_execute("ALTER SYSTEM SET wal_level = replica").await.map_err(q)?;
        changed.push("wal_level = replica (needs a restart)".to_string());
    }
    let mode_ok = mode == "on" || mode == "always";
    if !mode_ok {
        client.batch_execute("ALTER SYSTEM SET archive_mode = on").await.map_err(q)?;
        changed.push("archive_mode = on (needs a restart)".to_string());
    }
    if command != want_cmd {
        client.batch_execute(&format!("ALTER SYSTEM SET archive_command = {}", quote(&want_cmd))).await.map_err(q)?;
        changed.push(format!("archive_command = {want_cmd:?}"));
    }
    if timeout_s != want_timeout {
        client.batch_execute(&format!("ALTER SYSTEM SET archive_timeout = {want_timeout}")).await.map_err(q)?;
        changed.push(format!("archive_timeout = {want_timeout}s"));
    }
    if !changed.is_empty() {
        client.batch_execute("SELECT pg_reload_conf()").await.map_err(q)?;
    }
    let needs_restart = !mode_ok || wal_level == "minimal";
    for c in &changed {
        println!("set {c}");
    }
    drop(client);
    if needs_restart {
        if !restart {
            println!(
                "PostgreSQL must be restarted for archive_mode/wal_level to take effect: restart it (or run `walnut enable --restart`), then run `walnut enable` again"
            );
            return Ok(());
        }
        let pgdata = ctx.config.pgdata.clone().unwrap_or_else(|| PathBuf::from(&data_dir));
        let bindir = pgserver::bindir(ctx.config.pg_bindir.as_deref(), (version / 10000) as u32)?;
        let log_dir = pgdata.join("log");
        std::fs::create_dir_all(&log_dir).ok();
        pgserver::prepare_ownership_of_new(&log_dir, &pgdata)?;
        let out = pgserver::as_owner_of(&pgdata, &bindir.join("pg_ctl"))?
            .arg("-D")
            .arg(&pgdata)
            .arg("-l")
            .arg(log_dir.join("walnut-enable-restart.log"))
            .args(["-w", "-t", "120", "-m", "fast", "restart"])
            .output()
            .context("run pg_ctl restart")?;
        if !out.status.success() {
            bail!("pg_ctl restart failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        println!("restarted PostgreSQL (pg_ctl restart -m fast)");
    }
    // Prove archiving works: switch, and wait for that segment in the repository.
    let client = pgserver::connect(&pgcfg).await?;
    client
        .batch_execute("CREATE TEMP TABLE walnut_enable_probe(x int); INSERT INTO walnut_enable_probe VALUES (1)")
        .await
        .map_err(q)?;
    let seg: String = client.query_one("SELECT pg_walfile_name(pg_switch_wal())", &[]).await.map_err(q)?.get(0);
    let wait = ctx.config.backup_archive_wait;
    if walnut_core::wal::wait_archived(&repo, &WalFileName::parse(&seg)?, wait).await.is_err() {
        let row = client
            .query_one("SELECT failed_count, coalesce(last_failed_wal, '') FROM pg_stat_archiver", &[])
            .await
            .map_err(q)?;
        bail!(
            "archiving is not working: {seg} did not reach {} within {wait:?} (pg_stat_archiver: {} failures, last failed {:?}); check the server log for the archive_command's error",
            repo.describe(),
            row.get::<_, i64>(0),
            row.get::<_, String>(1)
        );
    }
    println!("archiving works: {seg} is in {}", repo.describe());
    let has_backup = backup::list(&repo).await?.iter().any(|b| b.status == Status::Done);
    if has_backup {
        if changed.is_empty() {
            println!("nothing to change: archiving was already set up and a base backup exists");
        }
        return Ok(());
    }
    println!("taking the first base backup");
    super::backup::push(ctx, ctx.config.pgdata.as_deref(), None, Default::default()).await
}
