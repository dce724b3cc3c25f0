//! The PostgreSQL client programs a capture, restore or copy runs: those of the server's major
//! version, found in the configured bindir (authoritative when set), else where `pg_config`
//! says, else Debian's `/usr/lib/postgresql/<major>/bin`. Connection settings reach them
//! through the environment (`PGHOST`, `PGPASSWORD`, ...), never the command line, which every
//! user of the host can read.

use super::LogicalError;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Where to look for the client programs.
#[derive(Debug, Clone, Default)]
pub struct Bindirs {
    /// `[postgres] bindir`: when set, the only place looked at.
    pub configured: Option<PathBuf>,
    /// `pg_config --bindir`, when `pg_config` is installed.
    pub pg_config: Option<PathBuf>,
}

impl Bindirs {
    /// The directories to look in for programs of PostgreSQL `major`, in order.
    pub fn candidates(&self, major: u32) -> Vec<PathBuf> {
        if let Some(c) = &self.configured {
            return vec![c.clone()];
        }
        let mut v: Vec<PathBuf> = self.pg_config.iter().cloned().collect();
        let debian = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
        if !v.contains(&debian) {
            v.push(debian);
        }
        v
    }
}

/// The major version a `--version` line names: `pg_dump (PostgreSQL) 15.20 (Debian ...)` -> 15,
/// `pg_dump (PostgreSQL) 9.6.24` -> 9 (for messages only), `... 17beta1` -> 17.
pub fn major_of_version_line(line: &str) -> Option<u32> {
    let after = line.split(')').nth(1)?.trim_start();
    let digits: String = after.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// A found program, with its `--version` line.
#[derive(Debug, Clone)]
pub struct Tool {
    pub path: PathBuf,
    pub version: String,
}

/// Finds `program` of PostgreSQL `major` (a server's major version). The error names the
/// package to install.
pub fn find(bindirs: &Bindirs, program: &str, major: u32) -> Result<Tool, LogicalError> {
    let mut seen = Vec::new();
    for dir in bindirs.candidates(major) {
        let path = dir.join(program);
        if !path.exists() {
            continue;
        }
        let version = version_of(&path)?;
        match major_of_version_line(&version) {
            Some(m) if m == major => return Ok(Tool { path, version }),
            Some(m) => seen.push(format!("{} is PostgreSQL {m}", path.display())),
            None => seen.push(format!("{} says {version:?}", path.display())),
        }
    }
    let looked = bindirs.candidates(major).iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ");
    let found = if seen.is_empty() { format!("not found in {looked}") } else { seen.join("; ") };
    let fix = if bindirs.configured.is_some() {
        format!(
            "install the package postgresql-client-{major} and point [postgres] bindir at its bin directory \
             (Debian: /usr/lib/postgresql/{major}/bin)"
        )
    } else {
        format!(
            "install the package postgresql-client-{major} (apt-get install postgresql-client-{major}) or set [postgres] bindir"
        )
    };
    Err(LogicalError::Tool(format!(
        "the server runs PostgreSQL {major}, which needs {program} of PostgreSQL {major}: {found}; {fix}"
    )))
}

fn version_of(path: &Path) -> Result<String, LogicalError> {
    let out = std::process::Command::new(path)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| LogicalError::Tool(format!("cannot run {}: {e}", path.display())))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Every libpq variable walnut sets or clears for a child (inherited ones could point it
/// elsewhere: `PGSERVICE`, `PGOPTIONS`, ...).
const LIBPQ_VARS: &[&str] = &[
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGDATABASE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGOPTIONS",
    "PGAPPNAME",
    "PGCONNECT_TIMEOUT",
    "PGSSLMODE",
    "PGTARGETSESSIONATTRS",
];

/// The environment that makes a libpq program connect as `cfg` says, to `database` (or `cfg`'s
/// own database): `(name, Some(value))` to set, `(name, None)` to remove.
pub fn conn_env(cfg: &tokio_postgres::Config, database: Option<&str>) -> Vec<(&'static str, Option<OsString>)> {
    use std::os::unix::ffi::OsStringExt;
    let mut env: Vec<(&'static str, Option<OsString>)> = LIBPQ_VARS.iter().map(|k| (*k, None)).collect();
    let mut set = |k: &'static str, v: OsString| {
        if let Some(e) = env.iter_mut().find(|(n, _)| *n == k) {
            e.1 = Some(v);
        }
    };
    let hosts: Vec<String> = cfg
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .collect();
    if !hosts.is_empty() {
        set("PGHOST", hosts.join(",").into());
    }
    let ports = cfg.get_ports();
    if !ports.is_empty() {
        set("PGPORT", ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",").into());
    }
    if let Some(u) = cfg.get_user() {
        set("PGUSER", u.into());
    }
    if let Some(p) = cfg.get_password() {
        set("PGPASSWORD", OsString::from_vec(p.to_vec()));
    }
    let db = database.or(cfg.get_dbname()).or(cfg.get_user()).unwrap_or("postgres");
    set("PGDATABASE", db.into());
    if let Some(t) = cfg.get_connect_timeout() {
        set("PGCONNECT_TIMEOUT", t.as_secs().max(2).to_string().into());
    }
    let mode = match cfg.get_ssl_mode() {
        tokio_postgres::config::SslMode::Disable => "disable",
        tokio_postgres::config::SslMode::Require => "require",
        _ => "prefer",
    };
    set("PGSSLMODE", mode.into());
    // With no password configured, the user's own ~/.pgpass (PGPASSFILE) is how libpq finds one.
    if cfg.get_password().is_none() {
        env.retain(|(k, _)| *k != "PGPASSFILE");
    }
    env
}

/// Applies [`conn_env`] to a command.
pub fn apply_env(cmd: &mut tokio::process::Command, env: &[(&'static str, Option<OsString>)]) {
    for (k, v) in env {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(major_of_version_line("pg_dump (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)"), Some(15));
        assert_eq!(major_of_version_line("pg_restore (PostgreSQL) 17beta1"), Some(17));
        assert_eq!(major_of_version_line("pg_restore (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(major_of_version_line("something else"), None);
    }

    #[test]
    fn candidates() {
        let b =
            Bindirs { configured: Some("/opt/pg/bin".into()), pg_config: Some("/usr/lib/postgresql/16/bin".into()) };
        assert_eq!(b.candidates(15), vec![PathBuf::from("/opt/pg/bin")], "the configured bindir is authoritative");
        let b = Bindirs { configured: None, pg_config: Some("/usr/lib/postgresql/16/bin".into()) };
        assert_eq!(
            b.candidates(15),
            vec![PathBuf::from("/usr/lib/postgresql/16/bin"), PathBuf::from("/usr/lib/postgresql/15/bin")]
        );
        assert_eq!(Bindirs::default().candidates(15), vec![PathBuf::from("/usr/lib/postgresql/15/bin")]);
    }

    #[test]
    fn a_missing_program_names_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let b = Bindirs { configured: Some(dir.path().to_path_buf()), pg_config: None };
        let e = find(&b, "pg_restore", 16).unwrap_err().to_string();
        assert!(e.contains("postgresql-client-16") && e.contains("not found in"), "{e}");
        assert!(!e.contains('\n'), "one line: {e}");
    }

    #[test]
    fn connection_settings_go_to_the_environment() {
        let cfg: tokio_postgres::Config =
            "postgresql://u:s3cret@db.example:6432/app?connect_timeout=7".parse().unwrap();
        let env = conn_env(&cfg, Some("other"));
        let get =
            |k: &str| env.iter().find(|(n, _)| *n == k).and_then(|(_, v)| v.clone()).map(|v| v.into_string().unwrap());
        assert_eq!(get("PGHOST").as_deref(), Some("db.example"));
        assert_eq!(get("PGPORT").as_deref(), Some("6432"));
        assert_eq!(get("PGUSER").as_deref(), Some("u"));
        assert_eq!(get("PGPASSWORD").as_deref(), Some("s3cret"));
        assert_eq!(get("PGDATABASE").as_deref(), Some("other"));
        assert_eq!(get("PGCONNECT_TIMEOUT").as_deref(), Some("7"));
        assert!(env.iter().any(|(k, v)| *k == "PGSERVICE" && v.is_none()), "inherited services are cleared");
        let cfg: tokio_postgres::Config = "host=/run/pg user=postgres".parse().unwrap();
        let env = conn_env(&cfg, None);
        let get =
            |k: &str| env.iter().find(|(n, _)| *n == k).and_then(|(_, v)| v.clone()).map(|v| v.into_string().unwrap());
        assert_eq!(get("PGHOST").as_deref(), Some("/run/pg"));
        assert_eq!(get("PGDATABASE").as_deref(), Some("postgres"), "libpq's default: the user's name");
        assert!(!env.iter().any(|(k, _)| *k == "PGPASSFILE"), "no password: the user's own .pgpass still works");
    }
}
