//! A flipped byte in every kind of stored object is detected, named, and never handed to
//! PostgreSQL: WAL content, a WAL segment's summary (the metadata planners read), a backup part,
//! a manifest, the identity, a timeline history file.

mod common;

use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;
use walnut_testkit::PgCluster;

const WAIT: Duration = Duration::from_secs(60);

/// Flips one byte of `file` at `pos` (from its end when negative), returns the original bytes.
fn flip(file: &Path, pos: isize) -> Vec<u8> {
    let original = std::fs::read(file).unwrap();
    let mut bad = original.clone();
    let at = if pos < 0 { (bad.len() as isize + pos) as usize } else { pos as usize };
    bad[at] ^= 0x01;
    std::fs::write(file, bad).unwrap();
    original
}

fn fatal(o: &std::process::Output, what: &str, names: &str) {
    assert!(!o.status.success(), "{what}: a corrupt object must be refused\n{}", stdout(o));
    let all = format!("{}{}", stdout(o), stderr(o));
    assert!(all.contains(names), "{what}: the message names {names}: {all}");
    assert!(!all.contains("panicked"), "{what}: {all}");
}

fn empty(dir: &Path) -> bool {
    !dir.exists() || std::fs::read_dir(dir).unwrap().next().is_none()
}

#[test]
fn a_flipped_byte_in_every_object_type_is_detected_and_named() {
    let env = Env::new(Backend::File);
    let pg = env.cluster();
    pg.sql("CREATE TABLE t AS SELECT g, md5(g::text) FROM generate_series(1, 20000) g");
    let o = backup_push(&env, &pg, None);
    assert!(o.status.success(), "{}", stderr(&o));
    pg.sql("INSERT INTO t VALUES (0, 'after')");
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, WAIT);
    let repo = env.dir.path().join("repo");
    let backup_dir = std::fs::read_dir(repo.join("backups")).unwrap().next().unwrap().unwrap().path();
    let scratch = walnut_testkit::shared_tempdir("walnut-corrupt-");
    let dest = |name: &str| -> PathBuf { scratch.path().join(name) };
    let mut detected = 0;

    // WAL content: wal-fetch stops recovery (> 125) and writes nothing.
    let wal = repo.join(wal_key(&seg));
    let original = flip(&wal, -100);
    let o = env.walnut(&["wal-fetch", &seg, dest("seg").to_str().unwrap()]);
    fatal(&o, "WAL content", &seg);
    assert!(o.status.code().unwrap_or(0) > 125 && !dest("seg").exists());
    std::fs::write(&wal, original).unwrap();
    detected += 1;

    // A segment's summary (plain JSON metadata at the head of the object): planning and
    // wal-verify refuse it instead of planning from a wrong commit time.
    let bytes = std::fs::read(&wal).unwrap();
    let at = bytes.windows(9).position(|w| w == b"\"records\"").expect("the summary is in the object") + 11;
    let original = flip(&wal, at as isize);
    let o = env.walnut(&["restore", dest("plan").to_str().unwrap(), "--dry-run"]);
    fatal(&o, "WAL summary (restore planning)", &seg);
    let o = env.walnut(&["wal-verify"]);
    fatal(&o, "WAL summary (wal-verify)", &seg);
    std::fs::write(&wal, original).unwrap();
    detected += 1;

    // A backup part: backup-fetch refuses it by name and leaves DEST empty.
    let part = std::fs::read_dir(backup_dir.join("data")).unwrap().next().unwrap().unwrap().path();
    let part_name = part.file_name().unwrap().to_string_lossy().into_owned();
    let original = flip(&part, -(std::fs::metadata(&part).unwrap().len() as isize) / 2);
    let o = env.walnut(&["backup-fetch", dest("fetch").to_str().unwrap(), "LATEST"]);
    fatal(&o, "backup part", &part_name);
    assert!(empty(&dest("fetch")), "nothing left in DEST");
    std::fs::write(&part, original).unwrap();
    detected += 1;

    // The manifest.
    let manifest = backup_dir.join("manifest.json");
    let original = flip(&manifest, -100);
    let o = env.walnut(&["restore", dest("manifest").to_str().unwrap(), "--dry-run"]);
    fatal(&o, "manifest", "manifest.json");
    std::fs::write(&manifest, original).unwrap();
    detected += 1;

    // The identity: wal-fetch refuses (> 125) rather than say "not archived".
    let identity = repo.join("walnut.json");
    let original = flip(&identity, -1);
    let o = env.walnut(&["wal-fetch", &seg, dest("id").to_str().unwrap()]);
    fatal(&o, "identity", "walnut.json");
    assert!(o.status.code().unwrap_or(0) > 125 && !dest("id").exists());
    std::fs::write(&identity, original).unwrap();
    detected += 1;

    // A timeline history file: restore onto timeline 2 with --archive, then corrupt 00000002.history.
    let (_d, primary2) = restore_dir("timeline-2");
    let o = env.walnut(&["restore", primary2.to_str().unwrap(), "--archive", "--start"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let r = Restored::from_dir(&primary2);
    let history = repo.join("wal/00000002/00000002.history");
    PgCluster::wait_for("00000002.history to be archived", WAIT, || history.exists());
    drop(r);
    let original = flip(&history, -5);
    let o = env.walnut(&["restore", dest("history").to_str().unwrap(), "--dry-run"]);
    fatal(&o, "history file", "00000002.history");
    std::fs::write(&history, original).unwrap();
    detected += 1;

    // And with everything restored, the repository is whole again.
    let o = env.walnut(&["wal-verify", "--deep"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    summary_line(
        "corruption",
        &format!("corruption: {detected} object types with a flipped byte, {detected} detected and named"),
    );
}
