//! walnut's own working state on local disk, per repository instance: upload-ahead records and
//! the prefetch spool. Never inside PGDATA, never PostgreSQL's own status files.
//!
//! ```text
//! <state_dir>/repos/<hash of the URL>/<identity key>/ahead/<WAL name>  "<sha256 hex> <object size>"
//! <state_dir>/repos/<hash of the URL>/<identity key>/spool/<WAL name>  a fetched file, verified
//! <state_dir>/repos/<hash of the URL>/<identity key>/spool/.<WAL name>.crc32c  its CRC-32C
//! <state_dir>/repos/<hash of the URL>/<identity key>/spool/.lock       held by the one prefetcher
//! <state_dir>/repos/<hash of the URL>/<identity key>/spool/.wanted     the last name wal-fetch asked for
//! ```
//! A spooled file is the WAL file itself, checked against the repository's SHA-256 when it was
//! spooled; handing it out checks its CRC-32C (a bit flipped on local disk since) and renames it
//! into place, so a segment is decoded once.
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

    /// Writes a small record of this repository instance's (durably, replacing the last).
    pub fn write_file(&self, name: &str, data: &[u8]) -> std::io::Result<()> {
        write_atomic(&self.root.join(name), data)
    }

    /// Reads a record written by [`StateDir::write_file`].
    pub fn read_file(&self, name: &str) -> Option<Vec<u8>> {
        fs::read(self.root.join(name)).ok()
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

    fn spool_crc_path(&self, name: &str) -> PathBuf {
        self.spool_dir().join(format!(".{name}.crc32c"))
    }

    /// Spools `content`, the verified WAL file `name` (the file first, then its CRC: a file
    /// without its CRC is not spooled).
    /// Spools `content` as `name`: the file, then its CRC-32C. Neither is fsynced: after a crash
    /// a file without its CRC, or one that fails it, is never handed out (it is fetched again).
    pub fn write_spool(&self, name: &str, content: &[u8]) -> std::io::Result<()> {
        let crc = format!("{:08x}\n", crc32c::crc32c(content));
        crate::durable::write_unsynced(&self.spool_path(name), content)?;
        crate::durable::write_unsynced(&self.spool_crc_path(name), crc.as_bytes())
    }

    /// Drops `name` from the spool.
    pub fn drop_spooled(&self, name: &str) {
        let _ = fs::remove_file(self.spool_crc_path(name));
        let _ = fs::remove_file(self.spool_path(name));
    }

    /// Hands the spooled `name` out as `dest`: checks its CRC and links it into place (a copy
    /// across file systems). Not fsynced: PostgreSQL fsyncs a restored file it keeps as it renames
    /// it into pg_wal, and reads the others once. `Ok(false)` when `name` is not spooled; an error
    /// (the spooled copy dropped) when it fails the check.
    pub fn take_spooled(&self, name: &str, dest: &Path) -> std::io::Result<bool> {
        let (path, crc_path) = (self.spool_path(name), self.spool_crc_path(name));
        let Ok(want) = fs::read_to_string(&crc_path) else { return Ok(false) };
        let crc = match fs::File::open(&path) {
            Ok(f) => file_crc(&f)?,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        if u32::from_str_radix(want.trim(), 16).ok() != Some(crc) {
            self.drop_spooled(name);
            return Err(std::io::Error::new(ErrorKind::InvalidData, format!("spooled {name} fails its CRC-32C")));
        }
        // A second link, not a move: the spooled copy stays (with its CRC) until the prefetcher
        // drops it once recovery has moved on, since recovery asks for its last segment again
        // when it ends. PostgreSQL removes %p before it asks and only reads what it gets.
        let _ = fs::remove_file(dest);
        match fs::hard_link(&path, dest) {
            Ok(()) => {}
            // Another file system: a copy, checked again.
            Err(e) if e.raw_os_error() == Some(18) => {
                let content = fs::read(&path)?;
                if crc32c::crc32c(&content) != crc {
                    return Err(std::io::Error::new(ErrorKind::InvalidData, format!("spooled {name} changed")));
                }
                crate::durable::write_unsynced(dest, &content)?
            }
            Err(e) => return Err(e),
        }
        Ok(true)
    }

    /// Notes the last name wal-fetch asked for (what the prefetcher stays ahead of).
    pub fn set_wanted(&self, name: &str) {
        let _ = fs::write(self.spool_dir().join(".wanted"), name);
    }

    pub fn wanted(&self) -> Option<String> {
        fs::read_to_string(self.spool_dir().join(".wanted")).ok().map(|s| s.trim().to_string())
    }

    /// Whether a prefetcher holds the spool's lock (without taking it).
    pub fn spool_locked(&self) -> bool {
        matches!(self.try_lock_spool(), Ok(None))
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

/// The CRC-32C of a file's content, read while recovery waits for it: the two halves of a
/// large file on two threads (recovery is idle meanwhile), through small buffers, and combined.
fn file_crc(f: &fs::File) -> std::io::Result<u32> {
    use std::os::unix::fs::FileExt;
    // The CRC of [from, to) and how many bytes were there.
    let part = |from: u64, to: u64| -> std::io::Result<(u32, u64)> {
        let (mut crc, mut buf, mut at) = (0u32, vec![0u8; 256 << 10], from);
        while at < to {
            let want = buf.len().min((to - at) as usize);
            match f.read_at(&mut buf[..want], at) {
                Ok(0) => break,
                Ok(n) => {
                    crc = crc32c::crc32c_append(crc, &buf[..n]);
                    at += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok((crc, at - from))
    };
    let len = f.metadata()?.len();
    if len < 4 << 20 {
        return Ok(part(0, u64::MAX)?.0);
    }
    let half = len / 2;
    let (first, second) = std::thread::scope(|s| {
        let second = s.spawn(|| part(half, u64::MAX));
        (part(0, half), second.join().expect("CRC thread"))
    });
    // Combined by what was read: a file changed meanwhile fails the check, as it should.
    let (second, n) = second?;
    Ok(crc32c::crc32c_combine(first?.0, second, n as usize))
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
    fn spooled_files_are_checked_and_linked_into_place() {
        let d = tempfile::tempdir().unwrap();
        let st = StateDir::open(&d.path().join("state"), "file:///r", &identity(1, "x")).unwrap();
        let name = "000000010000000000000005";
        let dest = d.path().join("RECOVERYXLOG");
        assert!(!st.take_spooled(name, &dest).unwrap(), "nothing spooled");
        st.write_spool(name, b"wal bytes").unwrap();
        assert_eq!(st.spooled(), [name], "the CRC file is not listed");
        assert!(st.take_spooled(name, &dest).unwrap());
        assert_eq!(std::fs::read(&dest).unwrap(), b"wal bytes");
        // Linked, not copied, and kept for recovery's second request of its last segment.
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(&dest).unwrap().ino(), std::fs::metadata(st.spool_path(name)).unwrap().ino());
        std::fs::remove_file(&dest).unwrap();
        assert!(st.take_spooled(name, &dest).unwrap(), "asked again, handed out again");
        assert_eq!(std::fs::read(&dest).unwrap(), b"wal bytes");
        st.drop_spooled(name);
        assert!(st.spooled().is_empty());
        // A flipped byte: refused and dropped, the destination untouched.
        st.write_spool(name, b"wal bytes").unwrap();
        std::fs::write(st.spool_path(name), b"wal bytez").unwrap();
        std::fs::remove_file(&dest).unwrap();
        assert!(st.take_spooled(name, &dest).is_err());
        assert!(!dest.exists() && st.spooled().is_empty());
        // A file without its CRC (a crash between the two writes) is not spooled.
        std::fs::write(st.spool_path(name), b"wal bytes").unwrap();
        assert!(!st.take_spooled(name, &dest).unwrap());
    }

    /// A segment-sized file is checked in two halves on two threads: the same CRC as one pass,
    /// and a byte flipped in either half (or the file cut short) is found.
    #[test]
    fn a_large_spooled_file_is_checked_whole_in_two_halves() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("seg");
        let mut bytes: Vec<u8> = (0..(16u32 << 20) + 12345).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let crc = |p: &Path| file_crc(&fs::File::open(p).unwrap()).unwrap();
        assert_eq!(crc(&path), crc32c::crc32c(&bytes));
        for at in [10, bytes.len() / 2 - 1, bytes.len() / 2, bytes.len() - 1] {
            bytes[at] ^= 1;
            std::fs::write(&path, &bytes).unwrap();
            assert_eq!(crc(&path), crc32c::crc32c(&bytes), "flipped at {at}");
            bytes[at] ^= 1;
            assert_ne!(crc(&path), crc32c::crc32c(&bytes), "flipped at {at}");
        }
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert_ne!(crc(&path), crc32c::crc32c(&bytes));
        std::fs::write(&path, b"small").unwrap();
        assert_eq!(crc(&path), crc32c::crc32c(b"small"));
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
