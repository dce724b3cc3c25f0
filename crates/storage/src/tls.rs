//! TLS to remote stores: the extra trust walnut is told about, and what a refused handshake means.
//!
//! A store behind a private CA (a self-hosted MinIO or Ceph) is trusted through `ca_file`; a lab
//! may turn certificate checks off with `allow_invalid_certificates` (logged loudly at every
//! open). A handshake the client refuses never heals by retrying, so [`Connector`] marks it as
//! not retryable before object_store's retry loop sees it, and [`problem`] turns it into a
//! [`TlsProblem`] whose text names the cause and the fix.

use object_store::client::{
    HttpClient, HttpConnector, HttpError, HttpErrorKind, HttpRequest, HttpResponse, HttpService,
};
use object_store::{Certificate, ClientOptions};
use std::fmt;
use std::path::{Path, PathBuf};

use crate::{Result, StorageError};

/// What the app resolved from `[s3] ca_file` / `allow_invalid_certificates` (used by every
/// remote store).
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// A PEM file of one or more CA certificates to trust besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate (labs only: anyone on the path can read and change the traffic).
    pub allow_invalid_certificates: bool,
}

/// The trust a client is built with: the loaded `ca_file` and the lab switch.
#[derive(Debug, Clone, Default)]
pub(crate) struct Trust {
    roots: Vec<Certificate>,
    allow_invalid: bool,
}

impl Trust {
    /// Loads `ca_file` (a refused file is a [`StorageError::Config`] naming it) and logs the lab
    /// switch.
    pub(crate) fn load(o: &TlsOptions, repo: &str) -> Result<Trust> {
        let roots = match &o.ca_file {
            Some(path) => load_pem(path)?,
            None => Vec::new(),
        };
        if o.allow_invalid_certificates {
            tracing::warn!(repo = %repo, "allow_invalid_certificates = true: TLS certificates are NOT checked; \
                anyone between walnut and the store can read and change backups and WAL (labs only)");
        }
        Ok(Trust { roots, allow_invalid: o.allow_invalid_certificates })
    }

    pub(crate) fn apply(&self, mut c: ClientOptions) -> ClientOptions {
        for cert in &self.roots {
            c = c.with_root_certificate(cert.clone());
        }
        c.with_allow_invalid_certificates(self.allow_invalid)
    }
}

fn load_pem(path: &Path) -> Result<Vec<Certificate>> {
    let shown = path.display();
    let pem = std::fs::read(path).map_err(|e| StorageError::Config {
        message: format!("[s3] ca_file {shown}: cannot read it: give the path of a PEM file of CA certificates"),
        source: Some(Box::new(e)),
    })?;
    let certs = Certificate::from_pem_bundle(&pem).map_err(|e| StorageError::Config {
        message: format!("[s3] ca_file {shown}: not a PEM file of certificates (-----BEGIN CERTIFICATE-----)"),
        source: Some(Box::new(e)),
    })?;
    if certs.is_empty() {
        return Err(StorageError::config(format!(
            "[s3] ca_file {shown}: holds no certificate: give a PEM file with -----BEGIN CERTIFICATE----- blocks"
        )));
    }
    Ok(certs)
}

/// Why a TLS handshake with the store was refused, with the fix in its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsProblem {
    /// The server's own certificate is a CA certificate (a self-signed `openssl req -x509` one).
    CaUsedAsEndEntity,
    /// Signed by a CA walnut does not trust.
    UnknownIssuer,
    /// Does not name the endpoint's host.
    WrongName,
    /// Expired or not valid yet.
    Expired,
    /// Some other refusal of the certificate (revoked, bad signature, wrong purpose, ...).
    BadCertificate(String),
    /// The endpoint answered something that is not TLS (a plain-HTTP server on an https URL).
    NotTls,
    /// The handshake failed for another reason (no common protocol version or cipher, ...).
    Handshake(String),
}

impl fmt::Display for TlsProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const CA: &str = "set [s3] ca_file to the PEM file of the CA that signed it";
        const LAB: &str = "for a lab only, allow_invalid_certificates = true turns the checks off";
        match self {
            TlsProblem::CaUsedAsEndEntity => write!(
                f,
                "the server presents a CA certificate (basicConstraints CA:TRUE, as `openssl req -x509` makes) as \
                 its own, which TLS clients refuse even when it is trusted: give the server a certificate signed by \
                 that CA (CA:FALSE, the endpoint's host in subjectAltName) and {CA}; {LAB}"
            ),
            TlsProblem::UnknownIssuer => {
                write!(f, "the server's certificate is not signed by a CA walnut trusts: {CA}; {LAB}")
            }
            TlsProblem::WrongName => write!(
                f,
                "the server's certificate does not name the endpoint's host: use a host name (or IP) listed in its \
                 subjectAltName in [s3] endpoint, or reissue the certificate for this one"
            ),
            TlsProblem::Expired => write!(
                f,
                "the server's certificate has expired or is not valid yet: renew it (and check this host's clock)"
            ),
            TlsProblem::BadCertificate(what) => {
                write!(f, "the server's certificate is refused ({what}): reissue it, or {CA}")
            }
            TlsProblem::NotTls => write!(
                f,
                "the endpoint does not speak TLS: if the server is plain HTTP, write http:// in [s3] endpoint"
            ),
            TlsProblem::Handshake(what) => write!(
                f,
                "the TLS handshake failed ({what}): check that the endpoint serves HTTPS with TLS 1.2 or 1.3 on that port"
            ),
        }
    }
}

impl TlsProblem {
    fn from_rustls(e: &rustls::Error) -> TlsProblem {
        use rustls::{CertificateError as C, Error as E};
        match e {
            E::InvalidCertificate(c) => match c {
                C::Other(other)
                    if matches!(other.0.downcast_ref::<webpki::Error>(), Some(webpki::Error::CaUsedAsEndEntity)) =>
                {
                    TlsProblem::CaUsedAsEndEntity
                }
                C::UnknownIssuer => TlsProblem::UnknownIssuer,
                C::NotValidForName | C::NotValidForNameContext { .. } => TlsProblem::WrongName,
                C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. } => {
                    TlsProblem::Expired
                }
                other => TlsProblem::BadCertificate(format!("{other:?}")),
            },
            E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => {
                TlsProblem::NotTls
            }
            other => TlsProblem::Handshake(other.to_string()),
        }
    }
}

/// The TLS problem somewhere in `e`'s chain, if any. `io::Error` hides the error it wraps from
/// `source()` (it returns the wrapped error's source), so each one is opened with `get_ref`.
pub(crate) fn problem(e: &(dyn std::error::Error + 'static)) -> Option<TlsProblem> {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(r) = err.downcast_ref::<rustls::Error>() {
            return Some(TlsProblem::from_rustls(r));
        }
        if let Some(p) =
            err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).and_then(|inner| problem(inner))
        {
            return Some(p);
        }
        next = err.source();
    }
    None
}

/// object_store's reqwest client, with refused handshakes marked as not retryable: the retry
/// loop would otherwise try a certificate it will never accept for `retry_time`.
#[derive(Debug, Default)]
pub(crate) struct Connector;

impl HttpConnector for Connector {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = object_store::client::ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(FinalTls(inner)))
    }
}

#[derive(Debug)]
struct FinalTls(HttpClient);

#[async_trait::async_trait]
impl HttpService for FinalTls {
    async fn call(&self, req: HttpRequest) -> std::result::Result<HttpResponse, HttpError> {
        self.0.execute(req).await.map_err(|e| match problem(&e) {
            Some(_) => HttpError::new(HttpErrorKind::Unknown, e),
            None => e,
        })
    }
}
