//! Fetching a backup: parallel download, decompression and tar extraction with every file
//! checked against the manifest, fsynced by a pool while extraction goes on.

use super::*;

/// A `Read` over byte chunks arriving on a channel (from an async download).
pub(crate) struct ChannelReader {
    pub(super) rx: mpsc::Receiver<Result<Bytes, StorageError>>,
    pub(super) cur: Bytes,
    /// The download's failure, kept so that it is reported as what it is (storage unreachable,
    /// a timeout) and not as the corrupt tar stream the extraction then sees.
    pub(super) failed: std::sync::Arc<std::sync::Mutex<Option<StorageError>>>,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => {
                    let text = e.to_string();
                    *self.failed.lock().unwrap() = Some(e);
                    return Err(std::io::Error::other(text));
                }
                None => return Ok(0),
            }
        }
        let n = self.cur.len().min(out.len());
        out[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

pub(super) fn safe_relative(p: &Path) -> bool {
    p.components().all(|c| matches!(c, Component::Normal(_))) && p.components().next().is_some()
}

/// Reads what another thread sends, chunk by chunk; the sender hanging up is the end.
pub(super) struct QueueReader {
    pub(super) rx: std::sync::mpsc::Receiver<std::io::Result<Vec<u8>>>,
    pub(super) cur: Vec<u8>,
    pub(super) pos: usize,
}

impl Read for QueueReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = {
            let chunk = std::io::BufRead::fill_buf(self)?;
            let n = buf.len().min(chunk.len());
            buf[..n].copy_from_slice(&chunk[..n]);
            n
        };
        std::io::BufRead::consume(self, n);
        Ok(n)
    }
}

/// Read in place: a decompressor reads each chunk where it is.
impl std::io::BufRead for QueueReader {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(chunk) => (self.cur, self.pos) = (chunk?, 0),
                Err(_) => return Ok(&[]),
            }
        }
        Ok(&self.cur[self.pos..])
    }
    fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.cur.len());
    }
}

/// The sending end of a queue of chunks read ahead by a thread of a part's pipeline.
type Chunks = std::sync::mpsc::SyncSender<std::io::Result<Vec<u8>>>;

/// The reader a step of a part's pipeline opened, or `None` when it could not be opened: the
/// error is then sent on (the part fails) and kept in `opening` (for what the caller reports).
fn opened<'a>(
    r: Result<Box<dyn Read + 'a>, envelope::EnvelopeError>,
    tx: &Chunks,
    opening: &std::sync::Mutex<Option<envelope::EnvelopeError>>,
) -> Option<Box<dyn Read + 'a>> {
    match r {
        Ok(r) => Some(r),
        Err(e) => {
            let _ = tx.send(Err(std::io::Error::other(e.to_string())));
            *opening.lock().unwrap() = Some(e);
            None
        }
    }
}

/// Reads `r` to its end in 1 MiB chunks into `tx`; an error is sent and ends it, and so does a
/// receiver that hung up (the extraction stopped). The end is the hang-up of `tx`.
fn pump(mut r: impl Read, tx: &Chunks) {
    loop {
        let mut buf = Vec::with_capacity(1 << 20);
        match (&mut r).take(1 << 20).read_to_end(&mut buf) {
            Ok(_) if buf.is_empty() => return,
            Ok(_) => {
                if tx.send(Ok(buf)).is_err() {
                    return;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        }
    }
}

/// Counts what passes through it, and hashes it too when asked (verification).
pub(super) struct CountingReader<R> {
    pub(super) inner: R,
    pub(super) count: u64,
    pub(super) hash: Option<sha2::Sha256>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use sha2::Digest;
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if let Some(h) = &mut self.hash {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// What reading a part is for.
pub(super) enum PartUse<'a> {
    /// Restore: every file checked against the manifest and written below `dest`, fsynced by the
    /// syncer's threads; with `only`, the other files of the part are read through, not written
    /// (a backup of a chain whose later members supersede them). A file stored as blocks is
    /// written over what `dest` holds under its path (the chain's earlier members restored it).
    Extract {
        dest: &'a Path,
        fsync: &'a std::sync::mpsc::SyncSender<(PathBuf, std::fs::File)>,
        only: Option<&'a std::collections::HashSet<String>>,
        /// Files a member of the chain restored after this one writes again: fsynced then (an
        /// fsync flushes every write the file had), not now.
        rewritten: Option<&'a std::collections::HashSet<String>>,
        /// A chain restored newest member first: files several members write get each block
        /// once (see [`ChainWrite`]).
        chain: Option<&'a ChainWrite>,
    },
    /// Verification, nothing written: the whole content is hashed against the part's trailer
    /// and the manifest; with `files`, the tar is read too and every file checked against the
    /// manifest.
    Check { files: bool },
}

/// fsyncs restored files on a few threads while extraction goes on (an fsync inside the extraction
/// loop stalled decompression on every flush). The queue is bounded, so open files never pile up.
pub(super) struct Syncer {
    pub(super) tx: std::sync::mpsc::SyncSender<(PathBuf, std::fs::File)>,
    pub(super) workers: Vec<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Syncer {
    fn start(threads: usize) -> Syncer {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(PathBuf, std::fs::File)>(64);
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let workers = (0..threads)
            .map(|_| {
                let rx = rx.clone();
                std::thread::spawn(move || -> std::io::Result<()> {
                    loop {
                        let job = rx.lock().expect("fsync queue").recv();
                        let Ok((path, file)) = job else { return Ok(()) };
                        file.sync_data()
                            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
                    }
                })
            })
            .collect();
        Syncer { tx, workers }
    }

    fn sender(&self) -> std::sync::mpsc::SyncSender<(PathBuf, std::fs::File)> {
        self.tx.clone()
    }

    /// Waits until every queued file is synced (all senders must be dropped first).
    fn finish(self) -> std::io::Result<()> {
        drop(self.tx);
        let mut first = Ok(());
        for w in self.workers {
            let r = w.join().expect("fsync thread panicked");
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// fsyncs every directory that holds a restored file or directory (the ancestors of `files`,
/// relative to `root`, through the pg_tblspc links too).
pub(super) fn sync_dirs(root: &Path, files: &[String]) -> std::io::Result<()> {
    let mut dirs = std::collections::BTreeSet::new();
    for f in files {
        let mut p = Path::new(f.as_str());
        while let Some(parent) = p.parent() {
            if !dirs.insert(root.join(parent)) {
                break;
            }
            p = parent;
        }
    }
    dirs.extend([root.to_path_buf(), root.join("pg_tblspc"), root.join("pg_wal"), root.join("pg_wal/archive_status")]);
    for d in dirs.iter().filter(|d| d.exists()) {
        std::fs::File::open(d)
            .and_then(|f| f.sync_all())
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", d.display())))?;
    }
    Ok(())
}

/// Reads one part: extracts it (verifying every file against the manifest and the part's
/// trailer) or only checks it (see [`PartUse`]). Returns the paths of the files it held.
pub(super) fn extract_part(
    key: &str,
    reader: ChannelReader,
    expected: &HashMap<String, FileEntry>,
    progress: &Progress,
    usage: PartUse<'_>,
    keys: Option<&crate::crypt::Identities>,
) -> Result<(Vec<String>, u64, [u8; 32]), BackupError> {
    use std::os::unix::fs::PermissionsExt;
    let corrupt = |reason: String| BackupError::Corrupt { key: key.to_string(), reason };
    let refused =
        |source: envelope::EnvelopeError| BackupError::Repo(RepoError::Corrupt { key: key.to_string(), source });
    let mut payload = PayloadReader::new(reader).map_err(|e| corrupt(e.to_string()))?;
    let (codecs, meta) = (payload.codecs.clone(), payload.meta.clone());
    if payload.sealed() && (keys.is_none() || matches!(usage, PartUse::Check { files: false })) {
        if let PartUse::Check { files: false } = usage {
            // Checked in its stored form, with or without the key: the payload against the
            // trailer's checksum of it (decrypting would prove no more about the stored bytes;
            // a deep check decrypts, decompresses and checks every file).
            let n = std::io::copy(&mut payload, &mut std::io::sink()).map_err(|e| corrupt(e.to_string()))?;
            progress.done.fetch_add(n, Ordering::Relaxed);
            let (tn, tsum) = payload.trailer().map_err(|e| corrupt(e.to_string()))?;
            return Ok((vec![], tn, tsum));
        }
        return Err(refused(envelope::EnvelopeError::no_identity(&meta)));
    }
    if payload.sealed() && keys.is_some() {
        // Decrypted below: age authenticates what the stored-form checksum would check.
        payload.skip_stored_check();
    }
    let opening: std::sync::Mutex<Option<envelope::EnvelopeError>> = Default::default();
    let mut written = Vec::new();
    let payload_ref = &mut payload;
    let opening_ref = &opening;
    let n = std::thread::scope(|scope| -> Result<(u64, Option<[u8; 32]>), BackupError> {
        // Decompression runs on its own thread, a few MiB ahead of this one (which checksums and
        // writes): a part whose sibling parts are done still uses two cores. Decryption, when
        // the part is encrypted, on a third, ahead of decompression.
        let (tx, rx) = std::sync::mpsc::sync_channel::<std::io::Result<Vec<u8>>>(4);
        if codecs.last() == Some(&crate::crypt::AGE) {
            let rest = codecs[..codecs.len() - 1].to_vec();
            let (ptx, prx) = std::sync::mpsc::sync_channel::<std::io::Result<Vec<u8>>>(4);
            // age reads whole chunks from the payload's own buffer; decompression reads the
            // decrypted chunks where they are.
            scope.spawn(move || {
                if let Some(plain) = opened(envelope::decrypter(payload_ref, keys, &meta), &ptx, opening_ref) {
                    pump(plain, &ptx);
                }
            });
            scope.spawn(move || {
                let plain = QueueReader { rx: prx, cur: Vec::new(), pos: 0 };
                if let Some(d) = opened(envelope::decompressor(plain, &rest), &tx, opening_ref) {
                    pump(d, &tx);
                }
            });
        } else {
            scope.spawn(move || {
                let buffered = std::io::BufReader::with_capacity(1 << 20, payload_ref);
                if let Some(d) = opened(envelope::decompressor(buffered, &codecs), &tx, opening_ref) {
                    pump(d, &tx);
                }
            });
        }
        // Counts, does not hash: every file's content is checked against its SHA-256 in the
        // (itself checksummed) manifest, tar headers are checked by the parser and against the
        // manifest's paths and sizes, and nothing else in the tar is written. Hashing the whole
        // part again would add a second SHA-256 pass over every restored byte.
        let checking = matches!(usage, PartUse::Check { .. });
        let mut counting = CountingReader {
            inner: QueueReader { rx, cur: Vec::new(), pos: 0 },
            count: 0,
            hash: checking.then(<sha2::Sha256 as sha2::Digest>::new),
        };
        if let PartUse::Check { files: false } = usage {
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = counting.read(&mut buf).map_err(|e| corrupt(e.to_string()))?;
                if n == 0 {
                    break;
                }
                progress.done.fetch_add(n as u64, Ordering::Relaxed);
            }
        } else {
            let mut archive = tar::Archive::new(&mut counting);
            for entry in archive.entries().map_err(|e| corrupt(e.to_string()))? {
                let mut entry = entry.map_err(|e| corrupt(e.to_string()))?;
                let path = entry.path().map_err(|e| corrupt(e.to_string()))?.into_owned();
                if !safe_relative(&path) {
                    return Err(corrupt(format!("unsafe path {}", path.display())));
                }
                match (entry.header().entry_type(), &usage) {
                    (tar::EntryType::Directory, PartUse::Check { .. }) => {}
                    (tar::EntryType::Directory, PartUse::Extract { dest, .. }) => {
                        let target = dest.join(&path);
                        std::fs::create_dir_all(&target).map_err(io_ctx(format!("create {}", target.display())))?;
                        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700))
                            .map_err(io_ctx(format!("chmod {}", target.display())))?;
                    }
                    (tar::EntryType::Regular, _) => {
                        let rel = path.to_string_lossy().into_owned();
                        let want = expected
                            .get(&rel)
                            .ok_or_else(|| corrupt(format!("{rel} is in the part but not in the manifest")))?;
                        if let PartUse::Extract { only: Some(only), .. } = &usage
                            && !only.contains(&rel)
                        {
                            // Superseded by a later backup of the chain: read through.
                            continue;
                        }
                        // A file several members of a chain write: each block once.
                        let shared = match &usage {
                            PartUse::Extract { chain: Some(c), .. } => c.take(&rel),
                            _ => None,
                        };
                        let mut out = match &usage {
                            PartUse::Extract { dest, fsync, .. } => {
                                let target = dest.join(&path);
                                if let Some(parent) = target.parent() {
                                    std::fs::create_dir_all(parent)
                                        .map_err(io_ctx(format!("create {}", parent.display())))?;
                                }
                                let file = if want.blocks.is_some() || shared.is_some() {
                                    std::fs::OpenOptions::new().write(true).create(true).truncate(false).open(&target)
                                } else {
                                    std::fs::File::create(&target)
                                }
                                .map_err(io_ctx(format!("create {}", target.display())))?;
                                Some((target, file, *fsync))
                            }
                            PartUse::Check { .. } => None,
                        };
                        let is_shared = shared.is_some();
                        let mut h = HashingReader::new(&mut entry);
                        match (&mut out, &want.blocks, shared) {
                            (Some((_, file, _)), blocks, Some(mut shared)) => {
                                let r = shared.write(&mut h, file, blocks.as_ref(), want.stored_len());
                                if let PartUse::Extract { chain: Some(c), .. } = &usage {
                                    c.put(&rel, shared);
                                }
                                r
                            }
                            (Some((_, file, _)), Some(blocks), None) => write_blocks(&mut h, file, blocks, want.size),
                            (Some((_, file, _)), None, None) => std::io::copy(&mut h, file).map(|_| ()),
                            (None, _, _) => std::io::copy(&mut h, &mut std::io::sink()).map(|_| ()),
                        }
                        .map_err(|e| corrupt(format!("{rel}: {e}")))?;
                        let (n, sum) = h.finish();
                        if n != want.stored_len() || hex::encode(sum) != want.sha256 {
                            return Err(corrupt(format!("{rel}: content does not match the manifest checksum")));
                        }
                        progress.done.fetch_add(n, Ordering::Relaxed);
                        let later = matches!(&usage, PartUse::Extract { rewritten: Some(r), .. } if r.contains(&rel));
                        written.push(rel);
                        if let Some((target, file, fsync)) = out {
                            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))
                                .map_err(io_ctx(format!("chmod {}", target.display())))?;
                            // A file several members of a chain write gets its time once they all did.
                            if !is_shared {
                                let mtime = std::time::UNIX_EPOCH + Duration::from_secs(want.mtime.max(0) as u64);
                                let _ = file.set_modified(mtime);
                            }
                            // Flushed by the syncer's threads while extraction goes on.
                            if !later && fsync.send((target, file)).is_err() {
                                return Err(BackupError::Invalid("the fsync threads stopped".into()));
                            }
                        }
                    }
                    (other, _) => return Err(corrupt(format!("unexpected tar entry type {other:?}"))),
                }
            }
        }
        std::io::copy(&mut counting, &mut std::io::sink()).map_err(|e| corrupt(e.to_string()))?;
        Ok((counting.count, counting.hash.map(|h| <[u8; 32]>::from(sha2::Digest::finalize(h)))))
    });
    // A payload that could not be opened (no identity, not a recipient) is that, not a corrupt tar.
    if let Some(e) = opening.lock().unwrap().take() {
        return Err(refused(e));
    }
    let n = n?;
    let (n, sum) = n;
    let (tn, tsum) = payload.trailer().map_err(|e| corrupt(e.to_string()))?;
    if n != tn {
        return Err(corrupt(format!("the part holds {n} bytes of tar, its trailer says {tn}")));
    }
    if let Some(sum) = sum
        && sum != tsum
    {
        return Err(corrupt(format!(
            "checksum mismatch: the stored part is corrupt (expected {}, got {})",
            hex::encode(tsum),
            hex::encode(sum)
        )));
    }
    Ok((written, tn, tsum))
}

/// A chain restored newest member first, so that each block of a file several members write is
/// written once, by the newest member holding it; older members read through what newer ones
/// wrote. Each file is worked on by one thread at a time (a member's part holds it once, and
/// members are restored one after the other).
pub(super) struct ChainWrite {
    /// The files several members write: their size and modification time in the restored backup.
    finals: HashMap<String, (u64, i64)>,
    /// The blocks of each such file written so far.
    written: std::sync::Mutex<HashMap<String, Vec<u64>>>,
    /// Whether the cluster's pages carry checksums (from the newest member's `pg_control`,
    /// read once that member is restored): then every page an older member writes is checked.
    page_checksums: std::sync::atomic::AtomicBool,
}

/// One file of a [`ChainWrite`], while a member writes it.
pub(super) struct SharedFile {
    size: u64,
    written: Vec<u64>,
    first: bool,
    /// The relation's number of the file's first block, when each page written is checked.
    check_from: Option<u32>,
}

impl ChainWrite {
    fn take(&self, rel: &str) -> Option<SharedFile> {
        let &(size, _) = self.finals.get(rel)?;
        let taken = self.written.lock().expect("chain bitmap").remove(rel);
        let first = taken.is_none();
        let written = taken.unwrap_or_else(|| vec![0; size.div_ceil(BLCKSZ).div_ceil(64) as usize]);
        // An older member's pages (the newest member writes each file first) are checked: a
        // block an older member writes did not change from that member's start to the newest
        // one's (else a newer member would hold it), so it was not being written while it was
        // read and its checksum must hold; a page the newest member read while PostgreSQL
        // wrote it may be torn, which replay repairs, so the newest member's are not checked.
        let check_from = (!first && self.page_checksums.load(Ordering::Relaxed))
            .then(|| walnut_pg::relpath::parse_relpath(rel))
            .flatten()
            .map(|r| r.segno.wrapping_mul(walnut_pg::page::RELSEG_SIZE));
        Some(SharedFile { size, written, first, check_from })
    }

    fn put(&self, rel: &str, f: SharedFile) {
        self.written.lock().expect("chain bitmap").insert(rel.to_string(), f.written);
    }
}

/// Blocks read at once by [`SharedFile::write`]: runs of them are written in one call.
const BATCH_BLOCKS: usize = 128;

impl SharedFile {
    /// Writes what this member holds of the file (its blocks `stored`, or the whole file of
    /// `len` bytes) at the blocks no newer member wrote, within the restored size. Data is
    /// read [`BATCH_BLOCKS`] blocks at a time, and each run of consecutive blocks to write is
    /// written in one call (a whole file that no newer member touched: one call per batch).
    fn write(
        &mut self,
        data: &mut impl Read,
        file: &std::fs::File,
        stored: Option<&FileBlocks>,
        len: u64,
    ) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        if self.first {
            file.set_len(self.size)?;
        }
        let mut blocks: Box<dyn Iterator<Item = u64>> = match stored {
            Some(b) => Box::new(b.stored.iter().map(u64::from)),
            None => Box::new(0..len.div_ceil(BLCKSZ)),
        };
        let block_len = |at: u64| if stored.is_some() { BLCKSZ } else { BLCKSZ.min(len - at) } as usize;
        let mut buf = vec![0u8; BATCH_BLOCKS * BLCKSZ as usize];
        let mut batch: Vec<u64> = Vec::with_capacity(BATCH_BLOCKS);
        loop {
            batch.clear();
            batch.extend(blocks.by_ref().take(BATCH_BLOCKS));
            if batch.is_empty() {
                break;
            }
            let total: usize = batch.iter().map(|b| block_len(b * BLCKSZ)).sum();
            data.read_exact(&mut buf[..total])?;
            // The run to write: (offset in buf, offset in the file, bytes).
            let mut run: Option<(usize, u64, usize)> = None;
            let mut off = 0;
            for &b in &batch {
                let at = b * BLCKSZ;
                let n = block_len(at);
                let (word, bit) = ((b / 64) as usize, 1u64 << (b % 64));
                if at < self.size && self.written.get(word).is_some_and(|w| w & bit == 0) {
                    self.check_page(&buf[off..off + n], b)?;
                    self.written[word] |= bit;
                    let w = n.min((self.size - at) as usize);
                    run = match run {
                        Some((o, a, l)) if o + l == off && a + l as u64 == at => Some((o, a, l + w)),
                        other => {
                            if let Some((o, a, l)) = other {
                                file.write_all_at(&buf[o..o + l], a)?;
                            }
                            Some((off, at, w))
                        }
                    };
                } else if let Some((o, a, l)) = run.take() {
                    file.write_all_at(&buf[o..o + l], a)?;
                }
                off += n;
            }
            if let Some((o, a, l)) = run {
                file.write_all_at(&buf[o..o + l], a)?;
            }
        }
        if data.read(&mut buf[..1])? != 0 {
            return Err(std::io::Error::other("more data than the manifest names"));
        }
        Ok(())
    }

    /// Checks `page`, block `b` of this file, against its PostgreSQL checksum when asked to.
    fn check_page(&self, page: &[u8], b: u64) -> std::io::Result<()> {
        let (Some(from), Ok(page)) = (self.check_from, <&[u8; BLCKSZ as usize]>::try_from(page)) else {
            return Ok(());
        };
        let blkno = from.wrapping_add(b as u32);
        match walnut_pg::page::verify(page, blkno) {
            walnut_pg::page::PageCheck::Mismatch { stored, computed } => Err(std::io::Error::other(format!(
                "block {b} (block {blkno} of its relation) fails its page checksum (stored {stored}, computed \
                 {computed}): the page was damaged before this backup stored it"
            ))),
            _ => Ok(()),
        }
    }
}

/// Writes the blocks of an incremental backup's file (`blocks.stored`, in order, from `data`)
/// over `file` at their places, then gives the file its length at that backup.
fn write_blocks(data: &mut impl Read, file: &std::fs::File, blocks: &FileBlocks, size: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; BLCKSZ as usize];
    for b in blocks.stored.iter() {
        data.read_exact(&mut buf)?;
        file.write_all_at(&buf, b as u64 * BLCKSZ)?;
    }
    // Anything after the last block would be a tar entry longer than the blocks it names.
    if data.read(&mut buf[..1])? != 0 {
        return Err(std::io::Error::other("more data than the blocks the manifest names"));
    }
    file.set_len(size)
}

/// Downloads part `key` and hands it, as a blocking reader, to `use_it` on a blocking thread.
/// A download that failed is reported as the storage error it is, whatever `use_it` made of
/// the truncated stream.
pub(crate) async fn read_part<T: Send + 'static>(
    repo: &Repository,
    key: &str,
    use_it: impl FnOnce(ChannelReader) -> Result<T, BackupError> + Send + 'static,
) -> Result<T, BackupError> {
    let mut stream = repo.store().get_stream(key).await?;
    let (tx, rx) = mpsc::channel(4);
    let forward = tokio::spawn(async move {
        while let Some(chunk) = stream.next().await {
            let stop = chunk.is_err();
            if tx.send(chunk).await.is_err() || stop {
                break;
            }
        }
    });
    let failed = std::sync::Arc::new(std::sync::Mutex::new(None));
    let reader = ChannelReader { rx, cur: Bytes::new(), failed: failed.clone() };
    let r = tokio::task::spawn_blocking(move || use_it(reader)).await.expect("part reader panicked");
    forward.abort();
    let failed = failed.lock().unwrap().take();
    match (r, failed) {
        (Err(_), Some(e)) => Err(BackupError::Storage(e)),
        (r, _) => r,
    }
}

/// Reads part `part` of a backup whose files are `expected` and checks it without writing
/// anything: its content against its trailer and the manifest's checksum, and with `files`
/// every file in it against the manifest. Returns the paths of the files it holds (`files`
/// only).
pub async fn check_part(
    repo: &Repository,
    key: &str,
    want: Option<(u64, String)>,
    expected: Arc<HashMap<String, FileEntry>>,
    files: bool,
    progress: Arc<Progress>,
) -> Result<Vec<String>, BackupError> {
    let (k, keys) = (key.to_string(), repo.keys().cloned());
    read_part(repo, key, move |reader| {
        let key = k;
        let (held, len, sum) =
            extract_part(&key, reader, &expected, &progress, PartUse::Check { files }, keys.as_deref())?;
        let Some((want_len, want_sum)) = want else { return Ok(held) };
        if len != want_len || hex::encode(sum) != want_sum {
            return Err(BackupError::Corrupt {
                key,
                reason: format!(
                    "the part holds {len} bytes with SHA-256 {}, the manifest says {want_len} bytes with {want_sum}",
                    hex::encode(sum)
                ),
            });
        }
        Ok(held)
    })
    .await
}

/// Restores the parts of one backup (of a chain: only the files in `only`) below `dest`.
#[allow(clippy::too_many_arguments)]
async fn fetch_stage(
    repo: &Repository,
    manifest: &Manifest,
    dest: &Path,
    only: Option<std::collections::HashSet<String>>,
    rewritten: std::collections::HashSet<String>,
    shared: Option<Arc<ChainWrite>>,
    fsync: &std::sync::mpsc::SyncSender<(PathBuf, std::fs::File)>,
    parallel: usize,
    progress: &Arc<Progress>,
) -> Result<Vec<String>, BackupError> {
    let expected: Arc<HashMap<String, FileEntry>> =
        Arc::new(manifest.files.iter().map(|f| (f.path.clone(), f.clone())).collect());
    // The parts that hold a file wanted from this backup.
    let parts: Vec<PartEntry> = match &only {
        None => manifest.parts.clone(),
        Some(only) => {
            let wanted: std::collections::HashSet<&str> =
                manifest.files.iter().filter(|f| only.contains(&f.path)).map(|f| f.part.as_str()).collect();
            manifest.parts.iter().filter(|p| wanted.contains(p.key.as_str())).cloned().collect()
        }
    };
    let only = only.map(Arc::new);
    let rewritten = Arc::new(rewritten);
    let results: Vec<Result<Vec<String>, BackupError>> = futures::stream::iter(parts)
        .map(|part| {
            let (repo, expected, progress, dest) =
                (repo.clone(), expected.clone(), progress.clone(), dest.to_path_buf());
            let (fsync, only, rewritten, shared) = (fsync.clone(), only.clone(), rewritten.clone(), shared.clone());
            async move {
                let (key, keys) = (part.key.clone(), repo.keys().cloned());
                let r = read_part(&repo, &part.key, move |reader| {
                    let rewritten = (!rewritten.is_empty()).then_some(&*rewritten);
                    let usage = PartUse::Extract {
                        dest: &dest,
                        fsync: &fsync,
                        only: only.as_deref(),
                        rewritten,
                        chain: shared.as_deref(),
                    };
                    extract_part(&key, reader, &expected, &progress, usage, keys.as_deref()).map(|(files, _, _)| files)
                })
                .await;
                walnut_storage::crashpoint::hit("backup-fetch:after-a-part");
                r
            }
        })
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    let mut written = Vec::new();
    for r in results {
        written.extend(r?);
    }
    Ok(written)
}

/// The manifests of an incremental backup's chain, oldest (its full backup) first, the backup
/// itself last; each member must be there, DONE, and of the same cluster.
pub async fn load_chain(repo: &Repository, manifest: &Manifest) -> Result<Vec<Manifest>, BackupError> {
    let mut chain = vec![manifest.clone()];
    let mut next = manifest.parent.clone();
    while let Some(parent) = next {
        if chain.len() > 10_000 || chain.iter().any(|m| m.id == parent) {
            return Err(BackupError::Invalid(format!("backup {}: its chain loops at {parent}", manifest.id)));
        }
        let m = load_manifest(repo, &parent).await.map_err(|e| {
            BackupError::Invalid(format!(
                "backup {} is incremental and needs backup {parent} (in its chain), which cannot be read: {e}",
                manifest.id
            ))
        })?;
        if m.system_identifier != manifest.system_identifier {
            return Err(BackupError::Invalid(format!(
                "backup {}: its parent {parent} is of another cluster (system identifier {})",
                manifest.id, m.system_identifier
            )));
        }
        next = m.parent.clone();
        chain.push(m);
    }
    chain.reverse();
    let ids: Vec<&BackupId> = chain[..chain.len() - 1].iter().map(|m| &m.id).collect();
    if !manifest.chain.is_empty() && manifest.chain.iter().collect::<Vec<_>>() != ids {
        return Err(BackupError::Invalid(format!(
            "backup {}: its manifest names the chain {:?}, its parents lead through {ids:?}",
            manifest.id, manifest.chain
        )));
    }
    Ok(chain)
}

/// What to restore from each backup of a chain (oldest first): `None` for everything (a lone
/// full backup), else the paths of the last member's files that this member contributes: the
/// newest whole copy of each file and every later member's blocks of it.
pub fn chain_stages(chain: &[Manifest]) -> Result<Vec<Option<std::collections::HashSet<String>>>, BackupError> {
    let Some(target) = chain.last() else { return Ok(vec![]) };
    if chain.len() == 1 {
        return Ok(vec![None]);
    }
    let by_path: Vec<HashMap<&str, &FileEntry>> =
        chain.iter().map(|m| m.files.iter().map(|f| (f.path.as_str(), f)).collect()).collect();
    let mut stages: Vec<std::collections::HashSet<String>> = vec![Default::default(); chain.len()];
    for f in &target.files {
        let mut k = chain.len() - 1;
        loop {
            let Some(e) = by_path[k].get(f.path.as_str()) else {
                return Err(BackupError::Invalid(format!(
                    "backup {} stores {} as blocks over backup {}, which does not hold it: the chain is inconsistent",
                    chain[k + 1].id,
                    f.path,
                    chain[k].id
                )));
            };
            stages[k].insert(f.path.clone());
            if e.blocks.is_none() {
                break;
            }
            if k == 0 {
                return Err(BackupError::Invalid(format!(
                    "backup {} (the chain's first) stores {} as blocks: a chain begins with a full backup",
                    chain[0].id, f.path
                )));
            }
            k -= 1;
        }
    }
    Ok(stages.into_iter().map(Some).collect())
}

/// Downloads and extracts a backup into `dest` (which must exist and be empty), in parallel,
/// verifying everything; then writes `backup_label` (and `tablespace_map` when the tablespaces
/// are not restored in place) and the directories PostgreSQL needs.
pub async fn fetch(
    repo: &Repository,
    manifest: &Manifest,
    dest: &Path,
    tablespace_dirs: &HashMap<String, PathBuf>,
    parallel: usize,
    progress: Arc<Progress>,
) -> Result<(), BackupError> {
    progress.total.store(manifest.data_bytes, Ordering::Relaxed);
    // Tablespaces: DEST/pg_tblspc/<oid> is a symlink to the tablespace's directory (created
    // here), so their files extract through it, as PostgreSQL expects them.
    if !manifest.tablespaces.is_empty() {
        use std::os::unix::fs::PermissionsExt;
        let links = dest.join("pg_tblspc");
        std::fs::create_dir_all(&links).map_err(io_ctx(format!("create {}", links.display())))?;
        for t in &manifest.tablespaces {
            let dir = tablespace_dirs.get(&t.oid).ok_or_else(|| {
                BackupError::Invalid(format!("no directory given for tablespace {} (oid {})", t.display_name(), t.oid))
            })?;
            std::fs::create_dir_all(dir).map_err(io_ctx(format!("create {}", dir.display())))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_ctx(format!("chmod {}", dir.display())))?;
            std::os::unix::fs::symlink(dir, links.join(&t.oid)).map_err(io_ctx(format!(
                "link pg_tblspc/{} to {}",
                t.oid,
                dir.display()
            )))?;
        }
    }
    // An incremental backup is rebuilt from its chain, oldest first: each file from the newest
    // backup that holds it whole, then the blocks of every later one written over it.
    let chain = if manifest.is_incremental() { load_chain(repo, manifest).await? } else { vec![manifest.clone()] };
    let stages = chain_stages(&chain)?;
    if chain.len() > 1 {
        let total: u64 = chain
            .iter()
            .zip(&stages)
            .flat_map(|(m, only)| m.files.iter().filter(move |f| only.as_ref().is_none_or(|o| o.contains(&f.path))))
            .map(|f| f.stored_len())
            .sum();
        progress.total.store(total, Ordering::Relaxed);
    }
    let syncer = Syncer::start(4);
    let fsync = syncer.sender();
    let mut seen = std::collections::HashSet::new();
    let mut failed = None;
    // Members are restored newest first: a block is written once, by the newest member that
    // holds it. What a member writes that an older one writes again is fsynced by the older.
    let mut rewritten: Vec<std::collections::HashSet<String>> = vec![Default::default(); stages.len()];
    let mut older: std::collections::HashSet<String> = Default::default();
    let mut writers: HashMap<&str, usize> = HashMap::new();
    for (k, only) in stages.iter().enumerate() {
        rewritten[k] = older.clone();
        older.extend(only.iter().flatten().cloned());
        for p in only.iter().flatten() {
            *writers.entry(p.as_str()).or_default() += 1;
        }
    }
    let shared = ChainWrite {
        finals: manifest
            .files
            .iter()
            .filter(|f| writers.get(f.path.as_str()).is_some_and(|n| *n > 1))
            .map(|f| (f.path.clone(), (f.size, f.mtime)))
            .collect(),
        written: Default::default(),
        page_checksums: Default::default(),
    };
    let shared = (chain.len() > 1).then_some(Arc::new(shared));
    for ((member, only), rewritten) in chain.iter().zip(stages).zip(rewritten).rev() {
        if only.as_ref().is_some_and(|o| o.is_empty()) {
            continue;
        }
        match fetch_stage(repo, member, dest, only, rewritten, shared.clone(), &fsync, parallel, &progress).await {
            Ok(files) => {
                seen.extend(files);
                // The newest member (restored first) holds pg_control: whether pages carry checksums.
                if let Some(shared) = &shared
                    && member.id == manifest.id
                {
                    let control = std::fs::read(dest.join("global/pg_control")).ok();
                    let on = control
                        .and_then(|b| walnut_pg::control::ControlFile::parse(&b).ok())
                        .is_some_and(|c| c.data_checksum_version != 0);
                    shared.page_checksums.store(on, Ordering::Relaxed);
                }
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    drop(fsync);
    let synced = crate::repo::cpu(move || syncer.finish()).await;
    if let Some(e) = failed {
        return Err(e);
    }
    if let Some(shared) = &shared {
        for (path, (_, mtime)) in &shared.finals {
            let target = dest.join(path);
            if let Ok(f) = std::fs::OpenOptions::new().write(true).open(&target) {
                let _ = f.set_modified(std::time::UNIX_EPOCH + Duration::from_secs((*mtime).max(0) as u64));
            }
        }
    }
    synced.map_err(io_ctx(format!("fsync the files restored into {}", dest.display())))?;
    if let Some(missing) = manifest.files.iter().find(|f| !seen.contains(&f.path)) {
        return Err(BackupError::Corrupt { key: missing.part.clone(), reason: format!("{} is missing", missing.path) });
    }
    for d in ["pg_wal", "pg_wal/archive_status"] {
        let p = dest.join(d);
        std::fs::create_dir_all(&p).map_err(io_ctx(format!("create {}", p.display())))?;
    }
    // Durable before anything else is written: the files are synced (above), now every directory.
    let root = dest.to_path_buf();
    let files: Vec<String> = manifest.files.iter().map(|f| f.path.clone()).collect();
    crate::repo::cpu(move || sync_dirs(&root, &files))
        .await
        .map_err(io_ctx(format!("fsync the files restored into {}", dest.display())))?;

    crate::wal::write_durably(&dest.join("backup_label"), &Bytes::from(manifest.backup_label.clone()))
        .await
        .map_err(|e| BackupError::Invalid(e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(of: &[u8], n: u64) -> Vec<u8> {
        of.iter().flat_map(|&c| std::iter::repeat_n(c, BLCKSZ as usize)).take((n * BLCKSZ) as usize).collect()
    }

    /// Members written newest first: each block from the newest member holding it, runs of
    /// blocks written together, the file cut to its restored size (a whole copy longer than it,
    /// a last block shorter than a page).
    #[test]
    fn a_chain_writes_each_block_once_from_the_newest_member() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        let size = 300 * BLCKSZ - 100;
        let chain = ChainWrite {
            finals: [("base/1/16384".to_string(), (size, 0))].into(),
            written: Default::default(),
            page_checksums: Default::default(),
        };
        let rel = "base/1/16384";
        // The newest member: blocks 1-2, 5 and 200-259 (more than a batch apart).
        let newest: Vec<u32> = [1, 2, 5].into_iter().chain(200..260).collect();
        let stored = FileBlocks { limit: 400, stored: BlockRanges::from_sorted(newest.iter().copied()) };
        let data: Vec<u8> = newest.iter().flat_map(|_| blocks(b"N", 1)).collect();
        let mut f = chain.take(rel).unwrap();
        f.write(&mut &data[..], &file, Some(&stored), 0).unwrap();
        chain.put(rel, f);
        // A middle member: blocks 2-3 (2 is the newest's).
        let stored = FileBlocks { limit: 400, stored: BlockRanges::from_sorted([2, 3]) };
        let mut f = chain.take(rel).unwrap();
        f.write(&mut &blocks(b"MM", 2)[..], &file, Some(&stored), 0).unwrap();
        chain.put(rel, f);
        // The oldest: the whole file, longer than the restored size, its last block short.
        let len = 320 * BLCKSZ - 10;
        let whole: Vec<u8> = (0..len).map(|i| b'a' + (i / BLCKSZ % 26) as u8).collect();
        let mut f = chain.take(rel).unwrap();
        f.write(&mut &whole[..], &file, None, len).unwrap();
        chain.put(rel, f);
        // More data than named is refused (block 7, written already, is not written again).
        let mut f = chain.take(rel).unwrap();
        let stored = FileBlocks { limit: 400, stored: BlockRanges::from_sorted([7]) };
        assert!(f.write(&mut &blocks(b"XX", 2)[..], &file, Some(&stored), 0).is_err());
        let got = std::fs::read(&path).unwrap();
        assert_eq!(got.len() as u64, size);
        for b in 0..300u64 {
            let want = if [1, 2, 5].contains(&b) || (200..260).contains(&b) {
                b'N'
            } else if b == 3 {
                b'M'
            } else {
                b'a' + (b % 26) as u8
            };
            let page = &got[(b * BLCKSZ) as usize..((b + 1) * BLCKSZ).min(size) as usize];
            assert!(page.iter().all(|&c| c == want), "block {b}: want {:?}, got {:?}", want as char, page[0] as char);
        }
    }
}
