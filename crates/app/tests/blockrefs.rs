//! walnut's block references, relation changes and changed-block maps against PostgreSQL's own
//! `pg_waldump --bkp-details`, on WAL a real PostgreSQL 15 (data checksums on, 1 MiB segments)
//! wrote under a workload of everything that changes relation files: DML, VACUUM (with a
//! truncation), VACUUM FULL, CLUSTER, TRUNCATE (also of a table created in the same
//! transaction), CREATE INDEX (also CONCURRENTLY), DROP TABLE, aborted and two-phase
//! transactions that create or drop relations, CREATE DATABASE with both strategies, DROP
//! DATABASE, a tablespace (ALTER TABLE / ALTER DATABASE SET TABLESPACE, DROP TABLESPACE), an
//! unlogged table, sequences (one unlogged), hint-bit full-page images and compressed ones.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;
use walnut_core::blockmap::{BlockMap, FileDecision, WholeReason};
use walnut_core::summary::{self, TailMap};
use walnut_pg::relpath::{ForkNumber, RelFileNode, parse_relpath, relpath};
use walnut_pg::walrec::{self, BKPBLOCK_SAME_REL, RelChange};
use walnut_pg::{Lsn, WalFileName, WalSegSize};
use walnut_testkit::PgCluster;
use walnut_testkit::pg::PgOptions;

const SEG: u64 = 1 << 20;

fn waldump(pg: &PgCluster, start: Lsn, end: Lsn) -> String {
    common::pg_waldump(pg, start, end, &["--bkp-details"])
}

/// One record as `pg_waldump` prints it.
#[derive(Debug, Default)]
struct Dumped {
    rmgr: String,
    desc: String,
    blkrefs: Vec<String>,
}

fn parse_dump(dump: &str) -> BTreeMap<Lsn, Dumped> {
    let mut out: BTreeMap<Lsn, Dumped> = BTreeMap::new();
    let mut cur: Option<Lsn> = None;
    for line in dump.lines() {
        if line.starts_with("rmgr:") {
            let lsn: Lsn = line.split("lsn: ").nth(1).unwrap().split(',').next().unwrap().trim().parse().unwrap();
            let rmgr = line.split_whitespace().nth(1).unwrap().to_string();
            let desc = line.split_once("desc: ").map(|(_, d)| d.trim().to_string()).unwrap_or_default();
            out.insert(lsn, Dumped { rmgr, desc, blkrefs: vec![] });
            cur = Some(lsn);
        } else if let Some(b) = line.trim_start().strip_prefix("blkref ") {
            out.get_mut(&cur.expect("a record first")).unwrap().blkrefs.push(format!("blkref {}", b.trim_end()));
        }
    }
    out
}

/// The relation changes `pg_waldump` describes, in a form both sides can be put in.
fn their_changes(d: &Dumped) -> Vec<String> {
    let desc = d.desc.as_str();
    match d.rmgr.as_str() {
        "Storage" => vec![format!("Storage {desc}")],
        "Database" | "Tablespace" => vec![format!("{} {desc}", d.rmgr)],
        "RelMap" => vec![format!("RelMap {}", desc.split(" size ").next().unwrap())],
        "Transaction" => match desc.split_once("; rels: ") {
            Some((_, rest)) => {
                rest.split(';').next().unwrap().split_whitespace().map(|p| format!("Transaction DROP {p}")).collect()
            }
            None => vec![],
        },
        _ => vec![],
    }
}

fn our_change(c: &RelChange) -> String {
    match c {
        RelChange::Create { rnode, fork } => format!("Storage CREATE {}", relpath(*rnode, *fork)),
        RelChange::Truncate { rnode, blocks, flags } => {
            format!("Storage TRUNCATE {} to {blocks} blocks flags {flags}", relpath(*rnode, ForkNumber::MAIN))
        }
        RelChange::Drop { rnode, .. } => format!("Transaction DROP {}", relpath(*rnode, ForkNumber::MAIN)),
        RelChange::DatabaseCreateFileCopy { db_id, tablespace_id, src_db_id, src_tablespace_id } => {
            format!("Database CREATE_FILE_COPY copy dir {src_tablespace_id}/{src_db_id} to {tablespace_id}/{db_id}")
        }
        RelChange::DatabaseCreateWalLog { db_id, tablespace_id } => {
            format!("Database CREATE_WAL_LOG create dir {tablespace_id}/{db_id}")
        }
        RelChange::DatabaseDrop { db_id, tablespace_ids } => {
            let dirs: String = tablespace_ids.iter().map(|s| format!(" {s}/{db_id}")).collect();
            format!("Database DROP dir{dirs}")
        }
        RelChange::TablespaceCreate { ts_id, path } => format!("Tablespace CREATE {ts_id} \"{path}\""),
        RelChange::TablespaceDrop { ts_id } => format!("Tablespace DROP {ts_id}"),
        RelChange::RelmapUpdate { db_id, tablespace_id } => {
            format!("RelMap UPDATE database {db_id} tablespace {tablespace_id}")
        }
        RelChange::Unknown { reason } => panic!("unknown change in PostgreSQL 15's own WAL: {reason}"),
    }
}

/// A block reference as `pg_waldump --bkp-details` prints it (PostgreSQL 15).
fn our_blkref(b: &walrec::BlockRef) -> String {
    let mut s = format!("blkref #{}: rel {} fork {} blk {}", b.id, b.rnode, b.fork, b.block);
    if let Some(i) = b.image {
        let verify = if i.apply() { "" } else { " for WAL verification" };
        s += &format!(" (FPW{verify}); hole: offset: {}, length: {}", i.hole_offset, i.hole_length);
        if let Some(method) = i.compression() {
            let saved = 8192 - u32::from(i.hole_length) - u32::from(i.length);
            s += &format!(", compression saved: {saved}, method: {method}");
        }
    }
    s
}

fn rnode_of(pg: &PgCluster, rel: &str) -> RelFileNode {
    let path = pg.sql(&format!("SELECT pg_relation_filepath('{rel}')")).trim().to_string();
    parse_relpath(&path).unwrap_or_else(|| panic!("{rel}: {path}")).rnode
}

fn lsn(pg: &PgCluster, sql: &str) -> Lsn {
    pg.sql(sql).trim().parse().unwrap()
}

fn whole(d: &FileDecision) -> &[WholeReason] {
    match d {
        FileDecision::Whole(w) => w,
        FileDecision::Blocks(b) => panic!("blocks, not whole: {b:?}"),
    }
}

#[test]
fn block_references_and_maps_agree_with_pg_waldump() {
    let t0 = Instant::now();
    let pg = PgCluster::start(PgOptions {
        wal_segsize_mb: 1,
        data_checksums: true,
        extra_conf: "max_prepared_transactions = 5\nwal_keep_size = 512MB\n".into(),
        ..Default::default()
    });
    assert_eq!(pg.sql("SHOW data_checksums").trim(), "on");
    let ts_dir = pg.dir.path().join("ts1");
    std::fs::create_dir(&ts_dir).unwrap();
    walnut_testkit::pg::give_to_postgres_user(&ts_dir);

    // Before the range: relations the range then changes.
    pg.sql("CREATE TABLE steady(id int primary key, v text) WITH (fillfactor = 50)");
    pg.sql("INSERT INTO steady SELECT g, md5(g::text) FROM generate_series(1, 3000) g");
    pg.sql("CREATE TABLE t(id int primary key, v text)");
    pg.sql("INSERT INTO t SELECT g, md5(g::text) FROM generate_series(1, 5000) g");
    pg.sql("CREATE TABLE gone(id int)");
    pg.sql("INSERT INTO gone SELECT generate_series(1, 1000)");
    pg.sql("CREATE TABLE shrink(id int, v text)");
    pg.sql("INSERT INTO shrink SELECT g, repeat('s', 200) FROM generate_series(1, 3000) g");
    pg.sql("CREATE TABLE tr(id int)");
    pg.sql("INSERT INTO tr SELECT generate_series(1, 500)");
    pg.sql("CREATE TABLE comp(id int, v text)");
    pg.sql("INSERT INTO comp SELECT g, repeat('c', 100) FROM generate_series(1, 2000) g");
    pg.sql("VACUUM (FREEZE) steady");
    pg.sql("CHECKPOINT");
    let gone = rnode_of(&pg, "gone");
    let switched = lsn(&pg, "SELECT pg_switch_wal()");
    let from = Lsn((switched.0 - 1) / SEG * SEG + SEG);

    // The range.
    pg.sql("UPDATE steady SET v = v || '!' WHERE id IN (1, 1500, 2900)");
    pg.sql("UPDATE t SET v = v || 'x' WHERE id % 3 = 0");
    pg.sql("DELETE FROM t WHERE id % 7 = 0");
    pg.sql("SELECT count(*) FROM t");
    pg.sql("VACUUM t");
    pg.sql("DELETE FROM shrink WHERE id > 1000");
    pg.sql("VACUUM shrink");
    pg.sql("VACUUM FULL t");
    pg.sql("CLUSTER t USING t_pkey");
    pg.sql("TRUNCATE tr");
    pg.sql("BEGIN; CREATE TABLE tt(id int); INSERT INTO tt SELECT generate_series(1, 3000); TRUNCATE tt; COMMIT");
    pg.sql("CREATE INDEX t_v ON t(v)");
    pg.sql("CREATE INDEX CONCURRENTLY t_v2 ON t(v, id)");
    pg.sql("DROP TABLE gone");
    pg.sql("BEGIN; CREATE TABLE aborted(id int); INSERT INTO aborted VALUES (1); ROLLBACK");
    pg.sql("BEGIN; CREATE TABLE p1(x int); PREPARE TRANSACTION 'p1'");
    pg.sql("ROLLBACK PREPARED 'p1'");
    pg.sql("BEGIN; DROP TABLE tr; PREPARE TRANSACTION 'p2'");
    pg.sql("COMMIT PREPARED 'p2'");
    pg.sql("CREATE DATABASE dfc STRATEGY FILE_COPY");
    let dfc: u32 = pg.sql("SELECT oid FROM pg_database WHERE datname = 'dfc'").trim().parse().unwrap();
    pg.sql("CREATE DATABASE dwl STRATEGY WAL_LOG");
    let dwl: u32 = pg.sql("SELECT oid FROM pg_database WHERE datname = 'dwl'").trim().parse().unwrap();
    pg.sql("DROP DATABASE dfc");
    pg.sql(&format!("CREATE TABLESPACE ts1 LOCATION '{}'", ts_dir.display()));
    let ts1: u32 = pg.sql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts1'").trim().parse().unwrap();
    pg.sql("ALTER TABLE t SET TABLESPACE ts1");
    pg.sql("ALTER DATABASE dwl SET TABLESPACE ts1");
    pg.sql("CREATE UNLOGGED TABLE u(id int primary key, v text)");
    pg.sql("INSERT INTO u SELECT g, 'u' FROM generate_series(1, 1000) g");
    let u = rnode_of(&pg, "u");
    pg.sql("CREATE SEQUENCE s");
    pg.sql("SELECT nextval('s') FROM generate_series(1, 100)");
    pg.sql("CREATE UNLOGGED SEQUENCE us");
    pg.sql("SELECT nextval('us')");
    pg.sql("CHECKPOINT");
    pg.sql("SET wal_compression = pglz; UPDATE comp SET v = v || 'z' WHERE id % 50 = 0");
    pg.sql("ALTER TABLE t SET TABLESPACE pg_default");
    pg.sql("DROP DATABASE dwl");
    pg.sql("DROP TABLESPACE ts1");
    let to = lsn(&pg, "SELECT pg_current_wal_insert_lsn()");
    pg.sql("SELECT pg_switch_wal()");
    pg.sql("INSERT INTO steady VALUES (100000, 'tail')");
    let steady = rnode_of(&pg, "steady");
    let shrink = rnode_of(&pg, "shrink");
    let shrink_blocks: u32 = pg.sql("SELECT pg_relation_size('shrink') / 8192").trim().parse().unwrap();
    let t_now = rnode_of(&pg, "t");
    let workload = t0.elapsed();

    let seg_size = WalSegSize::new(SEG).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(pg.pgdata.join("pg_wal"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24)
        .collect();
    let current = pg.sql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())").trim().to_string();
    names.retain(|n| *n <= current);
    names.sort();
    assert!(names.len() >= 10, "{names:?}");

    let (mut records, mut with_blocks, mut images, mut compressed, mut holes, mut same_rel, mut will_init) =
        (0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
    let mut forks_seen = BTreeSet::new();
    let mut kinds_seen = BTreeSet::new();
    let mut maps = vec![];
    let mut their_blocks: BTreeSet<(RelFileNode, ForkNumber, u32)> = BTreeSet::new();
    let mut map_bytes = 0usize;
    let mut hint_fpis = 0u64;
    let (mut tail_retries, mut page_retries, mut no_tail, mut tail_time) =
        (0u64, 0u64, vec![], std::time::Duration::ZERO);
    for w in names.windows(2) {
        let seg = WalFileName::parse(&w[0]).unwrap().segment().unwrap();
        let start = seg_size.start_lsn(seg.segno(seg_size).unwrap());
        let data = std::fs::read(pg.pgdata.join("pg_wal").join(&w[0])).unwrap();
        let next = std::fs::read(pg.pgdata.join("pg_wal").join(&w[1])).unwrap();
        let mut ours: Vec<(Lsn, Vec<String>, Vec<String>)> = vec![];
        let d = walrec::decode_segment_with_blocks(&data, start, Some(&next), |r| {
            for b in r.blocks {
                forks_seen.insert(b.fork);
                same_rel += u64::from(b.flags & BKPBLOCK_SAME_REL != 0);
                will_init += u64::from(b.will_init());
                if let Some(i) = b.image {
                    images += 1;
                    compressed += u64::from(i.compression().is_some());
                    holes += u64::from(i.hole_length > 0);
                }
            }
            with_blocks += u64::from(!r.blocks.is_empty());
            ours.push((r.lsn, r.blocks.iter().map(our_blkref).collect(), r.changes.iter().map(our_change).collect()));
        });
        assert_ne!(d.end, walrec::End::Invalid, "{}: {:?}", w[0], d.invalid_reason);
        // The same Decoded as without blocks.
        assert_eq!(d, walrec::decode_segment(&data, start, Some(&next)), "{}", w[0]);
        assert_eq!(ours.len() as u64, d.records);
        records += d.records;

        let theirs = parse_dump(&waldump(&pg, start, d.end_of_valid));
        assert_eq!(
            ours.iter().map(|o| o.0).collect::<Vec<_>>(),
            theirs.keys().copied().collect::<Vec<_>>(),
            "records of {}",
            w[0]
        );
        for (lsn, blkrefs, changes) in &ours {
            let t = &theirs[lsn];
            // Hint bits (data checksums on): full-page images with block references like any.
            hint_fpis += u64::from(t.rmgr == "XLOG" && t.desc.starts_with("FPI_FOR_HINT") && !blkrefs.is_empty());
            assert_eq!(blkrefs, &t.blkrefs, "block references of the record at {lsn} ({} {})", t.rmgr, t.desc);
            assert_eq!(changes, &their_changes(t), "relation changes of the record at {lsn} ({} {})", t.rmgr, t.desc);
            for c in changes {
                kinds_seen.insert(c.split(" ").take(2).collect::<Vec<_>>().join(" "));
            }
        }

        // Maps: without the next segment plus the tail record's, and with it, agree.
        let alone = summary::segment_block_map(&data, start, None).unwrap();
        let tail = summary::tail_block_map(&data, start, &next).unwrap();
        let full = summary::segment_block_map(&data, start, Some(&next)).unwrap();
        assert_eq!((full.start, full.end), (start, Lsn(start.0 + SEG)));
        let mut joined = alone.clone();
        if let Some(t) = &tail {
            assert_eq!((alone.end, t.end), (t.start, full.end));
            joined.merge(t);
        }
        assert_eq!(joined, full, "{}", w[0]);
        // The tail record's map from the segment's last 64 kB (larger when needed), as wal-push
        // makes it with the next segment: the same. And from its last page, grown page by page
        // while more is needed (exercising the walk from wherever a window begins).
        let from_end = |mut k: usize, retries: &mut u64| loop {
            match summary::tail_block_map_from_end(&data[data.len() - k..], start, SEG, &next).unwrap() {
                TailMap::NeedMore => {
                    assert!(k < data.len(), "{}: more than the whole segment needed", w[0]);
                    k = (k + 8192).min(data.len());
                    *retries += 1;
                }
                TailMap::Tail(m) => break (Some(m), None),
                TailMap::NoTail(why) => break (None, Some(why)),
            }
        };
        let t_tail = Instant::now();
        let (map, why) = from_end(64 << 10, &mut tail_retries);
        tail_time += t_tail.elapsed();
        assert_eq!(map, tail, "{}: the tail map from the last 64 kB", w[0]);
        no_tail.extend(why.map(|w| format!("{w:?}")));
        assert_eq!(from_end(8192, &mut page_retries).0, tail, "{}: the tail map from the last page", w[0]);
        let (sum, with_map) = summary::summarize_with_blocks(&data, start).unwrap();
        assert_eq!((sum, with_map), (summary::summarize(&data, start).unwrap(), alone.clone()));
        assert!(!full.is_unknown(), "{}: {:?}", w[0], full.unknown);
        assert_eq!(BlockMap::from_bytes(&full.to_bytes()).unwrap(), full);
        if start >= from {
            map_bytes += alone.to_bytes().len() + tail.as_ref().map_or(0, |t| t.to_bytes().len());
            for t in theirs.values() {
                for b in &t.blkrefs {
                    // blkref #0: rel 1663/5/16384 fork main blk 7 ...
                    let f: Vec<&str> = b.split_whitespace().collect();
                    let n: Vec<u32> = f[3].split('/').map(|x| x.parse().unwrap()).collect();
                    let fork = ["main", "fsm", "vm", "init"].iter().position(|x| *x == f[5]).unwrap() as u8;
                    let rnode = RelFileNode { spc_node: n[0], db_node: n[1], rel_node: n[2] };
                    their_blocks.insert((rnode, ForkNumber(fork), f[7].parse().unwrap()));
                }
            }
            maps.push(alone);
            maps.extend(tail);
        }
    }
    let decode = t0.elapsed() - workload;

    // What the workload was meant to exercise, it did.
    for k in [
        "Storage CREATE",
        "Storage TRUNCATE",
        "Transaction DROP",
        "Database CREATE_FILE_COPY",
        "Database CREATE_WAL_LOG",
        "Database DROP",
        "Tablespace CREATE",
        "Tablespace DROP",
        "RelMap UPDATE",
    ] {
        assert!(kinds_seen.contains(k), "no {k} in {kinds_seen:?}");
    }
    assert_eq!(forks_seen, (0..4).map(ForkNumber).collect(), "every fork referenced");
    assert!(images > 100 && compressed > 0 && holes > 0 && same_rel > 0 && will_init > 0 && hint_fpis > 0);

    // The map of the range: exactly the blocks pg_waldump lists, and the right decisions.
    let m = BlockMap::combine(&maps, from, to);
    assert!(!m.is_unknown(), "{:?}", m.unknown);
    let our_blocks: BTreeSet<(RelFileNode, ForkNumber, u32)> = m
        .relations
        .iter()
        .flat_map(|(r, e)| e.forks.iter().flat_map(move |(f, s)| s.iter().map(move |b| (*r, *f, b))))
        .collect();
    assert_eq!(our_blocks, their_blocks);
    let stored = m.to_bytes();
    assert_eq!(BlockMap::from_bytes(&stored).unwrap(), m);

    // steady: a few blocks (the updated rows' pages), nothing whole.
    let FileDecision::Blocks(d) = m.decide(steady, ForkNumber::MAIN, false) else { panic!("steady whole") };
    let steady_blocks: u32 = pg.sql("SELECT pg_relation_size('steady') / 8192").trim().parse().unwrap();
    assert!(d.limit.is_none() && !d.changed.is_empty() && d.changed.len() < u64::from(steady_blocks) / 2, "{d:?}");
    for id in [1, 1500, 2900] {
        let page: u32 =
            pg.sql(&format!("SELECT (ctid::text::point)[0]::int FROM steady WHERE id = {id}")).trim().parse().unwrap();
        assert!(d.changed.contains(page), "row {id} on page {page}: {}", d.changed);
    }
    assert_eq!(whole(&m.decide(steady, ForkNumber::VISIBILITYMAP, false)), [WholeReason::VisibilityMap]);
    assert_eq!(whole(&m.decide(steady, ForkNumber::FSM, false)), [WholeReason::FreeSpaceMap]);
    // shrink: truncated by VACUUM to its current length.
    let FileDecision::Blocks(d) = m.decide(shrink, ForkNumber::MAIN, false) else { panic!("shrink whole") };
    assert_eq!(d.limit, Some(shrink_blocks), "{d:?}");
    // t: rewritten (VACUUM FULL, CLUSTER, SET TABLESPACE twice): its file is new.
    assert!(matches!(whole(&m.decide(t_now, ForkNumber::MAIN, false)), [WholeReason::ForkCreated(_)]));
    assert!(matches!(whole(&m.decide(gone, ForkNumber::MAIN, false)), [WholeReason::RelationDropped(_)]));
    // Databases: created by FILE_COPY (no block logged) and dropped; created by WAL_LOG, moved to
    // ts1 (a FILE_COPY from its old directory) and dropped.
    let in_db = |spc, db| RelFileNode { spc_node: spc, db_node: db, rel_node: 1259 };
    assert!(matches!(
        whole(&m.decide(in_db(1663, dfc), ForkNumber::MAIN, false)),
        [WholeReason::DatabaseCreated { file_copy: true, .. }, WholeReason::DatabaseDropped(_)]
    ));
    let w = whole(&m.decide(in_db(ts1, dwl), ForkNumber::MAIN, false)).to_vec();
    assert!(w.contains(&WholeReason::TablespaceCreated(m.tablespaces[&ts1][0].lsn)), "{w:?}");
    assert!(w.iter().any(|r| matches!(r, WholeReason::DatabaseCreated { file_copy: true, .. })), "{w:?}");
    assert!(w.iter().any(|r| matches!(r, WholeReason::DatabaseDropped(_))), "{w:?}");
    // The unlogged table: only its init fork is logged (created); the caller says it is unlogged.
    assert!(matches!(whole(&m.decide(u, ForkNumber::INIT, true)), [WholeReason::ForkCreated(_)]));
    assert!(whole(&m.decide(u, ForkNumber::MAIN, true)).contains(&WholeReason::Unlogged));
    assert!(m.relations.get(&u).is_none_or(|e| !e.forks.contains_key(&ForkNumber::MAIN)));

    eprintln!(
        "{} segments, {records} records ({with_blocks} with block references, {images} images, {compressed} compressed, \
         {hint_fpis} FPI_FOR_HINT); \
         range map: {} relations, {} blocks, {} bytes stored ({} bytes as per-segment maps); \
         tail maps from the last 64 kB: {} without a tail ({no_tail:?}), {tail_retries} retries with more ({page_retries} pages more from the last page), \
         {:?} per segment; workload {workload:?}, decode and compare {decode:?}",
        names.len() - 1,
        m.relations.len(),
        our_blocks.len(),
        stored.len(),
        map_bytes,
        no_tail.len(),
        tail_time / (names.len() as u32 - 1),
    );
}
