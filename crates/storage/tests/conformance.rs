//! The storage conformance suite against every backend: memory, file, and a real S3-compatible
//! server on 127.0.0.1.

use std::time::{Duration, Instant};
use walnut_storage::conformance::{self, Capabilities};
use walnut_storage::{BlobStore, PutMode, StorageOptions, open};
use walnut_testkit::S3Server;

fn s3_options(s3: &S3Server) -> StorageOptions {
    let mut o = StorageOptions::default();
    o.s3.endpoint = Some(s3.endpoint());
    o.s3.access_key_id = Some(walnut_testkit::s3::ACCESS_KEY.into());
    o.s3.secret_access_key = Some(walnut_storage::Secret::new(walnut_testkit::s3::SECRET_KEY));
    o
}

#[tokio::test]
async fn memory_backend_conforms() {
    let store = open("memory://", &StorageOptions::default()).unwrap();
    conformance::run(store.as_ref(), Capabilities { atomic_create: true }).await;
}

#[tokio::test]
async fn file_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&format!("file://{}/repo", dir.path().display()), &StorageOptions::default()).unwrap();
    conformance::run(store.as_ref(), Capabilities { atomic_create: true }).await;
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
    conformance::run(store.as_ref(), Capabilities { atomic_create: false }).await;
    // objects really live under the prefix in the bucket
    assert!(s3.bucket_dir().join("conformance/prefix/c/b/big").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_with_wrong_credentials_fails_without_leaking_the_secret() {
    let s3 = S3Server::start();
    let mut o = s3_options(&s3);
    o.s3.secret_access_key = Some(walnut_storage::Secret::new("definitely-wrong-secret"));
    let store = open(&s3.repo_url("x"), &o).unwrap();
    let e = store.put("a/b", bytes::Bytes::from_static(b"x"), PutMode::Create).await.unwrap_err();
    let text = format!("{e} {e:?}");
    assert!(!text.contains("definitely-wrong-secret"), "{text}");
    assert!(!e.is_retryable(), "bad credentials are permanent: {text}");
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
    assert!(e.is_retryable(), "{e}");
    // and it works again once the server is back
    s3.restart();
    store.put("a/b", bytes::Bytes::from_static(b"x"), PutMode::Create).await.unwrap();
    assert_eq!(store.get("a/b").await.unwrap().as_ref(), b"x");
}

#[tokio::test]
async fn bad_urls_are_explained() {
    for (url, needle) in [("ftp://x/y", "unknown scheme"), ("s3:///prefix", "bucket"), ("not a url", "file:///path")] {
        let e = open(url, &StorageOptions::default()).unwrap_err().to_string();
        assert!(e.contains(needle), "{url}: {e}");
    }
}

#[test]
fn store_is_object_safe() {
    fn _f(_: &dyn BlobStore) {}
}
