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
