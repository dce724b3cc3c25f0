//! What every command (and the agent) works from: the global options and the resolved
//! configuration, and what is derived from them alone (the repository handle, backup options,
//! the walnut command line written into PostgreSQL's settings).

use crate::config::Config;
use crate::pgserver;
use anyhow::Result;
use std::path::Path;
use walnut_core::Repository;
use walnut_core::backup::PushOptions;

/// Everything a command needs from the global options.
#[derive(Clone)]
pub struct Ctx {
    pub global: crate::cli::Global,
    pub config: Config,
}

/// Quotes one word for `/bin/sh` (PostgreSQL runs archive_command and restore_command through
/// it): plain words as they are, anything else in single quotes.
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty() && word.bytes().all(|b| b.is_ascii_alphanumeric() || b"_./:=@%+,-".contains(&b));
    if plain { word.to_string() } else { format!("'{}'", word.replace('\'', r"'\''")) }
}

impl Ctx {
    /// The walnut command line written into `archive_command`/`restore_command` (before the
    /// subcommand): this executable, `--config` when one is in use, and `--repo` when asked for
    /// or when there is no config file, each word quoted for the shell.
    pub fn walnut_command(&self, with_repo: bool) -> Result<String> {
        let mut words = vec![self.config.exe.display().to_string()];
        if let Some(c) = &self.config.path {
            words.extend(["--config".to_string(), c.display().to_string()]);
        }
        if with_repo || self.config.path.is_none() {
            words.extend(["--repo".to_string(), self.config.repo_url()?.to_string()]);
        }
        Ok(words.iter().map(|w| shell_quote(w)).collect::<Vec<_>>().join(" "))
    }

    /// Backup options from the configuration (`pgdata` and `name` from the command line).
    pub fn push_options(&self, pgdata: Option<&Path>, name: Option<String>, scheduled: bool) -> Result<PushOptions> {
        Ok(PushOptions {
            pg: pgserver::pg_config(self.config.pg_url.as_deref())?,
            pgdata: pgdata.map(Path::to_path_buf).or(self.config.pgdata.clone()),
            name,
            scheduled,
            codec: self.config.codec.clone(),
            parallel: self.config.backup_parallel,
            part_size: self.config.backup_part_size,
            archive_wait: self.config.backup_archive_wait,
            cancel: Default::default(),
            incremental: None,
            max_rate: self.config.backup_max_rate,
        })
    }

    /// Where `wal-push` keeps the last pages of the segments it pushed (in the state directory;
    /// none without one).
    pub fn tails_dir(&self) -> Option<std::path::PathBuf> {
        let d = &self.config.state_dir;
        (!d.as_os_str().is_empty()).then(|| d.join("tails"))
    }

    pub fn repository(&self) -> Result<Repository> {
        let url = self.config.repo_url()?;
        let store = walnut_storage::open(url, &self.config.storage)?;
        Ok(Repository::new(store).with_keys(self.config.identities.clone()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn shell_quoting() {
        assert_eq!(super::shell_quote("/usr/bin/walnut"), "/usr/bin/walnut");
        assert_eq!(super::shell_quote("s3://b/p"), "s3://b/p");
        assert_eq!(super::shell_quote("/etc/my walnut.toml"), "'/etc/my walnut.toml'");
        assert_eq!(super::shell_quote("it's"), r"'it'\''s'");
        assert_eq!(super::shell_quote(""), "''");
        assert_eq!(super::shell_quote("a;rm -rf /"), "'a;rm -rf /'");
    }
}
