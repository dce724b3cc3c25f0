//! The small summary of a WAL segment that travels with it (in the object's envelope metadata),
//! made at `wal-push` by decoding the segment. `wal-show`, `wal-verify` and the restore planner
//! read summaries instead of re-downloading segments.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use walnut_pg::Lsn;
use walnut_pg::walrec::{self, End, Event, PgTimestamp, XactKind};

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
    let d = walrec::decode_segment(seg, start, None);
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
