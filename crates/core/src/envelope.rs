//! The envelope every stored object is wrapped in. (Long for its tests: half the file pins the
//! format's edge cases, corrupt lengths and flipped bytes.)
//!
//! ```text
//! "WLNT"            4 bytes magic
//! version           u8  (2 clear, 3 encrypted; version 1 has no metadata checksum and is
//!                       still read, and so are encrypted objects of version 2)
//! n                 u8  number of codecs in the chain
//! codec ids         n bytes, in the order they were applied on write (compression, then encryption)
//! meta length       u32 LE
//! meta              JSON object (may be empty: length 0)
//! meta SHA-256      32 bytes (version 2): what planners read without the payload is verified too
//! payload           the content after every codec
//! content length    u64 LE   } trailer: written last, so a writer can stream; a reader verifies
//! content SHA-256   32 bytes } the decoded content against it before anything is used
//! stored checksum   16 bytes   encrypted objects only (codec 16, age): XXH3-128 of the
//!                              payload as stored (big-endian), so that an object can be checked
//!                              whole without the identity (version 2: 32 bytes, SHA-256)
//! ```
//!
//! The stored checksum finds damage; it is not what makes an encrypted object trustworthy: the
//! trailer is not keyed (anyone can recompute any hash of it), and age authenticates every chunk
//! of the payload, and its end, when it is decrypted. A fast non-cryptographic hash is therefore
//! as good as SHA-256 there, at a small fraction of its cost (version 3).
//!
//! Readers never guess: the codec chain is recorded in every object. Readers never trust a
//! length either: the metadata length is bounded by the object's size and by [`MAX_META`], the
//! declared content length by [`MAX_CONTENT`] and by what the payload can expand to, and
//! nothing is allocated by a declared length before those checks (see [`decode`]).

use crate::crypt::{AGE, Identities, Recipients, Refused};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::sync::Arc;

const MAGIC: &[u8; 4] = b"WLNT";
/// The version written for clear objects.
const VERSION: u8 = 2;
/// The version written for encrypted objects: version 2 but for the stored checksum (XXH3-128).
const SEALED_VERSION: u8 = 3;
/// Versions read: 1 (no metadata checksum), 2 and 3.
fn known_version(v: u8) -> bool {
    (1..=3).contains(&v)
}
/// The version a new object with this codec is written as.
fn version_for(codec: &Codec) -> u8 {
    if codec.seal.is_some() { SEALED_VERSION } else { VERSION }
}
/// Bytes of the metadata checksum in `version`'s header.
fn meta_sum_len(version: u8) -> usize {
    if version >= 2 { 32 } else { 0 }
}

/// Checks the metadata against its checksum (version 2).
fn check_meta(meta: &[u8], sum: &[u8]) -> Result<(), EnvelopeError> {
    if sum.is_empty() || sha256(meta)[..] == *sum {
        Ok(())
    } else {
        Err(EnvelopeError::Corrupt("metadata checksum mismatch (the object's metadata was altered)".into()))
    }
}
const TRAILER: usize = 40;

/// The trailer's length: [`TRAILER`], plus the stored checksum of an encrypted object.
fn trailer_len(version: u8, ids: &[u8]) -> usize {
    if ids.last() == Some(&AGE) { TRAILER + StoredHasher::new(version).len() } else { TRAILER }
}

/// The checksum of an encrypted object's stored form (its payload): SHA-256 in version 2,
/// XXH3-128 from version 3 (see the module docs for why a non-cryptographic hash suffices).
enum StoredHasher {
    Sha256(Sha256),
    Xxh3(Box<twox_hash::XxHash3_128>),
}

impl StoredHasher {
    fn new(version: u8) -> Self {
        if version >= SEALED_VERSION { StoredHasher::Xxh3(Box::default()) } else { StoredHasher::Sha256(Sha256::new()) }
    }
    /// Bytes of the checksum in the trailer.
    fn len(&self) -> usize {
        match self {
            StoredHasher::Sha256(_) => 32,
            StoredHasher::Xxh3(_) => 16,
        }
    }
    fn update(&mut self, data: &[u8]) {
        match self {
            StoredHasher::Sha256(h) => h.update(data),
            StoredHasher::Xxh3(h) => h.write(data),
        }
    }
    fn finish(self) -> Vec<u8> {
        match self {
            StoredHasher::Sha256(h) => h.finalize().to_vec(),
            StoredHasher::Xxh3(h) => h.finish_128().to_be_bytes().to_vec(),
        }
    }
}

/// The stored checksum of an encrypted `payload` in a `version` object.
fn stored_sum(version: u8, payload: &[u8]) -> Vec<u8> {
    if version >= SEALED_VERSION {
        twox_hash::XxHash3_128::oneshot(payload).to_be_bytes().to_vec()
    } else {
        sha256(payload).to_vec()
    }
}

/// The stored checksum of what an encrypted object's payload is written as (version 3).
pub type StoredSum = [u8; 16];

/// The recipients an encrypted object names in its metadata, for messages.
fn recipients_of(meta: &serde_json::Value) -> String {
    match meta.get("recipients").and_then(|r| r.as_array()) {
        Some(r) if !r.is_empty() => r.iter().filter_map(|v| v.as_str()).collect::<Vec<_>>().join(", "),
        _ => "(recipients not recorded)".into(),
    }
}

/// `meta` with the recipients of an encrypted object added (metadata is a JSON object).
fn with_recipients(meta: &serde_json::Value, seal: &Recipients) -> serde_json::Value {
    let mut m = match meta {
        serde_json::Value::Object(m) => m.clone(),
        _ => serde_json::Map::new(),
    };
    m.insert("recipients".into(), serde_json::json!(seal.public_keys()));
    serde_json::Value::Object(m)
}
/// The longest metadata a reader accepts.
pub const MAX_META: usize = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Zstd,
    Lz4,
}

impl Compression {
    fn id(self) -> Option<u8> {
        match self {
            Compression::None => None,
            Compression::Zstd => Some(1),
            Compression::Lz4 => Some(2),
        }
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Compression::None),
            "zstd" => Ok(Compression::Zstd),
            "lz4" => Ok(Compression::Lz4),
            other => Err(format!("unknown compression {other:?}: use zstd, lz4 or none")),
        }
    }
}

/// How new objects are encoded: compressed, then encrypted to `seal` when set.
#[derive(Debug, Clone)]
pub struct Codec {
    pub compression: Compression,
    pub level: i32,
    pub seal: Option<Arc<Recipients>>,
}

impl Default for Codec {
    fn default() -> Self {
        Codec { compression: Compression::Zstd, level: 1, seal: None }
    }
}

impl Codec {
    /// The same codec without encryption (objects that must stay readable without a key).
    pub fn clear(&self) -> Codec {
        Codec { seal: None, ..self.clone() }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("not a walnut object (bad magic or too short)")]
    NotAnObject,
    #[error("object format version {0} is newer than this walnut understands (1): upgrade walnut")]
    Version(u8),
    #[error("unknown codec id {0}: written by a newer walnut?")]
    UnknownCodec(u8),
    #[error("corrupt object: {0}")]
    Corrupt(String),
    #[error("checksum mismatch: the stored object is corrupt (expected {expected}, got {actual})")]
    Checksum { expected: String, actual: String },
    #[error(
        "object encrypted to recipient {recipients}; no identity configured (set encryption.identity_file or \
         WALNUT_AGE_IDENTITY)"
    )]
    NoIdentity { recipients: String },
    #[error(
        "the identity does not match any recipient of this object (encrypted to {recipients}; the identity \
         configured is the key of {ours}): configure the secret key of one of its recipients"
    )]
    WrongIdentity { recipients: String, ours: String },
}

impl EnvelopeError {
    /// An encrypted object (metadata `meta`) read without an identity.
    pub fn no_identity(meta: &serde_json::Value) -> EnvelopeError {
        EnvelopeError::NoIdentity { recipients: recipients_of(meta) }
    }

    /// A refusal to decrypt, as the error it is for the object with metadata `meta`.
    fn refused(r: Refused, meta: &serde_json::Value, keys: &Identities) -> EnvelopeError {
        match r {
            Refused::NotARecipient => {
                EnvelopeError::WrongIdentity { recipients: recipients_of(meta), ours: keys.public_keys().join(", ") }
            }
            Refused::Corrupt(why) => EnvelopeError::Corrupt(format!("encrypted payload: {why}")),
        }
    }
}

/// A decoded object: its verified content and metadata.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub content: Bytes,
    pub meta: serde_json::Value,
    pub sha256: [u8; 32],
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Encodes `content` (CPU-bound: call from a blocking thread for large content).
pub fn encode(content: &[u8], meta: &serde_json::Value, codec: Codec) -> Bytes {
    encode_with_sum(content, meta, codec).0
}

/// [`encode`], also returning the SHA-256 of `content` (the one in the trailer), which is
/// computed on a second thread while the first compresses: one pass over the content each.
pub fn encode_with_sum(content: &[u8], meta: &serde_json::Value, codec: Codec) -> (Bytes, [u8; 32]) {
    let meta_bytes = if meta.is_null() { Vec::new() } else { serde_json::to_vec(meta).expect("JSON value") };
    let compress = || -> (Vec<u8>, std::borrow::Cow<'_, [u8]>) {
        match codec.compression {
            Compression::None => (vec![], content.into()),
            Compression::Zstd => {
                (vec![1], zstd::bulk::compress(content, codec.level).expect("zstd compress into memory").into())
            }
            Compression::Lz4 => (vec![2], lz4_flex::compress(content).into()),
        }
    };
    // Small contents are not worth a thread.
    let ((ids, payload), content_sum) = if content.len() >= 1 << 20 {
        std::thread::scope(|scope| {
            let sum = scope.spawn(|| sha256(content));
            let compressed = compress();
            (compressed, sum.join().expect("hashing thread"))
        })
    } else {
        (compress(), sha256(content))
    };
    debug_assert_eq!(codec.compression.id().map(|i| vec![i]).unwrap_or_default(), ids);
    let (ids, payload, meta_bytes, payload_sum) = match &codec.seal {
        None => (ids, payload, meta_bytes, None),
        Some(seal) => {
            let sealed = seal.encrypt(&payload);
            let sum = stored_sum(SEALED_VERSION, &sealed);
            let meta = serde_json::to_vec(&with_recipients(meta, seal)).expect("JSON value");
            ([ids, vec![AGE]].concat(), sealed.into(), meta, Some(sum))
        }
    };
    let mut out = Vec::with_capacity(payload.len() + meta_bytes.len() + 96);
    out.extend_from_slice(MAGIC);
    out.push(version_for(&codec));
    out.push(ids.len() as u8);
    out.extend_from_slice(&ids);
    out.extend_from_slice(&(meta_bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta_bytes);
    out.extend_from_slice(&sha256(&meta_bytes));
    out.extend_from_slice(&payload);
    out.extend_from_slice(&(content.len() as u64).to_le_bytes());
    out.extend_from_slice(&content_sum);
    if let Some(sum) = payload_sum {
        out.extend_from_slice(&sum);
    }
    (out.into(), content_sum)
}

/// Parses the metadata from the first bytes of an object: `Ok(None)` if more bytes are needed.
pub fn meta_from_prefix(prefix: &[u8]) -> Result<Option<serde_json::Value>, EnvelopeError> {
    if prefix.len() < 6 {
        return if prefix.len() >= 4 && &prefix[..4] != MAGIC { Err(EnvelopeError::NotAnObject) } else { Ok(None) };
    }
    if &prefix[..4] != MAGIC {
        return Err(EnvelopeError::NotAnObject);
    }
    if !known_version(prefix[4]) {
        return Err(EnvelopeError::Version(prefix[4]));
    }
    let sum_len = meta_sum_len(prefix[4]);
    let n = prefix[5] as usize;
    let Some(len) = prefix.get(6 + n..10 + n).and_then(|b| <[u8; 4]>::try_from(b).ok()) else { return Ok(None) };
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_META {
        return Err(EnvelopeError::Corrupt(format!("metadata length {len} is over the {MAX_META}-byte limit")));
    }
    let Some(meta) = prefix.get(10 + n..10 + n + len) else { return Ok(None) };
    let Some(sum) = prefix.get(10 + n + len..10 + n + len + sum_len) else { return Ok(None) };
    check_meta(meta, sum)?;
    if len == 0 {
        return Ok(Some(serde_json::Value::Null));
    }
    serde_json::from_slice(meta).map(Some).map_err(|e| EnvelopeError::Corrupt(format!("metadata: {e}")))
}

/// The codec ids of an object, from its header.
fn codec_ids(object: &[u8]) -> Option<&[u8]> {
    if object.len() < 6 || &object[..4] != MAGIC {
        return None;
    }
    object.get(6..6 + object[5] as usize)
}

/// Whether an object is encrypted (its chain ends with age).
pub fn is_encrypted(object: &[u8]) -> bool {
    codec_ids(object).is_some_and(|ids| ids.last() == Some(&AGE))
}

/// Reads the trailer's content checksum without decoding (cheap comparisons of stored objects:
/// the same content has the same checksum, encrypted or not).
pub fn stored_checksum(object: &[u8]) -> Option<[u8; 32]> {
    let ids = codec_ids(object)?;
    let t = trailer_len(object[4], ids);
    (object.len() >= 6 + t).then(|| split_trailer(&object[object.len() - t..]).1)
}

/// Checks an object whole: decoded and verified (see [`decode_with`]) when it can be, and an
/// encrypted object without `keys` against the checksum of its stored form.
pub fn check_stored(object: &[u8], keys: Option<&Identities>) -> Result<(), EnvelopeError> {
    if keys.is_none() && is_encrypted(object) {
        let version = object[4];
        if !known_version(version) {
            return Err(EnvelopeError::Version(version));
        }
        let body = object
            .len()
            .checked_sub(trailer_len(version, &[AGE]))
            .filter(|b| *b >= 10)
            .ok_or(EnvelopeError::NotAnObject)?;
        let start = payload_start(object)?;
        if start > body {
            return Err(EnvelopeError::Corrupt("metadata longer than the object".into()));
        }
        let want = &object[body + TRAILER..];
        let actual = stored_sum(version, &object[start..body]);
        if actual[..] != *want {
            return Err(EnvelopeError::Checksum { expected: hex::encode(want), actual: hex::encode(actual) });
        }
        return Ok(());
    }
    decode_with(object, keys).map(|_| ())
}

/// Where the payload begins (after the header and the metadata, whose checksum is verified).
fn payload_start(object: &[u8]) -> Result<usize, EnvelopeError> {
    match meta_from_prefix(object)? {
        Some(_) => {
            let n = object[5] as usize;
            let len = u32::from_le_bytes(object[6 + n..10 + n].try_into().expect("4 bytes")) as usize;
            Ok(10 + n + len + meta_sum_len(object[4]))
        }
        None => Err(EnvelopeError::Corrupt("truncated header".into())),
    }
}

/// Decodes and verifies an object: every codec undone, length and SHA-256 checked.
///
/// Every length read from the object is bounded before it is used: the metadata length by the
/// object's size, the declared content length by [`MAX_CONTENT`] and by what the payload can
/// possibly expand to, and decompression stops as soon as the output exceeds the declared
/// length. Output buffers are reserved by the declared length only up to [`PREALLOC`] (or when
/// the codec's own header confirms it); beyond that they grow with what is actually produced.
pub fn decode(object: &[u8]) -> Result<Decoded, EnvelopeError> {
    decode_with(object, None)
}

/// [`decode`], decrypting with `keys` an object encrypted to one of them: the stored form is
/// checked against its checksum first, then decrypted (age authenticates every chunk), then
/// the rest of the chain undone and the content checked as for any object.
pub fn decode_with(object: &[u8], keys: Option<&Identities>) -> Result<Decoded, EnvelopeError> {
    if object.len() < 6 + 4 + TRAILER || &object[..4] != MAGIC {
        return Err(EnvelopeError::NotAnObject);
    }
    if !known_version(object[4]) {
        return Err(EnvelopeError::Version(object[4]));
    }
    let sum_len = meta_sum_len(object[4]);
    let corrupt = |why: String| EnvelopeError::Corrupt(why);
    let n = object[5] as usize;
    let mut pos = 6;
    let ids = object.get(pos..pos + n).ok_or_else(|| corrupt("truncated codec list".into()))?;
    pos += n;
    let meta_len = object
        .get(pos..pos + 4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(|b| u32::from_le_bytes(b) as usize)
        .ok_or_else(|| corrupt("truncated header".into()))?;
    pos += 4;
    let sealed = ids.last() == Some(&AGE);
    let body_end = object.len().checked_sub(trailer_len(object[4], ids)).ok_or(EnvelopeError::NotAnObject)?;
    if pos > body_end || meta_len.saturating_add(sum_len) > body_end - pos {
        return Err(corrupt(format!("metadata length {meta_len} is longer than the object ({} bytes)", object.len())));
    }
    check_meta(&object[pos..pos + meta_len], &object[pos + meta_len..pos + meta_len + sum_len])?;
    let meta = if meta_len == 0 {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&object[pos..pos + meta_len]).map_err(|e| corrupt(format!("metadata: {e}")))?
    };
    pos += meta_len + sum_len;
    let payload = &object[pos..body_end];
    let (declared, expected_sum) = split_trailer(&object[body_end..]);
    let ids = if sealed { &ids[..ids.len() - 1] } else { ids };
    if let Some(unknown) = ids.iter().find(|&&id| !matches!(id, 1 | 2 | LZ4_FRAME)) {
        return Err(EnvelopeError::UnknownCodec(*unknown));
    }
    let opened;
    let payload = if sealed {
        let want = &object[body_end + TRAILER..];
        let actual = stored_sum(object[4], payload);
        if actual[..] != *want {
            return Err(EnvelopeError::Checksum { expected: hex::encode(want), actual: hex::encode(actual) });
        }
        let keys = keys.ok_or_else(|| EnvelopeError::NoIdentity { recipients: recipients_of(&meta) })?;
        opened = keys.decrypt(payload).map_err(|r| EnvelopeError::refused(r, &meta, keys))?;
        &opened[..]
    } else {
        payload
    };
    // Refuse absurd lengths before anything is allocated (a corrupt trailer).
    if declared > MAX_CONTENT {
        return Err(corrupt(format!("declared content length {declared} is over the {MAX_CONTENT}-byte limit")));
    }
    // Large zstd contents (every WAL segment): decompressed in pieces that a second thread
    // hashes (and gathers) while the next piece is decompressed.
    if ids == [1] && (PIPELINE_MIN..=ONE_SHOT).contains(&declared) {
        plausible(declared, payload, ZSTD_MAX_RATIO, "zstd")?;
        let stream = zstd::Decoder::with_buffer(payload).map_err(|e| corrupt(format!("zstd: {e}")))?;
        let (content, actual) = inflate_hashed(stream, declared, "zstd")?;
        if content.len() as u64 != declared {
            return Err(corrupt(format!("content is {} bytes, trailer says {declared}", content.len())));
        }
        if actual != expected_sum {
            return Err(EnvelopeError::Checksum { expected: hex::encode(expected_sum), actual: hex::encode(actual) });
        }
        return Ok(Decoded { content: content.into(), meta, sha256: actual });
    }
    let content = match ids {
        [] => {
            if payload.len() as u64 != declared {
                return Err(corrupt(format!("content is {} bytes, trailer says {declared}", payload.len())));
            }
            payload.to_vec()
        }
        [1] => {
            plausible(declared, payload, ZSTD_MAX_RATIO, "zstd")?;
            let confirmed = zstd::zstd_safe::get_frame_content_size(payload).ok().flatten() == Some(declared);
            if confirmed && declared <= ONE_SHOT {
                // The common case (every whole object walnut writes): one call, one exact buffer.
                zstd::bulk::decompress(payload, declared as usize).map_err(|e| corrupt(format!("zstd: {e}")))?
            } else {
                let stream = zstd::Decoder::with_buffer(payload).map_err(|e| corrupt(format!("zstd: {e}")))?;
                inflate(stream, declared, "zstd")?
            }
        }
        [2] => {
            let actual = lz4_block_len(payload).ok_or_else(|| corrupt("lz4: malformed block".into()))?;
            if actual != declared {
                return Err(corrupt(format!("lz4: content is {actual} bytes, trailer says {declared}")));
            }
            lz4_flex::decompress(payload, declared as usize).map_err(|e| corrupt(format!("lz4: {e}")))?
        }
        [LZ4_FRAME] => {
            plausible(declared, payload, LZ4_MAX_RATIO, "lz4")?;
            inflate(lz4_flex::frame::FrameDecoder::new(payload), declared, "lz4")?
        }
        chain => return Err(corrupt(format!("codec chain {chain:?}: this walnut writes one codec per object"))),
    };
    if content.len() as u64 != declared {
        return Err(corrupt(format!("content is {} bytes, trailer says {declared}", content.len())));
    }
    let actual = sha256(&content);
    if actual != expected_sum {
        return Err(EnvelopeError::Checksum { expected: hex::encode(expected_sum), actual: hex::encode(actual) });
    }
    Ok(Decoded { content: content.into(), meta, sha256: actual })
}

/// The longest content a reader accepts: a larger declared length is a corrupt trailer.
pub const MAX_CONTENT: u64 = 64 << 30;
/// Output buffers are reserved by the declared length up to this size; past it they grow with
/// the output actually produced.
pub const PREALLOC: u64 = 16 << 20;
/// Content up to this size whose zstd frame header confirms the declared length is decompressed
/// in one call into an exact buffer.
const ONE_SHOT: u64 = 256 << 20;
/// zstd cannot expand more than this: its densest block (RLE) is 4 bytes for at most 128 KiB.
const ZSTD_MAX_RATIO: u64 = 32 * 1024;
/// lz4 cannot expand much more than this: each further 255 bytes of a match cost one byte.
const LZ4_MAX_RATIO: u64 = 256;

fn split_trailer(trailer: &[u8]) -> (u64, [u8; 32]) {
    let mut len = [0u8; 8];
    let mut sum = [0u8; 32];
    len.copy_from_slice(&trailer[..8]);
    sum.copy_from_slice(&trailer[8..TRAILER]);
    (u64::from_le_bytes(len), sum)
}

/// Whether `payload` can decompress to `declared` bytes at all.
fn plausible(declared: u64, payload: &[u8], ratio: u64, what: &str) -> Result<(), EnvelopeError> {
    let most = (payload.len() as u64).saturating_mul(ratio).saturating_add(1024);
    if declared > most {
        return Err(EnvelopeError::Corrupt(format!(
            "{what}: declared content length {declared} is more than a {}-byte payload can hold",
            payload.len()
        )));
    }
    Ok(())
}

/// Decompresses a stream into a buffer that grows with the output, failing once the output
/// exceeds `declared` bytes.
/// Contents from this size on are decompressed and hashed in a pipeline ([`inflate_hashed`]).
const PIPELINE_MIN: u64 = 1 << 20;

/// [`inflate`] with the SHA-256 of the content, computed by a second thread piece by piece as
/// the pieces come out of `stream` (which also gathers them into the content).
fn inflate_hashed(
    mut stream: impl std::io::Read,
    declared: u64,
    what: &str,
) -> Result<(Vec<u8>, [u8; 32]), EnvelopeError> {
    const PIECE: usize = 1 << 20;
    let (to_hasher, pieces) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
    std::thread::scope(|scope| {
        let hasher = scope.spawn(move || {
            let mut out = Vec::with_capacity(declared.min(PREALLOC) as usize);
            let mut h = Sha256::new();
            for piece in pieces {
                h.update(&piece);
                out.extend_from_slice(&piece);
            }
            (out, <[u8; 32]>::from(h.finalize()))
        });
        let mut total = 0u64;
        let read = loop {
            let mut piece = vec![0u8; PIECE];
            let mut filled = 0;
            let got = loop {
                match stream.read(&mut piece[filled..]) {
                    Ok(0) => break Ok(()),
                    Ok(n) => {
                        filled += n;
                        if filled == PIECE {
                            break Ok(());
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(EnvelopeError::Corrupt(format!("{what}: {e}"))),
                }
            };
            if let Err(e) = got {
                break Err(e);
            }
            total += filled as u64;
            if total > declared {
                break Err(EnvelopeError::Corrupt(format!(
                    "{what}: the content is longer than the declared {declared} bytes"
                )));
            }
            if filled == 0 {
                break Ok(());
            }
            piece.truncate(filled);
            let last = filled < PIECE;
            if to_hasher.send(piece).is_err() || last {
                break Ok(());
            }
        };
        drop(to_hasher);
        let (out, sum) = hasher.join().expect("hashing thread");
        read.map(|()| (out, sum))
    })
}

fn inflate(stream: impl std::io::Read, declared: u64, what: &str) -> Result<Vec<u8>, EnvelopeError> {
    use std::io::Read;
    let mut out = Vec::with_capacity(declared.min(PREALLOC) as usize);
    stream
        .take(declared.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| EnvelopeError::Corrupt(format!("{what}: {e}")))?;
    if out.len() as u64 > declared {
        return Err(EnvelopeError::Corrupt(format!(
            "{what}: the content is longer than the declared {declared} bytes"
        )));
    }
    Ok(out)
}

/// The decompressed size of an lz4 block (the format lz4_flex::compress writes), read from its
/// sequence headers without decompressing: `None` if the block is truncated.
fn lz4_block_len(block: &[u8]) -> Option<u64> {
    fn length(block: &[u8], pos: &mut usize, nibble: u8) -> Option<u64> {
        let mut n = u64::from(nibble);
        if nibble == 15 {
            loop {
                let b = *block.get(*pos)?;
                *pos += 1;
                n += u64::from(b);
                if b != 255 {
                    break;
                }
            }
        }
        Some(n)
    }
    let (mut pos, mut total) = (0usize, 0u64);
    loop {
        let token = *block.get(pos)?;
        pos += 1;
        let literals = length(block, &mut pos, token >> 4)?;
        pos = pos.checked_add(usize::try_from(literals).ok()?).filter(|p| *p <= block.len())?;
        total += literals;
        if pos == block.len() {
            return Some(total); // the last sequence has literals only
        }
        pos = pos.checked_add(2).filter(|p| *p <= block.len())?; // the match offset
        total += length(block, &mut pos, token & 15)? + 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        (0..100_000u32).flat_map(|i| (i / 7).to_le_bytes()).collect()
    }

    /// Contents large enough for the decompress-and-hash pipeline (several pieces, the last one
    /// partial): they round-trip, and a flipped byte or a cut payload is refused.
    #[test]
    fn large_contents_round_trip_and_corruption_is_caught() {
        let data: Vec<u8> = (0..(3 << 20) + 12345).map(|i: u32| (i % 251) as u8 ^ (i >> 13) as u8).collect();
        let (object, sum) = encode_with_sum(&data, &serde_json::json!({"k": 1}), Codec::default());
        assert_eq!(sum, sha256(&data));
        let d = decode(&object).unwrap();
        assert_eq!(d.content.as_ref(), &data[..]);
        assert_eq!(d.sha256, sum);
        let body_end = object.len() - TRAILER;
        let mut flipped = object.to_vec();
        flipped[body_end - 100] ^= 0x40;
        assert!(decode(&flipped).is_err(), "a flipped payload byte is refused");
        let mut cut = object[..body_end - 1000].to_vec();
        cut.extend_from_slice(&object[body_end..]);
        assert!(decode(&cut).is_err(), "a cut payload is refused");
        let mut wrong_sum = object.to_vec();
        let last = wrong_sum.len() - 1;
        wrong_sum[last] ^= 1;
        assert!(matches!(decode(&wrong_sum), Err(EnvelopeError::Checksum { .. })));
    }

    #[test]
    fn round_trips_with_every_codec() {
        let data = sample();
        for compression in [Compression::None, Compression::Zstd, Compression::Lz4] {
            let meta = serde_json::json!({"kind": "segment"});
            let obj = encode(&data, &meta, Codec { compression, level: 3, seal: None });
            let d = decode(&obj).unwrap();
            assert_eq!(d.content.as_ref(), data.as_slice());
            assert_eq!(d.meta, meta);
            assert_eq!(stored_checksum(&obj), Some(sha256(&data)));
            assert_eq!(meta_from_prefix(&obj[..80]).unwrap(), Some(meta.clone()));
            assert_eq!(meta_from_prefix(&obj[..12]).unwrap(), None, "needs more bytes");
            if compression != Compression::None {
                assert!(obj.len() < data.len() / 2, "{compression:?} compresses");
            }
            if compression == Compression::Zstd {
                // The frame header confirms the length: decode's one-call path.
                let payload = &obj[6 + 1 + 4 + serde_json::to_vec(&meta).unwrap().len() + 32..obj.len() - TRAILER];
                let size = zstd::zstd_safe::get_frame_content_size(payload).unwrap();
                assert_eq!(size, Some(data.len() as u64));
            }
        }
    }

    /// Metadata (a WAL segment's summary, read by planners without the payload) is checked too.
    #[test]
    fn a_flipped_byte_in_the_metadata_is_detected() {
        let meta = serde_json::json!({"summary": {"last_commit": "2026-01-01T12:00:00Z", "xid_max": 1234}});
        let obj = encode(b"content", &meta, Codec { compression: Compression::Zstd, level: 1, seal: None });
        let start = 6 + 1 + 4;
        let len = serde_json::to_vec(&meta).unwrap().len();
        for pos in start..start + len + 32 {
            let mut bad = obj.to_vec();
            bad[pos] ^= 0x01;
            assert!(decode(&bad).is_err(), "flip at {pos} in the metadata went unnoticed by decode");
            assert!(meta_from_prefix(&bad).is_err(), "flip at {pos} went unnoticed by meta_from_prefix");
        }
        assert_eq!(meta_from_prefix(&obj).unwrap().unwrap(), meta);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let data = sample();
        for compression in [Compression::None, Compression::Zstd, Compression::Lz4] {
            let obj = encode(&data, &serde_json::Value::Null, Codec { compression, level: 1, seal: None });
            for pos in (0..obj.len()).step_by(obj.len() / 97 + 1).chain([obj.len() - 1, obj.len() / 2]) {
                let mut bad = obj.to_vec();
                bad[pos] ^= 0x40;
                assert!(decode(&bad).is_err(), "{compression:?}: flip at {pos} went unnoticed");
            }
        }
    }

    /// `object` with its trailer's content length replaced.
    fn declaring(object: &[u8], len: u64) -> Vec<u8> {
        let mut o = object.to_vec();
        let at = o.len() - TRAILER;
        o[at..at + 8].copy_from_slice(&len.to_le_bytes());
        o
    }

    /// `object` with its header's metadata length replaced.
    fn meta_len_patched(object: &[u8], len: u32) -> Vec<u8> {
        let mut o = object.to_vec();
        let at = 6 + o[5] as usize;
        o[at..at + 4].copy_from_slice(&len.to_le_bytes());
        o
    }

    fn small_objects() -> Vec<(Compression, Vec<u8>)> {
        let data = sample();
        let meta = serde_json::json!({"kind": "segment", "name": "000000010000000000000001"});
        [Compression::None, Compression::Zstd, Compression::Lz4]
            .into_iter()
            .map(|c| (c, encode(&data[..20_000], &meta, Codec { compression: c, level: 1, seal: None }).to_vec()))
            .chain([(Compression::Zstd, streamed(&data[..20_000], Compression::Zstd))])
            .chain([(Compression::Lz4, streamed(&data[..20_000], Compression::Lz4))])
            .collect()
    }

    fn streamed(content: &[u8], compression: Compression) -> Vec<u8> {
        use std::io::Write;
        let codec = Codec { compression, level: 1, seal: None };
        let mut obj = stream_header(&codec);
        let mut w = HashingWriter::new(Compressor::new(Vec::new(), &codec).unwrap());
        w.write_all(content).unwrap();
        let (c, len, sum) = w.finish();
        obj.extend_from_slice(&c.finish().unwrap());
        obj.extend_from_slice(&stream_trailer(len, sum, None));
        obj
    }

    /// A corrupt trailer declaring a huge content length is refused at once: nothing is
    /// allocated by the declared length (it used to be handed to the decompressor as its output
    /// size: a 60 GiB allocation from a 20 KB object).
    #[test]
    fn huge_declared_lengths_are_refused_before_allocating() {
        for (compression, obj) in small_objects() {
            for len in [60 << 30, (64 << 30) + 1, u64::MAX, 1 << 40, 20 << 30, obj.len() as u64 * 40_000] {
                let started = std::time::Instant::now();
                let e = decode(&declaring(&obj, len)).unwrap_err();
                assert!(matches!(e, EnvelopeError::Corrupt(_)), "{compression:?} {len}: {e}");
                assert!(started.elapsed() < std::time::Duration::from_secs(2), "{compression:?} {len}: slow");
            }
            // Off by one either way is caught too (by the codec or the length check).
            let real = u64::from_le_bytes(obj[obj.len() - TRAILER..][..8].try_into().unwrap());
            for len in [real - 1, real + 1, 0] {
                assert!(decode(&declaring(&obj, len)).is_err(), "{compression:?} {len}");
            }
        }
    }

    /// A corrupt metadata length is bounded by the object (decode), by a plausible maximum
    /// (prefix reads, which do not know the object's size) and never allocated up front (streams).
    #[test]
    fn huge_metadata_lengths_are_refused() {
        for (compression, obj) in small_objects() {
            for len in [u32::MAX, MAX_META as u32 + 1, obj.len() as u32] {
                let bad = meta_len_patched(&obj, len);
                assert!(matches!(decode(&bad), Err(EnvelopeError::Corrupt(_))), "{compression:?} {len}");
                let r = PayloadReader::new(&bad[..]);
                assert!(r.is_err(), "{compression:?} {len}: the stream reader refuses it");
            }
            for len in [u32::MAX, MAX_META as u32 + 1] {
                let bad = meta_len_patched(&obj, len);
                assert!(
                    matches!(meta_from_prefix(&bad[..64]), Err(EnvelopeError::Corrupt(_))),
                    "{compression:?} {len}: a prefix read must not ask for ever more bytes"
                );
            }
        }
    }

    /// Tiny and highly compressible content still round-trips through the bounds (the densest
    /// payloads are the ones closest to the expansion limits).
    #[test]
    fn edge_contents_round_trip() {
        let zeros = vec![0u8; 16 << 20];
        for content in [&b""[..], b"x", &zeros[..]] {
            for compression in [Compression::None, Compression::Zstd, Compression::Lz4] {
                let obj = encode(content, &serde_json::Value::Null, Codec { compression, level: 19, seal: None });
                assert_eq!(decode(&obj).unwrap().content.as_ref(), content, "{compression:?} {}", content.len());
                let obj = streamed(content, compression);
                assert_eq!(decode(&obj).unwrap().content.as_ref(), content, "streamed {compression:?}");
            }
        }
    }

    /// Uncompressed content is exactly as long as its payload.
    #[test]
    fn uncompressed_length_must_match_the_payload() {
        let obj =
            encode(b"hello", &serde_json::Value::Null, Codec { compression: Compression::None, level: 0, seal: None });
        let e = decode(&declaring(&obj, 6)).unwrap_err();
        assert!(e.to_string().contains("6"), "{e}");
    }

    /// A mutation of a valid object: a byte set, a length field overwritten, or a cut.
    #[derive(Debug, Clone)]
    enum Mutation {
        Set(usize, u8),
        MetaLen(u32),
        ContentLen(u64),
        Truncate(usize),
        Extend(Vec<u8>),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Set(p, b)),
            any::<u32>().prop_map(Mutation::MetaLen),
            prop_oneof![any::<u64>(), 0u64..100_000, (60u64 << 30)..(70u64 << 30)].prop_map(Mutation::ContentLen),
            any::<usize>().prop_map(Mutation::Truncate),
            proptest::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
        ]
    }

    fn mutate(obj: &[u8], ms: &[Mutation]) -> Vec<u8> {
        let mut o = obj.to_vec();
        for m in ms {
            match m {
                Mutation::Set(p, b) if !o.is_empty() => {
                    let at = p % o.len();
                    o[at] = *b;
                }
                Mutation::MetaLen(l) if o.len() > 5 && o.len() > 10 + o[5] as usize => o = meta_len_patched(&o, *l),
                Mutation::ContentLen(l) if o.len() >= TRAILER => o = declaring(&o, *l),
                Mutation::Truncate(n) => o.truncate(n % (o.len() + 1)),
                Mutation::Extend(b) => o.extend_from_slice(b),
                _ => {}
            }
        }
        o
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
            let mut with_magic = b"WLNT\x01".to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = decode(&with_magic);
        }

        /// Random mutations of valid objects never panic, never allocate by a corrupt length (a
        /// 60 GiB declaration would abort the test), and never decode to content other than what
        /// was stored.
        #[test]
        fn mutated_objects_never_panic(which in 0usize..5, ms in proptest::collection::vec(mutation(), 1..4)) {
            let objects = small_objects();
            let (_, obj) = &objects[which];
            let original = decode(obj).unwrap().content;
            let bad = mutate(obj, &ms);
            if let Ok(d) = decode(&bad) {
                prop_assert_eq!(&d.content, &original);
            }
            let _ = meta_from_prefix(&bad[..bad.len().min(64)]);
            let _ = stored_checksum(&bad);
            if let Ok(mut p) = PayloadReader::new(&bad[..]) {
                let codecs = p.codecs.clone();
                if let Ok(mut d) = decompressor(std::io::BufReader::new(&mut p), &codecs) {
                    let mut sink = Vec::new();
                    let _ = std::io::Read::read_to_end(&mut std::io::Read::take(&mut d, 1 << 20), &mut sink);
                }
                let _ = p.trailer();
            }
        }
    }
}

/// Codec id of streamed lz4 (frame format); whole-object lz4 (id 2) is the block format.
const LZ4_FRAME: u8 = 3;

/// The header of a streamed object: written first, before the payload.
pub fn stream_header(codec: &Codec) -> Vec<u8> {
    let mut ids: Vec<u8> = match codec.compression {
        Compression::None => vec![],
        Compression::Zstd => vec![1],
        Compression::Lz4 => vec![LZ4_FRAME],
    };
    let meta = match &codec.seal {
        None => Vec::new(),
        Some(seal) => {
            ids.push(AGE);
            serde_json::to_vec(&with_recipients(&serde_json::Value::Null, seal)).expect("JSON value")
        }
    };
    let mut out = Vec::with_capacity(16 + meta.len() + 32);
    out.extend_from_slice(MAGIC);
    out.push(version_for(codec));
    out.push(ids.len() as u8);
    out.extend_from_slice(&ids);
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(&sha256(&meta));
    out
}

/// The trailer of a streamed object (`stored`: an encrypted one's stored checksum, from
/// [`Sealing::finish`]).
pub fn stream_trailer(content_len: u64, sha256: [u8; 32], stored: Option<StoredSum>) -> Vec<u8> {
    let mut t = Vec::with_capacity(TRAILER + 16);
    t.extend_from_slice(&content_len.to_le_bytes());
    t.extend_from_slice(&sha256);
    if let Some(p) = stored {
        t.extend_from_slice(&p);
    }
    t
}

/// A writer that passes what it is given on and keeps the stored checksum (XXH3-128) of it: an
/// encrypted payload as it is written.
pub struct StoredSumWriter<W> {
    inner: W,
    hasher: Box<twox_hash::XxHash3_128>,
}

impl<W: std::io::Write> StoredSumWriter<W> {
    pub fn new(inner: W) -> Self {
        StoredSumWriter { inner, hasher: Box::default() }
    }
    pub fn finish(self) -> (W, StoredSum) {
        (self.inner, self.hasher.finish_128().to_be_bytes())
    }
}

impl<W: std::io::Write> std::io::Write for StoredSumWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.write(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The encrypting end of a streamed object (below the compressor): plain, or age with the
/// stored checksum of what it writes (the payload's stored form, for the trailer).
pub enum Sealing<W: std::io::Write> {
    Plain(W),
    Age(age::stream::StreamWriter<StoredSumWriter<W>>),
}

impl<W: std::io::Write> Sealing<W> {
    pub fn new(inner: W, codec: &Codec) -> std::io::Result<Self> {
        Ok(match &codec.seal {
            None => Sealing::Plain(inner),
            Some(seal) => Sealing::Age(seal.writer(StoredSumWriter::new(inner))?),
        })
    }
    /// The inner writer, and the payload's stored checksum when encrypted.
    pub fn finish(self) -> std::io::Result<(W, Option<StoredSum>)> {
        match self {
            Sealing::Plain(w) => Ok((w, None)),
            Sealing::Age(a) => {
                let (w, sum) = a.finish()?.finish();
                Ok((w, Some(sum)))
            }
        }
    }
}

impl<W: std::io::Write> std::io::Write for Sealing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Sealing::Plain(w) => w.write(buf),
            Sealing::Age(a) => a.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sealing::Plain(w) => w.flush(),
            Sealing::Age(a) => a.flush(),
        }
    }
}

/// What [`reseal`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resealed {
    /// The content's length and SHA-256, as the object's trailer records them (unchanged).
    pub content_len: u64,
    pub content_sha256: [u8; 32],
    /// The size of the object written.
    pub stored_bytes: u64,
}

/// Why [`reseal`] stopped: the object read is not what it should be, or the output failed.
#[derive(Debug, thiserror::Error)]
pub enum ResealError {
    #[error(transparent)]
    Object(#[from] EnvelopeError),
    #[error("write the re-encrypted object: {0}")]
    Write(std::io::Error),
}

/// Re-encrypts the object that `input` streams to the recipients `to`, writing the new object to
/// `output`, in one pass with memory bounded by a few chunks (for backup parts of any size).
///
/// The compression is kept (the payload is not decompressed), and so are the metadata (with its
/// recipients replaced) and the content trailer; an encrypted payload is decrypted with `keys`
/// (age authenticates every chunk) and a clear one is encrypted. The old payload is checked
/// against the checksum of its stored form at its end, so a damaged object is refused, never
/// re-encrypted as it is. The caller proves the result readable (decode it with a key of `to`)
/// before it replaces anything.
pub fn reseal<R: std::io::Read, W: std::io::Write>(
    input: R,
    output: W,
    keys: Option<&Identities>,
    to: &Recipients,
) -> Result<Resealed, ResealError> {
    use std::io::{Read, Write};
    let mut payload = PayloadReader::new(input)?;
    let (codecs, meta) = (payload.codecs.clone(), payload.meta.clone());
    let (compression, sealed) = match codecs.split_last() {
        Some((&AGE, rest)) => (rest.to_vec(), true),
        _ => (codecs.clone(), false),
    };
    if let Some(&id) = compression.iter().find(|&&id| !matches!(id, 1 | 2 | LZ4_FRAME)) {
        return Err(EnvelopeError::UnknownCodec(id).into());
    }
    let keys = match (sealed, keys) {
        (true, None) => return Err(EnvelopeError::no_identity(&meta).into()),
        (_, keys) => keys,
    };
    let new_meta = serde_json::to_vec(&with_recipients(&meta, to)).expect("JSON value");
    let ids = [compression, vec![AGE]].concat();
    let mut out = CountingWriter { inner: output, count: 0 };
    let mut header = Vec::with_capacity(16 + new_meta.len() + 32);
    header.extend_from_slice(MAGIC);
    header.push(SEALED_VERSION);
    header.push(ids.len() as u8);
    header.extend_from_slice(&ids);
    header.extend_from_slice(&(new_meta.len() as u32).to_le_bytes());
    header.extend_from_slice(&new_meta);
    header.extend_from_slice(&sha256(&new_meta));
    out.write_all(&header).map_err(ResealError::Write)?;
    let mut sealer = to.writer(StoredSumWriter::new(&mut out)).map_err(ResealError::Write)?;
    {
        let buffered = std::io::BufReader::with_capacity(1 << 20, &mut payload);
        let mut plain: Box<dyn Read + '_> = match keys.filter(|_| sealed) {
            Some(keys) => keys.reader(buffered).map_err(|r| EnvelopeError::refused(r, &meta, keys))?,
            None => Box::new(buffered),
        };
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let n = match plain.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let what = if sealed { "encrypted payload" } else { "payload" };
                    return Err(EnvelopeError::Corrupt(format!("{what}: {e}")).into());
                }
            };
            sealer.write_all(&buf[..n]).map_err(ResealError::Write)?;
        }
    }
    let (_, payload_sum) = sealer.finish().map_err(ResealError::Write)?.finish();
    let (content_len, content_sha256) = payload.trailer()?;
    out.write_all(&stream_trailer(content_len, content_sha256, Some(payload_sum))).map_err(ResealError::Write)?;
    out.flush().map_err(ResealError::Write)?;
    let stored_bytes = out.count;
    Ok(Resealed { content_len, content_sha256, stored_bytes })
}

/// The recipients an object is encrypted to, from its metadata (empty: not encrypted).
pub fn recipients(meta: &serde_json::Value) -> Vec<String> {
    match meta.get("recipients").and_then(|r| r.as_array()) {
        Some(r) => r.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        None => Vec::new(),
    }
}

/// A writer that counts what passes through it.
struct CountingWriter<W> {
    inner: W,
    count: u64,
}

impl<W: std::io::Write> std::io::Write for CountingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    pub inner: W,
    hasher: Sha256,
    pub count: u64,
}

impl<W: std::io::Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Sha256::new(), count: 0 }
    }
    pub fn finish(self) -> (W, u64, [u8; 32]) {
        (self.inner, self.count, self.hasher.finalize().into())
    }
}

impl<W: std::io::Write> std::io::Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// The compressing side of a streamed object: content goes in, encoded payload comes out of `W`.
pub enum Compressor<W: std::io::Write> {
    None(W),
    Zstd(zstd::Encoder<'static, W>),
    Lz4(lz4_flex::frame::FrameEncoder<W>),
}

impl<W: std::io::Write> Compressor<W> {
    pub fn new(inner: W, codec: &Codec) -> std::io::Result<Self> {
        Ok(match codec.compression {
            Compression::None => Compressor::None(inner),
            Compression::Zstd => Compressor::Zstd(zstd::Encoder::new(inner, codec.level)?),
            Compression::Lz4 => Compressor::Lz4(lz4_flex::frame::FrameEncoder::new(inner)),
        })
    }
    pub fn finish(self) -> std::io::Result<W> {
        match self {
            Compressor::None(w) => Ok(w),
            Compressor::Zstd(e) => e.finish(),
            Compressor::Lz4(e) => e.finish().map_err(std::io::Error::other),
        }
    }
}

impl<W: std::io::Write> std::io::Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Compressor::None(w) => w.write(buf),
            Compressor::Zstd(e) => e.write(buf),
            Compressor::Lz4(e) => e.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Compressor::None(w) => w.flush(),
            Compressor::Zstd(e) => e.flush(),
            Compressor::Lz4(e) => e.flush(),
        }
    }
}

/// The read-ahead buffer of a [`PayloadReader`] (far longer than any trailer).
const PAYLOAD_BUF: usize = 256 << 10;

/// Reads a streamed object's payload: parses the header, withholds the trailer, and exposes the
/// trailer once the payload is exhausted.
pub struct PayloadReader<R> {
    inner: R,
    /// Read ahead: `buf[pos..end]` is unread.
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    eof: bool,
    pub codecs: Vec<u8>,
    pub meta: serde_json::Value,
    /// The trailer's length (longer for an encrypted object).
    trailer: usize,
    /// Whether the payload is encrypted.
    sealed: bool,
    /// An encrypted object's payload, hashed as it is read.
    payload_hash: Option<StoredHasher>,
}

impl<R: std::io::Read> PayloadReader<R> {
    pub fn new(mut inner: R) -> Result<Self, EnvelopeError> {
        let mut head = [0u8; 6];
        inner.read_exact(&mut head).map_err(|_| EnvelopeError::NotAnObject)?;
        if &head[..4] != MAGIC {
            return Err(EnvelopeError::NotAnObject);
        }
        if !known_version(head[4]) {
            return Err(EnvelopeError::Version(head[4]));
        }
        let mut codecs = vec![0u8; head[5] as usize];
        inner.read_exact(&mut codecs).map_err(|_| EnvelopeError::Corrupt("truncated header".into()))?;
        let mut len = [0u8; 4];
        inner.read_exact(&mut len).map_err(|_| EnvelopeError::Corrupt("truncated header".into()))?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_META {
            return Err(EnvelopeError::Corrupt(format!("metadata length {len} is over the {MAX_META}-byte limit")));
        }
        // Read (and allocated) as it arrives, not by the declared length.
        let mut meta = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(&mut inner, len as u64), &mut meta)
            .map_err(|e| EnvelopeError::Corrupt(format!("metadata: {e}")))?;
        if meta.len() != len {
            return Err(EnvelopeError::Corrupt("truncated metadata".into()));
        }
        let mut sum = vec![0u8; meta_sum_len(head[4])];
        inner.read_exact(&mut sum).map_err(|_| EnvelopeError::Corrupt("truncated header".into()))?;
        check_meta(&meta, &sum)?;
        let meta = if meta.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&meta).map_err(|e| EnvelopeError::Corrupt(format!("metadata: {e}")))?
        };
        let trailer = trailer_len(head[4], &codecs);
        let sealed = codecs.last() == Some(&AGE);
        let payload_hash = sealed.then(|| StoredHasher::new(head[4]));
        let buf = vec![0; PAYLOAD_BUF];
        Ok(PayloadReader { inner, buf, pos: 0, end: 0, eof: false, codecs, meta, trailer, sealed, payload_hash })
    }

    /// Reads more when no more than the trailer's length is left unread, into the buffer
    /// itself (what is left, a few bytes, moved to its start first).
    fn fill(&mut self) -> std::io::Result<()> {
        while !self.eof && self.end - self.pos <= self.trailer {
            if self.pos > 0 {
                self.buf.copy_within(self.pos..self.end, 0);
                self.end -= self.pos;
                self.pos = 0;
            }
            let n = self.inner.read(&mut self.buf[self.end..])?;
            if n == 0 {
                self.eof = true;
            } else {
                self.end += n;
            }
        }
        Ok(())
    }

    /// The trailer (content length, SHA-256), once the payload has been read to its end; an
    /// encrypted object's payload is checked against its SHA-256 here.
    pub fn trailer(&mut self) -> Result<(u64, [u8; 32]), EnvelopeError> {
        self.fill().map_err(|e| EnvelopeError::Corrupt(e.to_string()))?;
        let rest = &self.buf[self.pos..self.end];
        if !self.eof || rest.len() != self.trailer {
            return Err(EnvelopeError::Corrupt(format!(
                "{} bytes after the payload, expected {}",
                rest.len(),
                self.trailer
            )));
        }
        if let Some(h) = self.payload_hash.take() {
            let actual = h.finish();
            if actual[..] != rest[TRAILER..] {
                return Err(EnvelopeError::Checksum {
                    expected: hex::encode(&rest[TRAILER..]),
                    actual: hex::encode(actual),
                });
            }
        }
        Ok(split_trailer(rest))
    }

    /// Stops checking an encrypted payload against the checksum of its stored form: for a
    /// reader that decrypts it, since age authenticates every chunk (and the payload's end)
    /// already; the trailer's length is still checked.
    pub fn skip_stored_check(&mut self) {
        self.payload_hash = None;
    }

    /// Whether the payload is encrypted.
    pub fn sealed(&self) -> bool {
        self.sealed
    }
}

impl<R: std::io::Read> std::io::Read for PayloadReader<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        self.fill()?;
        let available = (self.end - self.pos).saturating_sub(self.trailer);
        if available == 0 {
            if self.eof && self.end - self.pos < self.trailer {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "object shorter than its trailer"));
            }
            return Ok(0);
        }
        let n = available.min(out.len());
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        if let Some(h) = &mut self.payload_hash {
            h.update(&out[..n]);
        }
        self.pos += n;
        Ok(n)
    }
}

/// Undoes the codec chain of a streamed payload: decrypts with `keys` (an encrypted object whose
/// metadata is `meta`), then decompresses.
pub fn decoder<'a, R: std::io::BufRead + 'a>(
    payload: R,
    codecs: &[u8],
    keys: Option<&'a Identities>,
    meta: &serde_json::Value,
) -> Result<Box<dyn std::io::Read + 'a>, EnvelopeError> {
    match codecs.split_last() {
        Some((&AGE, rest)) => {
            let plain = decrypter(payload, keys, meta)?;
            decompressor(std::io::BufReader::with_capacity(1 << 20, plain), rest)
        }
        _ => decompressor(payload, codecs),
    }
}

/// Decrypts a streamed encrypted payload with `keys` (the object's metadata is `meta`): the
/// first step of [`decoder`], for a reader that runs the steps on threads of their own.
pub fn decrypter<'a, R: std::io::Read + 'a>(
    payload: R,
    keys: Option<&'a Identities>,
    meta: &serde_json::Value,
) -> Result<Box<dyn std::io::Read + 'a>, EnvelopeError> {
    let keys = keys.ok_or_else(|| EnvelopeError::NoIdentity { recipients: recipients_of(meta) })?;
    keys.reader(payload).map_err(|r| EnvelopeError::refused(r, meta, keys))
}

/// Undoes the compression of a streamed payload.
pub fn decompressor<'a, R: std::io::BufRead + 'a>(
    payload: R,
    codecs: &[u8],
) -> Result<Box<dyn std::io::Read + 'a>, EnvelopeError> {
    match codecs {
        [] => Ok(Box::new(payload)),
        [1] => Ok(Box::new(zstd::Decoder::with_buffer(payload).map_err(|e| EnvelopeError::Corrupt(e.to_string()))?)),
        [LZ4_FRAME] => Ok(Box::new(lz4_flex::frame::FrameDecoder::new(payload))),
        [other, ..] => Err(EnvelopeError::UnknownCodec(*other)),
    }
}

/// A reader that hashes and counts what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    pub count: u64,
}

impl<R: std::io::Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader { inner, hasher: Sha256::new(), count: 0 }
    }
    pub fn finish(self) -> (u64, [u8; 32]) {
        (self.count, self.hasher.finalize().into())
    }
}

impl<R: std::io::Read> std::io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod stream_tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn streamed_objects_round_trip_and_detect_corruption() {
        let content: Vec<u8> = (0..500_000u32).flat_map(|i| (i % 1000).to_le_bytes()).collect();
        for compression in [Compression::None, Compression::Zstd, Compression::Lz4] {
            let codec = Codec { compression, level: 1, seal: None };
            let mut obj = stream_header(&codec);
            let mut w = HashingWriter::new(Compressor::new(Vec::new(), &codec).unwrap());
            w.write_all(&content).unwrap();
            let (c, len, sum) = w.finish();
            obj.extend_from_slice(&c.finish().unwrap());
            obj.extend_from_slice(&stream_trailer(len, sum, None));
            let read_back = |obj: &[u8]| -> Result<Vec<u8>, String> {
                let mut p = PayloadReader::new(obj).map_err(|e| e.to_string())?;
                let codecs = p.codecs.clone();
                let mut out = Vec::new();
                {
                    let mut h = HashingReader::new(
                        decompressor(std::io::BufReader::new(&mut p), &codecs).map_err(|e| e.to_string())?,
                    );
                    h.read_to_end(&mut out).map_err(|e| e.to_string())?;
                    let (n, s) = h.finish();
                    let (tn, ts) = p.trailer().map_err(|e| e.to_string())?;
                    if n != tn || s != ts {
                        return Err("checksum".into());
                    }
                }
                Ok(out)
            };
            assert_eq!(read_back(&obj).unwrap(), content, "{compression:?}");
            // Whole-object decode understands streamed objects too.
            assert_eq!(decode(&obj).unwrap().content.to_vec(), content, "{compression:?}");
            let mut bad = obj.clone();
            let mid = bad.len() / 2;
            bad[mid] ^= 0x10;
            assert!(read_back(&bad).is_err(), "{compression:?}: corruption detected");
        }
    }
}

#[cfg(test)]
mod sealed_tests {
    use super::*;
    use crate::crypt::{Identities, Recipients};
    use std::io::{Read, Write};

    fn keys() -> (Identities, Arc<Recipients>) {
        use age::secrecy::ExposeSecret;
        let id = age::x25519::Identity::generate();
        let public = id.to_public().to_string();
        let secret = id.to_string().expose_secret().to_string();
        (Identities::parse(&secret, "t").unwrap(), Arc::new(Recipients::parse([public.as_str()], "t").unwrap()))
    }

    fn marker_content() -> Vec<u8> {
        (0..200_000u32).flat_map(|i| format!("row {i} SECRET-MARKER ").into_bytes()).collect()
    }

    #[test]
    fn whole_objects_are_encrypted_checked_and_refused_by_name() {
        let (id, to) = keys();
        let (other, _) = keys();
        let content = marker_content();
        let meta = serde_json::json!({"name": "x"});
        for compression in [Compression::None, Compression::Zstd, Compression::Lz4] {
            let codec = Codec { compression, level: 1, seal: Some(to.clone()) };
            let obj = encode(&content, &meta, codec.clone());
            let clear = encode(&content, &meta, codec.clear());
            assert!(is_encrypted(&obj) && !is_encrypted(&clear));
            assert!(!obj.windows(13).any(|w| w == b"SECRET-MARKER"), "{compression:?}: no clear text");
            // The same content has the same content checksum, encrypted or not (re-push checks).
            assert_eq!(stored_checksum(&obj), stored_checksum(&clear));
            let d = decode_with(&obj, Some(&id)).unwrap();
            assert_eq!(d.content.to_vec(), content);
            assert_eq!(d.meta["name"], "x");
            assert_eq!(d.meta["recipients"][0], to.public_keys()[0]);
            // Metadata stays readable without the key.
            assert_eq!(meta_from_prefix(&obj).unwrap().unwrap()["name"], "x");
            let e = decode(&obj).unwrap_err();
            assert!(matches!(e, EnvelopeError::NoIdentity { .. }), "{e}");
            assert!(
                e.to_string().contains(&to.public_keys()[0]) && e.to_string().contains("WALNUT_AGE_IDENTITY"),
                "{e}"
            );
            let e = decode_with(&obj, Some(&other)).unwrap_err();
            assert!(matches!(e, EnvelopeError::WrongIdentity { .. }), "{e}");
            assert!(e.to_string().contains(&other.public_keys()[0]), "{e}");
            // Checked whole without the key; a flipped byte found with and without it.
            check_stored(&obj, None).unwrap();
            let mut bad = obj.to_vec();
            let mid = bad.len() / 2;
            bad[mid] ^= 1;
            assert!(matches!(check_stored(&bad, None), Err(EnvelopeError::Checksum { .. })));
            assert!(decode_with(&bad, Some(&id)).is_err());
            // Truncated ciphertext (trailer kept): refused.
            let sealed_trailer = TRAILER + 16;
            let mut cut = obj[..obj.len() - sealed_trailer - 100].to_vec();
            cut.extend_from_slice(&obj[obj.len() - sealed_trailer..]);
            assert!(decode_with(&cut, Some(&id)).is_err());
            assert!(check_stored(&cut, None).is_err());
        }
    }

    /// `object` (version 3, encrypted) as version 2 wrote it: the stored checksum is SHA-256.
    fn as_version_2(object: &[u8]) -> Vec<u8> {
        assert_eq!(object[4], SEALED_VERSION);
        let start = payload_start(object).unwrap();
        let body = object.len() - TRAILER - 16;
        let mut old = object[..body + TRAILER].to_vec();
        old[4] = 2;
        old.extend_from_slice(&sha256(&object[start..body]));
        old
    }

    #[test]
    fn encrypted_objects_of_version_2_are_still_read_and_checked() {
        let (id, to) = keys();
        let content = marker_content();
        let codec = Codec { compression: Compression::Zstd, level: 1, seal: Some(to.clone()) };
        let obj = encode(&content, &serde_json::json!({"k": 1}), codec.clone());
        assert_eq!(obj[4], 3, "encrypted objects are written as version 3");
        assert_eq!(encode(&content, &serde_json::Value::Null, Codec::default())[4], 2, "clear ones as version 2");
        let old = as_version_2(&obj);
        assert_eq!(old.len(), obj.len() + 16);
        assert_eq!(decode_with(&old, Some(&id)).unwrap().content.to_vec(), content);
        check_stored(&old, None).unwrap();
        assert_eq!(stored_checksum(&old), stored_checksum(&obj));
        // Streamed: the SHA-256 of the stored form is checked at the end.
        let mut p = PayloadReader::new(&old[..]).unwrap();
        assert!(p.sealed());
        std::io::copy(&mut p, &mut std::io::sink()).unwrap();
        p.trailer().unwrap();
        // A flipped payload byte is found by each reader, in each version.
        for o in [obj.to_vec(), old] {
            let mut bad = o.clone();
            let at = payload_start(&o).unwrap() + 40;
            bad[at] ^= 0x10;
            assert!(matches!(check_stored(&bad, None), Err(EnvelopeError::Checksum { .. })), "v{}", o[4]);
            let mut p = PayloadReader::new(&bad[..]).unwrap();
            std::io::copy(&mut p, &mut std::io::sink()).unwrap();
            assert!(matches!(p.trailer(), Err(EnvelopeError::Checksum { .. })), "v{}", o[4]);
            assert!(decode_with(&bad, Some(&id)).is_err(), "v{}", o[4]);
        }
        // Re-encrypted, a version 2 object becomes version 3.
        let mut out = Vec::new();
        reseal(&as_version_2(&obj)[..], &mut out, Some(&id), &to).unwrap();
        assert_eq!(out[4], 3);
        assert_eq!(decode_with(&out, Some(&id)).unwrap().content.to_vec(), content);
        check_stored(&out, None).unwrap();
    }

    #[test]
    fn streamed_objects_are_encrypted_and_checked() {
        let (id, to) = keys();
        let content = marker_content();
        for compression in [Compression::None, Compression::Zstd, Compression::Lz4] {
            let codec = Codec { compression, level: 1, seal: Some(to.clone()) };
            let mut obj = stream_header(&codec);
            let mut w = HashingWriter::new(Compressor::new(Sealing::new(Vec::new(), &codec).unwrap(), &codec).unwrap());
            w.write_all(&content).unwrap();
            let (c, len, sum) = w.finish();
            let (payload, psum) = c.finish().unwrap().finish().unwrap();
            obj.extend_from_slice(&payload);
            obj.extend_from_slice(&stream_trailer(len, sum, psum));
            assert!(!obj.windows(13).any(|w| w == b"SECRET-MARKER"));
            assert_eq!(decode_with(&obj, Some(&id)).unwrap().content.to_vec(), content, "{compression:?}");
            check_stored(&obj, None).unwrap();
            let mut p = PayloadReader::new(&obj[..]).unwrap();
            assert!(p.sealed());
            let (codecs, meta) = (p.codecs.clone(), p.meta.clone());
            let mut out = Vec::new();
            decoder(std::io::BufReader::new(&mut p), &codecs, Some(&id), &meta).unwrap().read_to_end(&mut out).unwrap();
            assert_eq!(out, content);
            assert_eq!(p.trailer().unwrap(), (len, sum));
            let mut p = PayloadReader::new(&obj[..]).unwrap();
            let e = decoder(std::io::BufReader::new(&mut p), &codecs, None, &meta).err().unwrap();
            assert!(matches!(e, EnvelopeError::NoIdentity { .. }));
        }
    }
}
