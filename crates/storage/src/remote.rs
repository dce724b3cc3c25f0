//! Object stores reached over HTTP (S3 and compatibles, GCS, Azure) and the in-memory store, all
//! through `object_store`. Its client retries transient failures with exponential backoff until
//! the configured retry time has passed; [`crate::Bounded`] adds a hard deadline on top.
//! Its errors are mapped to [`StorageError`] by their type, never by their text.

use crate::{BlobStore, ByteStream, ObjectInfo, ObjectWriter, PutMode, Result, StorageError, check_key};
use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutOptions};
use std::sync::Arc;
use std::time::Duration;

/// How many times in a row a streamed download resumes without receiving a byte in between.
pub const RESUME_ATTEMPTS: u32 = 4;

#[derive(Debug)]
pub struct RemoteStore {
    inner: Arc<dyn ObjectStore>,
    /// The client for streamed downloads: no bound on a whole request, a bound on the wait for
    /// the response head and on each read (see [`RemoteStore::with_streaming`]).
    streaming: Arc<dyn ObjectStore>,
    /// How long a streamed body may go without a byte before it is resumed (or fails).
    idle: Duration,
    /// The prefix inside the bucket, without leading or trailing `/` (may be empty).
    prefix: String,
    description: String,
}

/// Maps an `object_store` error by its kind (never by its text). The HTTP status codes the
/// client already typed (404, 409/412, 401, 403) become walnut's variants; a `Generic` error is
/// `Unavailable` when its chain holds a transport failure (connection, request, timeout), and
/// otherwise a server answer the client does not type (5xx after the client's retries, a body
/// it could not parse), which may heal.
fn map_err(op: &'static str, key: &str, e: object_store::Error) -> StorageError {
    use object_store::Error as E;
    let key = key.to_string();
    if let Some(problem) = crate::tls::problem(&e) {
        return StorageError::Tls { op, key, problem, source: Some(Box::new(e)) };
    }
    match e {
        E::NotFound { .. } => StorageError::NotFound { op, key, source: Some(Box::new(e)) },
        // S3 answers a create-only put of a taken key with 412 Precondition Failed, others 409.
        E::AlreadyExists { .. } | E::Precondition { .. } => {
            StorageError::AlreadyExists { op, key, source: Some(Box::new(e)) }
        }
        E::PermissionDenied { .. } => {
            StorageError::PermissionDenied { op, key, fix: crate::CREDENTIALS_FIX, source: Some(Box::new(e)) }
        }
        E::Unauthenticated { .. } => StorageError::Unauthenticated { op, key, source: Some(Box::new(e)) },
        E::NotSupported { .. } | E::NotImplemented { .. } => {
            StorageError::Unsupported { op, key, source: Some(Box::new(e)) }
        }
        E::InvalidPath { .. } => StorageError::InvalidKey {
            op,
            key,
            reason: "refused by the object store client",
            source: Some(Box::new(e)),
        },
        E::UnknownConfigurationKey { .. } => {
            StorageError::Config { message: format!("{op} {key}: unusable storage setting"), source: Some(Box::new(e)) }
        }
        // walnut never sends conditional reads, so this is a protocol surprise, not a state.
        E::NotModified { .. } => StorageError::Other { op, key, retryable: false, source: Some(Box::new(e)) },
        _ => match transport_failure(&e) {
            Some(true) => StorageError::Unavailable { op, key, source: Some(Box::new(e)) },
            Some(false) | None => StorageError::Other { op, key, retryable: true, source: Some(Box::new(e)) },
        },
    }
}

/// Whether `e`'s chain holds an HTTP transport error: `Some(true)` when the server was not
/// reached or did not answer in time, `Some(false)` for a broken or undecodable answer, `None`
/// when the server answered (with a status the client did not type).
fn transport_failure(e: &(dyn std::error::Error + 'static)) -> Option<bool> {
    use object_store::client::{HttpError, HttpErrorKind};
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(h) = err.downcast_ref::<HttpError>() {
            return Some(matches!(
                h.kind(),
                HttpErrorKind::Connect | HttpErrorKind::Request | HttpErrorKind::Timeout | HttpErrorKind::Interrupted
            ));
        }
        next = err.source();
    }
    None
}

impl RemoteStore {
    pub fn new(inner: Arc<dyn ObjectStore>, prefix: &str, description: String) -> RemoteStore {
        RemoteStore {
            streaming: inner.clone(),
            inner,
            prefix: prefix.trim_matches('/').to_string(),
            description,
            idle: Duration::from_secs(30),
        }
    }

    /// Streams downloads through `streaming`, a client of the same store built without a
    /// timeout on the whole request (a big part on a slow link streams for longer than any one
    /// request may take) but with a read timeout, which bounds the wait for the response head
    /// and each read of the body. A body that goes `idle` without a byte, or breaks, is resumed
    /// with a range request from the byte reached, [`RESUME_ATTEMPTS`] times in a row at most.
    pub fn with_streaming(mut self, streaming: Arc<dyn ObjectStore>, idle: Duration) -> RemoteStore {
        self.streaming = streaming;
        self.idle = idle;
        self
    }

    /// An in-memory store, for tests.
    pub fn memory() -> RemoteStore {
        RemoteStore::new(Arc::new(object_store::memory::InMemory::new()), "", "memory://".into())
    }

    fn path(&self, op: &'static str, key: &str) -> Result<Path> {
        check_key(op, key)?;
        Ok(if self.prefix.is_empty() { Path::from(key) } else { Path::from(format!("{}/{key}", self.prefix)) })
    }

    /// The error of a failed listing. `object_store` does not type the status of a failed list
    /// request (S3, GCS and Azure all report it as `Generic`), so when the server answered, one
    /// HEAD request below the listed directory, whose status *is* typed, tells refused
    /// credentials (permanent) from a server error (may heal); the list error stays the source.
    async fn list_error(&self, dir: &str, full: Option<&Path>, e: object_store::Error) -> StorageError {
        let mapped = map_err("list", dir, e);
        let StorageError::Other { source: Some(source), .. } = mapped else { return mapped };
        if transport_failure(source.as_ref()).is_some() {
            return StorageError::Other { op: "list", key: dir.to_string(), retryable: true, source: Some(source) };
        }
        let probe = match full {
            Some(p) => p.clone().join(".walnut-access-probe"),
            None => Path::from(".walnut-access-probe"),
        };
        let key = dir.to_string();
        match self.inner.head(&probe).await {
            Err(object_store::Error::PermissionDenied { .. }) => {
                StorageError::PermissionDenied { op: "list", key, fix: crate::CREDENTIALS_FIX, source: Some(source) }
            }
            Err(object_store::Error::Unauthenticated { .. }) => {
                StorageError::Unauthenticated { op: "list", key, source: Some(source) }
            }
            _ => StorageError::Other { op: "list", key, retryable: true, source: Some(source) },
        }
    }

    fn relative(&self, location: &Path) -> String {
        let full = location.as_ref();
        if self.prefix.is_empty() {
            full.to_string()
        } else {
            full.strip_prefix(&self.prefix).map(|s| s.trim_start_matches('/')).unwrap_or(full).to_string()
        }
    }
}

#[async_trait]
impl BlobStore for RemoteStore {
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<()> {
        let path = self.path("put", key)?;
        let mode = match mode {
            PutMode::Create => object_store::PutMode::Create,
            PutMode::Overwrite => object_store::PutMode::Overwrite,
        };
        self.inner
            .put_opts(&path, data.into(), PutOptions::from(mode))
            .await
            .map(|_| ())
            .map_err(|e| map_err("put", key, e))
    }

    async fn get(&self, key: &str) -> Result<Bytes> {
        let path = self.path("get", key)?;
        let r = self.inner.get(&path).await.map_err(|e| map_err("get", key, e))?;
        r.bytes().await.map_err(|e| map_err("get", key, e))
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let path = self.path("head", key)?;
        match self.inner.head(&path).await {
            Ok(m) => Ok(Some(ObjectInfo { key: key.to_string(), size: m.size, last_modified: m.last_modified })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(map_err("head", key, e)),
        }
    }

    async fn list(&self, dir: &str) -> Result<Vec<ObjectInfo>> {
        let full = match (self.prefix.is_empty(), dir.is_empty()) {
            (true, true) => None,
            (true, false) => Some(self.path("list", dir)?),
            (false, true) => Some(Path::from(self.prefix.as_str())),
            (false, false) => Some(self.path("list", dir)?),
        };
        let metas: Vec<_> = match self.inner.list(full.as_ref()).try_collect().await {
            Ok(m) => m,
            Err(e) => return Err(self.list_error(dir, full.as_ref(), e).await),
        };
        Ok(metas
            .into_iter()
            .map(|m| ObjectInfo { key: self.relative(&m.location), size: m.size, last_modified: m.last_modified })
            .collect())
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path("delete", key)?;
        match self.inner.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(map_err("delete", key, e)),
        }
    }

    async fn put_writer(&self, key: &str) -> Result<Box<dyn ObjectWriter>> {
        let path = self.path("start upload", key)?;
        let upload = self.inner.put_multipart(&path).await.map_err(|e| map_err("start upload", key, e))?;
        Ok(Box::new(RemoteWriter {
            inner: Some(object_store::WriteMultipart::new_with_chunk_size(upload, PART_SIZE)),
            key: key.to_string(),
        }))
    }

    async fn get_stream(&self, key: &str) -> Result<ByteStream> {
        use futures::StreamExt;
        let path = self.path("get", key)?;
        let r = self.streaming.get(&path).await.map_err(|e| map_err("get", key, e))?;
        let resume = Resume {
            store: self.streaming.clone(),
            path,
            key: key.to_string(),
            e_tag: r.meta.e_tag.clone(),
            size: r.meta.size,
            offset: r.range.start,
            end: r.range.end,
            body: Some(r.into_stream()),
            idle: self.idle,
            attempts: 0,
            done: false,
        };
        Ok(futures::stream::unfold(resume, |mut s| async move { s.next().await.map(|item| (item, s)) }).boxed())
    }

    async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Bytes> {
        let path = self.path("get", key)?;
        let size = match self.inner.head(&path).await {
            Ok(m) => m.size,
            Err(e) => return Err(map_err("get", key, e)),
        };
        let end = range.end.min(size);
        if range.start >= end {
            return Ok(Bytes::new());
        }
        self.inner.get_range(&path, range.start..end).await.map_err(|e| map_err("get", key, e))
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

/// Multipart chunk size: S3 needs at least 5 MiB per part.
const PART_SIZE: usize = 8 << 20;
/// Parts in flight per upload (memory: PART_SIZE x this).
const PARTS_IN_FLIGHT: usize = 4;

struct RemoteWriter {
    /// `None` once finished or aborted.
    inner: Option<object_store::WriteMultipart>,
    key: String,
}

#[async_trait]
impl ObjectWriter for RemoteWriter {
    async fn write(&mut self, data: Bytes) -> Result<()> {
        let inner = self.inner.as_mut().expect("writer used after finish or abort");
        inner.wait_for_capacity(PARTS_IN_FLIGHT).await.map_err(|e| map_err("upload", &self.key, e))?;
        inner.put(data);
        Ok(())
    }

    async fn finish(mut self: Box<Self>) -> Result<()> {
        let inner = self.inner.take().expect("writer used after finish or abort");
        inner.finish().await.map(|_| ()).map_err(|e| map_err("complete upload", &self.key, e))
    }

    async fn abort(mut self: Box<Self>) -> Result<()> {
        let mut inner = self.inner.take().expect("writer used after finish or abort");
        // Parts still in flight first: a part the server stores after the abort would be kept
        // (and billed) with no upload left to abort it.
        let _ = inner.wait_for_capacity(0).await;
        inner.abort().await.map_err(|e| map_err("abort upload", &self.key, e))
    }
}

/// A writer dropped before `finish` or `abort` (its task was cancelled) aborts its multipart
/// upload in the background, so that the store does not keep (and bill) its parts. Best effort:
/// without a runtime there is nothing to run the request on.
impl Drop for RemoteWriter {
    fn drop(&mut self) {
        if let (Some(inner), Ok(rt)) = (self.inner.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let _ = inner.abort().await;
            });
        }
    }
}

/// A streamed download that resumes: the body of one GET, and when it goes idle or breaks, a
/// range request for the rest (same ETag: the same object), until the end is reached or
/// [`RESUME_ATTEMPTS`] resumptions in a row brought nothing.
struct Resume {
    store: Arc<dyn ObjectStore>,
    path: Path,
    key: String,
    e_tag: Option<String>,
    size: u64,
    /// The next byte to deliver.
    offset: u64,
    /// One past the last byte wanted.
    end: u64,
    body: Option<futures::stream::BoxStream<'static, object_store::Result<Bytes>>>,
    idle: Duration,
    /// Resumptions since the last byte received.
    attempts: u32,
    done: bool,
}

impl Resume {
    async fn next(&mut self) -> Option<Result<Bytes>> {
        use futures::StreamExt;
        loop {
            if self.done {
                return None;
            }
            let failure = match self.body.as_mut() {
                Some(body) => match tokio::time::timeout(self.idle, body.next()).await {
                    Ok(Some(Ok(bytes))) => {
                        if !bytes.is_empty() {
                            self.attempts = 0;
                        }
                        self.offset += bytes.len() as u64;
                        return Some(Ok(bytes));
                    }
                    Ok(None) if self.offset >= self.end => {
                        self.done = true;
                        return None;
                    }
                    Ok(None) => StorageError::Unavailable {
                        op: "download",
                        key: self.key.clone(),
                        source: Some(format!("the body ended at byte {} of {}", self.offset, self.end).into()),
                    },
                    Ok(Some(Err(e))) => map_err("download", &self.key, e),
                    Err(_) => StorageError::Timeout { op: "download", key: self.key.clone(), after: self.idle },
                },
                None => match self.reopen().await {
                    Ok(()) => continue,
                    Err(e) => e,
                },
            };
            self.body = None;
            if self.offset >= self.end {
                // Everything arrived; what broke came after the last byte.
                self.done = true;
                return None;
            }
            if !failure.is_retryable() || self.attempts >= RESUME_ATTEMPTS {
                self.done = true;
                return Some(Err(failure));
            }
            self.attempts += 1;
            tracing::warn!(key = %self.key, offset = self.offset, attempt = self.attempts, error = %failure,
                "download interrupted; resuming from the byte reached");
        }
    }

    /// Asks for the rest of the object, from `offset`.
    async fn reopen(&mut self) -> Result<()> {
        let options = object_store::GetOptions {
            range: Some(object_store::GetRange::Bounded(self.offset..self.end)),
            if_match: self.e_tag.clone(),
            ..Default::default()
        };
        let r = self.store.get_opts(&self.path, options).await.map_err(|e| map_err("download", &self.key, e))?;
        if r.meta.size != self.size || r.range.start != self.offset {
            return Err(StorageError::Other {
                op: "download",
                key: self.key.clone(),
                retryable: false,
                source: Some(
                    format!(
                        "resuming at byte {}: the store answered bytes {:?} of {} (expected size {})",
                        self.offset, r.range, r.meta.size, self.size
                    )
                    .into(),
                ),
            });
        }
        self.body = Some(r.into_stream());
        Ok(())
    }
}
