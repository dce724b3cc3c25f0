//! Data pages: PostgreSQL's page checksum (the one `initdb --data-checksums` turns on), so that
//! a page can be checked where walnut writes it.
//!
//! The checksum is a 32-lane FNV-1a variant over the 8 KiB page read as native-endian 32-bit
//! words (the page's own checksum field counted as zero), two extra rounds of zeros, the lanes
//! folded by XOR, the block number (within the relation, across its 1 GiB segment files) XORed
//! in, and the result reduced to 1..=65535 (PostgreSQL's `pg_checksum_page`). A page that was
//! never initialised is all zeros and carries no checksum.

/// Bytes in a data page.
pub const BLCKSZ: usize = 8192;
/// Pages in one segment file of a relation (1 GiB): a block's number within the relation is
/// `segno * RELSEG_SIZE + ` its number within the file.
pub const RELSEG_SIZE: u32 = 131_072;

const LANES: usize = 32;
const FNV_PRIME: u32 = 16_777_619;
/// The lanes' starting values (PostgreSQL's `checksumBaseOffsets`).
const BASE: [u32; LANES] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C, 0xF8D4474F,
    0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB, 0xE58F764B, 0x187636BC,
    0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4, 0x783125BB, 0x6CA8EAA2, 0xE407EAC6,
    0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];
/// Where the page header keeps the checksum (`pd_checksum`, after the 8-byte `pd_lsn`).
const CHECKSUM_AT: usize = 8;
/// Where the page header keeps `pd_upper`: zero on a page never initialised.
const UPPER_AT: usize = 14;

#[inline(always)]
fn mix(lane: u32, value: u32) -> u32 {
    let t = lane ^ value;
    t.wrapping_mul(FNV_PRIME) ^ (t >> 17)
}

/// The 32-bit hash of a page (its checksum field counted as zero when asked).
fn hash(page: &[u8; BLCKSZ], checksum_as_zero: bool) -> u32 {
    let mut lanes = BASE;
    for (row, words) in page.chunks_exact(4 * LANES).enumerate() {
        for (i, (lane, w)) in lanes.iter_mut().zip(words.chunks_exact(4)).enumerate() {
            let mut b: [u8; 4] = w.try_into().expect("4 bytes");
            // The checksum field is the first two bytes of the page's third word.
            if checksum_as_zero && row == 0 && i == CHECKSUM_AT / 4 {
                b[0] = 0;
                b[1] = 0;
            }
            *lane = mix(*lane, u32::from_ne_bytes(b));
        }
    }
    for _ in 0..2 {
        for lane in lanes.iter_mut() {
            *lane = mix(*lane, 0);
        }
    }
    lanes.iter().fold(0, |a, l| a ^ l)
}

/// PostgreSQL's checksum of `page` as block `blkno` of its relation (the page's own checksum
/// field does not count).
pub fn checksum(page: &[u8; BLCKSZ], blkno: u32) -> u16 {
    ((hash(page, true) ^ blkno) % 65535 + 1) as u16
}

/// What a check of one page found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageCheck {
    /// The checksum matches.
    Valid,
    /// All zeros: a page never initialised (no checksum to check).
    New,
    /// The page is not all zeros and its checksum does not match (or it claims to be new but
    /// holds data).
    Mismatch { stored: u16, computed: u16 },
}

/// Checks `page` as block `blkno` of its relation, as PostgreSQL checks a page it reads.
pub fn verify(page: &[u8; BLCKSZ], blkno: u32) -> PageCheck {
    let stored = u16::from_ne_bytes([page[CHECKSUM_AT], page[CHECKSUM_AT + 1]]);
    let upper = u16::from_ne_bytes([page[UPPER_AT], page[UPPER_AT + 1]]);
    if upper == 0 && page.iter().all(|&b| b == 0) {
        return PageCheck::New;
    }
    let computed = checksum(page, blkno);
    if upper != 0 && computed == stored { PageCheck::Valid } else { PageCheck::Mismatch { stored, computed } }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern() -> Box<[u8; BLCKSZ]> {
        let mut p = Box::new([0u8; BLCKSZ]);
        for (i, b) in p.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        p
    }

    /// Golden values from PostgreSQL 15's own `pg_checksum_page` and `pg_checksum_block`
    /// (storage/checksum_impl.h, compiled against postgresql-server-dev-15, on this page).
    #[test]
    fn matches_postgresql() {
        let p = pattern();
        assert_eq!(hash(&p, false), 391_520_577);
        assert_eq!(checksum(&p, 0), 43596);
        assert_eq!(checksum(&p, 131_077), 43589);
    }

    #[test]
    fn verifies_and_finds_damage_and_misplacement() {
        let mut p = pattern();
        let c = checksum(&p, 42);
        p[CHECKSUM_AT..CHECKSUM_AT + 2].copy_from_slice(&c.to_ne_bytes());
        // The stored checksum does not change the checksum.
        assert_eq!(checksum(&p, 42), c);
        assert_eq!(verify(&p, 42), PageCheck::Valid);
        assert!(matches!(verify(&p, 43), PageCheck::Mismatch { .. }), "another block number");
        let mut bad = p.clone();
        bad[5000] ^= 0x40;
        assert!(matches!(verify(&bad, 42), PageCheck::Mismatch { .. }));
        assert_eq!(verify(&[0u8; BLCKSZ], 7), PageCheck::New);
        let mut new_with_data = Box::new([0u8; BLCKSZ]);
        new_with_data[100] = 1;
        assert!(matches!(verify(&new_with_data, 7), PageCheck::Mismatch { .. }));
    }
}
