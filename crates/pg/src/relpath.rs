//! Relation files: PostgreSQL's `RelFileNode` and `ForkNumber`, and the paths of relation files
//! below a data directory (`common/relpath.h`), both ways.
//!
//! - `global/<relfilenode>[_<fork>][.<segno>]`: shared catalogs (tablespace `pg_global`, 1664,
//!   database 0);
//! - `base/<db>/<relfilenode>...`: the default tablespace (`pg_default`, 1663);
//! - `pg_tblspc/<spc>/PG_15_<catversion>/<db>/<relfilenode>...`: other tablespaces.
//!
//! Temporary relations (`t<backend>_<relfilenode>`) are not WAL-logged and never parsed here.

use serde::{Deserialize, Serialize};

/// `pg_default`'s OID.
pub const DEFAULTTABLESPACE_OID: u32 = 1663;
/// `pg_global`'s OID.
pub const GLOBALTABLESPACE_OID: u32 = 1664;
/// PostgreSQL 15's `TABLESPACE_VERSION_DIRECTORY` (`PG_` major `_` catalog version).
pub const TABLESPACE_VERSION_DIRECTORY_15: &str = "PG_15_202209061";
/// Blocks per relation segment file (`RELSEG_SIZE` with 8 kB blocks: 1 GiB files).
pub const RELSEG_SIZE: u32 = 131_072;

/// PostgreSQL's `RelFileNode`: the tablespace, database and relfilenode that name a relation's
/// files. Shared relations have `db_node` 0 (and `spc_node` [`GLOBALTABLESPACE_OID`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RelFileNode {
    pub spc_node: u32,
    pub db_node: u32,
    pub rel_node: u32,
}

impl std::fmt::Display for RelFileNode {
    /// `spc/db/rel`, as `pg_waldump` prints block references.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}/{}", self.spc_node, self.db_node, self.rel_node)
    }
}

/// PostgreSQL's `ForkNumber`. Valid forks are 0..=3 ([`ForkNumber::MAX`]); the 4 bits a WAL
/// block reference has for it can hold more, which no PostgreSQL 15 writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ForkNumber(pub u8);

impl ForkNumber {
    pub const MAIN: ForkNumber = ForkNumber(0);
    /// The free space map (`_fsm`).
    pub const FSM: ForkNumber = ForkNumber(1);
    /// The visibility map (`_vm`).
    pub const VISIBILITYMAP: ForkNumber = ForkNumber(2);
    /// The init fork of an unlogged relation (`_init`).
    pub const INIT: ForkNumber = ForkNumber(3);
    pub const MAX: ForkNumber = ForkNumber::INIT;

    pub fn is_valid(self) -> bool {
        self <= ForkNumber::MAX
    }

    /// PostgreSQL's `forkNames`: main, fsm, vm, init.
    pub fn name(self) -> Option<&'static str> {
        ["main", "fsm", "vm", "init"].get(self.0 as usize).copied()
    }
}

impl std::fmt::Display for ForkNumber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name() {
            Some(n) => f.write_str(n),
            None => write!(f, "fork{}", self.0),
        }
    }
}

/// The path of a relation fork's first file relative to the data directory, as PostgreSQL 15's
/// `relpathperm` (and so `pg_waldump`) writes it: `base/5/16384`, `global/1262_vm`,
/// `pg_tblspc/16385/PG_15_202209061/5/16386_init`.
pub fn relpath(rnode: RelFileNode, fork: ForkNumber) -> String {
    let suffix = match fork {
        ForkNumber::MAIN => String::new(),
        f => format!("_{f}"),
    };
    if rnode.spc_node == GLOBALTABLESPACE_OID {
        format!("global/{}{suffix}", rnode.rel_node)
    } else if rnode.spc_node == DEFAULTTABLESPACE_OID {
        format!("base/{}/{}{suffix}", rnode.db_node, rnode.rel_node)
    } else {
        format!(
            "pg_tblspc/{}/{TABLESPACE_VERSION_DIRECTORY_15}/{}/{}{suffix}",
            rnode.spc_node, rnode.db_node, rnode.rel_node
        )
    }
}

/// A relation segment file, parsed from its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelFilePath {
    pub rnode: RelFileNode,
    pub fork: ForkNumber,
    /// The segment number (`.1`, `.2`, ...; 0 for the first file): the file holds blocks
    /// `segno * RELSEG_SIZE ..`.
    pub segno: u32,
}

fn oid(s: &str) -> Option<u32> {
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|c| c.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0')) {
        return None;
    }
    s.parse().ok().filter(|&n| n != 0)
}

/// Parses a data directory path (relative, `/`-separated) of a permanent or unlogged relation's
/// file; `None` for anything else (temporary relations, `pg_filenode.map`, `PG_VERSION`, other
/// directories). Tablespace paths accept any `PG_15_<digits>` version directory.
pub fn parse_relpath(path: &str) -> Option<RelFilePath> {
    let parts: Vec<&str> = path.split('/').collect();
    let (spc, db, file) = match parts.as_slice() {
        ["global", file] => (GLOBALTABLESPACE_OID, 0, *file),
        ["base", db, file] => (DEFAULTTABLESPACE_OID, oid(db)?, *file),
        ["pg_tblspc", spc, ver, db, file] => {
            let digits = ver.strip_prefix("PG_15_")?;
            if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            (oid(spc)?, oid(db)?, *file)
        }
        _ => return None,
    };
    let (stem, segno) = match file.split_once('.') {
        Some((stem, seg)) => (stem, oid(seg)?),
        None => (file, 0),
    };
    let (rel, fork) = match stem.split_once('_') {
        Some((rel, "fsm")) => (rel, ForkNumber::FSM),
        Some((rel, "vm")) => (rel, ForkNumber::VISIBILITYMAP),
        Some((rel, "init")) => (rel, ForkNumber::INIT),
        Some(_) => return None,
        None => (stem, ForkNumber::MAIN),
    };
    Some(RelFilePath { rnode: RelFileNode { spc_node: spc, db_node: db, rel_node: oid(rel)? }, fork, segno })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn paths_like_postgresql() {
        let r = RelFileNode { spc_node: 1663, db_node: 5, rel_node: 16384 };
        assert_eq!(relpath(r, ForkNumber::MAIN), "base/5/16384");
        assert_eq!(relpath(r, ForkNumber::INIT), "base/5/16384_init");
        let g = RelFileNode { spc_node: 1664, db_node: 0, rel_node: 1262 };
        assert_eq!(relpath(g, ForkNumber::VISIBILITYMAP), "global/1262_vm");
        let t = RelFileNode { spc_node: 16385, db_node: 5, rel_node: 16386 };
        assert_eq!(relpath(t, ForkNumber::FSM), "pg_tblspc/16385/PG_15_202209061/5/16386_fsm");
        assert_eq!(
            parse_relpath("base/5/16384_vm.3"),
            Some(RelFilePath { rnode: r, fork: ForkNumber::VISIBILITYMAP, segno: 3 })
        );
        for bad in [
            "base/5/t3_16384",
            "base/5/pg_filenode.map",
            "base/5/PG_VERSION",
            "base/5/16384_foo",
            "base/5/16384.0",
            "base/05/16384",
            "base/5/16384.",
            "pg_tblspc/16385/PG_16_202307071/5/16386",
            "global/pg_control",
            "base/5",
            "",
        ] {
            assert_eq!(parse_relpath(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn relpath_round_trips(spc in 1u32.., db in 1u32.., rel in 1u32.., fork in 0u8..4) {
            let spc = match spc % 3 {
                0 => GLOBALTABLESPACE_OID,
                1 => DEFAULTTABLESPACE_OID,
                _ if spc == GLOBALTABLESPACE_OID || spc == DEFAULTTABLESPACE_OID => 16385,
                _ => spc,
            };
            let db = if spc == GLOBALTABLESPACE_OID { 0 } else { db };
            let rnode = RelFileNode { spc_node: spc, db_node: db, rel_node: rel };
            let p = relpath(rnode, ForkNumber(fork));
            prop_assert_eq!(parse_relpath(&p), Some(RelFilePath { rnode, fork: ForkNumber(fork), segno: 0 }));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,60}") {
            let _ = parse_relpath(&s);
        }
    }
}
