//! The repository layout: the ONLY place object keys are built. Documented in
//! `docs/repository-format.md`; a change here is a format change.
//!
//! ```text
//! walnut.json                                  identity (format version, cluster)
//! wal/<TLI>/<segment>                          WAL segments, enveloped
//! wal/<TLI>/<segment>.partial                  partial segments
//! wal/<TLI>/<segment>.<offset>.backup          backup history files
//! wal/<TLI>/<TLI>.history                      timeline history files
//! wal-index/<TLI>/<first>-<last>               summaries of archived segments (derived)
//! backups/<ID>/...                             base backups (manifest last)
//! ```
//! WAL and backups live under different prefixes, so listing backups never lists WAL.

use walnut_pg::WalFileName;
use walnut_pg::names::SegName;

pub const IDENTITY: &str = "walnut.json";
pub const WAL_DIR: &str = "wal";
pub const BACKUPS_DIR: &str = "backups";

/// The key of a WAL file (segment, partial, history or backup history).
pub const WAL_INDEX_DIR: &str = "wal-index";

/// An index object covering segments `first..=last` of one timeline.
pub fn wal_index_key(first: &SegName, last: &SegName) -> String {
    format!("{WAL_INDEX_DIR}/{:08X}/{first}-{last}", first.tli.0)
}

/// The range an index key covers.
pub fn parse_wal_index_key(key: &str) -> Option<(SegName, SegName)> {
    let rest = key.strip_prefix(WAL_INDEX_DIR)?.strip_prefix('/')?;
    let (tli, name) = rest.split_once('/')?;
    let (a, b) = name.split_once('-')?;
    let first = WalFileName::parse(a).ok()?.segment()?;
    let last = WalFileName::parse(b).ok()?.segment()?;
    (format!("{:08X}", first.tli.0) == tli && first.tli == last.tli).then_some((first, last))
}

pub fn wal_key(name: &WalFileName) -> String {
    format!("{WAL_DIR}/{:08X}/{name}", name.timeline().0)
}

/// The WAL file a key names, if it is a WAL key.
pub fn parse_wal_key(key: &str) -> Option<WalFileName> {
    let rest = key.strip_prefix(WAL_DIR)?.strip_prefix('/')?;
    let (tli, name) = rest.split_once('/')?;
    let parsed = WalFileName::parse(name).ok()?;
    (format!("{:08X}", parsed.timeline().0) == tli).then_some(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn wal_keys_round_trip() {
        for n in ["000000020000000000000003", "00000002.history", "000000010000000000000003.partial"] {
            let name = WalFileName::parse(n).unwrap();
            let key = wal_key(&name);
            assert!(key.starts_with("wal/0000000"), "{key}");
            assert_eq!(parse_wal_key(&key), Some(name));
        }
        assert_eq!(parse_wal_key("wal/00000001/000000020000000000000003"), None, "timeline dir must match");
        assert_eq!(parse_wal_key("backups/x"), None);
    }
}

/// A backup ID: UTC `YYYYMMDDTHHMMSS`, with `-N` appended only when two start in one second.
pub fn is_backup_id(id: &str) -> bool {
    let (ts, suffix) = id.split_once('-').map_or((id, None), |(a, b)| (a, Some(b)));
    ts.len() == 15
        && ts.as_bytes()[8] == b'T'
        && ts.bytes().enumerate().all(|(i, b)| i == 8 || b.is_ascii_digit())
        && suffix.is_none_or(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
}

/// The repository-wide backup lock: one base backup of a cluster at a time, across processes
/// and hosts (refreshed by the running backup's heartbeat; stale after 3 heartbeats).
pub const BACKUP_LOCK: &str = "locks/backup.json";

/// The maintenance lock: `rekey` and retention's deletions, one at a time (see `lock`).
pub const MAINTENANCE_LOCK: &str = "locks/maintenance.json";

/// A short-lived object `walnut check` writes and deletes (`name` makes it unique to the run).
pub fn probe(name: &str) -> String {
    format!("probe/{name}")
}

pub fn backup_dir(id: &str) -> String {
    format!("{BACKUPS_DIR}/{id}")
}

/// Written last: the backup exists (DONE) once this exists.
pub fn backup_manifest(id: &str) -> String {
    format!("{BACKUPS_DIR}/{id}/manifest.json")
}

/// Written first and refreshed while a backup runs; removed once the manifest is written.
pub fn backup_running(id: &str) -> String {
    format!("{BACKUPS_DIR}/{id}/running.json")
}

/// A data part of a backup: stream `stream`, part `n`.
pub fn backup_part(id: &str, stream: usize, n: usize) -> String {
    format!("{}/s{stream:02}-p{n:04}.tar", backup_data_dir(id))
}

/// The key a backup part gets when `rekey` re-encrypts it (a new key, so that the manifest
/// switches to it in one write): `...-p0001.tar` -> `...-p0001.k1.tar` -> `...-p0001.k2.tar`.
pub fn rekeyed_part(key: &str) -> String {
    let stem = key.strip_suffix(".tar").unwrap_or(key);
    match stem.rsplit_once(".k").and_then(|(base, n)| n.parse::<u32>().ok().map(|n| (base, n))) {
        Some((base, n)) => format!("{base}.k{}.tar", n + 1),
        None => format!("{stem}.k1.tar"),
    }
}

/// The directory of a backup's data parts.
pub fn backup_data_dir(id: &str) -> String {
    format!("{BACKUPS_DIR}/{id}/data")
}

/// The backup ID a key belongs to, if it is below `backups/`.
pub fn backup_id_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(BACKUPS_DIR)?.strip_prefix('/')?;
    let id = rest.split('/').next()?;
    is_backup_id(id).then_some(id)
}

#[cfg(test)]
mod backup_tests {
    use super::*;
    #[test]
    fn backup_ids() {
        assert!(is_backup_id("20260102T030405"));
        assert!(is_backup_id("20260102T030405-2"));
        for bad in ["2026010T030405", "20260102X030405", "20260102T030405-", "20260102T030405-x", "latest"] {
            assert!(!is_backup_id(bad), "{bad}");
        }
        assert_eq!(backup_id_of(&backup_part("20260102T030405", 1, 2)), Some("20260102T030405"));
        assert_eq!(backup_id_of("wal/00000001/x"), None);
        let part = backup_part("20260102T030405", 1, 2);
        assert_eq!(rekeyed_part(&part), "backups/20260102T030405/data/s01-p0002.k1.tar");
        assert_eq!(rekeyed_part(&rekeyed_part(&part)), "backups/20260102T030405/data/s01-p0002.k2.tar");
        assert!(rekeyed_part(&part).starts_with(&backup_data_dir("20260102T030405")));
    }
}

/// Logical captures (`pg_dump`), beside base backups: `logical/<ID>/...` (manifest last).
pub const LOGICAL_DIR: &str = "logical";

pub fn logical_dir(id: &str) -> String {
    format!("{LOGICAL_DIR}/{id}")
}

/// Written first and refreshed while a capture runs; rewritten with the error when it fails;
/// removed once the manifest is written.
pub fn logical_running(id: &str) -> String {
    format!("{LOGICAL_DIR}/{id}/running.json")
}

/// Written last, create-only: the capture is DONE once this exists.
pub fn logical_manifest(id: &str) -> String {
    format!("{LOGICAL_DIR}/{id}/manifest.json")
}

/// The `n`-th database dump of a capture (1-based; its database's name is in the manifest): a
/// streamed envelope around a `pg_dump` custom-format archive.
pub fn logical_dump(id: &str, n: usize) -> String {
    format!("{LOGICAL_DIR}/{id}/data/{n:04}.dump")
}

/// The globals of an `--all` capture (`pg_dumpall --globals-only`, SQL), enveloped.
pub fn logical_globals(id: &str) -> String {
    format!("{LOGICAL_DIR}/{id}/data/globals.sql")
}

/// The capture ID a key belongs to, if it is below `logical/`.
pub fn logical_id_of(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(LOGICAL_DIR)?.strip_prefix('/')?;
    let id = rest.split('/').next()?;
    is_backup_id(id).then_some(id)
}

#[cfg(test)]
mod logical_tests {
    use super::*;
    #[test]
    fn logical_keys() {
        let id = "20260102T030405";
        for key in [logical_running(id), logical_manifest(id), logical_dump(id, 3), logical_globals(id)] {
            assert_eq!(logical_id_of(&key), Some(id), "{key}");
            assert!(key.starts_with(&logical_dir(id)), "{key}");
            assert_eq!(backup_id_of(&key), None, "not a backup key: {key}");
        }
        assert_eq!(logical_dump(id, 3), "logical/20260102T030405/data/0003.dump");
        assert_eq!(logical_id_of("backups/20260102T030405/manifest.json"), None);
    }
}
