//! Block-incremental backups (`backup-push --incremental`): the parent, the changed-block map
//! of the WAL between the parent's start and this backup's start, and what to store of each file.
//!
//! A relation file that exists in the parent is stored as the blocks the map says changed, plus
//! every block at or beyond its *limit* (the parent's copy's length, lowered by any truncation in
//! the range); everything else is stored whole: files that are not relation files, relation
//! files the parent lacks, and those the map cannot vouch for (see
//! [`crate::blockmap::BlockMap::decide`]: unknown WAL, free space and visibility maps, unlogged
//! relations, forks created or dropped in the range, databases and tablespaces created or
//! dropped), each with its reason in the manifest. Restoring writes the stored blocks over the
//! file as the parent restores it, then sets the file's length: every block that differs from
//! the parent's copy and that replay from this backup's start would not rewrite is stored.
//!
//! The map of the range is made of the maps stored with each archived segment (at `wal-push`);
//! a segment stored without one is decoded from the archive, and WAL not archived yet (the
//! segment this backup starts in, at least) from the local `pg_wal`. A segment found nowhere
//! makes the map unknown: every relation file is then stored whole, and the manifest says why.

use super::*;
use crate::blockmap::{BlockMap, BlockSet, FileDecision, ForkDelta};
use crate::plan;
use walnut_pg::SegNo;
use walnut_pg::relpath::{RELSEG_SIZE, parse_relpath};

/// What `backup-push --incremental` asks for.
#[derive(Debug, Clone)]
pub struct IncrementalOptions {
    /// The parent: a backup ID or name, or LATEST; by default the newest DONE backup on this
    /// server's timeline history that began before this one.
    pub parent: Option<String>,
    /// Incremental backups in a chain before a full backup is taken instead.
    pub max_chain: usize,
    /// Where `wal-push` keeps the last pages of the segments it pushed (`WalPusher::tails`): the
    /// tail records of segments a checkpoint already recycled from `pg_wal`.
    pub tails: Option<PathBuf>,
}

/// What an incremental backup builds on.
pub(super) struct Base {
    pub(super) parent: Manifest,
    pub(super) chain: Vec<BackupId>,
    map: BlockMap,
    /// The parent's files as it restores them: path -> size.
    parent_sizes: HashMap<String, u64>,
    /// How the map was made, for the report.
    pub(super) notes: Vec<String>,
}

/// What an incremental backup stores of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum FilePlan {
    /// Whole; the reason when it is a relation file of the parent.
    Whole(Option<String>),
    Blocks(FileBlocks),
}

/// Whether `lsn` on timeline `tli` lies on `path` (the history of the server being backed up).
fn on_path(path: &[(TimelineId, Lsn)], tli: TimelineId, lsn: Lsn) -> bool {
    path.iter()
        .enumerate()
        .any(|(i, (t, begin))| *t == tli && lsn >= *begin && path.get(i + 1).is_none_or(|(_, next)| lsn < *next))
}

/// The parent and the map of the WAL since its start, or why this backup must be a full one.
pub(super) async fn base(
    repo: &Repository,
    opts: &IncrementalOptions,
    start: Lsn,
    tli: TimelineId,
    seg: WalSegSize,
    pg_wal: &Path,
) -> Result<Result<Base, String>, BackupError> {
    let inv = crate::wal::inventory(repo, false).await.map_err(|e| BackupError::Invalid(e.to_string()))?;
    let path = plan::path_to(&inv, tli);
    let parent = match &opts.parent {
        Some(reference) => {
            let m = resolve(repo, reference).await?;
            if !on_path(&path, m.timeline, m.start_lsn) || m.start_lsn >= start {
                return Err(BackupError::Invalid(format!(
                    "backup {} (timeline {}, start {}) is not in this server's history before its start {start} on \
                     timeline {tli}: give another --parent, or take a full backup",
                    m.id, m.timeline, m.start_lsn
                )));
            }
            m
        }
        None => {
            let newest = list(repo)
                .await?
                .into_iter()
                .filter(|b| b.status == Status::Done)
                .filter_map(|b| b.manifest.map(|m| (b.id, m)))
                .filter(|(_, m)| on_path(&path, m.timeline, m.start_lsn) && m.start_lsn < start)
                .max_by_key(|(_, m)| m.start_lsn);
            match newest {
                Some((id, _)) => load_manifest(repo, &id).await?,
                None => return Ok(Err("no DONE backup in this server's timeline history to build on".into())),
            }
        }
    };
    let chain: Vec<BackupId> = parent.chain.iter().cloned().chain([parent.id.clone()]).collect();
    if chain.len() > opts.max_chain {
        return Ok(Err(format!(
            "backup {} ends a chain of {} incremental backup(s); [backup] max_chain = {}",
            parent.id,
            chain.len() - 1,
            opts.max_chain
        )));
    }
    let mut notes = Vec::new();
    let tails = match (&opts.tails, repo.identity().await?) {
        (Some(t), Some(id)) => Some(t.join(id.system_identifier.to_string())),
        _ => None,
    };
    let wal = LocalWal { pg_wal, tails: tails.as_deref() };
    let map = range_map(repo, &inv, &path, parent.start_lsn, start, seg, wal, &mut notes).await;
    let parent_sizes = parent.files.iter().map(|f| (f.path.clone(), f.size)).collect();
    Ok(Ok(Base { parent, chain, map, parent_sizes, notes }))
}

/// A block map `wal-push` stored in a segment's metadata under `key` (`blocks`: the segment's own;
/// `blocks_head`: its predecessor's tail record's).
pub fn stored_map(meta: &serde_json::Value, key: &str) -> Option<BlockMap> {
    use base64::Engine;
    let text = meta.get(key)?.as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(text).ok()?;
    BlockMap::from_bytes(&bytes).ok()
}

/// The metadata value `wal-push` stores a segment's block map as.
pub fn map_metadata(map: &BlockMap) -> serde_json::Value {
    use base64::Engine;
    serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(map.to_bytes()))
}

/// The changed-block map of the WAL from `from` to `to` along `path` (see the module docs).
///
/// Each segment's stored maps (its own, and its predecessor's tail record's) tile the range; a
/// segment stored without them is decoded. What still no map covers (a boundary whose tail
/// record nobody mapped: the previous segment had left `pg_wal` when this one was pushed) is
/// decoded from the two segments around it, [`MAX_REPAIRS`] boundaries at most; beyond that, or
/// where the WAL cannot be read, the range is unknown.
#[allow(clippy::too_many_arguments)]
async fn range_map(
    repo: &Repository,
    inv: &plan::WalInventory,
    path: &[(TimelineId, Lsn)],
    from: Lsn,
    to: Lsn,
    seg: WalSegSize,
    wal: LocalWal<'_>,
    notes: &mut Vec<String>,
) -> BlockMap {
    let at = |s: SegNo| {
        let name = SegName::new(plan::tli_for(path, s, seg), s, seg);
        let archived = inv.segments.get(&name.tli).is_some_and(|m| m.contains_key(&s));
        WalAt { name, start: seg.start_lsn(s), archived }
    };
    let segnos: Vec<SegNo> =
        (seg.segno(from).0..=seg.segno(Lsn(to.0.saturating_sub(1).max(from.0))).0).map(SegNo).collect();
    type Found = (WalAt, Result<(Vec<BlockMap>, Source), String>);
    let found: Vec<Found> = futures::stream::iter(segnos)
        .map(|s| async move {
            let w = at(s);
            (w, segment_maps(repo, w, seg, wal).await)
        })
        .buffered(16)
        .collect()
        .await;
    let (mut decoded_archive, mut decoded_local) = (0, 0);
    let mut maps = Vec::with_capacity(found.len());
    for (w, r) in found {
        match r {
            Ok((m, how)) => {
                match how {
                    Source::Archive => decoded_archive += 1,
                    Source::PgWal => decoded_local += 1,
                    Source::Stored => {}
                }
                maps.extend(m)
            }
            Err(why) => {
                maps.push(BlockMap::unknown(w.start, Lsn(w.start.0 + seg.bytes()), format!("{}: {why}", w.name)))
            }
        }
    }
    // What no map covers yet: decode the segment there with the next one at hand.
    let holes = uncovered(&maps, from, to);
    let mut repaired = Vec::new();
    for (hole, _) in holes.iter().take(MAX_REPAIRS) {
        let s = seg.segno(*hole);
        let (this, next) = (at(s), at(SegNo(s.0 + 1)));
        let (a, b) =
            tokio::join!(segment_content(repo, this, seg, wal.pg_wal), segment_content(repo, next, seg, wal.pg_wal));
        if let (Ok((a, _)), Ok((b, _))) = (a, b) {
            let start = this.start;
            if let Ok(m) = crate::repo::cpu(move || crate::summary::segment_block_map(&a, start, Some(&b))).await {
                maps.push(m);
                repaired.push(this.name.to_string());
            }
        }
    }
    if decoded_archive > 0 {
        notes.push(format!("{decoded_archive} archived segment(s) stored without a block map were decoded"));
    }
    if decoded_local > 0 {
        notes.push(format!("{decoded_local} segment(s) not archived yet were decoded from pg_wal"));
    }
    if !repaired.is_empty() {
        notes.push(format!(
            "{} segment(s) whose tail record no stored map covered were decoded with the next: {}",
            repaired.len(),
            repaired.join(", ")
        ));
    }
    BlockMap::combine(&maps, from, to)
}

/// Segment boundaries decoded from the WAL itself at most, per backup.
const MAX_REPAIRS: usize = 64;

/// The WAL on this host: `pg_wal`, and the last pages `wal-push` kept of recent segments.
#[derive(Debug, Clone, Copy)]
struct LocalWal<'a> {
    pg_wal: &'a Path,
    tails: Option<&'a Path>,
}

/// A segment of the range, on the timeline the backup's history takes.
#[derive(Debug, Clone, Copy)]
struct WalAt {
    name: SegName,
    start: Lsn,
    archived: bool,
}

/// The parts of `[from, to)` that no map in `maps` covers.
fn uncovered(maps: &[BlockMap], from: Lsn, to: Lsn) -> Vec<(Lsn, Lsn)> {
    let mut ranges: Vec<(Lsn, Lsn)> = maps.iter().map(|m| (m.start, m.end)).filter(|(a, b)| a < b).collect();
    ranges.sort();
    let (mut covered, mut holes) = (from, Vec::new());
    for (a, b) in ranges {
        if covered >= to {
            break;
        }
        if a > covered {
            holes.push((covered, a.min(to)));
        }
        covered = covered.max(b);
    }
    if covered < to {
        holes.push((covered, to));
    }
    holes
}

/// Where a segment's map came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// Stored with the archived segment.
    Stored,
    /// Decoded from the archived segment.
    Archive,
    /// Decoded from the local `pg_wal`.
    PgWal,
}

/// A segment's content: archived (verified), else from `pg_wal` when whole.
async fn segment_content(
    repo: &Repository,
    w: WalAt,
    seg: WalSegSize,
    pg_wal: &Path,
) -> Result<(Bytes, Source), String> {
    if w.archived {
        match repo.get_object(&layout::wal_key(&WalFileName::Segment(w.name))).await {
            Ok(d) => return Ok((d.content, Source::Archive)),
            Err(e) => tracing::debug!("{}: {e}; trying pg_wal", w.name),
        }
    }
    let local = pg_wal.join(w.name.to_string());
    match tokio::fs::read(&local).await {
        Ok(bytes) if bytes.len() as u64 == seg.bytes() => Ok((bytes.into(), Source::PgWal)),
        Ok(_) => Err(format!("{} is not a whole segment", local.display())),
        Err(e) if w.archived => Err(format!("archived, but neither its block map nor its content could be read ({e})")),
        Err(_) => Err("neither archived nor in pg_wal".into()),
    }
}

/// One segment's maps: those stored with it (its own, and its predecessor's tail record's), else
/// its own decoded from its content.
async fn segment_maps(
    repo: &Repository,
    w: WalAt,
    seg: WalSegSize,
    wal: LocalWal<'_>,
) -> Result<(Vec<BlockMap>, Source), String> {
    if w.archived
        && let Ok((meta, _)) = repo.object_head(&layout::wal_key(&WalFileName::Segment(w.name))).await
        && let Some(map) = stored_map(&meta, "blocks")
    {
        let mut maps = vec![map];
        maps.extend(stored_map(&meta, "blocks_head"));
        return Ok((maps, Source::Stored));
    }
    let (content, source) = segment_content(repo, w, seg, wal.pg_wal).await?;
    let (start, local, name) = (w.start, wal.pg_wal.join(w.name.to_string()), w.name);
    let tails = wal.tails.map(Path::to_path_buf);
    crate::repo::cpu(move || {
        let mut maps = vec![crate::summary::segment_block_map(&content, start, None)?];
        // The previous segment's tail record, as wal-push would store it with this one.
        let segno = name.segno(seg).ok_or("not a segment of this size")?;
        maps.extend(crate::wal::previous_tail(&local, tails.as_deref(), name, seg, segno, &content));
        Ok((maps, source))
    })
    .await
}

impl Base {
    /// What to store of `rel` (`size` bytes now); `unlogged`: the relation has an init fork.
    pub(super) fn plan_file(&self, rel: &str, size: u64, unlogged: bool) -> FilePlan {
        let Some(p) = parse_relpath(rel) else { return FilePlan::Whole(None) };
        let Some(&prior) = self.parent_sizes.get(rel) else {
            return FilePlan::Whole(Some("not in the parent backup".into()));
        };
        let delta = match self.map.decide(p.rnode, p.fork, unlogged) {
            FileDecision::Whole(why) => {
                return FilePlan::Whole(Some(why.first().map(|w| w.to_string()).unwrap_or_default()));
            }
            FileDecision::Blocks(d) => d,
        };
        // Relation block numbers, as numbers within this segment file.
        let first = p.segno.saturating_mul(RELSEG_SIZE);
        let local = |b: u32| b.checked_sub(first).filter(|b| *b < RELSEG_SIZE);
        let changed = BlockSet::from_blocks(
            delta.changed.restrict(first, first.saturating_add(RELSEG_SIZE)).iter().filter_map(local).collect(),
        );
        let limit = delta.limit.map(|l| l.saturating_sub(first).min(RELSEG_SIZE));
        let file_delta = ForkDelta { changed, limit };
        let (prior_blocks, current_blocks) = ((prior / BLCKSZ) as u32, size.div_ceil(BLCKSZ) as u32);
        let copy = file_delta.blocks_to_copy(prior_blocks, current_blocks);
        if copy.len() >= current_blocks as u64 && current_blocks > 0 {
            return FilePlan::Whole(Some("every block changed".into()));
        }
        let tail = limit.map_or(prior_blocks, |l| l.min(prior_blocks));
        FilePlan::Blocks(FileBlocks { limit: tail, stored: BlockRanges(copy.ranges().to_vec()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_of_a_promoted_server() {
        let path = vec![(TimelineId(1), Lsn(0)), (TimelineId(2), Lsn(0x5000000))];
        assert!(on_path(&path, TimelineId(1), Lsn(0x4000000)));
        assert!(!on_path(&path, TimelineId(1), Lsn(0x6000000)), "after the switch, timeline 1 is another history");
        assert!(on_path(&path, TimelineId(2), Lsn(0x6000000)));
        assert!(!on_path(&path, TimelineId(3), Lsn(0x6000000)));
    }
}
