//! `walnut verify`: every backup's objects and the WAL it needs, read whole and checked, and a
//! verdict per backup.
//!
//! For each DONE backup (or the one asked for): the manifest decodes and matches its checksum;
//! every part is listed with the size the manifest records, then read whole (streamed, nothing
//! kept) and its content matched against the part's trailer and the manifest; the WAL from the
//! backup's start along the newest timeline descending from it is present and every segment
//! object (and history file on the way) decodes against its checksum. An encrypted object is
//! checked in its stored form (its payload against the trailer's checksum of it), with or
//! without the key. `deep` also decrypts, reads each part's tar and checks every file against
//! the manifest, and decodes every WAL record.
//!
//! The verdict is the restore planner's own answer on the archive with every defective segment
//! taken out: "restorable to [earliest, latest]", shorter than the archive when a segment is
//! corrupt or missing, or "not restorable" with the object and reason that break it.

use crate::archive::{self, ArchiveError};
use crate::backup::{self, BackupError, FileEntry, Progress, Status};
use crate::envelope::EnvelopeError;
use crate::plan::{self, Request, Target, TimelineChoice, WalInventory};
use crate::repo::{RepoError, Repository};
use crate::{layout, summary};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use walnut_pg::names::SegName;
use walnut_pg::{SegNo, TimelineId, WalFileName, WalSegSize};

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// A backup reference (ID, name, LATEST); all DONE backups when `None`.
    pub backup: Option<String>,
    pub deep: bool,
    /// Objects read at once.
    pub parallel: usize,
}

/// Something wrong with one object.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
pub struct Defect {
    pub object: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Window {
    #[serde(with = "crate::timefmt")]
    pub earliest_time: DateTime<Utc>,
    pub earliest_lsn: String,
    #[serde(with = "crate::timefmt")]
    pub latest_time: DateTime<Utc>,
    pub latest_lsn: String,
    pub timeline: u32,
}

/// One backup's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct BackupVerdict {
    pub id: String,
    pub name: Option<String>,
    pub timeline: u32,
    /// `restorable`, `restorable (WAL ends early)` or `not restorable`.
    pub verdict: String,
    /// Where a restore of this backup can go, when it can.
    pub restorable: Option<Window>,
    /// The objects that break or shorten it, with the reason.
    pub defects: Vec<Defect>,
    pub parts: usize,
    pub segments: usize,
}

impl BackupVerdict {
    pub fn ok(&self) -> bool {
        self.defects.is_empty() && self.restorable.is_some()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub ok: bool,
    pub deep: bool,
    pub backups: Vec<BackupVerdict>,
    /// Defects that belong to no one backup (history files that disagree with the segments).
    pub problems: Vec<String>,
    pub parts_checked: usize,
    pub segments_checked: usize,
    /// Content bytes read and checked.
    pub bytes_checked: u64,
}

impl Report {
    /// Every defect, named, one per line.
    pub fn defects(&self) -> usize {
        self.backups
            .iter()
            .map(|b| b.defects.len() + usize::from(b.restorable.is_none() && b.defects.is_empty()))
            .sum::<usize>()
            + self.problems.len()
    }
}

fn seg_key(t: TimelineId, s: SegNo, size: WalSegSize) -> String {
    layout::wal_key(&WalFileName::Segment(SegName::new(t, s, size)))
}

/// The segments a restore of a backup starting at `start` on `tli` would read, up to the first
/// missing one: its timeline path to the newest descendant, walked as the planner walks it.
fn chain(
    inv: &WalInventory,
    tli: TimelineId,
    start: SegNo,
    size: WalSegSize,
) -> (Vec<(TimelineId, SegNo)>, Vec<TimelineId>) {
    let newest = inv.segments.keys().chain(inv.histories.keys()).copied().filter(|t| *t >= tli).max().unwrap_or(tli);
    let path = plan::path_to(inv, newest);
    let (last, _) = plan::contiguous(inv, &path, start, size);
    let mut segs = Vec::new();
    if let Some((last, _)) = last {
        for s in start.0..=last.0 {
            segs.push((plan::tli_for(&path, SegNo(s), size), SegNo(s)));
        }
    }
    let histories = path.iter().map(|(t, _)| *t).filter(|t| inv.histories.contains_key(t)).collect();
    (segs, histories)
}

/// Reads one WAL object whole and checks it; `deep` decodes every record of a segment too.
async fn check_wal(repo: &Repository, key: &str, start: Option<walnut_pg::Lsn>, deep: bool) -> Option<String> {
    if !deep {
        return repo.check_stored_form(key).await.err().map(|e| e.to_string());
    }
    match repo.get_object(key).await {
        Ok(d) => match (deep, start) {
            (true, Some(start)) => {
                let content = d.content.clone();
                crate::repo::cpu(move || {
                    summary::summarize(&content, start).err().map(|e| format!("does not decode: {e}"))
                })
                .await
            }
            _ => None,
        },
        Err(e) => Some(e.to_string()),
    }
}

/// A part to read: key, stored bytes, and content bytes and SHA-256 when the manifest could be
/// read.
type PartToCheck = (String, u64, Option<(u64, String)>);

/// Checks one backup's manifest and parts. Returns whether its manifest is whole, its
/// defects, and the parts read. Without the key, an encrypted backup's parts are checked in
/// their stored form, from the manifest's clear catalog.
///
/// A `rekey` may switch the backup to re-encrypted parts (and delete the old ones) while they
/// are read: when defects are found and the manifest now names other parts than the ones
/// checked, the backup is checked once more as it is now.
async fn check_backup(
    repo: &Repository,
    id: &str,
    deep: bool,
    parallel: usize,
    progress: Arc<Progress>,
) -> (bool, Vec<Defect>, usize) {
    let parts_now = || async {
        backup::load_catalog(repo, id).await.ok().map(|c| c.parts.into_iter().map(|p| p.key).collect::<Vec<_>>())
    };
    let before = parts_now().await;
    let first = check_backup_once(repo, id, deep, parallel, progress.clone()).await;
    if first.1.is_empty() || before.is_none() || parts_now().await == before {
        return first;
    }
    check_backup_once(repo, id, deep, parallel, progress).await
}

async fn check_backup_once(
    repo: &Repository,
    id: &str,
    deep: bool,
    parallel: usize,
    progress: Arc<Progress>,
) -> (bool, Vec<Defect>, usize) {
    let manifest_key = layout::backup_manifest(id);
    let broken = |reason: String| (false, vec![Defect { object: manifest_key.clone(), reason }], 0);
    let catalog = match backup::load_catalog(repo, id).await {
        Ok(c) => c,
        Err(e) => return broken(e.to_string()),
    };
    if let Err(e) = repo.check_object(&manifest_key).await {
        return broken(e.to_string());
    }
    let manifest = match backup::load_manifest(repo, id).await {
        Ok(m) => Some(m),
        Err(BackupError::Repo(RepoError::Corrupt { source: EnvelopeError::NoIdentity { .. }, .. })) if !deep => None,
        Err(e) => return broken(e.to_string()),
    };
    let parts: Vec<PartToCheck> = match &manifest {
        Some(m) => m
            .parts
            .iter()
            .map(|p| (p.key.clone(), p.stored_bytes, Some((p.content_bytes, p.content_sha256.clone()))))
            .collect(),
        None => catalog.parts.iter().map(|p| (p.key.clone(), p.stored_bytes, None)).collect(),
    };
    let mut defects = Vec::new();
    let stored: HashMap<String, u64> = match repo.store().list(&layout::backup_dir(id)).await {
        Ok(list) => list.into_iter().map(|o| (o.key, o.size)).collect(),
        Err(e) => return (true, vec![Defect { object: layout::backup_dir(id), reason: e.to_string() }], 0),
    };
    let mut to_read = Vec::new();
    for (key, size, want) in parts {
        match stored.get(&key) {
            None => defects.push(Defect {
                object: key,
                reason: "missing: the manifest lists it, the store does not hold it".into(),
            }),
            Some(&actual) if actual != size => defects.push(Defect {
                object: key,
                reason: format!("stored size is {actual} bytes, the manifest says {size}"),
            }),
            Some(_) => to_read.push((key, want)),
        }
    }
    let files = manifest.as_ref().map(|m| m.files.clone()).unwrap_or_default();
    let expected: Arc<HashMap<String, FileEntry>> =
        Arc::new(files.iter().map(|f| (f.path.clone(), f.clone())).collect());
    let results: Vec<(String, Result<Vec<String>, BackupError>)> = futures::stream::iter(to_read)
        .map(|(key, want)| {
            let (expected, progress) = (expected.clone(), progress.clone());
            async move {
                let r = backup::check_part(repo, &key, want, expected, deep, progress).await;
                (key, r)
            }
        })
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    let read = results.len();
    let mut seen = BTreeSet::new();
    for (key, r) in results {
        match r {
            Ok(files) => seen.extend(files),
            Err(BackupError::Corrupt { key, reason }) => defects.push(Defect { object: key, reason }),
            Err(e) => defects.push(Defect { object: key, reason: e.to_string() }),
        }
    }
    // Deep, and every part read: each file of the manifest was found in its part.
    if deep && defects.is_empty() {
        for f in files.iter().filter(|f| !seen.contains(&f.path)) {
            defects.push(Defect {
                object: f.part.clone(),
                reason: format!("{} is in the manifest but not in the part", f.path),
            });
        }
    }
    (true, defects, read)
}

/// Runs the verification (see the module docs).
pub async fn run(
    repo: &Repository,
    opts: &Options,
    progress: Arc<Progress>,
    now: DateTime<Utc>,
) -> Result<Report, ArchiveError> {
    // The backup asked for first: an unknown reference is named as such, even in an empty repository.
    let chosen: Vec<String> = match &opts.backup {
        Some(reference) => vec![backup::resolve_summary(repo, reference).await?.id.to_string()],
        None => {
            backup::list(repo).await?.iter().filter(|b| b.status == Status::Done).map(|b| b.id.to_string()).collect()
        }
    };
    let c = archive::load(repo).await?;
    let (inv, size) = (&c.inv, c.seg_size);
    let points: BTreeMap<String, &plan::BackupPoint> = c.points.iter().map(|p| (p.id.to_string(), p)).collect();
    // The WAL every chosen backup reads, each object once.
    let mut wal: BTreeMap<String, Option<walnut_pg::Lsn>> = BTreeMap::new();
    let mut per_backup: HashMap<String, usize> = HashMap::new();
    for id in &chosen {
        let Some(b) = points.get(id) else { continue };
        let (segs, histories) = chain(inv, b.tli, size.segno(b.start), size);
        per_backup.insert(id.clone(), segs.len());
        for (t, s) in segs {
            wal.insert(seg_key(t, s, size), Some(size.start_lsn(s)));
        }
        for t in histories {
            wal.insert(layout::wal_key(&WalFileName::History(t)), None);
        }
    }
    // Every chosen backup's objects, and those of the backups an incremental one builds on.
    let mut chains: HashMap<String, Vec<String>> = HashMap::new();
    for id in &chosen {
        if let Ok(c) = backup::load_catalog(repo, id).await {
            chains.insert(id.clone(), c.summary.chain.iter().map(|b| b.to_string()).collect());
        }
    }
    let mut to_check: Vec<String> = chosen.clone();
    for member in chains.values().flatten() {
        if !to_check.contains(member) {
            to_check.push(member.clone());
        }
    }
    let parts_total: u64 = {
        let mut total = 0;
        for id in &to_check {
            if let Ok(c) = backup::load_catalog(repo, id).await {
                total += c.summary.data_bytes;
            }
        }
        total
    };
    let segments = wal.values().filter(|s| s.is_some()).count();
    progress.total.store(parts_total + segments as u64 * size.bytes(), Ordering::Relaxed);
    let parallel = opts.parallel.max(1);
    let deep = opts.deep;
    let bad_wal: BTreeMap<String, String> = futures::stream::iter(wal.clone())
        .map(|(key, start)| {
            let progress = progress.clone();
            async move {
                let r = check_wal(repo, &key, start, deep).await;
                if start.is_some() {
                    progress.done.fetch_add(size.bytes(), Ordering::Relaxed);
                }
                r.map(|reason| (key, reason))
            }
        })
        .buffer_unordered(parallel * 2)
        .filter_map(|x| async move { x })
        .collect()
        .await;
    // The archive as a restore would find it with the defective segments gone.
    let mut usable = inv.clone();
    for key in bad_wal.keys() {
        if let Some(WalFileName::Segment(s)) = layout::parse_wal_key(key) {
            if let (Some(m), Some(segno)) = (usable.segments.get_mut(&s.tli), s.segno(size)) {
                m.remove(&segno);
            }
        } else if let Some(WalFileName::History(t)) = layout::parse_wal_key(key) {
            usable.histories.remove(&t);
        }
    }
    let mut checked: HashMap<String, (bool, Vec<Defect>, usize)> = HashMap::new();
    let mut parts_checked = 0;
    for id in &to_check {
        let r = check_backup(repo, id, deep, parallel, progress.clone()).await;
        parts_checked += r.2;
        checked.insert(id.clone(), r);
    }
    let mut backups = Vec::new();
    for id in &chosen {
        let (manifest_ok, mut defects, parts) = checked.get(id).cloned().unwrap_or_default();
        // An incremental backup restores only with its whole chain.
        let mut chain_ok = true;
        for member in chains.get(id).into_iter().flatten() {
            let (member_ok, member_defects, _) = checked.get(member).cloned().unwrap_or_default();
            chain_ok &= member_ok && member_defects.is_empty();
            if !member_ok && member_defects.is_empty() {
                defects.push(Defect {
                    object: layout::backup_manifest(member),
                    reason: format!("backup {member}, which this incremental backup builds on, cannot be read"),
                });
            }
            defects.extend(member_defects.into_iter().filter(|d| d.object.starts_with(&layout::backup_dir(member))));
        }
        let Some(b) = points.get(id) else { continue };
        let (segs, histories) = chain(inv, b.tli, size.segno(b.start), size);
        for (t, s) in &segs {
            let key = seg_key(*t, *s, size);
            if let Some(reason) = bad_wal.get(&key) {
                defects.push(Defect { object: key, reason: reason.clone() });
            }
        }
        for t in histories {
            let key = layout::wal_key(&WalFileName::History(t));
            if let Some(reason) = bad_wal.get(&key) {
                defects.push(Defect { object: key, reason: reason.clone() });
            }
        }
        let req = Request { target: Target::Latest, backup: Some(id.clone()), timeline: TimelineChoice::Latest };
        let planned = plan::plan(&c.points, &usable, size, &req, now);
        let gap = archive::first_gap(&usable, b, size);
        let backup_ok =
            manifest_ok && chain_ok && !defects.iter().any(|d| d.object.starts_with(&layout::backup_dir(id)));
        let (verdict, restorable) = match planned {
            Ok(p) if backup_ok => {
                let w = Window {
                    earliest_time: p.restorable.earliest_time,
                    earliest_lsn: p.restorable.earliest_lsn.to_string(),
                    latest_time: p.restorable.latest_time,
                    latest_lsn: p.restorable.latest_lsn.to_string(),
                    timeline: p.restorable.timeline.0,
                };
                // A gap that is not a defective object already named: a segment the store lacks.
                let missing = gap.and_then(|name| WalFileName::parse(&name).ok()).map(|n| layout::wal_key(&n));
                if let Some(key) = missing.filter(|k| !defects.iter().any(|d| &d.object == k)) {
                    defects.push(Defect {
                        object: key,
                        reason: "missing: later WAL exists, so every restore from this backup stops before it".into(),
                    });
                }
                let verdict = if defects.is_empty() { "restorable" } else { "restorable (WAL ends early)" };
                (verdict.to_string(), Some(w))
            }
            Ok(_) => ("not restorable".to_string(), None),
            Err(e) => {
                if defects.is_empty() {
                    defects.push(Defect { object: format!("WAL from {}", b.start), reason: e.to_string() });
                }
                ("not restorable".to_string(), None)
            }
        };
        defects.sort();
        defects.dedup();
        backups.push(BackupVerdict {
            id: id.clone(),
            name: b.name.clone(),
            timeline: b.tli.0,
            verdict,
            restorable,
            defects,
            parts,
            segments: per_backup.get(id).copied().unwrap_or(0),
        });
    }
    let problems = archive::consistency_problems(inv, size);
    let ok = problems.is_empty() && backups.iter().all(BackupVerdict::ok);
    Ok(Report {
        ok,
        deep,
        backups,
        problems,
        parts_checked,
        segments_checked: segments,
        bytes_checked: progress.done.load(Ordering::Relaxed),
    })
}
