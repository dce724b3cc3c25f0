//! S3 over TLS with certificates made the common way (`openssl req -x509`), through a TLS front
//! on 127.0.0.1 in front of the local S3 server: a private CA is trusted through `ca_file`, a
//! refused certificate fails at once (no retry loop) with the cause and the fix, and the lab
//! switch `allow_invalid_certificates` lets anything through.

use bytes::Bytes;
use std::time::Duration;
use walnut_storage::conformance::{self, Capabilities};
use walnut_storage::{DynStore, PutMode, StorageError, StorageOptions, TlsProblem, open};
use walnut_testkit::{S3Server, TlsCert, TlsFront};

fn options(endpoint: String) -> StorageOptions {
    let mut o = StorageOptions::default();
    o.s3.endpoint = Some(endpoint);
    o.s3.access_key_id = Some(walnut_testkit::s3::ACCESS_KEY.into());
    o.s3.secret_access_key = Some(walnut_storage::Secret::new(walnut_testkit::s3::SECRET_KEY));
    // Long enough that a retried handshake would show: the front counts every connection.
    o.retry_time = Duration::from_secs(30);
    o
}

fn store(s3: &S3Server, o: &StorageOptions) -> DynStore {
    open(&s3.repo_url("tls"), o).expect("open the store")
}

/// The TLS problem of a failed put, with its message.
async fn refused(store: &DynStore) -> (TlsProblem, String) {
    match store.put("probe", Bytes::from_static(b"x"), PutMode::Overwrite).await {
        Err(StorageError::Tls { problem, .. }) => {
            let e = store.put("probe", Bytes::from_static(b"x"), PutMode::Overwrite).await.unwrap_err();
            (problem, e.to_string())
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_is_trusted_through_ca_file() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let cert = TlsCert::ca_signed(dir.path());
    let front = TlsFront::start(s3.addr(), &cert);

    // Not trusted by default: refused at once, naming the fix.
    let untrusted = store(&s3, &options(front.endpoint()));
    let (problem, message) = refused(&untrusted).await;
    assert_eq!(problem, TlsProblem::UnknownIssuer, "{message}");
    assert!(message.contains("ca_file"), "{message}");
    assert!(front.handshakes() <= 4, "a refused certificate was retried: {} handshakes", front.handshakes());
    assert!(!message.contains(walnut_testkit::s3::SECRET_KEY));

    // Trusted through ca_file: the whole conformance suite passes over TLS.
    let mut o = options(front.endpoint());
    o.tls.ca_file = Some(cert.ca.clone());
    // (s3s-fs, behind the front, does not make concurrent creates atomic.)
    conformance::run_all(store(&s3, &o).as_ref(), Capabilities { atomic_create: false }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_certificate_used_as_the_servers_own_is_named_with_the_fix() {
    let s3 = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let cert = TlsCert::self_signed(dir.path());
    let front = TlsFront::start(s3.addr(), &cert);

    // Even trusted, a CA:TRUE certificate is refused as a server's own: walnut says why.
    let mut o = options(front.endpoint());
    o.tls.ca_file = Some(cert.ca.clone());
    let (problem, message) = refused(&store(&s3, &o)).await;
    assert_eq!(problem, TlsProblem::CaUsedAsEndEntity, "{message}");
    assert!(message.contains("CA:TRUE") && message.contains("CA:FALSE"), "{message}");
    assert!(front.handshakes() <= 4, "a refused certificate was retried: {} handshakes", front.handshakes());

    // The lab switch lets it through.
    let mut lab = options(front.endpoint());
    lab.tls.allow_invalid_certificates = true;
    let store = store(&s3, &lab);
    store.put("k", Bytes::from_static(b"over tls"), PutMode::Create).await.unwrap();
    assert_eq!(store.get("k").await.unwrap(), Bytes::from_static(b"over tls"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_url_to_a_plain_http_server_is_named() {
    let s3 = S3Server::start();
    let endpoint = s3.endpoint().replace("http://", "https://");
    let (problem, message) = refused(&store(&s3, &options(endpoint))).await;
    assert_eq!(problem, TlsProblem::NotTls, "{message}");
    assert!(message.contains("http://"), "{message}");
}

#[test]
fn an_unusable_ca_file_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello\n").unwrap();
    for file in [missing, not_pem] {
        let mut o = options("https://127.0.0.1:9".into());
        o.tls.ca_file = Some(file.clone());
        let e = open("s3://walnut/x", &o).unwrap_err();
        assert!(matches!(e, StorageError::Config { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains("ca_file") && text.contains(&file.display().to_string()), "{text}");
    }
}
