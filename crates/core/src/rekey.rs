//! `walnut rekey`: what the repository holds, re-encrypted to the current recipients.
//!
//! Every object that holds data and is not encrypted to exactly the configured recipients (an
//! older set of keys, or clear: written before encryption was switched on) is re-encrypted: WAL
//! files (segments, partial segments, timeline and backup history files), and every DONE
//! backup's parts and manifest. The identity document, locks, markers and the WAL summary index
//! stay clear (docs/repository-format.md says what they reveal). The compressed payload is not
//! recompressed: the age layer alone is replaced.
//!
//! Nothing is replaced before its replacement is proven readable, and nothing is unreadable at
//! any moment:
//! - A WAL object is re-encrypted in memory and decoded whole with the identity (decrypted,
//!   decompressed, the content checked against the original's checksum) before it replaces the
//!   old object in one atomic write (a PUT on object stores, temp + fsync + rename on
//!   `file://`). Its content and so its checksum are unchanged: a re-push of the segment still
//!   matches, and readers that had begun reading the old object finish on it.
//! - A backup part is streamed into a new key (`...p0001.k1.tar`), then read back whole and
//!   checked against the manifest. Once all of a backup's parts are, its manifest (proven
//!   readable first) is rewritten to name them: that one write switches the backup. Then the old
//!   parts are deleted. A crash leaves the old manifest with its old parts or the new with the
//!   new; the next run removes what an interrupted one left in a backup's data directory. (A
//!   restore reading the old parts at the moment they are deleted fails and must be started
//!   again.)
//!
//! It proves what it writes readable by decrypting it, so it needs the secret key of at least
//! one of the new recipients, and the key of an object's old recipients to read it (keep both
//! in the identity file while rotating). It holds the maintenance lock ([`crate::lock`]), so
//! retention deletes nothing meanwhile; WAL archiving and backups go on, and what they write is
//! already encrypted to the current recipients.

use crate::backup::{self, BackupError, Manifest, PartEntry, Status};
use crate::crypt::{Identities, Recipients};
use crate::envelope::{self, Codec};
use crate::layout;
use crate::repo::{RepoError, Repository, cpu};
use crate::verify::Defect;
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use walnut_pg::{SegNo, TimelineId, WalFileName};
use walnut_storage::{PutMode, StorageError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Wal,
    Part,
    Manifest,
}

/// An object to re-encrypt.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    pub key: String,
    pub kind: Kind,
    /// The recipients it is encrypted to now (empty: it is in clear).
    pub recipients: Vec<String>,
    pub stored_bytes: u64,
}

/// What a rekey to `to` would do.
#[derive(Debug, Default, Serialize)]
pub struct Plan {
    /// The recipients objects are re-encrypted to.
    pub to: Vec<String>,
    /// Objects already encrypted to exactly those recipients.
    pub current: usize,
    pub todo: Vec<Item>,
    /// Objects whose header could not be read (they are left as they are).
    pub unreadable: Vec<Defect>,
    /// Objects in a DONE backup's data directory that its manifest does not name: what an
    /// interrupted rekey left (old parts, or new ones it had not switched to yet). Deleted.
    pub leftovers: Vec<String>,
}

/// What a rekey did.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub rekeyed: usize,
    pub bytes: u64,
    /// Backups switched to re-encrypted parts or manifests.
    pub backups: usize,
    /// WAL summary index objects updated with the new object sizes.
    pub index_objects: usize,
    /// Leftovers of an interrupted run deleted.
    pub leftovers_deleted: usize,
    /// Objects left as they were, and why (still readable as before).
    pub failures: Vec<Defect>,
}

/// Stored bytes to re-encrypt (`total`), and done.
pub use crate::backup::Progress;

#[derive(Debug, thiserror::Error)]
pub enum RekeyError {
    #[error(
        "rekey proves every object it writes readable by decrypting it: configure an identity \
         (encryption.identity_file or WALNUT_AGE_IDENTITY) that holds the secret key of a new recipient ({to}), \
         and the keys of the old ones to read what they encrypted"
    )]
    NoIdentity { to: String },
    #[error(
        "the identity configured (the key of {ours}) is not the secret key of any new recipient ({to}), so rekey \
         could not prove what it writes readable: add the new secret key to the identity file, beside the old one"
    )]
    CannotVerify { ours: String, to: String },
    #[error(
        "the repository's maintenance lock is held ({0}); rekey changes nothing meanwhile: run it again once that has finished"
    )]
    Busy(String),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Whether an object (encrypted or not, to `recipients`) must be re-encrypted to `to`.
fn outdated(encrypted: bool, recipients: &[String], to: &Recipients) -> bool {
    let have: BTreeSet<&str> = recipients.iter().map(String::as_str).collect();
    let want: BTreeSet<&str> = to.public_keys().iter().map(String::as_str).collect();
    !encrypted || have != want
}

/// Finds what a rekey to `to` would re-encrypt (reads object headers only; needs no key).
pub async fn plan(repo: &Repository, to: &Recipients, parallel: usize) -> Result<Plan, RekeyError> {
    let mut candidates: Vec<(String, Kind, u64)> = repo
        .store()
        .list(layout::WAL_DIR)
        .await?
        .into_iter()
        .filter(|o| layout::parse_wal_key(&o.key).is_some())
        .map(|o| (o.key, Kind::Wal, o.size))
        .collect();
    let mut leftovers = Vec::new();
    for b in backup::list(repo).await?.into_iter().filter(|b| b.status == Status::Done) {
        let id = b.id.to_string();
        let stored: HashMap<String, u64> =
            repo.store().list(&layout::backup_dir(&id)).await?.into_iter().map(|o| (o.key, o.size)).collect();
        let manifest = layout::backup_manifest(&id);
        match backup::load_catalog(repo, &id).await {
            Ok(c) => {
                let data = format!("{}/", layout::backup_data_dir(&id));
                let named: BTreeSet<&str> = c.parts.iter().map(|p| p.key.as_str()).collect();
                leftovers
                    .extend(stored.keys().filter(|k| k.starts_with(&data) && !named.contains(k.as_str())).cloned());
                candidates.extend(c.parts.iter().map(|p| {
                    let size = stored.get(&p.key).copied().unwrap_or(p.stored_bytes);
                    (p.key.clone(), Kind::Part, size)
                }))
            }
            // Its header is unreadable: reported below with the manifest's own check.
            Err(e) => tracing::debug!("{manifest}: {e}"),
        }
        candidates.push((manifest.clone(), Kind::Manifest, stored.get(&manifest).copied().unwrap_or(0)));
    }
    let heads: Vec<_> = futures::stream::iter(candidates)
        .map(|(key, kind, size)| async move {
            let head = repo.object_head(&key).await;
            (key, kind, size, head)
        })
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    let mut plan = Plan { to: to.public_keys().to_vec(), ..Default::default() };
    for (key, kind, stored_bytes, head) in heads {
        match head {
            Ok((meta, encrypted)) => {
                let recipients = envelope::recipients(&meta);
                if outdated(encrypted, &recipients, to) {
                    plan.todo.push(Item { key, kind, recipients, stored_bytes });
                } else {
                    plan.current += 1;
                }
            }
            Err(e) => plan.unreadable.push(Defect { object: key, reason: e.to_string() }),
        }
    }
    leftovers.sort();
    plan.leftovers = leftovers;
    plan.todo.sort_by(|a, b| (a.kind, &a.key).cmp(&(b.kind, &b.key)));
    plan.unreadable.sort();
    Ok(plan)
}

/// Re-encrypts to `to` with the repository's keys (see the module docs): takes the maintenance
/// lock, then plans (under the lock, so that no other run's objects are mistaken for leftovers)
/// and carries the plan out.
pub async fn run(
    repo: &Repository,
    to: Arc<Recipients>,
    parallel: usize,
    progress: Arc<Progress>,
) -> Result<(Plan, Report), RekeyError> {
    let keys = repo.keys().cloned().ok_or_else(|| RekeyError::NoIdentity { to: to.public_keys().join(", ") })?;
    let ours = keys.public_keys();
    if !ours.iter().any(|k| to.public_keys().contains(k)) {
        return Err(RekeyError::CannotVerify { ours: ours.join(", "), to: to.public_keys().join(", ") });
    }
    let lock = crate::lock::maintenance(repo, "rekey").await.map_err(|e| match e {
        crate::lock::LockError::Held(who) => RekeyError::Busy(who),
        crate::lock::LockError::Storage(e) => e.into(),
    })?;
    let plan = match plan(repo, &to, parallel).await {
        Ok(p) => p,
        Err(e) => {
            lock.release().await;
            return Err(e);
        }
    };
    let report = execute(repo, &plan, &keys, to, parallel, &progress).await;
    lock.release().await;
    Ok((plan, report))
}

async fn execute(
    repo: &Repository,
    plan: &Plan,
    keys: &Arc<Identities>,
    to: Arc<Recipients>,
    parallel: usize,
    progress: &Arc<Progress>,
) -> Report {
    progress.total.store(plan.todo.iter().map(|i| i.stored_bytes).sum(), Ordering::Relaxed);
    let mut report = Report { failures: plan.unreadable.clone(), ..Default::default() };

    // WAL: each object on its own, in parallel.
    let wal: Vec<&Item> = plan.todo.iter().filter(|i| i.kind == Kind::Wal).collect();
    let results: Vec<(&Item, Result<u64, String>)> = futures::stream::iter(wal)
        .map(|item| {
            let (keys, to, progress) = (keys.clone(), to.clone(), progress.clone());
            async move {
                let r = rekey_whole(repo, &item.key, keys, to).await;
                progress.done.fetch_add(item.stored_bytes, Ordering::Relaxed);
                (item, r)
            }
        })
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    let seg_size = repo.identity().await.ok().flatten().map(|i| i.seg_size());
    let mut sizes: HashMap<(TimelineId, SegNo), u64> = HashMap::new();
    for (item, r) in results {
        match r {
            Ok(size) => {
                report.rekeyed += 1;
                report.bytes += size;
                if let (Some(WalFileName::Segment(s)), Some(seg_size)) = (layout::parse_wal_key(&item.key), seg_size)
                    && let Some(segno) = s.segno(seg_size)
                {
                    sizes.insert((s.tli, segno), size);
                }
            }
            Err(reason) => report.failures.push(Defect { object: item.key.clone(), reason }),
        }
    }
    // The index counts an entry only for a segment listed with the recorded size.
    match crate::walindex::resize(repo, &sizes).await {
        Ok(n) => report.index_objects = n,
        Err(e) => tracing::warn!("update the WAL summary index: {e}; readers read the rekeyed segments one by one"),
    }

    // Backups: one at a time, each switched by its manifest.
    let mut per_backup: BTreeMap<String, Vec<&Item>> = BTreeMap::new();
    for item in plan.todo.iter().filter(|i| i.kind != Kind::Wal) {
        if let Some(id) = layout::backup_id_of(&item.key) {
            per_backup.entry(id.to_string()).or_default().push(item);
        }
    }
    for (id, items) in per_backup {
        match rekey_backup(repo, &id, &items, keys, &to, parallel, progress).await {
            Ok(Some((n, bytes))) => {
                report.rekeyed += n;
                report.bytes += bytes;
                report.backups += 1;
            }
            Ok(None) => {}
            Err(d) => report.failures.push(d),
        }
    }
    // What an interrupted run left (never named by a manifest: nothing reads it).
    for key in &plan.leftovers {
        match repo.store().delete(key).await {
            Ok(()) => report.leftovers_deleted += 1,
            Err(e) => report.failures.push(Defect { object: key.clone(), reason: format!("delete the leftover: {e}") }),
        }
    }
    report.failures.sort();
    report
}

/// Re-encrypts one whole object (WAL) in memory, proves the result decodes to the same content,
/// and replaces the stored object with it. Returns the new size.
async fn rekey_whole(repo: &Repository, key: &str, keys: Arc<Identities>, to: Arc<Recipients>) -> Result<u64, String> {
    let raw = repo.store().get(key).await.map_err(|e| e.to_string())?;
    let object = cpu(move || -> Result<Bytes, String> {
        let mut out = Vec::with_capacity(raw.len() + 1024);
        let sealed = envelope::reseal(&raw[..], &mut out, Some(&keys), &to).map_err(|e| e.to_string())?;
        proven(&out, &keys, &sealed.content_sha256)?;
        Ok(out.into())
    })
    .await?;
    let size = object.len() as u64;
    repo.store().put(key, object, PutMode::Overwrite).await.map_err(|e| e.to_string())?;
    Ok(size)
}

/// Decodes a re-encrypted object whole (decrypted, decompressed, checked against its trailer)
/// and checks its content is the original's.
fn proven(object: &[u8], keys: &Identities, original: &[u8; 32]) -> Result<envelope::Decoded, String> {
    let d = envelope::decode_with(object, Some(keys))
        .map_err(|e| format!("the re-encrypted object does not read back: {e}"))?;
    if &d.sha256 != original {
        return Err("the re-encrypted object holds other content than the original".into());
    }
    Ok(d)
}

/// Re-encrypts what `items` names of backup `id`: its parts into new keys (each read back and
/// checked), then its manifest, naming them, written over the old one, then the old parts
/// deleted. Returns (objects re-encrypted, their new size), or `None` when the backup was
/// deleted meanwhile. A failure leaves the backup as it was.
async fn rekey_backup(
    repo: &Repository,
    id: &str,
    items: &[&Item],
    keys: &Arc<Identities>,
    to: &Arc<Recipients>,
    parallel: usize,
    progress: &Progress,
) -> Result<Option<(usize, u64)>, Defect> {
    let manifest_key = layout::backup_manifest(id);
    let failed = |object: &str, reason: String| Defect { object: object.to_string(), reason };
    let manifest = backup::load_manifest(repo, id).await.map_err(|e| failed(&manifest_key, e.to_string()))?;
    let parts: Vec<&PartEntry> =
        manifest.parts.iter().filter(|p| items.iter().any(|i| i.kind == Kind::Part && i.key == p.key)).collect();
    let results: Vec<(String, Result<PartEntry, String>)> = futures::stream::iter(parts)
        .map(|part| async move {
            let r = rekey_part(repo, part, keys.clone(), to.clone()).await;
            progress.done.fetch_add(part.stored_bytes, Ordering::Relaxed);
            (part.key.clone(), r)
        })
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    let mut moved: HashMap<String, PartEntry> = HashMap::new();
    let mut failure = None;
    for (old, r) in results {
        match r {
            Ok(entry) => {
                moved.insert(old, entry);
            }
            Err(reason) => failure = failure.or(Some(failed(&old, reason))),
        }
    }
    let discard = |moved: HashMap<String, PartEntry>| async move {
        for p in moved.into_values() {
            let _ = repo.store().delete(&p.key).await;
        }
    };
    if let Some(f) = failure {
        discard(moved).await;
        return Err(f);
    }
    walnut_storage::crashpoint::hit("rekey:before-manifest");
    let mut m: Manifest = manifest.clone();
    for p in &mut m.parts {
        if let Some(new) = moved.get(&p.key) {
            *p = new.clone();
        }
    }
    for f in &mut m.files {
        if let Some(new) = moved.get(&f.part) {
            f.part = new.key.clone();
        }
    }
    m.stored_bytes = m.parts.iter().map(|p| p.stored_bytes).sum();
    let codec = Codec { compression: crate::Compression::None, level: 0, seal: Some(to.clone()) };
    let object = backup::manifest_object(&m, &codec);
    {
        let (object, keys, want) = (object.clone(), keys.clone(), m.clone());
        let r = cpu(move || -> Result<(), String> {
            let sum = envelope::stored_checksum(&object).unwrap_or_default();
            let d = proven(&object, &keys, &sum)?;
            let back: Manifest = serde_json::from_slice(&d.content).map_err(|e| e.to_string())?;
            let same = serde_json::to_value(&back).ok() == serde_json::to_value(&want).ok();
            same.then_some(()).ok_or_else(|| "the re-encrypted manifest reads back different".to_string())
        })
        .await;
        if let Err(reason) = r {
            discard(moved).await;
            return Err(failed(&manifest_key, reason));
        }
    }
    // Deleted by someone else meanwhile (retention is locked out; `delete` by hand is not
    // expected during a rekey, but is harmless): leave it deleted.
    if repo.store().head(&manifest_key).await.map_err(|e| failed(&manifest_key, e.to_string()))?.is_none() {
        discard(moved).await;
        return Ok(None);
    }
    let size = object.len() as u64;
    if let Err(e) = repo.store().put(&manifest_key, object, PutMode::Overwrite).await {
        // Not written, or written: either way the parts it names exist. Keep the new parts.
        return Err(failed(&manifest_key, e.to_string()));
    }
    walnut_storage::crashpoint::hit("rekey:after-manifest");
    // The backup now reads its new parts: remove every other object of its data directory (the
    // old parts, and what an interrupted earlier run left).
    let named: BTreeSet<&str> = m.parts.iter().map(|p| p.key.as_str()).collect();
    if let Ok(objects) = repo.store().list(&layout::backup_data_dir(id)).await {
        for o in objects.into_iter().filter(|o| !named.contains(o.key.as_str())) {
            if let Err(e) = repo.store().delete(&o.key).await {
                tracing::warn!("delete {} (replaced by its re-encrypted copy): {e}", o.key);
            }
        }
    }
    let bytes: u64 = moved.values().map(|p| p.stored_bytes).sum::<u64>() + size;
    Ok(Some((moved.len() + 1, bytes)))
}

/// Streams one part into its new key, re-encrypted, then reads the new object back whole and
/// checks it against the manifest. Returns its new entry.
async fn rekey_part(
    repo: &Repository,
    part: &PartEntry,
    keys: Arc<Identities>,
    to: Arc<Recipients>,
) -> Result<PartEntry, String> {
    let new_key = layout::rekeyed_part(&part.key);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let store = repo.store().clone();
    let target = new_key.clone();
    let upload = async move {
        let mut w = store.put_writer(&target).await?;
        while let Some(b) = rx.recv().await {
            if let Err(e) = w.write(b).await {
                let _ = w.abort().await;
                return Err(e);
            }
        }
        Ok(w)
    };
    let (k, from) = (keys.clone(), part.key.clone());
    let produce = backup::read_part(repo, &part.key, move |reader| {
        let mut sink = backup::ChunkWriter::new(backup::channel_sender(tx, |b| b));
        let sealed = envelope::reseal(reader, &mut sink, Some(&k), &to)
            .map_err(|e| BackupError::Corrupt { key: from.clone(), reason: e.to_string() })?;
        sink.finish().map_err(|e| BackupError::Corrupt { key: from, reason: format!("write: {e}") })?;
        Ok(sealed)
    });
    let (written, sealed) = tokio::join!(upload, produce);
    let sealed = match (written, sealed) {
        (Err(e), _) => return Err(format!("write {new_key}: {e}")),
        (Ok(w), Err(e)) => {
            let _ = w.abort().await;
            return Err(e.to_string());
        }
        (Ok(w), Ok(sealed)) => {
            w.finish().await.map_err(|e| format!("write {new_key}: {e}"))?;
            sealed
        }
    };
    let entry = PartEntry {
        key: new_key.clone(),
        stored_bytes: sealed.stored_bytes,
        content_bytes: part.content_bytes,
        content_sha256: part.content_sha256.clone(),
    };
    let back = async {
        if sealed.content_len != part.content_bytes || hex::encode(sealed.content_sha256) != part.content_sha256 {
            return Err("the part holds other content than its manifest says".to_string());
        }
        let want = Some((part.content_bytes, part.content_sha256.clone()));
        backup::check_part(repo, &new_key, want, Default::default(), false, Default::default())
            .await
            .map_err(|e| format!("the re-encrypted part does not read back: {e}"))?;
        let stored = repo.store().head(&new_key).await.map_err(|e| e.to_string())?.map(|i| i.size);
        if stored != Some(sealed.stored_bytes) {
            return Err(format!("{new_key} is stored with {stored:?} bytes, {} were written", sealed.stored_bytes));
        }
        Ok(())
    };
    if let Err(e) = back.await {
        let _ = repo.store().delete(&new_key).await;
        return Err(e);
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;
    use walnut_pg::names::SegName;
    use walnut_pg::{PgMajor, SystemId, WalSegSize};

    struct Key {
        public: String,
        secret: String,
    }

    fn key() -> Key {
        let (public, secret) = crate::crypt::generate();
        Key { public, secret }
    }

    fn recipients(keys: &[&Key]) -> Arc<Recipients> {
        Arc::new(Recipients::parse(keys.iter().map(|k| k.public.as_str()), "test").unwrap())
    }

    fn identities(keys: &[&Key]) -> Arc<Identities> {
        let text: Vec<&str> = keys.iter().map(|k| k.secret.as_str()).collect();
        Arc::new(Identities::parse(&text.join("\n"), "test").unwrap())
    }

    fn seg_key(s: u64) -> String {
        layout::wal_key(&WalFileName::Segment(SegName::new(TimelineId(1), SegNo(s), WalSegSize::DEFAULT)))
    }

    fn content(s: u64) -> Vec<u8> {
        (0..200_000u32).flat_map(|i| (i % 251 + s as u32).to_le_bytes()).collect()
    }

    async fn repo() -> Repository {
        let repo = Repository::new(walnut_storage::open("memory://", &Default::default()).unwrap());
        repo.ensure_identity(&Identity::new(SystemId(7), PgMajor(15), WalSegSize::DEFAULT)).await.unwrap();
        repo
    }

    /// Segments `range`, each with a summary in its metadata, encoded with `seal`.
    async fn put_segments(repo: &Repository, range: std::ops::RangeInclusive<u64>, seal: Option<Arc<Recipients>>) {
        for s in range {
            let meta = serde_json::json!({ "summary": { "records": s } });
            let codec = Codec { seal: seal.clone(), ..Codec::default() };
            repo.store().put(&seg_key(s), envelope::encode(&content(s), &meta, codec), PutMode::Create).await.unwrap();
        }
    }

    async fn rekey(repo: &Repository, to: &Arc<Recipients>) -> Result<Report, RekeyError> {
        Ok(run(repo, to.clone(), 4, Default::default()).await?.1)
    }

    /// Every segment in `range` decodes with `keys` to its content, with its metadata kept.
    async fn readable(repo: &Repository, range: std::ops::RangeInclusive<u64>, keys: &Arc<Identities>) {
        for s in range {
            let raw = repo.store().get(&seg_key(s)).await.unwrap();
            let d = envelope::decode_with(&raw, Some(keys)).unwrap_or_else(|e| panic!("segment {s}: {e}"));
            assert_eq!(d.content, content(s), "segment {s}");
            assert_eq!(d.meta["summary"]["records"], s, "segment {s}: metadata kept");
        }
    }

    #[tokio::test]
    async fn clear_and_old_objects_end_encrypted_to_the_new_key_alone() {
        let (a, b) = (key(), key());
        let repo = repo().await;
        put_segments(&repo, 1..=2, None).await;
        put_segments(&repo, 3..=4, Some(recipients(&[&a]))).await;

        // Encryption switched on later: the clear objects are encrypted, the others are current.
        let p = plan(&repo, &recipients(&[&a]), 4).await.unwrap();
        assert_eq!((p.todo.len(), p.current), (2, 2), "{p:?}");
        assert!(p.todo.iter().all(|i| i.recipients.is_empty() && i.kind == Kind::Wal));
        let repo = repo.with_keys(Some(identities(&[&a])));
        let r = rekey(&repo, &recipients(&[&a])).await.unwrap();
        assert_eq!((r.rekeyed, r.failures.len()), (2, 0), "{r:?}");
        assert!(plan(&repo, &recipients(&[&a]), 4).await.unwrap().todo.is_empty());

        // Rotation to b, with both keys while rotating.
        let repo = repo.with_keys(Some(identities(&[&a, &b])));
        let r = rekey(&repo, &recipients(&[&b])).await.unwrap();
        assert_eq!((r.rekeyed, r.failures.len()), (4, 0), "{r:?}");
        readable(&repo, 1..=4, &identities(&[&b])).await;
        for s in 1..=4 {
            let raw = repo.store().get(&seg_key(s)).await.unwrap();
            let e = envelope::decode_with(&raw, Some(&identities(&[&a]))).unwrap_err();
            assert!(matches!(e, envelope::EnvelopeError::WrongIdentity { .. }), "segment {s}: {e}");
            assert_eq!(envelope::stored_checksum(&raw), Some(envelope::sha256(&content(s))), "same content checksum");
        }
        // Nothing left to do, and the lock is released.
        assert!(plan(&repo, &recipients(&[&b]), 4).await.unwrap().todo.is_empty());
        assert!(repo.store().head(layout::MAINTENANCE_LOCK).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn without_a_key_of_the_new_recipients_nothing_changes() {
        let (a, b) = (key(), key());
        let repo = repo().await;
        put_segments(&repo, 1..=2, Some(recipients(&[&a]))).await;
        let before = repo.store().get(&seg_key(1)).await.unwrap();
        let e = rekey(&repo, &recipients(&[&b])).await.unwrap_err().to_string();
        assert!(e.contains("configure an identity") && e.contains(&b.public), "{e}");
        let repo = repo.with_keys(Some(identities(&[&a])));
        let e = rekey(&repo, &recipients(&[&b])).await.unwrap_err().to_string();
        assert!(e.contains("not the secret key of any new recipient") && !e.contains(&a.secret), "{e}");
        assert_eq!(repo.store().get(&seg_key(1)).await.unwrap(), before);
    }

    #[tokio::test]
    async fn objects_it_cannot_read_are_left_as_they_were_and_named() {
        let (a, b, stranger) = (key(), key(), key());
        let repo = repo().await;
        put_segments(&repo, 1..=3, Some(recipients(&[&a]))).await;
        put_segments(&repo, 4..=4, Some(recipients(&[&stranger]))).await;
        // A flipped byte in segment 2's encrypted payload.
        let mut bad = repo.store().get(&seg_key(2)).await.unwrap().to_vec();
        let middle = bad.len() / 2;
        bad[middle] ^= 1;
        repo.store().put(&seg_key(2), bad.clone().into(), PutMode::Overwrite).await.unwrap();
        let stranger_obj = repo.store().get(&seg_key(4)).await.unwrap();

        let repo = repo.with_keys(Some(identities(&[&a, &b])));
        let r = rekey(&repo, &recipients(&[&b])).await.unwrap();
        assert_eq!(r.rekeyed, 2, "{r:?}");
        let failed: Vec<&str> = r.failures.iter().map(|d| d.object.as_str()).collect();
        assert_eq!(failed, vec![seg_key(2).as_str(), seg_key(4).as_str()], "{r:?}");
        assert!(r.failures[1].reason.contains("does not match any recipient"), "{r:?}");
        assert_eq!(repo.store().get(&seg_key(2)).await.unwrap(), bad, "a damaged object is left as it is");
        assert_eq!(repo.store().get(&seg_key(4)).await.unwrap(), stranger_obj);
        readable(&repo, 1..=1, &identities(&[&b])).await;
        readable(&repo, 3..=3, &identities(&[&b])).await;
    }

    #[tokio::test]
    async fn retention_and_rekey_exclude_each_other() {
        let (a, b) = (key(), key());
        let repo = repo().await.with_keys(Some(identities(&[&a, &b])));
        put_segments(&repo, 1..=1, Some(recipients(&[&a]))).await;
        let held = crate::lock::maintenance(&repo, "retention").await.unwrap();
        let e = rekey(&repo, &recipients(&[&b])).await.unwrap_err().to_string();
        assert!(e.contains("maintenance lock is held") && e.contains("retention started"), "{e}");
        held.release().await;
        assert_eq!(rekey(&repo, &recipients(&[&b])).await.unwrap().rekeyed, 1);
    }

    #[tokio::test]
    async fn the_summary_index_follows_the_new_sizes() {
        let a = key();
        let repo = repo().await;
        let n = (crate::walindex::MIN_NEW + 4) as u64;
        put_segments(&repo, 1..=n, None).await;
        crate::wal::inventory(&repo, true).await.unwrap();
        assert_eq!(repo.store().list(layout::WAL_INDEX_DIR).await.unwrap().len(), 1, "indexed");
        let repo = repo.with_keys(Some(identities(&[&a])));
        let r = rekey(&repo, &recipients(&[&a])).await.unwrap();
        assert_eq!((r.rekeyed, r.index_objects), (n as usize, 1), "{r:?}");
        let known = crate::walindex::load(&repo).await.unwrap();
        for o in repo.store().list(layout::WAL_DIR).await.unwrap() {
            let Some(WalFileName::Segment(s)) = layout::parse_wal_key(&o.key) else { continue };
            let segno = s.segno(WalSegSize::DEFAULT).unwrap();
            assert_eq!(known[&(TimelineId(1), segno)].0, o.size, "{}", o.key);
        }
    }
}
