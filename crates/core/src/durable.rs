//! Durable local files: the one way walnut writes a small file it must not lose or leave torn
//! (a fetched WAL file handed to PostgreSQL, recovery configuration, signal files, state records,
//! the agent's settings). Write a uniquely named temporary file beside the target, fsync it,
//! rename it over the target, fsync the directory. On any failure the target is untouched (or
//! absent) and the temporary file is removed.
//!
//! [`write_unsynced`] is the same without the two fsyncs: a reader sees the old file or the whole
//! new one, but a crash may lose it. Only for files whose loss is detected or harmless: the
//! prefetch spool (each file checked against its CRC-32C before it is handed out) and a WAL file
//! handed to PostgreSQL's recovery (it fsyncs what it keeps: `durable_rename` into pg_wal).

use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `data` to `path` durably (see the module docs). Blocking: call it from a blocking
/// thread in async code ([`write_async`]).
pub fn write(path: &Path, data: &[u8]) -> std::io::Result<()> {
    replace(path, data, true)
}

/// [`write`] without fsyncs (see the module docs).
pub fn write_unsynced(path: &Path, data: &[u8]) -> std::io::Result<()> {
    replace(path, data, false)
}

fn replace(path: &Path, data: &[u8], sync: bool) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.walnut-tmp.{}.{:08x}", std::process::id(), rand::random::<u32>()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        if sync {
            f.sync_all()?;
        }
        drop(f);
        std::fs::rename(&tmp, path)?;
        if sync { std::fs::File::open(&dir)?.sync_all() } else { Ok(()) }
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// [`write`] (or, with `sync` false, [`write_unsynced`]) on a blocking thread.
pub async fn write_async(path: PathBuf, data: bytes::Bytes, sync: bool) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || replace(&path, &data, sync))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(format!("durable write task: {e}"))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_and_leaves_no_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f.conf");
        write(&p, b"one").unwrap();
        write_unsynced(&p, b"two, longer").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two, longer");
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["f.conf"]);
        // A target in a missing directory fails and leaves nothing behind.
        assert!(write(&d.path().join("missing/f"), b"x").is_err());
    }
}
