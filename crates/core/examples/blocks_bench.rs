//! What recording block references and building the changed-block map cost the WAL decoder, and
//! what a segment's tail map costs from its last pages against the whole segment: bench/blocks.sh
//! runs it on pgbench WAL (`cargo run --release -p walnut-core --example blocks_bench DIR`).

use walnut_core::blockmap::{BlockMap, BlockSet};
use walnut_pg::Lsn;

fn main() {
    use walnut_pg::{WalFileName, WalSegSize, walrec};
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: blocks_bench DIR (a directory of WAL segments)");
        std::process::exit(2);
    };
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24)
        .collect();
    names.sort();
    let segs: Vec<(Lsn, Vec<u8>)> = names
        .iter()
        .map(|n| {
            let data = std::fs::read(std::path::Path::new(&dir).join(n)).unwrap();
            let size = WalSegSize::new(data.len() as u64).unwrap();
            let seg = WalFileName::parse(n).unwrap().segment().unwrap();
            (size.start_lsn(seg.segno(size).unwrap()), data)
        })
        .collect();
    let bytes: usize = segs.iter().map(|s| s.1.len()).sum();
    type Run = fn(&[u8], Lsn) -> usize;
    let runs: [(&str, Run); 3] = [
        ("decode_segment (as wal-push today)", |d, l| walrec::decode_segment(d, l, None).records as usize),
        ("decode_segment_with_blocks, no-op callback", |d, l| {
            let mut n = 0;
            walrec::decode_segment_with_blocks(d, l, None, |r| n += r.blocks.len());
            n
        }),
        ("summarize_with_blocks (decode + BlockMapBuilder + finish)", |d, l| {
            walnut_core::summary::summarize_with_blocks(d, l).unwrap().1.relations.len()
        }),
    ];
    // Best of 15 passes over all segments, the three interleaved (the machine may be shared).
    let mut best = [f64::MAX; 3];
    for _ in 0..15 {
        for (i, (_, run)) in runs.iter().enumerate() {
            let t = std::time::Instant::now();
            for (lsn, data) in &segs {
                std::hint::black_box(run(data, *lsn));
            }
            best[i] = best[i].min(t.elapsed().as_secs_f64());
        }
    }
    for (i, (what, _)) in runs.iter().enumerate() {
        eprintln!(
            "{what}: {:.2} ms per segment, {:.0} MB/s, {:+.1}%",
            best[i] * 1e3 / segs.len() as f64,
            bytes as f64 / best[i] / 1e6,
            (best[i] / best[0] - 1.0) * 100.0
        );
    }
    // The tail record's map at the push of the next segment: from the whole segment
    // (tail_block_map) against from its last 64 kB (tail_block_map_from_end, doubled while
    // more is needed), over every pair of consecutive segments.
    type Seg = (Lsn, Vec<u8>);
    let pairs: Vec<(&Seg, &Seg)> =
        segs.windows(2).filter(|w| w[1].0.0 == w[0].0.0 + w[0].1.len() as u64).map(|w| (&w[0], &w[1])).collect();
    let from_end = |(lsn, data): &Seg, next: &[u8], retries: &mut u64| {
        let mut k = 64 << 10;
        loop {
            match walnut_core::summary::tail_block_map_from_end(&data[data.len() - k..], *lsn, data.len() as u64, next)
            {
                Ok(walnut_core::summary::TailMap::NeedMore) if k < data.len() => {
                    k = (k * 2).min(data.len());
                    *retries += 1;
                }
                t => return t.map(|t| matches!(t, walnut_core::summary::TailMap::Tail(_))),
            }
        }
    };
    let (mut best_whole, mut best_end, mut best_decode, mut retries) = (f64::MAX, f64::MAX, f64::MAX, 0);
    for _ in 0..15 {
        let t = std::time::Instant::now();
        for ((lsn, data), _) in &pairs {
            std::hint::black_box(walrec::decode_segment(data, *lsn, None));
        }
        best_decode = best_decode.min(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        for ((lsn, data), (_, next)) in &pairs {
            std::hint::black_box(walnut_core::summary::tail_block_map(data, *lsn, next).unwrap());
        }
        best_whole = best_whole.min(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        retries = 0;
        for (seg, (_, next)) in &pairs {
            std::hint::black_box(from_end(seg, next, &mut retries).unwrap());
        }
        best_end = best_end.min(t.elapsed().as_secs_f64());
    }
    let tails = pairs.iter().filter(|(seg, (_, next))| from_end(seg, next, &mut 0).unwrap()).count();
    let per = |t: f64| t * 1e6 / pairs.len().max(1) as f64;
    eprintln!(
        "tail maps over {} segment boundaries ({tails} with a tail record, {retries} retries with a larger window): \
         tail_block_map (whole segment + next) {:.0} us per segment; tail_block_map_from_end (last 64 kB + next) \
         {:.1} us per segment ({:.0}x less); decode_segment of the same segments {:.0} us",
        pairs.len(),
        per(best_whole),
        per(best_end),
        best_whole / best_end,
        per(best_decode),
    );
    let records: u64 = segs.iter().map(|(l, d)| walrec::decode_segment(d, *l, None).records).sum();
    eprintln!("{records} records");
    let maps: Vec<BlockMap> =
        segs.iter().map(|(l, d)| walnut_core::summary::summarize_with_blocks(d, *l).unwrap().1).collect();
    let stored: Vec<usize> = maps.iter().map(|m| m.to_bytes().len()).collect();
    let blocks: u64 =
        maps.iter().flat_map(|m| m.relations.values()).flat_map(|e| e.forks.values()).map(BlockSet::len).sum();
    eprintln!(
        "{} segments; block maps: {} blocks in all, {} bytes stored per segment on average (max {})",
        segs.len(),
        blocks,
        stored.iter().sum::<usize>() / stored.len().max(1),
        stored.iter().max().unwrap_or(&0)
    );
}
