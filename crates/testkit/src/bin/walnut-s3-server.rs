//! The local S3-compatible test server as a standalone process, for scripts (bench/wal.sh).
//!
//! ```text
//! walnut-s3-server [--port N] [--exit-after SECS] [--stop-on-stdin-eof] [--tls DIR]
//! ```
//! Prints `endpoint=http://127.0.0.1:PORT`, `bucket=walnut`, `data_dir=...` and `bucket_dir=...`,
//! one per line (with `--tls DIR`, also `https_endpoint=https://127.0.0.1:PORT` and `ca_file=...`:
//! a TLS front, with a self-signed certificate made in DIR by `openssl`, forwarding to the server), then serves until SIGTERM or SIGINT (or stdin closes, or `--exit-after` passes).
//! The port can also be given as `WALNUT_S3_PORT`. The data directory is removed on exit.

use std::io::Write;
use std::time::Duration;
use walnut_testkit::s3::{ACCESS_KEY, BUCKET, S3Server, SECRET_KEY};

const USAGE: &str = "usage: walnut-s3-server [--port N] [--exit-after SECS] [--stop-on-stdin-eof] [--tls DIR]";

fn main() {
    let mut port: u16 = std::env::var("WALNUT_S3_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(0);
    let mut exit_after: Option<u64> = None;
    let mut stdin_eof = false;
    let mut tls: Option<std::path::PathBuf> = None;
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
            "--tls" => {
                tls = Some(args.next().map(Into::into).unwrap_or_else(|| {
                    eprintln!("--tls needs a directory\n{USAGE}");
                    std::process::exit(2)
                }))
            }
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

    // Signal handlers first, so a SIGTERM right after the endpoint is printed is not fatal.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (mut term, mut int) = {
        use tokio::signal::unix::{SignalKind, signal};
        let _in_runtime = rt.enter();
        (
            signal(SignalKind::terminate()).expect("SIGTERM handler"),
            signal(SignalKind::interrupt()).expect("SIGINT handler"),
        )
    };

    let server = S3Server::start_on(port);
    let front = tls.map(|dir| {
        let cert = walnut_testkit::tls::TlsCert::ca_signed(&dir);
        (walnut_testkit::tls::TlsFront::start(server.addr(), &cert), cert.ca)
    });
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "endpoint={}", server.endpoint());
        let _ = writeln!(out, "bucket={BUCKET}");
        let _ = writeln!(out, "access_key_id={ACCESS_KEY}");
        let _ = writeln!(out, "secret_access_key={SECRET_KEY}");
        let _ = writeln!(out, "data_dir={}", server.root().display());
        let _ = writeln!(out, "bucket_dir={}", server.bucket_dir().display());
        if let Some((front, ca)) = &front {
            let _ = writeln!(out, "https_endpoint={}", front.endpoint());
            let _ = writeln!(out, "ca_file={}", ca.display());
        }
        let _ = out.flush();
    }

    let why = rt.block_on(async {
        let stdin_closed = async {
            if !stdin_eof {
                return std::future::pending::<()>().await;
            }
            // A plain thread reads stdin to its end (tokio's stdin needs a feature we do not use).
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
                let _ = tx.send(());
            });
            let _ = rx.await;
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
    drop(front);
    drop(server); // stops serving and removes the data directory
    rt.shutdown_background();
    std::process::exit(0);
}
