//! The backup manifest (what a DONE backup holds), its summary for listings, and PostgreSQL's
//! own `backup_manifest` written beside a fetched backup.

use super::*;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    /// Relative to the data directory (`pg_tblspc/<oid>/...` for tablespaces).
    pub path: String,
    pub size: u64,
    /// SHA-256 of the content, hex.
    pub sha256: String,
    /// Modification time, Unix seconds.
    pub mtime: i64,
    /// The part object's key.
    pub part: String,
    /// Set in an incremental backup for a relation file stored as some of its blocks: then `size`
    /// is the file's size and `sha256` the checksum of what the part holds for it (the stored
    /// blocks, in order, 8192 bytes each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<FileBlocks>,
}

impl FileEntry {
    /// The bytes the part's tar holds for this file.
    pub fn stored_len(&self) -> u64 {
        match &self.blocks {
            Some(b) => b.stored.count() * BLCKSZ,
            None => self.size,
        }
    }
}

/// PostgreSQL's block size (walnut supports the default 8 kB).
pub const BLCKSZ: u64 = 8192;

/// A relation file of an incremental backup stored as some of its blocks. Rebuilt by writing
/// these blocks over the file as the parent backup (itself rebuilt) restores it, then setting its
/// length to `size`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileBlocks {
    /// Every block from here to the file's end is stored (the parent's copy is shorter, or the
    /// relation was truncated below it since the parent began); below it, only changed blocks.
    pub limit: u32,
    /// The blocks stored, ascending (numbers within this file).
    pub stored: BlockRanges,
}

/// A set of block numbers as ascending, disjoint ranges; written `"0-9,12,40-41"`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockRanges(pub Vec<(u32, u32)>);

impl BlockRanges {
    /// From ascending block numbers (duplicates ignored).
    pub fn from_sorted(blocks: impl IntoIterator<Item = u32>) -> BlockRanges {
        let mut out: Vec<(u32, u32)> = Vec::new();
        for b in blocks {
            match out.last_mut() {
                Some((_, hi)) if b <= *hi => {}
                Some((_, hi)) if b == *hi + 1 => *hi = b,
                _ => out.push((b, b)),
            }
        }
        BlockRanges(out)
    }

    pub fn count(&self) -> u64 {
        self.0.iter().map(|(a, b)| (b - a) as u64 + 1).sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.0.iter().flat_map(|&(a, b)| a..=b)
    }
}

impl std::fmt::Display for BlockRanges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (a, b)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if a == b { write!(f, "{a}")? } else { write!(f, "{a}-{b}")? }
        }
        Ok(())
    }
}

impl std::str::FromStr for BlockRanges {
    type Err = String;
    fn from_str(s: &str) -> Result<BlockRanges, String> {
        let mut out: Vec<(u32, u32)> = Vec::new();
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (a, b) = item.split_once('-').unwrap_or((item, item));
            let (a, b): (u32, u32) = (
                a.parse().map_err(|_| format!("bad block {a:?}"))?,
                b.parse().map_err(|_| format!("bad block {b:?}"))?,
            );
            if a > b || out.last().is_some_and(|&(_, hi)| a <= hi.saturating_add(1)) {
                return Err(format!("block ranges must ascend and not touch: {s:?}"));
            }
            out.push((a, b));
        }
        Ok(BlockRanges(out))
    }
}

impl Serialize for BlockRanges {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BlockRanges {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<BlockRanges, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartEntry {
    pub key: String,
    pub stored_bytes: u64,
    pub content_bytes: u64,
    pub content_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tablespace {
    pub oid: String,
    pub location: String,
    /// `pg_tablespace.spcname` (absent in manifests written before walnut recorded it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl Tablespace {
    /// The name when known, else the OID.
    pub fn display_name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.oid)
    }
}

/// A backup's manifest: everything needed to restore it, written last.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub id: crate::backup::BackupId,
    pub name: Option<String>,
    /// Taken by the agent's schedule (true) or on demand (false).
    pub scheduled: bool,
    #[serde(with = "crate::repo::sysid_text")]
    pub system_identifier: SystemId,
    pub pg_version_num: u32,
    pub pg_major: PgMajor,
    pub wal_segment_size: u64,
    pub timeline: TimelineId,
    pub start_lsn: Lsn,
    /// The consistency point: recovery must replay at least to here.
    pub end_lsn: Lsn,
    pub start_wal: String,
    pub end_wal: String,
    #[serde(with = "crate::timefmt")]
    pub start_time: chrono::DateTime<chrono::Utc>,
    #[serde(with = "crate::timefmt")]
    pub end_time: chrono::DateTime<chrono::Utc>,
    pub label: String,
    pub backup_label: String,
    pub tablespace_map: String,
    pub data_bytes: u64,
    pub stored_bytes: u64,
    pub compression: String,
    pub tablespaces: Vec<Tablespace>,
    pub parts: Vec<PartEntry>,
    pub files: Vec<FileEntry>,
    /// An incremental backup's parent: the backup (full or incremental) it was taken against.
    #[serde(default)]
    pub parent: Option<BackupId>,
    /// An incremental backup's chain, oldest (the full backup) first, its parent last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<BackupId>,
    /// An incremental backup: the files stored whole although they are relation files that
    /// existed in the parent, grouped by why (e.g. "created since the parent").
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub whole: BTreeMap<String, Vec<String>>,
    /// An incremental backup: how the changed-block map was made when it was not all stored
    /// with the archived WAL (e.g. segments decoded from the archive).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub map_notes: Vec<String>,
}

impl Manifest {
    pub fn is_incremental(&self) -> bool {
        self.parent.is_some()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    Done,
    Running,
    Failed,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Status::Done => "DONE",
            Status::Running => "RUNNING",
            Status::Failed => "FAILED",
        })
    }
}

/// One line of a listing.
#[derive(Debug, Clone, Serialize)]
pub struct BackupInfo {
    pub id: crate::backup::BackupId,
    pub status: Status,
    #[serde(flatten)]
    pub manifest: Option<ManifestSummary>,
    /// An incremental backup: what its whole chain stores (its own `stored_bytes` included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chain_stored_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A manifest without its file list.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestSummary {
    pub name: Option<String>,
    pub scheduled: bool,
    pub timeline: TimelineId,
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
    pub start_wal: String,
    pub end_wal: String,
    #[serde(with = "crate::timefmt")]
    pub start_time: chrono::DateTime<chrono::Utc>,
    #[serde(with = "crate::timefmt")]
    pub end_time: chrono::DateTime<chrono::Utc>,
    pub data_bytes: u64,
    pub stored_bytes: u64,
    pub files: usize,
    pub pg_version_num: u32,
    /// `full` or `incremental`.
    #[serde(rename = "type", default = "full")]
    pub kind: String,
    /// An incremental backup's parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<BackupId>,
    /// An incremental backup's chain, oldest first, its parent last (empty for a full backup).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<BackupId>,
}

fn full() -> String {
    "full".into()
}

impl From<&Manifest> for ManifestSummary {
    fn from(m: &Manifest) -> Self {
        ManifestSummary {
            name: m.name.clone(),
            scheduled: m.scheduled,
            timeline: m.timeline,
            start_lsn: m.start_lsn,
            end_lsn: m.end_lsn,
            start_wal: m.start_wal.clone(),
            end_wal: m.end_wal.clone(),
            start_time: m.start_time,
            end_time: m.end_time,
            data_bytes: m.data_bytes,
            stored_bytes: m.stored_bytes,
            files: m.files.len(),
            pg_version_num: m.pg_version_num,
            kind: if m.is_incremental() { "incremental" } else { "full" }.into(),
            parent: m.parent.clone(),
            chain: m.chain.clone(),
        }
    }
}

pub(super) fn json_object(v: &impl Serialize) -> Bytes {
    crate::lock::json_record(v)
}

/// What listing, planning, retention and verification read of a manifest without decoding it
/// (they need no key when the manifest is encrypted): kept in clear in its envelope metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Catalog {
    #[serde(flatten)]
    pub summary: ManifestSummary,
    pub parts: Vec<CatalogPart>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CatalogPart {
    pub key: String,
    pub stored_bytes: u64,
}

impl From<&Manifest> for Catalog {
    fn from(m: &Manifest) -> Self {
        Catalog {
            summary: m.into(),
            parts: m.parts.iter().map(|p| CatalogPart { key: p.key.clone(), stored_bytes: p.stored_bytes }).collect(),
        }
    }
}

/// The manifest object: its JSON, encrypted when `codec` says so, with its [`Catalog`] in clear
/// in the metadata.
pub(crate) fn manifest_object(m: &Manifest, codec: &Codec) -> Bytes {
    let body = serde_json::to_vec_pretty(m).expect("serialisable");
    let meta = serde_json::json!({ "catalog": Catalog::from(m) });
    envelope::encode(&body, &meta, Codec { compression: crate::Compression::None, level: 0, seal: codec.seal.clone() })
}

/// The manifest of an incremental backup as restored into `dest`: every file whole, with the
/// SHA-256 of its rebuilt content (read back from `dest`), for PostgreSQL's `backup_manifest`.
pub fn rebuilt(m: &Manifest, dest: &Path) -> std::io::Result<Manifest> {
    let mut out = m.clone();
    for f in out.files.iter_mut().filter(|f| f.blocks.is_some()) {
        let path = dest.join(&f.path);
        let mut file = std::fs::File::open(&path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let mut h = HashingWriter::new(std::io::sink());
        std::io::copy(&mut file, &mut h)?;
        let (_, size, sum) = h.finish();
        (f.size, f.sha256, f.blocks) = (size, hex::encode(sum), None);
    }
    Ok(out)
}

/// PostgreSQL's own `backup_manifest` (version 1) for a fetched backup, so `pg_verifybackup`
/// can check it independently.
pub fn postgres_manifest(m: &Manifest) -> String {
    use sha2::Digest;
    let mut out = String::from("{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n");
    let label_sum = hex::encode(envelope::sha256(m.backup_label.as_bytes()));
    let mut entries: Vec<(String, u64, i64, String)> =
        m.files.iter().map(|f| (f.path.clone(), f.size, f.mtime, f.sha256.clone())).collect();
    entries.push(("backup_label".into(), m.backup_label.len() as u64, chrono::Utc::now().timestamp(), label_sum));
    let n = entries.len();
    for (i, (path, size, mtime, sum)) in entries.into_iter().enumerate() {
        let when = chrono::DateTime::from_timestamp(mtime, 0).unwrap_or_default().format("%Y-%m-%d %H:%M:%S GMT");
        out += &format!(
            "{{ \"Path\": {}, \"Size\": {size}, \"Last-Modified\": \"{when}\", \"Checksum-Algorithm\": \"SHA256\", \"Checksum\": \"{sum}\" }}{}\n",
            serde_json::to_string(&path).expect("string"),
            if i + 1 < n { "," } else { "" }
        );
    }
    out += &format!(
        "],\n\"WAL-Ranges\": [\n{{ \"Timeline\": {}, \"Start-LSN\": \"{}\", \"End-LSN\": \"{}\" }}\n],\n",
        m.timeline, m.start_lsn, m.end_lsn
    );
    let sum = hex::encode(sha2::Sha256::digest(out.as_bytes()));
    out += &format!("\"Manifest-Checksum\": \"{sum}\"}}\n");
    out
}
