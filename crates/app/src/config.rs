//! The configuration: one strict TOML file (unknown keys are errors), every key optional,
//! environment variables over the file, command-line options over both. Defaults live here and
//! nowhere else; durations are parsed once; secrets are [`Secret`]s. (Long on purpose: every key,
//! its default, its bounds and its error message in one place, and their tests.)
//!
//! Every value is checked when the file is loaded, not when a command first uses it: each
//! duration is at most [`MAX_DURATION`] and at least what its key needs, each count is in its
//! range. An error is one line naming the file, the line and column, the key and the fix.

use anyhow::{Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use walnut_core::{Codec, Compression};
use walnut_storage::{S3Options, Secret, StorageOptions, TlsOptions};

/// A duration as written in the config: `60s`, `5min`, `24h`, `7d`, `2w`, `1y`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

/// The longest duration any key takes: 100 years of 365 days (so that every instant and
/// interval computed from a setting stays far inside what clocks and calendars can hold).
pub const MAX_DURATION: Duration = Duration::from_secs(36500 * 86400);

const DURATION_HINT: &str = "use a number and a unit, like 60s, 5min, 24h, 7d, 2w, 1y";

/// Parses a duration; the message names the value and the fix. Only what does not fit at all
/// is refused as too long here; [`parse_config_duration`] adds the [`MAX_DURATION`] limit.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t.starts_with('-') {
        return Err(format!("invalid duration {text:?}: a duration cannot be negative; {DURATION_HINT}"));
    }
    if t.is_empty() || !t.starts_with(|c: char| c.is_ascii_digit()) {
        return Err(format!("invalid duration {text:?}: {DURATION_HINT}"));
    }
    humantime::parse_duration(t).map_err(|e| match e {
        humantime::DurationError::NumberOverflow => {
            format!("duration {text:?} is too long: at most 100 years (36500d)")
        }
        e => format!("invalid duration {text:?} ({e}): {DURATION_HINT}"),
    })
}

/// Parses a duration of the config file: at most [`MAX_DURATION`].
pub fn parse_config_duration(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d > MAX_DURATION {
        return Err(format!("duration {text:?} is too long: at most 100 years (36500d)"));
    }
    Ok(d)
}

/// A rate in bytes per second, written `50MB/s`, `10MiB/s`, `1GB/s` (`/s` optional; kB/MB/GB
/// are powers of 1000, KiB/MiB/GiB of 1024; a plain number is bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate(pub u64);

const RATE_HINT: &str = "use a number and a unit per second, like 50MB/s, 10MiB/s or 1GB/s";

pub fn parse_rate(text: &str) -> Result<Rate, String> {
    let t = text.trim();
    let t = t.strip_suffix("/s").unwrap_or(t).trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let n: f64 = num.parse().map_err(|_| format!("invalid rate {text:?}: {RATE_HINT}"))?;
    let mult: f64 = match unit {
        "" | "B" => 1.0,
        "kB" | "KB" | "k" | "K" => 1e3,
        "MB" | "M" => 1e6,
        "GB" | "G" => 1e9,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(format!("invalid rate {text:?}: unknown unit {unit:?}; {RATE_HINT}")),
    };
    let bytes = n * mult;
    if !(1024.0 * 1024.0..1e15).contains(&bytes) {
        return Err(format!("rate {text:?} is out of range: at least 1MiB/s; {RATE_HINT}"));
    }
    Ok(Rate(bytes as u64))
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_rate(&s).map_err(serde::de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse_config_duration(&s).map(ConfigDuration).map_err(serde::de::Error::custom)
    }
}

/// A refused value: the key (`storage.request_timeout`, or the environment variable it came
/// from) and what is wrong with it, with the fix.
#[derive(Debug)]
pub struct BadKey {
    pub key: String,
    pub problem: String,
    /// Read from the environment, not the file (so it has no line).
    pub from_env: bool,
}

impl BadKey {
    fn new(key: &str, problem: impl Into<String>) -> BadKey {
        BadKey { key: key.to_string(), problem: problem.into(), from_env: false }
    }
}

impl std::fmt::Display for BadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.from_env {
            write!(f, "{} {}", self.key, self.problem)
        } else {
            write!(f, "{} {}", key_for_humans(&self.key), self.problem)
        }
    }
}

impl std::error::Error for BadKey {}

/// `storage.request_timeout` as the README writes it: `[storage] request_timeout`.
fn key_for_humans(path: &str) -> String {
    match path.split_once('.') {
        Some((section, key)) => format!("[{section}] {key}"),
        None => path.to_string(),
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let line_start = before.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
    let column = String::from_utf8_lossy(&before[line_start..]).chars().count() + 1;
    (line, column)
}

/// The line on which `path` (`storage.request_timeout`) is set in a TOML text, if a plain
/// reading finds it (`[section]` headers, `key = value` and dotted keys).
fn line_of_key(text: &str, path: &str) -> Option<usize> {
    let unquote = |k: &str| k.trim().trim_matches('"').trim_matches('\'').to_string();
    let dotted = |k: &str| k.split('.').map(unquote).collect::<Vec<_>>().join(".");
    let mut table = String::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if let Some(h) = l.strip_prefix('[').and_then(|h| h.split(']').next()) {
            table = dotted(h);
            continue;
        }
        if let Some((k, _)) = l.split_once('=') {
            let k = dotted(k);
            let full = if table.is_empty() { k } else { format!("{table}.{k}") };
            if full == path {
                return Some(i + 1);
            }
        }
    }
    None
}

/// Parses a config file's text. An error is one line: where (line, column), which key, what.
pub fn parse_file(text: &str) -> Result<FileConfig, String> {
    serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
        let mut key: Vec<String> = e
            .path()
            .iter()
            .filter_map(|s| match s {
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                _ => None,
            })
            .collect();
        let inner = e.inner();
        let message = inner.message().lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ");
        // The message names an unknown key; the path may or may not hold it already.
        if let Some(unknown) = message.strip_prefix("unknown field `").and_then(|m| m.split('`').next())
            && key.last().map(String::as_str) != Some(unknown)
        {
            key.push(unknown.to_string());
        }
        let at = inner.span().map(|s| line_col(text, s.start));
        let mut out = match at {
            Some((line, column)) => format!("line {line}, column {column}: "),
            None => String::new(),
        };
        if !key.is_empty() {
            out += &format!("{}: ", key_for_humans(&key.join(".")));
        }
        out + &message
    })
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
    #[serde(default)]
    pub encryption: EncryptionSection,
    #[serde(default)]
    pub drill: DrillSection,
    #[serde(default)]
    pub logical: LogicalSection,
    /// `az://` settings by object_store's Azure key names (`account_name`, `account_key`,
    /// `endpoint`, ...); the `AZURE_*` environment variables win over them.
    #[serde(default)]
    pub azure: std::collections::BTreeMap<String, String>,
    /// `gs://` settings by object_store's Google key names (`service_account`,
    /// `service_account_key`, `base_url`, ...); the `GOOGLE_*` environment variables win.
    #[serde(default)]
    pub gcs: std::collections::BTreeMap<String, String>,
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
    /// A bound on how fast backups read the data directory (`--max-rate`).
    pub max_rate: Option<Rate>,
    /// Incremental backups in a chain before `backup-push --incremental` takes a full one.
    pub max_chain: Option<usize>,
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
    /// A PEM file of CA certificates to trust besides the system's (every remote store).
    pub ca_file: Option<PathBuf>,
    /// Labs only: accept any certificate.
    pub allow_invalid_certificates: Option<bool>,
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
            .field("ca_file", &self.ca_file)
            .field("allow_invalid_certificates", &self.allow_invalid_certificates)
            .finish()
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSection {
    pub pgdata: Option<PathBuf>,
    pub url: Option<String>,
    pub bindir: Option<PathBuf>,
}

impl std::fmt::Debug for PostgresSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSection")
            .field("pgdata", &self.pgdata)
            .field("url", &self.url.as_deref().map(redact_conninfo))
            .field("bindir", &self.bindir)
            .finish()
    }
}

/// Restore drills run by the agent.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrillSection {
    /// How often the agent runs a drill (none: the agent runs no drills).
    pub interval: Option<ConfigDuration>,
    /// Where the drill restores (default `state_dir/drill`).
    pub scratch_dir: Option<PathBuf>,
    /// The restored server's port (default: a free one).
    pub port: Option<u16>,
    /// A query run on the restored server (its first value is recorded), e.g. a row count.
    pub query: Option<String>,
}

/// Scheduled logical captures (the agent's).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogicalSection {
    /// `daily HH:MM UTC`, `weekly DAY HH:MM UTC` or `every DURATION` (none: no scheduled captures).
    pub schedule: Option<String>,
    /// The database captured (default: the connection's own).
    pub database: Option<String>,
    /// Every database plus the globals, as one capture.
    pub all: Option<bool>,
    /// Capture from a fork restored from the archive's latest point, not from the server.
    pub from_archive: Option<bool>,
    /// Where `from_archive` restores its fork (default `state_dir/logical-scratch`).
    pub scratch_dir: Option<PathBuf>,
    /// Retention of scheduled captures: the newest of each of the last N days, weeks, months.
    pub keep_daily: Option<u32>,
    pub keep_weekly: Option<u32>,
    pub keep_monthly: Option<u32>,
}

/// Encryption at rest (age): public keys for writing, a secret key for reading.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncryptionSection {
    /// age X25519 public keys (`age1...`) every new object is encrypted to.
    pub recipients: Option<Vec<String>>,
    /// A file of such keys, one per line (`#` comments).
    pub recipients_file: Option<PathBuf>,
    /// An age identity file (`AGE-SECRET-KEY-1...`) for reading; `WALNUT_AGE_IDENTITY` (the key
    /// itself) wins.
    pub identity_file: Option<PathBuf>,
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
    /// `walnut verify` of the whole repository runs this often (the first one this long after
    /// the agent starts).
    pub verify_interval: Option<ConfigDuration>,
    /// An incremental backup this long after the newest backup began (also in the settings API).
    pub incremental_frequency: Option<ConfigDuration>,
    /// The RTO bound: an incremental backup as soon as a restore to the latest point would
    /// replay longer than this (also in the settings API).
    pub max_replay: Option<ConfigDuration>,
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
    /// Archive through a long-running WAL worker (started on demand by `wal-push`).
    pub worker: Option<bool>,
    /// How long the worker stays without work before it exits.
    pub worker_idle: Option<ConfigDuration>,
}

/// The resolved configuration.
#[derive(Clone)]
pub struct Config {
    /// Where the config was read from (passed on to `restore_command` and child processes).
    pub path: Option<PathBuf>,
    pub repo: Option<String>,
    pub codec: Codec,
    /// Secret keys for reading encrypted objects (never shown).
    pub identities: Option<std::sync::Arc<walnut_core::crypt::Identities>>,
    pub state_dir: PathBuf,
    pub storage: StorageOptions,
    pub pgdata: Option<PathBuf>,
    pub pg_url: Option<String>,
    pub pg_bindir: Option<PathBuf>,
    pub upload_ahead: usize,
    pub prefetch: usize,
    pub wal_worker: bool,
    pub wal_worker_idle: Duration,
    pub backup_parallel: usize,
    pub backup_part_size: u64,
    pub backup_archive_wait: Duration,
    pub backup_max_rate: Option<u64>,
    pub backup_max_chain: usize,
    /// The walnut executable written into archive_command/restore_command (the running one).
    pub exe: PathBuf,
    pub agent_listen: String,
    pub agent_token_file: Option<PathBuf>,
    pub agent_token: Option<Secret>,
    pub agent_shutdown_timeout: Duration,
    pub agent_retention_interval: Duration,
    pub agent_verify_interval: Duration,
    pub drill_interval: Option<Duration>,
    pub drill_scratch_dir: Option<PathBuf>,
    pub drill_port: Option<u16>,
    pub drill_query: Option<String>,
    /// `[logical]`: scheduled captures (none: the agent takes none).
    pub logical_schedule: Option<walnut_core::logical::schedule::Schedule>,
    pub logical_database: Option<String>,
    pub logical_all: bool,
    pub logical_from_archive: bool,
    pub logical_scratch_dir: Option<PathBuf>,
    pub logical_keep: walnut_core::logical::retention::Keep,
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
    /// `[agent] incremental_frequency` (none: no incremental backups on a schedule).
    #[serde(with = "as_text_opt")]
    pub incremental_frequency: Option<Duration>,
    /// `[agent] max_replay` (none: no RTO bound).
    #[serde(with = "as_text_opt")]
    pub max_replay: Option<Duration>,
}

mod as_text {
    pub fn serialize<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

mod as_text_opt {
    pub fn serialize<S: serde::Serializer>(d: &Option<std::time::Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::as_text::serialize(d, s),
            None => s.serialize_none(),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            archive_timeout: Duration::from_secs(60),
            full_backup_frequency: Duration::from_secs(24 * 3600),
            recovery_window: Duration::from_secs(7 * 86400),
            minimum_redundancy: 3,
            incremental_frequency: None,
            max_replay: None,
        }
    }
}

impl Settings {
    /// Checks every rule: `Err((field, what is wrong))`, the value and the limit in the message.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let fmt = |d: Duration| humantime::format_duration(d).to_string();
        for (field, d, min, min_text) in [
            ("archive_timeout", self.archive_timeout, Duration::from_secs(1), "1s"),
            ("full_backup_frequency", self.full_backup_frequency, Duration::from_secs(3600), "1h"),
            ("recovery_window", self.recovery_window, Duration::from_secs(86400), "1d"),
        ] {
            if d < min {
                return Err((field, format!("must be at least {min_text}, got {:?}", fmt(d))));
            }
            if d > MAX_DURATION {
                return Err((field, format!("must be at most 100 years (36500d), got {:?}", fmt(d))));
            }
        }
        for (field, d, min, min_text) in [
            ("incremental_frequency", self.incremental_frequency, Duration::from_secs(600), "10min"),
            ("max_replay", self.max_replay, Duration::from_secs(60), "1min"),
        ] {
            let Some(d) = d else { continue };
            if d < min {
                return Err((field, format!("must be at least {min_text}, got {:?}", fmt(d))));
            }
            if d > MAX_DURATION {
                return Err((field, format!("must be at most 100 years (36500d), got {:?}", fmt(d))));
            }
        }
        if self.minimum_redundancy > MAX_REDUNDANCY {
            return Err((
                "minimum_redundancy",
                format!("must be at most {MAX_REDUNDANCY}, got {}", self.minimum_redundancy),
            ));
        }
        Ok(())
    }

    /// Checks every rule; the message names the field, the value and the rule.
    pub fn validate(&self) -> Result<(), String> {
        self.check().map_err(|(field, problem)| format!("{field} {problem}"))
    }
}

/// The largest `minimum_redundancy`.
pub const MAX_REDUNDANCY: u32 = 1000;
/// The largest `[backup] parallel`.
pub const MAX_PARALLEL: usize = 64;
/// The largest `[backup] part_size_mb` (1 TiB).
pub const MAX_PART_SIZE_MB: u64 = 1 << 20;
/// The largest `[wal] upload_ahead` and `[wal] prefetch`.
pub const MAX_AHEAD: usize = 256;

pub const DEFAULT_UPLOAD_AHEAD: usize = 4;
pub const DEFAULT_PREFETCH: usize = 8;

/// `[encryption] recipients` and `recipients_file`, parsed (both may be given: all are used).
fn recipients(e: &EncryptionSection) -> Result<Option<std::sync::Arc<walnut_core::crypt::Recipients>>, BadKey> {
    use walnut_core::crypt::Recipients;
    let mut lines: Vec<String> = e.recipients.clone().unwrap_or_default();
    if let Some(f) = &e.recipients_file {
        let text = std::fs::read_to_string(f).map_err(|err| {
            BadKey::new("encryption.recipients_file", format!("cannot be read: {}: {err}", f.display()))
        })?;
        lines.extend(text.lines().map(str::to_string));
    }
    if e.recipients.is_none() && e.recipients_file.is_none() {
        return Ok(None);
    }
    let key = if e.recipients_file.is_some() { "encryption.recipients_file" } else { "encryption.recipients" };
    Recipients::parse(lines.iter().map(String::as_str), "the age recipients")
        .map(|r| Some(std::sync::Arc::new(r)))
        .map_err(|problem| BadKey::new(key, format!("is invalid: {problem}")))
}

/// The identity for reading: `WALNUT_AGE_IDENTITY` (the key itself) or `[encryption]
/// identity_file`. Errors never include the key.
fn identities(e: &EncryptionSection) -> Result<Option<std::sync::Arc<walnut_core::crypt::Identities>>, BadKey> {
    use walnut_core::crypt::Identities;
    if let Some(secret) = env("WALNUT_AGE_IDENTITY") {
        return Identities::parse(&secret, "WALNUT_AGE_IDENTITY").map(|i| Some(std::sync::Arc::new(i))).map_err(
            |problem| BadKey {
                key: "WALNUT_AGE_IDENTITY".into(),
                problem: format!("is invalid: {problem}"),
                from_env: true,
            },
        );
    }
    let Some(f) = &e.identity_file else { return Ok(None) };
    let text = std::fs::read_to_string(f)
        .map_err(|err| BadKey::new("encryption.identity_file", format!("cannot be read: {}: {err}", f.display())))?;
    Identities::parse(&text, &f.display().to_string())
        .map(|i| Some(std::sync::Arc::new(i)))
        .map_err(|problem| BadKey::new("encryption.identity_file", format!("is invalid: {problem}")))
}

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

/// A duration key's value (or its default): at least `min_secs` seconds (durations are at most
/// [`MAX_DURATION`] when parsed).
fn at_least(v: Option<ConfigDuration>, key: &str, default: Duration, min_secs: u64) -> Result<Duration, BadKey> {
    let d = v.map_or(default, |d| d.0);
    if d < Duration::from_secs(min_secs) {
        let got = humantime::format_duration(d).to_string();
        return Err(BadKey::new(key, format!("must be at least {min_secs}s, got {got:?}")));
    }
    Ok(d)
}

/// A count key's value (or its default), in `min..=max`.
fn in_range<T: PartialOrd + std::fmt::Display + Copy>(
    v: Option<T>,
    key: &str,
    default: T,
    min: T,
    max: T,
) -> Result<T, BadKey> {
    let n = v.unwrap_or(default);
    if n < min || n > max {
        return Err(BadKey::new(key, format!("must be {min} to {max}, got {n}")));
    }
    Ok(n)
}

impl Config {
    /// Loads `path` (if any), then applies the environment and `repo_override`. An error names
    /// the file, the line and column, the key and the fix, on one line.
    pub fn load(path: Option<&Path>, repo_override: Option<&str>) -> Result<Config> {
        const FIX: &str = "fix the config file (every key is documented in the README)";
        let (file, text) = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("read config file {}", p.display()))?;
                let file = parse_file(&text).map_err(|e| anyhow::anyhow!("config file {}, {e}; {FIX}", p.display()))?;
                (file, text)
            }
            None => (FileConfig::default(), String::new()),
        };
        Config::resolve(file, path, repo_override).map_err(|e| match (path, e.downcast_ref::<BadKey>()) {
            (Some(p), Some(bad)) if !bad.from_env => match line_of_key(&text, &bad.key) {
                Some(line) => anyhow::anyhow!("config file {}, line {line}: {bad}", p.display()),
                None => anyhow::anyhow!("config file {}: {bad}", p.display()),
            },
            _ => e,
        })
    }

    /// Applies the environment and `repo_override` to a parsed file and checks every value (a
    /// refused one is a [`BadKey`]).
    pub fn resolve(file: FileConfig, path: Option<&Path>, repo_override: Option<&str>) -> Result<Config> {
        let (compression, from_env) = match env("WALNUT_COMPRESSION") {
            Some(v) => (v, true),
            None => (file.compression.clone().unwrap_or_else(|| "zstd".into()), false),
        };
        let compression: Compression = compression.parse().map_err(|e: String| BadKey {
            key: if from_env { "WALNUT_COMPRESSION" } else { "compression" }.into(),
            problem: format!("is not valid: {e}"),
            from_env,
        })?;
        let level = file.compression_level.unwrap_or(1);
        if compression == Compression::Zstd && !(1..=19).contains(&level) {
            Err(BadKey::new("compression_level", format!("{level} is out of range: zstd takes 1 to 19")))?;
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
            incremental_frequency: file.agent.incremental_frequency.map(|d| d.0),
            max_replay: file.agent.max_replay.map(|d| d.0),
        };
        settings.check().map_err(|(field, problem)| {
            let section = if matches!(field, "incremental_frequency" | "max_replay") { "agent" } else { "settings" };
            BadKey::new(&format!("{section}.{field}"), problem)
        })?;
        let d = StorageOptions::default();
        // What object_store's `from_env` used to read for gs:// and az:// (later entries win).
        let section = |name: &str, map: std::collections::BTreeMap<String, String>| -> Result<Vec<(String, Secret)>> {
            let mut out = Vec::new();
            for (k, v) in map {
                if !walnut_storage::known_setting(name, &k) {
                    Err(BadKey::new(
                        &format!("{name}.{k}"),
                        format!(
                            "is not a setting of the {} client: use object_store's key names (docs/operations.md)",
                            if name == "azure" { "Azure" } else { "GCS" }
                        ),
                    ))?;
                }
                out.push((k, Secret::new(v)));
            }
            Ok(out)
        };
        let mut gcs = section("gcs", file.gcs)?;
        gcs.extend(env("SERVICE_ACCOUNT").map(|v| ("google_service_account".to_string(), Secret::new(v))));
        gcs.extend(env_with_prefix("GOOGLE_"));
        let mut azure = section("azure", file.azure)?;
        azure.extend(env_with_prefix("AZURE_"));
        azure.extend(env("IDENTITY_ENDPOINT").map(|v| ("azure_msi_endpoint".to_string(), Secret::new(v))));
        let storage = StorageOptions {
            s3,
            gcs,
            azure,
            tls: TlsOptions {
                // Not AWS_CA_BUNDLE: often set machine-wide to the system bundle, it would
                // silently replace the CA this file names.
                ca_file: file.s3.ca_file,
                allow_invalid_certificates: file.s3.allow_invalid_certificates.unwrap_or(false),
            },
            request_timeout: at_least(file.storage.request_timeout, "storage.request_timeout", d.request_timeout, 1)?,
            retry_time: at_least(file.storage.retry_time, "storage.retry_time", d.retry_time, 1)?,
            deadline: at_least(file.storage.deadline, "storage.deadline", d.deadline, 1)?,
        };
        let part_size_mb = in_range(file.backup.part_size_mb, "backup.part_size_mb", 1024, 1, MAX_PART_SIZE_MB)?;
        Ok(Config {
            path: path.map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())),
            repo: repo_override.map(str::to_string).or(env("WALNUT_REPO")).or(file.repo),
            codec: Codec { compression, level, seal: recipients(&file.encryption)? },
            identities: identities(&file.encryption)?,
            state_dir: env("WALNUT_STATE_DIR").map(PathBuf::from).or(file.state_dir).unwrap_or_else(default_state_dir),
            storage,
            pgdata: env("PGDATA").map(PathBuf::from).or(file.postgres.pgdata),
            pg_url: file.postgres.url,
            pg_bindir: file.postgres.bindir,
            upload_ahead: in_range(file.wal.upload_ahead, "wal.upload_ahead", DEFAULT_UPLOAD_AHEAD, 0, MAX_AHEAD)?,
            prefetch: in_range(file.wal.prefetch, "wal.prefetch", DEFAULT_PREFETCH, 0, MAX_AHEAD)?,
            wal_worker: file.wal.worker.unwrap_or(true),
            wal_worker_idle: at_least(file.wal.worker_idle, "wal.worker_idle", Duration::from_secs(60), 1)?,
            backup_parallel: in_range(file.backup.parallel, "backup.parallel", 2, 1, MAX_PARALLEL)?,
            backup_part_size: part_size_mb << 20,
            backup_archive_wait: at_least(
                file.backup.archive_wait,
                "backup.archive_wait",
                Duration::from_secs(300),
                1,
            )?,
            backup_max_rate: file.backup.max_rate.map(|r| r.0),
            backup_max_chain: in_range(file.backup.max_chain, "backup.max_chain", 7, 1, 1000)?,
            exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("walnut")),
            agent_listen: env("WALNUT_AGENT_LISTEN").or(file.agent.listen).unwrap_or_else(|| "127.0.0.1:5500".into()),
            agent_token_file: file.agent.token_file,
            agent_token: env("WALNUT_AGENT_TOKEN").map(Secret::new),
            agent_shutdown_timeout: file.agent.shutdown_timeout.map(|d| d.0).unwrap_or(Duration::from_secs(60)),
            agent_retention_interval: at_least(
                file.agent.retention_interval,
                "agent.retention_interval",
                Duration::from_secs(3600),
                1,
            )?,
            agent_verify_interval: at_least(
                file.agent.verify_interval,
                "agent.verify_interval",
                Duration::from_secs(24 * 3600),
                1,
            )?,
            drill_interval: match file.drill.interval {
                Some(d) => Some(at_least(Some(d), "drill.interval", Duration::ZERO, 1)?),
                None => None,
            },
            drill_scratch_dir: file.drill.scratch_dir,
            drill_port: file.drill.port,
            drill_query: file.drill.query,
            logical_schedule: match &file.logical.schedule {
                Some(text) => Some(
                    walnut_core::logical::schedule::Schedule::parse(text, parse_duration)
                        .map_err(|e| BadKey::new("logical.schedule", e))?,
                ),
                None => None,
            },
            logical_all: match (file.logical.all.unwrap_or(false), &file.logical.database) {
                (true, Some(_)) => {
                    return Err(BadKey::new(
                        "logical.all",
                        "all = true captures every database: remove logical.database, or set all = false",
                    )
                    .into());
                }
                (all, _) => all,
            },
            logical_database: file.logical.database,
            logical_from_archive: file.logical.from_archive.unwrap_or(false),
            logical_scratch_dir: file.logical.scratch_dir,
            logical_keep: walnut_core::logical::retention::Keep {
                daily: in_range(file.logical.keep_daily, "logical.keep_daily", 7, 0, 10000)?,
                weekly: in_range(file.logical.keep_weekly, "logical.keep_weekly", 4, 0, 10000)?,
                monthly: in_range(file.logical.keep_monthly, "logical.keep_monthly", 3, 0, 10000)?,
            },
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

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("path", &self.path)
            .field("repo", &self.repo.as_deref().map(redact_conninfo))
            .field("codec", &self.codec)
            .field("state_dir", &self.state_dir)
            .field("storage", &self.storage)
            .field("pgdata", &self.pgdata)
            .field("pg_url", &self.pg_url.as_deref().map(redact_conninfo))
            .field("pg_bindir", &self.pg_bindir)
            .field("upload_ahead", &self.upload_ahead)
            .field("wal_worker", &self.wal_worker)
            .field("prefetch", &self.prefetch)
            .field("backup_parallel", &self.backup_parallel)
            .field("backup_part_size", &self.backup_part_size)
            .field("backup_archive_wait", &self.backup_archive_wait)
            .field("backup_max_rate", &self.backup_max_rate)
            .field("backup_max_chain", &self.backup_max_chain)
            .field("exe", &self.exe)
            .field("agent_listen", &self.agent_listen)
            .field("agent_token_file", &self.agent_token_file)
            .field("agent_token", &self.agent_token)
            .field("agent_shutdown_timeout", &self.agent_shutdown_timeout)
            .field("agent_retention_interval", &self.agent_retention_interval)
            .field("agent_verify_interval", &self.agent_verify_interval)
            .field("drill_interval", &self.drill_interval)
            .field("drill_scratch_dir", &self.drill_scratch_dir)
            .field("logical_schedule", &self.logical_schedule)
            .field("logical_keep", &self.logical_keep)
            .field("settings", &self.settings)
            .finish()
    }
}

/// A connection string or URL fit to print: the password of a URL's user information, a
/// `password=` (or `sslpassword=`) query parameter, and the value of a `password` keyword of a
/// libpq key=value string are replaced by `[redacted]`.
pub fn redact_conninfo(text: &str) -> String {
    match text.find("://") {
        Some(i) => redact_url(text, i + 3),
        None => redact_keywords(text),
    }
}

const REDACTED: &str = "[redacted]";

fn is_password_key(key: &str) -> bool {
    let key = key.trim();
    key.eq_ignore_ascii_case("password") || key.eq_ignore_ascii_case("sslpassword")
}

fn redact_url(s: &str, authority: usize) -> String {
    let query = s[authority..].find('?').map_or(s.len(), |q| authority + q);
    let mut out = s[..authority].to_string();
    // The user information ends at the last '@' before the query: an unescaped password may
    // itself hold '@' or '/', and hiding too much is the safe side.
    match s[authority..query].rfind('@') {
        Some(at) => {
            let userinfo = &s[authority..authority + at];
            match userinfo.split_once(':') {
                Some((user, _)) => {
                    out += user;
                    out += ":";
                    out += REDACTED;
                }
                None => out += userinfo,
            }
            out += &s[authority + at..query];
        }
        None => out += &s[authority..query],
    }
    if query < s.len() {
        let params: Vec<String> = s[query + 1..]
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if is_password_key(k) => format!("{k}={REDACTED}"),
                _ => kv.to_string(),
            })
            .collect();
        out += "?";
        out += &params.join("&");
    }
    out
}

/// libpq's `key = value` form: values are bare words or single-quoted with backslash escapes.
fn redact_keywords(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    loop {
        let t = rest.trim_start();
        out += &rest[..rest.len() - t.len()];
        rest = t;
        if rest.is_empty() {
            return out;
        }
        let key_len = rest.find(|c: char| c == '=' || c.is_whitespace()).unwrap_or(rest.len());
        let key = &rest[..key_len];
        out += key;
        rest = &rest[key_len..];
        let t = rest.trim_start();
        let Some(after) = t.strip_prefix('=') else {
            out += &rest[..rest.len() - t.len()];
            rest = t;
            continue;
        };
        let value = after.trim_start();
        out += &rest[..rest.len() - value.len()];
        let value_len = if let Some(quoted) = value.strip_prefix('\'') {
            let mut escaped = false;
            quoted
                .char_indices()
                .find(|(_, c)| {
                    let end = !escaped && *c == '\'';
                    escaped = !escaped && *c == '\\';
                    end
                })
                .map_or(value.len(), |(i, _)| i + 2)
        } else {
            value.find(char::is_whitespace).unwrap_or(value.len())
        };
        out += if is_password_key(key) { REDACTED } else { &value[..value_len] };
        rest = &value[value_len..];
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

    /// Durations are at most 100 years: longer ones (which overflowed the scheduler's and
    /// retention's date arithmetic) are refused with the limit; each error is one line.
    #[test]
    fn durations_have_a_maximum_and_one_line_errors() {
        assert_eq!(parse_config_duration("36500d").unwrap(), MAX_DURATION);
        assert_eq!(parse_config_duration("0s").unwrap(), Duration::ZERO, "zero parses; keys that need more say so");
        for (bad, says) in [
            ("36501d", "at most 100 years"),
            ("100000y", "at most 100 years"),
            ("1000000000000y", "at most 100 years"),
            ("99999999999999999999999s", "at most 100 years"),
            ("-5s", "cannot be negative"),
            ("5", "time unit needed"),
            ("5 parsecs", "unknown time unit"),
            ("soon", "60s"),
        ] {
            let e = parse_config_duration(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(!e.contains('\n'), "{bad}: one line: {e}");
        }
    }

    /// Writes `text` to a config file and loads it.
    fn load_text(text: &str) -> Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("walnut.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(Some(&path), None)
    }

    /// Every refused value names the file, the line (and, for what the TOML reader refuses, the
    /// column) and the key, on one line.
    #[test]
    fn config_errors_name_the_line_and_the_key() {
        let cases: &[(&str, &[&str])] = &[
            (
                "repo = \"file:///x\"\ncompression_level = \"high\"\n",
                &["line 2, column 21", "compression_level", "\"high\""],
            ),
            ("repos = 1\n", &["line 1, column 1", "repos", "unknown field"]),
            ("[s3]\nregion = \"x\"\nsecret = \"y\"\n", &["line 3, column 1", "[s3] secret", "unknown field"]),
            ("[nosuch]\n", &["line 1", "nosuch", "unknown field"]),
            ("repo = \n", &["line 1, column 8", "invalid string"]),
            ("[backup]\nparallel = \"high\"\n", &["line 2, column 12", "[backup] parallel", "invalid type"]),
            ("[backup]\nparallel = -1\n", &["line 2", "[backup] parallel", "-1"]),
            (
                "[storage]\nrequest_timeout = \"5\"\n",
                &["line 2, column 19", "[storage] request_timeout", "time unit needed"],
            ),
            ("[storage]\nretry_time = \"-1s\"\n", &["line 2", "[storage] retry_time", "cannot be negative"]),
            ("[storage]\ndeadline = \"5 parsecs\"\n", &["line 2", "[storage] deadline", "unknown time unit"]),
            (
                "[settings]\nfull_backup_frequency = \"100000y\"\n",
                &["line 2", "[settings] full_backup_frequency", "at most 100 years"],
            ),
            ("[agent]\nshutdown_timeout = \"1000y\"\n", &["line 2", "[agent] shutdown_timeout", "at most 100 years"]),
            // Refused after parsing: the line is found by the key.
            (
                "repo = \"file:///x\"\n\n[backup]\nparallel = 0\n",
                &["line 4", "[backup] parallel must be 1 to 64, got 0"],
            ),
            ("[backup]\nparallel = 65\n", &["line 2", "[backup] parallel must be 1 to 64, got 65"]),
            ("[backup]\npart_size_mb = 0\n", &["line 2", "[backup] part_size_mb must be 1 to"]),
            ("[backup]\npart_size_mb = 99999999999999\n", &["line 2", "[backup] part_size_mb must be 1 to 1048576"]),
            ("[backup]\narchive_wait = \"0s\"\n", &["line 2", "[backup] archive_wait must be at least 1s, got \"0s\""]),
            ("[backup]\nmax_rate = \"fast\"\n", &["line 2", "invalid rate \"fast\"", "50MB/s"]),
            ("[backup]\nmax_rate = \"10kB/s\"\n", &["line 2", "at least 1MiB/s"]),
            ("[backup]\nmax_rate = \"5 parsecs/s\"\n", &["line 2", "unknown unit"]),
            ("[backup]\nmax_chain = 0\n", &["line 2", "[backup] max_chain must be 1 to 1000"]),
            ("[storage]\nrequest_timeout = \"0s\"\n", &["line 2", "[storage] request_timeout must be at least 1s"]),
            ("[storage]\nretry_time = \"0s\"\n", &["line 2", "[storage] retry_time must be at least 1s"]),
            ("[storage]\ndeadline = \"0ms\"\n", &["line 2", "[storage] deadline must be at least 1s"]),
            ("storage.deadline = \"0s\"\n", &["line 1", "[storage] deadline must be at least 1s"]),
            ("[agent]\nretention_interval = \"0s\"\n", &["line 2", "[agent] retention_interval must be at least 1s"]),
            ("[wal]\nupload_ahead = 100000\n", &["line 2", "[wal] upload_ahead must be 0 to 256"]),
            ("[wal]\nprefetch = 100000\n", &["line 2", "[wal] prefetch must be 0 to 256"]),
            ("[settings]\narchive_timeout = \"0s\"\n", &["line 2", "[settings] archive_timeout must be at least 1s"]),
            (
                "[settings]\nminimum_redundancy = 5000\n",
                &["line 2", "[settings] minimum_redundancy must be at most 1000"],
            ),
            ("compression = \"brotli\"\n", &["line 1", "compression", "use zstd, lz4 or none"]),
            ("compression_level = 0\n", &["line 1", "compression_level", "zstd takes 1 to 19"]),
        ];
        for (text, wants) in cases {
            let e = format!("{:#}", load_text(text).unwrap_err());
            assert!(e.contains("config file ") && e.contains("walnut.toml"), "{text:?}: names the file: {e}");
            assert!(!e.contains('\n'), "{text:?}: one line: {e}");
            for w in *wants {
                assert!(e.contains(w), "{text:?}: wanted {w:?} in: {e}");
            }
        }
    }

    /// Zero counts mean "off" only where the README says so.
    #[test]
    fn counts_at_their_limits_are_accepted() {
        let c =
            load_text("[wal]\nupload_ahead = 0\nprefetch = 0\n[backup]\nparallel = 64\npart_size_mb = 1\n").unwrap();
        assert_eq!((c.upload_ahead, c.prefetch, c.backup_parallel, c.backup_part_size), (0, 0, 64, 1 << 20));
        let c = load_text("[settings]\nrecovery_window = \"36500d\"\nfull_backup_frequency = \"36500d\"\n").unwrap();
        assert_eq!(c.settings.recovery_window, MAX_DURATION);
        assert!(load_text("").is_ok());
    }

    #[test]
    fn passwords_are_redacted_from_connection_strings() {
        for (raw, shown) in [
            ("postgresql://u:hunter2@host/db", "postgresql://u:[redacted]@host/db"),
            (
                "postgres://u:hun@ter/2@h1:5432,h2/db?sslmode=require",
                "postgres://u:[redacted]@h1:5432,h2/db?sslmode=require",
            ),
            (
                "postgresql://u@host/db?password=hunter2&application_name=x",
                "postgresql://u@host/db?password=[redacted]&application_name=x",
            ),
            (
                "postgresql:///postgres?host=/var/run/postgresql&user=postgres",
                "postgresql:///postgres?host=/var/run/postgresql&user=postgres",
            ),
            ("host=/tmp user=u password=hunter2 dbname=d", "host=/tmp user=u password=[redacted] dbname=d"),
            ("host=/tmp password = 'hun ter\\' 2' dbname=d", "host=/tmp password = [redacted] dbname=d"),
            ("password='unterminated hunter2", "password=[redacted]"),
            ("sslpassword=hunter2 PASSWORD=hunter2", "sslpassword=[redacted] PASSWORD=[redacted]"),
            ("http://key:hunter2@127.0.0.1:9000", "http://key:[redacted]@127.0.0.1:9000"),
            ("s3://bucket/prefix", "s3://bucket/prefix"),
            ("", ""),
            ("=", "="),
            ("password", "password"),
        ] {
            assert_eq!(redact_conninfo(raw), shown, "{raw}");
        }
        let f = parse_file("[postgres]\nurl = \"postgresql://u:hunter2@host/db\"\n").unwrap();
        assert!(!format!("{f:?}").contains("hunter2"));
        let c = Config::resolve(f, None, None).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"), "the password is not in Debug");
        assert_eq!(c.pg_url.as_deref(), Some("postgresql://u:hunter2@host/db"), "but it is used as written");
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
    fn rates() {
        assert_eq!(parse_rate("50MB/s"), Ok(Rate(50_000_000)));
        assert_eq!(parse_rate("10MiB/s"), Ok(Rate(10 << 20)));
        assert_eq!(parse_rate("1.5GB"), Ok(Rate(1_500_000_000)));
        assert_eq!(parse_rate("2097152"), Ok(Rate(2 << 20)));
        assert!(parse_rate("-5MB/s").is_err());
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
