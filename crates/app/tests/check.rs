//! `walnut check` against a real PostgreSQL 15 and both repository backends.

mod common;

use common::*;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// Objects left below `probe/` in the repository.
fn probes_left(env: &Env) -> Vec<String> {
    std::fs::read_dir(env.object_path("probe"))
        .map(|r| r.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// `check` proves that the repository refuses a second create-only write of the same key (the
/// never-overwrite guarantee), on `file://` and on S3, and deletes its probe object.
#[test]
fn check_proves_create_only_writes_and_cleans_up() {
    for backend in [Backend::File, Backend::S3] {
        let env = Env::new(backend);
        let pg = env.cluster();
        let seg = pg.switch_wal();
        pg.wait_archived(&seg, WAIT);
        let o = backup_push(&env, &pg, None);
        assert!(o.status.success(), "{backend:?}: backup-push: {}", stderr(&o));
        let o = check(&env, &pg);
        let out = stdout(&o);
        assert!(o.status.success(), "{backend:?}: check failed:\n{out}\n{}", stderr(&o));
        assert!(out.contains("✔ create-only writes refused if taken"), "{backend:?}: {out}");
        assert_eq!(probes_left(&env), Vec::<String>::new(), "{backend:?}: probe objects left behind");
    }
}

/// Points `env`'s S3 repository at `endpoint` (a TLS front) and adds `extra` to `[s3]`.
fn through(env: &Env, endpoint: &str, extra: &str) {
    let text: Vec<String> =
        std::fs::read_to_string(&env.config)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with("ca_file"))
            .map(|l| {
                if l.starts_with("endpoint = ") { format!("endpoint = \"{endpoint}\"\n{extra}") } else { l.to_string() }
            })
            .collect();
    std::fs::write(&env.config, text.join("\n") + "\n").unwrap();
    walnut_testkit::pg::give_to_postgres_user(env.dir.path());
}

fn check(env: &Env, pg: &walnut_testkit::PgCluster) -> std::process::Output {
    std::process::Command::new(walnut_bin())
        .arg("--config")
        .arg(&env.config)
        .arg("check")
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", pg.port.to_string())
        .env("PGUSER", "postgres")
        .output()
        .unwrap()
}

/// S3 over TLS with certificates made the common way: a server certificate made with
/// `openssl req -x509` (CA:TRUE) gets a `check` line that names the problem and the fix; a
/// private CA named in `[s3] ca_file` carries archiving, a base backup and `check` end to end.
#[test]
fn check_names_a_tls_problem_and_a_private_ca_works_end_to_end() {
    use walnut_testkit::{TlsCert, TlsFront};
    let env = Env::new(Backend::S3);
    let s3 = env.s3.as_ref().unwrap();
    let self_signed = TlsCert::self_signed(&env.dir.path().join("self"));
    let ca_signed = TlsCert::ca_signed(&env.dir.path().join("ca"));
    let bad = TlsFront::start(s3.addr(), &self_signed);
    let good = TlsFront::start(s3.addr(), &ca_signed);

    through(&env, &bad.endpoint(), "");
    let pg = env.cluster();
    let o = check(&env, &pg);
    let out = stdout(&o);
    assert!(!o.status.success(), "check passed on a refused certificate:\n{out}");
    assert!(out.contains("✗ TLS certificate of the store"), "{out}");
    assert!(out.contains("CA:TRUE") && out.contains("ca_file"), "names the cause and the fix: {out}");

    let ca = ca_signed.ca.display().to_string();
    through(&env, &good.endpoint(), &format!("ca_file = \"{ca}\""));
    let seg = pg.switch_wal();
    let log = pg.log_path();
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pg.wait_archived(&seg, WAIT)));
    assert!(waited.is_ok(), "archiving over TLS:\n{}", std::fs::read_to_string(&log).unwrap_or_default());
    let o = backup_push(&env, &pg, None);
    assert!(o.status.success(), "backup-push over TLS: {}", stderr(&o));
    let o = check(&env, &pg);
    let out = stdout(&o);
    assert!(o.status.success(), "check over TLS with ca_file failed:\n{out}\n{}", stderr(&o));
    assert!(out.contains("✔ create-only writes refused if taken"), "{out}");
    assert!(good.handshakes() > 0, "the TLS front was not used");
}
