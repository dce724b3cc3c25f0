//! Base backups that do not finish: what they leave behind on the local S3 server.

mod common;

use common::*;
use std::time::Duration;
use walnut_testkit::PgCluster;

const WAIT: Duration = Duration::from_secs(60);

/// The multipart uploads the local S3 server holds open (s3s-fs keeps one `.upload-<id>.json`
/// file per upload in its root until it is completed or aborted).
fn open_uploads(env: &Env) -> Vec<String> {
    let root = env.s3.as_ref().unwrap().root();
    let mut v: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".upload"))
        .collect();
    v.sort();
    v
}

/// Part objects the backup has completed so far.
fn finished_parts(env: &Env) -> usize {
    fn walk(dir: &std::path::Path, n: &mut usize) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, n);
            } else if p.extension().is_some_and(|x| x == "tar") {
                *n += 1;
            }
        }
    }
    let mut n = 0;
    walk(&env.object_path("backups"), &mut n);
    n
}

/// A backup stopped by SIGTERM while a part is being uploaded aborts its multipart uploads: the
/// S3 server holds none open afterwards (they would be billed and never cleaned up).
#[test]
fn a_cancelled_backup_leaves_no_open_multipart_upload() {
    let env = Env::with_extra(Backend::S3, "compression = \"none\"\n[backup]\nparallel = 2\npart_size_mb = 1\n");
    let pg = env.cluster();
    pg.sql("CREATE TABLE big AS SELECT g, md5(g::text) || md5((g + 1)::text) AS h FROM generate_series(1, 250000) g");
    let child = backup_push_cmd(&env, &pg).stderr(std::process::Stdio::piped()).spawn().unwrap();
    // Mid-stream: a part is complete and another upload is open.
    PgCluster::wait_for("a part uploaded and another upload open", WAIT, || {
        finished_parts(&env) >= 1 && !open_uploads(&env).is_empty()
    });
    let ok = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(ok.success(), "kill -TERM");
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "a cancelled backup fails: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(open_uploads(&env), Vec::<String>::new(), "open multipart uploads after the cancelled backup");
    let o = env.walnut(&["--json", "backup-list"]);
    assert!(o.status.success(), "backup-list: {}", stderr(&o));
    let list: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert!(list.as_array().unwrap().iter().all(|b| b["status"] == "FAILED"), "{list}");
}
