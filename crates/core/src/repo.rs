//! A repository: a blob store plus the identity of the one cluster it belongs to.
//!
//! The identity (format version, system identifier, PostgreSQL major version, WAL segment size) is
//! written once, create-only, by the first write; every later write checks it first. A file from
//! another cluster is refused with both identities named, and nothing stored is touched.

use crate::envelope::{self, Codec, EnvelopeError};
use crate::layout;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use walnut_pg::{PgMajor, SystemId, WalSegSize};
use walnut_storage::{DynStore, PutMode, StorageError};

pub const FORMAT_VERSION: u32 = 1;

/// Which cluster a repository belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Identity {
    pub format: u32,
    /// As a string: JSON numbers lose precision above 2^53.
    #[serde(with = "sysid_text")]
    pub system_identifier: SystemId,
    pub pg_major: PgMajor,
    pub wal_segment_size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// A random ID drawn when the repository is initialised: a repository re-created at the same
    /// URL for the same cluster is still another repository (local state is keyed by it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

pub(crate) mod sysid_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use walnut_pg::SystemId;
    pub fn serialize<S: Serializer>(v: &SystemId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.0.to_string())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemId, D::Error> {
        let t = String::deserialize(d)?;
        t.parse().map(SystemId).map_err(serde::de::Error::custom)
    }
}

impl Identity {
    pub fn new(system_identifier: SystemId, pg_major: PgMajor, seg: WalSegSize) -> Identity {
        Identity {
            format: FORMAT_VERSION,
            system_identifier,
            pg_major,
            wal_segment_size: seg.bytes(),
            created_at: None,
            created_by: None,
            instance: None,
        }
    }

    /// A short key naming this repository instance, for local state kept about it (the prefetch
    /// spool, upload-ahead records): it changes when the repository is re-created, even for the
    /// same cluster at the same URL.
    pub fn state_key(&self) -> String {
        let body = serde_json::to_vec(self).expect("identity serialises");
        hex::encode(&envelope::sha256(&body)[..8])
    }

    pub fn seg_size(&self) -> WalSegSize {
        WalSegSize::new(self.wal_segment_size).unwrap_or(WalSegSize::DEFAULT)
    }

    /// Same cluster (creation details aside)?
    pub fn same_cluster(&self, other: &Identity) -> bool {
        self.system_identifier == other.system_identifier
            && self.pg_major == other.pg_major
            && self.wal_segment_size == other.wal_segment_size
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "system identifier {}, PostgreSQL {}, WAL segments of {}",
            self.system_identifier,
            self.pg_major,
            self.seg_size()
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(
        "this repository belongs to another cluster: the repository holds {repo}; this file comes from {ours}. \
         Point this cluster at its own repository (a different `repo` URL or prefix)"
    )]
    IdentityMismatch { repo: Box<Identity>, ours: Box<Identity> },
    #[error("repository format {0} is newer than this walnut understands ({FORMAT_VERSION}): upgrade walnut")]
    FormatTooNew(u32),
    #[error("the repository has no identity yet ({}): nothing has been archived to it", layout::IDENTITY)]
    Uninitialised,
    #[error("{key}: {source}")]
    Corrupt { key: String, source: EnvelopeError },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// A repository handle. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Repository {
    store: DynStore,
    /// Secret keys that open encrypted objects (none on a host that only writes).
    keys: Option<Arc<crate::crypt::Identities>>,
}

/// Runs CPU-bound work off the async executor.
pub async fn cpu<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("CPU task panicked")
}

impl Repository {
    pub fn new(store: DynStore) -> Repository {
        Repository { store, keys: None }
    }

    /// This handle, reading encrypted objects with `keys`.
    pub fn with_keys(self, keys: Option<Arc<crate::crypt::Identities>>) -> Repository {
        Repository { keys, ..self }
    }

    pub fn keys(&self) -> Option<&Arc<crate::crypt::Identities>> {
        self.keys.as_ref()
    }

    pub fn store(&self) -> &DynStore {
        &self.store
    }

    pub fn describe(&self) -> String {
        self.store.describe()
    }

    /// The stored identity, if any.
    pub async fn identity(&self) -> Result<Option<Identity>, RepoError> {
        match self.get_object(layout::IDENTITY).await {
            Ok(d) => {
                let id: Identity = serde_json::from_slice(&d.content).map_err(|e| RepoError::Corrupt {
                    key: layout::IDENTITY.into(),
                    source: EnvelopeError::Corrupt(e.to_string()),
                })?;
                if id.format > FORMAT_VERSION {
                    return Err(RepoError::FormatTooNew(id.format));
                }
                Ok(Some(id))
            }
            Err(RepoError::Storage(e)) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Checks `ours` against the stored identity, writing it first if the repository is new.
    pub async fn ensure_identity(&self, ours: &Identity) -> Result<Identity, RepoError> {
        if let Some(stored) = self.identity().await? {
            return self.compare(stored, ours);
        }
        let mut fresh = ours.clone();
        fresh.created_at = Some(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        fresh.created_by = Some(format!("walnut {}", env!("CARGO_PKG_VERSION")));
        fresh.instance = Some(format!("{:032x}", rand::random::<u128>()));
        let body = serde_json::to_vec_pretty(&fresh).expect("identity serialises");
        let obj = envelope::encode(
            &body,
            &serde_json::Value::Null,
            Codec { compression: crate::Compression::None, level: 0, seal: None },
        );
        match self.store.put(layout::IDENTITY, obj, PutMode::Create).await {
            Ok(()) => Ok(fresh),
            // Another writer initialised it first: compare with theirs.
            Err(StorageError::AlreadyExists { .. }) => {
                let stored = self.identity().await?.ok_or(RepoError::Uninitialised)?;
                self.compare(stored, ours)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn compare(&self, stored: Identity, ours: &Identity) -> Result<Identity, RepoError> {
        if stored.same_cluster(ours) {
            Ok(stored)
        } else {
            Err(RepoError::IdentityMismatch { repo: Box::new(stored), ours: Box::new(ours.clone()) })
        }
    }

    /// Reads and verifies one object.
    pub async fn get_object(&self, key: &str) -> Result<envelope::Decoded, RepoError> {
        let raw = self.store.get(key).await?;
        self.decode(key, raw).await
    }

    /// Decodes and verifies an object read from `key` (decrypting it with this handle's keys).
    pub async fn decode(&self, key: &str, raw: Bytes) -> Result<envelope::Decoded, RepoError> {
        let (k, keys) = (key.to_string(), self.keys.clone());
        cpu(move || envelope::decode_with(&raw, keys.as_deref()))
            .await
            .map_err(|source| RepoError::Corrupt { key: k, source })
    }

    /// Reads one object whole and checks it: decoded when it can be, an encrypted one without
    /// this handle's keys against the checksum of its stored form.
    pub async fn check_object(&self, key: &str) -> Result<(), RepoError> {
        let raw = self.store.get(key).await?;
        self.check_raw(key, raw).await
    }

    /// Reads one object whole and checks what is stored: a clear object decoded, an encrypted
    /// one against the checksum of its stored form even when this handle has the keys (what
    /// `verify` without `--deep` asks: are the stored bytes whole; decrypting proves no more
    /// about them).
    pub async fn check_stored_form(&self, key: &str) -> Result<(), RepoError> {
        let raw = self.store.get(key).await?;
        let k = key.to_string();
        cpu(move || envelope::check_stored(&raw, None)).await.map_err(|source| RepoError::Corrupt { key: k, source })
    }

    /// [`Repository::check_object`] of an object already read from `key`.
    pub async fn check_raw(&self, key: &str, raw: Bytes) -> Result<(), RepoError> {
        let (k, keys) = (key.to_string(), self.keys.clone());
        cpu(move || envelope::check_stored(&raw, keys.as_deref()))
            .await
            .map_err(|source| RepoError::Corrupt { key: k, source })
    }

    /// An object's envelope metadata, read with a range request (the object itself may be large).
    pub async fn object_meta(&self, key: &str) -> Result<serde_json::Value, RepoError> {
        Ok(self.object_head(key).await?.0)
    }

    /// An object's envelope metadata and whether it is encrypted, read with a range request.
    pub async fn object_head(&self, key: &str) -> Result<(serde_json::Value, bool), RepoError> {
        let mut want = 4096u64;
        loop {
            let head = self.store.get_range(key, 0..want).await?;
            match envelope::meta_from_prefix(&head) {
                Ok(Some(meta)) => return Ok((meta, envelope::is_encrypted(&head))),
                Ok(None) if (head.len() as u64) == want => want *= 4,
                Ok(None) => {
                    return Err(RepoError::Corrupt {
                        key: key.into(),
                        source: EnvelopeError::Corrupt("truncated header".into()),
                    });
                }
                Err(source) => return Err(RepoError::Corrupt { key: key.into(), source }),
            }
        }
    }

    /// Stores an already encoded object, create-only.
    pub async fn put_new(&self, key: &str, object: Bytes) -> Result<(), StorageError> {
        self.store.put(key, object, PutMode::Create).await
    }
}

/// Whether `store` refuses a create-only put of a key that exists (S3's `If-None-Match: *`):
/// walnut's never-overwrite guarantee for WAL and manifests rests on it. Writes a probe object
/// create-only twice (`false` when the second is accepted) and deletes it. A store error other
/// than the expected refusal is returned as it is.
pub async fn create_only_honoured(store: &dyn walnut_storage::BlobStore) -> Result<bool, StorageError> {
    let name = format!("create-only-{}-{}", std::process::id(), chrono::Utc::now().timestamp_micros());
    let key = layout::probe(&name);
    let first = store.put(&key, Bytes::from_static(b"walnut check: first"), PutMode::Create).await;
    let second = match first {
        Ok(()) => store.put(&key, Bytes::from_static(b"walnut check: second"), PutMode::Create).await,
        Err(e) => Err(e),
    };
    let deleted = store.delete(&key).await;
    match second {
        Err(e) if e.is_already_exists() => deleted.map(|()| true),
        Ok(()) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod create_only_tests {
    use super::*;
    use walnut_storage::{BlobStore, ByteStream, ObjectInfo, ObjectWriter};

    /// A store that turns every create-only put into an overwrite (like an S3-compatible server
    /// that ignores `If-None-Match`).
    #[derive(Debug)]
    struct IgnoresCreate(DynStore);

    #[async_trait::async_trait]
    impl BlobStore for IgnoresCreate {
        async fn put(&self, key: &str, data: Bytes, _mode: PutMode) -> walnut_storage::Result<()> {
            self.0.put(key, data, PutMode::Overwrite).await
        }
        async fn get(&self, key: &str) -> walnut_storage::Result<Bytes> {
            self.0.get(key).await
        }
        async fn head(&self, key: &str) -> walnut_storage::Result<Option<ObjectInfo>> {
            self.0.head(key).await
        }
        async fn list(&self, dir: &str) -> walnut_storage::Result<Vec<ObjectInfo>> {
            self.0.list(dir).await
        }
        async fn delete(&self, key: &str) -> walnut_storage::Result<()> {
            self.0.delete(key).await
        }
        async fn put_writer(&self, key: &str) -> walnut_storage::Result<Box<dyn ObjectWriter>> {
            self.0.put_writer(key).await
        }
        async fn get_stream(&self, key: &str) -> walnut_storage::Result<ByteStream> {
            self.0.get_stream(key).await
        }
        async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> walnut_storage::Result<Bytes> {
            self.0.get_range(key, range).await
        }
        fn describe(&self) -> String {
            "ignores create-only".into()
        }
    }

    fn memory() -> DynStore {
        walnut_storage::open("memory://", &walnut_storage::StorageOptions::default()).unwrap()
    }

    #[tokio::test]
    async fn a_store_that_refuses_the_second_create_honours_it() {
        let store = memory();
        assert!(create_only_honoured(store.as_ref()).await.unwrap());
        assert!(store.list("").await.unwrap().is_empty(), "the probe object is deleted");
    }

    #[tokio::test]
    async fn a_store_that_overwrites_on_create_does_not() {
        let inner = memory();
        let store = IgnoresCreate(inner.clone());
        assert!(!create_only_honoured(&store).await.unwrap());
        assert!(inner.list("").await.unwrap().is_empty(), "the probe object is deleted");
    }
}
