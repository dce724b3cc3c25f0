//! Logical backups: `pg_dump` captures stored in the repository beside base backups, listed,
//! shown, deleted, downloaded and restored with `pg_restore`.
//!
//! A capture is `logical/<ID>/`: a `running.json` marker written first (claiming the ID,
//! create-only) and refreshed while it runs, one streamed object per database dump
//! (`data/NNNN.dump`: a `pg_dump --format=custom --compress=0` archive, compressed and encrypted
//! by walnut's codec) plus, for `--all`, the globals (`data/globals.sql`, `pg_dumpall
//! --globals-only`), and the manifest written last, create-only: the capture is DONE once it
//! exists. A capture that fails or is cancelled rewrites its marker with the error (FAILED) and
//! never writes a manifest. What listing needs (the catalog) is kept in clear in the manifest's
//! envelope metadata, so a host without the age identity lists captures.
//!
//! - [`capture`]: begin (claim an ID, the marker and its heartbeat), dump, commit.
//! - [`restore`]: fetch a dump (repository, URL or file) into a verified local file, inspect
//!   and empty a target database, run `pg_restore`; `copy` pipes `pg_dump` into `pg_restore`.
//! - [`dumpfile`]: the data offsets a dump written to a pipe lacks, filled in when it is made
//!   a local file again, so `pg_restore --jobs` finds each table's data at once.
//! - [`tools`]: the PostgreSQL client binaries of a major version, and connection settings as a
//!   child process's environment (never its command line).
//! - [`retention`]: keep the last N daily, weekly and monthly captures, with reasons (pure).

use crate::envelope::{self, Codec};
use crate::layout;
use crate::repo::{RepoError, Repository};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Duration;
use walnut_storage::{PutMode, StorageError};

pub mod capture;
pub mod dumpfile;
pub mod progress;
pub mod restore;
pub mod retention;
pub mod schedule;
pub mod tools;

pub use capture::*;
pub use progress::*;

/// The manifest format written (a reader refuses a newer one).
pub const MANIFEST_FORMAT: u32 = 1;
/// A running capture refreshes its marker this often; a marker older than 3x this is FAILED.
pub const HEARTBEAT: Duration = crate::backup::HEARTBEAT;

#[derive(Debug, thiserror::Error)]
pub enum LogicalError {
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
    #[error(
        "no logical capture matches {0:?}: give a capture ID, a capture name, or LATEST (see `walnut logical list`)"
    )]
    NotFound(String),
    #[error("{key} is corrupt: {reason}; it is refused (nothing was restored from it)")]
    Corrupt { key: String, reason: String },
    #[error("capture abandoned: {0}; it is marked FAILED and will never be DONE")]
    Abandoned(String),
    /// A PostgreSQL client program is missing or of the wrong major version.
    #[error("{0}")]
    Tool(String),
    /// A dump walnut cannot stream into `pg_restore` (its TOC is of a format walnut does not
    /// read): restore it from a file.
    #[error("the dump {0} cannot be restored as it downloads (walnut does not read its table of contents)")]
    Unstreamable(String),
    /// A PostgreSQL program ran and failed.
    #[error("{program} failed ({status}): {detail}")]
    Program { program: String, status: String, detail: String },
}

/// Connects (core's bounded session); a failure is a [`LogicalError::Postgres`] with the reason.
pub(crate) async fn pg_connect(cfg: &tokio_postgres::Config) -> Result<tokio_postgres::Client, LogicalError> {
    crate::backup::connect(cfg).await.map_err(|e| match e {
        crate::backup::BackupError::Postgres(m) => LogicalError::Postgres(m),
        other => LogicalError::Postgres(other.to_string()),
    })
}

pub(crate) fn io_ctx(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> LogicalError {
    let context = context.into();
    move |source| LogicalError::Io { context, source }
}

/// Where a capture's data came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Source {
    /// The running server.
    Server,
    /// A throwaway fork restored from the physical archive (`capture --at`).
    Archive {
        /// The point as given (`--at`).
        at: String,
        /// The recovery target as planned (e.g. `time 2026-01-01T00:00:00Z`).
        target: String,
        /// The base backup the fork was restored from.
        backup: String,
    },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Server => f.write_str("server"),
            Source::Archive { at, .. } => write!(f, "archive at {at}"),
        }
    }
}

/// One stored object of a capture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredObject {
    pub key: String,
    pub stored_bytes: u64,
    pub content_bytes: u64,
    /// SHA-256 of the content (the dump as `pg_dump` wrote it), hex.
    pub content_sha256: String,
}

/// One database's dump in a capture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseDump {
    pub database: String,
    /// `custom`: a `pg_dump --format=custom` archive.
    pub format: String,
    /// Tables whose data the dump holds (from `pg_dump --verbose`).
    pub tables: u64,
    #[serde(flatten)]
    pub object: StoredObject,
    /// The bytes of table data in the dump and of its largest table (read from the dump as it
    /// was stored; none in captures made before walnut recorded them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table_data: Option<dumpfile::DataSizes>,
}

/// What a DONE capture holds: written last.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaptureManifest {
    pub format: u32,
    pub id: String,
    pub name: Option<String>,
    /// Taken by the agent's `[logical] schedule` (true) or on demand.
    pub scheduled: bool,
    pub source: Source,
    /// `--all`: every database plus the globals.
    pub all: bool,
    pub system_identifier: String,
    pub pg_version_num: u32,
    pub pg_major: u32,
    /// `pg_dump --version` of the binary that made the dumps.
    pub tool_version: String,
    #[serde(with = "crate::timefmt")]
    pub start_time: chrono::DateTime<chrono::Utc>,
    #[serde(with = "crate::timefmt")]
    pub end_time: chrono::DateTime<chrono::Utc>,
    pub databases: Vec<DatabaseDump>,
    /// `--all`: roles and tablespaces (`pg_dumpall --globals-only`, SQL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub globals: Option<StoredObject>,
    /// The dumps' bytes as `pg_dump` wrote them (and the globals').
    pub dump_bytes: u64,
    pub stored_bytes: u64,
    pub compression: String,
}

impl CaptureManifest {
    /// The one dump of a single-database capture, or the named database's of any capture.
    pub fn dump_of(&self, database: Option<&str>) -> Result<&DatabaseDump, LogicalError> {
        let names = || self.databases.iter().map(|d| d.database.as_str()).collect::<Vec<_>>().join(", ");
        match database {
            Some(db) => self.databases.iter().find(|d| d.database == db).ok_or_else(|| {
                LogicalError::Invalid(format!(
                    "capture {} holds no database {db:?}: it holds {} (give --database one of them)",
                    self.id,
                    names()
                ))
            }),
            None if self.databases.len() == 1 => Ok(&self.databases[0]),
            None => Err(LogicalError::Invalid(format!(
                "capture {} holds {} databases ({}): choose one with --database NAME",
                self.id,
                self.databases.len(),
                names()
            ))),
        }
    }
}

/// What listing shows of a DONE capture, in clear in the manifest's envelope metadata.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Catalog {
    pub name: Option<String>,
    pub scheduled: bool,
    /// The database's name, or `all (N databases)`.
    pub database: String,
    pub databases: Vec<String>,
    pub all: bool,
    pub source: Source,
    pub pg_version_num: u32,
    #[serde(with = "crate::timefmt")]
    pub start_time: chrono::DateTime<chrono::Utc>,
    #[serde(with = "crate::timefmt")]
    pub end_time: chrono::DateTime<chrono::Utc>,
    pub dump_bytes: u64,
    pub stored_bytes: u64,
    pub tables: u64,
}

impl From<&CaptureManifest> for Catalog {
    fn from(m: &CaptureManifest) -> Catalog {
        Catalog {
            name: m.name.clone(),
            scheduled: m.scheduled,
            database: database_label(m.all, &m.databases.iter().map(|d| d.database.clone()).collect::<Vec<_>>()),
            databases: m.databases.iter().map(|d| d.database.clone()).collect(),
            all: m.all,
            source: m.source.clone(),
            pg_version_num: m.pg_version_num,
            start_time: m.start_time,
            end_time: m.end_time,
            dump_bytes: m.dump_bytes,
            stored_bytes: m.stored_bytes,
            tables: m.databases.iter().map(|d| d.tables).sum(),
        }
    }
}

/// The DATABASE column: the name, or `all (N databases)`.
pub fn database_label(all: bool, databases: &[String]) -> String {
    if all { format!("all ({} databases)", databases.len()) } else { databases.first().cloned().unwrap_or_default() }
}

pub use crate::backup::Status;

/// One line of `logical list`.
#[derive(Debug, Clone, Serialize)]
pub struct CaptureInfo {
    pub id: String,
    pub status: Status,
    #[serde(flatten)]
    pub catalog: Option<Catalog>,
    /// RUNNING/FAILED: when it started, and where (from the marker).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// RUNNING/FAILED: the name it was given (from the marker).
    #[serde(skip)]
    pub pending_name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// RUNNING/FAILED: the marker's last heartbeat (retention keeps a FAILED capture's
    /// leftovers a while after it).
    #[serde(skip)]
    pub last_seen: Option<chrono::DateTime<chrono::Utc>>,
}

impl CaptureInfo {
    /// The capture's name, DONE or not.
    pub fn name(&self) -> Option<&str> {
        self.catalog.as_ref().and_then(|c| c.name.as_deref()).or(self.pending_name.as_deref())
    }
}

/// The RUNNING marker (`running.json`), and FAILED with `error`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Marker {
    pub started_at: String,
    pub host: String,
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
}

/// The manifest object: the manifest (encrypted when configured) with its catalog in clear.
pub(crate) fn manifest_object(m: &CaptureManifest, codec: &Codec) -> bytes::Bytes {
    let body = serde_json::to_vec_pretty(m).expect("serialisable");
    let meta = serde_json::json!({ "catalog": Catalog::from(m) });
    envelope::encode(&body, &meta, Codec { compression: crate::Compression::None, level: 0, seal: codec.seal.clone() })
}

/// Every capture in the repository, oldest first.
pub async fn list(repo: &Repository) -> Result<Vec<CaptureInfo>, LogicalError> {
    let objects = repo.store().list(layout::LOGICAL_DIR).await?;
    let mut ids: HashMap<String, (bool, Option<chrono::DateTime<chrono::Utc>>)> = HashMap::new();
    for o in &objects {
        let Some(id) = layout::logical_id_of(&o.key) else { continue };
        let e = ids.entry(id.to_string()).or_default();
        if o.key == layout::logical_manifest(id) {
            e.0 = true;
        } else if o.key == layout::logical_running(id) {
            e.1 = Some(o.last_modified);
        }
    }
    let mut ids: Vec<_> = ids.into_iter().collect();
    ids.sort_by(|a, b| a.0.cmp(&b.0));
    let loaded = futures::stream::iter(ids)
        .map(|(id, (done, marker_time))| async move {
            if done {
                let catalog = load_catalog(repo, &id).await?;
                return Ok(CaptureInfo {
                    id,
                    status: Status::Done,
                    catalog: Some(catalog),
                    started_at: None,
                    pending_name: None,
                    error: None,
                    last_seen: None,
                });
            }
            let marker = match repo.get_object(&layout::logical_running(&id)).await {
                Ok(d) => serde_json::from_slice::<Marker>(&d.content).ok(),
                Err(_) => None,
            };
            let fresh = marker_time
                .is_some_and(|t| chrono::Utc::now() - t < chrono::Duration::from_std(HEARTBEAT * 3).unwrap());
            let error = marker.as_ref().and_then(|m| m.error.clone());
            let status = if fresh && error.is_none() { Status::Running } else { Status::Failed };
            let error = error.or((status == Status::Failed).then(|| "interrupted (no manifest, marker stale)".into()));
            Ok::<_, LogicalError>(CaptureInfo {
                id,
                status,
                catalog: None,
                started_at: marker.as_ref().map(|m| m.started_at.clone()),
                pending_name: marker.as_ref().and_then(|m| m.name.clone()),
                error,
                last_seen: marker_time,
            })
        })
        .buffered(8)
        .collect::<Vec<_>>()
        .await;
    loaded.into_iter().collect()
}

/// A DONE capture's catalog, from the manifest's clear metadata (a range request, no key).
pub async fn load_catalog(repo: &Repository, id: &str) -> Result<Catalog, LogicalError> {
    let key = layout::logical_manifest(id);
    let meta = repo.object_meta(&key).await?;
    let c = meta.get("catalog").ok_or_else(|| LogicalError::Corrupt {
        key: key.clone(),
        reason: "the manifest's metadata has no catalog".into(),
    })?;
    serde_json::from_value(c.clone())
        .map_err(|e| LogicalError::Corrupt { key, reason: format!("catalog metadata: {e}") })
}

/// A DONE capture's manifest (decrypted with the repository's keys when encrypted).
pub async fn load_manifest(repo: &Repository, id: &str) -> Result<CaptureManifest, LogicalError> {
    let key = layout::logical_manifest(id);
    let d = repo.get_object(&key).await?;
    let m: CaptureManifest =
        serde_json::from_slice(&d.content).map_err(|e| LogicalError::Corrupt { key, reason: e.to_string() })?;
    if m.format > MANIFEST_FORMAT {
        return Err(LogicalError::Invalid(format!(
            "capture {id}: manifest format {} is newer than this walnut understands ({MANIFEST_FORMAT}): upgrade walnut",
            m.format
        )));
    }
    Ok(m)
}

/// Finds a DONE capture by ID, name or `LATEST`.
pub async fn resolve_info(repo: &Repository, reference: &str) -> Result<CaptureInfo, LogicalError> {
    let all = list(repo).await?;
    find(&all, reference).cloned().ok_or_else(|| LogicalError::NotFound(reference.to_string()))
}

/// The DONE capture `reference` names in `all` (ID, name, or LATEST: the newest).
pub fn find<'a>(all: &'a [CaptureInfo], reference: &str) -> Option<&'a CaptureInfo> {
    let done = all.iter().filter(|c| c.status == Status::Done);
    if reference.eq_ignore_ascii_case("latest") {
        return done.max_by(|a, b| a.id.cmp(&b.id));
    }
    let done: Vec<&CaptureInfo> = done.collect();
    done.iter()
        .find(|c| c.id == reference)
        .or_else(|| done.iter().find(|c| c.catalog.as_ref().and_then(|k| k.name.as_deref()) == Some(reference)))
        .copied()
}

/// Finds a DONE capture and reads its manifest.
pub async fn resolve(repo: &Repository, reference: &str) -> Result<CaptureManifest, LogicalError> {
    let info = resolve_info(repo, reference).await?;
    load_manifest(repo, &info.id).await
}

/// Deletes a capture: the manifest first (it is no longer DONE), then its other objects. A
/// RUNNING capture is refused (cancel it first); `reference` may name a FAILED one by ID.
pub async fn delete(repo: &Repository, reference: &str) -> Result<CaptureInfo, LogicalError> {
    let all = list(repo).await?;
    let info = match find(&all, reference) {
        Some(i) => i.clone(),
        None => match all.iter().find(|c| c.id == reference) {
            Some(i) => i.clone(),
            None => return Err(LogicalError::NotFound(reference.to_string())),
        },
    };
    if info.status == Status::Running {
        return Err(LogicalError::Invalid(format!(
            "capture {} is RUNNING: cancel it first (Ctrl-C or SIGTERM to its walnut, or the agent's API); a capture whose process is gone turns FAILED within 30 s",
            info.id
        )));
    }
    delete_objects(repo, &info.id).await?;
    Ok(info)
}

/// Applies retention (`keep`) to the captures: decides with [`retention::plan`] and, when
/// `execute`, deletes those not kept. Returns every decision.
pub async fn prune(
    repo: &Repository,
    keep: &retention::Keep,
    now: chrono::DateTime<chrono::Utc>,
    execute: bool,
) -> Result<Vec<retention::Decision>, LogicalError> {
    let all = list(repo).await?;
    let candidates: Vec<retention::Candidate> = all
        .iter()
        .map(|c| retention::Candidate {
            id: c.id.clone(),
            status: c.status,
            time: match &c.catalog {
                Some(k) => k.start_time,
                // Unknown: as if just seen, so it is kept its grace.
                None => c.last_seen.unwrap_or(now),
            },
            scheduled: c.catalog.as_ref().is_some_and(|k| k.scheduled),
        })
        .collect();
    let decisions = retention::plan(&candidates, keep, now);
    if execute {
        for d in decisions.iter().filter(|d| !d.keep) {
            delete_objects(repo, &d.id).await?;
        }
    }
    Ok(decisions)
}

/// Removes every object of capture `id`, the manifest first.
pub(crate) async fn delete_objects(repo: &Repository, id: &str) -> Result<(), LogicalError> {
    let manifest = layout::logical_manifest(id);
    repo.store().delete(&manifest).await?;
    let objects = repo.store().list(&layout::logical_dir(id)).await?;
    for o in objects {
        repo.store().delete(&o.key).await?;
    }
    Ok(())
}

/// Validates a capture name: as backup names, `[A-Za-z0-9._-]{1,64}`, not an ID, not LATEST.
pub fn check_name(name: &str) -> Result<(), LogicalError> {
    crate::backup::check_name(name).map_err(|_| {
        LogicalError::Invalid(format!(
            "invalid capture name {name:?}: use 1 to 64 characters from A-Z a-z 0-9 . _ - (not LATEST, not a capture ID)"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str, status: Status, name: Option<&str>) -> CaptureInfo {
        let t = chrono::Utc::now();
        CaptureInfo {
            id: id.into(),
            status,
            catalog: (status == Status::Done).then(|| Catalog {
                name: name.map(str::to_string),
                scheduled: false,
                database: "app".into(),
                databases: vec!["app".into()],
                all: false,
                source: Source::Server,
                pg_version_num: 150000,
                start_time: t,
                end_time: t,
                dump_bytes: 1,
                stored_bytes: 1,
                tables: 1,
            }),
            started_at: None,
            pending_name: None,
            error: None,
            last_seen: None,
        }
    }

    #[test]
    fn references() {
        let all = [
            info("20260101T000000", Status::Done, Some("before")),
            info("20260102T000000", Status::Done, None),
            info("20260103T000000", Status::Failed, None),
        ];
        assert_eq!(find(&all, "LATEST").unwrap().id, "20260102T000000", "LATEST is the newest DONE");
        assert_eq!(find(&all, "latest").unwrap().id, "20260102T000000");
        assert_eq!(find(&all, "before").unwrap().id, "20260101T000000");
        assert_eq!(find(&all, "20260102T000000").unwrap().id, "20260102T000000");
        assert!(find(&all, "20260103T000000").is_none(), "a FAILED capture is no reference to restore");
        assert!(find(&all, "nope").is_none());
    }

    #[tokio::test]
    async fn listing_marks_and_deletes() {
        let repo = Repository::new(walnut_storage::open("memory://", &Default::default()).unwrap());
        let codec = Codec::default();
        let t = chrono::Utc::now();
        let m = CaptureManifest {
            format: MANIFEST_FORMAT,
            id: "20260101T000000".into(),
            name: Some("nightly".into()),
            scheduled: false,
            source: Source::Server,
            all: false,
            system_identifier: "1".into(),
            pg_version_num: 150004,
            pg_major: 15,
            tool_version: "pg_dump (PostgreSQL) 15.4".into(),
            start_time: crate::timefmt::as_stored(t),
            end_time: crate::timefmt::as_stored(t),
            databases: vec![DatabaseDump {
                database: "app".into(),
                format: "custom".into(),
                tables: 3,
                object: StoredObject {
                    key: layout::logical_dump("20260101T000000", 1),
                    stored_bytes: 10,
                    content_bytes: 20,
                    content_sha256: "00".into(),
                },
                table_data: None,
            }],
            globals: None,
            dump_bytes: 20,
            stored_bytes: 10,
            compression: "zstd".into(),
        };
        repo.store().put(&m.databases[0].object.key, "x".into(), PutMode::Create).await.unwrap();
        repo.store().put(&layout::logical_manifest(&m.id), manifest_object(&m, &codec), PutMode::Create).await.unwrap();
        let failed =
            Marker { started_at: "x".into(), host: "h".into(), pid: 1, name: None, error: Some("boom".into()) };
        repo.store()
            .put(&layout::logical_running("20260102T000000"), crate::lock::json_record(&failed), PutMode::Create)
            .await
            .unwrap();
        let all = list(&repo).await.unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].status, Status::Done);
        let c = all[0].catalog.as_ref().unwrap();
        assert_eq!((c.database.as_str(), c.tables, c.name.as_deref()), ("app", 3, Some("nightly")));
        assert_eq!(all[1].status, Status::Failed);
        assert_eq!(all[1].error.as_deref(), Some("boom"));
        assert_eq!(resolve(&repo, "nightly").await.unwrap().id, m.id);
        delete(&repo, "nightly").await.unwrap();
        delete(&repo, "20260102T000000").await.unwrap();
        assert!(repo.store().list(layout::LOGICAL_DIR).await.unwrap().is_empty());
        assert!(matches!(resolve(&repo, "nightly").await, Err(LogicalError::NotFound(_))));
    }
}
