//! Durable local files: the one way walnut writes a small file it must not lose or leave torn
//! (a fetched WAL file handed to PostgreSQL, recovery configuration, signal files, state records,
//! the agent's settings). Write a uniquely named temporary file beside the target, fsync it,
//! rename it over the target, fsync the directory. On any failure the target is untouched (or
//! absent) and the temporary file is removed.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `data` to `path` durably (see the module docs). Blocking: call it from a blocking
/// thread in async code ([`write_async`]).
pub fn write(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.walnut-tmp.{}.{:08x}", std::process::id(), rand::random::<u32>()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// [`write`] on a blocking thread.
pub async fn write_async(path: PathBuf, data: bytes::Bytes) -> std::io::Result<()> {
    tokio::task::spawn_blocking(move || write(&path, &data))
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
        write(&p, b"two, longer").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two, longer");
        let names: Vec<_> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["f.conf"]);
        // A target in a missing directory fails and leaves nothing behind.
        assert!(write(&d.path().join("missing/f"), b"x").is_err());
    }
}
