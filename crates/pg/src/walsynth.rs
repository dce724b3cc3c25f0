//! Synthetic PostgreSQL 15 WAL for tests and tools: records with valid CRCs (block references
//! and main data laid out as `XLogRecordAssemble` does) and segments holding them across pages
//! and segments, with the page headers PostgreSQL writes.

use crate::lsn::{Lsn, WalSegSize};
use crate::relpath::RelFileNode;
use crate::walpage::{SIZE_OF_LONG_PHD, SIZE_OF_SHORT_PHD, XLOG_BLCKSZ, XLP_FIRST_IS_CONTRECORD, XLP_LONG_HEADER};
use crate::walrec::{BKPBLOCK_HAS_DATA, BKPBLOCK_HAS_IMAGE, BKPBLOCK_SAME_REL, BKPBLOCK_WILL_INIT};
use crate::{PgMajor, SystemId};

/// A full-page image in a synthetic block reference.
#[derive(Debug, Clone, Copy)]
pub struct Img {
    pub hole_offset: u16,
    pub hole_length: u16,
    /// `bimg_info`.
    pub info: u8,
    /// Bytes of image stored.
    pub stored: u16,
    /// The stored hole length (compressed images with a hole).
    pub compressed_hole: Option<u16>,
}

/// A record's body (everything after the 24-byte `XLogRecord` header).
#[derive(Debug, Clone, Default)]
pub struct Body {
    headers: Vec<u8>,
    data: Vec<u8>,
    main: Vec<u8>,
}

impl Body {
    /// Appends a block reference (with `same_rel`, the relation is left out of the header).
    #[allow(clippy::too_many_arguments)]
    pub fn block(
        &mut self,
        id: u8,
        fork: u8,
        same_rel: bool,
        will_init: bool,
        data_len: u16,
        img: Option<Img>,
        rnode: RelFileNode,
        block: u32,
    ) {
        let mut flags = fork;
        if same_rel {
            flags |= BKPBLOCK_SAME_REL;
        }
        if will_init {
            flags |= BKPBLOCK_WILL_INIT;
        }
        if data_len > 0 {
            flags |= BKPBLOCK_HAS_DATA;
        }
        if img.is_some() {
            flags |= BKPBLOCK_HAS_IMAGE;
        }
        self.headers.extend([id, flags]);
        self.headers.extend(data_len.to_le_bytes());
        if let Some(i) = img {
            self.headers.extend(i.stored.to_le_bytes());
            self.headers.extend(i.hole_offset.to_le_bytes());
            self.headers.push(i.info);
            if let Some(h) = i.compressed_hole {
                self.headers.extend(h.to_le_bytes());
            }
            self.data.extend(std::iter::repeat_n(0xAB, i.stored as usize));
        }
        if !same_rel {
            for v in [rnode.spc_node, rnode.db_node, rnode.rel_node] {
                self.headers.extend(v.to_le_bytes());
            }
        }
        self.headers.extend(block.to_le_bytes());
        self.data.extend(std::iter::repeat_n(0xCD, data_len as usize));
    }

    /// Sets the main data.
    pub fn main(&mut self, m: &[u8]) {
        self.main = m.to_vec();
    }

    /// A body with only main data.
    pub fn main_only(m: &[u8]) -> Body {
        let mut b = Body::default();
        b.main(m);
        b
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut out = self.headers.clone();
        if self.main.is_empty() {
        } else if self.main.len() < 256 {
            out.extend([255, self.main.len() as u8]);
        } else {
            out.push(254);
            out.extend((self.main.len() as u32).to_le_bytes());
        }
        out.extend(&self.data);
        out.extend(&self.main);
        out
    }
}

/// A whole record: the `XLogRecord` header (with its CRC-32C) and `body`.
pub fn record(rmid: u8, info: u8, xid: u32, body: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(24 + body.len());
    r.extend(((24 + body.len()) as u32).to_le_bytes());
    r.extend(xid.to_le_bytes());
    r.extend(0u64.to_le_bytes());
    r.extend([info, rmid, 0, 0]);
    let crc = crc32c::crc32c_append(crc32c::crc32c(body), &r[..20]);
    r.extend(crc.to_le_bytes());
    r.extend(body);
    r
}

/// A page header for the page at `page_lsn` (a long one at a segment's start), timeline 1,
/// system identifier 1.
pub fn page_header(page_lsn: Lsn, seg_size: WalSegSize, info: u16, rem_len: u32) -> Vec<u8> {
    let long = page_lsn.0.is_multiple_of(seg_size.bytes());
    let mut h = vec![0u8; if long { SIZE_OF_LONG_PHD } else { SIZE_OF_SHORT_PHD }];
    h[0..2].copy_from_slice(&PgMajor(15).page_magic().expect("15 supported").to_le_bytes());
    h[2..4].copy_from_slice(&(info | if long { XLP_LONG_HEADER } else { 0 }).to_le_bytes());
    h[4..8].copy_from_slice(&1u32.to_le_bytes());
    h[8..16].copy_from_slice(&page_lsn.0.to_le_bytes());
    h[16..20].copy_from_slice(&rem_len.to_le_bytes());
    if long {
        h[24..32].copy_from_slice(&SystemId(1).0.to_le_bytes());
        h[32..36].copy_from_slice(&(seg_size.bytes() as u32).to_le_bytes());
        h[36..40].copy_from_slice(&(XLOG_BLCKSZ as u32).to_le_bytes());
    }
    h
}

/// Segments starting at `first` (a segment boundary) holding `recs` back to back (MAXALIGNed),
/// split over pages and segments as PostgreSQL writes them; every page a record touches gets its
/// header, the rest of the last segment is zeros.
pub fn segments(first: Lsn, seg_size: WalSegSize, recs: &[Vec<u8>]) -> Vec<Vec<u8>> {
    layout(first, seg_size, recs).0
}

/// [`segments`], and where each record begins and ends (just after its last byte).
pub fn layout(first: Lsn, seg_size: WalSegSize, recs: &[Vec<u8>]) -> (Vec<Vec<u8>>, Vec<(Lsn, Lsn)>) {
    let size = seg_size.bytes() as usize;
    let mut at = Vec::with_capacity(recs.len());
    let mut segs: Vec<Vec<u8>> = vec![];
    let mut pos = 0usize; // offset from `first`
    let place = |segs: &mut Vec<Vec<u8>>, at: usize, bytes: &[u8]| {
        while segs.len() <= (at + bytes.len() - 1) / size {
            segs.push(vec![0u8; size]);
        }
        let (s, o) = (at / size, at % size);
        segs[s][o..o + bytes.len()].copy_from_slice(bytes);
    };
    for r in recs {
        let mut written = 0;
        let mut begins = None;
        while written < r.len() {
            if pos.is_multiple_of(XLOG_BLCKSZ) {
                let info = if written > 0 { XLP_FIRST_IS_CONTRECORD } else { 0 };
                let rem = if written > 0 { (r.len() - written) as u32 } else { 0 };
                let h = page_header(Lsn(first.0 + pos as u64), seg_size, info, rem);
                place(&mut segs, pos, &h);
                pos += h.len();
            }
            let n = (r.len() - written).min(XLOG_BLCKSZ - pos % XLOG_BLCKSZ);
            begins = begins.or(Some(pos));
            place(&mut segs, pos, &r[written..written + n]);
            pos += n;
            written += n;
        }
        let lsn = |p: usize| Lsn(first.0 + p as u64);
        at.push((lsn(begins.unwrap_or(pos)), lsn(pos)));
        pos = pos.next_multiple_of(8);
    }
    if segs.is_empty() {
        segs.push(vec![0u8; size]);
        let h = page_header(first, seg_size, 0, 0);
        segs[0][..h.len()].copy_from_slice(&h);
    }
    (segs, at)
}
