//! Block-incremental backups on a real PostgreSQL 15 with data checksums: a chain of
//! incrementals stores about the changed blocks, is listed with its type, parent and chain,
//! restores (and fetches) to the same data as the source, and retention keeps a chain whole.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;
use walnut_testkit::PgCluster;
use walnut_testkit::pg::PgOptions;

const WAIT: Duration = Duration::from_secs(60);

fn cluster(env: &Env) -> PgCluster {
    cluster_with(env, 16)
}

/// A cluster with `wal_segsize_mb` MiB WAL segments (small ones put many records across
/// segment boundaries).
fn cluster_with(env: &Env, wal_segsize_mb: u32) -> PgCluster {
    PgCluster::start(PgOptions {
        archive_command: Some(env.archive_command()),
        data_checksums: true,
        wal_segsize_mb,
        extra_conf: "fsync = on\n".into(),
    })
}

/// `pg_dumpall` of the server on `port`: the whole logical content, for comparing clusters.
fn dumpall(port: u16) -> String {
    let o = Command::new(walnut_testkit::pg::bindir().join("pg_dumpall"))
        .args(["-h", "127.0.0.1", "-U", "postgres", "--no-role-passwords", "--no-unlogged-table-data"])
        .arg("-p")
        .arg(port.to_string())
        .output()
        .unwrap();
    assert!(o.status.success(), "pg_dumpall: {}", stderr(&o));
    // `\restrict KEY` lines carry a random key per dump.
    stdout(&o)
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first lines where two dumps differ, for the failure message.
fn first_difference(a: &str, b: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let at = a.iter().zip(&b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
    format!("{} vs {} lines; from line {at}:\n< {:?}\n> {:?}", a.len(), b.len(), a.get(at..at + 3), b.get(at..at + 3))
}

/// Restores `args` (after `restore DEST`) with `--start` once the source's archive has caught up,
/// and checks the restored cluster holds what the source holds (`rename`: source paths that
/// differ in the restored cluster, e.g. a tablespace's location).
fn restores_like_the_source(
    env: &Env,
    pg: &PgCluster,
    name: &str,
    args: &[&str],
    rename: Option<(&str, &str)>,
) -> (tempfile::TempDir, Restored) {
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, WAIT);
    let mut want = dumpall(pg.port);
    if let Some((from, to)) = rename {
        want = want.replace(from, to);
    }
    let (d, dest) = restore_dir(name);
    walnut_testkit::pg::give_to_postgres_user(env.dir.path());
    let mut all = vec!["restore", dest.to_str().unwrap()];
    all.extend_from_slice(args);
    all.push("--start");
    let o = env.walnut(&all);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let r = Restored::from_dir(&dest);
    let got = dumpall(r.port);
    assert!(got == want, "restored ({args:?}) differs from the source: {}", first_difference(&want, &got));
    (d, r)
}

fn backups(env: &Env) -> Vec<serde_json::Value> {
    let o = env.walnut(&["--json", "backup-list"]);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_str::<serde_json::Value>(&stdout(&o)).unwrap().as_array().unwrap().clone()
}

fn push(env: &Env, pg: &PgCluster, args: &[&str]) -> String {
    let mut c = backup_push_cmd(env, pg);
    c.args(args);
    let o = c.output().unwrap();
    assert!(o.status.success(), "backup-push {args:?}: {}{}", stdout(&o), stderr(&o));
    format!("{}{}", stdout(&o), stderr(&o))
}

#[test]
fn a_chain_of_incrementals_stores_the_changes_and_restores_the_same_data() {
    let env = Env::new(Backend::File);
    let pg = cluster(&env);
    pg.sql("CREATE TABLE big (id int PRIMARY KEY, v text); INSERT INTO big SELECT g, md5(g::text) || repeat('x', 200) FROM generate_series(1, 60000) g");
    pg.sql("CREATE TABLE small AS SELECT g FROM generate_series(1, 100) g");
    push(&env, &pg, &["--name", "full"]);

    // A few % of the big table's blocks change, a table appears.
    pg.sql("UPDATE big SET v = 'changed' WHERE id BETWEEN 1000 AND 1500");
    pg.sql("CREATE TABLE fresh AS SELECT g FROM generate_series(1, 1000) g");
    // Read at 2 MiB/s at most: the backup cannot end before what it read allows.
    let started = std::time::Instant::now();
    let out = push(&env, &pg, &["--incremental", "--name", "inc1", "--max-rate", "2MiB/s"]);
    let took = started.elapsed();
    assert!(out.contains("incremental on"), "{out}");
    let shown: serde_json::Value =
        serde_json::from_str(&stdout(&env.walnut(&["--json", "backup-show", "inc1"]))).unwrap();
    let read: u64 = shown["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| match f["blocks"]["stored"].as_str() {
            Some(r) => r.parse::<walnut_core::backup::BlockRanges>().unwrap().count() * 8192,
            None => f["size"].as_u64().unwrap(),
        })
        .sum();
    assert!(read > 2 << 20, "enough read to see the bound: {read}");
    assert!(
        took.as_secs_f64() >= read as f64 / (2 << 20) as f64 * 0.95,
        "read {read} bytes in {took:?} at 2 MiB/s at most"
    );
    pg.sql("DELETE FROM big WHERE id > 59000; INSERT INTO small SELECT g FROM generate_series(101, 200) g");
    pg.sql("VACUUM big");
    push(&env, &pg, &["--incremental", "--name", "inc2"]);

    let list = backups(&env);
    assert_eq!(list.len(), 3, "{list:?}");
    let (full, inc1, inc2) = (&list[0], &list[1], &list[2]);
    assert_eq!(
        (full["type"].as_str(), inc1["type"].as_str(), inc2["type"].as_str()),
        (Some("full"), Some("incremental"), Some("incremental"))
    );
    assert_eq!(inc1["parent"], full["id"]);
    assert_eq!(inc2["parent"], inc1["id"]);
    assert_eq!(inc2["chain"], serde_json::json!([full["id"], inc1["id"]]));
    let stored = |b: &serde_json::Value| b["stored_bytes"].as_u64().unwrap();
    let show = stdout(&env.walnut(&["backup-show", "inc1"]));
    assert!(
        stored(inc1) * 4 < stored(full),
        "an incremental stores far less: {} vs {}\n{show}",
        stored(inc1),
        stored(full)
    );
    assert_eq!(inc2["chain_stored_bytes"].as_u64(), Some(stored(full) + stored(inc1) + stored(inc2)));
    let o = env.walnut(&["backup-list", "--detail"]);
    let text = stdout(&o);
    assert!(text.contains("CHAIN STORED") && text.contains("incremental"), "{text}");
    assert!(
        text.contains("a restore to the latest point replays") && text.contains(inc2["id"].as_str().unwrap()),
        "{text}"
    );
    let o = env.walnut(&["backup-show", "inc2"]);
    assert!(o.status.success() && stdout(&o).contains("incremental on"), "{}", stdout(&o));

    // The source goes idle; its archive catches up: the restored chain holds the same data.
    let (_d, r) = restores_like_the_source(&env, &pg, "chain", &["--backup", "inc2"], None);
    drop(r);

    // backup-fetch rebuilds the same files, with a backup_manifest pg_verifybackup accepts.
    let (_f, fetched) = restore_dir("fetched");
    let o = env.walnut(&["backup-fetch", fetched.to_str().unwrap(), "inc2"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let v = Command::new(walnut_testkit::pg::bindir().join("pg_verifybackup"))
        .args(["--no-parse-wal"])
        .arg(&fetched)
        .output()
        .unwrap();
    assert!(v.status.success(), "pg_verifybackup: {}{}", stdout(&v), stderr(&v));

    // Retention keeps the chain of a kept incremental, and says why.
    let o = env.walnut(&["--json", "delete", "retain", "1"]);
    let plan: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let reason = |id: &serde_json::Value| {
        plan["backups"].as_array().unwrap().iter().find(|d| &d["id"] == id).unwrap()["reason"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(reason(&full["id"]).contains("needed by incremental backup"), "{plan}");
    assert!(reason(&inc1["id"]).contains("needed by incremental backup"), "{plan}");

    // A flipped byte in a chain member's part: verify gives the incremental no verdict of
    // restorable and names the object; a restore of it refuses, naming it too.
    let o = env.walnut(&["verify", "--backup", "inc2"]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let full_dir = env.dir.path().join("repo/backups").join(full["id"].as_str().unwrap()).join("data");
    let part = std::fs::read_dir(&full_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let part_name = part.file_name().unwrap().to_string_lossy().into_owned();
    let mut bytes = std::fs::read(&part).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 1;
    std::fs::write(&part, &bytes).unwrap();
    let o = env.walnut(&["verify", "--backup", "inc2"]);
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(!o.status.success() && all.contains("not restorable") && all.contains(&part_name), "{all}");
    let (_c, corrupt_dest) = restore_dir("corrupt-chain");
    let o = env.walnut(&["restore", corrupt_dest.to_str().unwrap(), "--backup", "inc2"]);
    assert!(!o.status.success() && stderr(&o).contains(&part_name), "{}", stderr(&o));
    drop(pg);
}

/// A page damaged on the source's disk before the full backup read it (a backup stores what it
/// reads), in a file the incremental holds as blocks over the full's copy: restoring the chain
/// checks every page an older member writes against its PostgreSQL checksum, and refuses,
/// naming the member's part, the file and the block.
#[test]
fn a_damaged_page_from_an_older_chain_member_is_refused_at_restore() {
    let env = Env::new(Backend::File);
    let mut pg = cluster(&env);
    pg.sql(
        "CREATE TABLE victim WITH (autovacuum_enabled = false) AS SELECT g, md5(g::text) AS v \
         FROM generate_series(1, 2000) g; CREATE TABLE other (id int)",
    );
    let file = pg.sql("SELECT pg_relation_filepath('victim')").trim().to_string();
    pg.sql("CHECKPOINT");
    pg.stop("fast");
    let control = walnut_pg::control::ControlFile::parse(&std::fs::read(pg.pgdata.join("global/pg_control")).unwrap());
    assert_eq!(control.unwrap().data_checksum_version, 1, "pg_control says the pages carry checksums");
    let path = pg.pgdata.join(&file);
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 3 * 8192, "victim spans several pages");
    bytes[8192 + 6000] ^= 0xff;
    std::fs::write(&path, &bytes).unwrap();
    pg.pg_ctl_start();
    push(&env, &pg, &["--name", "full"]);
    pg.sql("INSERT INTO other SELECT generate_series(1, 1000)");
    push(&env, &pg, &["--incremental", "--name", "inc"]);
    let shown: serde_json::Value =
        serde_json::from_str(&stdout(&env.walnut(&["--json", "backup-show", "inc"]))).unwrap();
    let entry = shown["files"].as_array().unwrap().iter().find(|f| f["path"] == file.as_str()).unwrap().clone();
    assert!(entry["blocks"].is_object(), "the incremental holds {file} as blocks: {entry}");
    let full_id = backups(&env)[0]["id"].as_str().unwrap().to_string();
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, WAIT);

    let (_d, dest) = restore_dir("damaged-page");
    let o = env.walnut(&["restore", dest.to_str().unwrap(), "--backup", "inc"]);
    let e = stderr(&o);
    assert!(!o.status.success(), "restored a damaged page: {}{e}", stdout(&o));
    assert!(
        e.contains(&format!("backups/{full_id}/"))
            && e.contains(&file)
            && e.contains("block 1 ")
            && e.contains("page checksum"),
        "{e}"
    );
    drop(pg);
}

/// A full and an incremental backup taken on a streaming standby (the primary's own archive
/// holds the WAL; it completes segments by archive_timeout): the chain restores to the
/// primary's data.
#[test]
fn backups_taken_on_a_standby_restore_the_primarys_data() {
    let env = Env::new(Backend::File);
    let primary = PgCluster::start(PgOptions {
        archive_command: Some(env.archive_command()),
        data_checksums: true,
        extra_conf: "archive_timeout = '1s'\n".into(),
        ..Default::default()
    });
    primary.sql("CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 20000) g");
    let standby = PgCluster::standby_of(&primary, "");
    let replayed = |standby: &PgCluster, n: &str| {
        let o = standby.psql("SELECT count(*) FROM t");
        o.status.success() && stdout(&o).trim() == n
    };
    PgCluster::wait_for("the standby to replay t", WAIT, || replayed(&standby, "20000"));
    assert_eq!(standby.sql("SELECT pg_is_in_recovery()").trim(), "t");

    push(&env, &standby, &["--name", "on-standby"]);
    primary.sql(
        "UPDATE t SET h = 'changed' WHERE g <= 300; INSERT INTO t SELECT g, 'new' FROM generate_series(20001, 20500) g",
    );
    PgCluster::wait_for("the standby to replay the change", WAIT, || replayed(&standby, "20500"));
    let out = push(&env, &standby, &["--incremental"]);
    assert!(out.contains("incremental on"), "{out}");

    restores_like_the_source(&env, &primary, "from-standby", &[], None);
}

/// psql against database `db` of the server on `port`.
fn sql_in(port: u16, db: &str, sql: &str) -> String {
    let o = Command::new(walnut_testkit::pg::bindir().join("psql"))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres", "-d", db])
        .arg("-p")
        .arg(port.to_string())
        .arg("-c")
        .arg(sql)
        .output()
        .unwrap();
    assert!(o.status.success(), "psql -d {db} {sql:?}: {}", stderr(&o));
    stdout(&o).trim().to_string()
}

/// Every kind of change an incremental backup must get right, between a full backup and two
/// incrementals: the restored chain holds what the source holds (pg_dumpall, unlogged tables
/// empty as after a crash), pg_amcheck finds nothing, pg_checksums --check passes on the
/// stopped cluster, and a fetched copy passes pg_verifybackup.
#[test]
fn every_kind_of_change_restores_from_a_chain_as_the_source_has_it() {
    let env = Env::new(Backend::File);
    // 1 MiB segments: the changes span dozens of segment boundaries, most crossed by a record.
    let pg = cluster_with(&env, 1);
    let ts = walnut_testkit::shared_tempdir("walnut-incr-ts-");
    walnut_testkit::pg::give_to_postgres_user(ts.path());
    for s in [
        "CREATE TABLE a (id int PRIMARY KEY, v text, w int)".to_string(),
        "INSERT INTO a SELECT g, md5(g::text), g % 97 FROM generate_series(1, 40000) g".into(),
        "CREATE TABLE vac (id int, pad text); INSERT INTO vac SELECT g, repeat('p', 300) FROM generate_series(1, 5000) g".into(),
        "CREATE TABLE quiet AS SELECT g, repeat('q', 200) AS pad FROM generate_series(1, 20000) g".into(),
        "VACUUM FREEZE quiet".into(),
        "CREATE TABLE full_me AS SELECT g, md5(g::text) AS h FROM generate_series(1, 5000) g".into(),
        "CREATE TABLE clus (id int PRIMARY KEY, h text); INSERT INTO clus SELECT g, md5(g::text) FROM generate_series(5000, 1, -1) g".into(),
        "CREATE TABLE trunc_me AS SELECT g FROM generate_series(1, 5000) g".into(),
        "CREATE TABLE drop_me AS SELECT g FROM generate_series(1, 5000) g".into(),
        "CREATE TABLE moved AS SELECT g, md5(g::text) AS h FROM generate_series(1, 3000) g".into(),
        "CREATE UNLOGGED TABLE u AS SELECT g FROM generate_series(1, 1000) g".into(),
        "CREATE SEQUENCE s".into(),
        "CREATE DATABASE gone".into(),
        format!("CREATE TABLESPACE ts LOCATION '{}'", ts.path().display()),
    ] {
        pg.sql(&s);
    }
    sql_in(pg.port, "gone", "CREATE TABLE g AS SELECT generate_series(1, 100) g");
    push(&env, &pg, &["--name", "full"]);

    for s in [
        "UPDATE a SET v = 'u1' WHERE id BETWEEN 100 AND 400",
        "UPDATE quiet SET pad = 'changed' WHERE g BETWEEN 1000 AND 1050",
        "DELETE FROM a WHERE id BETWEEN 30000 AND 30100",
        "INSERT INTO a SELECT g, 'new', 1 FROM generate_series(40001, 41000) g",
        "DELETE FROM vac WHERE id > 200",
        "VACUUM vac",
        "VACUUM FULL full_me",
        "CLUSTER clus USING clus_pkey",
        "TRUNCATE trunc_me",
        "INSERT INTO trunc_me SELECT generate_series(1, 10)",
        "CREATE INDEX a_v ON a (v)",
        "CREATE INDEX CONCURRENTLY a_w ON a (w)",
        "DROP TABLE drop_me",
        "CREATE DATABASE copied STRATEGY FILE_COPY",
        "CREATE DATABASE logged STRATEGY WAL_LOG",
        "DROP DATABASE gone",
        "ALTER TABLE moved SET TABLESPACE ts",
        "INSERT INTO u SELECT generate_series(1, 1000)",
        "SELECT nextval('s') FROM generate_series(1, 50)",
    ] {
        pg.sql(s);
    }
    sql_in(pg.port, "copied", "CREATE TABLE c AS SELECT generate_series(1, 500) c");
    sql_in(pg.port, "logged", "CREATE TABLE l AS SELECT generate_series(1, 500) l");
    push(&env, &pg, &["--incremental", "--name", "inc1"]);

    for s in [
        "UPDATE a SET v = 'u2' WHERE id BETWEEN 20000 AND 20100",
        "ALTER TABLE moved SET TABLESPACE pg_default",
        "UPDATE moved SET h = 'back' WHERE g < 10",
        "VACUUM a",
        "SELECT nextval('s') FROM generate_series(1, 50)",
    ] {
        pg.sql(s);
    }
    sql_in(pg.port, "copied", "INSERT INTO c SELECT generate_series(501, 600)");
    push(&env, &pg, &["--incremental", "--name", "inc2"]);
    let show = stdout(&env.walnut(&["backup-show", "inc1"]));
    assert!(show.contains("not in the parent backup") && show.contains("the relation is unlogged"), "{show}");
    // The stored maps tile the WAL across every boundary: nothing is unknown, and a table with a
    // few rows changed is stored as its changed blocks (`a` is whole: its first scan after the
    // load set hint bits, which checksums log as a page image of every block).
    assert!(!show.contains("unknown changes"), "{show}");
    let a_path = pg.sql("SELECT pg_relation_filepath('quiet')").trim().to_string();
    let shown: serde_json::Value =
        serde_json::from_str(&stdout(&env.walnut(&["--json", "backup-show", "inc1"]))).unwrap();
    let a = shown["files"].as_array().unwrap().iter().find(|f| f["path"] == a_path.as_str()).unwrap().clone();
    // Every map came stored with the archived WAL, tails included (even where a checkpoint
    // recycled a segment before the next was pushed); only the segment the backup began in,
    // not archived yet, was decoded from pg_wal.
    let notes = shown["map_notes"].to_string();
    assert!(!notes.contains("tail record") && !notes.contains("archived segment"), "{notes}");
    let stored = a["blocks"]["stored"].as_str().unwrap_or_else(|| panic!("{a_path} stored whole: {a}"));
    let n = stored.parse::<walnut_core::backup::BlockRanges>().unwrap().count();
    assert!(n > 0 && n * 8192 < a["size"].as_u64().unwrap() / 2, "{a_path}: {n} blocks of {}", a["size"]);

    let (_t, ts_dest) = restore_dir("every-change-ts");
    let map = format!("ts={}", ts_dest.display());
    let (from, to) = (ts.path().display().to_string(), ts_dest.display().to_string());
    let args = ["--backup", "inc2", "--tablespace-map", map.as_str()];
    let (_d, r) = restores_like_the_source(&env, &pg, "every-change", &args, Some((&from, &to)));
    let dest = r.pgdata.clone();
    assert_eq!(r.sql("SELECT count(*) FROM u"), "0", "an unlogged table comes back empty");
    let amcheck = walnut_testkit::pg::as_postgres(&walnut_testkit::pg::bindir().join("pg_amcheck"))
        .args(["--all", "--install-missing", "--heapallindexed", "-h", "127.0.0.1", "-U", "postgres"])
        .arg("-p")
        .arg(r.port.to_string())
        .output()
        .unwrap();
    assert!(amcheck.status.success(), "pg_amcheck: {}{}", stdout(&amcheck), stderr(&amcheck));
    let stop = walnut_testkit::pg::as_postgres(&walnut_testkit::pg::bindir().join("pg_ctl"))
        .arg("-D")
        .arg(&dest)
        .args(["-m", "fast", "-w", "stop"])
        .output()
        .unwrap();
    assert!(stop.status.success(), "{}", stderr(&stop));
    let checksums = walnut_testkit::pg::as_postgres(&walnut_testkit::pg::bindir().join("pg_checksums"))
        .arg("--check")
        .arg("-D")
        .arg(&dest)
        .output()
        .unwrap();
    assert!(checksums.status.success(), "pg_checksums --check: {}{}", stdout(&checksums), stderr(&checksums));
    drop(r);
}

/// What the block maps cannot vouch for: a segment stored without its map is decoded from the
/// archive (and the backup says so); a segment neither archived nor in pg_wal makes the map
/// unknown, so every relation file is stored whole, with that reason, and the backup restores.
#[test]
fn missing_block_maps_are_rebuilt_or_make_files_whole_and_say_so() {
    let env = Env::new(Backend::File);
    let pg = cluster(&env);
    pg.sql("CREATE TABLE t AS SELECT g, md5(g::text) AS h FROM generate_series(1, 30000) g");
    push(&env, &pg, &["--name", "full"]);

    // A segment archived without its map (as an older walnut stored them).
    pg.sql("UPDATE t SET h = 'a' WHERE g <= 100");
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, WAIT);
    let path = env.object_path(&wal_key(&seg));
    let d = walnut_core::envelope::decode(&std::fs::read(&path).unwrap()).unwrap();
    let mut meta = d.meta.clone();
    assert!(meta.as_object_mut().unwrap().remove("blocks").is_some(), "wal-push stores the map: {meta}");
    std::fs::write(&path, walnut_core::envelope::encode(&d.content, &meta, Default::default())).unwrap();
    let out = push(&env, &pg, &["--incremental", "--name", "rebuilt"]);
    assert!(out.contains("block map: 1 archived segment(s) stored without a block map were decoded"), "{out}");
    let list = backups(&env);
    assert!(list[1]["stored_bytes"].as_u64().unwrap() * 4 < list[0]["stored_bytes"].as_u64().unwrap(), "{list:?}");

    // A segment lost from the archive (and recycled from pg_wal by the next checkpoint).
    pg.sql("UPDATE t SET h = 'b' WHERE g <= 100");
    let lost = pg.switch_wal();
    pg.wait_archived(&lost, WAIT);
    std::fs::remove_file(env.object_path(&wal_key(&lost))).unwrap();
    pg.sql("CHECKPOINT");
    push(&env, &pg, &["--incremental", "--name", "blind"]);
    let show = stdout(&env.walnut(&["backup-show", "blind"]));
    assert!(show.contains(&format!("{lost}: neither archived nor in pg_wal")), "{show}");
    assert!(!show.contains("changed block(s)") || show.contains("as 0 changed block(s)"), "{show}");

    // The last incremental restores without the lost segment (it begins after it).
    pg.sql("INSERT INTO t VALUES (0, 'last')");
    restores_like_the_source(&env, &pg, "blind", &["--backup", "blind"], None);
}

/// Two `pg_dumpall` outputs are the same (`what` names the second).
fn assert_same(what: &str, want: &str, got: &str) {
    assert!(got == want, "{what} differs: {}", first_difference(want, got));
}

#[test]
fn an_incremental_on_a_new_timeline_reads_each_timeline_up_to_its_switch() {
    // Timeline 1: a full backup, changes the fork keeps, the fork point, changes it never sees.
    let env = Env::new(Backend::File);
    let mut pg = cluster(&env);
    pg.sql("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v1-' || g FROM generate_series(1, 30000) g");
    push(&env, &pg, &["--name", "full"]);
    pg.sql("UPDATE t SET v = 'tli1-kept' WHERE id <= 2000");
    let fork = pg.sql("SELECT pg_current_wal_lsn()").trim().to_string();
    pg.sql("UPDATE t SET v = 'tli1-lost' WHERE id BETWEEN 20001 AND 22000");
    pg.sql("CREATE TABLE lost AS SELECT g FROM generate_series(1, 500) g");
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, WAIT);
    pg.stop("fast");

    // Timeline 2: the fork, restored to that point and archiving, changes other blocks.
    let (_d, dest) = restore_dir("fork");
    walnut_testkit::pg::give_to_postgres_user(env.dir.path());
    let o = env.walnut(&["restore", dest.to_str().unwrap(), "--target-lsn", &fork, "--archive", "--start"]);
    assert!(o.status.success(), "restore the fork: {}{}", stdout(&o), stderr(&o));
    let r = Restored::from_dir(&dest);
    assert_eq!(r.sql("SELECT timeline_id FROM pg_control_checkpoint()"), "2");
    assert_eq!(r.sql("SELECT count(*) FROM t WHERE v = 'tli1-lost'"), "0", "the fork is before those");
    r.sql("UPDATE t SET v = 'tli2' WHERE id BETWEEN 10001 AND 12000; CHECKPOINT");

    // An incremental on timeline 2 whose parent is timeline 1's full backup: the changes it
    // stores are timeline 1's up to the switch and timeline 2's after it.
    let mut c = Command::new(walnut_bin());
    c.arg("--config")
        .arg(&env.config)
        .args(["backup-push", "--pgdata", r.pgdata.to_str().unwrap(), "--incremental", "--name", "inc-tli2"])
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", r.port.to_string())
        .env("PGUSER", "postgres");
    let o = c.output().unwrap();
    assert!(o.status.success(), "backup-push on timeline 2: {}{}", stdout(&o), stderr(&o));
    let inc = backups(&env).into_iter().find(|b| b["name"] == "inc-tli2").expect("listed");
    assert_eq!(inc["type"], "incremental", "{inc}");
    assert_eq!(inc["parent"], backups(&env).iter().find(|b| b["name"] == "full").unwrap()["id"], "{inc}");

    // Restored from the chain to the incremental's consistency point: the fork's data then
    // (nothing was written on it since).
    let want = dumpall(r.port);
    let (_d2, dest2) = restore_dir("chain");
    walnut_testkit::pg::give_to_postgres_user(env.dir.path());
    let o = env.walnut(&["restore", dest2.to_str().unwrap(), "--target-name", "inc-tli2", "--start"]);
    assert!(o.status.success(), "restore the chain: {}{}", stdout(&o), stderr(&o));
    let chain = Restored::from_dir(&dest2);
    assert_same("the chain restored to its consistency point", &want, &dumpall(chain.port));
    assert_eq!(chain.sql("SELECT count(*) FROM t WHERE v = 'tli2'"), "2000");
    assert_eq!(chain.sql("SELECT count(*) FROM t WHERE v = 'tli1-kept'"), "2000");
    assert_eq!(chain.sql("SELECT count(*) FROM pg_class WHERE relname = 'lost'"), "0");
    drop(chain);

    // To the end of the archive: the fork's own recovery target (its postgresql.auto.conf is in
    // the backup) does not stop this recovery.
    r.sql("CREATE TABLE after_backup AS SELECT 1 AS x");
    let seg = r.sql("SELECT pg_walfile_name(pg_switch_wal())");
    PgCluster::wait_for("timeline 2 archived", WAIT, || env.dir.path().join("repo/wal/00000002").join(&seg).exists());
    let (_d3, dest3) = restore_dir("latest");
    walnut_testkit::pg::give_to_postgres_user(env.dir.path());
    let o = env.walnut(&["restore", dest3.to_str().unwrap(), "--start"]);
    assert!(o.status.success(), "restore the latest: {}{}", stdout(&o), stderr(&o));
    let latest = Restored::from_dir(&dest3);
    assert_eq!(latest.sql("SELECT count(*) FROM after_backup"), "1");
    assert_same("the latest restore", &dumpall(r.port), &dumpall(latest.port));
}
