//! The local S3-compatible test server as a standalone process, for scripts (bench/wal.sh).
//!
//! ```text
//! walnut-s3-server [--port N] [--exit-after SECS] [--stop-on-stdin-eof]
//! ```
//! Prints `endpoint=http://127.0.0.1:PORT`, `bucket=walnut`, `data_dir=...` and `bucket_dir=...`,
//! one per line, then serves until SIGTERM or SIGINT (or stdin closes, or `--exit-after` passes).
//! The port can also be given as `WALNUT_S3_PORT`. The data directory is removed on exit.

use std::io::Write;
use std::time::Duration;
use walnut_testkit::s3::{ACCESS_KEY, BUCKET, SECRET_KEY, S3Server};

const USAGE: &str = "usage: walnut-s3-server [--port N] [--exit-after SECS] [--stop-on-stdin-eof]";

fn main() {
    let mut port: u16 = std::env::var("WALNUT_S3_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(0);
    let mut exit_after: Option<u64> = None;
    let mut stdin_eof = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |what: &str| -> u64 {
            args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
                eprintln!("{what} needs a number\n{USAGE}");
                std::process::exit(2)
            })
        };
        match a.as_str() {
            "--port" => port = u16::try_from(value("--port")).unwrap_or_else(|_| panic!("--port: not a port")),
            "--exit-after" => exit_after = Some(value("--exit-after")),
            "--stop-on-stdin-eof" => stdin_eof = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return;
            }
            other => {
                eprintln!("unknown argument {other:?}\n{USAGE}");
                std::process::exit(2);
            }
        }
    }

    let server = S3Server::start_on(port);
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "endpoint={}", server.endpoint());
        let _ = writeln!(out, "bucket={BUCKET}");
        let _ = writeln!(out, "access_key_id={ACCESS_KEY}");
        let _ = writeln!(out, "secret_access_key={SECRET_KEY}");
        let _ = writeln!(out, "data_dir={}", server.root().display());
        let _ = writeln!(out, "bucket_dir={}", server.bucket_dir().display());
        let _ = out.flush();
    }

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let why = rt.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let stdin_closed = async {
            if !stdin_eof {
                return std::future::pending::<()>().await;
            }
            use tokio::io::AsyncReadExt;
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 256];
            while let Ok(n) = stdin.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        };
        let deadline = async {
            match exit_after {
                Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = stdin_closed => "stdin closed",
            _ = deadline => "--exit-after elapsed",
        }
    });
    eprintln!("walnut-s3-server: stopping ({why})");
    drop(server); // stops serving and removes the data directory
    // Do not wait for a blocking stdin read still in flight.
    rt.shutdown_background();
    std::process::exit(0);
}
