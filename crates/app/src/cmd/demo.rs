//! `walnut demo`: the whole story on a throwaway cluster and a `file://` repository.

use super::Ctx;
use super::restore::RestoreArgs;
use crate::config::Config;
use crate::pgserver;
use anyhow::{Context, Result, bail};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

struct Narrator {
    start: Instant,
    step: usize,
}

impl Narrator {
    fn step(&mut self, what: &str) -> Instant {
        self.step += 1;
        println!("\n[{:>5.1}s] {}. {what}", self.start.elapsed().as_secs_f64(), self.step);
        Instant::now()
    }
    fn done(&self, t: Instant, detail: &str) {
        println!(
            "         done in {:.0?}{}",
            t.elapsed(),
            if detail.is_empty() { String::new() } else { format!(": {detail}") }
        );
    }
}

pub async fn run(ctx: &Ctx, keep: bool) -> Result<()> {
    let bindir = pgserver::bindir(ctx.config.pg_bindir.as_deref(), 15)?;
    let tmp = tempfile::Builder::new().prefix("walnut-demo-").tempdir().context("create a temporary directory")?;
    let root = tmp.path().to_path_buf();
    let result = demo(&bindir, &root).await;
    // Stop whatever is still running, then clean up.
    for d in ["primary", "restored"] {
        let pgdata = root.join(d);
        if pgserver::running(&pgdata) {
            let _ = pgserver::pg_ctl_stop(&bindir, &pgdata, "fast");
        }
    }
    if keep {
        let kept = tmp.keep();
        println!("\nkept everything in {}", kept.display());
    } else {
        drop(tmp);
    }
    let _ = ctx;
    result
}

async fn demo(bindir: &Path, root: &Path) -> Result<()> {
    let mut n = Narrator { start: Instant::now(), step: 0 };
    println!("walnut demo: continuous archiving and point-in-time recovery, on a throwaway cluster");
    println!("working directory: {}", root.display());
    pgserver::prepare_ownership(root)?;

    let t = n.step("create a PostgreSQL cluster (initdb)");
    let primary = root.join("primary");
    let out = pgserver::as_owner_of(root, &bindir.join("initdb"))?
        .arg("-D")
        .arg(&primary)
        .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"])
        .output()
        .context("run initdb")?;
    if !out.status.success() {
        bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    n.done(t, &primary.display().to_string());

    let t = n.step("enable archiving to a file:// repository (archive_command = walnut wal-push)");
    let repo = root.join("repository");
    let state = root.join("state");
    let config_path = root.join("walnut.toml");
    std::fs::write(
        &config_path,
        format!(
            "repo = \"file://{}\"\nstate_dir = \"{}\"\n[backup]\narchive_wait = \"60s\"\n",
            repo.display(),
            state.display()
        ),
    )?;
    // PostgreSQL (as the postgres user) must be able to run walnut: when we are root, the binary
    // may live where that user cannot reach (a checkout under /root), so use a copy beside the demo.
    let mut exe = std::env::current_exe()?;
    if pgserver::is_root() {
        let copy = root.join("bin").join("walnut");
        std::fs::create_dir_all(root.join("bin"))?;
        std::fs::copy(&exe, &copy).context("copy the walnut binary for the postgres user")?;
        exe = copy;
    }
    let port = pgserver::free_port()?;
    let conf = format!(
        "\n# walnut demo\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
         wal_level = replica\narchive_mode = on\narchive_command = '{} --config {} wal-push %p'\narchive_timeout = 60\n",
        root.display(),
        exe.display(),
        config_path.display()
    );
    let mut text = std::fs::read_to_string(primary.join("postgresql.conf"))?;
    text += &conf;
    std::fs::write(primary.join("postgresql.conf"), text)?;
    std::fs::create_dir_all(&repo)?;
    pgserver::prepare_ownership(root)?;
    pgserver::pg_ctl_start(bindir, &primary, &root.join("primary.log"), "", true)?;
    n.done(t, &format!("PostgreSQL running on 127.0.0.1:{port}"));

    let config = Config::load(Some(&config_path), None)?;
    let mut global =
        crate::cli::Global { config: Some(config_path.clone()), repo: None, json: false, verbose: 0, quiet: false };
    let mut pgcfg = tokio_postgres::Config::new();
    pgcfg.host("127.0.0.1").port(port).user("postgres").dbname("postgres");
    let mut config = config;
    config.pg_url = Some(format!("postgresql://postgres@127.0.0.1:{port}/postgres"));
    config.exe = exe.clone();
    let ctx = Ctx { global: global.clone(), config: config.clone() };
    let db = pgserver::connect(&pgcfg).await?;

    let t = n.step("create the customers table with five rows");
    db.batch_execute(
        "CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL);
         INSERT INTO customers VALUES (1, 'Ada'), (2, 'Grace'), (3, 'Edsger'), (4, 'Barbara'), (5, 'Donald');",
    )
    .await?;
    n.done(t, "5 customers");

    let t = n.step("take a base backup (walnut backup-push)");
    global.quiet = true;
    let quiet_ctx = Ctx { global: global.clone(), config: config.clone() };
    super::backup::push(&quiet_ctx, Some(&primary), None, Default::default()).await?;
    let repository = ctx.repository()?;
    let latest = walnut_core::backup::resolve(&repository, "LATEST").await?;
    n.done(t, &format!("backup {} ({} stored)", latest.id, crate::output::bytes(latest.stored_bytes)));

    let t = n.step("add three more customers, then note the time");
    db.batch_execute("INSERT INTO customers VALUES (6, 'Alan'), (7, 'Frances'), (8, 'John');").await?;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let noted = chrono::Utc::now();
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    n.done(t, &format!("8 customers at {}", noted.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)));

    let t = n.step("disaster: DROP TABLE customers (and keep writing)");
    db.batch_execute("DROP TABLE customers; CREATE TABLE audit AS SELECT g FROM generate_series(1, 1000) g;").await?;
    let switched: String = db.query_one("SELECT pg_walfile_name(pg_switch_wal())", &[]).await?.get(0);
    let wait = Instant::now();
    loop {
        let row = db.query_one("SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver", &[]).await?;
        let last: String = row.get(0);
        if !last.is_empty() && last >= switched {
            break;
        }
        if wait.elapsed().as_secs() > 60 {
            bail!("archiving did not catch up within 60 s (see {})", root.join("primary.log").display());
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    n.done(t, &format!("table gone; WAL archived up to {switched}"));

    let t = n.step(&format!(
        "restore to the noted time into a new directory and start it (walnut restore --target-time {} --start)",
        noted.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    ));
    let restored = root.join("restored");
    let args = RestoreArgs {
        dest: restored.clone(),
        target_latest: false,
        target_time: Some(noted.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        target_name: None,
        target_lsn: None,
        target_xid: None,
        target_immediate: false,
        backup: None,
        exclusive: false,
        target_action: "promote".into(),
        target_timeline: "latest".into(),
        standby: false,
        start: true,
        port: None,
        start_timeout: None,
        stall_timeout: std::time::Duration::from_secs(600),
        archive: false,
        set_password: None,
        dry_run: false,
        tablespace_map: Vec::new(),
    };
    super::restore::run(&ctx, &args).await?;
    n.done(t, "");

    let t = n.step("the customers are back");
    let auto = std::fs::read_to_string(restored.join("postgresql.auto.conf"))?;
    let rport: u16 = auto
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("port = "))
        .and_then(|p| p.trim().parse().ok())
        .context("restored port")?;
    let mut rcfg = tokio_postgres::Config::new();
    rcfg.host("127.0.0.1").port(rport).user("postgres").dbname("postgres");
    let rdb = pgserver::connect(&rcfg).await?;
    let rows = rdb.query("SELECT id, name FROM customers ORDER BY id", &[]).await?;
    for r in &rows {
        println!("           {:>2}  {}", r.get::<_, i32>(0), r.get::<_, String>(1));
    }
    let audit = rdb.query_one("SELECT to_regclass('audit') IS NULL", &[]).await?;
    if rows.len() != 8 || !audit.get::<_, bool>(0) {
        bail!("expected the 8 customers and none of the later changes, got {} rows", rows.len());
    }
    n.done(t, "all 8 customers, none of the later changes");

    let t = n.step("clean up");
    drop(rdb);
    drop(db);
    pgserver::pg_ctl_stop(bindir, &restored, "fast")?;
    pgserver::pg_ctl_stop(bindir, &primary, "fast")?;
    let _ = Command::new("true").status();
    n.done(t, "");
    println!("\nwalnut demo finished in {:.1?}", n.start.elapsed());
    Ok(())
}
