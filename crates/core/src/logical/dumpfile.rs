//! The data offsets of a `pg_dump` custom-format archive.
//!
//! `pg_dump --format=custom` writes its table of contents (TOC) first and the data blocks after
//! it. Writing to a file, it goes back at the end and fills in each TOC entry's data offset;
//! writing to a pipe (as a capture does) it cannot, and leaves every offset "not set". From
//! such an archive `pg_restore --jobs N` finds a table's data by reading through every block
//! before it, in every worker, and cannot order the work by table size: on pgbench data a
//! parallel restore of a piped dump takes about 20% longer than of the same dump written to a
//! file. [`scan`] reads an archive once, front to back (as it is being written: it takes a
//! [`Source`]), and returns the patches that set the missing offsets: each patch overwrites an
//! offset field of the same length in place, so the result is the archive `pg_dump -f` would
//! have written. Anything unexpected (an unknown archive version or block type, a block whose
//! entry is not in the TOC) ends the scan with a reason and no patch is applied: the archive
//! stays as it was, correct and only slower to restore in parallel.
//!
//! The layout read here (archive versions 1.12 to 1.16, PostgreSQL 9.2 to 17 and later):
//! a header (`PGDMP`, version bytes, int and offset sizes, format, compression, creation time,
//! database name and versions), the TOC (a count, then per entry its dump ID, strings and a
//! data-state byte followed by an offset), then the data blocks: a type byte (1 = table data,
//! 3 = large objects), the entry's dump ID, and length-prefixed chunks ending with a zero
//! length (for large objects: per object an OID and its chunks, ending with OID 0). An integer
//! is a sign byte then `int size` bytes, least significant first; a string is an integer
//! length (negative for NULL) then its bytes.

use std::collections::HashMap;
use std::io;

const MAGIC: &[u8; 5] = b"PGDMP";
/// The custom archive format (`archCustom`).
const FORMAT_CUSTOM: u8 = 1;
const OFFSET_NOT_SET: u8 = 1;
const OFFSET_SET: u8 = 2;
const BLOCK_DATA: u8 = 1;
const BLOCK_LARGE_OBJECTS: u8 = 3;

const fn version(major: u32, minor: u32, rev: u32) -> u32 {
    (major * 256 + minor) * 256 + rev
}
const OLDEST: u32 = version(1, 12, 0);
const NEWEST: u32 = version(1, 16, 255);

/// What an archive is read from, front to back.
pub trait Source {
    /// Reads up to `buf.len()` bytes; 0 at the end.
    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Skips up to `n` bytes; returns how many were skipped (fewer at the end).
    fn skip(&mut self, n: u64) -> io::Result<u64>;
    /// How many bytes were read or skipped so far.
    fn pos(&self) -> u64;
}

/// One in-place change: `bytes` written at `at` (an offset field, its data-state byte first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Patch {
    pub at: u64,
    pub bytes: Vec<u8>,
}

/// Why a scan stopped without patches.
#[derive(Debug)]
pub enum ScanError {
    /// Reading the source failed (for a stream being written: the write failed).
    Io(io::Error),
    /// The archive is not one whose offsets can be filled in (the reason).
    Unsupported(String),
}

impl From<io::Error> for ScanError {
    fn from(e: io::Error) -> Self {
        ScanError::Io(e)
    }
}

impl std::fmt::Display for ScanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScanError::Io(e) => write!(f, "{e}"),
            ScanError::Unsupported(why) => write!(f, "{why}"),
        }
    }
}

fn unsupported<T>(why: impl Into<String>) -> Result<T, ScanError> {
    Err(ScanError::Unsupported(why.into()))
}

struct Reader<'a, S: Source> {
    src: &'a mut S,
    int_size: usize,
    off_size: usize,
}

impl<S: Source> Reader<'_, S> {
    fn exact(&mut self, buf: &mut [u8]) -> Result<(), ScanError> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.src.read_some(&mut buf[filled..])? {
                0 => {
                    return unsupported(format!(
                        "the archive ends in the middle of a field at byte {}",
                        self.src.pos()
                    ));
                }
                k => filled += k,
            }
        }
        Ok(())
    }

    fn byte(&mut self) -> Result<u8, ScanError> {
        let mut b = [0u8; 1];
        self.exact(&mut b)?;
        Ok(b[0])
    }

    /// A byte, or `None` at the end of the archive.
    fn byte_or_end(&mut self) -> Result<Option<u8>, ScanError> {
        let mut b = [0u8; 1];
        loop {
            match self.src.read_some(&mut b) {
                Ok(0) => return Ok(None),
                Ok(_) => return Ok(Some(b[0])),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn int(&mut self) -> Result<i64, ScanError> {
        // The sign byte and the value in one read (a dump of small rows is mostly chunk lengths).
        let mut raw = [0u8; 9];
        self.exact(&mut raw[..1 + self.int_size])?;
        let negative = raw[0] != 0;
        let mut bytes = [0u8; 8];
        bytes[..self.int_size].copy_from_slice(&raw[1..1 + self.int_size]);
        let v = u64::from_le_bytes(bytes);
        let v = i64::try_from(v).or_else(|_| unsupported("an integer out of range"))?;
        Ok(if negative { -v } else { v })
    }

    fn skip(&mut self, n: u64) -> Result<(), ScanError> {
        if self.src.skip(n)? != n {
            return unsupported(format!("the archive ends inside a field at byte {}", self.src.pos()));
        }
        Ok(())
    }

    /// Skips a string; `false` for NULL.
    fn string(&mut self) -> Result<bool, ScanError> {
        let len = self.int()?;
        if len < 0 {
            return Ok(false);
        }
        self.skip(len as u64)?;
        Ok(true)
    }

    /// Skips length-prefixed chunks up to the zero length that ends them.
    fn chunks(&mut self) -> Result<(), ScanError> {
        loop {
            match self.int()? {
                0 => return Ok(()),
                n if n < 0 => return unsupported(format!("a negative chunk length at byte {}", self.src.pos())),
                n => self.skip(n as u64)?,
            }
        }
    }
}

/// What [`scan_toc`] learnt: enough to find the data blocks that follow.
#[derive(Debug, Clone)]
pub struct Toc {
    /// Where the data blocks begin: the header and the TOC are the bytes before.
    pub data_start: u64,
    int_size: usize,
    off_size: usize,
    /// Every entry's dump ID, and where the entries whose offset is not set have it.
    ids: std::collections::HashSet<i64>,
    unset: HashMap<i64, u64>,
}

/// Reads a custom-format archive from `src` to its end and returns the patches that set the
/// data offsets its TOC lacks (none when they are all set). See the module documentation.
pub fn scan(src: &mut impl Source) -> Result<Vec<Patch>, ScanError> {
    let toc = scan_toc(src)?;
    let blocks = scan_blocks(src, &toc)?;
    patches(&toc, &blocks)
}

/// How much table data an archive holds: all of it, and its largest block (a table's data, or
/// the large objects). Read from `src` to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct DataSizes {
    pub total: u64,
    pub largest: u64,
}

pub fn data_sizes(src: &mut impl Source) -> Result<DataSizes, ScanError> {
    let toc = scan_toc(src)?;
    let blocks = scan_blocks(src, &toc)?;
    Ok(DataSizes {
        total: blocks.iter().map(|b| b.len).sum(),
        largest: blocks.iter().map(|b| b.len).max().unwrap_or(0),
    })
}

/// A data block: its entry's dump ID, where it starts and how long it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub id: i64,
    pub start: u64,
    pub len: u64,
}

/// The patches that set the offsets of `blocks` the TOC lacks.
fn patches(toc: &Toc, blocks: &[Block]) -> Result<Vec<Patch>, ScanError> {
    let mut patches = Vec::new();
    for b in blocks {
        if let Some(at) = toc.unset.get(&b.id) {
            let mut bytes = vec![OFFSET_SET];
            bytes.extend_from_slice(&b.start.to_le_bytes()[..toc.off_size]);
            if toc.off_size < 8 && b.start >> (8 * toc.off_size) != 0 {
                return unsupported(format!("offset {} does not fit in {} bytes", b.start, toc.off_size));
            }
            patches.push(Patch { at: *at, bytes });
        }
    }
    Ok(patches)
}

/// Reads the header and the TOC of a custom-format archive from `src`, up to its first data
/// block.
pub fn scan_toc(src: &mut impl Source) -> Result<Toc, ScanError> {
    let mut r = Reader { src, int_size: 4, off_size: 8 };
    let mut magic = [0u8; 5];
    r.exact(&mut magic)?;
    if &magic != MAGIC {
        return unsupported("not a custom-format archive");
    }
    let (major, minor, rev) = (r.byte()? as u32, r.byte()? as u32, r.byte()? as u32);
    let v = version(major, minor, rev);
    if !(OLDEST..=NEWEST).contains(&v) {
        return unsupported(format!("archive version {major}.{minor}.{rev} is not one walnut reads (1.12 to 1.16)"));
    }
    let (int_size, off_size) = (r.byte()? as usize, r.byte()? as usize);
    if !(1..=8).contains(&int_size) || !(1..=8).contains(&off_size) {
        return unsupported(format!("integer size {int_size} or offset size {off_size} out of range"));
    }
    (r.int_size, r.off_size) = (int_size, off_size);
    if r.byte()? != FORMAT_CUSTOM {
        return unsupported("not the custom format");
    }
    if v >= version(1, 15, 0) {
        r.byte()?; // compression algorithm
    } else {
        r.int()?; // compression level
    }
    for _ in 0..7 {
        r.int()?; // creation time
    }
    for _ in 0..3 {
        r.string()?; // database name, server version, pg_dump version
    }

    // The TOC: where each entry's data-state byte is, for the entries whose offset is not set.
    let count = r.int()?;
    if count < 0 {
        return unsupported("a negative TOC entry count");
    }
    let mut unset: HashMap<i64, u64> = HashMap::new();
    let mut ids = std::collections::HashSet::new();
    for _ in 0..count {
        let id = r.int()?;
        if id <= 0 || !ids.insert(id) {
            return unsupported(format!("TOC entry ID {id} is out of range or repeated"));
        }
        r.int()?; // had a data dumper
        r.string()?; // table OID
        r.string()?; // OID
        r.string()?; // tag
        r.string()?; // description
        r.int()?; // section
        for _ in 0..3 {
            r.string()?; // definition, drop statement, copy statement
        }
        r.string()?; // namespace
        r.string()?; // tablespace
        r.string()?; // table access method
        if v >= version(1, 16, 0) {
            r.int()?; // relkind
        }
        r.string()?; // owner
        r.string()?; // "false" (with OIDs)
        while r.string()? {} // dependencies, ending with NULL
        let at = r.src.pos();
        let state = r.byte()?;
        r.skip(off_size as u64)?;
        if state == OFFSET_NOT_SET {
            unset.insert(id, at);
        }
    }

    Ok(Toc { data_start: r.src.pos(), int_size, off_size, ids, unset })
}

/// Reads the data blocks that follow the TOC ([`scan_toc`] read it from `src`) to the end of
/// the archive.
pub fn scan_blocks(src: &mut impl Source, toc: &Toc) -> Result<Vec<Block>, ScanError> {
    let mut r = Reader { src, int_size: toc.int_size, off_size: toc.off_size };
    let mut blocks = Vec::new();
    let mut seen = std::collections::HashSet::new();
    loop {
        let start = r.src.pos();
        let Some(kind) = r.byte_or_end()? else { break };
        let id = r.int()?;
        if !toc.ids.contains(&id) || !seen.insert(id) {
            return unsupported(format!(
                "a data block at byte {start} for entry {id}, which the TOC does not list once"
            ));
        }
        match kind {
            BLOCK_DATA => r.chunks()?,
            BLOCK_LARGE_OBJECTS => loop {
                match r.int()? {
                    0 => break,
                    _oid => r.chunks()?,
                }
            },
            other => return unsupported(format!("unknown block type {other} at byte {start}")),
        }
        blocks.push(Block { id, start, len: r.src.pos() - start });
    }
    Ok(blocks)
}

/// What yields an archive piece by piece, doing its own work with each piece as it comes
/// (storing it, hashing it): [`Pieces`] reads it as a [`Source`].
pub trait Producer {
    /// Moves to the next piece; `false` at the end.
    fn advance(&mut self) -> io::Result<bool>;
    /// The current piece.
    fn piece(&self) -> &[u8];
}

/// A [`Producer`] that copies `input` to `output` piece by piece, counting what it copied
/// (also into `counted`, a progress counter).
pub struct Copying<'a, R: io::Read, W: io::Write> {
    pub input: R,
    pub output: W,
    buf: Vec<u8>,
    len: usize,
    /// Bytes copied so far.
    pub copied: u64,
    counted: &'a std::sync::atomic::AtomicU64,
    /// The last error came from writing `output` (not from reading `input`).
    pub failed_writing: bool,
}

impl<'a, R: io::Read, W: io::Write> Copying<'a, R, W> {
    pub fn new(input: R, output: W, counted: &'a std::sync::atomic::AtomicU64) -> Self {
        Copying { input, output, buf: vec![0u8; 256 << 10], len: 0, copied: 0, counted, failed_writing: false }
    }
}

impl<R: io::Read, W: io::Write> Producer for Copying<'_, R, W> {
    fn advance(&mut self) -> io::Result<bool> {
        let n = loop {
            match self.input.read(&mut self.buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        };
        if let Err(e) = self.output.write_all(&self.buf[..n]) {
            self.failed_writing = true;
            return Err(e);
        }
        self.copied += n as u64;
        self.counted.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        self.len = n;
        Ok(n > 0)
    }

    fn piece(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// A [`Source`] over a [`Producer`].
pub struct Pieces<P> {
    pub producer: P,
    at: usize,
    pos: u64,
}

impl<P: Producer> Pieces<P> {
    pub fn new(producer: P) -> Self {
        Pieces { producer, at: 0, pos: 0 }
    }

    /// The next piece when the current one is read; `false` at the end.
    fn next_if_read(&mut self) -> io::Result<bool> {
        while self.at == self.producer.piece().len() {
            if !self.producer.advance()? {
                return Ok(false);
            }
            self.at = 0;
        }
        Ok(true)
    }

    /// Runs the producer to its end (what a scan did not read).
    pub fn drain(&mut self) -> io::Result<()> {
        while self.producer.advance()? {}
        self.at = self.producer.piece().len();
        Ok(())
    }
}

impl<P: Producer> Source for Pieces<P> {
    fn read_some(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.next_if_read()? {
            return Ok(0);
        }
        let piece = &self.producer.piece()[self.at..];
        let k = buf.len().min(piece.len());
        buf[..k].copy_from_slice(&piece[..k]);
        self.at += k;
        self.pos += k as u64;
        Ok(k)
    }

    fn skip(&mut self, n: u64) -> io::Result<u64> {
        let mut left = n;
        while left > 0 && self.next_if_read()? {
            let k = left.min((self.producer.piece().len() - self.at) as u64);
            self.at += k as usize;
            self.pos += k;
            left -= k;
        }
        Ok(n - left)
    }

    fn pos(&self) -> u64 {
        self.pos
    }
}

/// Writes `patches` (what [`scan`] found) into `file`, the archive it read. Returns how many.
pub fn apply(file: &std::fs::File, patches: &[Patch]) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    for p in patches {
        file.write_all_at(&p.bytes, p.at)?;
    }
    Ok(patches.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes archives in the layout `pg_dump` uses (version 1.14, 4-byte ints, 8-byte offsets).
    struct W(Vec<u8>);
    impl W {
        fn int(&mut self, v: i64) {
            self.0.push(u8::from(v < 0));
            self.0.extend_from_slice(&(v.unsigned_abs() as u32).to_le_bytes());
        }
        fn str(&mut self, s: Option<&str>) {
            match s {
                None => self.int(-1),
                Some(s) => {
                    self.int(s.len() as i64);
                    self.0.extend_from_slice(s.as_bytes());
                }
            }
        }
        fn offset(&mut self, state: u8, v: u64) {
            self.0.push(state);
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// An archive with entries (id, has data) and its blocks in `order`; offsets set or not.
    fn archive(entries: &[(i64, bool)], order: &[i64], set: bool) -> (Vec<u8>, HashMap<i64, u64>) {
        let mut w = W(MAGIC.to_vec());
        w.0.extend_from_slice(&[1, 14, 0, 4, 8, FORMAT_CUSTOM]);
        w.int(0);
        for t in [1, 2, 3, 4, 5, 126, 0] {
            w.int(t);
        }
        for s in ["db", "15.1", "15.1"] {
            w.str(Some(s));
        }
        w.int(entries.len() as i64);
        let mut fields = HashMap::new();
        for &(id, data) in entries {
            w.int(id);
            w.int(i64::from(data));
            for s in [Some("1259"), Some("16384"), Some("t"), Some("TABLE DATA")] {
                w.str(s);
            }
            w.int(3);
            for s in [Some(""), Some(""), Some("COPY t FROM stdin;\n"), Some("public"), Some(""), Some("heap")] {
                w.str(s);
            }
            w.str(Some("postgres"));
            w.str(Some("false"));
            w.str(Some("7"));
            w.str(None);
            fields.insert(id, w.0.len() as u64);
            w.offset(if data { OFFSET_NOT_SET } else { 3 }, 0);
        }
        let mut starts = HashMap::new();
        for &id in order {
            starts.insert(id, w.0.len() as u64);
            if id == 99 {
                w.0.push(BLOCK_LARGE_OBJECTS);
                w.int(id);
                for oid in [16500, 16501] {
                    w.int(oid);
                    w.int(3);
                    w.0.extend_from_slice(b"abc");
                    w.int(0);
                }
                w.int(0);
            } else {
                w.0.push(BLOCK_DATA);
                w.int(id);
                for row in 0..3 {
                    let line = format!("{row}\trow {row}\n");
                    w.int(line.len() as i64);
                    w.0.extend_from_slice(line.as_bytes());
                }
                w.int(0);
            }
        }
        if set {
            for (id, at) in &fields {
                if let Some(start) = starts.get(id) {
                    let at = *at as usize;
                    w.0[at] = OFFSET_SET;
                    w.0[at + 1..at + 9].copy_from_slice(&start.to_le_bytes());
                }
            }
        }
        (w.0, starts)
    }

    static COUNTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    /// `bytes` as a source (copied to nowhere).
    fn source(bytes: &[u8]) -> Pieces<Copying<'static, &[u8], io::Sink>> {
        Pieces::new(Copying::new(bytes, io::sink(), &COUNTED))
    }

    fn scan_bytes(bytes: &[u8]) -> Result<Vec<Patch>, ScanError> {
        scan(&mut source(bytes))
    }

    #[test]
    fn fills_the_offsets_a_piped_dump_lacks() {
        let entries = [(5, false), (7, true), (8, true), (99, true)];
        let (mut piped, starts) = archive(&entries, &[8, 7, 99], false);
        let (written, _) = archive(&entries, &[8, 7, 99], true);
        let patches = scan_bytes(&piped).unwrap();
        assert_eq!(patches.len(), 3);
        for p in &patches {
            piped[p.at as usize..p.at as usize + p.bytes.len()].copy_from_slice(&p.bytes);
        }
        assert_eq!(piped, written, "the patched archive is the one written with offsets");
        assert!(starts.values().all(|s| *s > 0));
        // An archive with its offsets set needs nothing.
        assert!(scan_bytes(&written).unwrap().is_empty());
    }

    #[test]
    fn data_sizes_are_the_blocks_lengths() {
        let entries = [(5, false), (7, true), (8, true), (99, true)];
        let (bytes, starts) = archive(&entries, &[8, 7, 99], false);
        let sizes = data_sizes(&mut source(&bytes)).unwrap();
        let end = bytes.len() as u64;
        let lens = [starts[&7] - starts[&8], starts[&99] - starts[&7], end - starts[&99]];
        assert_eq!(sizes, DataSizes { total: end - starts[&8], largest: *lens.iter().max().unwrap() });
        assert_eq!(lens.iter().sum::<u64>(), sizes.total);
    }

    /// Yields a byte string in pieces of the given lengths, counting what it yielded.
    struct Sliced<'a> {
        bytes: &'a [u8],
        cuts: Vec<usize>,
        done: usize,
        piece: &'a [u8],
    }
    impl<'a> Producer for Sliced<'a> {
        fn advance(&mut self) -> io::Result<bool> {
            if self.done == self.bytes.len() {
                return Ok(false);
            }
            let n = self.cuts.pop().unwrap_or(usize::MAX).min(self.bytes.len() - self.done).max(1);
            self.piece = &self.bytes[self.done..self.done + n];
            self.done += n;
            Ok(true)
        }
        fn piece(&self) -> &[u8] {
            self.piece
        }
    }

    #[test]
    fn a_producer_in_pieces_of_any_size_reads_as_the_whole() {
        let entries = [(7, true), (8, true), (99, true)];
        let (piped, _) = archive(&entries, &[8, 7, 99], false);
        let whole = scan_bytes(&piped).unwrap();
        for cut in [1, 2, 3, 7, 64, piped.len()] {
            let mut src = Pieces::new(Sliced { bytes: &piped, cuts: vec![cut; piped.len()], done: 0, piece: &[] });
            assert_eq!(scan(&mut src).unwrap(), whole, "pieces of {cut}");
            assert_eq!(src.pos(), piped.len() as u64);
        }
        // What a scan leaves is drained: a TOC read, then the rest yielded.
        let mut src = Pieces::new(Sliced { bytes: &piped, cuts: vec![5; piped.len()], done: 0, piece: &[] });
        let toc = scan_toc(&mut src).unwrap();
        assert!(toc.data_start < piped.len() as u64);
        src.drain().unwrap();
        assert_eq!(src.producer.done, piped.len());
    }

    #[test]
    fn anything_unexpected_means_no_patch() {
        let entries = [(7, true), (8, true)];
        let (piped, _) = archive(&entries, &[7, 8], false);
        // Truncated in the middle of a block.
        assert!(matches!(scan_bytes(&piped[..piped.len() - 3]), Err(ScanError::Unsupported(_))));
        // A block of an entry the TOC does not have, and a block repeated.
        let (orphan, _) = archive(&[(7, true)], &[7, 8], false);
        assert!(matches!(scan_bytes(&orphan), Err(ScanError::Unsupported(_))));
        let (twice, _) = archive(&entries, &[7, 7], false);
        assert!(matches!(scan_bytes(&twice), Err(ScanError::Unsupported(_))));
        // An unknown version or a plain-text dump.
        let mut newer = piped.clone();
        newer[6] = 17;
        assert!(matches!(scan_bytes(&newer), Err(ScanError::Unsupported(_))));
        assert!(matches!(scan_bytes(b"--\n-- PostgreSQL database dump"), Err(ScanError::Unsupported(_))));
        // An unknown block type.
        let (mut odd, starts) = archive(&entries, &[7, 8], false);
        odd[starts[&8] as usize] = 4;
        assert!(matches!(scan_bytes(&odd), Err(ScanError::Unsupported(_))));
    }

    #[test]
    fn patches_are_applied_to_a_file_in_place() {
        let entries = [(7, true), (8, true)];
        let (piped, _) = archive(&entries, &[8, 7], false);
        let (written, _) = archive(&entries, &[8, 7], true);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.dump");
        std::fs::write(&path, &piped).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        assert_eq!(apply(&file, &scan_bytes(&piped).unwrap()).unwrap(), 2);
        assert_eq!(std::fs::read(&path).unwrap(), written);
        assert!(scan_bytes(&written).unwrap().is_empty());
    }
}
