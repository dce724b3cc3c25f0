//! Encryption at rest (age): with recipients only, archiving, backups, listing, wal-show,
//! retention and verify work and no object holds clear text; a restore without the identity
//! fails before writing anything; with the wrong one it is refused by name; with the right one,
//! PITR works.

mod common;

use common::*;
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);
const MARKER: &str = "WALNUT-CLEAR-TEXT-MARKER-4711";

fn keypair() -> (String, String) {
    use age::secrecy::ExposeSecret;
    let id = age::x25519::Identity::generate();
    (id.to_public().to_string(), id.to_string().expose_secret().to_string())
}

/// Every stored object under `root`, with its bytes.
fn objects(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else {
                out.push((p.strip_prefix(root).unwrap().display().to_string(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

/// The objects in which the marker is found: in the stored bytes, or in the content after the
/// envelope's compression is undone (which needs no key).
fn holding_marker(root: &Path) -> Vec<String> {
    objects(root)
        .into_iter()
        .filter(|(_, bytes)| {
            let found = |b: &[u8]| b.windows(MARKER.len()).any(|w| w == MARKER.as_bytes());
            found(bytes) || walnut_core::envelope::decode(bytes).is_ok_and(|d| found(&d.content))
        })
        .map(|(k, _)| k)
        .collect()
}

fn workload(env: &Env) -> (walnut_testkit::PgCluster, String) {
    let pg = env.cluster();
    pg.sql(&format!("CREATE TABLE t AS SELECT g, '{MARKER} ' || g AS v FROM generate_series(1, 3000) g"));
    let o = backup_push(env, &pg, Some("sealed"));
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    pg.sql(&format!("INSERT INTO t SELECT g, '{MARKER} after' FROM generate_series(3001, 3500) g"));
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, WAIT);
    (pg, seg)
}

#[test]
fn a_clear_repository_shows_the_marker_to_the_scan() {
    // The scan below is not vacuous: without encryption it finds the marker in the WAL and in
    // the backup.
    let env = Env::new(Backend::File);
    let (_pg, _) = workload(&env);
    let found = holding_marker(&env.dir.path().join("repo"));
    assert!(found.iter().any(|k| k.starts_with("wal/")), "{found:?}");
    assert!(found.iter().any(|k| k.starts_with("backups/")), "{found:?}");
}

#[test]
fn encrypted_repository_works_without_the_identity_and_restores_with_it() {
    let (public, secret) = keypair();
    let (other_public, other_secret) = keypair();
    let enc = format!("[encryption]\nrecipients = [\"{public}\"]");
    let mut env = Env::with_extra(Backend::File, &enc);
    let (pg, seg) = workload(&env);
    let repo = env.dir.path().join("repo");

    // No object holds clear text: not the WAL, not the parts, not the manifest.
    let found = holding_marker(&repo);
    assert!(found.is_empty(), "clear text in {found:?}");
    let wal = std::fs::read(repo.join(wal_key(&seg))).unwrap();
    assert!(walnut_core::envelope::is_encrypted(&wal));

    // Without the identity: listing, wal-show, retention's plan and verify all work.
    let o = env.walnut(&["backup-list"]);
    assert!(
        o.status.success() && stdout(&o).contains("sealed") && stdout(&o).contains("DONE"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    let o = env.walnut(&["wal-show"]);
    assert!(o.status.success() && stdout(&o).contains("restorable"), "{}{}", stdout(&o), stderr(&o));
    let o = env.walnut(&["retention", "apply"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let o = env.walnut(&["verify"]);
    assert!(o.status.success() && stdout(&o).contains("restorable to ["), "{}{}", stdout(&o), stderr(&o));

    // A restore without the identity fails before it writes anything to DEST, naming the fix.
    let (_d, dest) = restore_dir("no-key");
    let o = env.walnut(&["restore", dest.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("no identity configured") && e.contains("WALNUT_AGE_IDENTITY") && e.contains(&public), "{e}");
    assert!(!dest.exists() || std::fs::read_dir(&dest).unwrap().next().is_none(), "DEST untouched");
    // wal-fetch without it: a real failure (stops recovery), not "not archived".
    let o = env.walnut(&["wal-fetch", &seg, env.dir.path().join("x").to_str().unwrap()]);
    assert!(o.status.code().unwrap_or(0) > 125, "{:?} {}", o.status, stderr(&o));

    // The wrong identity is refused, named.
    let key_file = env.dir.path().join("age.key");
    std::fs::write(&key_file, format!("# a key of someone else\n{other_secret}\n")).unwrap();
    env.write_config(&format!("{enc}\nidentity_file = \"{}\"", key_file.display()));
    let o = env.walnut(&["restore", dest.to_str().unwrap(), "--dry-run"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("does not match any recipient") && e.contains(&other_public), "{e}");
    assert!(!e.contains(&other_secret), "never the secret");

    // With the right identity: PITR to the end of the archive.
    std::fs::write(&key_file, format!("{secret}\n")).unwrap();
    walnut_testkit::pg::give_to_postgres_user(env.dir.path());
    let o = env.walnut(&["restore", dest.to_str().unwrap(), "--start"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let r = Restored::from_dir(&dest);
    assert_eq!(r.sql("SELECT count(*) FROM t"), "3500");
    drop(r);
    let o = env.walnut(&["verify", "--deep"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let o = env.walnut(&["show-config"]);
    assert!(!stdout(&o).contains(&secret), "show-config never shows the identity");
    drop(pg);
}

/// Every WAL and backup object under the repository, with the recipients its metadata names
/// (empty: in clear).
fn recipients_by_object(root: &Path) -> Vec<(String, Vec<String>)> {
    objects(root)
        .into_iter()
        .filter(|(k, _)| (k.starts_with("wal/") || k.starts_with("backups/")) && !k.ends_with("running.json"))
        .map(|(k, bytes)| {
            let meta = walnut_core::envelope::meta_from_prefix(&bytes).unwrap().unwrap();
            assert_eq!(
                !walnut_core::envelope::recipients(&meta).is_empty(),
                walnut_core::envelope::is_encrypted(&bytes)
            );
            (k, walnut_core::envelope::recipients(&meta))
        })
        .collect()
}

fn crashed_at(env: &Env, at: &str, args: &[&str]) {
    use std::os::unix::process::ExitStatusExt;
    let o = std::process::Command::new(walnut_bin())
        .arg("--config")
        .arg(&env.config)
        .args(args)
        .env("WALNUT_CRASH_AT", at)
        .output()
        .unwrap();
    assert!(matches!(o.status.signal(), Some(9 | 6)), "killed at {at}: {}{}", stdout(&o), stderr(&o));
}

#[test]
fn rekey_encrypts_what_was_clear_and_rotates_keys_with_nothing_unreadable_on_the_way() {
    let (a, a_secret) = keypair();
    let (b, b_secret) = keypair();
    let mut env = Env::with_extra(Backend::File, "[backup]\nparallel = 2\npart_size_mb = 1\narchive_wait = \"30s\"");
    let (pg, _) = workload(&env);
    let repo = env.dir.path().join("repo");
    let key_file = env.dir.path().join("age.key");
    let config = |env: &mut Env, to: &str, secrets: &[&str]| {
        std::fs::write(&key_file, secrets.join("\n") + "\n").unwrap();
        env.write_config(&format!(
            "[backup]\nparallel = 2\npart_size_mb = 1\narchive_wait = \"30s\"\n[encryption]\nrecipients = [\"{to}\"]\nidentity_file = \"{}\"",
            key_file.display()
        ));
    };

    // Encryption switched on later: without --confirm, rekey says what it would do and does it not.
    config(&mut env, &a, &[&a_secret]);
    let o = env.walnut(&["rekey"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("clear (not encrypted)") && stdout(&o).contains("--confirm"), "{}", stdout(&o));
    assert!(!holding_marker(&repo).is_empty(), "nothing changed without --confirm");
    let o = env.walnut(&["rekey", "--confirm"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    assert!(holding_marker(&repo).is_empty(), "clear text left in {:?}", holding_marker(&repo));
    let objects = recipients_by_object(&repo);
    assert!(objects.iter().any(|(k, _)| k.contains("/data/")), "{objects:?}");
    assert!(objects.iter().all(|(_, r)| r == &vec![a.clone()]), "{objects:?}");

    // Rotation to b, killed before a backup's manifest switches and again after it did: at each
    // point every backup and segment still reads whole (both keys held while rotating).
    config(&mut env, &b, &[&a_secret, &b_secret]);
    for at in ["rekey:before-manifest", "rekey:after-manifest"] {
        crashed_at(&env, at, &["rekey", "--confirm"]);
        let o = env.walnut(&["verify", "--deep"]);
        assert!(o.status.success(), "after a kill at {at}: {}{}", stdout(&o), stderr(&o));
    }
    let o = env.walnut(&["rekey", "--confirm"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let objects = recipients_by_object(&repo);
    assert!(objects.iter().all(|(_, r)| r == &vec![b.clone()]), "an object still opens with the old key: {objects:?}");
    let o = env.walnut(&["--json", "rekey"]);
    let plan: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(plan["plan"]["todo"].as_array().map(Vec::len), Some(0), "{plan}");
    assert_eq!(plan["plan"]["leftovers"].as_array().map(Vec::len), Some(0), "{plan}");

    // WAL archived from now on is encrypted to b too.
    pg.sql("INSERT INTO t SELECT g, 'after the rotation' FROM generate_series(3501, 3600) g");
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, WAIT);
    let wal = std::fs::read(repo.join(wal_key(&seg))).unwrap();
    let meta = walnut_core::envelope::meta_from_prefix(&wal).unwrap().unwrap();
    assert_eq!(walnut_core::envelope::recipients(&meta), vec![b.clone()], "{seg}");

    // The old key alone opens nothing; the new one alone restores.
    config(&mut env, &b, &[&a_secret]);
    let (_d, dest) = restore_dir("old-key");
    let o = env.walnut(&["restore", dest.to_str().unwrap(), "--dry-run"]);
    assert!(!o.status.success() && stderr(&o).contains("does not match any recipient"), "{}", stderr(&o));
    config(&mut env, &b, &[&b_secret]);
    let o = env.walnut(&["verify", "--deep"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    walnut_testkit::pg::give_to_postgres_user(env.dir.path());
    let o = env.walnut(&["restore", dest.to_str().unwrap(), "--start"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let r = Restored::from_dir(&dest);
    assert_eq!(r.sql("SELECT count(*) FROM t"), "3600");
    drop(r);
    drop(pg);
}

/// Damage to encrypted objects, each refused by name: a flipped byte in a WAL segment's
/// ciphertext and a truncated backup part (found by `verify` without the key, from the stored
/// form's checksum, and by wal-fetch and restore with it); a segment encrypted to another key
/// (as if written with a wrong recipient) is refused as not ours, never decrypted as garbage.
#[test]
fn damaged_ciphertext_is_refused_and_named() {
    let (public, secret) = keypair();
    let key_file_text = format!("{secret}\n");
    let mut env = Env::with_extra(Backend::File, &format!("[encryption]\nrecipients = [\"{public}\"]"));
    let (pg, seg) = workload(&env);
    let repo = env.dir.path().join("repo");
    let wal = repo.join(wal_key(&seg));
    let part = objects(&repo.join("backups"))
        .into_iter()
        .map(|(k, _)| repo.join("backups").join(k))
        .find(|p| p.to_string_lossy().contains("/data/"))
        .unwrap();
    let part_name = part.file_name().unwrap().to_string_lossy().into_owned();
    let (wal_bytes, part_bytes) = (std::fs::read(&wal).unwrap(), std::fs::read(&part).unwrap());

    // Without the key: verify checks the stored form and names both objects.
    let mut bad = wal_bytes.clone();
    let middle = bad.len() / 2;
    bad[middle] ^= 0x01;
    std::fs::write(&wal, &bad).unwrap();
    std::fs::write(&part, &part_bytes[..part_bytes.len() - 100]).unwrap();
    let o = env.walnut(&["verify"]);
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(!o.status.success() && all.contains(&seg) && all.contains(&part_name), "{all}");

    // With the key: wal-fetch stops recovery (> 125) naming the segment; restore names the part.
    let key_file = env.dir.path().join("age.key");
    std::fs::write(&key_file, &key_file_text).unwrap();
    env.write_config(&format!("[encryption]\nrecipients = [\"{public}\"]\nidentity_file = \"{}\"", key_file.display()));
    // verify with the key checks the same stored form (it does not decrypt) and names both.
    let o = env.walnut(&["verify"]);
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(!o.status.success() && all.contains(&seg) && all.contains(&part_name), "{all}");
    let dest = env.dir.path().join("seg");
    let o = env.walnut(&["wal-fetch", &seg, dest.to_str().unwrap()]);
    assert!(o.status.code().unwrap_or(0) > 125 && !dest.exists(), "{:?} {}", o.status, stderr(&o));
    assert!(stderr(&o).contains(&seg), "{}", stderr(&o));
    let (_d, restore_to) = restore_dir("damaged");
    let o = env.walnut(&["backup-fetch", restore_to.to_str().unwrap(), "LATEST"]);
    assert!(!o.status.success() && stderr(&o).contains(&part_name), "{}", stderr(&o));

    // A segment encrypted to someone else's key: refused as not ours, by name.
    std::fs::write(&part, &part_bytes).unwrap();
    let (other_public, _) = keypair();
    let other = walnut_core::crypt::Recipients::parse([other_public.as_str()], "test").unwrap();
    let mut resealed = Vec::new();
    let keys = walnut_core::crypt::Identities::parse(&secret, "test").unwrap();
    walnut_core::envelope::reseal(&wal_bytes[..], &mut resealed, Some(&keys), &other).unwrap();
    std::fs::write(&wal, &resealed).unwrap();
    let o = env.walnut(&["wal-fetch", &seg, dest.to_str().unwrap()]);
    assert!(o.status.code().unwrap_or(0) > 125, "{:?} {}", o.status, stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("does not match any recipient") && e.contains(&other_public) && !e.contains(&secret), "{e}");
    // Its stored form is whole (verify passes); decrypting it (verify --deep) is refused, named.
    let o = env.walnut(&["verify"]);
    assert!(o.status.success(), "stored form whole: {}{}", stdout(&o), stderr(&o));
    let o = env.walnut(&["verify", "--deep"]);
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(!o.status.success() && all.contains(&seg) && all.contains("does not match any recipient"), "{all}");
    std::fs::write(&wal, &wal_bytes).unwrap();
    let o = env.walnut(&["verify", "--deep"]);
    assert!(o.status.success(), "whole again: {}{}", stdout(&o), stderr(&o));
    drop(pg);
}
