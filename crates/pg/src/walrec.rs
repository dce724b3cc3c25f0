//! A WAL record decoder for PostgreSQL 15 (gated by the page magic, so 16 and 17 fit beside it).
//!
//! It walks the pages of a segment, reassembles records that continue across pages (and, given
//! the next segment, across segments), checks every record's CRC-32C, and finds the end of valid
//! WAL: an `XLOG_SWITCH` record (the rest is padding), zeros, or a record that does not validate.
//! From the records it extracts what walnut plans restores with: commit and abort timestamps and
//! transaction IDs (prepared transactions included), named restore points, checkpoints, timeline
//! switches (end-of-recovery records) and WAL switches. It never panics on arbitrary bytes.

use crate::lsn::Lsn;
use crate::walpage::{
    PageHeader, SIZE_OF_LONG_PHD, SIZE_OF_SHORT_PHD, XLOG_BLCKSZ, XLP_FIRST_IS_CONTRECORD, XLP_LONG_HEADER,
};

const SIZE_OF_XLOG_RECORD: usize = 24;
const RM_XLOG_ID: u8 = 0;
const RM_XACT_ID: u8 = 1;
const XLOG_CHECKPOINT_SHUTDOWN: u8 = 0x00;
const XLOG_CHECKPOINT_ONLINE: u8 = 0x10;
const XLOG_SWITCH: u8 = 0x40;
const XLOG_RESTORE_POINT: u8 = 0x70;
const XLOG_END_OF_RECOVERY: u8 = 0x90;
const XLOG_XACT_OPMASK: u8 = 0x70;
const XLOG_XACT_COMMIT: u8 = 0x00;
const XLOG_XACT_PREPARE: u8 = 0x10;
const XLOG_XACT_ABORT: u8 = 0x20;
const XLOG_XACT_COMMIT_PREPARED: u8 = 0x30;
const XLOG_XACT_ABORT_PREPARED: u8 = 0x40;
const XLOG_XACT_HAS_INFO: u8 = 0x80;
const XACT_XINFO_HAS_DBINFO: u32 = 1;
const XACT_XINFO_HAS_SUBXACTS: u32 = 1 << 1;
const XACT_XINFO_HAS_RELFILENODES: u32 = 1 << 2;
const XACT_XINFO_HAS_INVALS: u32 = 1 << 3;
const XACT_XINFO_HAS_TWOPHASE: u32 = 1 << 4;
const XACT_XINFO_HAS_DROPPED_STATS: u32 = 1 << 8;

/// Resource manager names as `pg_waldump` prints them (PostgreSQL 15).
pub const RMGR_NAMES: [&str; 22] = [
    "XLOG",
    "Transaction",
    "Storage",
    "CLOG",
    "Database",
    "Tablespace",
    "MultiXact",
    "RelMap",
    "Standby",
    "Heap2",
    "Heap",
    "Btree",
    "Hash",
    "Gin",
    "Gist",
    "Sequence",
    "SPGist",
    "BRIN",
    "CommitTs",
    "ReplicationOrigin",
    "Generic",
    "LogicalMessage",
];

/// Microseconds since 2000-01-01 00:00:00 UTC (PostgreSQL's `TimestampTz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    /// Microseconds since the Unix epoch.
    pub fn unix_micros(self) -> i64 {
        self.0 + 946_684_800_000_000
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XactKind {
    Commit,
    Abort,
    Prepare,
    CommitPrepared,
    AbortPrepared,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Xact { kind: XactKind, xid: u32, time: PgTimestamp, lsn: Lsn },
    RestorePoint { name: String, time: PgTimestamp, lsn: Lsn },
    Checkpoint { shutdown: bool, lsn: Lsn },
    EndOfRecovery { time: PgTimestamp, tli: u32, prev_tli: u32, lsn: Lsn },
    Switch { lsn: Lsn },
}

/// Why decoding stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// An `XLOG_SWITCH` record: the rest of the segment is padding.
    Switch,
    /// The last record continues into the next segment (normal for a full segment).
    ContinuesIntoNext,
    /// The segment ended exactly at a record boundary.
    SegmentEnd,
    /// Zeros where a record should start (a partial segment, or a segment's unused tail).
    Zeros,
    /// A record or page that does not validate.
    Invalid,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// Records that begin in this segment and were fully validated.
    pub records: u64,
    pub per_rmgr: [u64; 256],
    pub events: Vec<Event>,
    /// The end of valid WAL: just after the last valid record.
    pub end_of_valid: Lsn,
    /// Where the last record that begins in this segment and validated whole begins (a recovery
    /// target LSN there, inclusive, is reached by replaying exactly what this segment completes).
    pub last_record: Option<Lsn>,
    pub end: End,
    /// What was wrong, when `end` is `Invalid`.
    pub invalid_reason: Option<String>,
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

/// The WAL byte stream of one segment (plus, optionally, the next), skipping page headers.
struct Stream<'a> {
    seg: &'a [u8],
    next: Option<&'a [u8]>,
    seg_start: u64,
    seg_size: u64,
}

enum Read {
    Bytes(Vec<u8>),
    /// Ran past the data available.
    Eof,
    Invalid(String),
}

impl Stream<'_> {
    /// `n` bytes at `lsn`, within one page (so within one segment).
    fn slice(&self, lsn: u64, n: usize) -> Option<&[u8]> {
        let off = lsn.checked_sub(self.seg_start)?;
        let (buf, o) = if off < self.seg_size { (self.seg, off) } else { (self.next?, off - self.seg_size) };
        buf.get(o as usize..o as usize + n)
    }

    fn page_header_len(&self, page_lsn: u64) -> usize {
        if page_lsn.is_multiple_of(self.seg_size) { SIZE_OF_LONG_PHD } else { SIZE_OF_SHORT_PHD }
    }

    fn page(&self, page_lsn: u64) -> Option<&[u8]> {
        let off = page_lsn.checked_sub(self.seg_start)?;
        let (buf, o) = if off < self.seg_size { (self.seg, off) } else { (self.next?, off - self.seg_size) };
        buf.get(o as usize..o as usize + XLOG_BLCKSZ)
    }

    /// Checks the header of the page at `page_lsn` and, for continuation pages, the flag.
    fn check_page(&self, page_lsn: u64, expect_cont: Option<u32>) -> Result<(), String> {
        let Some(page) = self.page(page_lsn) else { return Err("page missing".into()) };
        let h = PageHeader::parse(page).ok_or("short page")?;
        if crate::PgMajor::from_page_magic(h.magic).is_none() {
            return Err(format!("page at {} has bad magic {:#06X}", Lsn(page_lsn), h.magic));
        }
        if h.pageaddr.0 != page_lsn {
            return Err(format!("page at {} claims address {}", Lsn(page_lsn), h.pageaddr));
        }
        let long = h.info & XLP_LONG_HEADER != 0;
        if long != page_lsn.is_multiple_of(self.seg_size) {
            return Err(format!("page at {} has a wrong header kind", Lsn(page_lsn)));
        }
        if let Some(rem) = expect_cont
            && (h.info & XLP_FIRST_IS_CONTRECORD == 0 || h.rem_len != rem)
        {
            return Err(format!("page at {} does not continue the record ({} bytes expected)", Lsn(page_lsn), rem));
        }
        Ok(())
    }

    /// Reads `len` bytes of a record starting at `lsn`, crossing page headers. `total` is the
    /// record's total length and `done` how much of it came before `lsn` (for xlp_rem_len).
    fn read(&self, mut lsn: u64, len: usize, total: u32, mut done: u32) -> (Read, u64) {
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let in_page = (lsn % XLOG_BLCKSZ as u64) as usize;
            if in_page == 0 {
                if self.page(lsn).is_none() {
                    return (Read::Eof, lsn);
                }
                if let Err(e) = self.check_page(lsn, Some(total - done)) {
                    return (Read::Invalid(e), lsn);
                }
                lsn += self.page_header_len(lsn) as u64;
                continue;
            }
            // Copy the rest of this page (or what is still wanted) in one go.
            let want = (len - out.len()).min(XLOG_BLCKSZ - in_page);
            let Some(chunk) = self.slice(lsn, want) else { return (Read::Eof, lsn) };
            out.extend_from_slice(chunk);
            lsn += want as u64;
            done += want as u32;
        }
        (Read::Bytes(out), lsn)
    }
}

fn maxalign(x: u64) -> u64 {
    (x + 7) & !7
}

/// Where the main data of a record starts and how long it is (walking the block headers).
fn main_data(rec: &[u8]) -> Option<&[u8]> {
    let mut pos = SIZE_OF_XLOG_RECORD;
    let mut block_data = 0usize;
    let mut main_len = 0usize;
    while pos < rec.len() {
        let id = rec[pos];
        pos += 1;
        match id {
            255 => {
                main_len = *rec.get(pos)? as usize;
                pos += 1;
                break;
            }
            254 => {
                main_len = u32_at(rec, pos)? as usize;
                pos += 4;
                break;
            }
            253 => pos += 2,
            252 => pos += 4,
            0..=32 => {
                let fork_flags = *rec.get(pos)?;
                let data_len = u16_at(rec, pos + 1)? as usize;
                pos += 3;
                block_data += data_len;
                if fork_flags & 0x10 != 0 {
                    let img_len = u16_at(rec, pos)? as usize;
                    let bimg_info = *rec.get(pos + 4)?;
                    pos += 5;
                    block_data += img_len;
                    let compressed = bimg_info & (0x04 | 0x08 | 0x10) != 0;
                    if bimg_info & 0x01 != 0 && compressed {
                        pos += 2;
                    }
                }
                if fork_flags & 0x80 == 0 {
                    pos += 12;
                }
                pos += 4;
            }
            _ => return None,
        }
    }
    let start = pos.checked_add(block_data)?;
    rec.get(start..start.checked_add(main_len)?)
}

/// The twophase xid of a commit/abort-prepared record's main data (after `xact_time`).
fn twophase_xid(info: u8, main: &[u8], commit: bool) -> Option<u32> {
    if info & XLOG_XACT_HAS_INFO == 0 {
        return None;
    }
    let xinfo = u32_at(main, 8)?;
    let mut pos = 12;
    if xinfo & XACT_XINFO_HAS_DBINFO != 0 {
        pos += 8;
    }
    if xinfo & XACT_XINFO_HAS_SUBXACTS != 0 {
        pos += 4 + 4 * u32_at(main, pos)? as usize;
    }
    if xinfo & XACT_XINFO_HAS_RELFILENODES != 0 {
        pos += 4 + 12 * u32_at(main, pos)? as usize;
    }
    if xinfo & XACT_XINFO_HAS_DROPPED_STATS != 0 {
        pos += 4 + 16 * u32_at(main, pos)? as usize;
    }
    if commit && xinfo & XACT_XINFO_HAS_INVALS != 0 {
        pos += 4 + 16 * u32_at(main, pos)? as usize;
    }
    (xinfo & XACT_XINFO_HAS_TWOPHASE != 0).then(|| u32_at(main, pos)).flatten()
}

fn event(rmid: u8, info: u8, xid: u32, rec: &[u8], lsn: Lsn) -> Option<Event> {
    match rmid {
        RM_XLOG_ID => match info & 0xF0 {
            XLOG_CHECKPOINT_SHUTDOWN => Some(Event::Checkpoint { shutdown: true, lsn }),
            XLOG_CHECKPOINT_ONLINE => Some(Event::Checkpoint { shutdown: false, lsn }),
            XLOG_SWITCH => Some(Event::Switch { lsn }),
            XLOG_RESTORE_POINT => {
                let m = main_data(rec)?;
                let time = PgTimestamp(u64_at(m, 0)? as i64);
                let raw = m.get(8..8 + 64)?;
                let name = String::from_utf8_lossy(&raw[..raw.iter().position(|&b| b == 0).unwrap_or(64)]).into_owned();
                Some(Event::RestorePoint { name, time, lsn })
            }
            XLOG_END_OF_RECOVERY => {
                let m = main_data(rec)?;
                Some(Event::EndOfRecovery {
                    time: PgTimestamp(u64_at(m, 0)? as i64),
                    tli: u32_at(m, 8)?,
                    prev_tli: u32_at(m, 12)?,
                    lsn,
                })
            }
            _ => None,
        },
        RM_XACT_ID => {
            let m = main_data(rec)?;
            let time = PgTimestamp(u64_at(m, 0)? as i64);
            let kind = match info & XLOG_XACT_OPMASK {
                XLOG_XACT_COMMIT => XactKind::Commit,
                XLOG_XACT_ABORT => XactKind::Abort,
                XLOG_XACT_PREPARE => XactKind::Prepare,
                XLOG_XACT_COMMIT_PREPARED => XactKind::CommitPrepared,
                XLOG_XACT_ABORT_PREPARED => XactKind::AbortPrepared,
                _ => return None,
            };
            let xid = match kind {
                XactKind::CommitPrepared => twophase_xid(info, m, true).unwrap_or(xid),
                XactKind::AbortPrepared => twophase_xid(info, m, false).unwrap_or(xid),
                // xl_xact_prepare has no timestamp first; its xid is the record's.
                XactKind::Prepare => {
                    return Some(Event::Xact { kind, xid, time: PgTimestamp(u64_at(m, 12).unwrap_or(0) as i64), lsn });
                }
                _ => xid,
            };
            Some(Event::Xact { kind, xid, time, lsn })
        }
        _ => None,
    }
}

/// Decodes the segment starting at `seg_start` (`seg.len()` is the segment size). With `next`,
/// a record continuing into the next segment is completed and counted.
pub fn decode_segment(seg: &[u8], seg_start: Lsn, next: Option<&[u8]>) -> Decoded {
    let seg_size = seg.len() as u64;
    let mut d = Decoded {
        records: 0,
        per_rmgr: [0; 256],
        events: Vec::new(),
        end_of_valid: seg_start,
        last_record: None,
        end: End::Invalid,
        invalid_reason: None,
    };
    let s = Stream { seg, next, seg_start: seg_start.0, seg_size: seg_size.max(1) };
    if seg.len() < XLOG_BLCKSZ || !seg_size.is_power_of_two() || !seg_start.0.is_multiple_of(seg_size) {
        d.invalid_reason = Some("not a whole segment".into());
        return d;
    }
    if let Err(e) = s.check_page(seg_start.0, None) {
        d.invalid_reason = Some(e);
        return d;
    }
    let first = PageHeader::parse(seg).expect("checked");
    let mut lsn = seg_start.0 + SIZE_OF_LONG_PHD as u64;
    if first.info & XLP_FIRST_IS_CONTRECORD != 0 {
        // The tail of a record that began in the previous segment: skip it.
        let rem = first.rem_len;
        let mut left = rem as u64;
        while left > 0 {
            let in_page_left = XLOG_BLCKSZ as u64 - lsn % XLOG_BLCKSZ as u64;
            let take = left.min(in_page_left);
            lsn += take;
            left -= take;
            if left > 0 {
                if lsn >= seg_start.0 + seg_size {
                    d.end = End::ContinuesIntoNext;
                    d.end_of_valid = Lsn(lsn);
                    return d;
                }
                lsn += SIZE_OF_SHORT_PHD as u64;
            }
        }
        lsn = maxalign(lsn);
    }
    let seg_end = seg_start.0 + seg_size;
    loop {
        if lsn >= seg_end {
            d.end = End::SegmentEnd;
            return d;
        }
        if lsn.is_multiple_of(XLOG_BLCKSZ as u64) {
            if let Err(e) = s.check_page(lsn, None) {
                d.end = End::Invalid;
                d.invalid_reason = Some(e);
                return d;
            }
            let h = PageHeader::parse(s.page(lsn).expect("checked")).expect("page");
            lsn += s.page_header_len(lsn) as u64;
            if h.info & XLP_FIRST_IS_CONTRECORD != 0 {
                d.end = End::Invalid;
                d.invalid_reason = Some(format!("unexpected continuation at {}", Lsn(lsn)));
                return d;
            }
        }
        let start = lsn;
        let tot_len = match s.read(start, 4, 0, 0) {
            (Read::Bytes(b), _) => u32::from_le_bytes(b.try_into().expect("4")),
            (Read::Eof, _) => {
                d.end = End::ContinuesIntoNext;
                return d;
            }
            (Read::Invalid(e), _) => {
                d.end = End::Invalid;
                d.invalid_reason = Some(e);
                return d;
            }
        };
        if tot_len == 0 {
            d.end = End::Zeros;
            return d;
        }
        if (tot_len as usize) < SIZE_OF_XLOG_RECORD || tot_len > 1 << 30 {
            d.end = End::Invalid;
            d.invalid_reason = Some(format!("record at {} has an invalid length {tot_len}", Lsn(start)));
            return d;
        }
        let (rec, after) = match s.read(start, tot_len as usize, tot_len, 0) {
            (Read::Bytes(b), after) => (b, after),
            (Read::Eof, _) => {
                d.end = End::ContinuesIntoNext;
                return d;
            }
            (Read::Invalid(e), _) => {
                d.end = End::Invalid;
                d.invalid_reason = Some(e);
                return d;
            }
        };
        let crc = u32_at(&rec, 20).expect("header");
        let computed = crc32c::crc32c_append(crc32c::crc32c(&rec[SIZE_OF_XLOG_RECORD..]), &rec[..20]);
        if crc != computed {
            d.end = End::Invalid;
            d.invalid_reason = Some(format!("record at {} fails its CRC check", Lsn(start)));
            return d;
        }
        let (xid, info, rmid) = (u32_at(&rec, 4).expect("header"), rec[16], rec[17]);
        d.records += 1;
        d.per_rmgr[rmid as usize] += 1;
        d.end_of_valid = Lsn(after);
        d.last_record = Some(Lsn(start));
        if let Some(e) = event(rmid, info, xid, &rec, Lsn(start)) {
            let switch = matches!(e, Event::Switch { .. });
            d.events.push(e);
            if switch {
                d.end = End::Switch;
                return d;
            }
        }
        if after >= seg_end {
            d.end = if after == seg_end { End::SegmentEnd } else { End::ContinuesIntoNext };
            return d;
        }
        lsn = maxalign(after);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..20000), start in 0u64..4) {
            let _ = decode_segment(&bytes, Lsn(start << 24), None);
        }

        #[test]
        fn never_panics_on_a_valid_header_followed_by_noise(noise in proptest::collection::vec(any::<u8>(), 0..30000)) {
            let name = crate::names::SegName { tli: crate::TimelineId(1), log: 0, seg: 1 };
            let mut seg = crate::walpage::synthetic_segment(name, crate::SystemId(1), crate::WalSegSize::new(1 << 20).unwrap());
            let n = noise.len().min(seg.len() - 40);
            seg[40..40 + n].copy_from_slice(&noise[..n]);
            let _ = decode_segment(&seg, Lsn(1 << 20), None);
            let _ = decode_segment(&seg, Lsn(1 << 20), Some(&noise));
        }
    }

    #[test]
    fn an_empty_segment_ends_in_zeros() {
        let name = crate::names::SegName { tli: crate::TimelineId(1), log: 0, seg: 1 };
        let seg = crate::walpage::synthetic_segment(name, crate::SystemId(1), crate::WalSegSize::new(1 << 20).unwrap());
        let d = decode_segment(&seg, Lsn(1 << 20), None);
        assert_eq!((d.records, d.end), (0, End::Zeros));
    }
}
