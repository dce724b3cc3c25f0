//! `global/pg_control`: the cluster's identity as PostgreSQL itself records it.

use crate::SystemId;
use crate::lsn::{Lsn, TimelineId, WalSegSize};
use crate::version::control_layout as L;

/// The fields walnut reads from `pg_control`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlFile {
    pub system_identifier: SystemId,
    pub pg_control_version: u32,
    pub catalog_version: u32,
    pub state: u32,
    pub checkpoint: Lsn,
    pub checkpoint_redo: Lsn,
    pub checkpoint_tli: TimelineId,
    pub wal_seg_size: WalSegSize,
    /// Non-zero when the cluster's data pages carry checksums (`initdb --data-checksums`).
    pub data_checksum_version: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ControlError {
    #[error("pg_control is {0} bytes, too short")]
    TooShort(usize),
    #[error("pg_control has pg_control_version {0}, which walnut does not support (PostgreSQL 15 uses 1300)")]
    Version(u32),
    #[error("pg_control fails its CRC check: the file is corrupt or was read while being written")]
    Crc,
    #[error("pg_control declares an invalid WAL segment size {0}")]
    SegSize(u32),
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

impl ControlFile {
    pub fn parse(b: &[u8]) -> Result<ControlFile, ControlError> {
        if b.len() < L::CRC + 4 {
            return Err(ControlError::TooShort(b.len()));
        }
        let version = u32_at(b, L::PG_CONTROL_VERSION);
        if crate::PgMajor::from_control_version(version).is_empty() {
            return Err(ControlError::Version(version));
        }
        if crc32c::crc32c(&b[..L::CRC]) != u32_at(b, L::CRC) {
            return Err(ControlError::Crc);
        }
        let seg = u32_at(b, L::XLOG_SEG_SIZE);
        Ok(ControlFile {
            system_identifier: SystemId(u64_at(b, L::SYSTEM_IDENTIFIER)),
            pg_control_version: version,
            catalog_version: u32_at(b, L::CATALOG_VERSION),
            state: u32_at(b, L::STATE),
            checkpoint: Lsn(u64_at(b, L::CHECKPOINT)),
            checkpoint_redo: Lsn(u64_at(b, L::CHECKPOINT_REDO)),
            checkpoint_tli: TimelineId(u32_at(b, L::CHECKPOINT_TLI)),
            wal_seg_size: WalSegSize::new(u64::from(seg)).map_err(|_| ControlError::SegSize(seg))?,
            data_checksum_version: u32_at(b, L::DATA_CHECKSUM_VERSION),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_checks_crc() {
        let mut b = vec![0u8; 8192];
        b[0..8].copy_from_slice(&7u64.to_le_bytes());
        b[8..12].copy_from_slice(&1300u32.to_le_bytes());
        b[L::XLOG_SEG_SIZE..L::XLOG_SEG_SIZE + 4].copy_from_slice(&(16u32 << 20).to_le_bytes());
        let crc = crc32c::crc32c(&b[..L::CRC]);
        b[L::CRC..L::CRC + 4].copy_from_slice(&crc.to_le_bytes());
        let c = ControlFile::parse(&b).unwrap();
        assert_eq!(c.system_identifier, SystemId(7));
        assert_eq!(c.wal_seg_size, WalSegSize::DEFAULT);
        assert_eq!(c.data_checksum_version, 0);
        b[0] ^= 1;
        assert_eq!(ControlFile::parse(&b), Err(ControlError::Crc));
    }
}
