//! The storage conformance suite against every backend: memory, file, and a real S3-compatible
//! server on 127.0.0.1; then the typed errors: refused credentials, an unreachable server, a
//! stalled backend, and settings that are refused before any request is sent.

use bytes::Bytes;
use std::time::{Duration, Instant};
use walnut_storage::conformance::{self, Capabilities};
use walnut_storage::{BlobStore, ByteStream, ObjectInfo, ObjectWriter, PutMode, StorageError, StorageOptions, open};
use walnut_testkit::S3Server;

fn s3_options(s3: &S3Server) -> StorageOptions {
    let mut o = StorageOptions::default();
    o.s3.endpoint = Some(s3.endpoint());
    o.s3.access_key_id = Some(walnut_testkit::s3::ACCESS_KEY.into());
    o.s3.secret_access_key = Some(walnut_storage::Secret::new(walnut_testkit::s3::SECRET_KEY));
    o
}

/// The error's message, its `Debug` and every message down its source chain.
fn everything_printed(e: &StorageError) -> String {
    let mut text = format!("{e}\n{e:?}");
    let mut next = std::error::Error::source(e);
    while let Some(s) = next {
        text += &format!("\n{s}\n{s:?}");
        next = s.source();
    }
    text
}

#[tokio::test]
async fn memory_backend_conforms() {
    let store = open("memory://", &StorageOptions::default()).unwrap();
    conformance::run_all(store.as_ref(), Capabilities { atomic_create: true }).await;
}

#[tokio::test]
async fn file_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&format!("file://{}/repo", dir.path().display()), &StorageOptions::default()).unwrap();
    conformance::run_all(store.as_ref(), Capabilities { atomic_create: true }).await;
    // no temporary files are left behind
    let leftovers: Vec<_> = walk(&dir.path().join("repo")).into_iter().filter(|p| p.contains(".tmp.")).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

fn walk(p: &std::path::Path) -> Vec<String> {
    let mut out = vec![];
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path().display().to_string());
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_backend_conforms() {
    let s3 = S3Server::start();
    let store = open(&s3.repo_url("conformance/prefix"), &s3_options(&s3)).unwrap();
    conformance::run_all(store.as_ref(), Capabilities { atomic_create: false }).await;
    // objects really live under the prefix in the bucket
    assert!(s3.bucket_dir().join("conformance/prefix/c/b/big").exists());
}

/// The listing case alone, timed: more than a page of keys must stay quick on the file backend
/// and on the local S3 server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_beyond_one_page_is_quick() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    for url in [s3.repo_url("many"), format!("file://{}/repo", dir.path().display())] {
        let store = open(&url, &s3_options(&s3)).unwrap();
        let t = Instant::now();
        conformance::list_pages_beyond_1000_keys(store.as_ref()).await;
        assert!(t.elapsed() < Duration::from_secs(60), "{url}: {} keys took {:?}", conformance::MANY_KEYS, t.elapsed());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_with_wrong_credentials_is_a_typed_permanent_error_without_the_secret() {
    let s3 = S3Server::start();
    let mut o = s3_options(&s3);
    o.s3.secret_access_key = Some(walnut_storage::Secret::new("definitely-wrong-secret"));
    let store = open(&s3.repo_url("x"), &o).unwrap();
    let t = Instant::now();
    let mut errors = vec![store.put("a/b", Bytes::from_static(b"x"), PutMode::Create).await.unwrap_err()];
    errors.push(store.get("a/b").await.unwrap_err());
    errors.push(store.head("a/b").await.unwrap_err());
    // object_store does not type a failed listing's status: walnut's probe must.
    errors.push(store.list("a").await.unwrap_err());
    for e in &errors {
        let text = everything_printed(e);
        assert!(
            matches!(e, StorageError::PermissionDenied { .. } | StorageError::Unauthenticated { .. }),
            "refused credentials are typed: {e:?}"
        );
        assert!(e.is_access_denied(), "{e}");
        assert!(!e.is_retryable(), "bad credentials are permanent: {e}");
        assert!(std::error::Error::source(e).is_some(), "the underlying error is kept: {e:?}");
        let shown = e.to_string();
        assert!(!shown.contains('\n'), "one line: {shown}");
        assert!(shown.contains("check the credentials / access key"), "{shown}");
        assert!(!text.contains("definitely-wrong-secret"), "the secret leaked: {text}");
    }
    let ops: Vec<_> = errors.iter().map(|e| e.to_string().split(':').next().unwrap().to_string()).collect();
    assert_eq!(ops, ["put a/b", "get a/b", "head a/b", "list a"], "messages name the operation and key");
    // permanent errors are not retried by the client either
    assert!(t.elapsed() < Duration::from_secs(10), "took {:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_s3_fails_within_the_deadline() {
    let mut s3 = S3Server::start();
    s3.stop();
    let mut o = s3_options(&s3);
    o.request_timeout = Duration::from_secs(1);
    o.retry_time = Duration::from_secs(2);
    o.deadline = Duration::from_secs(4);
    let store = open(&s3.repo_url("x"), &o).unwrap();
    let t = Instant::now();
    let e = store.get("a/b").await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(6), "took {:?}", t.elapsed());
    assert!(matches!(e, StorageError::Unavailable { .. } | StorageError::Timeout { .. }), "{e:?}");
    assert!(e.is_retryable(), "{e}");
    assert!(e.to_string().starts_with("get a/b: "), "{e}");
    // and it works again once the server is back
    s3.restart();
    store.put("a/b", Bytes::from_static(b"x"), PutMode::Create).await.unwrap();
    assert_eq!(store.get("a/b").await.unwrap().as_ref(), b"x");
}

#[tokio::test]
async fn bad_urls_are_explained() {
    for (url, needle) in [("ftp://x/y", "unknown scheme"), ("s3:///prefix", "bucket"), ("not a url", "file:///path")] {
        let e = open(url, &StorageOptions::default()).unwrap_err();
        assert!(matches!(e, StorageError::Config { .. }) && !e.is_retryable(), "{url}: {e:?}");
        assert!(e.to_string().contains(needle), "{url}: {e}");
    }
}

/// Unusable S3 settings are `Config` errors at open (nothing is sent), naming the setting and the
/// fix, and never echoing a secret.
#[test]
fn bad_s3_settings_are_refused_when_opening() {
    let base = || {
        let mut o = StorageOptions::default();
        o.s3.endpoint = Some("http://127.0.0.1:9".into());
        o.s3.access_key_id = Some("key-id".into());
        o.s3.secret_access_key = Some(walnut_storage::Secret::new("the-secret-value"));
        o
    };
    type Change = fn(&mut StorageOptions);
    let cases: [(&str, Change, &str); 11] = [
        (
            "no scheme",
            |o| o.s3.endpoint = Some("127.0.0.1:9000".into()),
            "[s3] endpoint \"127.0.0.1:9000\" has no scheme: write http://127.0.0.1:9000 or https://127.0.0.1:9000",
        ),
        (
            "host:port",
            |o| o.s3.endpoint = Some("localhost:9000".into()),
            "[s3] endpoint \"localhost:9000\" has no scheme",
        ),
        ("not a url", |o| o.s3.endpoint = Some("not a url".into()), "[s3] endpoint \"not a url\" is not a URL"),
        (
            "ftp",
            |o| o.s3.endpoint = Some("ftp://127.0.0.1".into()),
            "[s3] endpoint \"ftp://127.0.0.1\" has the scheme \"ftp\"",
        ),
        (
            "user info",
            |o| o.s3.endpoint = Some("http://me:the-secret-value@127.0.0.1".into()),
            "[s3] endpoint contains a user name or password",
        ),
        (
            "no keys",
            |o| {
                o.s3.access_key_id = None;
                o.s3.secret_access_key = None;
            },
            "no credentials: set [s3] access_key_id and secret_access_key (or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)",
        ),
        (
            "empty keys",
            |o| {
                o.s3.access_key_id = Some(String::new());
                o.s3.secret_access_key = Some(walnut_storage::Secret::new(""));
            },
            "no credentials",
        ),
        ("no secret", |o| o.s3.secret_access_key = None, "[s3] secret_access_key is missing"),
        ("no key id", |o| o.s3.access_key_id = None, "[s3] access_key_id is missing"),
        ("region", |o| o.s3.region = Some("us east".into()), "[s3] region \"us east\" is not a region name"),
        (
            "token",
            |o| o.s3.session_token = Some(walnut_storage::Secret::new("a\nthe-secret-value")),
            "[s3] session_token contains a control character",
        ),
    ];
    for (what, change, needle) in cases {
        let mut o = base();
        change(&mut o);
        let e = open("s3://bucket/prefix", &o).unwrap_err();
        assert!(matches!(e, StorageError::Config { .. }), "{what}: {e:?}");
        assert!(!e.is_retryable(), "{what}");
        let text = everything_printed(&e);
        assert!(e.to_string().contains(needle), "{what}: {e}");
        assert!(!text.contains("the-secret-value"), "{what}: the secret leaked: {text}");
    }
    let e = open("s3://bad!bucket/prefix", &base()).unwrap_err();
    assert!(matches!(e, StorageError::Config { .. }) && e.to_string().contains("is not a bucket name"), "{e:?}");
    // and good settings open (no request is made by opening)
    open("s3://bucket/prefix", &base()).unwrap();
}

/// A backend that never answers.
#[derive(Debug)]
struct Stalled;

#[async_trait::async_trait]
impl BlobStore for Stalled {
    async fn put(&self, _: &str, _: Bytes, _: PutMode) -> walnut_storage::Result<()> {
        std::future::pending().await
    }
    async fn get(&self, _: &str) -> walnut_storage::Result<Bytes> {
        std::future::pending().await
    }
    async fn head(&self, _: &str) -> walnut_storage::Result<Option<ObjectInfo>> {
        std::future::pending().await
    }
    async fn list(&self, _: &str) -> walnut_storage::Result<Vec<ObjectInfo>> {
        std::future::pending().await
    }
    async fn delete(&self, _: &str) -> walnut_storage::Result<()> {
        std::future::pending().await
    }
    async fn put_writer(&self, _: &str) -> walnut_storage::Result<Box<dyn ObjectWriter>> {
        std::future::pending().await
    }
    async fn get_stream(&self, _: &str) -> walnut_storage::Result<ByteStream> {
        std::future::pending().await
    }
    async fn get_range(&self, _: &str, _: std::ops::Range<u64>) -> walnut_storage::Result<Bytes> {
        std::future::pending().await
    }
    fn describe(&self) -> String {
        "stalled://".into()
    }
}

/// Through `dyn BlobStore`, the deadline wrapper turns a backend that never answers into a typed,
/// retryable `Timeout` naming the operation and the key.
#[tokio::test]
async fn a_stalled_backend_times_out_typed() {
    let store: walnut_storage::DynStore =
        std::sync::Arc::new(walnut_storage::Bounded::new(std::sync::Arc::new(Stalled), Duration::from_millis(100)));
    let t = Instant::now();
    let e = store.get("a/b").await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5), "took {:?}", t.elapsed());
    assert!(matches!(e, StorageError::Timeout { .. }) && e.is_retryable(), "{e:?}");
    assert!(e.to_string().starts_with("get a/b: gave up after 100ms"), "{e}");
    let e = store.put("a/c", Bytes::new(), PutMode::Create).await.unwrap_err();
    assert!(e.to_string().starts_with("put a/c: gave up"), "{e}");
    assert_eq!(store.describe(), "stalled://");
}
