//! Command dispatch: each command returns its exit code; errors are printed once, here or in
//! the command, with their context chain.

pub mod backup;
mod check;
mod demo;
pub mod drill;
mod enable;
pub mod logical;
mod rekey;
pub mod restore;
mod restore_point;
pub mod retention;
mod wal;
mod walinfo;

use crate::cli::{Cli, Command};
use crate::config::Config;
use crate::exit;
use anyhow::Result;

pub use crate::ctx::Ctx;

pub async fn run(cli: Cli) -> u8 {
    let config = match Config::load(cli.global.config.as_deref(), cli.global.repo.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            report(&e);
            return match cli.command {
                Command::WalFetch { .. } => exit::FATAL,
                _ => exit::FAILURE,
            };
        }
    };
    let ctx = Ctx { global: cli.global, config };
    match cli.command {
        Command::WalPush { path } => wal::push(&ctx, &path).await,
        Command::WalFetch { name, dest } => wal::fetch(&ctx, &name, &dest).await,
        Command::WalPrefetch { name } => wal::prefetch(&ctx, &name).await,
        Command::WalWorker { pg_wal } => wal::worker(&ctx, &pg_wal).await,
        Command::ShowConfig => show_config(&ctx),
        Command::BackupPush { pgdata, name, incremental, parent, max_rate } => {
            let how = backup::PushHow { incremental, parent, max_rate: max_rate.map(|r| r.0) };
            finish(backup::push(&ctx, pgdata.as_deref(), name, how).await)
        }
        Command::BackupList { detail } => finish(backup::list(&ctx, detail).await),
        Command::BackupShow { reference } => finish(backup::show(&ctx, &reference).await),
        Command::BackupFetch { dest, reference, tablespace_map } => {
            finish(backup::fetch(&ctx, &dest, &reference, &tablespace_map).await)
        }
        Command::WalInspect { paths } => finish(walinfo::inspect(&ctx, &paths)),
        Command::WalStages { paths } => finish(walinfo::stages(&ctx, &paths).await),
        Command::Enable { restart } => finish(enable::run(&ctx, restart).await),
        Command::Agent { listen } => finish(crate::run_agent(ctx, listen).await),
        Command::Check => finish(check::run(&ctx).await),
        Command::Delete { what } => finish(retention::delete(&ctx, &what).await),
        Command::Retention { what: crate::cli::RetentionWhat::Apply { confirm } } => {
            finish(retention::apply_policy(&ctx, confirm).await)
        }
        Command::WalShow => finish(walinfo::show(&ctx).await),
        Command::WalVerify { deep } => finish(walinfo::verify(&ctx, deep).await),
        Command::AgeKeygen => {
            let (public, secret) = walnut_core::crypt::generate();
            println!("# public key: {public}\n{secret}");
            exit::OK
        }
        Command::Drill { scratch, port } => {
            let port = port.or(ctx.config.drill_port);
            finish(drill::cli(&ctx, scratch.as_deref(), port).await)
        }
        Command::Rekey { confirm } => finish(rekey::run(&ctx, confirm).await),
        Command::Verify { backup, deep } => finish(walinfo::verify_all(&ctx, backup, deep).await),
        Command::RestorePoint { name } => finish(restore_point::run(&ctx, &name).await),
        Command::Restore(args) => finish(restore::run(&ctx, &args).await),
        Command::Demo { keep } => finish(demo::run(&ctx, keep).await),
        Command::Logical { what } => finish(logical::run(&ctx, what).await),
    }
}

fn finish(r: Result<()>) -> u8 {
    match r {
        Ok(()) => exit::OK,
        Err(e) => {
            report(&e);
            exit::FAILURE
        }
    }
}

/// A token cancelled on the first SIGINT (Ctrl-C) or SIGTERM.
pub fn stop_signal() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        t.cancel();
    });
    token
}

/// Prints an error with its causes on one line.
pub fn report(e: &anyhow::Error) {
    tracing::error!("{e:#}");
}

/// `[azure]` / `[gcs]` settings as shown: names, and values only where they are places (an
/// endpoint, an account name, a path), never keys, tokens or SAS strings.
fn shown_settings(settings: &[(String, walnut_storage::Secret)]) -> serde_json::Value {
    let public = |k: &str| {
        ["endpoint", "account_name", "base_url", "service_account", "use_emulator"].iter().any(|p| k.ends_with(p))
    };
    let map: serde_json::Map<_, _> = settings
        .iter()
        .map(|(k, v)| {
            let shown = if public(k) { crate::config::redact_conninfo(v.expose()) } else { "[redacted]".into() };
            (k.clone(), serde_json::Value::String(shown))
        })
        .collect();
    serde_json::Value::Object(map)
}

fn show_config(ctx: &Ctx) -> u8 {
    let c = &ctx.config;
    let redacted = |s: &Option<walnut_storage::Secret>| s.as_ref().map(|_| "[redacted]");
    // Connection strings and URLs may carry a password (postgresql://u:secret@host/db).
    let url = |s: &Option<String>| s.as_deref().map(crate::config::redact_conninfo);
    let v = serde_json::json!({
        "config_file": c.path,
        "repo": url(&c.repo),
        "compression": format!("{:?}", c.codec.compression).to_lowercase(),
        "compression_level": c.codec.level,
        "state_dir": c.state_dir,
        "s3": {
            "endpoint": url(&c.storage.s3.endpoint),
            "region": c.storage.s3.region,
            "access_key_id": c.storage.s3.access_key_id,
            "secret_access_key": redacted(&c.storage.s3.secret_access_key),
            "force_path_style": c.storage.s3.force_path_style,
            "ca_file": c.storage.tls.ca_file,
            "allow_invalid_certificates": c.storage.tls.allow_invalid_certificates,
        },
        "encryption": {
            "recipients": c.codec.seal.as_ref().map(|r| r.public_keys().to_vec()),
            "identity": c.identities.as_ref().map(|i| format!("[redacted] (opens {})", i.public_keys().join(", "))),
        },
        "azure": shown_settings(&c.storage.azure),
        "gcs": shown_settings(&c.storage.gcs),
        "storage": {
            "request_timeout": humantime::format_duration(c.storage.request_timeout).to_string(),
            "retry_time": humantime::format_duration(c.storage.retry_time).to_string(),
            "deadline": humantime::format_duration(c.storage.deadline).to_string(),
        },
        "postgres": { "pgdata": c.pgdata, "url": url(&c.pg_url), "bindir": c.pg_bindir },
        "wal": {
            "upload_ahead": c.upload_ahead,
            "prefetch": c.prefetch,
            "worker": c.wal_worker,
            "worker_idle": humantime::format_duration(c.wal_worker_idle).to_string(),
        },
        "agent": {
            "listen": c.agent_listen,
            "token_file": c.agent_token_file,
            "token": redacted(&c.agent_token),
            "shutdown_timeout": humantime::format_duration(c.agent_shutdown_timeout).to_string(),
            "retention_interval": humantime::format_duration(c.agent_retention_interval).to_string(),
            "verify_interval": humantime::format_duration(c.agent_verify_interval).to_string(),
        },
        "drill": {
            "interval": c.drill_interval.map(|d| humantime::format_duration(d).to_string()),
            "scratch_dir": c.drill_scratch_dir,
            "port": c.drill_port,
            "query": c.drill_query,
        },
        "settings": c.settings,
    });
    println!("{}", serde_json::to_string_pretty(&v).expect("JSON"));
    exit::OK
}
