//! Bad storage settings through the walnut binary: an S3 endpoint without a scheme, one that is
//! not a URL, and missing S3 credentials each end in a one-line error naming the setting and the
//! fix, a non-zero exit and no panic, before any request is sent. Only 127.0.0.1 is ever used:
//! the endpoints point at a closed local port, and the instance-metadata endpoint object_store
//! would ask for credentials is pointed there too, in case the fast failure ever regresses.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The AWS variables that could supply settings walnut should not see here.
const AWS_VARS: [&str; 7] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
];

/// A port on 127.0.0.1 that nothing listens on (bound, then released).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Runs `walnut --config <config> <args>` with a clean AWS environment plus `env`, and a
/// backtrace requested, so that a panic would show one.
fn walnut(config: &Path, args: &[&str], env: &[(&str, &str)]) -> (Output, Duration) {
    let mut c = Command::new(walnut_bin());
    c.arg("--config").arg(config).args(args);
    for v in AWS_VARS {
        c.env_remove(v);
    }
    let metadata = format!("http://127.0.0.1:{}", closed_port());
    c.env("AWS_METADATA_ENDPOINT", &metadata).env("AWS_EC2_METADATA_DISABLED", "true");
    c.env("RUST_BACKTRACE", "1").env("PGHOST", "127.0.0.1").env("PGPORT", closed_port().to_string());
    for (k, v) in env {
        c.env(k, v);
    }
    let t = Instant::now();
    let o = c.output().expect("run walnut");
    (o, t.elapsed())
}

fn write_config(dir: &Path, name: &str, s3_section: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let text = format!(
        "repo = \"s3://walnut/cluster-a\"\nstate_dir = \"{}\"\n[storage]\nrequest_timeout = \"2s\"\nretry_time = \"3s\"\ndeadline = \"6s\"\n[s3]\n{s3_section}",
        dir.join("state").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// A failed run: non-zero exit that is not a panic's (101), nothing of a panic on stderr, and
/// `needle` in what it printed.
fn assert_refused(o: &Output, what: &str, needle: &str) {
    let (out, err) = (stdout(o), stderr(o));
    assert!(!o.status.success(), "{what}: must fail\nstdout: {out}\nstderr: {err}");
    assert_ne!(o.status.code(), Some(101), "{what}: exit 101 is a panic\nstderr: {err}");
    for panic_sign in ["panicked", "stack backtrace", "RUST_BACKTRACE"] {
        assert!(!err.contains(panic_sign), "{what}: {panic_sign:?} in stderr:\n{err}");
    }
    assert!(
        out.contains(needle) || err.contains(needle),
        "{what}: {needle:?} not printed\nstdout: {out}\nstderr: {err}"
    );
}

#[test]
fn s3_endpoint_without_a_scheme_is_explained_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let keys = "access_key_id = \"key-id\"\nsecret_access_key = \"secret-value-123\"\n";
    let port = closed_port();
    let no_scheme = format!("127.0.0.1:{port}");
    let cases = [
        (
            no_scheme.clone(),
            format!("[s3] endpoint \"{no_scheme}\" has no scheme: write http://{no_scheme} or https://{no_scheme}"),
        ),
        ("not a url".to_string(), "[s3] endpoint \"not a url\" is not a URL".to_string()),
    ];
    for (i, (endpoint, needle)) in cases.iter().enumerate() {
        let config = write_config(dir.path(), &format!("c{i}.toml"), &format!("endpoint = \"{endpoint}\"\n{keys}"));
        for cmd in ["wal-show", "check"] {
            let (o, took) = walnut(&config, &[cmd], &[]);
            let what = format!("{cmd} with endpoint {endpoint:?}");
            assert_refused(&o, &what, needle);
            assert!(!stdout(&o).contains("secret-value-123") && !stderr(&o).contains("secret-value-123"), "{what}");
            assert!(took < Duration::from_secs(10), "{what}: took {took:?}");
        }
    }
    // The same through the environment variable the app resolves.
    let config = write_config(dir.path(), "env.toml", keys);
    let (o, _) = walnut(&config, &["wal-show"], &[("AWS_ENDPOINT_URL", &no_scheme)]);
    assert_refused(&o, "AWS_ENDPOINT_URL without a scheme", &format!("[s3] endpoint \"{no_scheme}\" has no scheme"));
}

#[test]
fn missing_s3_credentials_fail_fast_before_any_request() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("http://127.0.0.1:{}", closed_port());
    let config = write_config(dir.path(), "nokeys.toml", &format!("endpoint = \"{endpoint}\"\n"));
    let needle =
        "no credentials: set [s3] access_key_id and secret_access_key (or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)";
    for cmd in ["wal-show", "check"] {
        let (o, took) = walnut(&config, &[cmd], &[]);
        assert_refused(&o, cmd, needle);
        assert!(!stderr(&o).contains("169.254.169.254"), "{cmd}: went for instance credentials: {}", stderr(&o));
        // A request would take the 3s retry time against the closed port; this is immediate.
        assert!(took < Duration::from_secs(3), "{cmd}: took {took:?}, so it tried the network");
    }
    // Half a key pair names the missing half.
    let config =
        write_config(dir.path(), "half.toml", &format!("endpoint = \"{endpoint}\"\naccess_key_id = \"key-id\"\n"));
    let (o, took) = walnut(&config, &["wal-show"], &[]);
    assert_refused(&o, "only access_key_id", "[s3] secret_access_key is missing");
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

/// The standard AWS variables still supply the keys (resolved by the app, passed explicitly to
/// the storage layer): with them, the same config reaches the local S3 server.
#[test]
fn s3_credentials_from_the_environment_still_work() {
    let env = Env::new(Backend::S3);
    let s3 = env.s3.as_ref().unwrap();
    let config = write_config(
        env.dir.path(),
        "env-keys.toml",
        &format!("endpoint = \"{}\"\nregion = \"us-east-1\"\nforce_path_style = true\n", s3.endpoint()),
    );
    let (o, _) = walnut(&config, &["wal-show"], &[]);
    assert_refused(&o, "no keys anywhere", "no credentials");
    let (o, _) = walnut(
        &config,
        &["wal-show"],
        &[
            ("AWS_ACCESS_KEY_ID", walnut_testkit::s3::ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", walnut_testkit::s3::SECRET_KEY),
        ],
    );
    // The repository is empty: wal-show says so, which takes a successful request.
    assert!(stderr(&o).contains("nothing archived yet"), "{}", stderr(&o));
    // A wrong secret from the environment is refused by the server, typed, without the secret.
    let (o, _) = walnut(
        &config,
        &["wal-show"],
        &[("AWS_ACCESS_KEY_ID", walnut_testkit::s3::ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", "wrong-secret-456")],
    );
    assert_refused(&o, "wrong secret", "permission denied");
    assert!(stderr(&o).contains("check the credentials / access key"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("wrong-secret-456"), "{}", stderr(&o));
}
