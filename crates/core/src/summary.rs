//! The small summary of a WAL segment that travels with it (in the object's envelope metadata),
//! made at `wal-push` by decoding the segment. `wal-show`, `wal-verify` and the restore planner
//! read summaries instead of re-downloading segments.
//!
//! The segment's changed-block map ([`crate::blockmap`]) is made here too, but kept out of the
//! summary (summaries are indexed in bulk and stay small): [`summarize_with_blocks`] makes both
//! in one decode, [`segment_block_map`] and [`tail_block_map`] the map alone.
//!
//! # Tiling the maps at `wal-push`
//!
//! At the push of segment N, N's map ([`summarize_with_blocks`]) covers the records that begin
//! in N but for its *tail record*, the one that continues into N+1 (it cannot be validated
//! without N+1): `[N's start, the end of the record before the tail)`, or to the end of valid
//! WAL when N ends in zeros. At the push of N+1, N is still in `pg_wal` as a rule, and
//! [`tail_block_map_from_end`] makes the tail record's map from N's *last pages* and N+1:
//! stored with N+1, it covers `[where N's map ends, N's end)`, so the stored maps tile with no
//! hole. Its outcomes ([`TailMap`]):
//!
//! - [`TailMap::Tail`]: the map of `[map.start, N's end)`, where `map.start` is exactly where
//!   N's own map ends (the end of the record before the tail, or N's start). It equals what
//!   [`tail_block_map`] makes from the whole of N. A tail record that a crash cut off (N+1 begins
//!   with `XLP_FIRST_IS_OVERWRITE_CONTRECORD`) gives an empty map of the same range: it changed
//!   nothing.
//! - [`TailMap::NoTail`]: no record continues into N+1; nothing to store, and this covers
//!   nothing. After an `XLOG_SWITCH`, at a record boundary, or when no record begins in N (one
//!   from an earlier segment runs through it), N's own map already reaches N's end. When N ended
//!   in zeros, N's map ends at its end of valid WAL and `[that, N's end)` is covered by no map (a
//!   range merged across it reads as unknown, as it should: replay stops there). A window that
//!   begins past a switch cannot tell a switch from zeros (`NoTail::ZeroedPages`: PostgreSQL
//!   zeroes the rest of the segment after a switch, page headers too); it matters not here.
//! - [`TailMap::NeedMore`]: the window is too small (the record before the tail record, whose
//!   end is where the tail's range begins, begins before the window; so may the tail record).
//!   Call again with a larger window, twice as large, say, up to the whole segment, which always
//!   answers otherwise. How many bytes would do is not knowable from the window.
//! - an error: the tail record does not validate (nor was it abandoned), it runs past N+1 too,
//!   or the window is not N's last pages. Nothing covers `[where N's map ends, N's end)`.
//!
//! 64 kB of N (eight pages) almost always does: more is needed only when the record before the
//! tail record begins before the window (the two together are longer than the window, less its
//! page headers). What lies before the window is not read, so not checked; N was decoded whole
//! when it was pushed.

use crate::blockmap::{BlockMap, BlockMapBuilder};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use walnut_pg::Lsn;
use walnut_pg::walrec::{self, Decoded, End, Event, NoTail, PgTimestamp, TailDecode, XactKind};

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
/// when no record continues (or none begins in the segment: one from an earlier segment runs
/// through it). [`tail_block_map_from_end`] makes the same map from the segment's last pages. A record that a crash cut off (`next` begins with
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
        // No record begins in the segment: one from an earlier segment runs through it.
        End::ContinuesIntoNext if d.records == 0 && d.end_of_valid == seg_end => Ok(None),
        End::ContinuesIntoNext if !tail => {
            Err(format!("the record after {before} continues past the next segment too"))
        }
        _ => Ok(tail.then(|| b.finish(before, seg_end))),
    }
}

/// The map of a segment's tail record made from its last pages ([`tail_block_map_from_end`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailMap {
    /// The tail record's map, covering `[map.start, the segment's end)`; `map.start` is where the
    /// segment's own map (made without the next segment) ends. Empty when a crash cut the record
    /// off. Equal to what [`tail_block_map`] makes from the whole segment.
    Tail(BlockMap),
    /// No record continues into the next segment: nothing to store (see the module docs for the
    /// range the segment's own map leaves when it ended in zeros).
    NoTail(NoTail),
    /// The window is too small: call again with a larger one, up to the whole segment.
    NeedMore,
}

/// The map of the tail record of the segment starting at `seg_start` (`seg_size` bytes), the
/// record that begins in it and continues into `next`, from the segment's last pages alone:
/// `last_pages` is its final K bytes (K a multiple of 8 kB, at most `seg_size`). See the module
/// docs for the outcomes and the range each covers; an error when the tail record does not
/// validate (and was not abandoned by a crash), runs past `next` too, or the window is not the
/// segment's last pages. Never panics.
pub fn tail_block_map_from_end(
    last_pages: &[u8],
    seg_start: Lsn,
    seg_size: u64,
    next: &[u8],
) -> Result<TailMap, String> {
    let seg_end = Lsn(seg_start.0.saturating_add(seg_size));
    let mut b = BlockMapBuilder::new();
    Ok(match walrec::decode_tail_from_end(last_pages, seg_start, seg_size, next, |r| b.add(r)) {
        TailDecode::Tail { before, .. } => TailMap::Tail(b.finish(before, seg_end)),
        TailDecode::Abandoned { before } => TailMap::Tail(BlockMap::empty(before, seg_end)),
        TailDecode::NoTail(why) => TailMap::NoTail(why),
        TailDecode::NeedMore => TailMap::NeedMore,
        TailDecode::Invalid(e) => return Err(e),
    })
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

    /// tail_block_map_from_end with the last `k` bytes, doubled while more are needed.
    fn from_end(seg: &[u8], start: Lsn, next: &[u8], mut k: usize) -> Result<TailMap, String> {
        loop {
            match tail_block_map_from_end(&seg[seg.len() - k..], start, seg.len() as u64, next)? {
                TailMap::NeedMore if k < seg.len() => k = (k * 2).min(seg.len()),
                t => return Ok(t),
            }
        }
    }

    #[test]
    fn the_tail_map_from_the_last_pages_is_the_tail_map_from_the_whole_segment() {
        let (a, b, crossing) = two_segments();
        let whole = tail_block_map(&a, Lsn(MB), &b).unwrap().unwrap();
        for k in [8192, 16384, 65536, MB as usize] {
            assert_eq!(from_end(&a, Lsn(MB), &b, k), Ok(TailMap::Tail(whole.clone())), "{k}");
        }
        // One page is not enough (the record before the tail began before it).
        assert_eq!(tail_block_map_from_end(&a[MB as usize - 8192..], Lsn(MB), MB, &b), Ok(TailMap::NeedMore));
        let TailMap::Tail(t) = from_end(&a, Lsn(MB), &b, 65536).unwrap() else { unreachable!() };
        assert_eq!(
            (t.start, t.end, blocks(&t)),
            (segment_block_map(&a, Lsn(MB), None).unwrap().end, Lsn(2 * MB), vec![crossing])
        );

        // A crash cut the tail record off: an empty map of the same range.
        let size = WalSegSize::new(MB).unwrap();
        let mut c = walsynth::segments(Lsn(2 * MB), size, &[fpi(999)]).swap_remove(0);
        let h = walsynth::page_header(Lsn(2 * MB), size, XLP_FIRST_IS_OVERWRITE_CONTRECORD, 0);
        c[..h.len()].copy_from_slice(&h);
        let abandoned = tail_block_map(&a, Lsn(MB), &c).unwrap().unwrap();
        assert_eq!(from_end(&a, Lsn(MB), &c, 65536), Ok(TailMap::Tail(abandoned)));
        // Without the flag: an error, as from the whole segment.
        let h = walsynth::page_header(Lsn(2 * MB), size, 0, 0);
        c[..h.len()].copy_from_slice(&h);
        assert!(from_end(&a, Lsn(MB), &c, 65536).is_err());
        // Pages that are not the segment's last: an error.
        assert!(tail_block_map_from_end(&a[..65536], Lsn(MB), MB, &b).is_err());
    }

    #[test]
    fn no_tail_map_when_no_record_continues() {
        let size = WalSegSize::new(MB).unwrap();
        let next = walsynth::segments(Lsn(2 * MB), size, &[fpi(7)]).swap_remove(0);
        // A switch: PostgreSQL zeroes the rest of the segment, page headers too.
        let mut recs: Vec<Vec<u8>> = (0..3).map(fpi).collect();
        recs.push(walsynth::record(RM_XLOG_ID, 0x40, 0, &[]));
        let seg = walsynth::segments(Lsn(MB), size, &recs).swap_remove(0);
        assert_eq!(tail_block_map(&seg, Lsn(MB), &next), Ok(None));
        assert_eq!(from_end(&seg, Lsn(MB), &next, 65536), Ok(TailMap::NoTail(NoTail::ZeroedPages)));
        assert_eq!(from_end(&seg, Lsn(MB), &next, MB as usize), Ok(TailMap::NoTail(NoTail::Switch)));
        // The segment's own map reaches its end.
        assert_eq!(segment_block_map(&seg, Lsn(MB), None).unwrap().end, Lsn(2 * MB));
    }

    #[test]
    fn a_segment_that_one_record_runs_through_has_no_tail() {
        // A record from the end of the first segment through the second, into the third.
        let size = WalSegSize::new(MB).unwrap();
        let mut recs: Vec<Vec<u8>> = (0..120).map(fpi).collect();
        recs.push(walsynth::record(10, 0, 1, &Body::main_only(&vec![1u8; 1_200_000]).bytes()));
        recs.push(fpi(500));
        let segs = walsynth::segments(Lsn(MB), size, &recs);
        assert_eq!(segs.len(), 3);
        // The second segment's own map covers it whole, and there is no tail to add.
        let own = segment_block_map(&segs[1], Lsn(2 * MB), None).unwrap();
        assert_eq!((own.start, own.end), (Lsn(2 * MB), Lsn(3 * MB)));
        assert_eq!(tail_block_map(&segs[1], Lsn(2 * MB), &segs[2]), Ok(None));
        assert_eq!(from_end(&segs[1], Lsn(2 * MB), &segs[2], 65536), Ok(TailMap::NoTail(NoTail::NoneBegins)));
        // The first segment's tail record runs past the next segment: an error either way.
        assert!(tail_block_map(&segs[0], Lsn(MB), &segs[1]).is_err());
        assert!(from_end(&segs[0], Lsn(MB), &segs[1], 65536).is_err());
    }
}
