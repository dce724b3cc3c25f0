//! How long a restore to the latest point would replay WAL: the estimate behind the agent's
//! RTO bound (`[agent] max_replay`), shown by `backup-list --detail`, `/v1/health` and the metrics.
//!
//! A restore replays the WAL from its backup's start, so the estimate is the WAL written since
//! the newest DONE backup began, over a replay rate: the one measured by the last restore
//! that started its server (`restore --start`, a drill) on this host, kept in the state
//! directory, or else [`DEFAULT_RATE`]. A measurement counts only when it replayed at least
//! [`MIN_MEASURED_BYTES`]: a short replay is mostly start-up and would understate the rate.

use crate::state::StateDir;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use walnut_pg::Lsn;

/// The replay rate assumed before one is measured: 32 MiB/s, a conservative figure for a
/// single-threaded replay of a mixed workload fetching its WAL from a repository.
pub const DEFAULT_RATE: f64 = 32.0 * 1024.0 * 1024.0;

/// Replays shorter than this are not taken as a measurement.
pub const MIN_MEASURED_BYTES: u64 = 64 << 20;

const FILE: &str = "replay-rate.json";

/// A measured replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Measured {
    pub bytes: u64,
    pub seconds: f64,
    #[serde(with = "crate::timefmt")]
    pub at: DateTime<Utc>,
}

impl Measured {
    pub fn bytes_per_second(&self) -> f64 {
        self.bytes as f64 / self.seconds.max(0.001)
    }
}

/// Records a replay of `bytes` in `seconds` (ignored when too short to mean anything).
pub fn record(state: &StateDir, bytes: u64, seconds: f64, at: DateTime<Utc>) -> std::io::Result<bool> {
    if bytes < MIN_MEASURED_BYTES || seconds <= 0.0 {
        return Ok(false);
    }
    let m = Measured { bytes, seconds, at };
    state.write_file(FILE, &serde_json::to_vec_pretty(&m).expect("serialisable"))?;
    Ok(true)
}

/// The last measurement recorded in `state`.
pub fn measured(state: &StateDir) -> Option<Measured> {
    serde_json::from_slice(&state.read_file(FILE)?).ok()
}

/// The estimate of a restore to the latest point.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    /// The backup such a restore starts from (the newest DONE one).
    pub backup: String,
    /// WAL from its start to the latest point.
    pub wal_bytes: u64,
    pub bytes_per_second: f64,
    /// Whether the rate was measured here (else [`DEFAULT_RATE`]).
    pub measured: bool,
    pub seconds: f64,
}

/// The estimate for a restore from `backup` (which began at `start`) to `latest`.
pub fn estimate(backup: &str, start: Lsn, latest: Lsn, measured: Option<&Measured>) -> Estimate {
    let wal_bytes = latest.0.saturating_sub(start.0);
    let bytes_per_second = measured.map_or(DEFAULT_RATE, Measured::bytes_per_second);
    Estimate {
        backup: backup.to_string(),
        wal_bytes,
        bytes_per_second,
        measured: measured.is_some(),
        seconds: wal_bytes as f64 / bytes_per_second,
    }
}

/// The end of the archive: where the newest archived segment ends (`None` when empty).
pub async fn archive_end(repo: &crate::Repository) -> Option<Lsn> {
    let size = repo.identity().await.ok()??.seg_size();
    let inv = crate::wal::inventory(repo, false).await.ok()?;
    let last = inv.segments.values().filter_map(|m| m.keys().next_back()).max()?;
    Some(Lsn(size.start_lsn(*last).0 + size.bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_uses_the_measured_rate_else_the_default() {
        let e = estimate("b", Lsn(0x1000000), Lsn(0x1000000 + (64 << 20)), None);
        assert_eq!((e.wal_bytes, e.measured), (64 << 20, false));
        assert!((e.seconds - 2.0).abs() < 1e-9, "{e:?}");
        let m = Measured { bytes: 200 << 20, seconds: 2.0, at: Utc::now() };
        let e = estimate("b", Lsn(0), Lsn(100 << 20), Some(&m));
        assert!(e.measured && (e.seconds - 1.0).abs() < 1e-9, "{e:?}");
        assert_eq!(estimate("b", Lsn(10), Lsn(5), None).wal_bytes, 0, "no negative WAL");
    }

    #[test]
    fn short_replays_are_not_measurements() {
        let dir = tempfile::tempdir().unwrap();
        let id = crate::Identity::new(walnut_pg::SystemId(7), walnut_pg::PgMajor(15), walnut_pg::WalSegSize::DEFAULT);
        let state = StateDir::open(dir.path(), "file:///r", &id).unwrap();
        assert!(!record(&state, 1 << 20, 3.0, Utc::now()).unwrap());
        assert_eq!(measured(&state), None);
        assert!(record(&state, 128 << 20, 4.0, Utc::now()).unwrap());
        assert_eq!(measured(&state).map(|m| m.bytes_per_second()), Some(32.0 * 1024.0 * 1024.0));
    }
}
