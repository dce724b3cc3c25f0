//! walnut's domain: the repository and everything stored in it.
//!
//! - [`envelope`]: the format of every stored object (codec chain, metadata, checksum trailer).
//! - [`layout`]: the ONLY place object keys are built.
//! - [`repo`]: a repository = a store + its identity (one cluster per repository, checked on
//!   every write).
//! - [`wal`]: `wal-push` (validate, upload-ahead) and `wal-fetch` (verify, prefetch spool).
//! - [`blockmap`]: changed-block maps of WAL ranges, for block-incremental backups.
//! - [`state`]: walnut's own working state on the local disk (never inside PGDATA).

pub mod archive;
pub mod backup;
pub mod blockmap;
pub mod crypt;
pub mod durable;
pub mod envelope;
pub mod layout;
pub mod lock;
pub mod logical;
pub mod plan;
pub mod prune;
pub mod rekey;
pub mod replay;
pub mod repo;
pub mod restore;
pub mod retention;
pub mod schedule;
pub mod state;
pub mod summary;
pub mod timefmt;
pub mod verify;
pub mod wal;
pub mod walindex;
pub mod walworker;

pub use envelope::{Codec, Compression};
pub use repo::{Identity, Repository};
