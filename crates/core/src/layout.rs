//! The repository layout: the ONLY place object keys are built. Documented in
//! `docs/repository-format.md`; a change here is a format change.
//!
//! ```text
//! walnut.json                                  identity (format version, cluster)
//! wal/<TLI>/<segment>                          WAL segments, enveloped
//! wal/<TLI>/<segment>.partial                  partial segments
//! wal/<TLI>/<segment>.<offset>.backup          backup history files
//! wal/<TLI>/<TLI>.history                      timeline history files
//! backups/<ID>/...                             base backups (manifest last)
//! ```
//! WAL and backups live under different prefixes, so listing backups never lists WAL.

use walnut_pg::WalFileName;

pub const IDENTITY: &str = "walnut.json";
pub const WAL_DIR: &str = "wal";
pub const BACKUPS_DIR: &str = "backups";

/// The key of a WAL file (segment, partial, history or backup history).
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
