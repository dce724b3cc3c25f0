//! The `walnut` binary: command line, configuration, output and the exit-code contract with
//! PostgreSQL. Library crates below it never read the environment or exit the process.

mod agent;
mod cli;
mod cmd;
mod config;
mod ctx;
mod exit;
mod output;
mod pgserver;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    init_logging(&cli);
    // Crash tests only: stop dead at a named point (see walnut_storage::crashpoint).
    walnut_storage::crashpoint::arm(std::env::var("WALNUT_CRASH_AT").ok());
    // For wal-fetch, every failure must stop recovery (> 125): exit 1 means "not archived", and
    // a panic's 101 would be read the same way.
    let failure = if matches!(cli.command, cli::Command::WalFetch { .. }) { exit::FATAL } else { exit::FAILURE };
    if failure == exit::FATAL {
        let default_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            default_hook(info);
            std::process::exit(i32::from(exit::FATAL));
        }));
    }
    // The prefetcher only works ahead of a recovery: it yields the CPU to the server it serves.
    // Set before the runtime's threads start, which inherit it (Linux: a nice value per thread).
    if matches!(cli.command, cli::Command::WalPrefetch { .. }) {
        let _ = rustix::process::setpriority_process(None, PREFETCH_NICE);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("walnut: cannot start the async runtime: {e}");
            return failure.into();
        }
    };
    let code = runtime.block_on(cmd::run(cli));
    // Do not wait for stray blocking tasks (a prefetch child is a separate process).
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code.into()
}

/// The nice value of the detached prefetcher (`walnut wal-prefetch`).
const PREFETCH_NICE: i32 = 10;

fn init_logging(cli: &cli::Cli) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let level = match (cli.global.quiet, cli.global.verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    // Our own crates at the chosen level; dependencies only warn unless asked for with RUST_LOG.
    let filter = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("warn,walnut={level},walnut_core={level},walnut_storage={level},walnut_pg={level}"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_target(false);
    if std::io::stderr().is_terminal() {
        builder.without_time().init();
    } else if matches!(cli.command, cli::Command::Agent { .. }) {
        // The agent's logs go to a journal or a collector: structured.
        builder.json().init();
    } else {
        builder.with_ansi(false).init();
    }
}

/// `walnut agent`: resolves the token, binds the port, handles the signals, and serves
/// ([`agent::serve`]). SIGTERM/SIGINT stops the API and new backups; a running backup gets
/// `[agent] shutdown_timeout` to finish (a second signal abandons it at once).
pub async fn run_agent(ctx: ctx::Ctx, listen: Option<String>) -> anyhow::Result<()> {
    use anyhow::{Context, bail};
    let listen = listen.unwrap_or_else(|| ctx.config.agent_listen.clone());
    let addr: std::net::SocketAddr =
        listen.parse().with_context(|| format!("--listen {listen:?} is not an address like 127.0.0.1:5500"))?;
    let token = match (&ctx.config.agent_token, &ctx.config.agent_token_file) {
        (Some(t), _) => Some(t.expose().to_string()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("read the token file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    }
    .filter(|t| !t.is_empty());
    if !agent::is_loopback(&addr) && token.is_none() {
        bail!(
            "refusing to listen on {addr} without a token: a non-loopback address needs [agent] token_file or WALNUT_AGENT_TOKEN"
        );
    }
    let grace = ctx.config.agent_shutdown_timeout;
    let state = agent::Agent::new(ctx, token).await?;
    state.reconcile().await;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("listen on {addr}"))?;
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let s = state.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down: a running backup gets {} to finish", humantime::format_duration(grace));
        s.stop();
        tokio::select! {
            _ = tokio::time::sleep(grace) => {}
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        s.abandon();
    });
    agent::serve(state, listener).await
}
