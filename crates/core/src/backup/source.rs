//! The source walk: which files of the data directory a backup holds (PostgreSQL's documented
//! exclusions), and how they are balanced over the parallel streams.

use super::*;

#[derive(Debug, Clone)]
pub(super) struct SourceFile {
    /// Path in the backup (relative, `/`-separated).
    pub(super) rel: String,
    pub(super) abs: PathBuf,
    pub(super) size: u64,
    pub(super) mtime: i64,
    pub(super) mode: u32,
    pub(super) dir: bool,
    /// An incremental backup stores only these blocks of it.
    pub(super) blocks: Option<FileBlocks>,
}

impl SourceFile {
    /// The bytes the backup stores of it.
    pub(super) fn stored_size(&self) -> u64 {
        self.blocks.as_ref().map_or(self.size, |b| b.stored.count() * BLCKSZ)
    }
}

/// A bound on how fast a backup reads the data directory, shared by its streams.
pub(super) struct Throttle {
    bytes_per_sec: u64,
    started: std::time::Instant,
    read: AtomicU64,
}

impl Throttle {
    pub(super) fn new(bytes_per_sec: u64) -> Throttle {
        Throttle { bytes_per_sec: bytes_per_sec.max(1), started: std::time::Instant::now(), read: AtomicU64::new(0) }
    }

    /// Counts `n` bytes read and sleeps (a blocking thread) until the rate allows them.
    pub(super) fn take(&self, n: u64) {
        let total = self.read.fetch_add(n, Ordering::Relaxed) + n;
        let due = Duration::from_secs_f64(total as f64 / self.bytes_per_sec as f64);
        if let Some(wait) = due.checked_sub(self.started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

/// A reader of a file's data for the backup: all of it (exactly `size` bytes: a file that
/// shrank is padded with zeros, one that grew is cut; WAL replay repairs both), or the blocks
/// an incremental backup stores, in order; each read counted by the throttle.
pub(super) struct SourceReader<'a> {
    file: std::fs::File,
    /// (offset, length) of what is still to be read, in order.
    spans: std::vec::IntoIter<(u64, u64)>,
    current: Option<(u64, u64)>,
    throttle: Option<&'a Throttle>,
}

impl<'a> SourceReader<'a> {
    pub(super) fn new(file: std::fs::File, f: &SourceFile, throttle: Option<&'a Throttle>) -> SourceReader<'a> {
        let spans: Vec<(u64, u64)> = match &f.blocks {
            None => vec![(0, f.size)],
            Some(b) => b.stored.0.iter().map(|&(a, z)| (a as u64 * BLCKSZ, (z - a + 1) as u64 * BLCKSZ)).collect(),
        };
        SourceReader { file, spans: spans.into_iter(), current: None, throttle }
    }
}

impl Read for SourceReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        use std::os::unix::fs::FileExt;
        loop {
            let (offset, left) = match self.current {
                Some((o, l)) if l > 0 => (o, l),
                _ => match self.spans.next() {
                    Some(s) => {
                        self.current = Some(s);
                        continue;
                    }
                    None => return Ok(0),
                },
            };
            let want = (left.min(out.len() as u64)) as usize;
            let mut n = self.file.read_at(&mut out[..want], offset)?;
            if n == 0 {
                // Past the file's end: zeros.
                out[..want].fill(0);
                n = want;
            }
            self.current = Some((offset + n as u64, left - n as u64));
            if let Some(t) = self.throttle {
                t.take(n as u64);
            }
            return Ok(n);
        }
    }
}

/// What a base backup leaves out (PostgreSQL docs, "Backing Up the Data Directory"; pg_basebackup).
pub(super) fn exclusion(rel: &str, name: &str, is_dir: bool) -> Option<&'static str> {
    const CONTENTS_ONLY: &[&str] = &[
        "pg_wal",
        "pg_dynshmem",
        "pg_notify",
        "pg_replslot",
        "pg_serial",
        "pg_snapshots",
        "pg_stat_tmp",
        "pg_subtrans",
    ];
    const FILES: &[&str] = &[
        "postmaster.pid",
        "postmaster.opts",
        "backup_label",
        "backup_label.old",
        "tablespace_map",
        "backup_manifest",
        "recovery.signal",
        "standby.signal",
        "current_logfiles",
    ];
    if name.starts_with("pgsql_tmp") {
        return Some("temporary");
    }
    if name == "pg_internal.init" {
        return Some("relcache init file");
    }
    let parent = rel.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
    if CONTENTS_ONLY.contains(&parent) {
        return Some("contents not backed up");
    }
    if !is_dir && !rel.contains('/') && FILES.contains(&name) {
        return Some("not part of a base backup");
    }
    // Temporary relations: t<backend>_<relfilenode>[...]
    if !is_dir && let Some(rest) = name.strip_prefix('t') {
        let (a, b) = rest.split_once('_').unwrap_or(("", ""));
        if !a.is_empty() && a.bytes().all(|c| c.is_ascii_digit()) && b.starts_with(|c: char| c.is_ascii_digit()) {
            return Some("temporary relation");
        }
    }
    None
}

pub(super) fn walk(
    root: &Path,
    prefix: &str,
    out: &mut Vec<SourceFile>,
    tablespaces: &mut Vec<Tablespace>,
) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let mut stack = vec![(root.to_path_buf(), prefix.to_string())];
    while let Some((dir, rel_dir)) = stack.pop() {
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in rd {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let rel = if rel_dir.is_empty() { name.clone() } else { format!("{rel_dir}/{name}") };
            let lmeta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            // Tablespaces: pg_tblspc/<oid> symlinks, followed and stored below pg_tblspc/<oid>.
            if lmeta.file_type().is_symlink() {
                if rel_dir == "pg_tblspc" || (prefix.is_empty() && rel_dir.is_empty() && name == "pg_wal") {
                    let target = std::fs::read_link(entry.path())?;
                    if rel_dir == "pg_tblspc" {
                        tablespaces.push(Tablespace {
                            oid: name.clone(),
                            location: target.display().to_string(),
                            name: None,
                        });
                        out.push(SourceFile {
                            rel: rel.clone(),
                            abs: entry.path(),
                            size: 0,
                            mtime: 0,
                            mode: 0o700,
                            dir: true,
                            blocks: None,
                        });
                        stack.push((target, rel));
                    } else {
                        // pg_wal elsewhere: an empty pg_wal in the backup.
                        out.push(SourceFile {
                            rel,
                            abs: entry.path(),
                            size: 0,
                            mtime: 0,
                            mode: 0o700,
                            dir: true,
                            blocks: None,
                        });
                    }
                }
                continue;
            }
            let is_dir = lmeta.is_dir();
            if exclusion(&rel, &name, is_dir).is_some() {
                continue;
            }
            if !is_dir && !lmeta.is_file() {
                continue;
            }
            out.push(SourceFile {
                rel: rel.clone(),
                abs: entry.path(),
                size: if is_dir { 0 } else { lmeta.len() },
                mtime: lmeta.mtime(),
                mode: lmeta.permissions().mode() & 0o7777,
                dir: is_dir,
                blocks: None,
            });
            if is_dir {
                stack.push((entry.path(), rel));
            }
        }
    }
    Ok(())
}

/// Splits files into `n` streams of similar total size (largest first onto the lightest).
pub(super) fn balance(files: Vec<SourceFile>, n: usize) -> Vec<Vec<SourceFile>> {
    let n = n.max(1);
    let (dirs, mut regular): (Vec<_>, Vec<_>) = files.into_iter().partition(|f| f.dir);
    regular.sort_by_key(|f| std::cmp::Reverse(f.stored_size()));
    let mut streams: Vec<(u64, Vec<SourceFile>)> = (0..n).map(|_| (0, Vec::new())).collect();
    for f in regular {
        let lightest = streams.iter_mut().min_by_key(|s| s.0).expect("n >= 1");
        lightest.0 += f.stored_size().max(512);
        lightest.1.push(f);
    }
    let mut out: Vec<Vec<SourceFile>> = streams
        .into_iter()
        .map(|(_, mut v)| {
            v.sort_by(|a, b| a.rel.cmp(&b.rel));
            v
        })
        .collect();
    // Directories first, in the first stream, parents before children.
    let mut dirs = dirs;
    dirs.sort_by(|a, b| a.rel.cmp(&b.rel));
    out[0].splice(0..0, dirs);
    out.retain(|s| !s.is_empty());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusions_follow_the_postgres_docs() {
        assert!(exclusion("pg_wal/000000010000000000000001", "000000010000000000000001", false).is_some());
        assert!(exclusion("pg_wal", "pg_wal", true).is_none(), "the directory itself is kept");
        assert!(exclusion("postmaster.pid", "postmaster.pid", false).is_some());
        assert!(exclusion("base/1/pg_internal.init", "pg_internal.init", false).is_some());
        assert!(exclusion("base/5/t3_16384", "t3_16384", false).is_some());
        assert!(exclusion("base/5/16384", "16384", false).is_none());
        assert!(exclusion("base/pgsql_tmp", "pgsql_tmp", true).is_some());
        assert!(exclusion("global/pg_control", "pg_control", false).is_none());
        assert!(exclusion("pg_replslot/slot1", "slot1", true).is_some());
    }

    #[test]
    fn balance_spreads_bytes() {
        let f = |rel: &str, size| SourceFile {
            rel: rel.into(),
            abs: PathBuf::new(),
            size,
            mtime: 0,
            mode: 0o600,
            dir: false,
            blocks: None,
        };
        let mut files = vec![f("a", 100), f("b", 90), f("c", 50), f("d", 40)];
        files.push(SourceFile { dir: true, ..f("base", 0) });
        let s = balance(files, 2);
        assert_eq!(s.len(), 2);
        let sum = |v: &Vec<SourceFile>| v.iter().map(|x| x.size).sum::<u64>();
        assert_eq!(sum(&s[0]) + sum(&s[1]), 280);
        assert!(sum(&s[0]).abs_diff(sum(&s[1])) <= 20);
        assert!(s[0][0].dir, "directories first");
    }
}
