//! The catalog: listing backups (DONE from manifests, RUNNING/FAILED from markers), resolving
//! a reference (ID, name, LATEST), and claiming new backup IDs.

use super::*;

#[derive(Debug, Clone, Deserialize, Serialize)]
pub(super) struct RunningMarker {
    pub(super) started_at: String,
    pub(super) host: String,
    pub(super) pid: u32,
    #[serde(default)]
    pub(super) error: Option<String>,
}

/// Every backup in the repository, oldest first.
pub async fn list(repo: &Repository) -> Result<Vec<BackupInfo>, BackupError> {
    let objects = repo.store().list(layout::BACKUPS_DIR).await?;
    let mut ids: HashMap<String, (bool, Option<chrono::DateTime<chrono::Utc>>)> = HashMap::new();
    for o in &objects {
        let Some(id) = layout::backup_id_of(&o.key) else { continue };
        let e = ids.entry(id.to_string()).or_default();
        if o.key == layout::backup_manifest(id) {
            e.0 = true;
        } else if o.key == layout::backup_running(id) {
            e.1 = Some(o.last_modified);
        }
    }
    let mut ids: Vec<_> = ids.into_iter().collect();
    ids.sort_by(|a, b| a.0.cmp(&b.0));
    let loaded = futures::stream::iter(ids)
        .map(|(key_id, (has_manifest, marker))| async move {
            let id = BackupId::new_unchecked(key_id);
            if has_manifest {
                let summary = load_catalog(repo, &id).await?.summary;
                return Ok(BackupInfo {
                    id,
                    status: Status::Done,
                    manifest: Some(summary),
                    chain_stored_bytes: None,
                    error: None,
                });
            }
            let marker_doc = match repo.get_object(&layout::backup_running(&id)).await {
                Ok(d) => serde_json::from_slice::<RunningMarker>(&d.content).ok(),
                Err(_) => None,
            };
            let fresh =
                marker.is_some_and(|t| chrono::Utc::now() - t < chrono::Duration::from_std(HEARTBEAT * 3).unwrap());
            let error = marker_doc.as_ref().and_then(|m| m.error.clone());
            let status = if fresh && error.is_none() { Status::Running } else { Status::Failed };
            let error = error.or((status == Status::Failed).then(|| "interrupted (no manifest, marker stale)".into()));
            Ok::<_, BackupError>(BackupInfo { id, status, manifest: None, chain_stored_bytes: None, error })
        })
        .buffered(8)
        .collect::<Vec<_>>()
        .await;
    let mut all: Vec<BackupInfo> = loaded.into_iter().collect::<Result<_, _>>()?;
    let stored: HashMap<BackupId, u64> =
        all.iter().filter_map(|b| b.manifest.as_ref().map(|m| (b.id.clone(), m.stored_bytes))).collect();
    for b in &mut all {
        if let Some(m) = b.manifest.as_ref().filter(|m| !m.chain.is_empty()) {
            // A member missing from the listing counts nothing (verify and restore name it).
            b.chain_stored_bytes = Some(m.stored_bytes + m.chain.iter().filter_map(|c| stored.get(c)).sum::<u64>());
        }
    }
    Ok(all)
}

/// A DONE backup's catalog: read from the manifest's (clear, checksummed) metadata, with a range
/// request, so that listing needs no key and no file list; from the manifest itself for
/// manifests written before walnut recorded it.
pub async fn load_catalog(repo: &Repository, id: &str) -> Result<Catalog, BackupError> {
    let key = layout::backup_manifest(id);
    let meta = repo.object_meta(&key).await?;
    match meta.get("catalog") {
        Some(c) => serde_json::from_value(c.clone())
            .map_err(|e| BackupError::Corrupt { key, reason: format!("catalog metadata: {e}") }),
        None => Ok(Catalog::from(&load_manifest(repo, id).await?)),
    }
}

/// Finds a DONE backup by ID, name or `LATEST`: its ID and summary (no key needed).
pub async fn resolve_summary(repo: &Repository, reference: &str) -> Result<BackupInfo, BackupError> {
    let all = list(repo).await?;
    let done: Vec<BackupInfo> = all.into_iter().filter(|b| b.status == Status::Done).collect();
    let found = if reference.eq_ignore_ascii_case("latest") {
        done.last().cloned()
    } else {
        done.iter()
            .find(|b| b.id == reference)
            .or_else(|| done.iter().find(|b| b.manifest.as_ref().and_then(|m| m.name.as_deref()) == Some(reference)))
            .cloned()
    };
    found.ok_or_else(|| BackupError::NotFound(reference.to_string()))
}

pub async fn load_manifest(repo: &Repository, id: &str) -> Result<Manifest, BackupError> {
    let d = repo.get_object(&layout::backup_manifest(id)).await?;
    let m: Manifest = serde_json::from_slice(&d.content)
        .map_err(|e| BackupError::Corrupt { key: layout::backup_manifest(id), reason: e.to_string() })?;
    if m.format > MANIFEST_FORMAT_INCREMENTAL {
        return Err(BackupError::Invalid(format!(
            "backup {id}: manifest format {} is newer than this walnut understands ({MANIFEST_FORMAT_INCREMENTAL}): upgrade walnut",
            m.format
        )));
    }
    Ok(m)
}

/// Finds a DONE backup by ID, name or `LATEST`.
pub async fn resolve(repo: &Repository, reference: &str) -> Result<Manifest, BackupError> {
    let b = resolve_summary(repo, reference).await?;
    load_manifest(repo, &b.id).await
}

/// Claims a new backup ID by writing its RUNNING marker create-only: two backups started in the
/// same second (in any process) can never share an ID, hence never each other's objects.
pub(super) async fn claim_backup_id(
    repo: &Repository,
    now: chrono::DateTime<chrono::Utc>,
    marker: &RunningMarker,
) -> Result<String, BackupError> {
    let base = now.format("%Y%m%dT%H%M%S").to_string();
    for n in 0..100 {
        let id = if n == 0 { base.clone() } else { format!("{base}-{n}") };
        // A leftover of an old backup under this ID (objects but no marker) also keeps it taken.
        if !repo.store().list(&layout::backup_dir(&id)).await?.is_empty() {
            continue;
        }
        match repo.store().put(&layout::backup_running(&id), json_object(marker), PutMode::Create).await {
            Ok(()) => return Ok(id),
            Err(StorageError::AlreadyExists { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(BackupError::Invalid("too many backups started in one second".into()))
}

/// The repository-wide backup lock ([`layout::BACKUP_LOCK`]), taken create-only.
pub(super) async fn take_backup_lock(repo: &Repository, marker: &RunningMarker) -> Result<(), BackupError> {
    let me = crate::lock::Holder {
        started_at: marker.started_at.clone(),
        host: marker.host.clone(),
        pid: marker.pid,
        what: None,
    };
    crate::lock::take(repo, layout::BACKUP_LOCK, json_object(marker), &me).await.map_err(|e| match e {
        crate::lock::LockError::Held(who) => BackupError::Busy(who),
        crate::lock::LockError::Storage(e) => e.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker() -> RunningMarker {
        // pid 1 exists on every Linux host, so this holder is alive.
        RunningMarker { started_at: "2026-01-01T00:00:00Z".into(), host: "h".into(), pid: 1, error: None }
    }

    /// IDs are claimed create-only: the same second gives distinct IDs, never a shared one.
    #[tokio::test]
    async fn ids_are_unique_by_construction_and_the_lock_is_exclusive() {
        let repo = Repository::new(walnut_storage::open("memory://", &Default::default()).unwrap());
        let now = chrono::Utc::now();
        let a = claim_backup_id(&repo, now, &marker()).await.unwrap();
        let b = claim_backup_id(&repo, now, &marker()).await.unwrap();
        assert_ne!(a, b);
        assert_eq!(b, format!("{a}-1"));
        take_backup_lock(&repo, &marker()).await.unwrap();
        let e = take_backup_lock(&repo, &marker()).await.unwrap_err().to_string();
        assert!(e.contains("another backup is already running") && e.contains("pid 1"), "{e}");
    }
}
