//! Base backups: take (non-exclusive `pg_backup_start`/`pg_backup_stop`), list, fetch.
//!
//! Push pipeline, memory bounded by configuration whatever the database size: the data directory
//! is split into `parallel` streams (balanced by size); each stream runs on a blocking thread that
//! writes tar -> SHA-256 -> compressor -> fixed-size chunks into a bounded channel, and an async
//! task uploads the chunks as a streamed (multipart) object. A stream rolls over to a new part
//! object at file boundaries once `part_size` bytes of tar went into the current one.
//!
//! Commit last: the manifest is written (create-only) after every part is stored and the WAL the
//! backup needs is archived; only then is the backup DONE. A `running.json` marker, refreshed while
//! the backup runs, lets listings show RUNNING, and FAILED once it goes stale.

use crate::envelope::{self, Codec, Compressor, HashingReader, HashingWriter, PayloadReader, Sealing};
use crate::layout;
use crate::repo::{Identity, RepoError, Repository};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use walnut_pg::{Lsn, PgMajor, SystemId, TimelineId, WalFileName, WalSegSize, names::SegName};
use walnut_storage::{PutMode, StorageError};

/// The manifest format of a full backup (1) and of an incremental one (2: files may be stored
/// as blocks, which a reader of format 1 would restore as if they were whole files). A reader
/// refuses a manifest of a newer format.
pub const MANIFEST_FORMAT: u32 = 1;
pub const MANIFEST_FORMAT_INCREMENTAL: u32 = 2;
/// A running backup refreshes its marker this often; a marker older than 3x this is FAILED.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

mod catalog;
mod fetch;
mod incremental;
mod manifest;
mod push;
mod session;
mod source;

pub use catalog::*;

/// A backup's ID: the UTC time it started, `YYYYMMDDTHHMMSS`, with `-N` when several started in
/// the same second. Serializes as that text.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BackupId(String);

impl BackupId {
    /// `Some` only for text shaped like a backup ID.
    pub fn parse(text: &str) -> Option<BackupId> {
        layout::is_backup_id(text).then(|| BackupId(text.to_string()))
    }

    /// Builds an ID known to be well formed (a claimed one, or one read back from a key).
    pub(crate) fn new_unchecked(text: String) -> BackupId {
        BackupId(text)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for BackupId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for BackupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Tests name backups freely ("A", "b").
#[cfg(test)]
impl From<&str> for BackupId {
    fn from(s: &str) -> BackupId {
        BackupId(s.to_string())
    }
}

impl PartialEq<str> for BackupId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<String> for BackupId {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl PartialEq<&str> for BackupId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}
pub use fetch::*;
pub use incremental::{IncrementalOptions, map_metadata, stored_map};
pub use manifest::*;
pub use push::*;
pub(crate) use push::{ChunkWriter, channel_sender};
pub use session::*;
use source::*;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("{0}")]
    Invalid(String),
    #[error("no backup matches {0:?}: give a backup ID, a backup name, or LATEST (see `walnut backup-list`)")]
    NotFound(String),
    #[error("backup object {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(
        "the WAL this backup needs ({segment}) did not reach the repository within {waited:?}: archiving is not \
         working. Check archive_command and pg_stat_archiver (or run `walnut check`); the backup is not DONE"
    )]
    ArchiveTimeout { segment: String, waited: Duration },
    #[error("backup abandoned: {0}; it is marked FAILED and will never be DONE")]
    Abandoned(String),
    #[error(
        "another backup is already running: {0}. One base backup of a cluster runs at a time; wait for it \
         to finish (walnut backup-list shows it RUNNING), or, if its process is gone, retry in 30 seconds"
    )]
    Busy(String),
}

fn io_ctx(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackupError {
    let context = context.into();
    move |source| BackupError::Io { context, source }
}

/// Validates a backup name: `[A-Za-z0-9._-]{1,64}`, and not something that looks like an ID.
pub fn check_name(name: &str) -> Result<(), BackupError> {
    let ok = (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        && !layout::is_backup_id(name)
        && !name.eq_ignore_ascii_case("latest");
    if ok {
        Ok(())
    } else {
        Err(BackupError::Invalid(format!(
            "invalid backup name {name:?}: use 1 to 64 characters from A-Z a-z 0-9 . _ - (not LATEST, not a backup ID)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("pre-migration").is_ok());
        assert!(check_name("a.b_c-1").is_ok());
        for bad in ["", "has space", "LATEST", "20260101T000000", &"x".repeat(65), "semi;colon"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
