//! `walnut verify`: a healthy repository passes with a restorable window per backup; a deleted
//! part, a flipped byte in a part and a missing WAL segment each fail, with the backup's verdict
//! naming the object.

mod common;

use common::*;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

fn verify(env: &Env, args: &[&str]) -> (std::process::Output, serde_json::Value) {
    let mut all = vec!["--json", "verify"];
    all.extend_from_slice(args);
    let o = env.walnut(&all);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("verify --json prints JSON ({e}): {}{}", stdout(&o), stderr(&o)));
    (o, v)
}

fn verdict<'a>(report: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    report["backups"].as_array().unwrap().iter().find(|b| b["id"] == id).unwrap_or_else(|| panic!("{id} in {report}"))
}

fn defect_objects(b: &serde_json::Value) -> Vec<String> {
    b["defects"].as_array().unwrap().iter().map(|d| d["object"].as_str().unwrap().to_string()).collect()
}

fn restore(path: &std::path::Path, original: &[u8]) {
    std::fs::write(path, original).unwrap();
}

#[test]
fn verify_passes_a_healthy_repository_and_names_each_defect() {
    let env = Env::new(Backend::File);
    let pg = env.cluster();
    pg.sql("CREATE TABLE t AS SELECT g, md5(g::text) AS m FROM generate_series(1, 50000) g");
    let o = backup_push(&env, &pg, Some("first"));
    assert!(o.status.success(), "{}", stderr(&o));
    // WAL between the two backups, over a few segments.
    let mut between = Vec::new();
    for i in 0..3 {
        pg.sql(&format!("INSERT INTO t SELECT g, 'between {i}' FROM generate_series(1, 1000) g"));
        between.push(pg.switch_wal());
    }
    pg.wait_archived(between.last().unwrap(), WAIT);
    let o = backup_push(&env, &pg, Some("second"));
    assert!(o.status.success(), "{}", stderr(&o));
    pg.sql("INSERT INTO t VALUES (0, 'after')");
    let last = pg.switch_wal();
    pg.wait_archived(&last, WAIT);

    let list = env.walnut(&["--json", "backup-list"]);
    let listed: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let ids: Vec<String> = listed.as_array().unwrap().iter().map(|b| b["id"].as_str().unwrap().to_string()).collect();
    assert_eq!(ids.len(), 2, "{listed}");
    let (first, second) = (ids[0].clone(), ids[1].clone());

    // Healthy: exit 0, both restorable to the end of the archive, nothing named.
    for deep in [false, true] {
        let args: &[&str] = if deep { &["--deep"] } else { &[] };
        let (o, r) = verify(&env, args);
        assert!(o.status.success(), "healthy (deep {deep}): {}{}", stdout(&o), stderr(&o));
        assert_eq!(r["ok"], true);
        for id in [&first, &second] {
            let b = verdict(&r, id);
            assert_eq!(b["verdict"], "restorable", "{b}");
            assert!(b["defects"].as_array().unwrap().is_empty(), "{b}");
            assert!(b["restorable"]["latest_lsn"].is_string(), "{b}");
        }
        assert!(r["parts_checked"].as_u64().unwrap() >= 2, "{r}");
        assert!(r["segments_checked"].as_u64().unwrap() >= 5, "{r}");
    }
    // The human form says the window.
    let o = env.walnut(&["verify"]);
    assert!(o.status.success());
    assert!(stdout(&o).contains(&format!("backup {first} (first): restorable to [")), "{}", stdout(&o));

    let part_of = |id: &str| -> std::path::PathBuf {
        let dir = env.dir.path().join("repo/backups").join(id).join("data");
        let mut parts: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        parts.sort();
        // The largest part: it holds the table.
        parts.into_iter().max_by_key(|p| std::fs::metadata(p).unwrap().len()).unwrap()
    };
    let key_of = |p: &std::path::Path| p.strip_prefix(env.dir.path().join("repo")).unwrap().display().to_string();

    // A flipped byte in the middle of a part: found without --deep, named, exit non-zero; the
    // other backup is still restorable.
    let part = part_of(&second);
    let original = std::fs::read(&part).unwrap();
    let mut bad = original.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x20;
    std::fs::write(&part, &bad).unwrap();
    for deep in [false, true] {
        let args: &[&str] = if deep { &["--deep"] } else { &[] };
        let (o, r) = verify(&env, args);
        assert!(!o.status.success(), "a flipped byte fails verify (deep {deep})");
        let b = verdict(&r, &second);
        assert_eq!(b["verdict"], "not restorable", "{b}");
        assert_eq!(defect_objects(b), vec![key_of(&part)], "{b}");
        assert_eq!(verdict(&r, &first)["verdict"], "restorable", "{r}");
    }
    let o = env.walnut(&["verify"]);
    assert!(stdout(&o).contains(&format!("DEFECT {}", key_of(&part))), "{}", stdout(&o));
    assert!(stderr(&o).contains("verify found 1 defect"), "{}", stderr(&o));
    restore(&part, &original);

    // A deleted part.
    std::fs::remove_file(&part).unwrap();
    let (o, r) = verify(&env, &[]);
    assert!(!o.status.success());
    let b = verdict(&r, &second);
    assert_eq!(defect_objects(b), vec![key_of(&part)], "{b}");
    assert!(b["defects"][0]["reason"].as_str().unwrap().contains("missing"), "{b}");
    // --backup checks only the one asked for: the first passes alone.
    let (o, r) = verify(&env, &["--backup", "first"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert_eq!(r["backups"].as_array().unwrap().len(), 1);
    restore(&part, &original);

    // A missing WAL segment between the backups: the first backup's window ends before it and
    // the segment is named; the second (which starts after it) is whole.
    let gone = env.object_path(&wal_key(&between[1]));
    let seg_original = std::fs::read(&gone).unwrap();
    std::fs::remove_file(&gone).unwrap();
    let (o, r) = verify(&env, &[]);
    assert!(!o.status.success(), "a missing segment fails verify");
    let b = verdict(&r, &first);
    assert_eq!(b["verdict"], "restorable (WAL ends early)", "{b}");
    assert_eq!(defect_objects(b), vec![wal_key(&between[1])], "{b}");
    assert_eq!(verdict(&r, &second)["verdict"], "restorable", "{r}");
    // A flipped byte in a segment is named the same way.
    let mut bad = seg_original.clone();
    let at = bad.len() - 100;
    bad[at] ^= 0x01;
    std::fs::write(&gone, &bad).unwrap();
    let (o, r) = verify(&env, &[]);
    assert!(!o.status.success());
    let b = verdict(&r, &first);
    assert_eq!(defect_objects(b), vec![wal_key(&between[1])], "{b}");
    assert!(b["defects"][0]["reason"].as_str().unwrap().contains("corrupt"), "{b}");
    restore(&gone, &seg_original);
    walnut_testkit::pg::give_to_postgres_user(env.dir.path());
    let (o, _) = verify(&env, &["--deep"]);
    assert!(o.status.success(), "whole again: {}{}", stdout(&o), stderr(&o));
}
