//! walnut's own working state on local disk, per repository instance: upload-ahead records and
//! the prefetch spool. Never inside PGDATA, never PostgreSQL's own status files.
//!
//! ```text
//! <state_dir>/repos/<hash of the URL>/<identity key>/ahead/<WAL name>  "<sha256 hex> <object size>"
//! <state_dir>/repos/<hash of the URL>/<identity key>/spool/<WAL name>  the stored object, as fetched
//! <state_dir>/repos/<hash of the URL>/<identity key>/spool/.lock       held by the one prefetcher
//! ```
//! The identity key ([`crate::repo::Identity::state_key`]) names the repository *instance*: a
//! repository wiped and re-created at the same URL (another cluster, or the same one) gets a new
//! one, so nothing spooled or recorded for the old repository is ever handed out for the new. The
//! state directory is the running user's alone: created 0700, and refused when another user owns
//! it (a spool others can write to could feed PostgreSQL foreign WAL).
//!
//! Losing any of it is harmless: a missing record means an upload is repeated (and found
//! identical), a missing spool file means a fetch from the repository.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

/// What upload-ahead recorded about a WAL file it stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AheadRecord {
    pub sha256: [u8; 32],
    pub object_size: u64,
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    crate::durable::write(path, data)
}

impl StateDir {
    /// The state of the repository described by `repo`, whose identity is `identity`, below `base`.
    pub fn open(base: &Path, repo: &str, identity: &crate::repo::Identity) -> std::io::Result<StateDir> {
        if base.as_os_str().is_empty() {
            return Err(std::io::Error::new(
                ErrorKind::NotFound,
                "no state directory: set state_dir (or WALNUT_STATE_DIR); the user has no home directory",
            ));
        }
        private_dir(base)?;
        let hash = hex::encode(&crate::envelope::sha256(repo.as_bytes())[..8]);
        let root = base.join("repos").join(hash).join(identity.state_key());
        fs::create_dir_all(root.join("ahead"))?;
        fs::create_dir_all(root.join("spool"))?;
        // A note for humans poking around.
        let about = root.join("repository");
        if !about.exists() {
            let _ = write_atomic(&about, format!("{repo}\n").as_bytes());
        }
        Ok(StateDir { root })
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.root.join("spool")
    }

    pub fn spool_path(&self, name: &str) -> PathBuf {
        self.spool_dir().join(name)
    }

    pub fn record_ahead(&self, name: &str, rec: &AheadRecord) -> std::io::Result<()> {
        let text = format!("{} {}\n", hex::encode(rec.sha256), rec.object_size);
        write_atomic(&self.root.join("ahead").join(name), text.as_bytes())
    }

    pub fn ahead(&self, name: &str) -> Option<AheadRecord> {
        let text = fs::read_to_string(self.root.join("ahead").join(name)).ok()?;
        let (sum, size) = text.trim().split_once(' ')?;
        let mut sha256 = [0u8; 32];
        hex::decode_to_slice(sum, &mut sha256).ok()?;
        Some(AheadRecord { sha256, object_size: size.parse().ok()? })
    }

    pub fn forget_ahead(&self, name: &str) {
        let _ = fs::remove_file(self.root.join("ahead").join(name));
    }

    /// Names that have an upload-ahead record.
    pub fn ahead_names(&self) -> Vec<String> {
        list_names(&self.root.join("ahead"))
    }

    /// Names in the spool.
    pub fn spooled(&self) -> Vec<String> {
        list_names(&self.spool_dir())
    }

    pub fn write_spool(&self, name: &str, object: &[u8]) -> std::io::Result<()> {
        write_atomic(&self.spool_path(name), object)
    }

    /// Takes the spool's lock without waiting: `None` if another prefetcher holds it.
    pub fn try_lock_spool(&self) -> std::io::Result<Option<fs::File>> {
        use fs2::FileExt;
        let f = fs::OpenOptions::new().create(true).truncate(false).write(true).open(self.spool_dir().join(".lock"))?;
        match f.try_lock_exclusive() {
            Ok(()) => Ok(Some(f)),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.raw_os_error() == Some(11) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Creates `dir` (0700) if missing, and checks that the running user owns it and that no other
/// user can write into it.
pub(crate) fn private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = fs::metadata(dir)?;
    let me = walnut_storage::local::effective_uid()
        .ok_or_else(|| std::io::Error::other("cannot tell which user walnut runs as (/proc/self)"))?;
    if meta.uid() != me {
        return Err(std::io::Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "{} belongs to uid {}, not to the user walnut runs as (uid {me}): give walnut a state directory of its own",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    if meta.mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

fn list_names(dir: &Path) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else { return vec![] };
    rd.filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::Identity;
    use walnut_pg::{PgMajor, SystemId, WalSegSize};

    fn identity(sysid: u64, instance: &str) -> Identity {
        let mut i = Identity::new(SystemId(sysid), PgMajor(15), WalSegSize::DEFAULT);
        i.instance = Some(instance.into());
        i
    }

    #[test]
    fn records_round_trip_and_repos_are_separate() {
        let d = tempfile::tempdir().unwrap();
        let a = StateDir::open(d.path(), "s3://a", &identity(1, "x")).unwrap();
        let b = StateDir::open(d.path(), "s3://b", &identity(1, "x")).unwrap();
        let rec = AheadRecord { sha256: [7; 32], object_size: 123 };
        a.record_ahead("000000010000000000000001", &rec).unwrap();
        assert_eq!(a.ahead("000000010000000000000001"), Some(rec));
        assert_eq!(b.ahead("000000010000000000000001"), None);
        assert_eq!(a.ahead_names(), ["000000010000000000000001"]);
        a.forget_ahead("000000010000000000000001");
        assert!(a.ahead_names().is_empty());
        let lock = a.try_lock_spool().unwrap();
        assert!(lock.is_some());
    }

    /// A repository re-created at the same URL (another cluster, or the same cluster again) is
    /// another instance: what was spooled for the old one is not seen by the new.
    #[test]
    fn a_recreated_repository_gets_fresh_state() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("state");
        let old = StateDir::open(&base, "file:///r", &identity(1, "first")).unwrap();
        old.write_spool("000000010000000000000002", b"old cluster's segment").unwrap();
        let rec = AheadRecord { sha256: [1; 32], object_size: 9 };
        old.record_ahead("000000010000000000000003", &rec).unwrap();
        for other in [identity(2, "second"), identity(1, "second")] {
            let new = StateDir::open(&base, "file:///r", &other).unwrap();
            assert!(new.spooled().is_empty() && new.ahead_names().is_empty());
            assert!(!new.spool_path("000000010000000000000002").exists());
        }
        assert_eq!(std::fs::metadata(&base).unwrap().permissions().mode() & 0o777, 0o700);
        // A state directory others can write to is made private.
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
        StateDir::open(&base, "file:///r", &identity(1, "first")).unwrap();
        assert_eq!(std::fs::metadata(&base).unwrap().permissions().mode() & 0o777, 0o700);
        assert!(StateDir::open(Path::new(""), "file:///r", &identity(1, "first")).is_err());
    }
}
