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
        .map(|(id, (has_manifest, marker))| async move {
            if has_manifest {
                let m = load_manifest(repo, &id).await?;
                return Ok(BackupInfo { id, status: Status::Done, manifest: Some((&m).into()), error: None });
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
            Ok::<_, BackupError>(BackupInfo { id, status, manifest: None, error })
        })
        .buffered(8)
        .collect::<Vec<_>>()
        .await;
    loaded.into_iter().collect()
}

pub async fn load_manifest(repo: &Repository, id: &str) -> Result<Manifest, BackupError> {
    let d = repo.get_object(&layout::backup_manifest(id)).await?;
    serde_json::from_slice(&d.content)
        .map_err(|e| BackupError::Corrupt { key: layout::backup_manifest(id), reason: e.to_string() })
}

/// Finds a DONE backup by ID, name or `LATEST`.
pub async fn resolve(repo: &Repository, reference: &str) -> Result<Manifest, BackupError> {
    let all = list(repo).await?;
    let done: Vec<&BackupInfo> = all.iter().filter(|b| b.status == Status::Done).collect();
    let found = if reference.eq_ignore_ascii_case("latest") {
        done.last().copied()
    } else {
        done.iter()
            .find(|b| b.id == reference)
            .or_else(|| done.iter().find(|b| b.manifest.as_ref().and_then(|m| m.name.as_deref()) == Some(reference)))
            .copied()
    };
    match found {
        Some(b) => load_manifest(repo, &b.id).await,
        None => Err(BackupError::NotFound(reference.to_string())),
    }
}

pub(super) async fn new_backup_id(
    repo: &Repository,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<String, BackupError> {
    let base = now.format("%Y%m%dT%H%M%S").to_string();
    for n in 0..100 {
        let id = if n == 0 { base.clone() } else { format!("{base}-{n}") };
        if repo.store().list(&layout::backup_dir(&id)).await?.is_empty() {
            return Ok(id);
        }
    }
    Err(BackupError::Invalid("too many backups started in one second".into()))
}
