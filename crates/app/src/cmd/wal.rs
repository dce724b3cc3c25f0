//! `wal-push`, `wal-fetch` and the background prefetcher.

use super::{Ctx, report};
use crate::exit;
use std::path::Path;
use std::time::Instant;
use walnut_core::wal::{FetchOutcome, WalFetcher, WalPusher};

pub async fn push(ctx: &Ctx, path: &Path) -> u8 {
    let start = Instant::now();
    let repo = match ctx.repository() {
        Ok(r) => r,
        Err(e) => {
            report(&e);
            return exit::FAILURE;
        }
    };
    let pusher = WalPusher {
        state_base: Some(ctx.config.state_dir.clone()),
        repo,
        codec: ctx.config.codec,
        upload_ahead: ctx.config.upload_ahead,
    };
    match pusher.push(path).await {
        Ok(r) => {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let how = if r.confirmed_ahead {
                "already uploaded ahead"
            } else if r.already_stored {
                "identical copy already archived"
            } else {
                "archived"
            };
            tracing::info!(
                "{name}: {how} in {:.0?}{}",
                start.elapsed(),
                if r.ahead_uploaded.is_empty() {
                    String::new()
                } else {
                    format!("; uploaded {} ahead", r.ahead_uploaded.len())
                }
            );
            if ctx.global.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "name": name, "uploaded": r.uploaded, "already_stored": r.already_stored,
                        "confirmed_ahead": r.confirmed_ahead, "ahead_uploaded": r.ahead_uploaded,
                        "elapsed_ms": start.elapsed().as_millis() as u64,
                    })
                );
            }
            exit::OK
        }
        Err(e) => {
            tracing::error!("wal-push {}: {e}", path.display());
            exit::FAILURE
        }
    }
}

pub async fn fetch(ctx: &Ctx, name: &str, dest: &Path) -> u8 {
    let start = Instant::now();
    let repo = match ctx.repository() {
        Ok(r) => r,
        Err(e) => {
            report(&e);
            return exit::FATAL;
        }
    };
    let fetcher = WalFetcher { repo, state_base: Some(ctx.config.state_dir.clone()) };
    let outcome = fetcher.fetch(name, dest).await;
    if ctx.global.json {
        let status = match &outcome {
            Ok(FetchOutcome::Fetched) => "fetched",
            Ok(FetchOutcome::FromSpool) => "from_spool",
            Ok(FetchOutcome::NotFound) => "not_found",
            Err(_) => "error",
        };
        println!("{}", serde_json::json!({ "name": name, "status": status }));
    }
    match outcome {
        Ok(FetchOutcome::NotFound) => {
            tracing::debug!("{name}: not in the archive");
            exit::NOT_FOUND
        }
        Ok(o) => {
            tracing::info!(
                "{name}: restored{} in {:.0?}",
                if o == FetchOutcome::FromSpool { " from the prefetch spool" } else { "" },
                start.elapsed()
            );
            if ctx.config.prefetch > 0 && walnut_pg::WalFileName::parse(name).is_ok_and(|n| n.segment().is_some()) {
                spawn_prefetcher(ctx, name);
            }
            exit::OK
        }
        Err(e) => {
            tracing::error!("wal-fetch {name}: {e}");
            exit::FATAL
        }
    }
}

/// Starts `walnut wal-prefetch NAME` detached, with the same global options: the fetch itself
/// returns to PostgreSQL at once.
fn spawn_prefetcher(ctx: &Ctx, name: &str) {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let Ok(exe) = std::env::current_exe() else { return };
    let mut c = Command::new(exe);
    if let Some(p) = &ctx.config.path {
        c.arg("--config").arg(p);
    }
    if let Some(r) = &ctx.global.repo {
        c.arg("--repo").arg(r);
    }
    c.arg("-q").arg("wal-prefetch").arg(name);
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).process_group(0);
    if let Err(e) = c.spawn() {
        tracing::debug!("could not start the prefetcher: {e}");
    }
}

pub async fn prefetch(ctx: &Ctx, name: &str) -> u8 {
    let repo = match ctx.repository() {
        Ok(r) => r,
        Err(e) => {
            report(&e);
            return exit::FAILURE;
        }
    };
    match walnut_core::wal::prefetch(&repo, &ctx.config.state_dir, name, ctx.config.prefetch).await {
        Ok(n) => {
            tracing::debug!("prefetched {n} segments after {name}");
            exit::OK
        }
        Err(e) => {
            tracing::debug!("prefetch after {name} stopped: {e}");
            exit::FAILURE
        }
    }
}
