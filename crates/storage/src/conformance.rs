//! The one conformance suite every backend passes (memory, file, the local S3 server in tests).
//! It panics with a message on the first violation, so it is called from `#[tokio::test]`s.

use crate::{BlobStore, PutMode, StorageError};
use bytes::Bytes;

/// What a backend promises beyond the common contract.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    /// Concurrent create-only puts of one key: exactly one succeeds. Real S3, GCS, Azure and the
    /// file backend (link(2)) promise this; the `s3s-fs` test server checks then writes, so two
    /// racing creates can both succeed there, and the suite only checks that one value is stored.
    pub atomic_create: bool,
}

/// Runs every check against `store`, which must be empty.
pub async fn run(store: &dyn BlobStore, caps: Capabilities) {
    let d = store.describe();
    // get/head of a missing key
    assert!(matches!(store.get("c/missing").await, Err(StorageError::NotFound { .. })), "{d}: get missing");
    assert!(store.head("c/missing").await.unwrap().is_none(), "{d}: head missing");
    assert!(store.list("c").await.unwrap().is_empty(), "{d}: list empty");

    // create, read back, head
    let v1 = Bytes::from_static(b"first version");
    store.put("c/a/1", v1.clone(), PutMode::Create).await.unwrap();
    assert_eq!(store.get("c/a/1").await.unwrap(), v1, "{d}: read back");
    let h = store.head("c/a/1").await.unwrap().expect("head after put");
    assert_eq!((h.key.as_str(), h.size), ("c/a/1", v1.len() as u64), "{d}: head");

    // ranges, including past the end
    assert_eq!(store.get_range("c/a/1", 6..9).await.unwrap().as_ref(), b"ver", "{d}: range");
    assert_eq!(store.get_range("c/a/1", 6..1000).await.unwrap().as_ref(), b"version", "{d}: range past end");
    assert!(store.get_range("c/missing", 0..4).await.unwrap_err().is_not_found(), "{d}: range of missing");

    // create-only never replaces
    let e = store.put("c/a/1", Bytes::from_static(b"other"), PutMode::Create).await;
    assert!(matches!(e, Err(StorageError::AlreadyExists { .. })), "{d}: create over existing: {e:?}");
    assert_eq!(store.get("c/a/1").await.unwrap(), v1, "{d}: create-only must not replace");

    // overwrite replaces
    store.put("c/a/2", Bytes::from_static(b"x"), PutMode::Create).await.unwrap();
    store.put("c/a/2", Bytes::from_static(b"yy"), PutMode::Overwrite).await.unwrap();
    assert_eq!(store.get("c/a/2").await.unwrap(), Bytes::from_static(b"yy"), "{d}: overwrite");

    // empty objects and larger objects
    store.put("c/b/empty", Bytes::new(), PutMode::Create).await.unwrap();
    assert_eq!(store.get("c/b/empty").await.unwrap().len(), 0, "{d}: empty object");
    let big: Bytes = (0..3_000_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>().into();
    store.put("c/b/big", big.clone(), PutMode::Create).await.unwrap();
    assert_eq!(store.get("c/b/big").await.unwrap(), big, "{d}: 3 MB object");

    // list is recursive, relative to the root, and scoped to the directory
    store.put("cc/not-in-c", Bytes::from_static(b"z"), PutMode::Create).await.unwrap();
    let mut keys: Vec<_> = store.list("c").await.unwrap().into_iter().map(|o| o.key).collect();
    keys.sort();
    assert_eq!(keys, ["c/a/1", "c/a/2", "c/b/big", "c/b/empty"], "{d}: list c");
    let a: Vec<_> = store.list("c/a").await.unwrap().into_iter().map(|o| o.key).collect();
    assert_eq!(a.len(), 2, "{d}: list c/a: {a:?}");

    // delete, and deleting again succeeds
    store.delete("c/a/1").await.unwrap();
    store.delete("c/a/1").await.unwrap();
    assert!(store.head("c/a/1").await.unwrap().is_none(), "{d}: deleted");
    // a deleted key can be created again
    store.put("c/a/1", Bytes::from_static(b"again"), PutMode::Create).await.unwrap();

    // concurrent create-only puts: exactly one wins
    let results = futures::future::join_all(
        (0..8).map(|i| store.put("c/race", Bytes::from(format!("writer {i}")), PutMode::Create)),
    )
    .await;
    let wins = results.iter().filter(|r| r.is_ok()).count();
    if caps.atomic_create {
        assert_eq!(wins, 1, "{d}: concurrent creates: {results:?}");
    } else {
        assert!(wins >= 1, "{d}: concurrent creates: {results:?}");
    }
    let stored = store.get("c/race").await.unwrap();
    assert!(String::from_utf8_lossy(&stored).starts_with("writer "), "{d}: one whole value is stored");

    // streamed uploads: invisible until finished, then whole; aborted ones leave nothing
    let mut w = store.put_writer("c/s/streamed").await.unwrap();
    let mut expected = Vec::new();
    for i in 0..12u8 {
        let chunk: Bytes = vec![i; 1 << 20].into();
        expected.extend_from_slice(&chunk);
        w.write(chunk).await.unwrap();
    }
    assert!(store.head("c/s/streamed").await.unwrap().is_none(), "{d}: visible before finish");
    w.finish().await.unwrap();
    let mut got = Vec::new();
    let mut stream = store.get_stream("c/s/streamed").await.unwrap();
    while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert!(got == expected, "{d}: streamed object differs ({} vs {} bytes)", got.len(), expected.len());
    let mut w = store.put_writer("c/s/aborted").await.unwrap();
    w.write(Bytes::from_static(b"partial")).await.unwrap();
    w.abort().await.unwrap();
    assert!(store.head("c/s/aborted").await.unwrap().is_none(), "{d}: aborted upload visible");
    assert!(store.get_stream("c/s/missing").await.is_err(), "{d}: stream of a missing key");

    // invalid keys are refused before reaching the backend
    assert!(store.put("../escape", Bytes::new(), PutMode::Create).await.is_err(), "{d}: key check");
}
