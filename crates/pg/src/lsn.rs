//! Log sequence numbers, timelines, segment numbers and the segment math between them.

use std::fmt;
use std::str::FromStr;

/// A WAL position. Displays as PostgreSQL does: `16/B374D848`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

/// A timeline ID (never 0 in a valid WAL file name). Serializes as its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct TimelineId(pub u32);

/// A WAL segment number: the position divided by the segment size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegNo(pub u64);

/// The WAL segment size of a cluster: a power of two between 1 MiB and 1 GiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WalSegSize(u32);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("invalid LSN {0:?}: expected two hexadecimal numbers separated by '/', like 16/B374D848")]
    Lsn(String),
    #[error("invalid WAL segment size {0}: must be a power of two between 1 MiB and 1 GiB")]
    SegSize(u64),
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseError::Lsn(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// Serializes as PostgreSQL's own text (`16/B374D848`), so stored JSON reads as PostgreSQL does.
impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl WalSegSize {
    pub const DEFAULT: WalSegSize = WalSegSize(16 * 1024 * 1024);

    pub fn new(bytes: u64) -> Result<Self, ParseError> {
        if bytes.is_power_of_two() && (1 << 20..=1 << 30).contains(&bytes) {
            Ok(WalSegSize(bytes as u32))
        } else {
            Err(ParseError::SegSize(bytes))
        }
    }

    pub fn bytes(self) -> u64 {
        u64::from(self.0)
    }

    /// Segments per "xlogid" (the middle 8 hex digits of a segment file name).
    pub fn segments_per_xlogid(self) -> u64 {
        0x1_0000_0000 / self.bytes()
    }

    /// The segment holding `lsn`.
    pub fn segno(self, lsn: Lsn) -> SegNo {
        SegNo(lsn.0 / self.bytes())
    }

    /// The first LSN of `segno`.
    pub fn start_lsn(self, segno: SegNo) -> Lsn {
        Lsn(segno.0 * self.bytes())
    }
}

impl fmt::Display for WalSegSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} MiB", self.0 >> 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_serializes_as_postgres_text() {
        let l = Lsn(0x16_B374_D848);
        assert_eq!(serde_json::to_string(&l).unwrap(), "\"16/B374D848\"");
        assert_eq!(serde_json::from_str::<Lsn>("\"16/B374D848\"").unwrap(), l);
        assert!(serde_json::from_str::<Lsn>("\"16/ZZ\"").is_err());
        assert_eq!(serde_json::to_string(&TimelineId(3)).unwrap(), "3");
    }

    #[test]
    fn lsn_round_trips_in_postgres_text() {
        for (text, value) in [("0/0", 0u64), ("16/B374D848", 0x16_B374_D848), ("FFFFFFFF/FFFFFFFF", u64::MAX)] {
            let lsn: Lsn = text.parse().unwrap();
            assert_eq!(lsn.0, value);
            assert_eq!(lsn.to_string(), text);
        }
        for bad in ["", "16", "/1", "1/", "G/0", "123456789/0", "1/2/3"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn segment_math() {
        let s = WalSegSize::DEFAULT;
        assert_eq!(s.segments_per_xlogid(), 256);
        assert_eq!(s.segno(Lsn(0x1_0100_0000)), SegNo(257));
        assert_eq!(s.start_lsn(SegNo(257)), Lsn(0x1_0100_0000));
        assert!(WalSegSize::new(3 << 20).is_err());
        assert!(WalSegSize::new(1 << 31).is_err());
        assert_eq!(WalSegSize::new(1 << 30).unwrap().segments_per_xlogid(), 4);
    }
}
