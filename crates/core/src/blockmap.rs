//! Changed-block maps: which relation blocks the WAL of an LSN range changed, and which relation
//! files it changed in other ways, for block-incremental backups.
//!
//! # What a map covers
//!
//! A [`BlockMap`] covers the WAL records that *begin* in `[start, end)`. The map of a segment
//! decoded alone ([`crate::summary::segment_block_map`] without the next segment) ends where the
//! record that continues into the next segment begins (`end` < the segment's end); the map of
//! that one record ([`crate::summary::tail_block_map`], or from the segment's last pages alone
//! [`crate::summary::tail_block_map_from_end`]) covers the rest, and a map made with the next
//! segment at hand covers the whole segment. Maps of consecutive ranges merge into the map
//! of their union ([`BlockMap::merge`], [`BlockMap::combine`]); a hole between them makes the
//! merged map *unknown*.
//!
//! # What a map holds
//!
//! - per relation ([`RelFileNode`]) and fork: the block numbers that records reference
//!   ([`BlockSet`]: sorted, deduplicated ranges), whatever the reference (image, data, init);
//! - per relation, in LSN order: fork creations (`XLOG_SMGR_CREATE`), truncations
//!   (`XLOG_SMGR_TRUNCATE`: the new length in main-fork blocks and the fork flags) and drops
//!   (the relation's files removed by a commit or abort);
//! - per database directory (tablespace, database), in LSN order: creations, by `FILE_COPY`
//!   (which logs no block of the copied files, and which `ALTER DATABASE SET TABLESPACE` uses
//!   too) or `WAL_LOG`, and drops;
//! - per tablespace: creations and drops; the databases whose `pg_filenode.map` was rewritten;
//! - *unknown*: records that may change relation files in ways the decoder does not know (see
//!   `walnut_pg::walrec`), holes between merged maps, a map written by a newer walnut. The first
//!   [`MAX_UNKNOWN`] reasons are kept, with a count of the rest.
//!
//! # What a caller may conclude ([`BlockMap::decide`])
//!
//! For a relation fork's file that exists both in a prior backup (whose WAL begins at `start`)
//! and now, with the merged map of `[prior backup's start, new backup's start)`, the file must be
//! copied whole when:
//!
//! - the map is unknown;
//! - the fork is the free space map (never fully WAL-logged) or the visibility map (its bits are
//!   cleared by heap changes that do not reference the VM page; its files are tiny: one page per
//!   32,672 heap pages);
//! - the relation is unlogged (it has an init fork) and this is not the init fork: its other
//!   forks are never WAL-logged (the caller says which relations are unlogged; PostgreSQL's own
//!   base backups leave those forks out, since recovery resets them from the init fork);
//! - the fork was created, or the relation dropped, in the range (a file that exists now is a new
//!   incarnation);
//! - its database directory was created (either strategy) or dropped in the range, or its
//!   tablespace created or dropped.
//!
//! Otherwise only blocks need copying ([`ForkDelta::blocks_to_copy`]): the changed blocks, every
//! block at or beyond the shortest length a truncation left the fork at (its *limit*; blocks
//! changed after a truncation are kept in the set as well), and every block at or beyond the
//! prior copy's length (relations grow by empty pages that are not logged). All of this is
//! monotone: more WAL never means less to copy, so merging maps in any grouping is safe and a
//! map covering more than the range asked for only copies more.
//!
//! Outside relation files, nothing here applies: non-relation files (`pg_xact`, `pg_multixact`,
//! `pg_filenode.map`, `PG_VERSION`, two-phase state files...) are copied whole. A file absent from
//! the prior backup is copied whole. Block numbers assume 8 kB pages.
//!
//! # The stored form ([`BlockMap::to_bytes`], version [`FORMAT_VERSION`])
//!
//! A fixed header that every version keeps: the magic `WNBM`, the format version (u16 LE), the
//! covered range `start`, `end` (u64 LE each); then the version's body; then a CRC-32C (u32 LE)
//! of everything before it. A reader checks the CRC, and for a version newer than it knows
//! returns a map of the header's range that is unknown ("written by a newer walnut"): never a
//! guess at the body. Version 1's body is unsigned LEB128 varints throughout, LSNs as offsets from
//! `start`:
//!
//! ```text
//! unknown_omitted, n, n × (lsn, len, UTF-8 reason)
//! n tablespaces × (spc, n, n × (lsn, kind 0 created | 1 dropped))
//! n databases × (spc, db, n, n × (lsn, kind 0 file copy, src spc, src db | 1 wal log | 2 dropped))
//! n relmap updates × (spc, db)
//! n relations × (spc, db, relfilenode,
//!                n events × (lsn, kind 0 created, fork | 1 truncated, blocks, flags | 2 dropped),
//!                n forks × (fork, n ranges × (gap, length - 1)))
//! ```
//!
//! Keys ascend strictly; a range's gap is its first block (the first range) or its distance from
//! the previous range's last block minus 2 (ranges never touch).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use walnut_pg::Lsn;
use walnut_pg::relpath::{ForkNumber, RelFileNode};
use walnut_pg::walrec::{Record, RelChange, SMGR_TRUNCATE_FSM, SMGR_TRUNCATE_HEAP, SMGR_TRUNCATE_VM};

/// The stored form's version this walnut writes and reads.
pub const FORMAT_VERSION: u16 = 1;
const MAGIC: &[u8; 4] = b"WNBM";
const HEADER_LEN: usize = 4 + 2 + 8 + 8;
/// How many unknown reasons a map keeps (the rest are counted).
pub const MAX_UNKNOWN: usize = 16;
/// Heap blocks one visibility-map page covers with 8 kB pages (`HEAPBLOCKS_PER_PAGE`).
pub const HEAPBLOCKS_PER_VM_PAGE: u32 = (8192 - 24) * 4;

/// A set of block numbers, as sorted inclusive ranges that neither overlap nor touch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct BlockSet {
    ranges: Vec<(u32, u32)>,
}

impl BlockSet {
    pub fn new() -> BlockSet {
        BlockSet::default()
    }

    /// The set of these blocks (any order, duplicates allowed).
    pub fn from_blocks(mut blocks: Vec<u32>) -> BlockSet {
        blocks.sort_unstable();
        blocks.dedup();
        let mut ranges: Vec<(u32, u32)> = Vec::new();
        for b in blocks {
            match ranges.last_mut() {
                Some((_, last)) if *last + 1 == b => *last = b,
                _ => ranges.push((b, b)),
            }
        }
        BlockSet { ranges }
    }

    /// Every block in `[first, last]`.
    pub fn range(first: u32, last: u32) -> BlockSet {
        BlockSet { ranges: if first <= last { vec![(first, last)] } else { vec![] } }
    }

    /// The inclusive ranges, ascending.
    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.ranges
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// How many blocks.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|&(a, b)| u64::from(b - a) + 1).sum()
    }

    pub fn contains(&self, block: u32) -> bool {
        let i = self.ranges.partition_point(|&(_, last)| last < block);
        self.ranges.get(i).is_some_and(|&(first, _)| first <= block)
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.ranges.iter().flat_map(|&(a, b)| a..=b)
    }

    pub fn union(&self, other: &BlockSet) -> BlockSet {
        let (mut a, mut b) = (self.ranges.iter().peekable(), other.ranges.iter().peekable());
        let mut out: Vec<(u32, u32)> = Vec::with_capacity(self.ranges.len() + other.ranges.len());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) => {
                    if x.0 <= y.0 {
                        a.next()
                    } else {
                        b.next()
                    }
                }
                (Some(_), None) => a.next(),
                (None, Some(_)) => b.next(),
                (None, None) => break,
            };
            let &(first, last) = next.expect("peeked");
            match out.last_mut() {
                Some((_, l)) if u64::from(first) <= u64::from(*l) + 1 => *l = (*l).max(last),
                _ => out.push((first, last)),
            }
        }
        BlockSet { ranges: out }
    }

    /// The blocks in `[from, to)`.
    pub fn restrict(&self, from: u32, to: u32) -> BlockSet {
        let ranges = self
            .ranges
            .iter()
            .filter(|&&(a, b)| b >= from && a < to)
            .map(|&(a, b)| (a.max(from), b.min(to - 1)))
            .collect();
        BlockSet { ranges }
    }
}

impl fmt::Display for BlockSet {
    /// `0-3,7,9-12`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(a, b)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if a == b { write!(f, "{a}")? } else { write!(f, "{a}-{b}")? }
        }
        Ok(())
    }
}

/// What happened to a relation's files, beyond its blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RelEventKind {
    /// A fork's file was created (`XLOG_SMGR_CREATE`).
    Created(ForkNumber),
    /// Truncated to `blocks` main-fork blocks, for the forks in `flags` (`SMGR_TRUNCATE_*`).
    Truncated { blocks: u32, flags: u32 },
    /// Every fork's files removed (at a commit or abort).
    Dropped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelEvent {
    pub lsn: Lsn,
    pub kind: RelEventKind,
}

/// One relation's changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelEntry {
    /// Referenced blocks per fork (forks 0..=3 only).
    pub forks: BTreeMap<ForkNumber, BlockSet>,
    /// Creations, truncations and drops, in LSN order.
    pub events: Vec<RelEvent>,
}

/// A database directory (tablespace, database).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DbDir {
    pub spc_node: u32,
    pub db_node: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DbEventKind {
    /// `XLOG_DBASE_CREATE_FILE_COPY`: copied from this directory, no block logged.
    CreatedFileCopy { src: DbDir },
    /// `XLOG_DBASE_CREATE_WAL_LOG`: created; its files' creations and blocks follow in the WAL.
    CreatedWalLog,
    /// `XLOG_DBASE_DROP`.
    Dropped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DbEvent {
    pub lsn: Lsn,
    pub kind: DbEventKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TablespaceEvent {
    pub lsn: Lsn,
    /// Created (`true`) or dropped.
    pub created: bool,
}

/// Why a map cannot vouch for what changed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Unknown {
    pub lsn: Lsn,
    pub reason: String,
}

/// The changes of the WAL records that begin in `[start, end)` (see the module docs).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockMap {
    pub start: Lsn,
    pub end: Lsn,
    pub relations: BTreeMap<RelFileNode, RelEntry>,
    pub databases: BTreeMap<DbDir, Vec<DbEvent>>,
    pub tablespaces: BTreeMap<u32, Vec<TablespaceEvent>>,
    /// Database directories whose `pg_filenode.map` was rewritten (`XLOG_RELMAP_UPDATE`).
    pub relmap_updates: BTreeSet<DbDir>,
    /// The first [`MAX_UNKNOWN`] reasons, in LSN order.
    pub unknown: Vec<Unknown>,
    /// How many more reasons there were.
    pub unknown_omitted: u64,
}

/// Why a relation fork's file must be copied whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WholeReason {
    /// The map cannot vouch for what changed.
    Unknown(Unknown),
    /// More unknown reasons than the map keeps.
    MoreUnknown(u64),
    /// Not a fork PostgreSQL has.
    InvalidFork(ForkNumber),
    FreeSpaceMap,
    VisibilityMap,
    Unlogged,
    ForkCreated(Lsn),
    RelationDropped(Lsn),
    DatabaseCreated {
        lsn: Lsn,
        file_copy: bool,
    },
    DatabaseDropped(Lsn),
    TablespaceCreated(Lsn),
    TablespaceDropped(Lsn),
}

impl fmt::Display for WholeReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WholeReason::Unknown(u) => write!(f, "unknown changes at {}: {}", u.lsn, u.reason),
            WholeReason::MoreUnknown(n) => write!(f, "{n} more unknown changes"),
            WholeReason::InvalidFork(k) => write!(f, "fork {} is not a PostgreSQL fork", k.0),
            WholeReason::FreeSpaceMap => f.write_str("the free space map is not WAL-logged"),
            WholeReason::VisibilityMap => {
                f.write_str("visibility map bits are cleared without block references in the WAL")
            }
            WholeReason::Unlogged => f.write_str("the relation is unlogged"),
            WholeReason::ForkCreated(l) => write!(f, "the fork was created at {l}"),
            WholeReason::RelationDropped(l) => write!(f, "the relation was dropped at {l}"),
            WholeReason::DatabaseCreated { lsn, file_copy: true } => {
                write!(f, "the database directory was copied from a template at {lsn} (FILE_COPY)")
            }
            WholeReason::DatabaseCreated { lsn, file_copy: false } => {
                write!(f, "the database directory was created at {lsn}")
            }
            WholeReason::DatabaseDropped(l) => write!(f, "the database directory was dropped at {l}"),
            WholeReason::TablespaceCreated(l) => write!(f, "the tablespace was created at {l}"),
            WholeReason::TablespaceDropped(l) => write!(f, "the tablespace was dropped at {l}"),
        }
    }
}

/// What changed in a relation fork that need not be copied whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForkDelta {
    /// Blocks referenced by the WAL.
    pub changed: BlockSet,
    /// The shortest length a truncation left the fork at: every block at or beyond it changed.
    pub limit: Option<u32>,
}

impl ForkDelta {
    /// The blocks of the current file (`current_blocks` long) to copy, when the prior backup's
    /// copy of it is `prior_blocks` long: the changed blocks, everything at or beyond the limit,
    /// everything at or beyond the prior copy's end. The rest comes from the prior backup.
    pub fn blocks_to_copy(&self, prior_blocks: u32, current_blocks: u32) -> BlockSet {
        let tail_from = self.limit.map_or(prior_blocks, |l| l.min(prior_blocks));
        let changed = self.changed.restrict(0, current_blocks);
        if tail_from < current_blocks {
            changed.union(&BlockSet::range(tail_from, current_blocks - 1))
        } else {
            changed
        }
    }
}

/// How to back up a relation fork's file ([`BlockMap::decide`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileDecision {
    /// Copy it whole, for every one of these reasons.
    Whole(Vec<WholeReason>),
    /// Copy only blocks.
    Blocks(ForkDelta),
}

impl BlockMap {
    /// An empty map of `[start, end)`.
    pub fn empty(start: Lsn, end: Lsn) -> BlockMap {
        BlockMap { start, end, ..Default::default() }
    }

    /// A map of `[start, end)` that vouches for nothing.
    pub fn unknown(start: Lsn, end: Lsn, reason: impl Into<String>) -> BlockMap {
        let mut m = BlockMap::empty(start, end);
        m.unknown.push(Unknown { lsn: start, reason: reason.into() });
        m
    }

    pub fn is_unknown(&self) -> bool {
        !self.unknown.is_empty() || self.unknown_omitted > 0
    }

    /// The blocks of a relation fork referenced in this map's range.
    pub fn fork_blocks(&self, rnode: RelFileNode, fork: ForkNumber) -> Option<&BlockSet> {
        self.relations.get(&rnode)?.forks.get(&fork)
    }

    fn add_unknown(&mut self, u: Unknown) {
        if self.unknown.len() < MAX_UNKNOWN {
            self.unknown.push(u);
        } else {
            self.unknown_omitted += 1;
        }
    }

    /// Merges `other` into this map: the union of both, covering both ranges. Merge maps of
    /// consecutive (or overlapping) ranges; a hole between the two ranges makes the result
    /// unknown. [`BlockMap::combine`] merges any number in LSN order.
    pub fn merge(&mut self, other: &BlockMap) {
        let hole = if other.start > self.end {
            Some((self.end, other.start))
        } else if self.start > other.end {
            Some((other.end, self.start))
        } else {
            None
        };
        self.union(other);
        if let Some((a, b)) = hole {
            self.add_unknown(Unknown { lsn: a, reason: format!("no map covers the WAL from {a} to {b}") });
            self.normalize_unknown();
        }
    }

    fn union(&mut self, other: &BlockMap) {
        self.start = self.start.min(other.start);
        self.end = self.end.max(other.end);
        for (rnode, e) in &other.relations {
            let mine = self.relations.entry(*rnode).or_default();
            for (fork, set) in &e.forks {
                let merged = match mine.forks.get(fork) {
                    Some(s) => s.union(set),
                    None => set.clone(),
                };
                mine.forks.insert(*fork, merged);
            }
            sorted_union(&mut mine.events, &e.events);
        }
        for (dir, evs) in &other.databases {
            sorted_union(self.databases.entry(*dir).or_default(), evs);
        }
        for (spc, evs) in &other.tablespaces {
            sorted_union(self.tablespaces.entry(*spc).or_default(), evs);
        }
        self.relmap_updates.extend(other.relmap_updates.iter().copied());
        self.unknown_omitted += other.unknown_omitted;
        self.unknown.extend(other.unknown.iter().cloned());
        self.normalize_unknown();
    }

    fn normalize_unknown(&mut self) {
        self.unknown.sort();
        self.unknown.dedup();
        if self.unknown.len() > MAX_UNKNOWN {
            self.unknown_omitted += (self.unknown.len() - MAX_UNKNOWN) as u64;
            self.unknown.truncate(MAX_UNKNOWN);
        }
    }

    /// The map of `[from, to)` from maps of any ranges (in any order): the union of those that
    /// overlap it, unknown where none covers part of it. Maps reaching beyond the range are
    /// used whole (more to copy, never less).
    pub fn combine(maps: &[BlockMap], from: Lsn, to: Lsn) -> BlockMap {
        let mut relevant: Vec<&BlockMap> = maps.iter().filter(|m| m.start < to && m.end > from).collect();
        relevant.sort_by_key(|m| (m.start, m.end));
        let mut out = BlockMap::empty(from, to);
        let mut covered = from;
        let mut holes = vec![];
        for m in relevant {
            if m.start > covered {
                holes.push((covered, m.start));
            }
            covered = covered.max(m.end);
            out.union(m);
        }
        if covered < to {
            holes.push((covered, to));
        }
        for (a, b) in holes {
            out.add_unknown(Unknown { lsn: a, reason: format!("no map covers the WAL from {a} to {b}") });
        }
        out.normalize_unknown();
        out
    }

    /// How to back up a relation fork's file, given this map of the WAL between the prior
    /// backup's start and the new backup's start. `unlogged`: the relation has an init fork.
    pub fn decide(&self, rnode: RelFileNode, fork: ForkNumber, unlogged: bool) -> FileDecision {
        let mut why: Vec<WholeReason> = self.unknown.iter().cloned().map(WholeReason::Unknown).collect();
        if self.unknown_omitted > 0 {
            why.push(WholeReason::MoreUnknown(self.unknown_omitted));
        }
        match fork {
            ForkNumber::FSM => why.push(WholeReason::FreeSpaceMap),
            ForkNumber::VISIBILITYMAP => why.push(WholeReason::VisibilityMap),
            f if !f.is_valid() => why.push(WholeReason::InvalidFork(f)),
            _ => {}
        }
        if unlogged && fork != ForkNumber::INIT {
            why.push(WholeReason::Unlogged);
        }
        for e in self.tablespaces.get(&rnode.spc_node).into_iter().flatten() {
            why.push(if e.created {
                WholeReason::TablespaceCreated(e.lsn)
            } else {
                WholeReason::TablespaceDropped(e.lsn)
            });
        }
        let dir = DbDir { spc_node: rnode.spc_node, db_node: rnode.db_node };
        for e in self.databases.get(&dir).into_iter().flatten() {
            why.push(match e.kind {
                DbEventKind::CreatedFileCopy { .. } => WholeReason::DatabaseCreated { lsn: e.lsn, file_copy: true },
                DbEventKind::CreatedWalLog => WholeReason::DatabaseCreated { lsn: e.lsn, file_copy: false },
                DbEventKind::Dropped => WholeReason::DatabaseDropped(e.lsn),
            });
        }
        let entry = self.relations.get(&rnode);
        let mut limit: Option<u32> = None;
        for e in entry.map(|e| e.events.as_slice()).unwrap_or_default() {
            match e.kind {
                RelEventKind::Created(f) if f == fork => why.push(WholeReason::ForkCreated(e.lsn)),
                RelEventKind::Created(_) => {}
                RelEventKind::Dropped => why.push(WholeReason::RelationDropped(e.lsn)),
                RelEventKind::Truncated { blocks, flags } => {
                    let l = match fork {
                        ForkNumber::MAIN if flags & SMGR_TRUNCATE_HEAP != 0 => Some(blocks),
                        ForkNumber::VISIBILITYMAP if flags & SMGR_TRUNCATE_VM != 0 => {
                            Some(blocks / HEAPBLOCKS_PER_VM_PAGE)
                        }
                        ForkNumber::FSM if flags & SMGR_TRUNCATE_FSM != 0 => Some(0),
                        _ => None,
                    };
                    if let Some(l) = l {
                        limit = Some(limit.map_or(l, |m| m.min(l)));
                    }
                }
            }
        }
        if !why.is_empty() {
            return FileDecision::Whole(why);
        }
        let changed = entry.and_then(|e| e.forks.get(&fork)).cloned().unwrap_or_default();
        FileDecision::Blocks(ForkDelta { changed, limit })
    }
}

fn sorted_union<T: Ord + Clone>(into: &mut Vec<T>, from: &[T]) {
    into.extend(from.iter().cloned());
    into.sort();
    into.dedup();
}

type ForkKey = (RelFileNode, ForkNumber);

/// A quick hasher for fork keys (which come from CRC-checked WAL, not from an adversary).
#[derive(Debug, Default)]
struct KeyHasher(u64);

impl KeyHasher {
    fn add(&mut self, x: u64) {
        self.0 = (self.0.rotate_left(5) ^ x).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        bytes.iter().for_each(|&b| self.add(u64::from(b)));
    }
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }
}

/// Blocks below this are collected in a bitmap (at most 512 kB per fork), the rest in a list.
const BITMAP_BLOCKS: u32 = 1 << 22;

/// The blocks of one fork while building: a bitmap for the low ones (no sorting at the end),
/// a list (sorted at the end) for the rest.
#[derive(Debug, Default)]
struct Blocks {
    bits: Vec<u64>,
    high: Vec<u32>,
}

impl Blocks {
    fn insert(&mut self, b: u32) {
        if b < BITMAP_BLOCKS {
            let w = (b / 64) as usize;
            if w >= self.bits.len() {
                self.bits.resize(w + 1, 0);
            }
            self.bits[w] |= 1 << (b % 64);
        } else if self.high.last() != Some(&b) {
            self.high.push(b);
        }
    }

    fn into_set(self) -> BlockSet {
        let mut ranges: Vec<(u32, u32)> = Vec::new();
        for (w, &word) in self.bits.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let bit = word.trailing_zeros();
                let b = w as u32 * 64 + bit;
                match ranges.last_mut() {
                    Some((_, last)) if *last + 1 == b => *last = b,
                    _ => ranges.push((b, b)),
                }
                word &= word - 1;
            }
        }
        let low = BlockSet { ranges };
        if self.high.is_empty() { low } else { low.union(&BlockSet::from_blocks(self.high)) }
    }
}

/// Builds the map of a range from the decoder's records (`walnut_pg::walrec::Record`).
#[derive(Debug, Default)]
pub struct BlockMapBuilder {
    /// Per fork, the blocks referenced so far.
    slots: Vec<(ForkKey, Blocks)>,
    index: HashMap<ForkKey, usize, std::hash::BuildHasherDefault<KeyHasher>>,
    /// The slots used last, most recent first: records reference a few relations in turn.
    recent: Vec<usize>,
    map: BlockMap,
}

impl BlockMapBuilder {
    pub fn new() -> BlockMapBuilder {
        BlockMapBuilder::default()
    }

    fn slot(&mut self, key: ForkKey) -> usize {
        if let Some(pos) = self.recent.iter().position(|&i| self.slots[i].0 == key) {
            self.recent[..=pos].rotate_right(1);
            return self.recent[0];
        }
        let i = match self.index.get(&key) {
            Some(&i) => i,
            None => {
                self.slots.push((key, Blocks::default()));
                self.index.insert(key, self.slots.len() - 1);
                self.slots.len() - 1
            }
        };
        if self.recent.len() == 4 {
            self.recent.pop();
        }
        self.recent.insert(0, i);
        i
    }

    /// Adds one record's block references and relation changes.
    pub fn add(&mut self, rec: &Record<'_>) {
        for b in rec.blocks {
            if !b.fork.is_valid() {
                // The decoder reports it as unknown.
                continue;
            }
            let i = self.slot((b.rnode, b.fork));
            self.slots[i].1.insert(b.block);
        }
        let lsn = rec.lsn;
        for c in rec.changes {
            let rel = |m: &mut BlockMap, rnode: RelFileNode, kind| {
                m.relations.entry(rnode).or_default().events.push(RelEvent { lsn, kind })
            };
            match c {
                RelChange::Create { rnode, fork } => rel(&mut self.map, *rnode, RelEventKind::Created(*fork)),
                RelChange::Truncate { rnode, blocks, flags } => {
                    rel(&mut self.map, *rnode, RelEventKind::Truncated { blocks: *blocks, flags: *flags })
                }
                RelChange::Drop { rnode, .. } => rel(&mut self.map, *rnode, RelEventKind::Dropped),
                RelChange::DatabaseCreateFileCopy { db_id, tablespace_id, src_db_id, src_tablespace_id } => {
                    let src = DbDir { spc_node: *src_tablespace_id, db_node: *src_db_id };
                    self.db(*tablespace_id, *db_id, DbEvent { lsn, kind: DbEventKind::CreatedFileCopy { src } });
                }
                RelChange::DatabaseCreateWalLog { db_id, tablespace_id } => {
                    self.db(*tablespace_id, *db_id, DbEvent { lsn, kind: DbEventKind::CreatedWalLog });
                }
                RelChange::DatabaseDrop { db_id, tablespace_ids } => {
                    for spc in tablespace_ids {
                        self.db(*spc, *db_id, DbEvent { lsn, kind: DbEventKind::Dropped });
                    }
                }
                RelChange::TablespaceCreate { ts_id, .. } => {
                    self.map.tablespaces.entry(*ts_id).or_default().push(TablespaceEvent { lsn, created: true })
                }
                RelChange::TablespaceDrop { ts_id } => {
                    self.map.tablespaces.entry(*ts_id).or_default().push(TablespaceEvent { lsn, created: false })
                }
                RelChange::RelmapUpdate { db_id, tablespace_id } => {
                    self.map.relmap_updates.insert(DbDir { spc_node: *tablespace_id, db_node: *db_id });
                }
                RelChange::Unknown { reason } => {
                    let rmgr = rec.rmgr_name().unwrap_or("unknown resource manager");
                    self.map.add_unknown(Unknown { lsn, reason: format!("{rmgr} record: {reason}") })
                }
            }
        }
    }

    fn db(&mut self, spc: u32, db: u32, e: DbEvent) {
        self.map.databases.entry(DbDir { spc_node: spc, db_node: db }).or_default().push(e);
    }

    /// The map of `[start, end)` (the range the added records begin in).
    pub fn finish(self, start: Lsn, end: Lsn) -> BlockMap {
        let mut map = self.map;
        map.start = start;
        map.end = end;
        for ((rnode, fork), blocks) in self.slots {
            map.relations.entry(rnode).or_default().forks.insert(fork, blocks.into_set());
        }
        for e in map.relations.values_mut() {
            e.events.sort();
            e.events.dedup();
        }
        for evs in map.databases.values_mut() {
            evs.sort();
            evs.dedup();
        }
        for evs in map.tablespaces.values_mut() {
            evs.sort();
            evs.dedup();
        }
        map.normalize_unknown();
        map
    }
}

/// A stored map that does not read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockMapError {
    #[error("not a block map (bad magic)")]
    Magic,
    #[error("block map fails its CRC check")]
    Crc,
    #[error("block map is truncated or corrupt: {0}")]
    Corrupt(&'static str),
}

struct Writer {
    buf: Vec<u8>,
    start: Lsn,
}

impl Writer {
    fn v(&mut self, mut x: u64) {
        loop {
            let byte = (x & 0x7F) as u8;
            x >>= 7;
            if x == 0 {
                self.buf.push(byte);
                return;
            }
            self.buf.push(byte | 0x80);
        }
    }

    fn lsn(&mut self, l: Lsn) {
        self.v(l.0.wrapping_sub(self.start.0));
    }
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    start: Lsn,
}

type R<T> = Result<T, BlockMapError>;

impl Reader<'_> {
    fn v(&mut self) -> R<u64> {
        let mut x = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.b.get(self.pos).ok_or(BlockMapError::Corrupt("truncated"))?;
            self.pos += 1;
            let bits = u64::from(byte & 0x7F);
            if shift == 63 && bits > 1 {
                return Err(BlockMapError::Corrupt("varint overflows"));
            }
            x |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(x);
            }
        }
        Err(BlockMapError::Corrupt("varint too long"))
    }

    fn v32(&mut self) -> R<u32> {
        u32::try_from(self.v()?).map_err(|_| BlockMapError::Corrupt("value above 32 bits"))
    }

    /// A count of items each at least one byte long.
    fn count(&mut self) -> R<usize> {
        let n = self.v()?;
        if n > (self.b.len() - self.pos) as u64 {
            return Err(BlockMapError::Corrupt("count runs past the end"));
        }
        Ok(n as usize)
    }

    fn lsn(&mut self) -> R<Lsn> {
        Ok(Lsn(self.start.0.wrapping_add(self.v()?)))
    }

    fn fork(&mut self) -> R<ForkNumber> {
        let f = self.v()?;
        if f > u64::from(ForkNumber::MAX.0) {
            return Err(BlockMapError::Corrupt("invalid fork"));
        }
        Ok(ForkNumber(f as u8))
    }
}

fn ascending<T: Ord>(prev: &Option<T>, next: &T) -> R<()> {
    match prev {
        Some(p) if p >= next => Err(BlockMapError::Corrupt("keys out of order")),
        _ => Ok(()),
    }
}

impl BlockMap {
    /// The stored form (see the module docs).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut w = Writer { buf: Vec::with_capacity(64), start: self.start };
        w.buf.extend(MAGIC);
        w.buf.extend(FORMAT_VERSION.to_le_bytes());
        w.buf.extend(self.start.0.to_le_bytes());
        w.buf.extend(self.end.0.to_le_bytes());
        w.v(self.unknown_omitted);
        w.v(self.unknown.len() as u64);
        for u in &self.unknown {
            w.lsn(u.lsn);
            w.v(u.reason.len() as u64);
            w.buf.extend(u.reason.as_bytes());
        }
        w.v(self.tablespaces.len() as u64);
        for (spc, evs) in &self.tablespaces {
            w.v(u64::from(*spc));
            w.v(evs.len() as u64);
            for e in evs {
                w.lsn(e.lsn);
                w.v(if e.created { 0 } else { 1 });
            }
        }
        w.v(self.databases.len() as u64);
        for (dir, evs) in &self.databases {
            w.v(u64::from(dir.spc_node));
            w.v(u64::from(dir.db_node));
            w.v(evs.len() as u64);
            for e in evs {
                w.lsn(e.lsn);
                match e.kind {
                    DbEventKind::CreatedFileCopy { src } => {
                        w.v(0);
                        w.v(u64::from(src.spc_node));
                        w.v(u64::from(src.db_node));
                    }
                    DbEventKind::CreatedWalLog => w.v(1),
                    DbEventKind::Dropped => w.v(2),
                }
            }
        }
        w.v(self.relmap_updates.len() as u64);
        for d in &self.relmap_updates {
            w.v(u64::from(d.spc_node));
            w.v(u64::from(d.db_node));
        }
        w.v(self.relations.len() as u64);
        for (r, e) in &self.relations {
            w.v(u64::from(r.spc_node));
            w.v(u64::from(r.db_node));
            w.v(u64::from(r.rel_node));
            w.v(e.events.len() as u64);
            for ev in &e.events {
                w.lsn(ev.lsn);
                match ev.kind {
                    RelEventKind::Created(f) => {
                        w.v(0);
                        w.v(u64::from(f.0));
                    }
                    RelEventKind::Truncated { blocks, flags } => {
                        w.v(1);
                        w.v(u64::from(blocks));
                        w.v(u64::from(flags));
                    }
                    RelEventKind::Dropped => w.v(2),
                }
            }
            w.v(e.forks.len() as u64);
            for (f, set) in &e.forks {
                w.v(u64::from(f.0));
                w.v(set.ranges.len() as u64);
                let mut prev: Option<u32> = None;
                for &(a, b) in &set.ranges {
                    w.v(match prev {
                        None => u64::from(a),
                        Some(p) => u64::from(a) - u64::from(p) - 2,
                    });
                    w.v(u64::from(b - a));
                    prev = Some(b);
                }
            }
        }
        let crc = crc32c::crc32c(&w.buf);
        w.buf.extend(crc.to_le_bytes());
        w.buf
    }

    /// Reads a stored map. A map written in a newer format than this walnut reads comes back as
    /// an unknown map of its range; damage is an error (which a caller must treat as unknown).
    pub fn from_bytes(bytes: &[u8]) -> Result<BlockMap, BlockMapError> {
        if bytes.len() < 4 || &bytes[..4] != MAGIC {
            return Err(BlockMapError::Magic);
        }
        if bytes.len() < HEADER_LEN + 4 {
            return Err(BlockMapError::Corrupt("shorter than its header"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return Err(BlockMapError::Crc);
        }
        let version = u16::from_le_bytes([body[4], body[5]]);
        let start = Lsn(u64::from_le_bytes(body[6..14].try_into().expect("8 bytes")));
        let end = Lsn(u64::from_le_bytes(body[14..22].try_into().expect("8 bytes")));
        if version > FORMAT_VERSION {
            return Ok(BlockMap::unknown(
                start,
                end,
                format!("the block map is in format {version}, newer than this walnut reads ({FORMAT_VERSION})"),
            ));
        }
        if version == 0 {
            return Err(BlockMapError::Corrupt("format version 0"));
        }
        let mut r = Reader { b: body, pos: HEADER_LEN, start };
        let mut m = BlockMap::empty(start, end);
        m.unknown_omitted = r.v()?;
        for _ in 0..r.count()? {
            let lsn = r.lsn()?;
            let len = r.count()?;
            let raw = &r.b[r.pos..r.pos + len];
            r.pos += len;
            let reason = String::from_utf8(raw.to_vec()).map_err(|_| BlockMapError::Corrupt("reason not UTF-8"))?;
            m.unknown.push(Unknown { lsn, reason });
        }
        let mut prev = None;
        for _ in 0..r.count()? {
            let spc = r.v32()?;
            ascending(&prev, &spc)?;
            prev = Some(spc);
            let mut evs = vec![];
            for _ in 0..r.count()? {
                let lsn = r.lsn()?;
                let created = match r.v()? {
                    0 => true,
                    1 => false,
                    _ => return Err(BlockMapError::Corrupt("invalid tablespace event")),
                };
                evs.push(TablespaceEvent { lsn, created });
            }
            m.tablespaces.insert(spc, evs);
        }
        let mut prev = None;
        for _ in 0..r.count()? {
            let dir = DbDir { spc_node: r.v32()?, db_node: r.v32()? };
            ascending(&prev, &dir)?;
            prev = Some(dir);
            let mut evs = vec![];
            for _ in 0..r.count()? {
                let lsn = r.lsn()?;
                let kind = match r.v()? {
                    0 => DbEventKind::CreatedFileCopy { src: DbDir { spc_node: r.v32()?, db_node: r.v32()? } },
                    1 => DbEventKind::CreatedWalLog,
                    2 => DbEventKind::Dropped,
                    _ => return Err(BlockMapError::Corrupt("invalid database event")),
                };
                evs.push(DbEvent { lsn, kind });
            }
            m.databases.insert(dir, evs);
        }
        let mut prev = None;
        for _ in 0..r.count()? {
            let dir = DbDir { spc_node: r.v32()?, db_node: r.v32()? };
            ascending(&prev, &dir)?;
            prev = Some(dir);
            m.relmap_updates.insert(dir);
        }
        let mut prev = None;
        for _ in 0..r.count()? {
            let rnode = RelFileNode { spc_node: r.v32()?, db_node: r.v32()?, rel_node: r.v32()? };
            ascending(&prev, &rnode)?;
            prev = Some(rnode);
            let mut e = RelEntry::default();
            for _ in 0..r.count()? {
                let lsn = r.lsn()?;
                let kind = match r.v()? {
                    0 => RelEventKind::Created(r.fork()?),
                    1 => RelEventKind::Truncated { blocks: r.v32()?, flags: r.v32()? },
                    2 => RelEventKind::Dropped,
                    _ => return Err(BlockMapError::Corrupt("invalid relation event")),
                };
                e.events.push(RelEvent { lsn, kind });
            }
            let mut prev_fork = None;
            for _ in 0..r.count()? {
                let fork = r.fork()?;
                ascending(&prev_fork, &fork)?;
                prev_fork = Some(fork);
                let n = r.count()?;
                let mut ranges = Vec::with_capacity(n);
                let mut last: Option<u32> = None;
                for _ in 0..n {
                    let gap = r.v()?;
                    let len = r.v()?;
                    let first = match last {
                        None => gap,
                        Some(l) => u64::from(l) + 2 + gap,
                    };
                    let end = first + len;
                    if end > u64::from(u32::MAX) {
                        return Err(BlockMapError::Corrupt("block number above 32 bits"));
                    }
                    ranges.push((first as u32, end as u32));
                    last = Some(end as u32);
                }
                e.forks.insert(fork, BlockSet { ranges });
            }
            m.relations.insert(rnode, e);
        }
        if r.pos != body.len() {
            return Err(BlockMapError::Corrupt("trailing bytes"));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use walnut_pg::walrec::{BlockRef, XactKind};

    const R1: RelFileNode = RelFileNode { spc_node: 1663, db_node: 5, rel_node: 16384 };
    const R2: RelFileNode = RelFileNode { spc_node: 1663, db_node: 5, rel_node: 16390 };

    fn bref(id: u8, rnode: RelFileNode, fork: ForkNumber, block: u32) -> BlockRef {
        BlockRef { id, rnode, fork, block, flags: 0, data_len: 0, image: None }
    }

    fn rec<'a>(lsn: u64, blocks: &'a [BlockRef], changes: &'a [RelChange]) -> Record<'a> {
        Record { lsn: Lsn(lsn), end: Lsn(lsn + 50), rmid: 10, info: 0, xid: 1, blocks, changes }
    }

    fn map_of(start: u64, end: u64, recs: &[Record<'_>]) -> BlockMap {
        let mut b = BlockMapBuilder::new();
        for r in recs {
            b.add(r);
        }
        b.finish(Lsn(start), Lsn(end))
    }

    fn blocks_of(d: &FileDecision) -> (Vec<u32>, Option<u32>) {
        match d {
            FileDecision::Blocks(fd) => (fd.changed.iter().collect(), fd.limit),
            FileDecision::Whole(w) => panic!("whole: {w:?}"),
        }
    }

    #[test]
    fn block_sets() {
        let s = BlockSet::from_blocks(vec![5, 3, 4, 9, 3, 11, 10, 0]);
        assert_eq!(s.ranges(), &[(0, 0), (3, 5), (9, 11)]);
        assert_eq!(s.to_string(), "0,3-5,9-11");
        assert_eq!(s.len(), 7);
        assert!(s.contains(4) && !s.contains(6) && s.contains(0) && !s.contains(12));
        let t = BlockSet::from_blocks(vec![1, 6, 7, 8, u32::MAX]);
        assert_eq!(s.union(&t).ranges(), &[(0, 1), (3, 11), (u32::MAX, u32::MAX)]);
        assert_eq!(s.restrict(4, 10).ranges(), &[(4, 5), (9, 9)]);
        let delta = ForkDelta { changed: BlockSet::from_blocks(vec![2, 40]), limit: Some(10) };
        // Changed blocks within the file, and everything from the limit on.
        assert_eq!(delta.blocks_to_copy(20, 15).to_string(), "2,10-14");
        // Growth beyond the prior copy without a truncation.
        let delta = ForkDelta { changed: BlockSet::from_blocks(vec![2]), limit: None };
        assert_eq!(delta.blocks_to_copy(8, 12).to_string(), "2,8-11");
        assert_eq!(delta.blocks_to_copy(8, 8).to_string(), "2");
    }

    #[test]
    fn collected_blocks_low_and_high() {
        let mut b = Blocks::default();
        let input =
            [5, 3, 64, 63, 65, 3, BITMAP_BLOCKS - 1, BITMAP_BLOCKS, BITMAP_BLOCKS + 1, u32::MAX, 9, BITMAP_BLOCKS];
        for x in input {
            b.insert(x);
        }
        assert_eq!(b.into_set(), BlockSet::from_blocks(input.to_vec()));
    }

    #[test]
    fn a_segment_map_and_its_decisions() {
        let b1 = [bref(0, R1, ForkNumber::MAIN, 7), bref(1, R1, ForkNumber::VISIBILITYMAP, 0)];
        let b2 = [bref(0, R1, ForkNumber::MAIN, 3), bref(1, R1, ForkNumber::MAIN, 8)];
        let trunc = [RelChange::Truncate { rnode: R1, blocks: 5, flags: SMGR_TRUNCATE_HEAP | SMGR_TRUNCATE_VM }];
        let b3 = [bref(0, R1, ForkNumber::MAIN, 6)];
        let create = [RelChange::Create { rnode: R2, fork: ForkNumber::MAIN }];
        let b4 = [bref(0, R2, ForkNumber::MAIN, 0)];
        let m = map_of(
            0x100000,
            0x200000,
            &[
                rec(0x100028, &b1, &[]),
                rec(0x100100, &b2, &[]),
                rec(0x100200, &[], &trunc),
                rec(0x100300, &b3, &[]),
                rec(0x100400, &b4, &create),
            ],
        );
        assert!(!m.is_unknown());
        assert_eq!(m.fork_blocks(R1, ForkNumber::MAIN).unwrap().to_string(), "3,6-8");
        // Block 6 changed after the truncation to 5 is still listed, and everything from 5 on
        // counts as changed anyway.
        assert_eq!(blocks_of(&m.decide(R1, ForkNumber::MAIN, false)), (vec![3, 6, 7, 8], Some(5)));
        let FileDecision::Blocks(d) = m.decide(R1, ForkNumber::MAIN, false) else { panic!() };
        assert_eq!(d.blocks_to_copy(9, 7).to_string(), "3,5-6");
        assert_eq!(
            m.decide(R1, ForkNumber::VISIBILITYMAP, false),
            FileDecision::Whole(vec![WholeReason::VisibilityMap])
        );
        assert_eq!(m.decide(R1, ForkNumber::FSM, false), FileDecision::Whole(vec![WholeReason::FreeSpaceMap]));
        assert_eq!(m.decide(R1, ForkNumber::MAIN, true), FileDecision::Whole(vec![WholeReason::Unlogged]));
        assert_eq!(blocks_of(&m.decide(R1, ForkNumber::INIT, true)), (vec![], None));
        assert_eq!(
            m.decide(R2, ForkNumber::MAIN, false),
            FileDecision::Whole(vec![WholeReason::ForkCreated(Lsn(0x100400))])
        );
        // An untouched relation: nothing to copy but growth.
        let other = RelFileNode { rel_node: 99999, ..R1 };
        assert_eq!(blocks_of(&m.decide(other, ForkNumber::MAIN, false)), (vec![], None));
    }

    #[test]
    fn database_tablespace_drop_and_unknown_decisions() {
        let changes = [
            RelChange::DatabaseCreateFileCopy {
                db_id: 16401,
                tablespace_id: 1663,
                src_db_id: 1,
                src_tablespace_id: 1663,
            },
            RelChange::DatabaseDrop { db_id: 16402, tablespace_ids: vec![1663, 16385] },
            RelChange::TablespaceCreate { ts_id: 16500, path: "/x".into() },
            RelChange::Drop { rnode: R1, kind: XactKind::Commit },
            RelChange::RelmapUpdate { db_id: 5, tablespace_id: 1663 },
        ];
        let m = map_of(0, 1000, &[rec(10, &[], &changes)]);
        let in_db = |db, spc| RelFileNode { spc_node: spc, db_node: db, rel_node: 1259 };
        assert_eq!(
            m.decide(in_db(16401, 1663), ForkNumber::MAIN, false),
            FileDecision::Whole(vec![WholeReason::DatabaseCreated { lsn: Lsn(10), file_copy: true }])
        );
        assert_eq!(
            m.decide(in_db(16402, 16385), ForkNumber::MAIN, false),
            FileDecision::Whole(vec![WholeReason::DatabaseDropped(Lsn(10))])
        );
        assert_eq!(
            m.decide(in_db(5, 16500), ForkNumber::MAIN, false),
            FileDecision::Whole(vec![WholeReason::TablespaceCreated(Lsn(10))])
        );
        assert_eq!(
            m.decide(R1, ForkNumber::INIT, false),
            FileDecision::Whole(vec![WholeReason::RelationDropped(Lsn(10))])
        );
        assert!(m.relmap_updates.contains(&DbDir { spc_node: 1663, db_node: 5 }));
        // Anything unknown: every file whole.
        let u = [RelChange::Unknown { reason: "custom".into() }];
        let m = map_of(0, 1000, &[rec(20, &[], &u)]);
        assert!(m.is_unknown());
        let FileDecision::Whole(w) = m.decide(R2, ForkNumber::MAIN, false) else { panic!() };
        assert!(w[0].to_string().contains("custom"), "{}", w[0]);
    }

    #[test]
    fn unknown_reasons_are_capped_and_counted() {
        let u = [RelChange::Unknown { reason: "x".into() }];
        let recs: Vec<Record<'_>> = (0..40).map(|i| rec(100 + i * 8, &[], &u)).collect();
        let m = map_of(0, 1000, &recs);
        assert_eq!((m.unknown.len(), m.unknown_omitted), (MAX_UNKNOWN, 40 - MAX_UNKNOWN as u64));
        let m2 = BlockMap::from_bytes(&m.to_bytes()).unwrap();
        assert_eq!(m2, m);
    }

    #[test]
    fn merging_consecutive_maps_and_holes() {
        let b = [bref(0, R1, ForkNumber::MAIN, 1)];
        let c = [bref(0, R1, ForkNumber::MAIN, 2)];
        let d = [RelChange::Drop { rnode: R1, kind: XactKind::Commit }];
        let create = [RelChange::Create { rnode: R1, fork: ForkNumber::MAIN }];
        let a = map_of(0, 100, &[rec(10, &b, &d)]);
        let bm = map_of(100, 200, &[rec(150, &c, &create)]);
        let mut ab = a.clone();
        ab.merge(&bm);
        assert_eq!((ab.start, ab.end, ab.is_unknown()), (Lsn(0), Lsn(200), false));
        assert_eq!(ab.fork_blocks(R1, ForkNumber::MAIN).unwrap().to_string(), "1-2");
        assert_eq!(
            ab.relations[&R1].events,
            vec![
                RelEvent { lsn: Lsn(10), kind: RelEventKind::Dropped },
                RelEvent { lsn: Lsn(150), kind: RelEventKind::Created(ForkNumber::MAIN) }
            ]
        );
        // Either order gives the same map.
        let mut ba = bm.clone();
        ba.merge(&a);
        assert_eq!(ab, ba);
        // A hole makes it unknown.
        let far = map_of(300, 400, &[]);
        let mut x = ab.clone();
        x.merge(&far);
        assert!(x.is_unknown() && x.unknown[0].reason.contains("0/C8 to 0/12C"), "{:?}", x.unknown);
        // combine() in any order, cut to a range: the hole matters only inside the range.
        let all = [far.clone(), bm.clone(), a.clone()];
        assert_eq!(BlockMap::combine(&all, Lsn(0), Lsn(200)).relations, ab.relations);
        assert!(!BlockMap::combine(&all, Lsn(50), Lsn(150)).is_unknown());
        assert!(BlockMap::combine(&all, Lsn(50), Lsn(350)).is_unknown());
        assert!(BlockMap::combine(&[bm], Lsn(50), Lsn(150)).is_unknown());
    }

    #[test]
    fn newer_formats_are_unknown_and_damage_is_an_error() {
        let b = [bref(0, R1, ForkNumber::MAIN, 1)];
        let m = map_of(0x100000, 0x200000, &[rec(0x100028, &b, &[])]);
        let mut bytes = m.to_bytes();
        assert_eq!(BlockMap::from_bytes(&bytes).unwrap(), m);
        // A newer version (with a valid CRC): unknown over the header's range.
        bytes[4] = 2;
        let n = bytes.len();
        let crc = crc32c::crc32c(&bytes[..n - 4]);
        bytes[n - 4..].copy_from_slice(&crc.to_le_bytes());
        let newer = BlockMap::from_bytes(&bytes).unwrap();
        assert!(newer.is_unknown() && newer.relations.is_empty());
        assert_eq!((newer.start, newer.end), (m.start, m.end));
        assert!(newer.unknown[0].reason.contains("format 2"), "{:?}", newer.unknown);
        // A flipped bit anywhere: an error.
        let good = m.to_bytes();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            assert!(BlockMap::from_bytes(&bad).is_err(), "byte {i}");
        }
        assert_eq!(BlockMap::from_bytes(b"WNB"), Err(BlockMapError::Magic));
    }

    fn arb_set() -> impl Strategy<Value = BlockSet> {
        prop_oneof![
            proptest::collection::vec(0u32..2000, 0..60).prop_map(BlockSet::from_blocks),
            proptest::collection::vec(any::<u32>(), 0..10).prop_map(BlockSet::from_blocks),
        ]
    }

    fn arb_map() -> impl Strategy<Value = BlockMap> {
        let rnode = (prop_oneof![Just(1663u32), Just(1664), any::<u32>()], 0u32..20, any::<u32>())
            .prop_map(|(spc_node, db_node, rel_node)| RelFileNode { spc_node, db_node, rel_node });
        let rel_event = (
            any::<u64>(),
            prop_oneof![
                (0u8..4).prop_map(|f| RelEventKind::Created(ForkNumber(f))),
                (any::<u32>(), 0u32..8).prop_map(|(blocks, flags)| RelEventKind::Truncated { blocks, flags }),
                Just(RelEventKind::Dropped),
            ],
        )
            .prop_map(|(l, kind)| RelEvent { lsn: Lsn(l), kind });
        let entry = (
            proptest::collection::btree_map((0u8..4).prop_map(ForkNumber), arb_set(), 0..4),
            proptest::collection::vec(rel_event, 0..4),
        )
            .prop_map(|(forks, mut events)| {
                events.sort();
                events.dedup();
                RelEntry { forks, events }
            });
        let dir = (any::<u32>(), any::<u32>()).prop_map(|(spc_node, db_node)| DbDir { spc_node, db_node });
        let db_event = (
            any::<u64>(),
            prop_oneof![
                dir.clone().prop_map(|src| DbEventKind::CreatedFileCopy { src }),
                Just(DbEventKind::CreatedWalLog),
                Just(DbEventKind::Dropped),
            ],
        )
            .prop_map(|(l, kind)| DbEvent { lsn: Lsn(l), kind });
        let ts_event = (any::<u64>(), any::<bool>()).prop_map(|(l, created)| TablespaceEvent { lsn: Lsn(l), created });
        let unknown = (any::<u64>(), "\\PC{0,20}").prop_map(|(l, reason)| Unknown { lsn: Lsn(l), reason });
        (
            any::<u64>(),
            any::<u64>(),
            proptest::collection::btree_map(rnode, entry, 0..8),
            proptest::collection::btree_map(dir.clone(), proptest::collection::vec(db_event, 0..3), 0..3),
            proptest::collection::btree_map(any::<u32>(), proptest::collection::vec(ts_event, 0..3), 0..3),
            proptest::collection::btree_set(dir, 0..3),
            proptest::collection::vec(unknown, 0..4),
            0u64..3,
        )
            .prop_map(
                |(start, end, relations, databases, tablespaces, relmap_updates, unknown, unknown_omitted)| BlockMap {
                    start: Lsn(start),
                    end: Lsn(end),
                    relations,
                    databases,
                    tablespaces,
                    relmap_updates,
                    unknown,
                    unknown_omitted,
                },
            )
    }

    proptest! {
        #[test]
        fn maps_round_trip(m in arb_map()) {
            let bytes = m.to_bytes();
            prop_assert_eq!(BlockMap::from_bytes(&bytes).unwrap(), m);
        }

        #[test]
        fn reading_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200), fix_crc in any::<bool>(), magic in any::<bool>()) {
            let mut b = bytes;
            if magic && b.len() >= 26 {
                b[..4].copy_from_slice(MAGIC);
                b[4..6].copy_from_slice(&1u16.to_le_bytes());
            }
            if fix_crc && b.len() >= 4 {
                let n = b.len();
                let crc = crc32c::crc32c(&b[..n - 4]);
                b[n - 4..].copy_from_slice(&crc.to_le_bytes());
            }
            let _ = BlockMap::from_bytes(&b);
        }

        #[test]
        fn truncating_a_stored_map_is_an_error(m in arb_map(), cut in any::<proptest::sample::Index>()) {
            let bytes = m.to_bytes();
            let cut = cut.index(bytes.len());
            prop_assert!(BlockMap::from_bytes(&bytes[..cut]).is_err());
        }

        #[test]
        fn block_sets_are_sets(a in proptest::collection::vec(0u32..300, 0..80), b in proptest::collection::vec(0u32..300, 0..80), from in 0u32..300, to in 0u32..300) {
            let model = |v: &[u32]| v.iter().copied().collect::<BTreeSet<u32>>();
            let (sa, sb) = (BlockSet::from_blocks(a.clone()), BlockSet::from_blocks(b.clone()));
            prop_assert_eq!(sa.iter().collect::<BTreeSet<_>>(), model(&a));
            let u = sa.union(&sb);
            prop_assert_eq!(u.iter().collect::<BTreeSet<_>>(), model(&a).union(&model(&b)).copied().collect::<BTreeSet<_>>());
            prop_assert_eq!(&u, &sb.union(&sa));
            // Canonical: ranges never touch, so equal sets are equal values.
            prop_assert!(u.ranges().windows(2).all(|w| u64::from(w[0].1) + 1 < u64::from(w[1].0)));
            prop_assert_eq!(u.len(), model(&a).union(&model(&b)).count() as u64);
            for x in 0..300 {
                prop_assert_eq!(u.contains(x), model(&a).contains(&x) || model(&b).contains(&x));
            }
            prop_assert_eq!(sa.restrict(from, to).iter().collect::<Vec<_>>(), model(&a).into_iter().filter(|x| *x >= from && *x < to).collect::<Vec<_>>());
        }

        #[test]
        fn merging_is_a_union_whatever_the_grouping(blocks in proptest::collection::vec((0u32..3, 0u8..4, 0u32..100), 0..60), cuts in proptest::collection::vec(0usize..60, 0..4)) {
            // One map of all records, against maps of consecutive pieces merged together.
            let rels = [R1, R2, RelFileNode { rel_node: 7, ..R1 }];
            let brefs: Vec<[BlockRef; 1]> = blocks.iter().map(|&(r, f, b)| [bref(0, rels[r as usize], ForkNumber(f), b)]).collect();
            let recs: Vec<Record<'_>> = brefs.iter().enumerate().map(|(i, b)| rec(8 * i as u64, b, &[])).collect();
            let whole = map_of(0, 8 * recs.len() as u64, &recs);
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(recs.len())).collect();
            cuts.push(0);
            cuts.push(recs.len());
            cuts.sort();
            cuts.dedup();
            let pieces: Vec<BlockMap> = cuts.windows(2).map(|w| map_of(8 * w[0] as u64, 8 * w[1] as u64, &recs[w[0]..w[1]])).collect();
            if pieces.is_empty() {
                return Ok(());
            }
            let mut merged = pieces[0].clone();
            for p in pieces.iter().skip(1) {
                merged.merge(p);
            }
            prop_assert_eq!(&merged, &whole);
            let mut reversed = pieces.last().unwrap().clone();
            for p in pieces.iter().rev().skip(1) {
                reversed.merge(p);
            }
            prop_assert_eq!(&reversed, &whole);
            prop_assert_eq!(&BlockMap::combine(&pieces, whole.start, whole.end), &whole);
            prop_assert_eq!(BlockMap::from_bytes(&whole.to_bytes()).unwrap(), whole);
        }
    }
}
