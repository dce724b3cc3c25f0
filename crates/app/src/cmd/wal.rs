//! `wal-push`, `wal-fetch` and the background prefetcher.

use super::{Ctx, report};
use crate::exit;
use std::path::Path;
use std::time::Instant;
use walnut_core::wal::{FetchOutcome, WalFetcher, WalPusher};
use walnut_core::walworker::{self, ClientError};

pub async fn push(ctx: &Ctx, path: &Path) -> u8 {
    let start = Instant::now();
    if ctx.config.wal_worker
        && let Some(code) = push_through_worker(ctx, path, start).await
    {
        return code;
    }
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
        codec: ctx.config.codec.clone(),
        upload_ahead: ctx.config.upload_ahead,
        tails: ctx.tails_dir(),
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
    let start_prefetcher: Option<std::sync::Arc<dyn Fn() + Send + Sync>> = (ctx.config.prefetch > 0).then(|| {
        let (ctx, name) = (ctx.clone(), name.to_string());
        std::sync::Arc::new(move || spawn_prefetcher(&ctx, &name)) as std::sync::Arc<dyn Fn() + Send + Sync>
    });
    let fetcher = WalFetcher { repo, state_base: Some(ctx.config.state_dir.clone()), start_prefetcher };
    let fetched = fetcher.fetch(name, dest).await;
    let outcome = fetched.map(|f| f.outcome);
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
pub(super) fn spawn_prefetcher(ctx: &Ctx, name: &str) {
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
    // Recovery asks for the next segment within seconds (or retries a missing one every 5 s):
    // a prefetcher asked nothing new for 10 s has no recovery to serve.
    let (count, idle) = (ctx.config.prefetch, ctx.config.wal_worker_idle.min(std::time::Duration::from_secs(10)));
    match walnut_core::wal::prefetch(&repo, &ctx.config.state_dir, name, count, idle).await {
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

/// The thin client: asks the WAL worker of this pg_wal to store the segment at `path`. `Some`
/// exit code once the worker stored it; `None` when wal-push must store it itself (no worker,
/// which it then starts for the next segments; a worker that failed or went away).
async fn push_through_worker(ctx: &Ctx, path: &Path, start: Instant) -> Option<u8> {
    let name = path.file_name()?.to_str()?;
    walnut_pg::WalFileName::parse(name).ok()?.segment()?;
    // No state directory (a user without a home): no socket anywhere safe, so no worker.
    if ctx.config.state_dir.as_os_str().is_empty() {
        return None;
    }
    let url = ctx.config.repo_url().ok()?;
    let pg_wal = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let socket = walworker::socket_path(&ctx.config.state_dir, url, pg_wal);
    let fingerprint = walworker::fingerprint(url, &ctx.config.codec);
    // The worker answers once it stored the segment: give it what one storage operation may take,
    // with its retries, twice over.
    let wait = ctx.config.storage.deadline * 2;
    match walworker::push_via(&socket, name, &fingerprint, wait).await {
        Ok(how) => {
            tracing::info!("{name}: archived by the WAL worker ({how}) in {:.0?}", start.elapsed());
            if ctx.global.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "name": name, "worker": how, "elapsed_ms": start.elapsed().as_millis() as u64,
                    })
                );
            }
            Some(exit::OK)
        }
        Err(ClientError::NoWorker(_)) => {
            spawn_worker(ctx, pg_wal, &socket);
            None
        }
        Err(e) => {
            tracing::warn!("{name}: {e}; archiving it directly");
            None
        }
    }
}

/// Starts `walnut wal-worker PG_WAL` detached (at most once every few seconds per socket: a
/// worker that cannot start is not started again by every segment), logging beside its socket.
fn spawn_worker(ctx: &Ctx, pg_wal: &Path, socket: &Path) {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let marker = socket.with_extension("started");
    let recent = std::fs::metadata(&marker)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|e| e < std::time::Duration::from_secs(5)));
    // The socket's directory, the user's own (0700) like the whole state directory.
    if recent || walworker::private_socket_dir(socket).is_err() {
        return;
    }
    let _ = std::fs::write(&marker, b"");
    let (Ok(exe), Ok(pg_wal)) = (std::env::current_exe(), std::fs::canonicalize(pg_wal)) else { return };
    // Appended to: a second worker that finds the lock taken must not truncate the running one's.
    let log = std::fs::OpenOptions::new().create(true).append(true).open(socket.with_extension("log")).ok();
    let mut c = Command::new(exe);
    if let Some(p) = &ctx.config.path {
        c.arg("--config").arg(p);
    }
    if let Some(r) = &ctx.global.repo {
        c.arg("--repo").arg(r);
    }
    c.arg("wal-worker").arg(pg_wal);
    c.stdin(Stdio::null()).stdout(Stdio::null()).process_group(0);
    match log {
        Some(f) => c.stderr(f),
        None => c.stderr(Stdio::null()),
    };
    if let Err(e) = c.spawn() {
        tracing::debug!("could not start the WAL worker: {e}");
    }
}

/// `walnut wal-worker PG_WAL`: serves until idle (see [`walworker`]). Exits 0 at once when
/// another worker of the same pg_wal and repository runs.
pub async fn worker(ctx: &Ctx, pg_wal: &Path) -> u8 {
    let run = async {
        let url = ctx.config.repo_url()?;
        let socket = walworker::socket_path(&ctx.config.state_dir, url, pg_wal);
        let Some((_lock, listener)) =
            walworker::bind(&socket).map_err(|e| anyhow::anyhow!("WAL worker socket {}: {e}", socket.display()))?
        else {
            tracing::debug!("another WAL worker serves {}", pg_wal.display());
            return Ok(());
        };
        let repo = ctx.repository()?;
        let parallel = ctx.config.upload_ahead.max(1);
        tracing::info!("WAL worker for {} serving on {}", pg_wal.display(), socket.display());
        let w = walworker::Worker::new(
            repo,
            ctx.config.codec.clone(),
            url,
            pg_wal.to_path_buf(),
            parallel,
            ctx.tails_dir(),
        );
        w.serve(listener, ctx.config.wal_worker_idle, still_current(ctx, url)).await;
        let _ = std::fs::remove_file(&socket);
        anyhow::Ok(())
    };
    match run.await {
        Ok(()) => exit::OK,
        Err(e) => {
            report(&e);
            exit::FAILURE
        }
    }
}

/// Whether the configuration file still gives the worker's settings: re-read when it changed
/// (its modification time, size or inode), and compared by the worker's fingerprint. A file
/// that no longer loads counts as changed (the next `wal-push` reports why).
fn still_current(ctx: &Ctx, url: &str) -> walworker::StillCurrent {
    use std::os::unix::fs::MetadataExt;
    let (path, repo_flag) = (ctx.config.path.clone(), ctx.global.repo.clone());
    let want = walworker::fingerprint(url, &ctx.config.codec);
    let stamp = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.modified().ok(), m.len(), m.ino()));
    let mut seen = path.as_deref().and_then(stamp);
    Box::new(move || {
        let Some(p) = &path else { return true };
        let now = stamp(p);
        if now == seen {
            return true;
        }
        seen = now;
        match crate::config::Config::load(Some(p), repo_flag.as_deref()) {
            Ok(c) => c.repo_url().is_ok_and(|u| walworker::fingerprint(u, &c.codec) == want),
            Err(_) => false,
        }
    })
}
