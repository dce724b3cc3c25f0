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
/// when no record continues. An error when the record does not validate whole (a record
/// continuing even past `next`, or one cut off by a crash: then nothing covers that range, and
/// a merged map with it reads as unknown).
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
        End::Invalid => Err(d.invalid_reason.unwrap_or_else(|| "invalid WAL".into())),
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
