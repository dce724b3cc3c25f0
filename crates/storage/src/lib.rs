//! walnut's storage layer: a small trait that moves bytes by key, and nothing about PostgreSQL.
//!
//! - [`BlobStore`] is the whole interface the repository uses: put (create-only or overwrite),
//!   get, head, list a directory, delete.
//! - [`local::LocalStore`] backs `file://` with durable writes: temp file, fsync, link/rename,
//!   directory fsync. Create-only puts use `link(2)`, which fails atomically if the name exists.
//! - [`remote::RemoteStore`] backs `s3://`, `gs://`, `az://` and `memory://` over `object_store`,
//!   whose HTTP client retries transient failures with backoff inside a bounded time.
//! - [`Bounded`] wraps any store so that every operation has a hard deadline: nothing hangs.
//! - [`conformance`] is the one suite every backend must pass.

pub mod conformance;
pub mod local;
pub mod remote;
mod url;

use async_trait::async_trait;
use bytes::Bytes;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use url::{S3Options, StorageOptions, open};

/// A secret string: never printed by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// What a put may do when the key already exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Fail with [`StorageError::AlreadyExists`] if the key exists (put-if-absent).
    Create,
    /// Replace whatever is there (only for walnut's own mutable records, never WAL or backups).
    Overwrite,
}

/// One stored object, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The key relative to the store's root, `/`-separated.
    pub key: String,
    pub size: u64,
    pub last_modified: chrono::DateTime<chrono::Utc>,
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{key}: not found")]
    NotFound { key: String },
    #[error("{key}: already exists")]
    AlreadyExists { key: String },
    #[error("{op} {key}: gave up after {after:?} (storage unreachable or too slow)")]
    Timeout { op: &'static str, key: String, after: Duration },
    #[error("{op} {key}: {message}")]
    Other { op: &'static str, key: String, message: String, retryable: bool },
    #[error("invalid repository URL: {0}")]
    Config(String),
}

impl StorageError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::NotFound { .. })
    }
    /// Whether trying again later could help (network trouble, throttling, timeouts).
    pub fn is_retryable(&self) -> bool {
        matches!(self, StorageError::Timeout { .. } | StorageError::Other { retryable: true, .. })
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// The storage interface. Keys are `/`-separated relative paths without `..` or empty segments.
#[async_trait]
pub trait BlobStore: Send + Sync + fmt::Debug + 'static {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<()>;
    async fn get(&self, key: &str) -> Result<Bytes>;
    /// Size and time of `key`, or `None` if absent.
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>>;
    /// Every object below the directory `dir` (recursively), in no particular order.
    async fn list(&self, dir: &str) -> Result<Vec<ObjectInfo>>;
    /// Deletes `key`; deleting an absent key succeeds.
    async fn delete(&self, key: &str) -> Result<()>;
    /// Starts a streamed upload of `key` (multipart on object stores); nothing is visible under
    /// `key` until [`ObjectWriter::finish`]. Replaces an existing object: use for keys that are
    /// unique by construction (a new backup's parts), never for WAL.
    async fn put_writer(&self, key: &str) -> Result<Box<dyn ObjectWriter>>;
    /// Streams an object's bytes.
    async fn get_stream(&self, key: &str) -> Result<ByteStream>;
    /// Bytes `range` of an object (shorter if the object ends first).
    async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Bytes>;
    /// A description safe to print (no credentials).
    fn describe(&self) -> String;
}

pub type DynStore = Arc<dyn BlobStore>;

/// A stream of an object's bytes.
pub type ByteStream = futures::stream::BoxStream<'static, Result<Bytes>>;

/// A streamed upload. Memory is bounded by the backend's chunk size and concurrency.
#[async_trait]
pub trait ObjectWriter: Send {
    async fn write(&mut self, data: Bytes) -> Result<()>;
    /// Makes the object visible, durably.
    async fn finish(self: Box<Self>) -> Result<()>;
    /// Discards everything written.
    async fn abort(self: Box<Self>) -> Result<()>;
}

/// Wraps a writer so that every call has the store's deadline.
struct BoundedWriter {
    inner: Box<dyn ObjectWriter>,
    key: String,
    deadline: Duration,
}

#[async_trait]
impl ObjectWriter for BoundedWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        tokio::time::timeout(self.deadline, self.inner.write(data)).await.unwrap_or_else(|_| {
            Err(StorageError::Timeout { op: "upload", key: self.key.clone(), after: self.deadline })
        })
    }
    async fn finish(self: Box<Self>) -> Result<()> {
        let (key, deadline) = (self.key.clone(), self.deadline);
        tokio::time::timeout(deadline, self.inner.finish()).await.unwrap_or(Err(StorageError::Timeout {
            op: "complete upload",
            key,
            after: deadline,
        }))
    }
    async fn abort(self: Box<Self>) -> Result<()> {
        let (key, deadline) = (self.key.clone(), self.deadline);
        tokio::time::timeout(deadline, self.inner.abort()).await.unwrap_or(Err(StorageError::Timeout {
            op: "abort upload",
            key,
            after: deadline,
        }))
    }
}

pub(crate) fn check_key(key: &str) -> Result<()> {
    if key.is_empty()
        || key.starts_with('/')
        || key.split('/').any(|s| s.is_empty() || s == "." || s == ".." || s.starts_with(".tmp."))
    {
        return Err(StorageError::Config(format!("invalid object key {key:?}")));
    }
    Ok(())
}

/// How many single-operation deadlines a whole (paged) listing may take.
pub const LIST_PAGES_ALLOWANCE: u32 = 30;

/// Gives every operation of the inner store a hard deadline.
#[derive(Debug)]
pub struct Bounded {
    inner: DynStore,
    deadline: Duration,
}

impl Bounded {
    pub fn new(inner: DynStore, deadline: Duration) -> Bounded {
        Bounded { inner, deadline }
    }

    async fn run<T>(
        &self,
        op: &'static str,
        key: &str,
        fut: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.deadline, fut).await {
            Ok(r) => r,
            Err(_) => Err(StorageError::Timeout { op, key: key.to_string(), after: self.deadline }),
        }
    }
}

#[async_trait]
impl BlobStore for Bounded {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<()> {
        self.run("put", key, self.inner.put(key, data, mode)).await
    }
    async fn get(&self, key: &str) -> Result<Bytes> {
        self.run("get", key, self.inner.get(key)).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        self.run("head", key, self.inner.head(key)).await
    }
    async fn list(&self, dir: &str) -> Result<Vec<ObjectInfo>> {
        // A listing is paged (1000 keys a page on S3), each page request bounded by the client's
        // own timeout and retries; the whole listing of a big repository can take far longer
        // than one operation, so it gets LIST_PAGES_ALLOWANCE deadlines.
        match tokio::time::timeout(self.deadline * LIST_PAGES_ALLOWANCE, self.inner.list(dir)).await {
            Ok(r) => r,
            Err(_) => Err(StorageError::Timeout {
                op: "list",
                key: dir.to_string(),
                after: self.deadline * LIST_PAGES_ALLOWANCE,
            }),
        }
    }
    async fn delete(&self, key: &str) -> Result<()> {
        self.run("delete", key, self.inner.delete(key)).await
    }
    async fn put_writer(&self, key: &str) -> Result<Box<dyn ObjectWriter>> {
        let inner = self.run("start upload", key, self.inner.put_writer(key)).await?;
        Ok(Box::new(BoundedWriter { inner, key: key.to_string(), deadline: self.deadline }))
    }
    async fn get_stream(&self, key: &str) -> Result<ByteStream> {
        use futures::StreamExt;
        let stream = self.run("get", key, self.inner.get_stream(key)).await?;
        // Each chunk must arrive within the deadline: a stalled download fails instead of hanging.
        let (deadline, key) = (self.deadline, key.to_string());
        Ok(futures::stream::unfold((stream, false), move |(mut s, done)| {
            let key = key.clone();
            async move {
                if done {
                    return None;
                }
                match tokio::time::timeout(deadline, s.next()).await {
                    Ok(Some(item)) => Some((item, (s, false))),
                    Ok(None) => None,
                    Err(_) => Some((Err(StorageError::Timeout { op: "download", key, after: deadline }), (s, true))),
                }
            }
        })
        .boxed())
    }
    async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        self.run("get", key, self.inner.get_range(key, range)).await
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "[redacted]");
        assert!(!format!("{:?}", Some(s)).contains("hunter2"));
    }
    #[test]
    fn keys_are_checked() {
        for bad in ["", "/a", "a//b", "a/../b", "a/", "a/.tmp.x"] {
            assert!(check_key(bad).is_err(), "{bad}");
        }
        assert!(check_key("wal/00000001/000000010000000000000001").is_ok());
    }
}
