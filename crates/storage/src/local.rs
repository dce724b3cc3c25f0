//! `file://` repositories: durable local writes.
//!
//! A put writes a temporary file in the target's directory (`.tmp.*`, never listed), fsyncs it,
//! then links (create-only) or renames (overwrite) it into place and fsyncs the directory, so an
//! acknowledged object survives a power loss, and a reader never sees a half-written one.

use crate::{BlobStore, ByteStream, ObjectInfo, ObjectWriter, PutMode, Result, StorageError, check_key};
use async_trait::async_trait;
use bytes::Bytes;
use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    /// When walnut runs as root in a repository owned by another user (typically `postgres`, who
    /// runs `archive_command`), what it creates is given to that owner, so the archiver can
    /// still write next to it.
    owner: Option<(u32, u32)>,
}

fn hand_over(path: &Path, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        let _ = std::os::unix::fs::chown(path, Some(uid), Some(gid));
    }
}

fn io_err(op: &'static str, key: &str, e: std::io::Error) -> StorageError {
    let key = key.to_string();
    let kind = e.kind();
    let source = Some(Box::new(e) as crate::BoxError);
    match kind {
        ErrorKind::NotFound => StorageError::NotFound { op, key, source },
        ErrorKind::AlreadyExists => StorageError::AlreadyExists { op, key, source },
        ErrorKind::PermissionDenied => StorageError::PermissionDenied {
            op,
            key,
            fix: "check the owner and mode of the repository directory (walnut runs as the user that runs \
                  archive_command, usually postgres)",
            source,
        },
        ErrorKind::Unsupported => StorageError::Unsupported { op, key, source },
        // A full disk or quota can be freed, an interrupted call can be made again; anything
        // else (I/O errors, a file where a directory should be) needs a person.
        ErrorKind::StorageFull
        | ErrorKind::QuotaExceeded
        | ErrorKind::Interrupted
        | ErrorKind::TimedOut
        | ErrorKind::WouldBlock
        | ErrorKind::ResourceBusy => StorageError::Other { op, key, retryable: true, source },
        _ => StorageError::Other { op, key, retryable: false, source },
    }
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Creates `dir` and its missing parents, fsyncing each parent whose entries changed.
fn create_dirs_durably(dir: &Path, owner: Option<(u32, u32)>) -> std::io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dirs_durably(parent, owner)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => hand_over(dir, owner),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e),
    }
    if let Some(parent) = dir.parent() {
        fsync_dir(parent)?;
    }
    Ok(())
}

/// The user this process runs as (the owner of `/proc/self`); `None` where that cannot be read.
pub fn effective_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// Whether this process runs as root: the one place walnut asks.
pub fn is_root() -> bool {
    effective_uid() == Some(0)
}

impl LocalStore {
    /// A store rooted at `root`. The directory is created by the first write, never by a read: a
    /// missing repository must read as missing (a `wal-fetch` from it is a failure, not "not
    /// archived"), not as a new empty one.
    pub fn new(root: impl Into<PathBuf>) -> Result<LocalStore> {
        use std::os::unix::fs::MetadataExt;
        let root = root.into();
        let am_root = is_root();
        // The repository's owner: its root's, or for a new repository the nearest existing
        // parent's (so `backup-push` run as root does not lock out the archiver).
        let existing = root.ancestors().find(|p| p.exists()).map(Path::to_path_buf);
        let owner =
            existing.and_then(|p| fs::metadata(p).ok()).filter(|m| am_root && m.uid() != 0).map(|m| (m.uid(), m.gid()));
        Ok(LocalStore { root, owner })
    }

    fn path(&self, op: &'static str, key: &str) -> Result<PathBuf> {
        check_key(op, key)?;
        Ok(self.root.join(key))
    }

    fn put_blocking(path: &Path, data: &[u8], mode: PutMode, owner: Option<(u32, u32)>) -> std::io::Result<()> {
        let dir = path.parent().expect("keys have a parent");
        create_dirs_durably(dir, owner)?;
        let name = path.file_name().expect("keys have a name").to_string_lossy();
        let tmp = dir.join(format!(".tmp.{name}.{}.{:016x}", std::process::id(), rand::random::<u64>()));
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            hand_over(&tmp, owner);
            f.sync_all()?;
            drop(f);
            // Written and fsynced under a temporary name, not yet in place.
            if let Some(top) = path.parent().and_then(|p| p.parent()).and_then(|p| p.file_name()) {
                crate::crashpoint::hit(&format!("put-before-commit:{}", top.to_string_lossy()));
            }
            match mode {
                PutMode::Create => fs::hard_link(&tmp, path)?,
                PutMode::Overwrite => fs::rename(&tmp, path)?,
            }
            fsync_dir(dir)
        })();
        let _ = fs::remove_file(&tmp);
        result
    }

    fn list_blocking(root: &Path, dir: &str) -> std::io::Result<Vec<ObjectInfo>> {
        let mut out = Vec::new();
        let start = if dir.is_empty() { root.to_path_buf() } else { root.join(dir) };
        let mut stack = vec![start];
        while let Some(d) = stack.pop() {
            let entries = match fs::read_dir(&d) {
                Ok(e) => e,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                let name = entry.file_name();
                if name.to_string_lossy().starts_with(".tmp.") {
                    continue;
                }
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(e),
                };
                if meta.is_dir() {
                    stack.push(entry.path());
                } else if meta.is_file() {
                    let rel = entry.path().strip_prefix(root).expect("below root").to_string_lossy().replace('\\', "/");
                    out.push(ObjectInfo {
                        key: rel,
                        size: meta.len(),
                        last_modified: meta.modified().map(Into::into).unwrap_or_default(),
                    });
                }
            }
        }
        Ok(out)
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("storage task panicked")
}

#[async_trait]
impl BlobStore for LocalStore {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<()> {
        let path = self.path("put", key)?;
        let (k, owner) = (key.to_string(), self.owner);
        blocking(move || LocalStore::put_blocking(&path, &data, mode, owner).map_err(|e| io_err("put", &k, e))).await
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        let path = self.path("get", key)?;
        let k = key.to_string();
        blocking(move || fs::read(&path).map(Bytes::from).map_err(|e| io_err("get", &k, e))).await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let path = self.path("head", key)?;
        let k = key.to_string();
        blocking(move || match fs::metadata(&path) {
            Ok(m) => Ok(Some(ObjectInfo {
                key: k,
                size: m.len(),
                last_modified: m.modified().map(Into::into).unwrap_or_default(),
            })),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("head", &k, e)),
        })
        .await
    }

    async fn list(&self, dir: &str) -> Result<Vec<ObjectInfo>> {
        if !dir.is_empty() {
            check_key("list", dir)?;
        }
        let root = self.root.clone();
        let d = dir.to_string();
        blocking(move || LocalStore::list_blocking(&root, &d).map_err(|e| io_err("list", &d, e))).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path("delete", key)?;
        let k = key.to_string();
        blocking(move || {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io_err("delete", &k, e)),
            }
            fsync_dir(path.parent().expect("keys have a parent")).map_err(|e| io_err("delete", &k, e))
        })
        .await
    }

    async fn put_writer(&self, key: &str) -> Result<Box<dyn ObjectWriter>> {
        let path = self.path("put", key)?;
        let (k, owner) = (key.to_string(), self.owner);
        blocking(move || {
            let dir = path.parent().expect("keys have a parent").to_path_buf();
            create_dirs_durably(&dir, owner).map_err(|e| io_err("put", &k, e))?;
            let name = path.file_name().expect("name").to_string_lossy().into_owned();
            let tmp = dir.join(format!(".tmp.{name}.{}.{:016x}", std::process::id(), rand::random::<u64>()));
            let file = File::create(&tmp).map_err(|e| io_err("put", &k, e))?;
            hand_over(&tmp, owner);
            Ok(Box::new(LocalWriter { file: Some(file), tmp, path, key: k }) as Box<dyn ObjectWriter>)
        })
        .await
    }

    async fn get_stream(&self, key: &str) -> Result<ByteStream> {
        use futures::StreamExt;
        let path = self.path("get", key)?;
        let k = key.to_string();
        let file = tokio::fs::File::open(&path).await.map_err(|e| io_err("get", &k, e))?;
        let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20);
        Ok(stream.map(move |r| r.map_err(|e| io_err("get", &k, e))).boxed())
    }

    async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        use std::io::{Read, Seek, SeekFrom};
        let path = self.path("get", key)?;
        let k = key.to_string();
        blocking(move || {
            let mut f = File::open(&path).map_err(|e| io_err("get", &k, e))?;
            f.seek(SeekFrom::Start(range.start)).map_err(|e| io_err("get", &k, e))?;
            let mut buf = Vec::new();
            f.take(range.end.saturating_sub(range.start)).read_to_end(&mut buf).map_err(|e| io_err("get", &k, e))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    fn describe(&self) -> String {
        format!("file://{}", self.root.display())
    }
}

/// A streamed local upload: a temporary file, fsynced and renamed into place on finish.
struct LocalWriter {
    file: Option<File>,
    tmp: PathBuf,
    path: PathBuf,
    key: String,
}

#[async_trait]
impl ObjectWriter for LocalWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        let mut file = self.file.take().expect("writer used after finish");
        let k = self.key.clone();
        let (file, r) = blocking(move || {
            let r = file.write_all(&data);
            (file, r)
        })
        .await;
        self.file = Some(file);
        r.map_err(|e| io_err("put", &k, e))
    }

    async fn finish(mut self: Box<Self>) -> Result<()> {
        let file = self.file.take().expect("writer used after finish");
        let (tmp, path, k) = (self.tmp.clone(), self.path.clone(), self.key.clone());
        blocking(move || {
            let r = (|| {
                file.sync_all()?;
                drop(file);
                fs::rename(&tmp, &path)?;
                fsync_dir(path.parent().expect("parent"))
            })();
            if r.is_err() {
                let _ = fs::remove_file(&tmp);
            }
            r.map_err(|e| io_err("put", &k, e))
        })
        .await
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        self.file.take();
        let _ = fs::remove_file(&self.tmp);
        Ok(())
    }
}

impl Drop for LocalWriter {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}
