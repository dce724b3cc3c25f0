//! A TLS front on 127.0.0.1 that terminates HTTPS and forwards the plain bytes to a local server
//! (the S3 server), with certificates made the way operators make them: `openssl req -x509`.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A certificate and its key, as PEM files, and the CA to trust for it.
pub struct TlsCert {
    /// What the server presents (the leaf first).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The file a client trusts: the CA (for a self-signed certificate, the certificate itself).
    pub ca: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    std::fs::create_dir_all(dir).expect("create the certificate directory");
    let out = Command::new("openssl").args(args).current_dir(dir).output().unwrap_or_else(|e| {
        panic!("cannot run openssl ({e}): install it (apt-get install openssl); scripts/setup.sh does")
    });
    assert!(out.status.success(), "openssl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

impl TlsCert {
    /// The common lab certificate: `openssl req -x509` for 127.0.0.1, which OpenSSL marks
    /// CA:TRUE and which the server then uses as its own.
    pub fn self_signed(dir: &Path) -> TlsCert {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
                "-keyout",
                "self.key",
                "-out",
                "self.pem",
            ],
        );
        TlsCert { cert: dir.join("self.pem"), key: dir.join("self.key"), ca: dir.join("self.pem") }
    }

    /// A private CA and a server certificate for 127.0.0.1 signed by it (CA:FALSE), as a
    /// self-hosted MinIO or Ceph would be set up.
    pub fn ca_signed(dir: &Path) -> TlsCert {
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend(["-days", "2", "-subj", "/CN=walnut test CA", "-keyout", "ca.key", "-out", "ca.pem"]);
        openssl(dir, &ca);
        let mut csr = vec!["req", "-new"];
        csr.extend(ec);
        csr.extend(["-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr"]);
        openssl(dir, &csr);
        std::fs::write(
            dir.join("server.ext"),
            "basicConstraints=critical,CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1\n",
        )
        .unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                "server.ext",
                "-out",
                "server.pem",
            ],
        );
        TlsCert { cert: dir.join("server.pem"), key: dir.join("server.key"), ca: dir.join("ca.pem") }
    }
}

/// HTTPS on 127.0.0.1 (a free port) in front of `upstream`.
pub struct TlsFront {
    addr: SocketAddr,
    connections: Arc<AtomicU64>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl TlsFront {
    pub fn start(upstream: SocketAddr, cert: &TlsCert) -> TlsFront {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert.cert)
            .expect("read the certificate")
            .collect::<Result<_, _>>()
            .expect("parse the certificate");
        let key = PrivateKeyDer::from_pem_file(&cert.key).expect("read the key");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server certificate");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_io()
            .enable_time()
            .build()
            .expect("TLS front runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("TLS front: bind 127.0.0.1:0");
        listener.set_nonblocking(true).expect("nonblocking listener");
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicU64::new(0));
        let counted = connections.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            loop {
                let Ok((socket, _)) = listener.accept().await else { continue };
                counted.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // A client that refuses the certificate ends the handshake: nothing to forward.
                    let Ok(mut tls) = acceptor.accept(socket).await else { return };
                    let Ok(mut plain) = tokio::net::TcpStream::connect(upstream).await else { return };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                });
            }
        });
        TlsFront { addr, connections, runtime: Some(runtime) }
    }

    /// How many connections (TLS handshakes begun) the front has accepted.
    pub fn handshakes(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    /// `https://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
