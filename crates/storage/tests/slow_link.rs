//! Downloads over a slow, stalled or broken link, through the fault proxy in front of the local
//! S3 server: a body that keeps moving is never cut by a timeout, a link that goes silent fails
//! within the configured bounds naming the key, and a broken body resumes where it stopped.

use bytes::Bytes;
use futures::TryStreamExt;
use std::time::{Duration, Instant};
use walnut_storage::{DynStore, PutMode, S3Options, Secret, StorageOptions};
use walnut_testkit::s3::{ACCESS_KEY, SECRET_KEY};
use walnut_testkit::{Fault, FaultProxy, S3Server};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const RETRY_TIME: Duration = Duration::from_secs(3);
const DEADLINE: Duration = Duration::from_secs(6);
const KEY: &str = "base/20260101T000000Z/part-00000.tar";

fn open(proxy: &FaultProxy, s3: &S3Server) -> DynStore {
    let o = StorageOptions {
        s3: S3Options {
            endpoint: Some(proxy.endpoint()),
            region: Some("us-east-1".into()),
            access_key_id: Some(ACCESS_KEY.into()),
            secret_access_key: Some(Secret::new(SECRET_KEY)),
            session_token: None,
            force_path_style: Some(true),
        },
        request_timeout: REQUEST_TIMEOUT,
        retry_time: RETRY_TIME,
        deadline: DEADLINE,
        ..StorageOptions::default()
    };
    walnut_storage::open(&s3.repo_url("slow"), &o).expect("open the store")
}

/// 4 MiB that do not repeat with a short period (a resumed download at a wrong offset shows).
fn content() -> Bytes {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let v: Vec<u8> = (0..4 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    Bytes::from(v)
}

async fn setup() -> (S3Server, FaultProxy, DynStore, Bytes) {
    let s3 = S3Server::start();
    let proxy = FaultProxy::start(s3.addr());
    let store = open(&proxy, &s3);
    let data = content();
    store.put(KEY, data.clone(), PutMode::Create).await.expect("upload in pass-through");
    (s3, proxy, store, data)
}

async fn download(store: &DynStore) -> walnut_storage::Result<Vec<u8>> {
    let chunks: Vec<Bytes> = store.get_stream(KEY).await?.try_collect().await?;
    Ok(chunks.concat())
}

/// Defect 6: a download that streams longer than request_timeout (and longer than the retry
/// time and the deadline) succeeds while bytes keep flowing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_download_that_keeps_moving_succeeds() {
    let (_s3, proxy, store, data) = setup().await;
    // About 6.5 s for 4 MiB: three request timeouts, more than the retry time and the deadline.
    proxy.set(Fault::Throttle(650_000));
    let t = Instant::now();
    let got = download(&store).await.expect("a slow but moving download succeeds");
    let took = t.elapsed();
    assert!(got == data[..], "byte-identical");
    assert!(took > DEADLINE, "the link really was slow: {took:?}");
    assert!(proxy.stats().throttled >= 1);
}

/// A link that accepts and never answers fails within request_timeout plus the retry bounds,
/// with a timeout error naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_download_fails_in_bounded_time_naming_the_key() {
    let (_s3, proxy, store, _) = setup().await;
    proxy.set(Fault::Stall);
    let t = Instant::now();
    let e = download(&store).await.expect_err("nothing ever arrives");
    let took = t.elapsed();
    let text = e.to_string();
    eprintln!("stalled download failed after {took:?}: {text}");
    assert!(took < DEADLINE + Duration::from_secs(2), "bounded: {took:?} ({text})");
    assert!(e.is_retryable(), "{e:?}");
    assert!(text.contains(KEY), "names the key: {text}");
    assert!(text.contains("timed out") || text.contains("gave up after"), "says it timed out: {text}");
    assert!(proxy.stats().stalled >= 1);
}

/// A body cut short resumes from the byte reached, every time it is cut, and the bytes are
/// the object's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_cut_mid_body_resumes_byte_identical() {
    let (_s3, proxy, store, data) = setup().await;
    // Every response longer than 1 MiB is cut after 1 MiB: the 4 MiB download needs 4 pieces.
    proxy.set(Fault::ResetMidBody { after: 1 << 20, every: 1 });
    let got = download(&store).await.expect("the download resumes");
    assert!(got == data[..], "byte-identical after resuming ({} of {} bytes)", got.len(), data.len());
    assert!(proxy.stats().resets >= 3, "{:?}", proxy.stats());
}

/// A slow download broken after the client's own retry time has run out (so `object_store`
/// no longer resumes it by itself) resumes from the byte reached, byte-identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_download_broken_late_resumes_byte_identical() {
    let (_s3, proxy, store, data) = setup().await;
    proxy.set(Fault::Throttle(650_000));
    let before = proxy.stats().body_bytes;
    let t = Instant::now();
    let task = {
        let store = store.clone();
        tokio::spawn(async move { download(&store).await })
    };
    // Past the retry time (about 4 s in), with bytes still to come.
    let wait_until = Instant::now() + Duration::from_secs(20);
    while proxy.stats().body_bytes - before < 2_700_000 {
        assert!(Instant::now() < wait_until, "the download makes progress: {:?}", proxy.stats());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(t.elapsed() > RETRY_TIME, "broken after the retry time: {:?}", t.elapsed());
    proxy.cut_open_bodies();
    let got = task.await.unwrap().expect("the download resumes after a late break");
    assert!(got == data[..], "byte-identical after resuming ({} of {} bytes)", got.len(), data.len());
    assert!(proxy.stats().resets >= 1, "{:?}", proxy.stats());
}

/// Starts a throttled download and waits until more than `bytes` of it went through.
async fn download_started(
    proxy: &FaultProxy,
    store: &DynStore,
    bytes: u64,
) -> tokio::task::JoinHandle<walnut_storage::Result<Vec<u8>>> {
    proxy.set(Fault::Throttle(650_000));
    let before = proxy.stats().body_bytes;
    let task = {
        let store = store.clone();
        tokio::spawn(async move { download(&store).await })
    };
    let wait_until = Instant::now() + Duration::from_secs(20);
    while proxy.stats().body_bytes - before < bytes {
        assert!(Instant::now() < wait_until, "the download makes progress: {:?}", proxy.stats());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    task
}

/// A body that goes silent mid-way (the connection stays open) is given up after
/// request_timeout without a byte, and the rest is fetched from the byte reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_that_goes_silent_mid_body_resumes_byte_identical() {
    let (_s3, proxy, store, data) = setup().await;
    let task = download_started(&proxy, &store, 1 << 20).await;
    proxy.set(Fault::PassThrough);
    proxy.stall_open_bodies();
    let got = task.await.unwrap().expect("the download resumes after the link went silent");
    assert!(got == data[..], "byte-identical after resuming ({} of {} bytes)", got.len(), data.len());
    assert!(proxy.stats().stalled >= 1, "{:?}", proxy.stats());
}

/// A body that goes silent mid-way for good fails within the deadline of a silent chunk, with a
/// timeout error naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_silent_for_good_fails_in_bounded_time_naming_the_key() {
    let (_s3, proxy, store, _) = setup().await;
    let task = download_started(&proxy, &store, 1 << 20).await;
    proxy.set(Fault::Stall);
    proxy.stall_open_bodies();
    let t = Instant::now();
    let e = task.await.unwrap().expect_err("nothing more ever arrives");
    let took = t.elapsed();
    let text = e.to_string();
    eprintln!("silent download failed {took:?} after the link went silent: {text}");
    assert!(took < DEADLINE + Duration::from_secs(2), "bounded: {took:?} ({text})");
    assert!(e.is_retryable(), "{e:?}");
    assert!(text.contains(KEY), "names the key: {text}");
    assert!(text.contains("timed out") || text.contains("gave up after"), "says it timed out: {text}");
}
