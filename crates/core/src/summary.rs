//! The small summary of a WAL segment that travels with it (in the object's envelope metadata),
//! made at `wal-push` by decoding the segment. `wal-show`, `wal-verify` and the restore planner
//! read summaries instead of re-downloading segments.
//!
//! The segment's changed-block map ([`crate::blockmap`]) is made here too, but kept out of the
//! summary (summaries are indexed in bulk and stay small): [`summarize_with_blocks`] makes both
//! in one decode, [`segment_block_map`] and [`tail_block_map`] the map alone.

use crate::blockmap::{BlockMap, BlockMapBuilder};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use walnut_pg::Lsn;
use walnut_pg::walrec::{self, Decoded, End, Event, PgTimestamp, XactKind};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct RestorePoint {
    pub name: String,
    pub time: Option<DateTime<Utc>>,
    pub lsn: Lsn,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct SegmentSummary {
    pub records: u64,
    pub commits: u64,
    pub aborts: u64,
    pub first_commit: Option<DateTime<Utc>>,
    pub last_commit: Option<DateTime<Utc>>,
    pub xid_min: Option<u32>,
    pub xid_max: Option<u32>,
    pub restore_points: Vec<RestorePoint>,
    pub checkpoints: u64,
    /// Timeline switches recorded here (end-of-recovery records): the new timeline.
    pub new_timelines: Vec<u32>,
    pub end_of_valid_wal: Lsn,
    /// Where the last whole record that begins in this segment begins (absent in summaries made
    /// before walnut recorded it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_record: Option<Lsn>,
    /// How decoding ended: switch, continues, segment_end, zeros.
    pub end: String,
}

fn time(t: PgTimestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(t.unix_micros())
}

/// Decodes a segment into its summary, or says why it is not valid WAL.
pub fn summarize(seg: &[u8], start: Lsn) -> Result<SegmentSummary, String> {
    from_decoded(walrec::decode_segment(seg, start, None))
}

/// [`summarize`] and [`segment_block_map`] (without the next segment) in one decode.
pub fn summarize_with_blocks(seg: &[u8], start: Lsn) -> Result<(SegmentSummary, BlockMap), String> {
    let mut b = BlockMapBuilder::new();
    let d = walrec::decode_segment_with_blocks(seg, start, None, |r| b.add(r));
    let end = map_end(&d, seg, start)?;
    Ok((from_decoded(d)?, b.finish(start, end)))
}

/// The end of the range a segment's map covers: the records that begin in the segment, but for
/// one that continues past the data at hand.
fn map_end(d: &Decoded, seg: &[u8], start: Lsn) -> Result<Lsn, String> {
    let seg_end = Lsn(start.0 + seg.len() as u64);
    Ok(match d.end {
        End::Invalid => return Err(d.invalid_reason.clone().unwrap_or_else(|| "invalid WAL".into())),
        End::Switch | End::SegmentEnd => seg_end,
        End::ContinuesIntoNext | End::Zeros => d.end_of_valid.min(seg_end),
    })
}

/// The changed-block map of the records that begin in the segment at `start`. Without `next`
/// (the following segment), the record that continues into it is left out: the map ends where
/// that record begins, and [`tail_block_map`] covers it once the next segment is at hand. A
/// segment that ends in zeros (a partial one) is covered up to its end of valid WAL.
pub fn segment_block_map(seg: &[u8], start: Lsn, next: Option<&[u8]>) -> Result<BlockMap, String> {
    let mut b = BlockMapBuilder::new();
    let d = walrec::decode_segment_with_blocks(seg, start, next, |r| b.add(r));
    let end = map_end(&d, seg, start)?;
    Ok(b.finish(start, end))
}

/// The map of the one record that begins in the segment at `start` and continues into `next`,
/// covering from where [`segment_block_map`] without `next` ends to the segment's end; `None`
/// when no record continues. A record that a crash cut off (`next` begins with
/// `XLP_FIRST_IS_OVERWRITE_CONTRECORD`: recovery abandoned it) changed nothing: an empty map.
/// An error when the record does not validate whole otherwise (or continues even past `next`):
/// then nothing covers that range, and a merged map without it reads as unknown.
pub fn tail_block_map(seg: &[u8], start: Lsn, next: &[u8]) -> Result<Option<BlockMap>, String> {
    let seg_end = Lsn(start.0 + seg.len() as u64);
    let mut before = start;
    let mut b = BlockMapBuilder::new();
    let mut tail = false;
    let d = walrec::decode_segment_with_blocks(seg, start, Some(next), |r| {
        if r.end > seg_end {
            b.add(r);
            tail = true;
        } else {
            before = r.end;
        }
    });
    match d.end {
        End::Invalid => {
            let overwritten = walnut_pg::PageHeader::parse(next)
                .is_some_and(|h| h.info & walnut_pg::walpage::XLP_FIRST_IS_OVERWRITE_CONTRECORD != 0);
            let alone = walrec::decode_segment(seg, start, None);
            if overwritten && alone.end == End::ContinuesIntoNext && alone.end_of_valid == before && !tail {
                return Ok(Some(BlockMap::empty(before, seg_end)));
            }
            Err(d.invalid_reason.unwrap_or_else(|| "invalid WAL".into()))
        }
        End::ContinuesIntoNext if !tail => {
            Err(format!("the record after {before} continues past the next segment too"))
        }
        _ => Ok(tail.then(|| b.finish(before, seg_end))),
    }
}

fn from_decoded(d: Decoded) -> Result<SegmentSummary, String> {
    let end = match d.end {
        End::Invalid => return Err(d.invalid_reason.unwrap_or_else(|| "invalid WAL".into())),
        End::Switch => "switch",
        End::ContinuesIntoNext => "continues",
        End::SegmentEnd => "segment_end",
        End::Zeros => "zeros",
    };
    let mut s = SegmentSummary {
        records: d.records,
        end_of_valid_wal: d.end_of_valid,
        last_record: d.last_record,
        end: end.into(),
        ..Default::default()
    };
    for e in d.events {
        match e {
            Event::Xact { kind, xid, time: t, .. } => {
                if xid != 0 {
                    s.xid_min = Some(s.xid_min.map_or(xid, |m| m.min(xid)));
                    s.xid_max = Some(s.xid_max.map_or(xid, |m| m.max(xid)));
                }
                match kind {
                    XactKind::Commit | XactKind::CommitPrepared => {
                        s.commits += 1;
                        let t = time(t);
                        s.first_commit = s.first_commit.or(t);
                        s.last_commit = t.or(s.last_commit);
                    }
                    XactKind::Abort | XactKind::AbortPrepared => s.aborts += 1,
                    XactKind::Prepare => {}
                }
            }
            Event::RestorePoint { name, time: t, lsn } => {
                s.restore_points.push(RestorePoint { name, time: time(t), lsn })
            }
            Event::Checkpoint { .. } => s.checkpoints += 1,
            Event::EndOfRecovery { tli, .. } => s.new_timelines.push(tli),
            Event::Switch { .. } => {}
        }
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use walnut_pg::WalSegSize;
    use walnut_pg::relpath::{ForkNumber, RelFileNode};
    use walnut_pg::walpage::XLP_FIRST_IS_OVERWRITE_CONTRECORD;
    use walnut_pg::walrec::{BKPIMAGE_APPLY, RM_XLOG_ID};
    use walnut_pg::walsynth::{self, Body, Img};

    const R: RelFileNode = RelFileNode { spc_node: 1663, db_node: 5, rel_node: 16384 };
    const MB: u64 = 1 << 20;

    /// An XLOG_FPI record with a whole-page image of block `block` of `R`.
    fn fpi(block: u32) -> Vec<u8> {
        let mut b = Body::default();
        let img = Img { hole_offset: 0, hole_length: 0, info: BKPIMAGE_APPLY, stored: 8192, compressed_hole: None };
        b.block(0, 0, false, false, 0, Some(img), R, block);
        walsynth::record(RM_XLOG_ID, 0xB0, 0, &b.bytes())
    }

    fn blocks(m: &BlockMap) -> Vec<u32> {
        m.fork_blocks(R, ForkNumber::MAIN).map(|s| s.iter().collect()).unwrap_or_default()
    }

    /// Two 1 MiB segments (0/100000, 0/200000) of 8 kB records, one of which crosses into the
    /// second; and the block of that one.
    fn two_segments() -> (Vec<u8>, Vec<u8>, u32) {
        let recs: Vec<Vec<u8>> = (0..200).map(fpi).collect();
        let segs = walsynth::segments(Lsn(MB), WalSegSize::new(MB).unwrap(), &recs);
        let mut crossing = None;
        walrec::decode_segment_with_blocks(&segs[0], Lsn(MB), Some(&segs[1]), |r| {
            if r.end.0 > 2 * MB {
                crossing = Some(r.blocks[0].block);
            }
        });
        (segs[0].clone(), segs[1].clone(), crossing.expect("a record crosses"))
    }

    #[test]
    fn a_segment_map_alone_plus_its_tail_is_the_map_with_the_next_segment() {
        let (a, b, crossing) = two_segments();
        let alone = segment_block_map(&a, Lsn(MB), None).unwrap();
        assert!(alone.end.0 < 2 * MB);
        assert_eq!(blocks(&alone), (0..crossing).collect::<Vec<_>>());
        let tail = tail_block_map(&a, Lsn(MB), &b).unwrap().unwrap();
        assert_eq!((tail.start, tail.end, blocks(&tail)), (alone.end, Lsn(2 * MB), vec![crossing]));
        let full = segment_block_map(&a, Lsn(MB), Some(&b)).unwrap();
        let mut joined = alone.clone();
        joined.merge(&tail);
        assert_eq!(joined, full);
        // The next segment's map starts at its start and leaves the crossing record out.
        let next = segment_block_map(&b, Lsn(2 * MB), None).unwrap();
        assert_eq!(next.start, Lsn(2 * MB));
        assert_eq!(blocks(&next).first(), Some(&(crossing + 1)));
        // Without the tail, the range has a hole: unknown.
        assert!(BlockMap::combine(&[alone.clone(), next.clone()], Lsn(MB), Lsn(3 * MB)).is_unknown());
        let all = BlockMap::combine(&[alone.clone(), tail, next.clone()], Lsn(MB), next.end);
        assert!(!all.is_unknown());
        assert_eq!(blocks(&all), (0..200).collect::<Vec<_>>());
        // One decode for the summary and the map.
        assert_eq!(summarize_with_blocks(&a, Lsn(MB)).unwrap(), (summarize(&a, Lsn(MB)).unwrap(), alone));
    }

    #[test]
    fn a_record_cut_off_by_a_crash_changed_nothing() {
        let (a, _, crossing) = two_segments();
        let size = WalSegSize::new(MB).unwrap();
        // What recovery writes after the abandoned record: a page flagged
        // XLP_FIRST_IS_OVERWRITE_CONTRECORD, then new records.
        let mut b = walsynth::segments(Lsn(2 * MB), size, &[fpi(999)]).swap_remove(0);
        let h = walsynth::page_header(Lsn(2 * MB), size, XLP_FIRST_IS_OVERWRITE_CONTRECORD, 0);
        b[..h.len()].copy_from_slice(&h);
        let alone = segment_block_map(&a, Lsn(MB), None).unwrap();
        let tail = tail_block_map(&a, Lsn(MB), &b).unwrap().unwrap();
        assert_eq!((tail.start, tail.end), (alone.end, Lsn(2 * MB)));
        assert!(tail.relations.is_empty() && !tail.is_unknown(), "{tail:?}");
        assert!(!blocks(&alone).contains(&crossing));
        // The next segment on its own decodes from its first record.
        assert_eq!(blocks(&segment_block_map(&b, Lsn(2 * MB), None).unwrap()), vec![999]);
        // Without the flag, a page that does not continue the record is an error, not a guess.
        let mut c = b.clone();
        let h = walsynth::page_header(Lsn(2 * MB), size, 0, 0);
        c[..h.len()].copy_from_slice(&h);
        assert!(tail_block_map(&a, Lsn(MB), &c).is_err());
    }

    #[test]
    fn no_tail_when_no_record_crosses() {
        let recs: Vec<Vec<u8>> = (0..3).map(fpi).collect();
        let segs = walsynth::segments(Lsn(MB), WalSegSize::new(MB).unwrap(), &recs);
        let next = vec![0u8; MB as usize];
        assert_eq!(tail_block_map(&segs[0], Lsn(MB), &next).unwrap(), None);
        // A segment that ends in zeros is covered to its end of valid WAL.
        let m = segment_block_map(&segs[0], Lsn(MB), None).unwrap();
        assert_eq!(blocks(&m), vec![0, 1, 2]);
        assert_eq!(m.end, walrec::decode_segment(&segs[0], Lsn(MB), None).end_of_valid);
    }
}
