//! Logical backups against a real PostgreSQL 15: `walnut logical capture|list|show|delete|
//! restore|copy|download`, `capture --at` from the archive, cancellation, refusals and bad input.
//! Dumps are compared by `pg_dump` of the source and of the target.

mod common;

use common::*;
use std::io::{BufRead, Write};
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use walnut_testkit::PgCluster;
use walnut_testkit::pg::PgOptions;

const WAIT: Duration = Duration::from_secs(60);

/// walnut with this environment's config, connecting to `pg` through the libpq variables.
fn walnut(env: &Env, pg: &PgCluster, args: &[&str]) -> Output {
    Command::new(walnut_bin())
        .arg("--config")
        .arg(&env.config)
        .args(args)
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", pg.port.to_string())
        .env("PGUSER", "postgres")
        .output()
        .expect("run walnut")
}

fn ok(o: &Output) -> String {
    assert!(o.status.success(), "walnut failed:\n{}\n{}", stdout(o), stderr(o));
    stdout(o)
}

/// A failure's message: exactly one ERROR line (progress lines may precede it), returned.
fn one_line_error(o: &Output) -> String {
    assert!(!o.status.success(), "expected a failure:\n{}", stdout(o));
    let text = stderr(o);
    let errors: Vec<&str> = text.lines().filter(|l| l.contains(" ERROR ")).collect();
    assert_eq!(errors.len(), 1, "one error line: {text}");
    errors[0].to_string()
}

fn url(pg: &PgCluster, db: &str) -> String {
    format!("postgresql://postgres@127.0.0.1:{}/{db}", pg.port)
}

fn sql_in(pg: &PgCluster, db: &str, sql: &str) -> String {
    let o = Command::new(pg.bindir.join("psql"))
        .args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres", "-d", db])
        .arg("-p")
        .arg(pg.port.to_string())
        .arg("-c")
        .arg(sql)
        .output()
        .unwrap();
    assert!(o.status.success(), "psql -d {db} {sql:?}: {}", stderr(&o));
    stdout(&o).trim().to_string()
}

/// `pg_dump` of a database as plain SQL, without the random `\restrict` keys of 15.20.
fn dump_sql(pg: &PgCluster, db: &str) -> String {
    let o = Command::new(pg.bindir.join("pg_dump"))
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", db])
        .arg("-p")
        .arg(pg.port.to_string())
        .output()
        .unwrap();
    assert!(o.status.success(), "pg_dump {db}: {}", stderr(&o));
    stdout(&o)
        .lines()
        .filter(|l| !l.starts_with("\\restrict") && !l.starts_with("\\unrestrict"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn list(env: &Env, pg: &PgCluster) -> Vec<serde_json::Value> {
    serde_json::from_str(&ok(&walnut(env, pg, &["--json", "logical", "list"]))).unwrap()
}

fn by_name<'a>(all: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    all.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no capture {name}: {all:?}"))
}

/// A database with what dumps must carry across: schemas (one with a non-ASCII name), serial
/// and standalone sequences, a partitioned table, views, a materialized view, functions in
/// SQL and PL/pgSQL, a trigger, extensions shipped with PostgreSQL (in public and in another
/// schema), large objects, non-ASCII data, comments, a role with privileges and an owner.
const SHOP: &str = r#"
CREATE EXTENSION citext;
CREATE SCHEMA sales;
CREATE EXTENSION pg_trgm SCHEMA sales;
CREATE SCHEMA "Ünïcødé";
CREATE TABLE customers (id serial PRIMARY KEY, name text NOT NULL, email citext UNIQUE);
COMMENT ON TABLE customers IS 'Kunden – Grüße 日本語';
CREATE SEQUENCE sales.invoice_no START 1000 INCREMENT 7;
SELECT setval('sales.invoice_no', 1777);
CREATE TABLE sales.orders (id bigserial, customer int REFERENCES customers(id), total numeric(10,2),
    placed date NOT NULL, note text, PRIMARY KEY (id, placed)) PARTITION BY RANGE (placed);
CREATE TABLE sales.orders_2025 PARTITION OF sales.orders FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE sales.orders_2026 PARTITION OF sales.orders FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
CREATE INDEX ON sales.orders (customer);
CREATE INDEX customers_name_trgm ON customers USING gin (name sales.gin_trgm_ops);
CREATE TABLE "Ünïcødé"."Tabellé" ("naïve" text, "ключ" int);
INSERT INTO "Ünïcødé"."Tabellé" VALUES ('crème brûlée', 1), ('日本語テキスト', 2), ('emoji 🦀🐘', 3), (NULL, 4);
INSERT INTO customers (name, email) SELECT 'Kunde ' || g || ' Zoë', 'k' || g || '@Example.COM' FROM generate_series(1, 500) g;
INSERT INTO sales.orders (customer, total, placed, note)
    SELECT 1 + g % 500, g * 1.25, date '2025-06-01' + (g % 400), repeat('ø', g % 17) FROM generate_series(1, 3000) g;
CREATE VIEW sales.big_orders AS SELECT * FROM sales.orders WHERE total > 1000;
CREATE MATERIALIZED VIEW sales.per_customer AS SELECT customer, count(*) n, sum(total) s FROM sales.orders GROUP BY customer;
CREATE FUNCTION sales.add_tax(numeric) RETURNS numeric LANGUAGE sql IMMUTABLE AS 'SELECT $1 * 1.19';
CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.name := trim(NEW.name); RETURN NEW; END $$;
CREATE TRIGGER customers_touch BEFORE INSERT OR UPDATE ON customers FOR EACH ROW EXECUTE FUNCTION touch();
CREATE ROLE reporter;
GRANT USAGE ON SCHEMA sales TO reporter;
GRANT SELECT ON sales.big_orders TO reporter;
CREATE TABLE audit (at timestamptz DEFAULT now(), what text);
ALTER TABLE audit OWNER TO reporter;
SELECT lo_from_bytea(0, convert_to('large object: Größe', 'UTF8'));
SELECT lo_from_bytea(0, decode(repeat('00ff', 40000), 'hex'));
"#;

#[test]
fn round_trip_of_a_rich_database_and_a_second_one_restore_copy_download() {
    let env = Env::new(Backend::File);
    let pg = env.cluster();
    pg.sql("CREATE DATABASE shop");
    sql_in(&pg, "shop", SHOP);
    pg.sql("CREATE DATABASE analytics");
    sql_in(
        &pg,
        "analytics",
        "CREATE TABLE visits (id int, page text); INSERT INTO visits SELECT g, 'séite ' || g FROM generate_series(1, 2000) g; CREATE VIEW v AS SELECT count(*) FROM visits",
    );

    let o = ok(&walnut(&env, &pg, &["logical", "capture", "--database", "shop", "--name", "shop1"]));
    assert!(o.contains("DONE") && o.contains("shop"), "{o}");
    let o = ok(&walnut(&env, &pg, &["logical", "capture", "--all", "--name", "everything"]));
    assert!(o.contains("DONE"), "{o}");
    let all = list(&env, &pg);
    let shop1 = by_name(&all, "shop1");
    assert_eq!(
        (shop1["status"].as_str(), shop1["database"].as_str(), shop1["source"].as_str()),
        (Some("DONE"), Some("shop"), Some("server"))
    );
    assert!(shop1["size"].as_u64().unwrap() > 0 && shop1["end_time"].is_string(), "{shop1}");
    assert_eq!(shop1["tables"], 5, "customers, the 2 partitions of orders, Tabellé, audit: {shop1}");
    let everything = by_name(&all, "everything");
    let dbs: Vec<&str> = everything["databases"].as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
    assert_eq!(dbs, ["analytics", "postgres", "shop"], "{everything}");
    assert_eq!(everything["database"], "all (3 databases)");
    let text = ok(&walnut(&env, &pg, &["logical", "list"]));
    let header = text.lines().next().unwrap();
    for col in ["ID", "NAME", "DATABASE", "SOURCE", "SIZE", "STATUS", "END TIME"] {
        assert!(header.contains(col), "{header}");
    }
    let shown = ok(&walnut(&env, &pg, &["logical", "show", "shop1"]));
    assert!(shown.contains("pg_dump (PostgreSQL) 15") && shown.contains("logical/"), "{shown}");

    // Restore into empty databases: pg_dump of source and target compare equal.
    // shop's data is in several tables alike: a file first, for pg_restore --jobs 2.
    pg.sql("CREATE DATABASE shop_copy");
    let o = ok(&walnut(
        &env,
        &pg,
        &["--json", "logical", "restore", "shop1", "--to", &url(&pg, "shop_copy"), "--jobs", "2"],
    ));
    let done: serde_json::Value = serde_json::from_str(&o).unwrap();
    assert_eq!(done["streamed"], false, "{done}");
    assert_eq!(dump_sql(&pg, "shop_copy"), dump_sql(&pg, "shop"), "the restored database dumps as the source");
    assert_eq!(
        sql_in(&pg, "shop_copy", "SELECT \"naïve\" FROM \"Ünïcødé\".\"Tabellé\" WHERE \"ключ\" = 3"),
        "emoji 🦀🐘"
    );
    // analytics has one table: restored as it downloads, with --jobs 2 all the same.
    pg.sql("CREATE DATABASE analytics_copy");
    let o = ok(&walnut(
        &env,
        &pg,
        &["--json", "logical", "restore", "everything", "--database", "analytics", "--to", &url(&pg, "analytics_copy")],
    ));
    let done: serde_json::Value = serde_json::from_str(&o).unwrap();
    assert_eq!((&done["streamed"], &done["tables"]), (&serde_json::json!(true), &serde_json::json!(1)), "{done}");
    assert_eq!(dump_sql(&pg, "analytics_copy"), dump_sql(&pg, "analytics"));
    // An --all capture names its databases when none is chosen.
    let e =
        one_line_error(&walnut(&env, &pg, &["logical", "restore", "everything", "--to", &url(&pg, "analytics_copy")]));
    assert!(e.contains("--database") && e.contains("analytics, postgres, shop"), "{e}");

    // A non-empty target is emptied only with --confirm (here: a changed copy).
    sql_in(
        &pg,
        "shop_copy",
        "DROP TABLE audit; CREATE SCHEMA extra; CREATE TABLE extra.x (i int); SELECT lo_from_bytea(0, 'x')",
    );
    ok(&walnut(
        &env,
        &pg,
        &["logical", "restore", "LATEST", "--database", "shop", "--to", &url(&pg, "shop_copy"), "--confirm"],
    ));
    assert_eq!(dump_sql(&pg, "shop_copy"), dump_sql(&pg, "shop"), "emptied and restored again");

    // Copy: pg_dump | pg_restore, with the closing line of the index phase.
    pg.sql("CREATE DATABASE shop_copy2");
    let o = walnut(&env, &pg, &["logical", "copy", &url(&pg, "shop"), &url(&pg, "shop_copy2")]);
    let out = ok(&o);
    assert!(out.contains("copied") && out.contains("shop_copy2"), "{out}");
    assert!(stderr(&o).contains("building indexes and constraints"), "the index phase is announced: {}", stderr(&o));
    assert_eq!(dump_sql(&pg, "shop_copy2"), dump_sql(&pg, "shop"));

    // Download: a plain custom-format file pg_restore reads; the globals of --all as SQL.
    let file = env.dir.path().join("shop.dump");
    ok(&walnut(&env, &pg, &["logical", "download", "shop1", file.to_str().unwrap()]));
    assert!(std::fs::read(&file).unwrap().starts_with(b"PGDMP"));
    let listed = Command::new(pg.bindir.join("pg_restore")).arg("--list").arg(&file).output().unwrap();
    assert!(listed.status.success() && stdout(&listed).contains("TABLE DATA sales orders_2026"), "{}", stderr(&listed));
    // It is the file `pg_dump -f` writes, but for the creation time in its header: the data
    // offsets a dump streamed through a pipe lacks are filled in (pg_restore --jobs needs them
    // to find each table's data without reading through the others).
    let reference = env.dir.path().join("shop.ref.dump");
    let o = Command::new(pg.bindir.join("pg_dump"))
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "shop", "--format=custom", "--compress=0", "-f"])
        .arg(&reference)
        .arg("-p")
        .arg(pg.port.to_string())
        .output()
        .unwrap();
    assert!(o.status.success(), "pg_dump -f: {}", stderr(&o));
    let (got, want) = (std::fs::read(&file).unwrap(), std::fs::read(&reference).unwrap());
    assert_eq!(got.len(), want.len(), "the same dump");
    let differ: Vec<usize> = (0..got.len()).filter(|&i| got[i] != want[i]).collect();
    // The header: PGDMP, 6 bytes, the compression (5 bytes), then the creation time (7 x 5 bytes).
    assert!(differ.iter().all(|i| (16..51).contains(i)), "bytes differing outside the creation time: {differ:?}");
    let globals = env.dir.path().join("globals.sql");
    ok(&walnut(&env, &pg, &["logical", "download", "everything", "--globals", globals.to_str().unwrap()]));
    assert!(std::fs::read_to_string(&globals).unwrap().contains("CREATE ROLE reporter"));
    // A downloaded file restores by path, like a URL.
    pg.sql("CREATE DATABASE shop_file");
    ok(&walnut(&env, &pg, &["logical", "restore", file.to_str().unwrap(), "--to", &url(&pg, "shop_file")]));
    assert_eq!(dump_sql(&pg, "shop_file"), dump_sql(&pg, "shop"));
    // A dump pg_dump wrote to a pipe (no data offsets), served over HTTP: downloaded, restored.
    let piped = Command::new(pg.bindir.join("pg_dump"))
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "shop", "--format=custom"])
        .arg("-p")
        .arg(pg.port.to_string())
        .output()
        .unwrap();
    assert!(piped.status.success() && piped.stdout.starts_with(b"PGDMP"), "{}", stderr(&piped));
    let server = TextServer::start(piped.stdout);
    pg.sql("CREATE DATABASE shop_url");
    ok(&walnut(
        &env,
        &pg,
        &["logical", "restore", &server.url("shop.dump"), "--to", &url(&pg, "shop_url"), "--jobs", "2"],
    ));
    assert_eq!(dump_sql(&pg, "shop_url"), dump_sql(&pg, "shop"));

    // Delete: gone from the listing and the repository.
    ok(&walnut(&env, &pg, &["logical", "delete", "shop1"]));
    assert!(list(&env, &pg).iter().all(|c| c["name"] != "shop1"));
    let everything_id = everything["id"].as_str().unwrap();
    let left = walk(&env.dir.path().join("repo/logical"));
    assert!(
        !left.is_empty() && left.iter().all(|f| f.starts_with(everything_id)),
        "only the --all capture is left: {left:?}"
    );
}

#[test]
fn encrypted_captures_list_without_the_key_and_restore_with_it() {
    let key = Command::new(walnut_bin()).arg("age-keygen").output().unwrap();
    let text = stdout(&key);
    let public = text.lines().next().unwrap().trim_start_matches("# public key: ").to_string();
    let dir = walnut_testkit::shared_tempdir("walnut-age-");
    let identity = dir.path().join("age.key");
    std::fs::write(&identity, &text).unwrap();
    let mut env = Env::with_extra(
        Backend::File,
        &format!("[encryption]\nrecipients = [\"{public}\"]\nidentity_file = \"{}\"", identity.display()),
    );
    let pg = env.cluster();
    pg.sql("CREATE TABLE secret AS SELECT g, 'geheim ' || g AS s FROM generate_series(1, 1000) g");
    ok(&walnut(&env, &pg, &["logical", "capture", "--database", "postgres", "--name", "enc"]));
    let dump = std::fs::read(
        env.dir.path().join("repo/logical").read_dir().unwrap().next().unwrap().unwrap().path().join("data/0001.dump"),
    )
    .unwrap();
    assert!(!dump.windows(7).any(|w| w == b"geheim "), "the stored dump is encrypted");
    pg.sql("CREATE DATABASE back");
    ok(&walnut(&env, &pg, &["logical", "restore", "enc", "--to", &url(&pg, "back")]));
    assert_eq!(dump_sql(&pg, "back"), dump_sql(&pg, "postgres"));
    // A host with the public key only lists and shows the capture; restoring needs the key.
    env.write_config(&format!("[encryption]\nrecipients = [\"{public}\"]"));
    let all = list(&env, &pg);
    assert_eq!(by_name(&all, "enc")["status"], "DONE");
    assert!(ok(&walnut(&env, &pg, &["logical", "show", "enc"])).contains("Database:    postgres"));
    let e = one_line_error(&walnut(
        &env,
        &pg,
        &["logical", "download", "enc", dir.path().join("x.dump").to_str().unwrap()],
    ));
    assert!(e.contains("identity"), "{e}");
}

/// Holds `LOCK TABLE ... IN ACCESS EXCLUSIVE MODE` in an open transaction until dropped.
struct Locker(std::process::Child);

impl Locker {
    fn new(pg: &PgCluster, table: &str) -> Locker {
        let mut c = Command::new(pg.bindir.join("psql"))
            .args(["-X", "-A", "-t", "-q", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
            .arg("-p")
            .arg(pg.port.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(c.stdin.as_mut().unwrap(), "BEGIN; LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE; SELECT 'locked';")
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(c.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "locked");
        Locker(c)
    }
}

impl Drop for Locker {
    fn drop(&mut self) {
        let _ = writeln!(self.0.stdin.as_mut().unwrap(), "COMMIT;");
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

/// `pg_dump` processes connected to `pg` (other tests dump other clusters at the same time).
fn pg_dumps_of(pg: &PgCluster) -> usize {
    let port = format!("PGPORT={}", pg.port);
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "pg_dump"))
        .filter(|e| {
            std::fs::read(e.path().join("environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == port.as_bytes()))
        })
        .count()
}

#[test]
fn cancel_refusals_corruption_and_bad_input() {
    let env = Env::new(Backend::File);
    let pg = env.cluster();
    pg.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 5000) g");

    // Cancel mid-capture: pg_dump waits on a lock; SIGTERM ends the capture FAILED, with no
    // pg_dump left and its session ended on the server (while the lock is still held).
    let locker = Locker::new(&pg, "t");
    let child = Command::new(walnut_bin())
        .arg("--config")
        .arg(&env.config)
        .args(["logical", "capture", "--database", "postgres", "--name", "cancelled"])
        .env("PGHOST", "127.0.0.1")
        .env("PGPORT", pg.port.to_string())
        .env("PGUSER", "postgres")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'walnut logical capture%'";
    PgCluster::wait_for("pg_dump to wait on the lock", WAIT, || {
        pg.sql(&format!("{waiting} AND wait_event_type = 'Lock'")).trim() == "1"
    });
    let all = list(&env, &pg);
    assert_eq!(all.len(), 1);
    assert_eq!(all[0]["status"], "RUNNING", "{all:?}");
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "a cancelled capture fails");
    assert!(stderr(&out).contains("asked to stop"), "{}", stderr(&out));
    PgCluster::wait_for("the capture's session to end", WAIT, || pg.sql(waiting).trim() == "0");
    let all = list(&env, &pg);
    assert_eq!(all[0]["status"], "FAILED", "never DONE: {all:?}");
    assert!(all[0]["error"].as_str().unwrap().contains("asked to stop"), "{all:?}");
    let id = all[0]["id"].as_str().unwrap().to_string();
    let kept: Vec<String> = walk(&env.dir.path().join("repo/logical").join(&id));
    assert_eq!(kept, ["running.json"], "nothing of the dump is left");
    assert_eq!(pg_dumps_of(&pg), 0, "no pg_dump left running");
    drop(locker);
    let done = ok(&walnut(&env, &pg, &["logical", "capture", "--database", "postgres", "--name", "good"]));
    assert!(done.contains("DONE"), "{done}");

    // Restore without --confirm into a non-empty database: what would be dropped, a non-zero
    // exit, nothing changed.
    pg.sql("CREATE DATABASE busy");
    sql_in(
        &pg,
        "busy",
        "CREATE TABLE keep_me (x int); INSERT INTO keep_me VALUES (42); CREATE SCHEMA other; CREATE VIEW other.v AS SELECT 1",
    );
    let before = dump_sql(&pg, "busy");
    let o = walnut(&env, &pg, &["logical", "restore", "good", "--to", &url(&pg, "busy")]);
    assert!(!o.status.success());
    assert!(stdout(&o).contains("schema other") && stdout(&o).contains("table keep_me"), "{}", stdout(&o));
    assert!(one_line_error(&o).contains("nothing was changed"));
    assert_eq!(dump_sql(&pg, "busy"), before, "the target is untouched");

    // A corrupt dump object is refused, named, before the target is touched.
    let object = format!("logical/{}/data/0001.dump", by_name(&list(&env, &pg), "good")["id"].as_str().unwrap());
    let path = env.dir.path().join("repo").join(&object);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x20;
    std::fs::write(&path, bytes).unwrap();
    let o = walnut(&env, &pg, &["logical", "restore", "good", "--to", &url(&pg, "busy"), "--confirm"]);
    let e = one_line_error(&o);
    assert!(e.contains(&object) && e.contains("corrupt"), "{e}");
    assert_eq!(dump_sql(&pg, "busy"), before, "nothing was dropped for a corrupt dump");

    // Into an empty database a capture is restored as it downloads: a corrupt one (several MiB,
    // so pg_restore is loading rows when the corruption is found) commits nothing.
    pg.sql(
        "CREATE TABLE big AS SELECT g, md5(g::text) AS h, md5((g * 7)::text) AS k FROM generate_series(1, 100000) g",
    );
    ok(&walnut(&env, &pg, &["logical", "capture", "--database", "postgres", "--name", "big"]));
    pg.sql("DROP TABLE big");
    let object = format!("logical/{}/data/0001.dump", by_name(&list(&env, &pg), "big")["id"].as_str().unwrap());
    let path = env.dir.path().join("repo").join(&object);
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 3 << 20, "a dump of several chunks: {} bytes", bytes.len());
    let at = bytes.len() * 3 / 4;
    bytes[at] ^= 0x20;
    std::fs::write(&path, bytes).unwrap();
    pg.sql("CREATE DATABASE empty_target");
    let o = walnut(&env, &pg, &["logical", "restore", "big", "--to", &url(&pg, "empty_target")]);
    let e = one_line_error(&o);
    assert!(e.contains(&object) && e.contains("corrupt"), "{e}");
    let tables = "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace";
    assert_eq!(sql_in(&pg, "empty_target", tables), "0", "nothing of the corrupt dump was committed");
    PgCluster::wait_for("pg_restore's session to end", WAIT, || {
        pg.sql("SELECT count(*) FROM pg_stat_activity WHERE datname = 'empty_target'").trim() == "0"
    });

    // Bad input, each a clear one-line error.
    let e = one_line_error(&walnut(&env, &pg, &["logical", "capture", "--database", "nosuch"]));
    assert!(e.contains("\"nosuch\" does not exist") && e.contains("postgres"), "{e}");
    let failed: Vec<_> = list(&env, &pg).into_iter().filter(|c| c["status"] == "FAILED").collect();
    assert_eq!(failed.len(), 1, "bad input leaves no record: {failed:?}");
    assert_eq!(failed[0]["name"], "cancelled", "a FAILED capture keeps its name: {failed:?}");
    let e = one_line_error(&walnut(
        &env,
        &pg,
        &["logical", "restore", "good", "--to", "postgresql://postgres:s3cret@127.0.0.1:port/x"],
    ));
    assert!(e.contains("connection string is not valid") && !e.contains("s3cret"), "{e}");
    let e = one_line_error(&walnut(
        &env,
        &pg,
        &["logical", "restore", "good", "--to", "postgresql://postgres:s3cret@127.0.0.1:1/x"],
    ));
    assert!(e.contains("connect to the target") && !e.contains("s3cret"), "{e}");
    let server = TextServer::start("<html>not a dump</html>");
    let e = one_line_error(&walnut(
        &env,
        &pg,
        &["logical", "restore", &server.url("backup.dump"), "--to", &url(&pg, "busy"), "--confirm"],
    ));
    assert!(e.contains("not a PostgreSQL custom-format dump") && e.contains("<html>"), "{e}");
    // A target whose major version has no binaries here: [postgres] bindir holds the client
    // programs of another major version (14), so walnut refuses to restore a PostgreSQL 15 target.
    let fake = env.dir.path().join("bin14");
    std::fs::create_dir_all(&fake).unwrap();
    let script = fake.join("pg_restore");
    std::fs::write(&script, "#!/bin/sh\necho 'pg_restore (PostgreSQL) 14.11'\n").unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut env14 = Env::new(Backend::File);
    env14.repo_url = env.repo_url.clone();
    env14.write_config(&format!("[postgres]\nbindir = \"{}\"", fake.display()));
    let e = one_line_error(&walnut(&env14, &pg, &["logical", "restore", "good", "--to", &url(&pg, "busy")]));
    assert!(e.contains("PostgreSQL 15") && e.contains("is PostgreSQL 14") && e.contains("postgresql-client-15"), "{e}");
    assert_eq!(dump_sql(&pg, "busy"), before);
}

/// Files below `dir`, relative, sorted.
fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// A plain HTTP server on 127.0.0.1 that answers every GET with `body`.
struct TextServer {
    port: u16,
}

impl TextServer {
    fn start(body: impl Into<Vec<u8>>) -> TextServer {
        let body: Vec<u8> = body.into();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { return };
                let mut req = [0u8; 4096];
                let _ = std::io::Read::read(&mut s, &mut req);
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(&body);
            }
        });
        TextServer { port }
    }

    fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/files/{name}", self.port)
    }
}

#[test]
fn capture_at_a_past_point_from_the_archive() {
    let env = Env::new(Backend::File);
    let pg = PgCluster::start(PgOptions {
        archive_command: Some(env.archive_command()),
        extra_conf: "log_connections = on\n".into(),
        ..Default::default()
    });
    pg.sql("CREATE TABLE ledger (id int, what text)");
    pg.sql("INSERT INTO ledger SELECT g, 'before ' || g FROM generate_series(1, 100) g");
    ok(&backup_push(&env, &pg, None));
    pg.sql("INSERT INTO ledger VALUES (101, 'after the backup, before T')");
    let t = pg
        .sql("SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")
        .trim()
        .to_string();
    PgCluster::wait_for("the clock to pass T", WAIT, || {
        pg.sql(&format!("SELECT clock_timestamp() > '{t}'::timestamptz")).trim() == "t"
    });
    pg.sql("INSERT INTO ledger VALUES (102, 'after T')");
    pg.sql("DELETE FROM ledger WHERE id <= 10");
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, WAIT);
    // A positive control: a capture from the server shows in the server's connection log.
    ok(&walnut(&env, &pg, &["logical", "capture", "--database", "postgres", "--name", "now"]));
    let log_before = std::fs::read_to_string(pg.log_path()).unwrap();
    assert!(log_before.contains("application_name=walnut logical capture"), "log_connections names the capture");

    // Deep enough that the fork's socket cannot live below it (unix socket paths hold 107
    // bytes): walnut puts the socket in a private directory of the temporary directory.
    let scratch = env.dir.path().join("d".repeat(70)).join("scratch");
    assert!(scratch.join("at-20260101T000000-12345/sock/.s.PGSQL.5432").as_os_str().len() > 107);
    let o = walnut(
        &env,
        &pg,
        &[
            "logical",
            "capture",
            "--database",
            "postgres",
            "--name",
            "at-t",
            "--at",
            &t,
            "--scratch",
            scratch.to_str().unwrap(),
        ],
    );
    let out = ok(&o);
    assert!(out.contains("DONE") && out.contains(&format!("archive at {t}")), "{out}\n{}", stderr(&o));
    let log_after = std::fs::read_to_string(pg.log_path()).unwrap();
    let new_lines = &log_after[log_before.len()..];
    assert!(
        !new_lines.contains("walnut logical capture") && !new_lines.contains("pg_dump"),
        "the primary saw no dump session:\n{new_lines}"
    );
    assert!(
        walk(&scratch).is_empty() && std::fs::read_dir(&scratch).unwrap().next().is_none(),
        "the scratch directory is emptied"
    );
    let at = by_name(&list(&env, &pg), "at-t").clone();
    let id = at["id"].as_str().unwrap().to_string();
    let left: Vec<String> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("walnut-fork-") && n.ends_with(&id))
        .collect();
    assert!(left.is_empty(), "the fork's socket directory is removed: {left:?}");
    assert_eq!(at["source"], format!("archive at {t}"));
    assert_eq!(at["source_detail"]["kind"], "archive");

    // The capture holds what was committed before T and nothing after.
    pg.sql("CREATE DATABASE past");
    ok(&walnut(&env, &pg, &["logical", "restore", "at-t", "--to", &url(&pg, "past")]));
    assert_eq!(sql_in(&pg, "past", "SELECT count(*), min(id), max(id) FROM ledger"), "101|1|101");
    assert_eq!(sql_in(&pg, "postgres", "SELECT count(*), min(id), max(id) FROM ledger"), "92|11|102");

    // A failure once the fork runs (an unknown database): FAILED, the fork stopped, the
    // scratch directory emptied all the same.
    let o = walnut(
        &env,
        &pg,
        &["logical", "capture", "--database", "nosuch", "--at", &t, "--scratch", scratch.to_str().unwrap()],
    );
    let e = one_line_error(&o);
    assert!(e.contains("\"nosuch\" does not exist"), "{e}");
    assert!(std::fs::read_dir(&scratch).unwrap().next().is_none(), "nothing left after a failure");
    let ps = Command::new("pgrep").args(["-f", &format!("postgres -D {}", scratch.display())]).output().unwrap();
    assert!(stdout(&ps).trim().is_empty(), "no fork server left running");
    // A point outside the archive is refused before anything is restored.
    let e = one_line_error(&walnut(
        &env,
        &pg,
        &["logical", "capture", "--at", "2001-01-01T00:00:00Z", "--scratch", scratch.to_str().unwrap()],
    ));
    assert!(e.contains("earliest"), "{e}");
}

/// The value of a Prometheus sample in the agent's /metrics (0 when absent).
fn metric(port: u16, name: &str) -> f64 {
    let (_, body) = http(port, "GET", "/metrics", "", None);
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

fn captures_of(port: u16) -> Vec<serde_json::Value> {
    let (status, body) = http(port, "GET", "/v1/logical", "", None);
    assert_eq!(status, 200, "{body}");
    json_of(&body).as_array().cloned().unwrap_or_default()
}

/// `[logical] schedule` in the agent: captures come on schedule, retention (keep 1 daily)
/// deletes the older scheduled ones and never an on-demand one; health and metrics say so.
#[test]
fn the_agent_takes_scheduled_captures_and_applies_their_retention() {
    let env = Env::with_extra(
        Backend::File,
        "[logical]\nschedule = \"every 2s\"\ndatabase = \"postgres\"\nkeep_daily = 1\nkeep_weekly = 0\nkeep_monthly = 0\n",
    );
    let pg = env.cluster();
    pg.sql("CREATE TABLE t AS SELECT g, md5(g::text) h FROM generate_series(1, 2000) g");
    let port = walnut_testkit::free_port();
    let _agent = start_agent(&env, &pg, port, None);
    let (_, h) = http(port, "GET", "/v1/health", "", None);
    assert_eq!(json_of(&h)["logical"]["schedule"], "every 2s", "{h}");

    // An on-demand capture between scheduled ones (409 while a scheduled one runs).
    let mut id = String::new();
    PgCluster::wait_for("an on-demand capture to start", WAIT, || {
        let (status, b) = http(port, "POST", "/v1/logical", r#"{"name":"pre-upgrade","database":"postgres"}"#, None);
        assert!(status == 202 || status == 409, "{status} {b}");
        id = json_of(&b)["id"].as_str().unwrap_or_default().to_string();
        status == 202
    });
    PgCluster::wait_for("the on-demand capture to be DONE", WAIT, || {
        let (_, b) = http(port, "GET", &format!("/v1/logical/{id}"), "", None);
        json_of(&b)["status"] == "DONE"
    });

    PgCluster::wait_for("retention to delete two scheduled captures", Duration::from_secs(120), || {
        metric(port, "walnut_logical_retention_deletions_total") >= 2.0
    });
    let taken = metric(port, "walnut_logical_captures_total");
    assert!(taken >= 4.0, "three scheduled captures and the on-demand one: {taken}");
    let all = captures_of(port);
    let scheduled_done: Vec<&serde_json::Value> =
        all.iter().filter(|c| c["status"] == "DONE" && c["scheduled"] == true).collect();
    // Keep 1 daily: the newest (a second one may have just finished, before its retention run).
    assert!(
        (1..=2).contains(&scheduled_done.len()) && (scheduled_done.len() as f64) < taken - 1.0,
        "retention keeps the newest scheduled capture: {all:?}"
    );
    let kept = by_name(&all, "pre-upgrade");
    assert_eq!(kept["status"], "DONE", "an on-demand capture is never deleted by retention: {all:?}");
    assert_eq!(kept["scheduled"], false);
    // The CLI sees the same captures.
    let cli = list(&env, &pg);
    assert!(cli.iter().any(|c| c["name"] == "pre-upgrade"), "{cli:?}");
    let (_, h) = http(port, "GET", "/v1/health", "", None);
    let h = json_of(&h);
    assert!(h["logical"]["last_success"].is_string() && h["logical"]["next_capture"].is_string(), "{h}");
    assert!(metric(port, "walnut_logical_last_success_timestamp_seconds") > 1.7e9);
    assert!(metric(port, "walnut_logical_last_dump_bytes") > 10_000.0);
}

/// The agent's API: a capture started, followed, refused while one runs, cancelled (FAILED,
/// its pg_dump and server session gone), deleted; bad requests named.
#[test]
fn the_agent_api_captures_cancels_and_deletes() {
    let env = Env::new(Backend::File);
    let pg = env.cluster();
    pg.sql("CREATE TABLE t AS SELECT g FROM generate_series(1, 5000) g");
    let port = walnut_testkit::free_port();
    let _agent = start_agent(&env, &pg, port, None);

    // Bad requests: 400 naming the problem, nothing started.
    for (body, needle) in [
        (r#"{"name":"no spaces allowed"}"#, "invalid capture name"),
        (r#"{"all":true,"database":"postgres"}"#, "all"),
        (r#"{"bogus":1}"#, "unknown field"),
        (r#"{"at":"2001-01-01T00:00:00Z"}"#, "cannot restore to it"),
        ("{not json", "malformed JSON"),
    ] {
        let (status, b) = http(port, "POST", "/v1/logical", body, None);
        assert_eq!(status, 400, "{body}: {b}");
        assert!(json_of(&b)["error"].as_str().is_some_and(|e| e.contains(needle)), "{body}: {b}");
    }
    assert!(captures_of(port).is_empty());

    // A capture stuck behind a lock: RUNNING with progress, a second one refused, no delete.
    let locker = Locker::new(&pg, "t");
    let (status, b) = http(port, "POST", "/v1/logical", r#"{"name":"stuck","database":"postgres"}"#, None);
    assert_eq!(status, 202, "{b}");
    let id = json_of(&b)["id"].as_str().unwrap().to_string();
    let waiting = "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'walnut logical capture%'";
    PgCluster::wait_for("pg_dump to wait on the lock", WAIT, || {
        pg.sql(&format!("{waiting} AND wait_event_type = 'Lock'")).trim() == "1"
    });
    let (_, b) = http(port, "GET", "/v1/logical/stuck", "", None);
    let c = json_of(&b);
    assert_eq!(c["status"], "RUNNING", "{b}");
    assert!(c["progress"]["tables_total"].as_u64().is_some() && c["progress"]["seconds"].as_f64().is_some(), "{b}");
    let (status, b) = http(port, "POST", "/v1/logical", "{}", None);
    assert_eq!(status, 409, "{b}");
    assert!(b.contains(&id), "the refusal names the running capture: {b}");
    let (status, b) = http(port, "DELETE", &format!("/v1/logical/{id}"), "", None);
    assert_eq!(status, 409, "a running capture is not deleted: {b}");

    // Cancel: FAILED, never DONE; no pg_dump and no session left while the lock is still held.
    let (status, b) = http(port, "POST", &format!("/v1/logical/{id}/cancel"), "", None);
    assert_eq!(status, 202, "{b}");
    PgCluster::wait_for("the cancelled capture to be FAILED", WAIT, || {
        let (_, b) = http(port, "GET", &format!("/v1/logical/{id}"), "", None);
        json_of(&b)["status"] == "FAILED"
    });
    PgCluster::wait_for("the capture's session to end", WAIT, || pg.sql(waiting).trim() == "0");
    assert_eq!(pg_dumps_of(&pg), 0, "no pg_dump left running");
    assert_eq!(metric(port, "walnut_logical_failures_total"), 1.0);
    assert_eq!(metric(port, "walnut_logical_running"), 0.0);
    drop(locker);
    let (status, _) = http(port, "POST", &format!("/v1/logical/{id}/cancel"), "", None);
    assert_eq!(status, 409, "a FAILED capture cannot be cancelled");
    assert_eq!(http(port, "POST", "/v1/logical/nope/cancel", "", None).0, 404);

    // A good one, then deleted through the API.
    let (status, b) = http(port, "POST", "/v1/logical", r#"{"name":"good"}"#, None);
    assert_eq!(status, 202, "{b}");
    PgCluster::wait_for("the capture to be DONE", WAIT, || {
        let (_, b) = http(port, "GET", "/v1/logical/good", "", None);
        json_of(&b)["status"] == "DONE"
    });
    let (_, b) = http(port, "GET", "/v1/logical/LATEST", "", None);
    assert_eq!(json_of(&b)["name"], "good", "{b}");
    assert!(json_of(&b)["tables"].as_u64().is_some_and(|n| n >= 1), "{b}");
    let (status, b) = http(port, "DELETE", "/v1/logical/good", "", None);
    assert_eq!(status, 200, "{b}");
    assert_eq!(http(port, "GET", "/v1/logical/good", "", None).0, 404);
    // The FAILED one is deleted by its ID.
    assert_eq!(http(port, "DELETE", &format!("/v1/logical/{id}"), "", None).0, 200);
    assert!(captures_of(port).is_empty());
}
