//! The WAL summary index: the summaries decoded at `wal-push`, gathered per timeline into a few
//! objects (`wal-index/<TLI>/<first>-<last>`, up to [`CHUNK`] segments each), so that `wal-show`,
//! `wal-verify` and restore planning read one object per few thousand segments instead of one
//! range request per segment.
//!
//! The index is derived data: each segment's own envelope stays authoritative. An entry counts
//! only for a segment the listing shows with the same stored size; segments it does not cover
//! are read one by one, and once [`MIN_NEW`] of them were read, a reader writes them as a new
//! index object (create-only; a reader without write access just skips that). Retention deletes
//! an index object once every segment it covers is gone.

use crate::repo::Repository;
use crate::summary::SegmentSummary;
use crate::{Codec, Compression, envelope, layout};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use walnut_pg::names::SegName;
use walnut_pg::{SegNo, TimelineId, WalSegSize};
use walnut_storage::PutMode;

pub const FORMAT: u32 = 1;
/// Segments per index object at most.
pub const CHUNK: usize = 4096;
/// Uncovered segments read one by one before a reader writes them into the index.
pub const MIN_NEW: usize = 256;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub segno: u64,
    /// The stored object's size, as listed.
    pub size: u64,
    pub summary: Option<SegmentSummary>,
}

#[derive(Debug, Serialize, Deserialize)]
struct IndexObject {
    format: u32,
    timeline: u32,
    entries: Vec<Entry>,
}

/// What the index knows: (timeline, segment) -> (stored size, summary).
pub type Known = HashMap<(TimelineId, SegNo), (u64, Option<SegmentSummary>)>;

/// Reads every index object. An unreadable one is skipped (with a warning): the segments it
/// covers are then read one by one.
pub async fn load(repo: &Repository) -> Result<Known, walnut_storage::StorageError> {
    use futures::StreamExt;
    let keys: Vec<String> = repo
        .store()
        .list(layout::WAL_INDEX_DIR)
        .await?
        .into_iter()
        .filter(|o| layout::parse_wal_index_key(&o.key).is_some())
        .map(|o| o.key)
        .collect();
    let objects: Vec<_> = futures::stream::iter(keys)
        .map(|key| async move {
            let r = repo.get_object(&key).await.map_err(|e| e.to_string()).and_then(|d| {
                serde_json::from_slice::<IndexObject>(&d.content).map_err(|e| format!("not an index object: {e}"))
            });
            (key, r)
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut known = Known::new();
    for (key, r) in objects {
        match r {
            Ok(o) if o.format == FORMAT => {
                for e in o.entries {
                    known.insert((TimelineId(o.timeline), SegNo(e.segno)), (e.size, e.summary));
                }
            }
            Ok(o) => tracing::warn!("{key}: index format {} is newer than this walnut's ({FORMAT}); ignored", o.format),
            Err(e) => tracing::warn!("{key}: {e}; ignored (the segments are read one by one)"),
        }
    }
    Ok(known)
}

/// Records the new stored sizes of segments whose objects were rewritten with the same content
/// (`rekey`): every index object that covers one of them is rewritten in place, so that readers
/// keep using the index. Returns the index objects rewritten. An unreadable index object is left
/// as it is (readers skip it anyway).
pub async fn resize(
    repo: &Repository,
    sizes: &HashMap<(TimelineId, SegNo), u64>,
) -> Result<usize, walnut_storage::StorageError> {
    if sizes.is_empty() {
        return Ok(0);
    }
    let mut rewritten = 0;
    for o in repo.store().list(layout::WAL_INDEX_DIR).await? {
        if layout::parse_wal_index_key(&o.key).is_none() {
            continue;
        }
        let Ok(d) = repo.get_object(&o.key).await else { continue };
        let Ok(mut index) = serde_json::from_slice::<IndexObject>(&d.content) else { continue };
        if index.format != FORMAT {
            continue;
        }
        let mut changed = false;
        for e in &mut index.entries {
            if let Some(&size) = sizes.get(&(TimelineId(index.timeline), SegNo(e.segno)))
                && size != e.size
            {
                e.size = size;
                changed = true;
            }
        }
        if changed {
            repo.store().put(&o.key, index_object(&index), PutMode::Overwrite).await?;
            rewritten += 1;
        }
    }
    Ok(rewritten)
}

fn index_object(index: &IndexObject) -> bytes::Bytes {
    let body = serde_json::to_vec(index).expect("serialisable");
    envelope::encode(
        &body,
        &serde_json::json!({ "kind": "wal-index" }),
        Codec { compression: Compression::Zstd, level: 3, seal: None },
    )
}

/// Writes `entries` (one timeline's, any order) as index objects of up to [`CHUNK`] segments.
pub async fn write(
    repo: &Repository,
    tli: TimelineId,
    mut entries: Vec<Entry>,
    size: WalSegSize,
) -> Result<usize, walnut_storage::StorageError> {
    entries.sort_by_key(|e| e.segno);
    entries.dedup_by_key(|e| e.segno);
    let mut written = 0;
    for chunk in entries.chunks(CHUNK) {
        let (first, last) = (chunk[0].segno, chunk[chunk.len() - 1].segno);
        let key = layout::wal_index_key(&SegName::new(tli, SegNo(first), size), &SegName::new(tli, SegNo(last), size));
        let object = index_object(&IndexObject { format: FORMAT, timeline: tli.0, entries: chunk.to_vec() });
        match repo.store().put(&key, object, PutMode::Create).await {
            Ok(()) => written += 1,
            Err(walnut_storage::StorageError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;
    use walnut_pg::{PgMajor, SystemId, WalFileName};

    fn summary(n: u64) -> SegmentSummary {
        SegmentSummary { records: n, commits: 1, ..Default::default() }
    }

    /// Segment `s` whose summary says `records` (same-sized objects for same-length numbers).
    async fn put_segment(repo: &Repository, s: u64, records: u64) {
        let size = WalSegSize::DEFAULT;
        let key = layout::wal_key(&WalFileName::Segment(SegName::new(TimelineId(1), SegNo(s), size)));
        let meta = serde_json::json!({ "summary": summary(records) });
        let object = envelope::encode(format!("segment {s:04}").as_bytes(), &meta, Codec::default());
        repo.store().put(&key, object, PutMode::Overwrite).await.unwrap();
    }

    #[tokio::test]
    async fn readers_build_the_index_and_use_it() {
        let repo = Repository::new(std::sync::Arc::new(walnut_storage::remote::RemoteStore::memory()));
        let size = WalSegSize::DEFAULT;
        repo.ensure_identity(&Identity::new(SystemId(7), PgMajor(15), size)).await.unwrap();
        let n = (MIN_NEW + 10) as u64;
        for s in 1..=n {
            put_segment(&repo, s, s).await;
        }
        // First read: every summary read one by one, then written as an index object.
        let inv = crate::wal::inventory(&repo, true).await.unwrap();
        assert_eq!(inv.summaries[&TimelineId(1)].len(), n as usize);
        let index = repo.store().list(layout::WAL_INDEX_DIR).await.unwrap();
        assert_eq!(index.len(), 1, "{index:?}");
        let (first, last) = layout::parse_wal_index_key(&index[0].key).unwrap();
        assert_eq!((first.segno(size), last.segno(size)), (Some(SegNo(1)), Some(SegNo(n))));

        // The index is what later readers use: behind its back, segment 5's object now says 6
        // (same size), and the reader still sees the indexed 5; segment 7's object changed size
        // (7 -> 70), so it is read again.
        put_segment(&repo, 5, 6).await;
        put_segment(&repo, 7, 70).await;
        let inv = crate::wal::inventory(&repo, true).await.unwrap();
        let sums = &inv.summaries[&TimelineId(1)];
        assert_eq!(sums.get(&SegNo(5)), Some(&summary(5)), "from the index");
        assert_eq!(sums.get(&SegNo(7)), Some(&summary(70)), "re-read: the object changed");
        assert_eq!(sums.len(), n as usize);
        // Too few new segments to index again.
        assert_eq!(repo.store().list(layout::WAL_INDEX_DIR).await.unwrap().len(), 1);
    }

    /// A flipped byte in an index object is caught by its checksum: the object is skipped and
    /// every segment it covered is read from its own envelope again, never from the bad index.
    #[tokio::test]
    async fn a_corrupt_index_object_is_never_trusted() {
        let repo = Repository::new(std::sync::Arc::new(walnut_storage::remote::RemoteStore::memory()));
        repo.ensure_identity(&Identity::new(SystemId(7), PgMajor(15), WalSegSize::DEFAULT)).await.unwrap();
        let n = (MIN_NEW + 10) as u64;
        for s in 1..=n {
            put_segment(&repo, s, s).await;
        }
        crate::wal::inventory(&repo, true).await.unwrap();
        let key = repo.store().list(layout::WAL_INDEX_DIR).await.unwrap().remove(0).key;
        let mut object = repo.store().get(&key).await.unwrap().to_vec();
        let middle = object.len() / 2;
        object[middle] ^= 0x01;
        repo.store().put(&key, object.into(), PutMode::Overwrite).await.unwrap();
        assert!(load(&repo).await.unwrap().is_empty(), "the corrupt index object was used");
        // Behind the index's back segment 5 now says 6 (same size): only a reader that skipped
        // the corrupt index sees it.
        put_segment(&repo, 5, 6).await;
        let inv = crate::wal::inventory(&repo, true).await.unwrap();
        let sums = &inv.summaries[&TimelineId(1)];
        assert_eq!(sums.get(&SegNo(5)), Some(&summary(6)), "read from the segment itself");
        assert_eq!(sums.len(), n as usize);
    }

    #[test]
    fn keys_round_trip() {
        let size = WalSegSize::DEFAULT;
        let (a, b) = (SegName::new(TimelineId(3), SegNo(1), size), SegName::new(TimelineId(3), SegNo(4096), size));
        let key = layout::wal_index_key(&a, &b);
        assert_eq!(layout::parse_wal_index_key(&key), Some((a, b)));
        assert_eq!(layout::parse_wal_index_key("wal-index/00000001/junk"), None);
        assert_eq!(layout::parse_wal_index_key(&key.replace("wal-index/00000003", "wal-index/00000001")), None);
    }
}
