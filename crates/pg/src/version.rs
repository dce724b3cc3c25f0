//! The one place that knows which PostgreSQL major version writes which on-disk format.

use serde::{Deserialize, Serialize};

/// A PostgreSQL major version walnut understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PgMajor(pub u32);

/// `XLOG_PAGE_MAGIC` of each supported major version.
const PAGE_MAGICS: &[(u16, u32)] = &[(0xD110, 15)];
/// `PG_CONTROL_VERSION` of each supported major version (15 shares 1300 with 13 and 14, so the
/// control file alone does not name the major version; the WAL page magic does).
const CONTROL_VERSIONS: &[(u32, &[u32])] = &[(1300, &[13, 14, 15])];

impl PgMajor {
    /// The major version whose WAL pages carry `magic`, if walnut supports it.
    pub fn from_page_magic(magic: u16) -> Option<PgMajor> {
        PAGE_MAGICS.iter().find(|(m, _)| *m == magic).map(|(_, v)| PgMajor(*v))
    }

    pub fn page_magic(self) -> Option<u16> {
        PAGE_MAGICS.iter().find(|(_, v)| *v == self.0).map(|(m, _)| *m)
    }

    /// The major versions whose `pg_control` has this `pg_control_version`.
    pub fn from_control_version(version: u32) -> &'static [u32] {
        CONTROL_VERSIONS.iter().find(|(c, _)| *c == version).map(|(_, v)| *v).unwrap_or(&[])
    }

    /// Parses `server_version_num` (150004) or `PG_VERSION` file contents ("15").
    pub fn from_version_text(text: &str) -> Option<PgMajor> {
        let t = text.trim();
        let n: u32 = t.split('.').next()?.parse().ok()?;
        Some(PgMajor(if n >= 100_000 { n / 10_000 } else { n }))
    }
}

impl std::fmt::Display for PgMajor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Byte offsets in `ControlFileData`, identical for PostgreSQL 13 to 15 (checked against PG 15's
/// `catalog/pg_control.h` with `offsetof`).
pub(crate) mod control_layout {
    pub const SYSTEM_IDENTIFIER: usize = 0;
    pub const PG_CONTROL_VERSION: usize = 8;
    pub const CATALOG_VERSION: usize = 12;
    pub const STATE: usize = 16;
    pub const CHECKPOINT: usize = 32;
    pub const CHECKPOINT_REDO: usize = 40;
    pub const CHECKPOINT_TLI: usize = 48;
    pub const XLOG_SEG_SIZE: usize = 228;
    pub const DATA_CHECKSUM_VERSION: usize = 252;
    pub const CRC: usize = 288;
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn versions() {
        assert_eq!(PgMajor::from_page_magic(0xD110), Some(PgMajor(15)));
        assert_eq!(PgMajor::from_page_magic(0xD113), None);
        assert_eq!(PgMajor::from_version_text("150004"), Some(PgMajor(15)));
        assert_eq!(PgMajor::from_version_text("15\n"), Some(PgMajor(15)));
        assert_eq!(PgMajor::from_version_text("9.6"), Some(PgMajor(9)));
    }
}
