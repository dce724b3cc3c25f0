//! `walnut restore-point NAME`: a named restore point, archived at once.

use super::Ctx;
use crate::pgserver;
use anyhow::{Result, bail};
use walnut_pg::{Lsn, WalFileName};

pub async fn run(ctx: &Ctx, name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 63 {
        bail!("restore point names are 1 to 63 bytes (PostgreSQL's limit), got {} bytes", name.len());
    }
    let repo = ctx.repository()?;
    let client = pgserver::connect(&pgserver::pg_config(ctx.config.pg_url.as_deref())?).await?;
    let row = client
        .query_one(
            "SELECT pg_create_restore_point($1)::text, now()::text, \
             (SELECT timeline_id FROM pg_control_checkpoint()), current_setting('wal_segment_size')",
            &[&name],
        )
        .await
        .map_err(|e| anyhow::anyhow!("create the restore point: {}", walnut_core::backup::pg_error(&e)))?;
    let lsn: Lsn = row.get::<_, String>(0).parse()?;
    let time: String = row.get(1);
    // Switch so the segment holding the restore point is archived now, not at the next switch.
    let seg_name: String = client
        .query_one("SELECT pg_walfile_name($1::text::pg_lsn)", &[&lsn.to_string()])
        .await
        .map_err(|e| anyhow::anyhow!("{}", walnut_core::backup::pg_error(&e)))?
        .get(0);
    client
        .batch_execute("SELECT pg_switch_wal()")
        .await
        .map_err(|e| anyhow::anyhow!("{}", walnut_core::backup::pg_error(&e)))?;
    let wait = ctx.config.backup_archive_wait;
    if walnut_core::wal::wait_archived(&repo, &WalFileName::parse(&seg_name)?, wait).await.is_err() {
        bail!(
            "restore point {name:?} was created at {lsn}, but {seg_name} did not reach the repository within {wait:?}: check archiving (pg_stat_archiver)"
        );
    }
    if ctx.global.json {
        println!("{}", serde_json::json!({"name": name, "lsn": lsn.to_string(), "time": time, "segment": seg_name}));
    } else if !ctx.global.quiet {
        println!("restore point {name:?} at LSN {lsn} ({time}), archived in {seg_name}");
    }
    Ok(())
}
