//! Test fixtures with real parts: a PostgreSQL 15 cluster, a local S3-compatible server, and a
//! fault-injecting proxy to put in front of it.
//!
//! Missing infrastructure is a loud failure with a fix-it message, never a skipped test.

pub mod azurite;
pub mod faults;
pub mod pg;
pub mod s3;
mod s3list;
pub mod tls;

pub use azurite::Azurite;
pub use faults::{Fault, FaultProxy, FaultStats};
pub use pg::{PgCluster, free_port};
pub use s3::S3Server;
pub use tls::{TlsCert, TlsFront};

/// Creates a temporary directory that the PostgreSQL OS user can use when tests run as root.
pub fn shared_tempdir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix(prefix).tempdir_in(std::env::temp_dir()).expect("create temp dir");
    pg::give_to_postgres_user(dir.path());
    dir
}
