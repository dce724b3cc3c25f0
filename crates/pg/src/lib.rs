//! PostgreSQL vocabulary for walnut, pure and I/O free.
//!
//! Everything here parses or formats bytes and strings it is given: LSNs, timeline IDs, WAL file
//! names, WAL page headers and records ([`walrec`], block references included), relation file
//! names ([`relpath`]) and `pg_control`. Quantities are newtypes whose `Display`/`FromStr` use
//! PostgreSQL's own text (`16/B374D848`, `000000010000000000000003`), so raw integers and strings do
//! not cross module boundaries.
//!
//! Version-specific knowledge (page magic, `pg_control` offsets) lives in [`version`] and nowhere
//! else, so PostgreSQL 16 and 17 are added there.

pub mod control;
pub mod history;
pub mod lsn;
pub mod names;
pub mod page;
pub mod relpath;
pub mod version;
pub mod walpage;
pub mod walrec;
pub mod walsynth;

pub use control::ControlFile;
pub use lsn::{Lsn, SegNo, TimelineId, WalSegSize};
pub use names::WalFileName;
pub use version::PgMajor;
pub use walpage::{LongPageHeader, PageHeader, SegmentCheck};

/// A cluster's system identifier (`pg_control`, and every WAL segment's long page header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct SystemId(pub u64);

impl std::fmt::Display for SystemId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}
