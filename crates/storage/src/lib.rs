//! walnut's storage layer: a small trait that moves bytes by key, and nothing about PostgreSQL.
//!
//! - [`BlobStore`] is the whole interface the repository uses: put (create-only or overwrite),
//!   get, head, list a directory, delete.
//! - [`local::LocalStore`] backs `file://` with durable writes: temp file, fsync, link/rename,
//!   directory fsync. Create-only puts use `link(2)`, which fails atomically if the name exists.
//! - [`remote::RemoteStore`] backs `s3://`, `gs://`, `az://` and `memory://` over `object_store`,
//!   whose HTTP client retries transient failures with backoff inside a bounded time.
//! - [`Bounded`] wraps any store so that every operation has a hard deadline: nothing hangs. A
//!   streamed download is bounded by its idleness, not its length.
//! - `conformance` (with the `testing` feature) is the one suite every backend must pass, one
//!   function per behaviour.
//! - [`StorageError`] says what went wrong by kind, whether a retry can help, and keeps the
//!   underlying error as its source.
//! - [`open`] builds a store from a repository URL and explicit [`StorageOptions`]; this crate
//!   reads no environment variables.

#[cfg(feature = "testing")]
pub mod conformance;
pub mod crashpoint;
pub mod local;
pub mod remote;
mod tls;
mod url;

use async_trait::async_trait;
use bytes::Bytes;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

pub use tls::{TlsOptions, TlsProblem};
pub use url::{S3Options, StorageOptions, known_setting, open, open_object_url};

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

/// The underlying error a [`StorageError`] keeps as its [`source`](std::error::Error::source).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a remote store answers when the credentials are wrong or may not do an operation.
pub(crate) const CREDENTIALS_FIX: &str = "check the credentials / access key ([s3] access_key_id and \
    secret_access_key, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and that they may use this bucket";

/// A storage failure, by kind. Each variant knows whether trying again later can help
/// ([`StorageError::is_retryable`]) and keeps the error it came from as its `source`; the
/// `Display` text is one line naming the operation and the key (never a secret).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The object does not exist.
    #[error("{op} {key}: not found")]
    NotFound {
        op: &'static str,
        key: String,
        #[source]
        source: Option<BoxError>,
    },
    /// A create-only put found the key taken.
    #[error("{op} {key}: already exists")]
    AlreadyExists {
        op: &'static str,
        key: String,
        #[source]
        source: Option<BoxError>,
    },
    /// The store knows who is asking and refuses: wrong secret (S3 answers 403 to a bad
    /// signature), missing permission, or a local directory walnut may not write.
    #[error("{op} {key}: permission denied{}: {fix}", cause(.source))]
    PermissionDenied {
        op: &'static str,
        key: String,
        /// What to check, for the person reading the message.
        fix: &'static str,
        #[source]
        source: Option<BoxError>,
    },
    /// The store does not accept the credentials at all (HTTP 401).
    #[error("{op} {key}: not authenticated{}: {}", cause(.source), CREDENTIALS_FIX)]
    Unauthenticated {
        op: &'static str,
        key: String,
        #[source]
        source: Option<BoxError>,
    },
    /// The operation did not finish within walnut's deadline.
    #[error("{op} {key}: gave up after {after:?} (storage unreachable or too slow)")]
    Timeout { op: &'static str, key: String, after: Duration },
    /// The store could not be reached (connection refused or reset, DNS, request timeout), after
    /// the client's own retries.
    #[error("{op} {key}: storage unreachable{}", cause(.source))]
    Unavailable {
        op: &'static str,
        key: String,
        #[source]
        source: Option<BoxError>,
    },
    /// A key walnut refuses before it reaches any backend (`..`, a leading `/`, empty segments).
    #[error("{op} {key:?}: invalid object key: {reason}")]
    InvalidKey {
        op: &'static str,
        key: String,
        reason: &'static str,
        #[source]
        source: Option<BoxError>,
    },
    /// The backend cannot do this operation at all.
    #[error("{op} {key}: not supported by this storage{}", cause(.source))]
    Unsupported {
        op: &'static str,
        key: String,
        #[source]
        source: Option<BoxError>,
    },
    /// The TLS handshake with the store was refused (its certificate, or no TLS at all): the
    /// problem's text names the cause and the fix. Retrying does not help.
    #[error("{op} {key}: TLS: {problem}")]
    Tls {
        op: &'static str,
        key: String,
        problem: TlsProblem,
        #[source]
        source: Option<BoxError>,
    },
    /// The repository URL or a storage setting is unusable; the message names the setting and
    /// the fix.
    #[error("{message}{}", cause(.source))]
    Config {
        message: String,
        #[source]
        source: Option<BoxError>,
    },
    /// Anything else, with whether a retry may help.
    #[error("{op} {key}: storage error{}", cause(.source))]
    Other {
        op: &'static str,
        key: String,
        retryable: bool,
        #[source]
        source: Option<BoxError>,
    },
}

/// ` (root cause)` for a message: the innermost error of the chain, on one line and short, or
/// nothing. The whole chain stays reachable through `source()`.
fn cause(source: &Option<BoxError>) -> String {
    const MAX: usize = 200;
    let Some(top) = source else { return String::new() };
    let mut e: &(dyn std::error::Error + 'static) = top.as_ref();
    while let Some(next) = e.source() {
        e = next;
    }
    let text = e.to_string().split_whitespace().collect::<Vec<_>>().join(" ");
    if text.is_empty() {
        return String::new();
    }
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!(" ({}…)", &text[..cut]),
        None => format!(" ({text})"),
    }
}

impl StorageError {
    /// A [`StorageError::Config`] without an underlying error.
    pub fn config(message: impl Into<String>) -> StorageError {
        StorageError::Config { message: message.into(), source: None }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, StorageError::NotFound { .. })
    }

    pub fn is_already_exists(&self) -> bool {
        matches!(self, StorageError::AlreadyExists { .. })
    }

    /// The credentials are refused (wrong, or without the permission needed).
    pub fn is_access_denied(&self) -> bool {
        matches!(self, StorageError::PermissionDenied { .. } | StorageError::Unauthenticated { .. })
    }

    /// Whether trying again later could help (network trouble, throttling, server errors,
    /// timeouts). Missing objects, taken keys, refused credentials, invalid keys, settings and
    /// unsupported operations do not heal by themselves.
    pub fn is_retryable(&self) -> bool {
        match self {
            StorageError::Timeout { .. } | StorageError::Unavailable { .. } => true,
            StorageError::Other { retryable, .. } => *retryable,
            StorageError::NotFound { .. }
            | StorageError::AlreadyExists { .. }
            | StorageError::PermissionDenied { .. }
            | StorageError::Unauthenticated { .. }
            | StorageError::InvalidKey { .. }
            | StorageError::Unsupported { .. }
            | StorageError::Tls { .. }
            | StorageError::Config { .. } => false,
        }
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

/// Refuses keys that are not `/`-separated relative paths of plain names (`op` names the
/// operation for the message).
pub(crate) fn check_key(op: &'static str, key: &str) -> Result<()> {
    let reason = if key.is_empty() {
        "empty"
    } else if key.starts_with('/') {
        "keys are relative: no leading '/'"
    } else if key.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        "empty, '.' or '..' path segment"
    } else if key.split('/').any(|s| s.starts_with(".tmp.")) {
        "names starting with '.tmp.' are reserved for temporary files"
    } else {
        return Ok(());
    };
    Err(StorageError::InvalidKey { op, key: key.to_string(), reason, source: None })
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
        // The deadline bounds getting the response head (above) and each wait for the next chunk:
        // a stalled download fails instead of hanging, while a body that keeps moving is never
        // cut, however long it takes (a big part on a slow link). A remote store resumes a
        // broken or idle body itself, within this per-chunk deadline.
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
    fn every_kind_says_whether_a_retry_helps() {
        let src = || Some(Box::new(std::io::Error::other("boom")) as BoxError);
        let (op, key) = ("get", "wal/x".to_string());
        let cases = [
            (StorageError::NotFound { op, key: key.clone(), source: src() }, false),
            (StorageError::AlreadyExists { op, key: key.clone(), source: src() }, false),
            (StorageError::PermissionDenied { op, key: key.clone(), fix: CREDENTIALS_FIX, source: src() }, false),
            (StorageError::Unauthenticated { op, key: key.clone(), source: src() }, false),
            (StorageError::Timeout { op, key: key.clone(), after: Duration::from_secs(1) }, true),
            (StorageError::Unavailable { op, key: key.clone(), source: src() }, true),
            (StorageError::InvalidKey { op, key: key.clone(), reason: "r", source: None }, false),
            (StorageError::Unsupported { op, key: key.clone(), source: src() }, false),
            (StorageError::config("[s3] endpoint is wrong"), false),
            (StorageError::Other { op, key: key.clone(), retryable: true, source: src() }, true),
            (StorageError::Other { op, key: key.clone(), retryable: false, source: src() }, false),
        ];
        for (e, retryable) in cases {
            assert_eq!(e.is_retryable(), retryable, "{e:?}");
            let text = e.to_string();
            assert!(!text.contains('\n'), "{text}");
            if !matches!(e, StorageError::Config { .. }) {
                assert!(text.starts_with("get ") && text.contains("wal/x"), "operation and key: {text}");
            }
        }
        let e = StorageError::PermissionDenied { op, key, fix: CREDENTIALS_FIX, source: src() };
        assert!(e.is_access_denied());
        assert_eq!(std::error::Error::source(&e).map(|s| s.to_string()).as_deref(), Some("boom"));
        assert!(e.to_string().starts_with("get wal/x: permission denied (boom): check the credentials / access key"));
    }

    #[test]
    fn the_cause_is_the_innermost_error_on_one_short_line() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer text")]
        struct Outer(#[source] std::io::Error);
        let inner = std::io::Error::other(format!("line one\n  line two {}", "x".repeat(500)));
        let c = cause(&Some(Box::new(Outer(inner))));
        assert!(c.starts_with(" (line one line two xxx") && c.ends_with("…)"), "{c}");
        assert!(c.chars().count() < 210, "{c}");
        assert_eq!(cause(&None), "");
    }

    #[test]
    fn keys_are_checked() {
        for bad in ["", "/a", "a//b", "a/../b", "a/./b", "a/", "a/.tmp.x"] {
            let e = check_key("put", bad).unwrap_err();
            assert!(matches!(e, StorageError::InvalidKey { .. }), "{bad}: {e:?}");
            assert!(!e.is_retryable(), "{bad}");
            assert!(e.to_string().starts_with(&format!("put {bad:?}: invalid object key")), "{e}");
        }
        assert!(check_key("get", "wal/00000001/000000010000000000000001").is_ok());
    }
}
