//! The one conformance suite every backend passes (memory, file, the local S3 server in tests),
//! built with the `testing` feature.
//!
//! Each behaviour is its own case, `async fn case(store)`, working in its own directory under
//! `c/`, so cases run in any order (or alone) on one store; [`run_all`] runs them all. A case
//! panics with a message naming the store and the broken promise, so cases are called from
//! `#[tokio::test]`s.

use crate::{BlobStore, PutMode, StorageError};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

/// What a backend promises beyond the common contract.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    /// Concurrent create-only puts of one key: exactly one succeeds. Real S3, GCS, Azure and the
    /// file backend (link(2)) promise this; the `s3s-fs` test server checks then writes, so two
    /// racing creates can both succeed there, and the suite only checks that one value is stored.
    pub atomic_create: bool,
}

/// How many objects [`list_pages_beyond_1000_keys`] stores: more than one S3 listing page (1,000).
pub const MANY_KEYS: usize = 1_100;

/// Uploads in flight at once when a case stores many objects.
const PARALLEL_PUTS: usize = 32;

/// Runs every case against `store`, which must not hold anything under `c/` or `cc/`.
pub async fn run_all(store: &dyn BlobStore, caps: Capabilities) {
    missing_keys_read_as_absent(store).await;
    put_then_get_and_head(store).await;
    get_range_stops_at_the_end(store).await;
    put_create_is_exclusive(store).await;
    put_overwrite_replaces(store).await;
    empty_and_large_objects(store).await;
    list_is_recursive_relative_and_scoped(store).await;
    list_pages_beyond_1000_keys(store).await;
    delete_is_idempotent_and_frees_the_key(store).await;
    concurrent_creates_store_one_whole_value(store, caps).await;
    streamed_upload_appears_whole_on_finish(store).await;
    aborted_upload_leaves_nothing(store).await;
    invalid_keys_are_refused(store).await;
}

/// Reading an absent key is `NotFound` (typed, not retryable, naming the operation and the
/// key) for get, ranges and streams; `head` says `None`, a listing is empty, a delete succeeds.
pub async fn missing_keys_read_as_absent(store: &dyn BlobStore) {
    let d = store.describe();
    let key = "c/missing/object";
    let e = store.get(key).await.unwrap_err();
    assert!(matches!(e, StorageError::NotFound { .. }) && e.is_not_found(), "{d}: get of a missing key: {e:?}");
    assert!(!e.is_retryable(), "{d}: a missing key is not retryable: {e}");
    assert_eq!(e.to_string(), format!("get {key}: not found"), "{d}: message names the operation and key");
    assert!(store.head(key).await.unwrap().is_none(), "{d}: head of a missing key");
    let e = store.get_range(key, 0..4).await.unwrap_err();
    assert!(e.is_not_found(), "{d}: range of a missing key: {e:?}");
    match store.get_stream(key).await {
        Ok(_) => panic!("{d}: stream of a missing key succeeded"),
        Err(e) => assert!(e.is_not_found(), "{d}: stream of a missing key: {e:?}"),
    }
    assert!(store.list("c/missing").await.unwrap().is_empty(), "{d}: list of a missing directory");
    store.delete(key).await.unwrap_or_else(|e| panic!("{d}: delete of a missing key: {e}"));
}

/// A created object reads back byte for byte, and `head` reports its key and size.
pub async fn put_then_get_and_head(store: &dyn BlobStore) {
    let d = store.describe();
    let v = Bytes::from_static(b"first version");
    store.put("c/rw/1", v.clone(), PutMode::Create).await.unwrap();
    assert_eq!(store.get("c/rw/1").await.unwrap(), v, "{d}: read back");
    let h = store.head("c/rw/1").await.unwrap().unwrap_or_else(|| panic!("{d}: head after put is None"));
    assert_eq!((h.key.as_str(), h.size), ("c/rw/1", v.len() as u64), "{d}: head");
}

/// `get_range` returns the bytes asked for, shorter when the object ends first, empty past it.
pub async fn get_range_stops_at_the_end(store: &dyn BlobStore) {
    let d = store.describe();
    store.put("c/range/1", Bytes::from_static(b"first version"), PutMode::Create).await.unwrap();
    assert_eq!(store.get_range("c/range/1", 6..9).await.unwrap().as_ref(), b"ver", "{d}: range");
    assert_eq!(store.get_range("c/range/1", 6..1000).await.unwrap().as_ref(), b"version", "{d}: range past end");
    assert!(store.get_range("c/range/1", 100..200).await.unwrap().is_empty(), "{d}: range after the end");
}

/// A create-only put of a taken key fails with `AlreadyExists` (not retryable) and leaves the
/// stored object as it was.
pub async fn put_create_is_exclusive(store: &dyn BlobStore) {
    let d = store.describe();
    let v = Bytes::from_static(b"the original");
    store.put("c/excl/1", v.clone(), PutMode::Create).await.unwrap();
    let e = store.put("c/excl/1", Bytes::from_static(b"other"), PutMode::Create).await.unwrap_err();
    assert!(
        matches!(e, StorageError::AlreadyExists { .. }) && e.is_already_exists(),
        "{d}: create over existing: {e:?}"
    );
    assert!(!e.is_retryable(), "{d}: a taken key is not retryable: {e}");
    assert_eq!(e.to_string(), "put c/excl/1: already exists", "{d}: message names the operation and key");
    assert_eq!(store.get("c/excl/1").await.unwrap(), v, "{d}: create-only must not replace");
}

/// An overwrite put replaces the object, longer or shorter.
pub async fn put_overwrite_replaces(store: &dyn BlobStore) {
    let d = store.describe();
    store.put("c/over/1", Bytes::from_static(b"x"), PutMode::Create).await.unwrap();
    store.put("c/over/1", Bytes::from_static(b"yyy"), PutMode::Overwrite).await.unwrap();
    assert_eq!(store.get("c/over/1").await.unwrap().as_ref(), b"yyy", "{d}: overwrite with longer");
    store.put("c/over/1", Bytes::from_static(b"z"), PutMode::Overwrite).await.unwrap();
    assert_eq!(store.get("c/over/1").await.unwrap().as_ref(), b"z", "{d}: overwrite with shorter");
    // an overwrite of an absent key creates it
    store.put("c/over/2", Bytes::from_static(b"new"), PutMode::Overwrite).await.unwrap();
    assert_eq!(store.get("c/over/2").await.unwrap().as_ref(), b"new", "{d}: overwrite creates");
}

/// Empty objects exist (size 0), and a 3 MB object survives the round trip.
pub async fn empty_and_large_objects(store: &dyn BlobStore) {
    let d = store.describe();
    store.put("c/b/empty", Bytes::new(), PutMode::Create).await.unwrap();
    assert_eq!(store.get("c/b/empty").await.unwrap().len(), 0, "{d}: empty object");
    let h = store.head("c/b/empty").await.unwrap();
    assert_eq!(h.map(|h| h.size), Some(0), "{d}: an empty object exists");
    let big: Bytes = (0..3_000_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>().into();
    store.put("c/b/big", big.clone(), PutMode::Create).await.unwrap();
    assert!(store.get("c/b/big").await.unwrap() == big, "{d}: 3 MB object differs");
}

/// A listing is recursive, gives keys relative to the store's root with their sizes, and stays
/// inside the directory (`c/list` does not include `c/list-other`).
pub async fn list_is_recursive_relative_and_scoped(store: &dyn BlobStore) {
    let d = store.describe();
    for (k, v) in [("c/list/a/1", "1"), ("c/list/a/2", "22"), ("c/list/b/deep/3", "333"), ("c/list-other/x", "x")] {
        store.put(k, Bytes::from(v), PutMode::Create).await.unwrap();
    }
    let mut got: Vec<_> = store.list("c/list").await.unwrap().into_iter().map(|o| (o.key, o.size)).collect();
    got.sort();
    let want = [("c/list/a/1", 1), ("c/list/a/2", 2), ("c/list/b/deep/3", 3)].map(|(k, s)| (k.to_string(), s));
    assert_eq!(got, want, "{d}: list c/list");
    let a: Vec<_> = store.list("c/list/a").await.unwrap().into_iter().map(|o| o.key).collect();
    assert_eq!(a.len(), 2, "{d}: list c/list/a: {a:?}");
}

/// A listing returns every key when there are more than one page's worth (S3 pages at 1,000):
/// [`MANY_KEYS`] objects, each once, and nothing from a sibling directory.
pub async fn list_pages_beyond_1000_keys(store: &dyn BlobStore) {
    let d = store.describe();
    let key = |i: usize| format!("c/many/{i:05}");
    futures::stream::iter(0..MANY_KEYS)
        .map(|i| async move { store.put(&key(i), Bytes::from(i.to_string()), PutMode::Create).await })
        .buffer_unordered(PARALLEL_PUTS)
        .try_collect::<()>()
        .await
        .unwrap_or_else(|e| panic!("{d}: storing {MANY_KEYS} objects: {e}"));
    store.put("c/many-not/x", Bytes::from_static(b"x"), PutMode::Create).await.unwrap();
    let listed = store.list("c/many").await.unwrap();
    let mut keys: Vec<_> = listed.iter().map(|o| o.key.clone()).collect();
    keys.sort();
    let want: Vec<_> = (0..MANY_KEYS).map(key).collect();
    assert!(
        keys == want,
        "{d}: listed {} keys, want {MANY_KEYS} (first {:?}, last {:?})",
        keys.len(),
        keys.first(),
        keys.last()
    );
    let sized = listed.iter().all(|o| {
        o.key
            .rsplit('/')
            .next()
            .and_then(|n| n.parse::<usize>().ok())
            .is_some_and(|i| o.size == i.to_string().len() as u64)
    });
    assert!(sized, "{d}: listed sizes match the objects");
}

/// Deleting removes the object, deleting again succeeds, and the key can be created again.
pub async fn delete_is_idempotent_and_frees_the_key(store: &dyn BlobStore) {
    let d = store.describe();
    store.put("c/del/1", Bytes::from_static(b"one"), PutMode::Create).await.unwrap();
    store.delete("c/del/1").await.unwrap();
    assert!(store.head("c/del/1").await.unwrap().is_none(), "{d}: deleted");
    assert!(store.get("c/del/1").await.unwrap_err().is_not_found(), "{d}: get after delete");
    store.delete("c/del/1").await.unwrap_or_else(|e| panic!("{d}: second delete: {e}"));
    store.put("c/del/1", Bytes::from_static(b"again"), PutMode::Create).await.unwrap();
    assert_eq!(store.get("c/del/1").await.unwrap().as_ref(), b"again", "{d}: created again");
}

/// Concurrent create-only puts of one key: one whole value is stored, and where the backend
/// promises atomic creates, exactly one put succeeds and the others say `AlreadyExists`.
pub async fn concurrent_creates_store_one_whole_value(store: &dyn BlobStore, caps: Capabilities) {
    let d = store.describe();
    let results = futures::future::join_all(
        (0..8).map(|i| store.put("c/race/1", Bytes::from(format!("writer {i}")), PutMode::Create)),
    )
    .await;
    let wins: Vec<_> = results.iter().enumerate().filter(|(_, r)| r.is_ok()).map(|(i, _)| i).collect();
    if caps.atomic_create {
        assert_eq!(wins.len(), 1, "{d}: concurrent creates: {results:?}");
        assert!(
            results.iter().filter(|r| r.is_err()).all(|r| matches!(r, Err(StorageError::AlreadyExists { .. }))),
            "{d}: the losers say AlreadyExists: {results:?}"
        );
    } else {
        assert!(!wins.is_empty(), "{d}: concurrent creates: {results:?}");
    }
    let stored = String::from_utf8_lossy(&store.get("c/race/1").await.unwrap()).into_owned();
    let whole = (0..8).map(|i| format!("writer {i}")).any(|v| v == stored);
    assert!(whole, "{d}: one whole value is stored, got {stored:?}");
    if caps.atomic_create {
        assert_eq!(stored, format!("writer {}", wins[0]), "{d}: the stored value is the winner's");
    }
}

/// A streamed upload is invisible until finished, then reads back whole (streamed too).
pub async fn streamed_upload_appears_whole_on_finish(store: &dyn BlobStore) {
    let d = store.describe();
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
    while let Some(chunk) = stream.next().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert!(got == expected, "{d}: streamed object differs ({} vs {} bytes)", got.len(), expected.len());
}

/// An aborted streamed upload leaves no object behind.
pub async fn aborted_upload_leaves_nothing(store: &dyn BlobStore) {
    let d = store.describe();
    let mut w = store.put_writer("c/s/aborted").await.unwrap();
    w.write(Bytes::from_static(b"partial")).await.unwrap();
    w.abort().await.unwrap();
    assert!(store.head("c/s/aborted").await.unwrap().is_none(), "{d}: aborted upload visible");
    assert!(store.list("c/s").await.unwrap().iter().all(|o| o.key != "c/s/aborted"), "{d}: aborted upload listed");
}

/// Keys that are not relative paths of plain names are refused with `InvalidKey` (not
/// retryable, naming the operation) by every operation, before reaching the backend.
pub async fn invalid_keys_are_refused(store: &dyn BlobStore) {
    let d = store.describe();
    let check = |what: &str, key: &str, r: Result<(), StorageError>| match r {
        Err(e @ StorageError::InvalidKey { .. }) => {
            assert!(!e.is_retryable(), "{d}: {what} {key:?}: an invalid key is not retryable");
            assert!(e.to_string().contains(&format!("{key:?}: invalid object key")), "{d}: {what} {key:?}: {e}");
        }
        other => panic!("{d}: {what} {key:?}: want InvalidKey, got {other:?}"),
    };
    for key in ["", "/abs", "../escape", "c/../../escape", "c//double", "c/./dot", "c/trailing/", "c/.tmp.x"] {
        check("put", key, store.put(key, Bytes::new(), PutMode::Create).await);
        check("get", key, store.get(key).await.map(drop));
        check("head", key, store.head(key).await.map(drop));
        check("range", key, store.get_range(key, 0..1).await.map(drop));
        check("delete", key, store.delete(key).await);
        check("stream", key, store.get_stream(key).await.map(drop));
        check("writer", key, store.put_writer(key).await.map(drop));
    }
    check("list", "../escape", store.list("../escape").await.map(drop));
}
