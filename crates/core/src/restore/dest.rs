//! Where a restore writes: the data directory DEST and each tablespace's directory. Every one is
//! checked (absent or empty, tablespaces outside DEST and used once) before anything is written,
//! and a failed restore removes what it wrote, leaving each directory as it found it.

use super::RestoreError;
use crate::backup::Manifest;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn invalid(msg: String) -> RestoreError {
    RestoreError::Invalid(msg)
}

/// The file a restore (or backup-fetch) keeps in each directory it writes until it is done: a
/// directory holding it is an interrupted restore (killed, the machine lost power), which a re-run
/// may remove and start over; a directory without it is never touched.
pub const IN_PROGRESS: &str = ".walnut-restore-in-progress";

/// Checks that `dest` is absent or an empty directory (or an interrupted restore's, which is
/// emptied); returns whether it existed.
pub fn check_dest(dest: &Path) -> Result<bool, RestoreError> {
    match std::fs::read_dir(dest) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                if dest.join(IN_PROGRESS).exists() {
                    tracing::warn!("{} holds an interrupted walnut restore: starting over", dest.display());
                    clean_dest(dest, true);
                    return Ok(true);
                }
                return Err(invalid(format!(
                    "{} is not empty: restore into an empty or new directory",
                    dest.display()
                )));
            }
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
            Err(invalid(format!("{} is a file, not a directory", dest.display())))
        }
        Err(e) => Err(RestoreError::io(format!("read {}", dest.display()))(e)),
    }
}

/// Creates `dest` (0700) if needed.
pub fn create_dest(dest: &Path) -> Result<(), RestoreError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dest).map_err(RestoreError::io(format!("create {}", dest.display())))?;
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o700))
        .map_err(RestoreError::io(format!("chmod {}", dest.display())))
}

/// Marks `dir` as being written by a restore (see [`IN_PROGRESS`]), creating it (0700) if needed.
pub fn mark_in_progress(dir: &Path) -> Result<(), RestoreError> {
    create_dest(dir)?;
    let marker = dir.join(IN_PROGRESS);
    crate::durable::write(
        &marker,
        b"walnut is restoring into this directory; it is incomplete until this file is gone\n",
    )
    .map_err(RestoreError::io(format!("write {}", marker.display())))
}

/// The restore into `dir` is complete: removes the marker (durably).
pub fn mark_done(dir: &Path) -> Result<(), RestoreError> {
    let marker = dir.join(IN_PROGRESS);
    match std::fs::remove_file(&marker) {
        Ok(()) => std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(RestoreError::io(format!("fsync {}", dir.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(RestoreError::io(format!("remove {}", marker.display()))(e)),
    }
}

/// Removes what a failed restore left in `dest` (which was empty or absent before).
pub fn clean_dest(dest: &Path, existed: bool) {
    if existed {
        if let Ok(rd) = std::fs::read_dir(dest) {
            for e in rd.flatten() {
                let p = e.path();
                let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            }
        }
    } else {
        let _ = std::fs::remove_dir_all(dest);
    }
}

/// Where one tablespace of a backup is restored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TablespaceTarget {
    pub oid: String,
    pub name: String,
    pub dir: PathBuf,
    #[serde(skip)]
    existed: bool,
}

impl TablespaceTarget {
    /// Removes what a failed restore left in the directory (which was empty or absent before).
    pub fn clean(&self) {
        clean_dest(&self.dir, self.existed);
    }
}

/// Where each tablespace of `m` goes: `maps` (`NAME=DIR` or `OID=DIR`, from `--tablespace-map`),
/// else its location in the source (as pg_basebackup and pgBackRest do). Each directory must be
/// absent or empty, outside DEST, and used once; all of it is checked before anything is written.
pub fn tablespace_targets(m: &Manifest, dest: &Path, maps: &[String]) -> Result<Vec<TablespaceTarget>, RestoreError> {
    let known =
        || m.tablespaces.iter().map(|t| format!("{} (oid {})", t.display_name(), t.oid)).collect::<Vec<_>>().join(", ");
    let mut chosen: HashMap<&str, PathBuf> = Default::default();
    for map in maps {
        let Some((key, dir)) = map.split_once('=') else {
            return Err(invalid(format!("--tablespace-map {map:?}: expected NAME=DIR or OID=DIR")));
        };
        let Some(t) = m.tablespaces.iter().find(|t| t.oid == key || t.name.as_deref() == Some(key)) else {
            if m.tablespaces.is_empty() {
                return Err(invalid(format!("--tablespace-map {key}: backup {} has no tablespaces", m.id)));
            }
            return Err(invalid(format!(
                "--tablespace-map {key}: backup {} has no such tablespace (it has {})",
                m.id,
                known()
            )));
        };
        let dir = PathBuf::from(dir);
        if !dir.is_absolute() {
            return Err(invalid(format!("--tablespace-map {map:?}: the directory must be an absolute path")));
        }
        chosen.insert(&t.oid, dir);
    }
    let dest_abs = std::path::absolute(dest).map_err(RestoreError::io(format!("resolve {}", dest.display())))?;
    let mut out: Vec<TablespaceTarget> = Vec::new();
    for t in &m.tablespaces {
        let mapped = chosen.contains_key(t.oid.as_str());
        let dir = chosen.remove(t.oid.as_str()).unwrap_or_else(|| PathBuf::from(&t.location));
        let name = t.display_name().to_string();
        let fix = format!("give it an empty directory with --tablespace-map {name}=/new/dir");
        if dir.starts_with(&dest_abs) {
            return Err(invalid(format!(
                "tablespace {name} (oid {}) cannot go to {}, inside DEST: {fix}",
                t.oid,
                dir.display()
            )));
        }
        if let Some(o) = out.iter().find(|o| o.dir == dir) {
            return Err(invalid(format!(
                "tablespaces {} and {name} would both go to {}: {fix}",
                o.name,
                dir.display()
            )));
        }
        let existed = check_dest(&dir).map_err(|e| {
            let whose = if mapped { "the directory given" } else { "its location in the source" };
            invalid(format!(
                "tablespace {name} (oid {}) would be restored to {} ({whose}): {e}; {fix}",
                t.oid,
                dir.display()
            ))
        })?;
        out.push(TablespaceTarget { oid: t.oid.clone(), name, dir, existed });
    }
    Ok(out)
}
