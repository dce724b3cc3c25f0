//! WAL page headers, and the check every segment passes before walnut archives it.
//!
//! A segment is accepted only when its size is the segment size its own long page header declares,
//! the header's magic names a supported PostgreSQL version, its address matches the file name, and
//! its timeline is the file name's or an earlier one. This rejects truncated files, files renamed
//! by hand and foreign files.
//!
//! Why an earlier timeline is valid: when a timeline ends in the middle of a segment (a promotion,
//! a point-in-time recovery that stops mid-segment), PostgreSQL starts the new timeline's first
//! segment as a copy of the old one up to the switch point, so its first pages keep the old
//! timeline in their headers. PostgreSQL itself accepts a page timeline at or below the segment's
//! (and checks it against the timeline history when it reads the segment back).

use crate::SystemId;
use crate::lsn::{Lsn, SegNo, TimelineId, WalSegSize};
use crate::names::SegName;
use crate::version::PgMajor;

pub const XLOG_BLCKSZ: usize = 8192;
pub const SIZE_OF_SHORT_PHD: usize = 24;
pub const SIZE_OF_LONG_PHD: usize = 40;
pub const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
pub const XLP_LONG_HEADER: u16 = 0x0002;
/// The page does not continue the record the previous page began: that record was abandoned
/// (a crash cut it off) and WAL was written over its missing part.
pub const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;
pub const XLP_ALL_FLAGS: u16 = 0x000F;

/// The header every WAL page starts with (`XLogPageHeaderData`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageHeader {
    pub magic: u16,
    pub info: u16,
    pub tli: TimelineId,
    pub pageaddr: Lsn,
    pub rem_len: u32,
}

/// The long header on the first page of a segment (`XLogLongPageHeaderData`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongPageHeader {
    pub std: PageHeader,
    pub sysid: SystemId,
    pub seg_size: u32,
    pub xlog_blcksz: u32,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

impl PageHeader {
    /// Parses the short header; `None` if `page` is too short.
    pub fn parse(page: &[u8]) -> Option<PageHeader> {
        if page.len() < SIZE_OF_SHORT_PHD {
            return None;
        }
        Some(PageHeader {
            magic: u16_at(page, 0),
            info: u16_at(page, 2),
            tli: TimelineId(u32_at(page, 4)),
            pageaddr: Lsn(u64_at(page, 8)),
            rem_len: u32_at(page, 16),
        })
    }
}

impl LongPageHeader {
    pub fn parse(page: &[u8]) -> Option<LongPageHeader> {
        let std = PageHeader::parse(page)?;
        if page.len() < SIZE_OF_LONG_PHD || std.info & XLP_LONG_HEADER == 0 {
            return None;
        }
        Some(LongPageHeader {
            std,
            sysid: SystemId(u64_at(page, 24)),
            seg_size: u32_at(page, 32),
            xlog_blcksz: u32_at(page, 36),
        })
    }
}

/// What a valid segment told us about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentCheck {
    pub sysid: SystemId,
    pub major: PgMajor,
    pub seg_size: WalSegSize,
    pub segno: SegNo,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SegmentError {
    #[error("{name}: {len} bytes is too short to hold a WAL page header (truncated or not a WAL segment)")]
    TooShort { name: String, len: usize },
    #[error(
        "{name}: the first page has no valid long WAL page header (magic {magic:#06X}, info {info:#06X}): not a WAL segment, or corrupt"
    )]
    NoLongHeader { name: String, magic: u16, info: u16 },
    #[error("{name}: WAL page magic {magic:#06X} is not from a PostgreSQL version walnut supports (15)")]
    UnknownMagic { name: String, magic: u16 },
    #[error("{name}: the page header declares an invalid segment size {declared} or block size {blcksz}")]
    BadSizes { name: String, declared: u32, blcksz: u32 },
    #[error(
        "{name}: the file is {len} bytes but WAL segments of this cluster are {expected} bytes: truncated or padded"
    )]
    WrongLength { name: String, len: usize, expected: u64 },
    #[error(
        "{name}: the page header says timeline {header}, after the file name's timeline {named} (a segment's pages \
         can only carry its own timeline or an earlier one): not this segment, or corrupt"
    )]
    TimelineMismatch { name: String, header: u32, named: u32 },
    #[error("{name}: the page header says the segment starts at {header}, the file name says {named}")]
    AddressMismatch { name: String, header: Lsn, named: Lsn },
}

/// Validates a whole WAL segment against its name (see the module docs).
pub fn check_segment(name: SegName, data: &[u8]) -> Result<SegmentCheck, SegmentError> {
    let n = || name.to_string();
    if data.len() < SIZE_OF_LONG_PHD {
        return Err(SegmentError::TooShort { name: n(), len: data.len() });
    }
    let std = PageHeader::parse(data).expect("length checked");
    let major =
        PgMajor::from_page_magic(std.magic).ok_or(SegmentError::UnknownMagic { name: n(), magic: std.magic })?;
    let long = LongPageHeader::parse(data)
        .filter(|h| h.std.info & !XLP_ALL_FLAGS == 0)
        .ok_or(SegmentError::NoLongHeader { name: n(), magic: std.magic, info: std.info })?;
    let seg_size = WalSegSize::new(u64::from(long.seg_size))
        .ok()
        .filter(|_| long.xlog_blcksz as usize == XLOG_BLCKSZ)
        .ok_or(SegmentError::BadSizes { name: n(), declared: long.seg_size, blcksz: long.xlog_blcksz })?;
    if data.len() as u64 != seg_size.bytes() {
        return Err(SegmentError::WrongLength { name: n(), len: data.len(), expected: seg_size.bytes() });
    }
    // The copied head of a new timeline's first segment carries the old timeline (module docs).
    if std.tli.0 == 0 || std.tli > name.tli {
        return Err(SegmentError::TimelineMismatch { name: n(), header: std.tli.0, named: name.tli.0 });
    }
    let segno = name.segno(seg_size);
    let named = segno.map(|s| seg_size.start_lsn(s)).unwrap_or(Lsn(u64::MAX));
    if segno.is_none() || std.pageaddr != named {
        return Err(SegmentError::AddressMismatch { name: n(), header: std.pageaddr, named });
    }
    Ok(SegmentCheck { sysid: long.sysid, major, seg_size, segno: segno.expect("checked") })
}

/// Reads only the identity fields of a segment's first page (for files too short to check whole,
/// such as `.partial` segments, which PostgreSQL may truncate).
pub fn peek_identity(data: &[u8]) -> Option<(SystemId, PgMajor, WalSegSize)> {
    let long = LongPageHeader::parse(data)?;
    Some((long.sysid, PgMajor::from_page_magic(long.std.magic)?, WalSegSize::new(u64::from(long.seg_size)).ok()?))
}

/// Builds a syntactically valid first page for tests and tools: a long header and nothing else.
pub fn synthetic_segment(name: SegName, sysid: SystemId, seg_size: WalSegSize) -> Vec<u8> {
    let mut data = vec![0u8; seg_size.bytes() as usize];
    let segno = name.segno(seg_size).expect("name valid for size");
    data[0..2].copy_from_slice(&PgMajor(15).page_magic().expect("15 supported").to_le_bytes());
    data[2..4].copy_from_slice(&XLP_LONG_HEADER.to_le_bytes());
    data[4..8].copy_from_slice(&name.tli.0.to_le_bytes());
    data[8..16].copy_from_slice(&seg_size.start_lsn(segno).0.to_le_bytes());
    data[24..32].copy_from_slice(&sysid.0.to_le_bytes());
    data[32..36].copy_from_slice(&(seg_size.bytes() as u32).to_le_bytes());
    data[36..40].copy_from_slice(&(XLOG_BLCKSZ as u32).to_le_bytes());
    data
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::WalFileName;

    fn seg(n: &str) -> SegName {
        WalFileName::parse(n).unwrap().segment().unwrap()
    }

    #[test]
    fn accepts_a_valid_segment() {
        let name = seg("000000020000000100000003");
        let data = synthetic_segment(name, SystemId(42), WalSegSize::DEFAULT);
        let c = check_segment(name, &data).unwrap();
        assert_eq!(c.sysid, SystemId(42));
        assert_eq!(c.major, PgMajor(15));
        assert_eq!(c.segno, SegNo(259));
    }

    /// A new timeline's first segment, copied from the old timeline up to a mid-segment switch point,
    /// starts with pages of the old timeline: that is valid WAL.
    #[test]
    fn accepts_an_earlier_timeline_in_a_new_timelines_first_segment() {
        let old = seg("000000010000000100000003");
        let data = synthetic_segment(old, SystemId(42), WalSegSize::DEFAULT);
        let c = check_segment(seg("000000020000000100000003"), &data).unwrap();
        assert_eq!(c.segno, SegNo(259));
        assert!(check_segment(seg("000000070000000100000003"), &data).is_ok());
    }

    #[test]
    fn refuses_truncated_renamed_and_foreign_files() {
        let name = seg("000000020000000100000003");
        let data = synthetic_segment(name, SystemId(42), WalSegSize::DEFAULT);
        assert!(matches!(check_segment(name, &data[..8192]), Err(SegmentError::WrongLength { .. })));
        assert!(matches!(check_segment(name, &data[..10]), Err(SegmentError::TooShort { .. })));
        assert!(matches!(
            check_segment(seg("000000020000000100000004"), &data),
            Err(SegmentError::AddressMismatch { .. })
        ));
        assert!(matches!(
            check_segment(seg("000000010000000100000003"), &data),
            Err(SegmentError::TimelineMismatch { header: 2, named: 1, .. })
        ));
        let mut tli0 = data.clone();
        tli0[4..8].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(check_segment(name, &tli0), Err(SegmentError::TimelineMismatch { header: 0, .. })));
        let mut foreign = data.clone();
        foreign[0] = 0x13;
        assert!(matches!(check_segment(name, &foreign), Err(SegmentError::UnknownMagic { .. })));
        let mut short_hdr = data.clone();
        short_hdr[2] = 0;
        assert!(matches!(check_segment(name, &short_hdr), Err(SegmentError::NoLongHeader { .. })));
        assert!(check_segment(name, &vec![0u8; 16 << 20]).is_err());
    }
}
