//! A WAL record decoder for PostgreSQL 15 (gated by the page magic, so 16 and 17 fit beside it).
//!
//! It walks the pages of a segment, reassembles records that continue across pages (and, given
//! the next segment, across segments), checks every record's CRC-32C, and finds the end of valid
//! WAL: an `XLOG_SWITCH` record (the rest is padding), zeros, or a record that does not validate.
//! From the records it extracts what walnut plans restores with: commit and abort timestamps and
//! transaction IDs (prepared transactions included), named restore points, checkpoints, timeline
//! switches (end-of-recovery records) and WAL switches. It never panics on arbitrary bytes.
//!
//! # Block references and relation changes
//!
//! [`decode_segment_with_blocks`] decodes the same way and also hands every validated record to
//! a callback as a [`Record`]: its LSN range, resource manager, and
//!
//! - its block references ([`BlockRef`]): for each block id (0..=32), the relation
//!   ([`RelFileNode`]: tablespace, database, relfilenode), fork ([`ForkNumber`]) and block
//!   number, whether the reference carries a full-page image (with its hole and compression),
//!   block data, and `BKPBLOCK_WILL_INIT` (redo re-initialises the page). References with
//!   `BKPBLOCK_SAME_REL` repeat the previous reference's relation, as in `xlogreader.c`;
//! - its relation-level changes ([`RelChange`]), the ways PostgreSQL 15 changes relation files
//!   other than through the blocks it references: a fork created (`XLOG_SMGR_CREATE`), a relation
//!   truncated (`XLOG_SMGR_TRUNCATE`, with its heap/VM/FSM flags), relations whose files are
//!   removed when a commit or abort record is replayed (`XACT_XINFO_HAS_RELFILENODES`; an abort
//!   lists the relations created by the aborted transaction), a database directory copied from a
//!   template without logging a single block (`XLOG_DBASE_CREATE_FILE_COPY`, also used by
//!   `ALTER DATABASE SET TABLESPACE`), a database directory created whose blocks are logged
//!   afterwards (`XLOG_DBASE_CREATE_WAL_LOG`), database directories removed (`XLOG_DBASE_DROP`),
//!   tablespace directories created and removed, and a database's `pg_filenode.map` rewritten
//!   (`XLOG_RELMAP_UPDATE`, which is not a relation file).
//!
//! A record the decoder cannot vouch for is reported as [`RelChange::Unknown`], with the reason,
//! never guessed at: a resource manager that is not built into PostgreSQL 15 (custom resource
//! managers, 128..=255, can change files any way they like), an info code a relation-changing
//! resource manager (Storage, Database, Tablespace, RelMap, Transaction, XLOG) does not have in
//! 15, a record flagged `XLR_SPECIAL_REL_UPDATE` that is not one of the above, a record whose
//! headers or main data do not parse (a CRC-valid record `xlogreader.c` would refuse), a block
//! reference to a fork above 3, and an `XLOG_PARAMETER_CHANGE` to `wal_level = minimal` (under
//! which new relation files are not WAL-logged).
//!
//! # The tail record from a segment's last pages
//!
//! [`decode_tail_from_end`] decodes the record that begins in a segment and continues into the
//! next (its *tail record*) from the segment's last pages and the next segment only: the first
//! page header of the window says where its first record begins, the records are walked from
//! there as above, and the last that begins in the segment is completed from the next segment
//! and validated. It says distinctly when no record continues (and why), when the window is too
//! small, and when the record was abandoned by a crash ([`TailDecode`]).
//!
//! What no WAL record says, and a caller must know (see `walnut_core::blockmap`): the free space
//! map is not WAL-logged (its pages change during normal operation and during redo without
//! block references, even though full-page images of it do appear); visibility-map bits are
//! cleared by heap inserts, updates, deletes and locks without a block reference to the VM page;
//! unlogged relations' main, FSM and VM forks are never WAL-logged (only their init fork is:
//! `XLOG_SMGR_CREATE` of `_init` plus a full-page image of each init page), temporary relations
//! neither; relation extension by empty pages (bulk extension) is not logged; and hint bits are
//! logged (as `XLOG_FPI_FOR_HINT`, the first time a page is dirtied by a hint after a
//! checkpoint) only with data checksums or `wal_log_hints`, which is harmless for changed-block
//! tracking: a page that differs only in hint bits is equally valid.

use crate::lsn::Lsn;
pub use crate::relpath::{ForkNumber, RelFileNode};
use crate::walpage::{
    PageHeader, SIZE_OF_LONG_PHD, SIZE_OF_SHORT_PHD, XLOG_BLCKSZ, XLP_FIRST_IS_CONTRECORD, XLP_LONG_HEADER,
};

const SIZE_OF_XLOG_RECORD: usize = 24;
pub const RM_XLOG_ID: u8 = 0;
pub const RM_XACT_ID: u8 = 1;
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
const XLOG_XACT_ASSIGNMENT: u8 = 0x50;
const XLOG_XACT_INVALIDATIONS: u8 = 0x60;
const XLOG_PARAMETER_CHANGE: u8 = 0x60;
const XLOG_NOOP: u8 = 0x20;
const XLOG_NEXTOID: u8 = 0x30;
const XLOG_BACKUP_END: u8 = 0x50;
const XLOG_FPW_CHANGE: u8 = 0x80;
const XLOG_FPI_FOR_HINT: u8 = 0xA0;
const XLOG_FPI: u8 = 0xB0;
const XLOG_OVERWRITE_CONTRECORD: u8 = 0xD0;

/// Resource manager IDs (PostgreSQL 15's `rmgrlist.h`).
pub const RM_SMGR_ID: u8 = 2;
pub const RM_DBASE_ID: u8 = 4;
pub const RM_TBLSPC_ID: u8 = 5;
pub const RM_RELMAP_ID: u8 = 7;
/// The highest built-in resource manager ID in PostgreSQL 15 (`RM_LOGICALMSG_ID`).
pub const RM_MAX_BUILTIN_ID: u8 = 21;

/// `xl_info` flag: the record changes relation files in a way its block references do not say.
pub const XLR_SPECIAL_REL_UPDATE: u8 = 0x01;
/// `xl_info` flag: full-page images for WAL consistency checking (`wal_consistency_checking`).
pub const XLR_CHECK_CONSISTENCY: u8 = 0x02;

pub const XLOG_SMGR_CREATE: u8 = 0x10;
pub const XLOG_SMGR_TRUNCATE: u8 = 0x20;
/// `xl_smgr_truncate.flags`: which forks a truncation applies to.
pub const SMGR_TRUNCATE_HEAP: u32 = 0x0001;
pub const SMGR_TRUNCATE_VM: u32 = 0x0002;
pub const SMGR_TRUNCATE_FSM: u32 = 0x0004;
pub const XLOG_DBASE_CREATE_FILE_COPY: u8 = 0x00;
pub const XLOG_DBASE_CREATE_WAL_LOG: u8 = 0x10;
pub const XLOG_DBASE_DROP: u8 = 0x20;
pub const XLOG_TBLSPC_CREATE: u8 = 0x00;
pub const XLOG_TBLSPC_DROP: u8 = 0x10;
pub const XLOG_RELMAP_UPDATE: u8 = 0x00;

const XLR_MAX_BLOCK_ID: u8 = 32;
const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;
const BKPBLOCK_FORK_MASK: u8 = 0x0F;
pub const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
pub const BKPBLOCK_HAS_DATA: u8 = 0x20;
pub const BKPBLOCK_WILL_INIT: u8 = 0x40;
pub const BKPBLOCK_SAME_REL: u8 = 0x80;
pub const BKPIMAGE_HAS_HOLE: u8 = 0x01;
pub const BKPIMAGE_APPLY: u8 = 0x02;
pub const BKPIMAGE_COMPRESS_PGLZ: u8 = 0x04;
pub const BKPIMAGE_COMPRESS_LZ4: u8 = 0x08;
pub const BKPIMAGE_COMPRESS_ZSTD: u8 = 0x10;
/// PostgreSQL's data page size (`BLCKSZ`), which full-page images are measured against.
pub const BLCKSZ: u16 = 8192;
/// `WAL_LEVEL_REPLICA`: below it (minimal), new relation files are not WAL-logged.
const WAL_LEVEL_REPLICA: i32 = 1;

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

/// A full-page image in a block reference (`XLogRecordBlockImageHeader`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockImage {
    /// Bytes of image data in the record (after hole removal and compression).
    pub length: u16,
    pub hole_offset: u16,
    /// The hole's length: stored when the image is compressed, else `BLCKSZ - length`.
    pub hole_length: u16,
    /// `bimg_info`: `BKPIMAGE_HAS_HOLE`, `BKPIMAGE_APPLY`, `BKPIMAGE_COMPRESS_*`.
    pub bimg_info: u8,
}

impl BlockImage {
    /// Redo restores the image (otherwise it is only there for `wal_consistency_checking`).
    pub fn apply(&self) -> bool {
        self.bimg_info & BKPIMAGE_APPLY != 0
    }

    /// `pglz`, `lz4` or `zstd` when the image is compressed.
    pub fn compression(&self) -> Option<&'static str> {
        if self.bimg_info & BKPIMAGE_COMPRESS_PGLZ != 0 {
            Some("pglz")
        } else if self.bimg_info & BKPIMAGE_COMPRESS_LZ4 != 0 {
            Some("lz4")
        } else if self.bimg_info & BKPIMAGE_COMPRESS_ZSTD != 0 {
            Some("zstd")
        } else {
            None
        }
    }
}

/// One block reference of a record (`XLogRecordBlockHeader` and what follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRef {
    /// The block id (0..=32), as `pg_waldump` prints `blkref #N`.
    pub id: u8,
    pub rnode: RelFileNode,
    pub fork: ForkNumber,
    pub block: u32,
    /// The high bits of `fork_flags`: `BKPBLOCK_HAS_IMAGE`, `_HAS_DATA`, `_WILL_INIT`, `_SAME_REL`.
    pub flags: u8,
    /// Bytes of block data (not counting the image).
    pub data_len: u16,
    pub image: Option<BlockImage>,
}

impl BlockRef {
    /// Redo re-initialises the page (`BKPBLOCK_WILL_INIT`): its old contents do not matter.
    pub fn will_init(&self) -> bool {
        self.flags & BKPBLOCK_WILL_INIT != 0
    }

    pub fn has_data(&self) -> bool {
        self.flags & BKPBLOCK_HAS_DATA != 0
    }

    pub fn has_image(&self) -> bool {
        self.image.is_some()
    }
}

/// A change to relation files (or the directories holding them) that a record makes other than
/// through its block references. See the module docs for which records produce which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelChange {
    /// `XLOG_SMGR_CREATE`: the fork's file is created (empty, or emptied if it exists).
    Create { rnode: RelFileNode, fork: ForkNumber },
    /// `XLOG_SMGR_TRUNCATE`: the relation is truncated to `blocks` main-fork blocks; `flags` says
    /// which forks (`SMGR_TRUNCATE_HEAP`, `_VM`, `_FSM`; the VM and FSM are cut to what covers
    /// `blocks` heap blocks).
    Truncate { rnode: RelFileNode, blocks: u32, flags: u32 },
    /// The relation's files (every fork) are removed when this commit or abort record is
    /// replayed (`XACT_XINFO_HAS_RELFILENODES`).
    Drop { rnode: RelFileNode, kind: XactKind },
    /// `XLOG_DBASE_CREATE_FILE_COPY`: the directory `tablespace_id/db_id` is created as a copy of
    /// `src_tablespace_id/src_db_id`, logging no block at all.
    DatabaseCreateFileCopy { db_id: u32, tablespace_id: u32, src_db_id: u32, src_tablespace_id: u32 },
    /// `XLOG_DBASE_CREATE_WAL_LOG`: the directory is created; its relations' creations and blocks
    /// are logged by the records that follow.
    DatabaseCreateWalLog { db_id: u32, tablespace_id: u32 },
    /// `XLOG_DBASE_DROP`: the database's directories in these tablespaces are removed.
    DatabaseDrop { db_id: u32, tablespace_ids: Vec<u32> },
    /// `XLOG_TBLSPC_CREATE`: the tablespace's directory (and its version directory) is created.
    TablespaceCreate { ts_id: u32, path: String },
    /// `XLOG_TBLSPC_DROP`: the tablespace's (empty) directories are removed.
    TablespaceDrop { ts_id: u32 },
    /// `XLOG_RELMAP_UPDATE`: the database's `pg_filenode.map` is rewritten (`db_id` 0 with
    /// `pg_global`: `global/pg_filenode.map`). Not a relation file; listed for completeness.
    RelmapUpdate { db_id: u32, tablespace_id: u32 },
    /// A record that may change relation files in a way this decoder does not know: copy whole.
    Unknown { reason: String },
}

/// A validated record as [`decode_segment_with_blocks`] hands it to its callback.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Where the record begins.
    pub lsn: Lsn,
    /// Just after its last byte (padding to the next record not included).
    pub end: Lsn,
    pub rmid: u8,
    /// `xl_info`, flag bits included.
    pub info: u8,
    pub xid: u32,
    pub blocks: &'a [BlockRef],
    pub changes: &'a [RelChange],
}

impl Record<'_> {
    /// The resource manager's name as `pg_waldump` prints it, when built in.
    pub fn rmgr_name(&self) -> Option<&'static str> {
        RMGR_NAMES.get(self.rmid as usize).copied()
    }
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

/// The WAL byte stream of one segment (plus, optionally, the next), skipping page headers. `seg`
/// may be only the segment's last bytes (from `seg_off` on): bytes before them read as missing.
#[derive(Clone, Copy)]
struct Stream<'a> {
    seg: &'a [u8],
    /// Where in the segment `seg` begins (0 for the whole segment).
    seg_off: u64,
    next: Option<&'a [u8]>,
    seg_start: u64,
    seg_size: u64,
}

enum Read<'a> {
    /// Borrowed from the segment when the bytes lie within one page (most records), else
    /// gathered across page headers.
    Bytes(std::borrow::Cow<'a, [u8]>),
    /// Ran past the data available.
    Eof,
    Invalid(String),
}

impl<'a> Stream<'a> {
    /// `n` bytes at `lsn`, within one page (so within one segment).
    fn slice(&self, lsn: u64, n: usize) -> Option<&'a [u8]> {
        let off = lsn.checked_sub(self.seg_start)?;
        let (buf, o) = if off < self.seg_size {
            (self.seg, off.checked_sub(self.seg_off)?)
        } else {
            (self.next?, off - self.seg_size)
        };
        buf.get(o as usize..(o as usize).checked_add(n)?)
    }

    fn page_header_len(&self, page_lsn: u64) -> usize {
        if page_lsn.is_multiple_of(self.seg_size) { SIZE_OF_LONG_PHD } else { SIZE_OF_SHORT_PHD }
    }

    fn page(&self, page_lsn: u64) -> Option<&[u8]> {
        self.slice(page_lsn, XLOG_BLCKSZ)
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
    fn read(&self, mut lsn: u64, len: usize, total: u32, mut done: u32) -> (Read<'a>, u64) {
        let in_page = (lsn % XLOG_BLCKSZ as u64) as usize;
        if in_page != 0 && in_page + len <= XLOG_BLCKSZ {
            // Within this page: no page header to check or skip, nothing to copy.
            return match self.slice(lsn, len) {
                Some(b) => (Read::Bytes(b.into()), lsn + len as u64),
                None => (Read::Eof, lsn),
            };
        }
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
        (Read::Bytes(out.into()), lsn)
    }
}

fn maxalign(x: u64) -> u64 {
    (x + 7) & !7
}

/// Walks a record's headers after the fixed `XLogRecord` header the way `xlogreader.c`'s
/// `DecodeXLogRecord` does (with its checks), appending the block references to `blocks` when
/// given, and returns the record's main data.
fn walk_headers<'r>(rec: &'r [u8], mut blocks: Option<&mut Vec<BlockRef>>) -> Result<&'r [u8], &'static str> {
    const SHORT: &str = "record headers run past the record";
    let byte = |o: usize| rec.get(o).copied().ok_or(SHORT);
    let mut pos = SIZE_OF_XLOG_RECORD;
    let mut datatotal = 0usize;
    let mut main_len = 0usize;
    let mut next_id = 0u8;
    let mut prev_rel: Option<RelFileNode> = None;
    while rec.len().saturating_sub(pos) > datatotal {
        let id = byte(pos)?;
        pos += 1;
        match id {
            XLR_BLOCK_ID_DATA_SHORT => {
                main_len = byte(pos)? as usize;
                pos += 1;
                datatotal += main_len;
                break;
            }
            XLR_BLOCK_ID_DATA_LONG => {
                main_len = u32_at(rec, pos).ok_or(SHORT)? as usize;
                pos += 4;
                datatotal = datatotal.checked_add(main_len).ok_or(SHORT)?;
                break;
            }
            XLR_BLOCK_ID_ORIGIN => pos += 2,
            XLR_BLOCK_ID_TOPLEVEL_XID => pos += 4,
            0..=XLR_MAX_BLOCK_ID => {
                if id < next_id {
                    return Err("out-of-order block id");
                }
                next_id = id + 1;
                let fork_flags = byte(pos)?;
                let data_len = u16_at(rec, pos + 1).ok_or(SHORT)?;
                pos += 3;
                if (fork_flags & BKPBLOCK_HAS_DATA != 0) != (data_len != 0) {
                    return Err("block data length disagrees with BKPBLOCK_HAS_DATA");
                }
                datatotal += data_len as usize;
                let image = if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
                    let length = u16_at(rec, pos).ok_or(SHORT)?;
                    let hole_offset = u16_at(rec, pos + 2).ok_or(SHORT)?;
                    let bimg_info = byte(pos + 4)?;
                    pos += 5;
                    let compressed =
                        bimg_info & (BKPIMAGE_COMPRESS_PGLZ | BKPIMAGE_COMPRESS_LZ4 | BKPIMAGE_COMPRESS_ZSTD) != 0;
                    let has_hole = bimg_info & BKPIMAGE_HAS_HOLE != 0;
                    if length > BLCKSZ || (compressed && length == BLCKSZ) {
                        return Err("invalid full-page image length");
                    }
                    let hole_length = if has_hole && compressed {
                        let h = u16_at(rec, pos).ok_or(SHORT)?;
                        pos += 2;
                        h
                    } else if has_hole {
                        BLCKSZ - length
                    } else {
                        0
                    };
                    if has_hole && (hole_offset == 0 || hole_length == 0 || length == BLCKSZ) {
                        return Err("invalid full-page image hole");
                    }
                    if !has_hole && (hole_offset != 0 || (!compressed && length != BLCKSZ)) {
                        return Err("invalid full-page image without a hole");
                    }
                    datatotal += length as usize;
                    Some(BlockImage { length, hole_offset, hole_length, bimg_info })
                } else {
                    None
                };
                let rnode = if fork_flags & BKPBLOCK_SAME_REL == 0 {
                    let r = RelFileNode {
                        spc_node: u32_at(rec, pos).ok_or(SHORT)?,
                        db_node: u32_at(rec, pos + 4).ok_or(SHORT)?,
                        rel_node: u32_at(rec, pos + 8).ok_or(SHORT)?,
                    };
                    pos += 12;
                    r
                } else {
                    prev_rel.ok_or("BKPBLOCK_SAME_REL without a previous relation")?
                };
                prev_rel = Some(rnode);
                let block = u32_at(rec, pos).ok_or(SHORT)?;
                pos += 4;
                if let Some(out) = blocks.as_deref_mut() {
                    out.push(BlockRef {
                        id,
                        rnode,
                        fork: ForkNumber(fork_flags & BKPBLOCK_FORK_MASK),
                        block,
                        flags: fork_flags & !BKPBLOCK_FORK_MASK,
                        data_len,
                        image,
                    });
                }
            }
            _ => return Err("invalid block id"),
        }
    }
    if pos > rec.len() || rec.len() - pos != datatotal {
        return Err("record length disagrees with its headers");
    }
    // Block data comes first, in block-id order; the main data is last.
    Ok(&rec[rec.len() - main_len..])
}

/// A record's main data (walking the block headers).
fn main_data(rec: &[u8]) -> Option<&[u8]> {
    walk_headers(rec, None).ok()
}

/// The parts of a commit or abort record's main data walnut reads (`ParseCommitRecord`).
struct XactParsed {
    /// Offset and count of the `RelFileNode`s dropped by the record.
    rels: (usize, usize),
    twophase_xid: Option<u32>,
}

fn parse_xact(info: u8, main: &[u8], commit: bool) -> Option<XactParsed> {
    let mut p = XactParsed { rels: (0, 0), twophase_xid: None };
    if info & XLOG_XACT_HAS_INFO == 0 {
        // Only the timestamp.
        u64_at(main, 0)?;
        return Some(p);
    }
    let count = |pos: usize| -> Option<usize> {
        usize::try_from(i32::from_le_bytes(main.get(pos..pos + 4)?.try_into().ok()?)).ok()
    };
    let xinfo = u32_at(main, 8)?;
    let mut pos = 12;
    if xinfo & XACT_XINFO_HAS_DBINFO != 0 {
        pos += 8;
    }
    if xinfo & XACT_XINFO_HAS_SUBXACTS != 0 {
        pos += 4 + 4 * count(pos)?;
    }
    if xinfo & XACT_XINFO_HAS_RELFILENODES != 0 {
        let n = count(pos)?;
        p.rels = (pos + 4, n);
        pos += 4 + n.checked_mul(12)?;
        main.get(..pos)?;
    }
    // xl_xact_stats_item: kind, dboid, objoid.
    if xinfo & XACT_XINFO_HAS_DROPPED_STATS != 0 {
        pos += 4 + 12 * count(pos)?;
    }
    // SharedInvalidationMessage: 16 bytes; abort records have none.
    if commit && xinfo & XACT_XINFO_HAS_INVALS != 0 {
        pos += 4 + 16 * count(pos)?;
    }
    if xinfo & XACT_XINFO_HAS_TWOPHASE != 0 {
        p.twophase_xid = u32_at(main, pos);
    }
    Some(p)
}

/// The twophase xid of a commit/abort-prepared record's main data (after `xact_time`).
fn twophase_xid(info: u8, main: &[u8], commit: bool) -> Option<u32> {
    parse_xact(info, main, commit)?.twophase_xid
}

fn unknown(out: &mut Vec<RelChange>, reason: String) {
    out.push(RelChange::Unknown { reason });
}

fn rnode_at(b: &[u8], o: usize) -> Option<RelFileNode> {
    Some(RelFileNode { spc_node: u32_at(b, o)?, db_node: u32_at(b, o + 4)?, rel_node: u32_at(b, o + 8)? })
}

/// The relation-level changes of a record (see the module docs), appended to `out`.
fn rel_changes(rmid: u8, info: u8, main: Option<&[u8]>, out: &mut Vec<RelChange>) {
    let op = info & 0xF0;
    let what =
        || format!("{} record with info {info:#04X}", RMGR_NAMES.get(rmid as usize).copied().unwrap_or("unknown"));
    let Some(m) = main else {
        // The headers did not parse: already reported.
        return;
    };
    let before = out.len();
    let parsed: Option<()> = (|| {
        match rmid {
            RM_XLOG_ID => match op {
                XLOG_PARAMETER_CHANGE => {
                    // xl_parameter_change: five ints, then wal_level.
                    let wal_level = u32_at(m, 20)? as i32;
                    if wal_level < WAL_LEVEL_REPLICA {
                        unknown(
                            out,
                            format!(
                                "wal_level set to minimal (level {wal_level}): new relation files are not WAL-logged"
                            ),
                        );
                    }
                }
                XLOG_CHECKPOINT_SHUTDOWN
                | XLOG_CHECKPOINT_ONLINE
                | XLOG_NOOP
                | XLOG_NEXTOID
                | XLOG_SWITCH
                | XLOG_BACKUP_END
                | XLOG_RESTORE_POINT
                | XLOG_FPW_CHANGE
                | XLOG_END_OF_RECOVERY
                | XLOG_FPI_FOR_HINT
                | XLOG_FPI
                | XLOG_OVERWRITE_CONTRECORD => {}
                _ => unknown(out, format!("{} PostgreSQL 15 does not write", what())),
            },
            RM_XACT_ID => match info & XLOG_XACT_OPMASK {
                op @ (XLOG_XACT_COMMIT | XLOG_XACT_ABORT | XLOG_XACT_COMMIT_PREPARED | XLOG_XACT_ABORT_PREPARED) => {
                    let commit = matches!(op, XLOG_XACT_COMMIT | XLOG_XACT_COMMIT_PREPARED);
                    let kind = match op {
                        XLOG_XACT_COMMIT => XactKind::Commit,
                        XLOG_XACT_ABORT => XactKind::Abort,
                        XLOG_XACT_COMMIT_PREPARED => XactKind::CommitPrepared,
                        _ => XactKind::AbortPrepared,
                    };
                    let x = parse_xact(info, m, commit)?;
                    for i in 0..x.rels.1 {
                        out.push(RelChange::Drop { rnode: rnode_at(m, x.rels.0 + 12 * i)?, kind });
                    }
                }
                XLOG_XACT_PREPARE | XLOG_XACT_ASSIGNMENT | XLOG_XACT_INVALIDATIONS => {}
                _ => unknown(out, format!("{} PostgreSQL 15 does not write", what())),
            },
            RM_SMGR_ID => match op {
                XLOG_SMGR_CREATE => {
                    let fork = u32_at(m, 12)?;
                    let rnode = rnode_at(m, 0)?;
                    if fork > ForkNumber::MAX.0 as u32 {
                        unknown(out, format!("{} creates fork {fork}", what()));
                    } else {
                        out.push(RelChange::Create { rnode, fork: ForkNumber(fork as u8) });
                    }
                }
                XLOG_SMGR_TRUNCATE => {
                    out.push(RelChange::Truncate {
                        blocks: u32_at(m, 0)?,
                        rnode: rnode_at(m, 4)?,
                        flags: u32_at(m, 16)?,
                    });
                }
                _ => unknown(out, format!("{} PostgreSQL 15 does not write", what())),
            },
            RM_DBASE_ID => match op {
                XLOG_DBASE_CREATE_FILE_COPY => out.push(RelChange::DatabaseCreateFileCopy {
                    db_id: u32_at(m, 0)?,
                    tablespace_id: u32_at(m, 4)?,
                    src_db_id: u32_at(m, 8)?,
                    src_tablespace_id: u32_at(m, 12)?,
                }),
                XLOG_DBASE_CREATE_WAL_LOG => {
                    out.push(RelChange::DatabaseCreateWalLog { db_id: u32_at(m, 0)?, tablespace_id: u32_at(m, 4)? })
                }
                XLOG_DBASE_DROP => {
                    let n = usize::try_from(u32_at(m, 4)? as i32).ok()?;
                    m.get(8..8usize.checked_add(n.checked_mul(4)?)?)?;
                    let tablespace_ids = (0..n).map(|i| u32_at(m, 8 + 4 * i)).collect::<Option<Vec<u32>>>()?;
                    out.push(RelChange::DatabaseDrop { db_id: u32_at(m, 0)?, tablespace_ids });
                }
                _ => unknown(out, format!("{} PostgreSQL 15 does not write", what())),
            },
            RM_TBLSPC_ID => match op {
                XLOG_TBLSPC_CREATE => {
                    let raw = m.get(4..)?;
                    let path = String::from_utf8_lossy(&raw[..raw.iter().position(|&b| b == 0)?]).into_owned();
                    out.push(RelChange::TablespaceCreate { ts_id: u32_at(m, 0)?, path });
                }
                XLOG_TBLSPC_DROP => out.push(RelChange::TablespaceDrop { ts_id: u32_at(m, 0)? }),
                _ => unknown(out, format!("{} PostgreSQL 15 does not write", what())),
            },
            RM_RELMAP_ID => match op {
                XLOG_RELMAP_UPDATE => {
                    out.push(RelChange::RelmapUpdate { db_id: u32_at(m, 0)?, tablespace_id: u32_at(m, 4)? })
                }
                _ => unknown(out, format!("{} PostgreSQL 15 does not write", what())),
            },
            id if id > RM_MAX_BUILTIN_ID => {
                unknown(out, format!("resource manager {id} is not built into PostgreSQL 15 (a custom one?)"))
            }
            // Every other built-in resource manager changes relation files only through the
            // blocks it references (or not at all).
            _ => {
                if info & XLR_SPECIAL_REL_UPDATE != 0 {
                    unknown(out, format!("{} is flagged XLR_SPECIAL_REL_UPDATE", what()));
                }
            }
        }
        Some(())
    })();
    if parsed.is_none() {
        out.truncate(before);
        unknown(out, format!("{} has main data that does not parse", what()));
    }
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
    decode(seg, seg_start, next, None::<fn(&Record<'_>)>)
}

/// [`decode_segment`], also handing every record it counts (those that begin in this segment
/// and validate whole, in LSN order) to `on_record` with its block references and relation
/// changes. The returned [`Decoded`] is the same as `decode_segment`'s.
pub fn decode_segment_with_blocks(
    seg: &[u8],
    seg_start: Lsn,
    next: Option<&[u8]>,
    on_record: impl FnMut(&Record<'_>),
) -> Decoded {
    decode(seg, seg_start, next, Some(on_record))
}

/// Why no record continues from a segment into the next ([`decode_tail_from_end`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoTail {
    /// An `XLOG_SWITCH` record: the rest of the segment is padding.
    Switch,
    /// The last record ends exactly at the segment's end.
    SegmentEnd,
    /// Zeros where a record should begin: the segment was not written to its end.
    Zeros,
    /// The window begins with a zeroed page (its header included): what PostgreSQL leaves after
    /// an `XLOG_SWITCH` record (PostgreSQL 15 zeroes the rest of the segment, page headers too),
    /// or a part of the segment never written. Whichever it was lies before the window; either
    /// way no record reaches the next segment, whose pages such a record would have to precede.
    ZeroedPages,
    /// No record begins in the segment: one that began in an earlier segment runs through all of
    /// it (and on into the next). Only said with the whole segment as the window.
    NoneBegins,
}

/// What [`decode_tail_from_end`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailDecode {
    /// The tail record (it begins in the segment and continues into the next one) validated
    /// whole and went to the callback. `before` is the end of the record before it (padding not
    /// included), or the segment's start when it is the segment's first record: where the map
    /// of the segment decoded alone ends, and so where the tail's range begins. `start..end` is
    /// the tail record itself (`end` lies in the next segment).
    Tail { before: Lsn, start: Lsn, end: Lsn },
    /// No record continues into the next segment; nothing went to the callback.
    NoTail(NoTail),
    /// The window is too small: the record before the tail record (whose end is where the
    /// tail's range begins) begins before the window, and so may the tail record, or the first
    /// record boundary in the window lies after the segment's end. How many bytes would do is not knowable from the window (a record's length is in
    /// its header, which is before it): retry with a larger window (twice as large, say), up to
    /// the whole segment, which always answers otherwise. Nothing went to the callback.
    NeedMore,
    /// The tail record does not validate and the next segment's first page is flagged
    /// `XLP_FIRST_IS_OVERWRITE_CONTRECORD`: a crash cut the record off and recovery abandoned it
    /// and wrote over its missing part. It changed nothing. `before` is as for `Tail`. Nothing
    /// went to the callback.
    Abandoned { before: Lsn },
    /// The window or the record does not validate otherwise (or the tail record runs past the
    /// next segment too, or the arguments make no segment). Nothing went to the callback.
    Invalid(String),
}

/// Decodes the *tail record* of the segment that starts at `seg_start` (`seg_size` bytes): the
/// record that begins in it and continues into the next segment (`next`, whole), from the
/// segment's last pages only. `last_pages` is the segment's final K bytes (K a multiple of the
/// 8 kB WAL page size, 0 < K <= `seg_size`), so it begins at `seg_start + seg_size - K`.
///
/// The window's first page header says where the first record in the window begins (after the
/// rest of a record that began earlier: `XLP_FIRST_IS_CONTRECORD`, `xlp_rem_len`); from there the
/// records are walked and validated (CRC-32C, page headers) exactly as [`decode_segment_with_blocks`]
/// does, to the last one that begins in the segment. If that one continues into `next` it is
/// decoded whole, validated, and handed to `on_record` (the only record handed on), as
/// `decode_segment_with_blocks(seg, seg_start, Some(next), ..)` hands it on. See [`TailDecode`] for
/// the outcomes. Whatever it returns agrees with decoding the whole segment with `next`, except
/// that what lies before the window is not read, so not checked: a record there that would not
/// validate stops a whole decode (an error) but not this one. The segment was decoded whole when
/// it was archived. Never panics.
pub fn decode_tail_from_end(
    last_pages: &[u8],
    seg_start: Lsn,
    seg_size: u64,
    next: &[u8],
    mut on_record: impl FnMut(&Record<'_>),
) -> TailDecode {
    let k = last_pages.len() as u64;
    if !addressable(seg_start.0, seg_size) {
        return TailDecode::Invalid(format!("not a segment: {seg_size} bytes at {seg_start}"));
    }
    if k == 0 || !k.is_multiple_of(XLOG_BLCKSZ as u64) || k > seg_size {
        return TailDecode::Invalid(format!(
            "a window of {k} bytes is not a whole number of WAL pages within a segment of {seg_size} bytes"
        ));
    }
    let seg_end = seg_start.0 + seg_size;
    let window = seg_end - k;
    let whole = window == seg_start.0;
    let s =
        Stream { seg: last_pages, seg_off: window - seg_start.0, next: Some(next), seg_start: seg_start.0, seg_size };
    if !whole && last_pages[..SIZE_OF_SHORT_PHD].iter().all(|&b| b == 0) {
        return TailDecode::NoTail(NoTail::ZeroedPages);
    }
    // Where the first record in the window begins; for the whole segment, exactly as
    // decode_segment finds it.
    let first = match first_record_on_page(&s, window, !whole) {
        Ok(Some(lsn)) => lsn,
        Ok(None) if whole => return TailDecode::NoTail(NoTail::NoneBegins),
        Ok(None) => return TailDecode::NeedMore,
        Err(e) => return TailDecode::Invalid(e),
    };
    // The end of the record before the one at hand: unknown until a record in the window ends,
    // but for the whole segment, where the map of the segment alone starts.
    let initial = whole.then_some(seg_start.0);
    let mut d = new_decoded(seg_start);
    let mut prev = initial;
    let mut tail = None;
    let mut need_more = false;
    walk(&s, first, &mut d, &mut prev, Some(seg_end), |r, before| match before {
        Some(b) => {
            tail = Some((Lsn(b), r.lsn, r.end));
            on_record(r);
        }
        None => need_more = true,
    });
    if need_more {
        return TailDecode::NeedMore;
    }
    if let Some((before, start, end)) = tail {
        return TailDecode::Tail { before, start, end };
    }
    match d.end {
        End::Invalid => {
            let reason = d.invalid_reason.unwrap_or_else(|| "invalid WAL".into());
            let overwritten = PageHeader::parse(next)
                .is_some_and(|h| h.info & crate::walpage::XLP_FIRST_IS_OVERWRITE_CONTRECORD != 0);
            if !overwritten {
                return TailDecode::Invalid(reason);
            }
            // Abandoned if, without the next segment, the walk ends the same way but for running
            // out of data in the record that crosses into it.
            let mut alone = new_decoded(seg_start);
            let mut alone_prev = initial;
            walk(&Stream { next: None, ..s }, first, &mut alone, &mut alone_prev, None, |_, _| {});
            match (alone.end, alone_prev) {
                (End::ContinuesIntoNext, _) if alone_prev != prev => TailDecode::Invalid(reason),
                (End::ContinuesIntoNext, Some(b)) => TailDecode::Abandoned { before: Lsn(b) },
                // The abandoned record is the first in the window: where its range begins is not.
                (End::ContinuesIntoNext, None) => TailDecode::NeedMore,
                _ => TailDecode::Invalid(reason),
            }
        }
        End::ContinuesIntoNext => {
            TailDecode::Invalid(format!("the record after {} continues past the next segment too", d.end_of_valid))
        }
        End::Switch => TailDecode::NoTail(NoTail::Switch),
        End::SegmentEnd => TailDecode::NoTail(NoTail::SegmentEnd),
        End::Zeros => TailDecode::NoTail(NoTail::Zeros),
    }
}

/// Decodes one record's block references and relation changes into the reused buffers.
fn record_details(rmid: u8, info: u8, rec: &[u8], blocks: &mut Vec<BlockRef>, changes: &mut Vec<RelChange>) {
    blocks.clear();
    changes.clear();
    let main = match walk_headers(rec, Some(blocks)) {
        Ok(m) => Some(m),
        Err(e) => {
            unknown(changes, format!("its headers do not parse: {e}"));
            None
        }
    };
    for b in blocks.iter().filter(|b| !b.fork.is_valid()) {
        changes.push(RelChange::Unknown { reason: format!("block reference #{} to fork {}", b.id, b.fork.0) });
    }
    rel_changes(rmid, info, main, changes);
}

fn new_decoded(seg_start: Lsn) -> Decoded {
    Decoded {
        records: 0,
        per_rmgr: [0; 256],
        events: Vec::new(),
        end_of_valid: seg_start,
        last_record: None,
        end: End::Invalid,
        invalid_reason: None,
    }
}

/// Whether `seg_size` and `seg_start` make a segment this decoder can address (the next segment
/// included) without overflowing.
fn addressable(seg_start: u64, seg_size: u64) -> bool {
    seg_size >= XLOG_BLCKSZ as u64
        && seg_size.is_power_of_two()
        && seg_start.is_multiple_of(seg_size)
        && seg_size.checked_mul(2).and_then(|two| seg_start.checked_add(two)).is_some()
}

/// Where the first record on the page at `page_lsn` begins: after the page header, past the rest
/// of a record that began on an earlier page (`XLP_FIRST_IS_CONTRECORD`, `xlp_rem_len` bytes
/// left). The page's header is checked; with `check_pages`, so are those of the pages the rest
/// runs over (each must continue the record, as reading it whole would check). `None` when the
/// rest runs on to the segment's end: no record begins after it in this segment.
fn first_record_on_page(s: &Stream<'_>, page_lsn: u64, check_pages: bool) -> Result<Option<u64>, String> {
    s.check_page(page_lsn, None)?;
    let h = s.page(page_lsn).and_then(PageHeader::parse).ok_or("page missing")?;
    let mut lsn = page_lsn + s.page_header_len(page_lsn) as u64;
    if h.info & XLP_FIRST_IS_CONTRECORD != 0 {
        let seg_end = s.seg_start + s.seg_size;
        let mut left = u64::from(h.rem_len);
        while left > 0 {
            let in_page_left = XLOG_BLCKSZ as u64 - lsn % XLOG_BLCKSZ as u64;
            let take = left.min(in_page_left);
            lsn += take;
            left -= take;
            if left > 0 {
                if lsn >= seg_end {
                    return Ok(None);
                }
                if check_pages {
                    s.check_page(lsn, Some(left as u32))?;
                }
                lsn += SIZE_OF_SHORT_PHD as u64;
            }
        }
        lsn = maxalign(lsn);
    }
    Ok(Some(lsn))
}

fn decode<F: FnMut(&Record<'_>)>(seg: &[u8], seg_start: Lsn, next: Option<&[u8]>, on_record: Option<F>) -> Decoded {
    let seg_size = seg.len() as u64;
    let mut d = new_decoded(seg_start);
    if !addressable(seg_start.0, seg_size) {
        d.invalid_reason = Some("not a whole segment".into());
        return d;
    }
    let s = Stream { seg, seg_off: 0, next, seg_start: seg_start.0, seg_size };
    let lsn = match first_record_on_page(&s, seg_start.0, false) {
        Ok(Some(lsn)) => lsn,
        Ok(None) => {
            // The whole segment continues a record that began in an earlier one.
            d.end = End::ContinuesIntoNext;
            d.end_of_valid = Lsn(seg_start.0 + seg_size);
            return d;
        }
        Err(e) => {
            d.invalid_reason = Some(e);
            return d;
        }
    };
    let mut f = on_record;
    let details = f.is_some().then_some(0);
    walk(&s, lsn, &mut d, &mut None, details, |r, _| {
        if let Some(f) = f.as_mut() {
            f(r)
        }
    });
    d
}

/// The decoding loop: the records from `lsn` (where one begins, or a page's start) to the end of
/// the segment, into `d`. A record that validates and ends past `details_past` has its details
/// decoded and goes to `on_record`, with `prev_end`: the end of the record before it in this walk
/// (its initial value for the first record), which is then updated to this record's end.
fn walk<F: FnMut(&Record<'_>, Option<u64>)>(
    s: &Stream<'_>,
    mut lsn: u64,
    d: &mut Decoded,
    prev_end: &mut Option<u64>,
    details_past: Option<u64>,
    mut on_record: F,
) {
    let mut blocks: Vec<BlockRef> = Vec::new();
    let mut changes: Vec<RelChange> = Vec::new();
    let seg_end = s.seg_start + s.seg_size;
    loop {
        if lsn >= seg_end {
            d.end = End::SegmentEnd;
            return;
        }
        if lsn.is_multiple_of(XLOG_BLCKSZ as u64) {
            if let Err(e) = s.check_page(lsn, None) {
                d.end = End::Invalid;
                d.invalid_reason = Some(e);
                return;
            }
            let h = PageHeader::parse(s.page(lsn).expect("checked")).expect("page");
            lsn += s.page_header_len(lsn) as u64;
            if h.info & XLP_FIRST_IS_CONTRECORD != 0 {
                d.end = End::Invalid;
                d.invalid_reason = Some(format!("unexpected continuation at {}", Lsn(lsn)));
                return;
            }
        }
        let start = lsn;
        let tot_len = match s.read(start, 4, 0, 0) {
            (Read::Bytes(b), _) => u32::from_le_bytes(b[..].try_into().expect("4")),
            (Read::Eof, _) => {
                d.end = End::ContinuesIntoNext;
                return;
            }
            (Read::Invalid(e), _) => {
                d.end = End::Invalid;
                d.invalid_reason = Some(e);
                return;
            }
        };
        if tot_len == 0 {
            d.end = End::Zeros;
            return;
        }
        if (tot_len as usize) < SIZE_OF_XLOG_RECORD || tot_len > 1 << 30 {
            d.end = End::Invalid;
            d.invalid_reason = Some(format!("record at {} has an invalid length {tot_len}", Lsn(start)));
            return;
        }
        let (rec, after) = match s.read(start, tot_len as usize, tot_len, 0) {
            (Read::Bytes(b), after) => (b, after),
            (Read::Eof, _) => {
                d.end = End::ContinuesIntoNext;
                return;
            }
            (Read::Invalid(e), _) => {
                d.end = End::Invalid;
                d.invalid_reason = Some(e);
                return;
            }
        };
        let crc = u32_at(&rec, 20).expect("header");
        let computed = crc32c::crc32c_append(crc32c::crc32c(&rec[SIZE_OF_XLOG_RECORD..]), &rec[..20]);
        if crc != computed {
            d.end = End::Invalid;
            d.invalid_reason = Some(format!("record at {} fails its CRC check", Lsn(start)));
            return;
        }
        let (xid, info, rmid) = (u32_at(&rec, 4).expect("header"), rec[16], rec[17]);
        d.records += 1;
        d.per_rmgr[rmid as usize] += 1;
        d.end_of_valid = Lsn(after);
        d.last_record = Some(Lsn(start));
        if details_past.is_some_and(|p| after > p) {
            record_details(rmid, info, &rec, &mut blocks, &mut changes);
            let r = Record { lsn: Lsn(start), end: Lsn(after), rmid, info, xid, blocks: &blocks, changes: &changes };
            on_record(&r, *prev_end);
        }
        *prev_end = Some(after);
        if let Some(e) = event(rmid, info, xid, &rec, Lsn(start)) {
            let switch = matches!(e, Event::Switch { .. });
            d.events.push(e);
            if switch {
                d.end = End::Switch;
                return;
            }
        }
        if after >= seg_end {
            d.end = if after == seg_end { End::SegmentEnd } else { End::ContinuesIntoNext };
            return;
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
            let _ = decode_segment_with_blocks(&seg, Lsn(1 << 20), Some(&noise), |_| {});
        }

        /// Valid records (right CRC) whose bodies are noise: the header walk and the relation
        /// changes must cope with anything a CRC lets through.
        #[test]
        fn never_panics_on_crc_valid_records_with_noise(
            recs in proptest::collection::vec((0u8..=255, 0u8..=255, proptest::collection::vec(any::<u8>(), 0..300)), 1..20)
        ) {
            let recs: Vec<Vec<u8>> = recs.iter().map(|(rmid, info, body)| record(*rmid, *info, 7, body)).collect();
            let seg = segment(&recs);
            let (plain, with, n) = both(&seg);
            prop_assert_eq!(plain, with);
            prop_assert_eq!(n.len() as u64, decode_segment(&seg, Lsn(1 << 20), None).records);
        }

        /// Well-formed block headers, however combined, decode to what was written.
        #[test]
        fn block_headers_round_trip(
            spec in proptest::collection::vec((0u8..4, any::<bool>(), any::<bool>(), 0u16..300, 0u8..4, any::<u32>(), 0u32..3), 0..6),
            main_len in 0usize..600,
        ) {
            let mut body = Body::default();
            let mut want = vec![];
            let mut prev: Option<RelFileNode> = None;
            for (i, (fork, same, will_init, data_len, img, block, relsel)) in spec.iter().enumerate() {
                let rnode = RelFileNode { spc_node: 1663, db_node: 5, rel_node: 16384 + relsel };
                let same = *same && prev == Some(rnode);
                let image = match img {
                    0 => None,
                    1 => Some(Img { hole_offset: 0, hole_length: 0, info: BKPIMAGE_APPLY, stored: 8192, compressed_hole: None }),
                    2 => Some(Img { hole_offset: 100, hole_length: 8000, info: BKPIMAGE_HAS_HOLE | BKPIMAGE_APPLY, stored: 192, compressed_hole: None }),
                    _ => Some(Img { hole_offset: 64, hole_length: 5000, info: BKPIMAGE_HAS_HOLE | BKPIMAGE_COMPRESS_LZ4, stored: 700, compressed_hole: Some(5000) }),
                };
                body.block(i as u8 * 2, *fork, same, *will_init, *data_len, image, rnode, *block);
                prev = Some(rnode);
                want.push((i as u8 * 2, rnode, ForkNumber(*fork), *block, *will_init, *data_len, image.map(|i| (i.stored, i.hole_offset, i.hole_length))));
            }
            body.main(&vec![9u8; main_len]);
            let rec = record(10, 0, 1, &body.bytes());
            let mut blocks = vec![];
            let main = walk_headers(&rec, Some(&mut blocks)).unwrap();
            prop_assert_eq!(main.len(), main_len);
            let got: Vec<_> = blocks
                .iter()
                .map(|b| (b.id, b.rnode, b.fork, b.block, b.will_init(), b.data_len, b.image.map(|i| (i.length, i.hole_offset, i.hole_length))))
                .collect();
            prop_assert_eq!(got, want);
        }
    }

    use crate::walsynth::{Body, Img, record};

    /// A 1 MiB segment (the second: LSN 0/100000) holding `recs` from its first page on.
    fn segment(recs: &[Vec<u8>]) -> Vec<u8> {
        let size = crate::WalSegSize::new(1 << 20).unwrap();
        crate::walsynth::segments(Lsn(1 << 20), size, recs).swap_remove(0)
    }

    type Seen = Vec<(Lsn, Vec<BlockRef>, Vec<RelChange>)>;

    /// Decodes without and with blocks: both results, and the records seen.
    fn both(seg: &[u8]) -> (Decoded, Decoded, Seen) {
        let mut seen = vec![];
        let with = decode_segment_with_blocks(seg, Lsn(1 << 20), None, |r| {
            seen.push((r.lsn, r.blocks.to_vec(), r.changes.to_vec()));
        });
        (decode_segment(seg, Lsn(1 << 20), None), with, seen)
    }

    fn changes_of(rmid: u8, info: u8, body: &Body) -> Vec<RelChange> {
        let rec = record(rmid, info, 1, &body.bytes());
        let (mut b, mut c) = (vec![], vec![]);
        record_details(rmid, info, &rec, &mut b, &mut c);
        c
    }

    fn main_only(m: &[u8]) -> Body {
        Body::main_only(m)
    }

    fn words(ws: &[u32]) -> Vec<u8> {
        ws.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    const R1: RelFileNode = RelFileNode { spc_node: 1663, db_node: 5, rel_node: 16384 };
    const R2: RelFileNode = RelFileNode { spc_node: 1663, db_node: 5, rel_node: 16390 };

    #[test]
    fn block_references_with_same_rel_images_and_data() {
        let mut body = Body::default();
        body.block(
            0,
            0,
            false,
            false,
            14,
            Some(Img {
                hole_offset: 72,
                hole_length: 8104,
                info: BKPIMAGE_HAS_HOLE | BKPIMAGE_APPLY,
                stored: 88,
                compressed_hole: None,
            }),
            R1,
            7,
        );
        body.block(1, 2, true, false, 0, None, R1, 0);
        body.block(3, 0, false, true, 30, None, R2, 12);
        body.block(
            4,
            0,
            false,
            false,
            0,
            Some(Img {
                hole_offset: 300,
                hole_length: 7000,
                info: BKPIMAGE_HAS_HOLE | BKPIMAGE_COMPRESS_ZSTD,
                stored: 400,
                compressed_hole: Some(7000),
            }),
            R2,
            13,
        );
        body.main(&[1, 2, 3]);
        let rec = record(10, 0, 1, &body.bytes());
        let mut blocks = vec![];
        assert_eq!(walk_headers(&rec, Some(&mut blocks)).unwrap(), &[1, 2, 3]);
        assert_eq!(blocks.len(), 4);
        assert_eq!((blocks[0].id, blocks[0].rnode, blocks[0].fork, blocks[0].block), (0, R1, ForkNumber::MAIN, 7));
        assert_eq!(blocks[0].image, Some(BlockImage { length: 88, hole_offset: 72, hole_length: 8104, bimg_info: 3 }));
        assert!(blocks[0].has_data() && !blocks[0].will_init() && blocks[0].image.unwrap().apply());
        assert_eq!(
            (blocks[1].id, blocks[1].rnode, blocks[1].fork, blocks[1].block),
            (1, R1, ForkNumber::VISIBILITYMAP, 0)
        );
        assert_eq!(blocks[1].flags, BKPBLOCK_SAME_REL);
        assert!(blocks[2].will_init() && blocks[2].rnode == R2 && blocks[2].data_len == 30);
        let img = blocks[3].image.unwrap();
        assert_eq!((img.length, img.hole_length, img.compression(), img.apply()), (400, 7000, Some("zstd"), false));
        // The same record decoded without collecting blocks finds the same main data.
        assert_eq!(main_data(&rec), Some(&[1u8, 2, 3][..]));
    }

    #[test]
    fn an_fpi_record_without_main_data() {
        let mut body = Body::default();
        body.block(
            0,
            3,
            false,
            false,
            0,
            Some(Img {
                hole_offset: 72,
                hole_length: 8104,
                info: BKPIMAGE_HAS_HOLE | BKPIMAGE_APPLY,
                stored: 88,
                compressed_hole: None,
            }),
            R1,
            0,
        );
        let rec = record(RM_XLOG_ID, XLOG_FPI, 1, &body.bytes());
        let (mut b, mut c) = (vec![], vec![]);
        record_details(RM_XLOG_ID, XLOG_FPI, &rec, &mut b, &mut c);
        assert_eq!(c, vec![]);
        assert_eq!((b.len(), b[0].fork, b[0].block), (1, ForkNumber::INIT, 0));
    }

    #[test]
    fn malformed_headers_are_unknown_never_guessed() {
        // SAME_REL on the first reference: no relation to repeat.
        let mut body = Body::default();
        body.block(0, 0, true, false, 0, None, R1, 1);
        let c = changes_of(10, 0, &body);
        assert!(matches!(&c[..], [RelChange::Unknown { reason }] if reason.contains("SAME_REL")), "{c:?}");
        // Out-of-order block ids.
        let mut body = Body::default();
        body.block(2, 0, false, false, 0, None, R1, 1);
        body.block(1, 0, false, false, 0, None, R1, 2);
        assert!(matches!(&changes_of(10, 0, &body)[..], [RelChange::Unknown { reason }] if reason.contains("order")));
        // A fork above 3.
        let mut body = Body::default();
        body.block(0, 9, false, false, 0, None, R1, 1);
        assert!(matches!(&changes_of(10, 0, &body)[..], [RelChange::Unknown { reason }] if reason.contains("fork 9")));
        // Trailing bytes the headers do not account for.
        let mut bytes = main_only(&[1, 2]).bytes();
        bytes.push(0);
        let rec = record(10, 0, 1, &bytes);
        assert!(walk_headers(&rec, None).is_err());
        // An image claiming no hole but shorter than a page, uncompressed.
        let mut body = Body::default();
        body.block(
            0,
            0,
            false,
            false,
            0,
            Some(Img { hole_offset: 0, hole_length: 0, info: 0, stored: 100, compressed_hole: None }),
            R1,
            1,
        );
        assert!(matches!(&changes_of(10, 0, &body)[..], [RelChange::Unknown { .. }]));
    }

    #[test]
    fn storage_database_tablespace_and_relmap_records() {
        let create = main_only(&[words(&[1663, 5, 16384]), words(&[3])].concat());
        assert_eq!(
            changes_of(RM_SMGR_ID, XLOG_SMGR_CREATE | XLR_SPECIAL_REL_UPDATE, &create),
            vec![RelChange::Create { rnode: R1, fork: ForkNumber::INIT }]
        );
        let trunc = main_only(&words(&[10, 1663, 5, 16384, 7]));
        assert_eq!(
            changes_of(RM_SMGR_ID, XLOG_SMGR_TRUNCATE | XLR_SPECIAL_REL_UPDATE, &trunc),
            vec![RelChange::Truncate {
                rnode: R1,
                blocks: 10,
                flags: SMGR_TRUNCATE_HEAP | SMGR_TRUNCATE_VM | SMGR_TRUNCATE_FSM
            }]
        );
        // A short truncate record: unknown, not a guess.
        assert!(matches!(
            &changes_of(RM_SMGR_ID, XLOG_SMGR_TRUNCATE, &main_only(&words(&[10, 1663])))[..],
            [RelChange::Unknown { .. }]
        ));
        assert!(matches!(&changes_of(RM_SMGR_ID, 0x30, &trunc)[..], [RelChange::Unknown { .. }]));
        assert_eq!(
            changes_of(RM_DBASE_ID, XLOG_DBASE_CREATE_FILE_COPY, &main_only(&words(&[16401, 1663, 1, 1663]))),
            vec![RelChange::DatabaseCreateFileCopy {
                db_id: 16401,
                tablespace_id: 1663,
                src_db_id: 1,
                src_tablespace_id: 1663
            }]
        );
        assert_eq!(
            changes_of(RM_DBASE_ID, XLOG_DBASE_CREATE_WAL_LOG, &main_only(&words(&[16402, 1663]))),
            vec![RelChange::DatabaseCreateWalLog { db_id: 16402, tablespace_id: 1663 }]
        );
        assert_eq!(
            changes_of(RM_DBASE_ID, XLOG_DBASE_DROP, &main_only(&words(&[16402, 2, 1663, 16385]))),
            vec![RelChange::DatabaseDrop { db_id: 16402, tablespace_ids: vec![1663, 16385] }]
        );
        assert!(matches!(
            &changes_of(RM_DBASE_ID, XLOG_DBASE_DROP, &main_only(&words(&[16402, 3, 1663])))[..],
            [RelChange::Unknown { .. }]
        ));
        let mut ts = words(&[16385]);
        ts.extend(b"/tmp/ts\0");
        assert_eq!(
            changes_of(RM_TBLSPC_ID, XLOG_TBLSPC_CREATE, &main_only(&ts)),
            vec![RelChange::TablespaceCreate { ts_id: 16385, path: "/tmp/ts".into() }]
        );
        assert_eq!(
            changes_of(RM_TBLSPC_ID, XLOG_TBLSPC_DROP, &main_only(&words(&[16385]))),
            vec![RelChange::TablespaceDrop { ts_id: 16385 }]
        );
        assert_eq!(
            changes_of(RM_RELMAP_ID, XLOG_RELMAP_UPDATE, &main_only(&words(&[5, 1663, 512]))),
            vec![RelChange::RelmapUpdate { db_id: 5, tablespace_id: 1663 }]
        );
    }

    #[test]
    fn dropped_relations_at_commit_and_abort() {
        // Commit with dbinfo, two subxacts, two rels, one dropped-stats item, one inval message.
        let mut m = 1234u64.to_le_bytes().to_vec();
        m.extend(words(&[XACT_XINFO_HAS_DBINFO
            | XACT_XINFO_HAS_SUBXACTS
            | XACT_XINFO_HAS_RELFILENODES
            | XACT_XINFO_HAS_DROPPED_STATS
            | XACT_XINFO_HAS_INVALS]));
        m.extend(words(&[5, 1663, 2, 801, 802, 2, 1663, 5, 16384, 1663, 5, 16390, 1, 2, 5, 16384, 1]));
        m.extend([0u8; 16]);
        let info = XLOG_XACT_COMMIT | XLOG_XACT_HAS_INFO;
        assert_eq!(
            changes_of(RM_XACT_ID, info, &main_only(&m)),
            vec![
                RelChange::Drop { rnode: R1, kind: XactKind::Commit },
                RelChange::Drop { rnode: R2, kind: XactKind::Commit }
            ]
        );
        // An abort lists the relations its transaction created.
        let mut m = 1234u64.to_le_bytes().to_vec();
        m.extend(words(&[XACT_XINFO_HAS_RELFILENODES, 1, 1663, 5, 16384]));
        assert_eq!(
            changes_of(RM_XACT_ID, XLOG_XACT_ABORT | XLOG_XACT_HAS_INFO, &main_only(&m)),
            vec![RelChange::Drop { rnode: R1, kind: XactKind::Abort }]
        );
        // A count running past the record: unknown.
        let mut m = 1234u64.to_le_bytes().to_vec();
        m.extend(words(&[XACT_XINFO_HAS_RELFILENODES, 3, 1663, 5, 16384]));
        assert!(matches!(
            &changes_of(RM_XACT_ID, XLOG_XACT_ABORT | XLOG_XACT_HAS_INFO, &main_only(&m))[..],
            [RelChange::Unknown { .. }]
        ));
        // A plain commit: nothing.
        assert_eq!(changes_of(RM_XACT_ID, XLOG_XACT_COMMIT, &main_only(&1234u64.to_le_bytes())), vec![]);
        // Commit prepared with dropped stats (12-byte items) before the twophase xid.
        let mut m = 1234u64.to_le_bytes().to_vec();
        m.extend(words(&[XACT_XINFO_HAS_DROPPED_STATS | XACT_XINFO_HAS_TWOPHASE, 2, 2, 5, 16384, 2, 5, 16390, 777]));
        assert_eq!(twophase_xid(XLOG_XACT_COMMIT_PREPARED | XLOG_XACT_HAS_INFO, &m, true), Some(777));
    }

    #[test]
    fn unknown_resource_managers_and_flags() {
        let c = changes_of(130, 0, &main_only(&[1]));
        assert!(matches!(&c[..], [RelChange::Unknown { reason }] if reason.contains("130")), "{c:?}");
        assert_eq!(changes_of(10, 0x10, &main_only(&[1])), vec![]);
        assert!(matches!(
            &changes_of(10, 0x10 | XLR_SPECIAL_REL_UPDATE, &main_only(&[1]))[..],
            [RelChange::Unknown { .. }]
        ));
        assert!(matches!(&changes_of(RM_XLOG_ID, 0xE0, &main_only(&[1]))[..], [RelChange::Unknown { .. }]));
        assert!(matches!(&changes_of(RM_XACT_ID, 0x70, &main_only(&[1]))[..], [RelChange::Unknown { .. }]));
        // wal_level = minimal (0) in a parameter change; replica (1) is fine.
        let minimal = main_only(&[words(&[100, 8, 10, 0, 64, 0]), vec![0, 0, 0, 0]].concat());
        assert!(
            matches!(&changes_of(RM_XLOG_ID, XLOG_PARAMETER_CHANGE, &minimal)[..], [RelChange::Unknown { reason }] if reason.contains("minimal"))
        );
        let replica = main_only(&[words(&[100, 8, 10, 0, 64, 1]), vec![0, 0, 0, 0]].concat());
        assert_eq!(changes_of(RM_XLOG_ID, XLOG_PARAMETER_CHANGE, &replica), vec![]);
    }

    #[test]
    fn decoding_with_blocks_reports_every_record_and_changes_nothing_else() {
        let mut heap = Body::default();
        heap.block(0, 0, false, true, 20, None, R1, 0);
        heap.main(&[0; 3]);
        let mut big = Body::default();
        big.block(
            0,
            0,
            false,
            false,
            0,
            Some(Img { hole_offset: 0, hole_length: 0, info: BKPIMAGE_APPLY, stored: 8192, compressed_hole: None }),
            R2,
            5,
        );
        let recs = vec![
            record(10, 0, 700, &heap.bytes()),
            record(
                RM_SMGR_ID,
                XLOG_SMGR_CREATE | XLR_SPECIAL_REL_UPDATE,
                700,
                &main_only(&[words(&[1663, 5, 16390]), words(&[0])].concat()).bytes(),
            ),
            // Crosses a page boundary.
            record(RM_XLOG_ID, XLOG_FPI, 0, &big.bytes()),
            record(RM_XACT_ID, XLOG_XACT_COMMIT, 700, &main_only(&1234u64.to_le_bytes()).bytes()),
        ];
        let seg = segment(&recs);
        let (plain, with, seen) = both(&seg);
        assert_eq!(plain, with);
        assert_eq!((plain.records, plain.end, plain.events.len()), (4, End::Zeros, 1));
        assert_eq!(seen.len(), 4);
        assert_eq!(seen[0].0, Lsn((1 << 20) + 40));
        assert_eq!((seen[0].1[0].rnode, seen[0].1[0].block, seen[0].1[0].will_init()), (R1, 0, true));
        assert_eq!(seen[1].2, vec![RelChange::Create { rnode: R2, fork: ForkNumber::MAIN }]);
        assert_eq!((seen[2].1[0].rnode, seen[2].1[0].block), (R2, 5));
        assert!(seen[3].1.is_empty() && seen[3].2.is_empty());
    }

    #[test]
    fn an_empty_segment_ends_in_zeros() {
        let name = crate::names::SegName { tli: crate::TimelineId(1), log: 0, seg: 1 };
        let seg = crate::walpage::synthetic_segment(name, crate::SystemId(1), crate::WalSegSize::new(1 << 20).unwrap());
        let d = decode_segment(&seg, Lsn(1 << 20), None);
        assert_eq!((d.records, d.end), (0, End::Zeros));
    }

    // The tail record from a segment's last pages (decode_tail_from_end).

    const MB: u64 = 1 << 20;
    const PAGE: usize = XLOG_BLCKSZ;

    fn seg_size() -> crate::WalSegSize {
        crate::WalSegSize::new(MB).unwrap()
    }

    /// An XLOG_FPI record with a whole-page image of block `block` of `R1` (8 kB and a bit:
    /// longer than a page).
    fn fpi(block: u32) -> Vec<u8> {
        let mut b = Body::default();
        let img = Img { hole_offset: 0, hole_length: 0, info: BKPIMAGE_APPLY, stored: 8192, compressed_hole: None };
        b.block(0, 0, false, false, 0, Some(img), R1, block);
        record(RM_XLOG_ID, XLOG_FPI, 0, &b.bytes())
    }

    /// A heap record referencing block `block` of `R2`, about `len` bytes long in all (>= 60).
    fn heap(block: u32, len: usize) -> Vec<u8> {
        let mut b = Body::default();
        b.block(0, 0, false, false, 0, None, R2, block);
        // 24 (XLogRecord) + 20 (block header, relation, block) + the main data's header and bytes.
        b.main(&vec![7u8; len.max(60) - 49]);
        record(10, 0, 1, &b.bytes())
    }

    /// A record of only main data, exactly `len` bytes long (a multiple of 8).
    fn exact(len: usize) -> Vec<u8> {
        let main = match len {
            24 => 0,
            32..=280 => len - 26,
            288.. => len - 29,
            _ => panic!("no record is {len} bytes"),
        };
        let r = record(10, 0, 1, &Body::main_only(&vec![7u8; main]).bytes());
        assert_eq!(r.len(), len);
        r
    }

    fn switch() -> Vec<u8> {
        record(RM_XLOG_ID, XLOG_SWITCH, 0, &[])
    }

    type TailSeen = Vec<(Lsn, Lsn, Vec<BlockRef>, Vec<RelChange>)>;

    /// What decoding the whole segment with the next says of its tail record: the end of the
    /// record before it (where the segment's map alone ends) and the record, or how it ended.
    fn whole_decode(seg: &[u8], start: Lsn, next: &[u8]) -> (Option<(Lsn, TailSeen)>, Decoded) {
        let seg_end = Lsn(start.0 + seg.len() as u64);
        let (mut before, mut tail) = (start, vec![]);
        let d = decode_segment_with_blocks(seg, start, Some(next), |r| {
            if r.end > seg_end {
                tail.push((r.lsn, r.end, r.blocks.to_vec(), r.changes.to_vec()));
            } else {
                before = r.end;
            }
        });
        ((!tail.is_empty()).then_some((before, tail)), d)
    }

    /// decode_tail_from_end with the segment's last `k` bytes, and what went to the callback.
    fn from_end(seg: &[u8], start: Lsn, next: &[u8], k: usize) -> (TailDecode, TailSeen) {
        let mut seen = vec![];
        let t = decode_tail_from_end(&seg[seg.len() - k..], start, seg.len() as u64, next, |r| {
            seen.push((r.lsn, r.end, r.blocks.to_vec(), r.changes.to_vec()));
        });
        if !matches!(t, TailDecode::Tail { .. }) {
            assert!(seen.is_empty(), "{t:?}: {seen:?}");
        }
        (t, seen)
    }

    /// From a window of `k` bytes, doubling it while more is needed: the answer and the window
    /// that gave it. Every larger window gives the same answer.
    fn grow(seg: &[u8], start: Lsn, next: &[u8], mut k: usize) -> (TailDecode, TailSeen, usize) {
        loop {
            let (t, seen) = from_end(seg, start, next, k);
            if t != TailDecode::NeedMore {
                let mut larger = k;
                while larger < seg.len() {
                    larger = (larger * 2).min(seg.len());
                    let (l, l_seen) = from_end(seg, start, next, larger);
                    if t == TailDecode::NoTail(NoTail::ZeroedPages) {
                        // A larger window may reach the switch or the zeros before them.
                        assert!(matches!(l, TailDecode::NoTail(NoTail::ZeroedPages | NoTail::Switch | NoTail::Zeros)));
                    } else if t == TailDecode::NoTail(NoTail::Zeros) {
                        // A window that begins inside a switch record sees only its padding,
                        // zeros where a record should begin; a larger one reaches the switch.
                        // Either way no record reaches the next segment (the caller stores
                        // nothing for any NoTail).
                        assert!(
                            matches!(l, TailDecode::NoTail(NoTail::Zeros | NoTail::Switch)),
                            "window {larger}: {l:?}"
                        );
                    } else {
                        assert_eq!((l, l_seen), (t.clone(), seen.clone()), "window {larger}");
                    }
                }
                return (t, seen, k);
            }
            assert!(k < seg.len(), "more needed than the whole segment");
            k = (k * 2).min(seg.len());
        }
    }

    /// The answer from the last `k` bytes (grown as needed) agrees with decoding the whole
    /// segment with the next one; returns it and the window that gave it.
    fn agrees(seg: &[u8], start: Lsn, next: &[u8], k: usize) -> (TailDecode, usize) {
        let (t, seen, k) = grow(seg, start, next, k);
        let (reference, d) = whole_decode(seg, start, next);
        match (&t, reference) {
            (TailDecode::Tail { before, start: s, end }, Some((b, tail))) => {
                assert_eq!((*before, *s, *end), (b, tail[0].0, tail[0].1));
                assert_eq!(seen, tail);
                // Where the segment's map alone ends.
                assert_eq!(*before, decode_segment(seg, start, None).end_of_valid.min(*s));
            }
            (TailDecode::NoTail(why), None) => match why {
                NoTail::Switch => assert_eq!(d.end, End::Switch),
                NoTail::SegmentEnd => assert_eq!(d.end, End::SegmentEnd),
                // A window that begins inside a switch record sees only its padding.
                NoTail::Zeros => assert!(matches!(d.end, End::Zeros | End::Switch), "{d:?}"),
                NoTail::ZeroedPages => assert!(matches!(d.end, End::Switch | End::Zeros), "{d:?}"),
                NoTail::NoneBegins => assert_eq!((d.end, d.records), (End::ContinuesIntoNext, 0)),
            },
            (TailDecode::Abandoned { before }, None) => {
                assert_eq!(d.end, End::Invalid);
                assert_eq!(*before, decode_segment(seg, start, None).end_of_valid);
            }
            (TailDecode::Invalid(_), _) => assert!(matches!(d.end, End::Invalid | End::ContinuesIntoNext), "{d:?}"),
            (t, r) => panic!("from the end: {t:?}; whole: {r:?} {d:?}"),
        }
        (t, k)
    }

    /// `recs` laid out from 0/100000 (1 MiB segments): the segments and where each record is.
    fn laid_out(recs: &[Vec<u8>]) -> (Vec<Vec<u8>>, Vec<(Lsn, Lsn)>) {
        crate::walsynth::layout(Lsn(MB), seg_size(), recs)
    }

    /// Heap records of 1000 bytes from `from` on, until one ends at or after `to` (an offset in
    /// the first segment); returns their number.
    fn fill_until(recs: &mut Vec<Vec<u8>>, to: u64) -> usize {
        let n = recs.len();
        loop {
            let (_, at) = laid_out(recs);
            if at.last().is_some_and(|a| a.1.0 >= MB + to) {
                return recs.len() - n;
            }
            recs.push(heap(recs.len() as u32, 1000));
        }
    }

    #[test]
    fn a_tail_record_from_the_last_pages() {
        // Records longer than a page: every page continues one.
        let recs: Vec<Vec<u8>> = (0..200).map(fpi).collect();
        let (segs, _) = laid_out(&recs);
        let start = Lsn(MB);
        // One page holds the tail record's beginning but not the end of the one before it.
        assert_eq!(from_end(&segs[0], start, &segs[1], PAGE).0, TailDecode::NeedMore);
        let (t, k) = agrees(&segs[0], start, &segs[1], PAGE);
        assert_eq!(k, 2 * PAGE);
        assert!(matches!(t, TailDecode::Tail { .. }));
        assert_eq!(agrees(&segs[0], start, &segs[1], 64 << 10), (t, 64 << 10));
        // The next segment's tail too.
        let (segs, _) = laid_out(&(0..400).map(fpi).collect::<Vec<_>>());
        let (t, _) = agrees(&segs[1], Lsn(2 * MB), &segs[2], 64 << 10);
        assert!(matches!(t, TailDecode::Tail { .. }));
        // Small records, many per page, the window's first page continuing one.
        let mut recs = vec![];
        fill_until(&mut recs, MB + 5000);
        let (segs, _) = laid_out(&recs);
        for k in [PAGE, 3 * PAGE, 64 << 10, MB as usize] {
            let (t, _) = agrees(&segs[0], start, &segs[1], k);
            assert!(matches!(t, TailDecode::Tail { .. }), "{k}: {t:?}");
        }
    }

    #[test]
    fn a_tail_record_longer_than_the_window_needs_a_larger_one() {
        let mut recs = vec![];
        fill_until(&mut recs, MB - 100_000);
        // 200 kB, from about 100 kB before the segment's end.
        let mut big = Body::default();
        big.block(0, 0, false, true, 0, None, R1, 77);
        big.main(&vec![1u8; 200_000]);
        recs.push(record(10, 0, 1, &big.bytes()));
        recs.extend((0..3).map(fpi));
        let (segs, at) = laid_out(&recs);
        let tail_at = at[at.len() - 4];
        assert!(tail_at.0.0 < 2 * MB - 64 * 1024 && tail_at.1.0 > 2 * MB, "{tail_at:?}");
        let start = Lsn(MB);
        assert_eq!(from_end(&segs[0], start, &segs[1], 64 << 10).0, TailDecode::NeedMore);
        let (t, k) = agrees(&segs[0], start, &segs[1], 64 << 10);
        assert_eq!(k, 128 << 10);
        let TailDecode::Tail { start: s, end, .. } = t else { panic!("{t:?}") };
        assert_eq!((s, end), tail_at);
        let (_, seen) = from_end(&segs[0], start, &segs[1], k);
        assert_eq!((seen.len(), seen[0].2[0].block), (1, 77));
    }

    #[test]
    fn no_tail_at_a_record_boundary_a_switch_or_zeros() {
        let start = Lsn(MB);
        // A record that ends exactly at the segment's end: fill to the last page, then one
        // record of exactly the space left.
        let mut recs = vec![];
        fill_until(&mut recs, MB - PAGE as u64 + 100);
        let (_, at) = laid_out(&recs);
        let left = (2 * MB - maxalign(at.last().unwrap().1.0)) as usize;
        recs.push(exact(left));
        recs.extend((0..3).map(fpi));
        let (segs, at) = laid_out(&recs);
        assert_eq!(at[at.len() - 4].1, Lsn(2 * MB));
        for k in [PAGE, 64 << 10] {
            assert_eq!(agrees(&segs[0], start, &segs[1], k), (TailDecode::NoTail(NoTail::SegmentEnd), k));
        }

        // A switch in the last page, and one well before the window.
        let mut recs = vec![];
        fill_until(&mut recs, MB - PAGE as u64 + 100);
        recs.push(switch());
        let (segs, _) = laid_out(&recs);
        let next = crate::walsynth::segments(Lsn(2 * MB), seg_size(), &[fpi(5)]).swap_remove(0);
        assert_eq!(agrees(&segs[0], start, &next, PAGE), (TailDecode::NoTail(NoTail::Switch), PAGE));
        let recs = vec![fpi(1), fpi(2), switch()];
        let (segs, _) = laid_out(&recs);
        assert_eq!(agrees(&segs[0], start, &next, 64 << 10), (TailDecode::NoTail(NoTail::ZeroedPages), 64 << 10));
        assert_eq!(from_end(&segs[0], start, &next, MB as usize).0, TailDecode::NoTail(NoTail::Switch));

        // Zeros where a record should begin, in the window's second page; and after it.
        let mut recs = vec![];
        fill_until(&mut recs, MB - 7 * PAGE as u64);
        let (segs, _) = laid_out(&recs);
        assert_eq!(agrees(&segs[0], start, &next, 64 << 10), (TailDecode::NoTail(NoTail::Zeros), 64 << 10));
        assert_eq!(agrees(&segs[0], start, &next, PAGE), (TailDecode::NoTail(NoTail::ZeroedPages), PAGE));
    }

    #[test]
    fn a_tail_record_cut_off_by_a_crash() {
        let recs: Vec<Vec<u8>> = (0..200).map(fpi).collect();
        let (segs, _) = laid_out(&recs);
        let start = Lsn(MB);
        // Recovery wrote over the record's missing part: the next segment's first page is
        // flagged XLP_FIRST_IS_OVERWRITE_CONTRECORD and holds new records.
        let mut next = crate::walsynth::segments(Lsn(2 * MB), seg_size(), &[fpi(999)]).swap_remove(0);
        let h =
            crate::walsynth::page_header(Lsn(2 * MB), seg_size(), crate::walpage::XLP_FIRST_IS_OVERWRITE_CONTRECORD, 0);
        next[..h.len()].copy_from_slice(&h);
        let (t, k) = agrees(&segs[0], start, &next, PAGE);
        assert!(matches!(t, TailDecode::Abandoned { .. }), "{t:?}");
        assert_eq!(k, 2 * PAGE);
        // Without the flag, a page that does not continue the record is invalid.
        let h = crate::walsynth::page_header(Lsn(2 * MB), seg_size(), 0, 0);
        next[..h.len()].copy_from_slice(&h);
        assert!(matches!(from_end(&segs[0], start, &next, 64 << 10).0, TailDecode::Invalid(_)));
        // Nor does a next segment that stops short of the record's end.
        assert!(matches!(from_end(&segs[0], start, &segs[1][..100], 64 << 10).0, TailDecode::Invalid(_)));
    }

    #[test]
    fn a_segment_a_record_runs_through() {
        // A 1.2 MB record from near the end of the first segment through the whole second one.
        let mut recs = vec![];
        fill_until(&mut recs, MB - 20_000);
        recs.push(record(10, 0, 1, &Body::main_only(&vec![3u8; 1_200_000]).bytes()));
        recs.push(fpi(1));
        let (segs, _) = laid_out(&recs);
        assert_eq!(segs.len(), 3);
        let (t, k) = agrees(&segs[1], Lsn(2 * MB), &segs[2], 64 << 10);
        assert_eq!((t, k), (TailDecode::NoTail(NoTail::NoneBegins), MB as usize));
        // The first segment's tail is that record.
        let (t, _) = agrees(&segs[0], Lsn(MB), &segs[1], 64 << 10);
        assert!(matches!(t, TailDecode::Invalid(_)), "it runs past the next segment too: {t:?}");
    }

    #[test]
    fn arguments_that_make_no_window() {
        let (segs, _) = laid_out(&(0..200).map(fpi).collect::<Vec<_>>());
        let s = &segs[0];
        let f = |w: &[u8], start: u64, size: u64| decode_tail_from_end(w, Lsn(start), size, &segs[1], |_| {});
        for (w, start, size) in [
            (&s[..0], MB, MB),
            (&s[..100], MB, MB),
            (&s[..PAGE + 8], MB, MB),
            (&s[..], MB, MB / 2),
            (&s[..PAGE], MB + 8, MB),
            (&s[..PAGE], MB, 3 * MB),
            (&s[..PAGE], u64::MAX - MB + 1, MB),
            (&s[..PAGE], 0, 4096),
        ] {
            assert!(matches!(f(w, start, size), TailDecode::Invalid(_)), "{} {start} {size}", w.len());
        }
        // Pages from elsewhere in the segment: their addresses are not the window's.
        assert!(matches!(f(&s[..64 << 10], MB, MB), TailDecode::Invalid(r) if r.contains("claims address")));
    }

    /// Records of assorted sizes over three segments, ending in a record, a switch or zeros.
    fn arb_wal() -> impl Strategy<Value = Vec<Vec<u8>>> {
        let rec = prop_oneof![
            (0u32..100).prop_map(fpi),
            (60usize..3000, 0u32..100).prop_map(|(len, b)| heap(b, len)),
            (3000usize..40_000).prop_map(|len| record(10, 0, 1, &Body::main_only(&vec![5u8; len]).bytes())),
        ];
        (proptest::collection::vec(rec, 20..400), 0u8..4).prop_map(|(mut recs, end)| {
            match end {
                0 => recs.push(switch()),
                1 => {
                    recs.push(switch());
                    recs.push(fpi(1));
                }
                _ => {}
            }
            recs
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// From any window, grown as needed, the answer is the whole decode's.
        #[test]
        fn windows_agree_with_whole_segments(recs in arb_wal(), pages in 1usize..40) {
            let (segs, _) = laid_out(&recs);
            let zeros = vec![0u8; MB as usize];
            let next = segs.get(1).unwrap_or(&zeros);
            agrees(&segs[0], Lsn(MB), next, pages * PAGE);
            if segs.len() > 2 {
                agrees(&segs[1], Lsn(2 * MB), &segs[2], pages * PAGE);
            }
        }

        /// Damaged windows and next segments: any answer, never a panic, and a tail that is
        /// reported went to the callback once.
        #[test]
        fn never_panics_on_damaged_windows(
            recs in arb_wal(),
            pages in 1usize..20,
            flips in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>(), any::<bool>()), 1..20),
        ) {
            let (segs, _) = laid_out(&recs);
            let k = pages * PAGE;
            let mut w = segs[0][MB as usize - k..].to_vec();
            let mut next = segs.get(1).cloned().unwrap_or_else(|| vec![0u8; MB as usize]);
            for (i, b, in_next) in flips {
                if in_next {
                    let i = i.index(next.len());
                    next[i] ^= b;
                } else {
                    let i = i.index(w.len());
                    w[i] ^= b;
                }
            }
            let mut seen = 0;
            let t = decode_tail_from_end(&w, Lsn(MB), MB, &next, |_| seen += 1);
            prop_assert_eq!(seen, usize::from(matches!(t, TailDecode::Tail { .. })));
        }

        #[test]
        fn tail_never_panics_on_random_bytes(
            window in proptest::collection::vec(any::<u8>(), 0..40_000),
            next in proptest::collection::vec(any::<u8>(), 0..20_000),
            pages in 0usize..5,
            start in any::<u64>(),
            size_log in 0u32..64,
        ) {
            // Random bytes as given, and as whole pages of a 1 MiB segment.
            let _ = decode_tail_from_end(&window, Lsn(start), 1u64 << size_log, &next, |_| {});
            let _ = decode_tail_from_end(&window, Lsn(start), start, &next, |_| {});
            let k = (pages * PAGE).min(window.len() / PAGE * PAGE);
            let _ = decode_tail_from_end(&window[..k], Lsn((start % 1000) * MB), MB, &next, |_| {});
        }
    }
}
