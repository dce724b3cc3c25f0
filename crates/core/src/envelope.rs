//! The envelope every stored object is wrapped in.
//!
//! ```text
//! "WLNT"            4 bytes magic
//! version           u8  (1)
//! n                 u8  number of codecs in the chain
//! codec ids         n bytes, in the order they were applied on write (compression, later encryption)
//! meta length       u32 LE
//! meta              JSON object (may be empty: length 0)
//! payload           the content after every codec
//! content length    u64 LE   } trailer: written last, so a writer can stream; a reader verifies
//! content SHA-256   32 bytes } the decoded content against it before anything is used
//! ```
//!
//! Readers never guess: the codec chain is recorded in every object.

use bytes::Bytes;
use sha2::{Digest, Sha256};

const MAGIC: &[u8; 4] = b"WLNT";
const VERSION: u8 = 1;
const TRAILER: usize = 40;

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

/// How new objects are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Codec {
    pub compression: Compression,
    pub level: i32,
}

impl Default for Codec {
    fn default() -> Self {
        Codec { compression: Compression::Zstd, level: 1 }
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
    let meta_bytes = if meta.is_null() { Vec::new() } else { serde_json::to_vec(meta).expect("JSON value") };
    let (ids, payload): (Vec<u8>, std::borrow::Cow<'_, [u8]>) = match codec.compression {
        Compression::None => (vec![], content.into()),
        Compression::Zstd => {
            (vec![1], zstd::bulk::compress(content, codec.level).expect("zstd compress into memory").into())
        }
        Compression::Lz4 => (vec![2], lz4_flex::compress(content).into()),
    };
    debug_assert_eq!(codec.compression.id().map(|i| vec![i]).unwrap_or_default(), ids);
    let mut out = Vec::with_capacity(payload.len() + meta_bytes.len() + 64);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(ids.len() as u8);
    out.extend_from_slice(&ids);
    out.extend_from_slice(&(meta_bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta_bytes);
    out.extend_from_slice(&payload);
    out.extend_from_slice(&(content.len() as u64).to_le_bytes());
    out.extend_from_slice(&sha256(content));
    out.into()
}

/// Parses the metadata from the first bytes of an object: `Ok(None)` if more bytes are needed.
pub fn meta_from_prefix(prefix: &[u8]) -> Result<Option<serde_json::Value>, EnvelopeError> {
    if prefix.len() < 6 {
        return if prefix.len() >= 4 && &prefix[..4] != MAGIC { Err(EnvelopeError::NotAnObject) } else { Ok(None) };
    }
    if &prefix[..4] != MAGIC {
        return Err(EnvelopeError::NotAnObject);
    }
    if prefix[4] != VERSION {
        return Err(EnvelopeError::Version(prefix[4]));
    }
    let n = prefix[5] as usize;
    let Some(len) = prefix.get(6 + n..10 + n) else { return Ok(None) };
    let len = u32::from_le_bytes(len.try_into().expect("4")) as usize;
    let Some(meta) = prefix.get(10 + n..10 + n + len) else { return Ok(None) };
    if len == 0 {
        return Ok(Some(serde_json::Value::Null));
    }
    serde_json::from_slice(meta).map(Some).map_err(|e| EnvelopeError::Corrupt(format!("metadata: {e}")))
}

/// Reads the trailer's checksum without decoding (cheap comparisons of stored objects).
pub fn stored_checksum(object: &[u8]) -> Option<[u8; 32]> {
    (object.len() >= 6 + TRAILER && &object[..4] == MAGIC)
        .then(|| object[object.len() - 32..].try_into().expect("32 bytes"))
}

/// Decodes and verifies an object: every codec undone, length and SHA-256 checked.
pub fn decode(object: &[u8]) -> Result<Decoded, EnvelopeError> {
    if object.len() < 6 + 4 + TRAILER || &object[..4] != MAGIC {
        return Err(EnvelopeError::NotAnObject);
    }
    if object[4] != VERSION {
        return Err(EnvelopeError::Version(object[4]));
    }
    let n = object[5] as usize;
    let mut pos = 6;
    let ids = object.get(pos..pos + n).ok_or_else(|| EnvelopeError::Corrupt("truncated codec list".into()))?;
    pos += n;
    let meta_len = u32::from_le_bytes(
        object.get(pos..pos + 4).ok_or_else(|| EnvelopeError::Corrupt("truncated header".into()))?.try_into().unwrap(),
    ) as usize;
    pos += 4;
    let body_end = object.len() - TRAILER;
    if pos + meta_len > body_end {
        return Err(EnvelopeError::Corrupt("metadata longer than the object".into()));
    }
    let meta = if meta_len == 0 {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&object[pos..pos + meta_len])
            .map_err(|e| EnvelopeError::Corrupt(format!("metadata: {e}")))?
    };
    pos += meta_len;
    let expected_len = u64::from_le_bytes(object[body_end..body_end + 8].try_into().unwrap());
    let expected_sum: [u8; 32] = object[body_end + 8..].try_into().unwrap();
    // Refuse absurd lengths before allocating (corrupt trailer).
    if expected_len > 64 << 30 {
        return Err(EnvelopeError::Corrupt(format!("declared length {expected_len} is absurd")));
    }
    let mut content: Vec<u8> = object[pos..body_end].to_vec();
    for id in ids.iter().rev() {
        content = match id {
            1 => zstd::bulk::decompress(&content, expected_len as usize)
                .map_err(|e| EnvelopeError::Corrupt(format!("zstd: {e}")))?,
            2 => lz4_flex::decompress(&content, expected_len as usize)
                .map_err(|e| EnvelopeError::Corrupt(format!("lz4: {e}")))?,
            3 => {
                let mut out = Vec::with_capacity(expected_len as usize);
                std::io::Read::read_to_end(&mut lz4_flex::frame::FrameDecoder::new(&content[..]), &mut out)
                    .map_err(|e| EnvelopeError::Corrupt(format!("lz4: {e}")))?;
                out
            }
            other => return Err(EnvelopeError::UnknownCodec(*other)),
        };
    }
    if content.len() as u64 != expected_len {
        return Err(EnvelopeError::Corrupt(format!("content is {} bytes, trailer says {expected_len}", content.len())));
    }
    let actual = sha256(&content);
    if actual != expected_sum {
        return Err(EnvelopeError::Checksum { expected: hex::encode(expected_sum), actual: hex::encode(actual) });
    }
    Ok(Decoded { content: content.into(), meta, sha256: actual })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        (0..100_000u32).flat_map(|i| (i / 7).to_le_bytes()).collect()
    }

    #[test]
    fn round_trips_with_every_codec() {
        let data = sample();
        for compression in [Compression::None, Compression::Zstd, Compression::Lz4] {
            let meta = serde_json::json!({"kind": "segment"});
            let obj = encode(&data, &meta, Codec { compression, level: 3 });
            let d = decode(&obj).unwrap();
            assert_eq!(d.content.as_ref(), data.as_slice());
            assert_eq!(d.meta, meta);
            assert_eq!(stored_checksum(&obj), Some(sha256(&data)));
            assert_eq!(meta_from_prefix(&obj[..40]).unwrap(), Some(meta.clone()));
            assert_eq!(meta_from_prefix(&obj[..12]).unwrap(), None, "needs more bytes");
            if compression != Compression::None {
                assert!(obj.len() < data.len() / 2, "{compression:?} compresses");
            }
        }
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let data = sample();
        for compression in [Compression::None, Compression::Zstd, Compression::Lz4] {
            let obj = encode(&data, &serde_json::Value::Null, Codec { compression, level: 1 });
            for pos in (0..obj.len()).step_by(obj.len() / 97 + 1).chain([obj.len() - 1, obj.len() / 2]) {
                let mut bad = obj.to_vec();
                bad[pos] ^= 0x40;
                assert!(decode(&bad).is_err(), "{compression:?}: flip at {pos} went unnoticed");
            }
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
            let mut with_magic = b"WLNT\x01".to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = decode(&with_magic);
        }
    }
}

/// Codec id of streamed lz4 (frame format); whole-object lz4 (id 2) is the block format.
const LZ4_FRAME: u8 = 3;

/// The header of a streamed object: written first, before the payload.
pub fn stream_header(codec: Codec) -> Vec<u8> {
    let ids: Vec<u8> = match codec.compression {
        Compression::None => vec![],
        Compression::Zstd => vec![1],
        Compression::Lz4 => vec![LZ4_FRAME],
    };
    let mut out = Vec::with_capacity(16);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(ids.len() as u8);
    out.extend_from_slice(&ids);
    out.extend_from_slice(&0u32.to_le_bytes());
    out
}

/// The trailer of a streamed object.
pub fn stream_trailer(content_len: u64, sha256: [u8; 32]) -> Vec<u8> {
    let mut t = Vec::with_capacity(TRAILER);
    t.extend_from_slice(&content_len.to_le_bytes());
    t.extend_from_slice(&sha256);
    t
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
    pub fn new(inner: W, codec: Codec) -> std::io::Result<Self> {
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

/// Reads a streamed object's payload: parses the header, withholds the trailer, and exposes the
/// trailer once the payload is exhausted.
pub struct PayloadReader<R> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
    eof: bool,
    pub codecs: Vec<u8>,
}

impl<R: std::io::Read> PayloadReader<R> {
    pub fn new(mut inner: R) -> Result<Self, EnvelopeError> {
        let mut head = [0u8; 6];
        inner.read_exact(&mut head).map_err(|_| EnvelopeError::NotAnObject)?;
        if &head[..4] != MAGIC {
            return Err(EnvelopeError::NotAnObject);
        }
        if head[4] != VERSION {
            return Err(EnvelopeError::Version(head[4]));
        }
        let mut codecs = vec![0u8; head[5] as usize];
        inner.read_exact(&mut codecs).map_err(|_| EnvelopeError::Corrupt("truncated header".into()))?;
        let mut len = [0u8; 4];
        inner.read_exact(&mut len).map_err(|_| EnvelopeError::Corrupt("truncated header".into()))?;
        let mut meta = vec![0u8; u32::from_le_bytes(len) as usize];
        inner.read_exact(&mut meta).map_err(|_| EnvelopeError::Corrupt("truncated metadata".into()))?;
        Ok(PayloadReader { inner, buf: Vec::new(), pos: 0, eof: false, codecs })
    }

    fn fill(&mut self) -> std::io::Result<()> {
        if self.pos > 0 && self.pos >= self.buf.len() / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        while !self.eof && self.buf.len() - self.pos <= TRAILER {
            let mut chunk = [0u8; 64 * 1024];
            let n = self.inner.read(&mut chunk)?;
            if n == 0 {
                self.eof = true;
            } else {
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }
        Ok(())
    }

    /// The trailer (content length, SHA-256), once the payload has been read to its end.
    pub fn trailer(&mut self) -> Result<(u64, [u8; 32]), EnvelopeError> {
        self.fill().map_err(|e| EnvelopeError::Corrupt(e.to_string()))?;
        let rest = &self.buf[self.pos..];
        if !self.eof || rest.len() != TRAILER {
            return Err(EnvelopeError::Corrupt(format!("{} bytes after the payload, expected {TRAILER}", rest.len())));
        }
        Ok((u64::from_le_bytes(rest[..8].try_into().unwrap()), rest[8..].try_into().unwrap()))
    }
}

impl<R: std::io::Read> std::io::Read for PayloadReader<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        self.fill()?;
        let available = (self.buf.len() - self.pos).saturating_sub(TRAILER);
        if available == 0 {
            if self.eof && self.buf.len() - self.pos < TRAILER {
                return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "object shorter than its trailer"));
            }
            return Ok(0);
        }
        let n = available.min(out.len());
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Undoes the codec chain of a streamed payload.
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
            let codec = Codec { compression, level: 1 };
            let mut obj = stream_header(codec);
            let mut w = HashingWriter::new(Compressor::new(Vec::new(), codec).unwrap());
            w.write_all(&content).unwrap();
            let (c, len, sum) = w.finish();
            obj.extend_from_slice(&c.finish().unwrap());
            obj.extend_from_slice(&stream_trailer(len, sum));
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
