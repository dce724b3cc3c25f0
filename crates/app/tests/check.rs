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
        let o = std::process::Command::new(walnut_bin())
            .arg("--config")
            .arg(&env.config)
            .arg("check")
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", pg.port.to_string())
            .env("PGUSER", "postgres")
            .output()
            .unwrap();
        let out = stdout(&o);
        assert!(o.status.success(), "{backend:?}: check failed:\n{out}\n{}", stderr(&o));
        assert!(out.contains("✔ create-only writes refused if taken"), "{backend:?}: {out}");
        assert_eq!(probes_left(&env), Vec::<String>::new(), "{backend:?}: probe objects left behind");
    }
}
