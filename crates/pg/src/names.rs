//! WAL file names as PostgreSQL writes them in `pg_wal` and asks for in `restore_command`.
//!
//! - segment: `TTTTTTTTXXXXXXXXYYYYYYYY` (timeline, "xlogid", segment within the xlogid)
//! - partial segment: the same followed by `.partial`
//! - timeline history: `TTTTTTTT.history`
//! - backup history: `TTTTTTTTXXXXXXXXYYYYYYYY.OOOOOOOO.backup` (OOOOOOOO: offset of the start)

use crate::lsn::{SegNo, TimelineId, WalSegSize};
use std::fmt;

/// The position part of a segment name, kept as written so it can be parsed without knowing the
/// segment size; [`SegName::segno`] converts once the size is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegName {
    pub tli: TimelineId,
    pub log: u32,
    pub seg: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WalFileName {
    Segment(SegName),
    Partial(SegName),
    History(TimelineId),
    Backup(SegName, u32),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "{0:?} is not a WAL file name: expected a segment (24 hex digits), a .partial segment, a \
     timeline history (TTTTTTTT.history) or a backup history file (....backup)"
)]
pub struct NameError(pub String);

fn hex8(s: &str) -> Option<u32> {
    (s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit()) && s.bytes().all(|b| !b.is_ascii_lowercase()))
        .then(|| u32::from_str_radix(s, 16).ok())
        .flatten()
}

fn seg24(s: &str) -> Option<SegName> {
    if s.len() != 24 {
        return None;
    }
    let tli = hex8(&s[0..8])?;
    if tli == 0 {
        return None;
    }
    Some(SegName { tli: TimelineId(tli), log: hex8(&s[8..16])?, seg: hex8(&s[16..24])? })
}

impl SegName {
    pub fn new(tli: TimelineId, segno: SegNo, size: WalSegSize) -> SegName {
        let per = size.segments_per_xlogid();
        SegName { tli, log: (segno.0 / per) as u32, seg: (segno.0 % per) as u32 }
    }

    /// The segment number, or `None` when the name is impossible for this segment size.
    pub fn segno(self, size: WalSegSize) -> Option<SegNo> {
        let per = size.segments_per_xlogid();
        (u64::from(self.seg) < per).then(|| SegNo(u64::from(self.log) * per + u64::from(self.seg)))
    }

    /// The name of the next segment on the same timeline.
    pub fn next(self, size: WalSegSize) -> Option<SegName> {
        let segno = self.segno(size)?;
        Some(SegName::new(self.tli, SegNo(segno.0 + 1), size))
    }
}

impl fmt::Display for SegName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}{:08X}{:08X}", self.tli.0, self.log, self.seg)
    }
}

impl WalFileName {
    pub fn parse(name: &str) -> Result<WalFileName, NameError> {
        let err = || NameError(name.to_string());
        if let Some(seg) = seg24(name) {
            return Ok(WalFileName::Segment(seg));
        }
        if let Some(base) = name.strip_suffix(".partial") {
            return seg24(base).map(WalFileName::Partial).ok_or_else(err);
        }
        if let Some(base) = name.strip_suffix(".history") {
            return match hex8(base) {
                Some(t) if t > 0 => Ok(WalFileName::History(TimelineId(t))),
                _ => Err(err()),
            };
        }
        if let Some(base) = name.strip_suffix(".backup")
            && base.len() == 33
            && base.as_bytes()[24] == b'.'
        {
            let seg = seg24(&base[..24]).ok_or_else(err)?;
            let off = hex8(&base[25..]).ok_or_else(err)?;
            return Ok(WalFileName::Backup(seg, off));
        }
        Err(err())
    }

    pub fn timeline(&self) -> TimelineId {
        match self {
            WalFileName::Segment(s) | WalFileName::Partial(s) | WalFileName::Backup(s, _) => s.tli,
            WalFileName::History(t) => *t,
        }
    }

    pub fn segment(&self) -> Option<SegName> {
        match self {
            WalFileName::Segment(s) => Some(*s),
            _ => None,
        }
    }
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalFileName::Segment(s) => write!(f, "{s}"),
            WalFileName::Partial(s) => write!(f, "{s}.partial"),
            WalFileName::History(t) => write!(f, "{:08X}.history", t.0),
            WalFileName::Backup(s, off) => write!(f, "{s}.{off:08X}.backup"),
        }
    }
}

impl std::str::FromStr for WalFileName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        WalFileName::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for n in [
            "000000010000000000000003",
            "0000000200000001000000FF",
            "000000010000000000000003.partial",
            "00000002.history",
            "000000010000000000000002.00000028.backup",
        ] {
            assert_eq!(WalFileName::parse(n).unwrap().to_string(), n);
        }
    }

    #[test]
    fn bad_names_are_refused() {
        for n in [
            "",
            "00000001000000000000003",
            "000000000000000000000003",
            "0000000100000000000000zz",
            "0000000100000000000000ab",
            "00000000.history",
            "000000010000000000000002.backup",
            "RECOVERYXLOG",
            "000000010000000000000003.tmp",
        ] {
            assert!(WalFileName::parse(n).is_err(), "{n} should be refused");
        }
    }

    #[test]
    fn segment_numbers() {
        let ws = WalSegSize::DEFAULT;
        let WalFileName::Segment(s) = WalFileName::parse("0000000100000001000000FF").unwrap() else { panic!() };
        assert_eq!(s.segno(ws), Some(SegNo(511)));
        assert_eq!(s.next(ws).unwrap().to_string(), "000000010000000200000000");
        let big = WalSegSize::new(1 << 30).unwrap();
        assert_eq!(s.segno(big), None, "segment FF cannot exist with 1 GiB segments");
    }
}
