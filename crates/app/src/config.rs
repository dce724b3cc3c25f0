//! The configuration: one strict TOML file (unknown keys are errors), every key optional,
//! environment variables over the file, command-line options over both. Defaults live here and
//! nowhere else; durations are parsed once; secrets are [`Secret`]s.

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use walnut_core::{Codec, Compression};
use walnut_storage::{S3Options, Secret, StorageOptions};

/// A duration as written in the config: `60s`, `5min`, `24h`, `7d`, `2w`, `1y`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.is_empty() || !t.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!("invalid duration {text:?}: use a number and a unit, like 60s, 5min, 24h, 7d, 2w, 1y"));
    }
    humantime::parse_duration(t).map_err(|e| {
        format!("invalid duration {text:?} ({e}): use a number and a unit, like 60s, 5min, 24h, 7d, 2w, 1y")
    })
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_duration(&s).map(ConfigDuration).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub repo: Option<String>,
    pub compression: Option<String>,
    pub compression_level: Option<i32>,
    pub state_dir: Option<PathBuf>,
    #[serde(default)]
    pub s3: S3Section,
    #[serde(default)]
    pub postgres: PostgresSection,
    #[serde(default)]
    pub agent: AgentSection,
    #[serde(default)]
    pub settings: SettingsSection,
    #[serde(default)]
    pub storage: StorageSection,
    #[serde(default)]
    pub wal: WalSection,
    #[serde(default)]
    pub backup: BackupSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSection {
    /// Parallel streams (compression threads and uploads in flight).
    pub parallel: Option<usize>,
    /// A part object rolls over after this many MiB of tar.
    pub part_size_mb: Option<u64>,
    /// How long backup-push waits for its WAL to be archived.
    pub archive_wait: Option<ConfigDuration>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Section {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub force_path_style: Option<bool>,
}

impl std::fmt::Debug for S3Section {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Section")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &self.secret_access_key.as_ref().map(|_| "[redacted]"))
            .field("session_token", &self.session_token.as_ref().map(|_| "[redacted]"))
            .field("force_path_style", &self.force_path_style)
            .finish()
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSection {
    pub pgdata: Option<PathBuf>,
    pub url: Option<String>,
    pub bindir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    pub listen: Option<String>,
    pub token_file: Option<PathBuf>,
    /// On SIGTERM a running backup gets this long to finish before it is abandoned (FAILED).
    pub shutdown_timeout: Option<ConfigDuration>,
    /// Retention runs after every scheduled backup and also this often.
    pub retention_interval: Option<ConfigDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettingsSection {
    pub archive_timeout: Option<ConfigDuration>,
    pub full_backup_frequency: Option<ConfigDuration>,
    pub recovery_window: Option<ConfigDuration>,
    pub minimum_redundancy: Option<u32>,
}

/// walnut's own tuning (an extension of the documented keys; every key optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSection {
    /// One HTTP request's timeout.
    pub request_timeout: Option<ConfigDuration>,
    /// How long transient failures are retried.
    pub retry_time: Option<ConfigDuration>,
    /// Hard bound on one storage operation, retries included.
    pub deadline: Option<ConfigDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalSection {
    /// `.ready` segments `wal-push` uploads ahead in parallel (0 = off).
    pub upload_ahead: Option<usize>,
    /// Segments `wal-fetch` prefetches into the spool (0 = off).
    pub prefetch: Option<usize>,
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the config was read from (passed on to `restore_command` and child processes).
    pub path: Option<PathBuf>,
    pub repo: Option<String>,
    pub codec: Codec,
    pub state_dir: PathBuf,
    pub storage: StorageOptions,
    pub pgdata: Option<PathBuf>,
    pub pg_url: Option<String>,
    pub pg_bindir: Option<PathBuf>,
    pub upload_ahead: usize,
    pub prefetch: usize,
    pub backup_parallel: usize,
    pub backup_part_size: u64,
    pub backup_archive_wait: Duration,
    /// The walnut executable written into archive_command/restore_command (the running one).
    pub exe: PathBuf,
    pub agent_listen: String,
    pub agent_token_file: Option<PathBuf>,
    pub agent_token: Option<Secret>,
    pub agent_shutdown_timeout: Duration,
    pub agent_retention_interval: Duration,
    pub settings: Settings,
}

/// The platform settings (SPEC §4), validated.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Settings {
    #[serde(with = "as_text")]
    pub archive_timeout: Duration,
    #[serde(with = "as_text")]
    pub full_backup_frequency: Duration,
    #[serde(with = "as_text")]
    pub recovery_window: Duration,
    pub minimum_redundancy: u32,
}

mod as_text {
    pub fn serialize<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            archive_timeout: Duration::from_secs(60),
            full_backup_frequency: Duration::from_secs(24 * 3600),
            recovery_window: Duration::from_secs(7 * 86400),
            minimum_redundancy: 3,
        }
    }
}

impl Settings {
    /// Checks every rule; the message names the field, the value and the rule.
    pub fn validate(&self) -> Result<(), String> {
        let fmt = |d: Duration| humantime::format_duration(d).to_string();
        if self.archive_timeout < Duration::from_secs(1) {
            return Err(format!("archive_timeout must be at least 1s, got {:?}", fmt(self.archive_timeout)));
        }
        if self.full_backup_frequency < Duration::from_secs(3600) {
            return Err(format!(
                "full_backup_frequency must be at least 1h, got {:?}",
                fmt(self.full_backup_frequency)
            ));
        }
        if self.recovery_window < Duration::from_secs(86400) {
            return Err(format!("recovery_window must be at least 1d, got {:?}", fmt(self.recovery_window)));
        }
        Ok(())
    }
}

pub const DEFAULT_UPLOAD_AHEAD: usize = 4;
pub const DEFAULT_PREFETCH: usize = 8;

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// The environment variables whose names start with `prefix`, as `(lower-case name, value)`: the
/// `GOOGLE_*` and `AZURE_*` settings of `gs://` and `az://` repositories (object_store's names).
fn env_with_prefix(prefix: &str) -> Vec<(String, Secret)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, v)| k.starts_with(prefix) && !v.is_empty())
        .map(|(k, v)| (k.to_ascii_lowercase(), Secret::new(v)))
        .collect()
}

/// The default state directory: `$XDG_STATE_HOME/walnut`, else `~/.local/state/walnut` (the home
/// from `$HOME`, else the user's entry in /etc/passwd). Never a shared directory such as /tmp:
/// with no home at all it is empty, and upload-ahead and prefetch stay off until `state_dir` is set.
fn default_state_dir() -> PathBuf {
    if let Some(x) = env("XDG_STATE_HOME") {
        return PathBuf::from(x).join("walnut");
    }
    env("HOME").map(PathBuf::from).or_else(home_from_passwd).map(|h| h.join(".local/state/walnut")).unwrap_or_default()
}

/// The running user's home directory from /etc/passwd.
fn home_from_passwd() -> Option<PathBuf> {
    let uid = walnut_storage::local::effective_uid()?.to_string();
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().map(|l| l.split(':').collect::<Vec<_>>()).find(|f| f.len() > 5 && f[2] == uid).map(|f| f[5].into())
}

impl Config {
    /// Loads `path` (if any), then applies the environment and `repo_override`.
    pub fn load(path: Option<&Path>, repo_override: Option<&str>) -> Result<Config> {
        let file: FileConfig = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("read config file {}", p.display()))?;
                toml::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("config file {}: {}", p.display(), e.message()))
                    .with_context(|| "fix the config file (every key is documented in the README)".to_string())?
            }
            None => FileConfig::default(),
        };
        Config::resolve(file, path, repo_override)
    }

    pub fn resolve(file: FileConfig, path: Option<&Path>, repo_override: Option<&str>) -> Result<Config> {
        let compression: Compression = env("WALNUT_COMPRESSION")
            .or(file.compression)
            .as_deref()
            .unwrap_or("zstd")
            .parse()
            .map_err(|e: String| anyhow::anyhow!(e))?;
        let level = file.compression_level.unwrap_or(1);
        if compression == Compression::Zstd && !(1..=19).contains(&level) {
            bail!("compression_level {level} is out of range: zstd takes 1 to 19");
        }
        let s3 = S3Options {
            endpoint: env("AWS_ENDPOINT_URL").or(file.s3.endpoint),
            region: env("AWS_REGION").or(env("AWS_DEFAULT_REGION")).or(file.s3.region),
            access_key_id: env("AWS_ACCESS_KEY_ID").or(file.s3.access_key_id),
            secret_access_key: env("AWS_SECRET_ACCESS_KEY").or(file.s3.secret_access_key).map(Secret::new),
            session_token: env("AWS_SESSION_TOKEN").or(file.s3.session_token).map(Secret::new),
            force_path_style: file.s3.force_path_style,
        };
        let defaults = Settings::default();
        let settings = Settings {
            archive_timeout: file.settings.archive_timeout.map(|d| d.0).unwrap_or(defaults.archive_timeout),
            full_backup_frequency: file
                .settings
                .full_backup_frequency
                .map(|d| d.0)
                .unwrap_or(defaults.full_backup_frequency),
            recovery_window: file.settings.recovery_window.map(|d| d.0).unwrap_or(defaults.recovery_window),
            minimum_redundancy: file.settings.minimum_redundancy.unwrap_or(defaults.minimum_redundancy),
        };
        settings.validate().map_err(|e| anyhow::anyhow!("[settings] {e}"))?;
        let d = StorageOptions::default();
        // What object_store's `from_env` used to read for gs:// and az:// (later entries win).
        let gcs = env("SERVICE_ACCOUNT")
            .map(|v| ("google_service_account".to_string(), Secret::new(v)))
            .into_iter()
            .chain(env_with_prefix("GOOGLE_"))
            .collect();
        let mut azure = env_with_prefix("AZURE_");
        azure.extend(env("IDENTITY_ENDPOINT").map(|v| ("azure_msi_endpoint".to_string(), Secret::new(v))));
        let storage = StorageOptions {
            s3,
            gcs,
            azure,
            request_timeout: file.storage.request_timeout.map(|d| d.0).unwrap_or(d.request_timeout),
            retry_time: file.storage.retry_time.map(|d| d.0).unwrap_or(d.retry_time),
            deadline: file.storage.deadline.map(|d| d.0).unwrap_or(d.deadline),
        };
        Ok(Config {
            path: path.map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())),
            repo: repo_override.map(str::to_string).or(env("WALNUT_REPO")).or(file.repo),
            codec: Codec { compression, level },
            state_dir: env("WALNUT_STATE_DIR").map(PathBuf::from).or(file.state_dir).unwrap_or_else(default_state_dir),
            storage,
            pgdata: env("PGDATA").map(PathBuf::from).or(file.postgres.pgdata),
            pg_url: file.postgres.url,
            pg_bindir: file.postgres.bindir,
            upload_ahead: file.wal.upload_ahead.unwrap_or(DEFAULT_UPLOAD_AHEAD),
            prefetch: file.wal.prefetch.unwrap_or(DEFAULT_PREFETCH),
            backup_parallel: file.backup.parallel.unwrap_or(2).clamp(1, 64),
            backup_part_size: file.backup.part_size_mb.unwrap_or(1024).max(1) << 20,
            backup_archive_wait: file.backup.archive_wait.map(|d| d.0).unwrap_or(Duration::from_secs(300)),
            exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("walnut")),
            agent_listen: env("WALNUT_AGENT_LISTEN").or(file.agent.listen).unwrap_or_else(|| "127.0.0.1:5500".into()),
            agent_token_file: file.agent.token_file,
            agent_token: env("WALNUT_AGENT_TOKEN").map(Secret::new),
            agent_shutdown_timeout: file.agent.shutdown_timeout.map(|d| d.0).unwrap_or(Duration::from_secs(60)),
            agent_retention_interval: file
                .agent
                .retention_interval
                .map(|d| d.0)
                .unwrap_or(Duration::from_secs(3600))
                .max(Duration::from_secs(1)),
            settings,
        })
    }

    pub fn repo_url(&self) -> Result<&str> {
        self.repo.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "no repository configured: set `repo` in the config file (--config FILE), WALNUT_REPO, or --repo URL \
                 (for example file:///var/lib/walnut or s3://bucket/prefix)"
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_documented_unit() {
        for (t, secs) in [("60s", 60), ("5min", 300), ("24h", 86400), ("7d", 604800), ("2w", 1209600)] {
            assert_eq!(parse_duration(t).unwrap(), Duration::from_secs(secs), "{t}");
        }
        assert!(parse_duration("1y").unwrap() >= Duration::from_secs(365 * 86400));
        for bad in ["", "5", "-5s", "s", "5 parsecs"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = toml::from_str::<FileConfig>("repo = \"file:///x\"\nrepos = 1\n").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = toml::from_str::<FileConfig>("[s3]\nendpoint = \"x\"\nsecret = \"y\"\n").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[test]
    fn full_example_parses() {
        let text = r#"
repo = "s3://bucket/some/prefix"
compression = "zstd"
compression_level = 1
state_dir = "/var/lib/walnut"
[s3]
endpoint = "http://127.0.0.1:9000"
region = "us-east-1"
access_key_id = "AKIA"
secret_access_key = "super-secret-value"
force_path_style = true
[postgres]
pgdata = "/var/lib/postgresql/15/main"
url = "postgresql:///postgres?host=/var/run/postgresql&user=postgres"
bindir = "/usr/lib/postgresql/15/bin"
[agent]
listen = "127.0.0.1:5500"
token_file = "/etc/walnut/token"
[settings]
archive_timeout = "60s"
full_backup_frequency = "24h"
recovery_window = "7d"
minimum_redundancy = 3
[wal]
upload_ahead = 2
prefetch = 4
"#;
        let f: FileConfig = toml::from_str(text).unwrap();
        assert!(!format!("{f:?}").contains("super-secret-value"));
        let c = Config::resolve(f, None, None).unwrap();
        assert_eq!(c.upload_ahead, 2);
        assert!(!format!("{c:?}").contains("super-secret-value"), "secrets never in Debug");
    }

    #[test]
    fn bad_values_are_explained() {
        let f: FileConfig = toml::from_str("compression = \"brotli\"").unwrap();
        let e = Config::resolve(f, None, None).unwrap_err().to_string();
        assert!(e.contains("zstd, lz4 or none"), "{e}");
        let e = toml::from_str::<FileConfig>("[settings]\narchive_timeout = \"soon\"").unwrap_err().to_string();
        assert!(e.contains("60s"), "{e}");
        let f: FileConfig = toml::from_str("[settings]\nrecovery_window = \"12h\"").unwrap();
        let e = Config::resolve(f, None, None).unwrap_err().to_string();
        assert!(e.contains("recovery_window must be at least 1d, got \"12h\""), "{e}");
    }
}
