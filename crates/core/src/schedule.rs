//! The agent's schedule as a pure function with injected time.
//!
//! Full backups come every `frequency`, anchored to the end of the last *scheduled* backup as
//! recorded in the repository (so a restart keeps the schedule and an on-demand backup never
//! shifts it). A repository with no scheduled backup gets one at once. A failed scheduled
//! backup is retried after a growing delay (1, 2, 4, ... minutes, capped at 30), without moving
//! the anchor; the retry never comes later than the regular deadline would.
//!
//! Time arithmetic saturates: a frequency past the end of chrono's calendar (year 262142) means
//! "at the end of time", never an overflow panic (which would silently stop the scheduler task).
//! The configuration bounds every duration anyway (at most 100 years).

use chrono::{DateTime, Utc};
use std::time::Duration;

/// What the schedule knows.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScheduleState {
    /// End of the newest DONE scheduled backup.
    pub last_scheduled: Option<DateTime<Utc>>,
    /// Consecutive failures of scheduled backups since then, and when the last one failed.
    pub failures: u32,
    pub last_failure: Option<DateTime<Utc>>,
}

pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(30 * 60);

pub fn retry_delay(failures: u32) -> Duration {
    let minutes = 1u64 << failures.saturating_sub(1).min(10);
    Duration::from_secs(minutes * 60).min(MAX_RETRY_DELAY)
}

/// `t + d`, or the last representable instant when that is past the end of the calendar.
pub fn saturating_add(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d).ok().and_then(|d| t.checked_add_signed(d)).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `t - d`, or the first representable instant when that is before the start of the calendar.
pub fn saturating_sub(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d).ok().and_then(|d| t.checked_sub_signed(d)).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// When the next scheduled backup is due.
pub fn next_due(state: &ScheduleState, frequency: Duration, now: DateTime<Utc>) -> DateTime<Utc> {
    let regular = match state.last_scheduled {
        None => now,
        Some(t) => saturating_add(t, frequency),
    };
    match (state.failures, state.last_failure) {
        // After a failure, the retry comes after the growing delay (the anchor does not move).
        (n, Some(f)) if n > 0 => saturating_add(f, retry_delay(n)),
        _ => regular,
    }
}

/// When the next incremental backup is due by `[agent] incremental_frequency`: `frequency` after
/// the start of the newest DONE backup of any type (`state.last_scheduled`), retried after failures
/// like scheduled full backups. `None` without a frequency, or without any backup yet (the full
/// schedule takes the first one).
pub fn next_incremental(
    state: &ScheduleState,
    frequency: Option<Duration>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let frequency = frequency?;
    state.last_scheduled?;
    Some(next_due(state, frequency, now))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: i64, m: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::hours(h) + chrono::Duration::minutes(m)
    }
    const DAY: Duration = Duration::from_secs(86400);

    /// (what, state, frequency, now, expected next deadline)
    type Case = (&'static str, ScheduleState, Duration, DateTime<Utc>, DateTime<Utc>);

    #[test]
    fn incrementals_follow_the_newest_backup_and_back_off() {
        let six = Some(Duration::from_secs(6 * 3600));
        assert_eq!(next_incremental(&ScheduleState::default(), six, at(5, 0)), None, "no backup yet");
        let s = ScheduleState { last_scheduled: Some(at(1, 0)), ..Default::default() };
        assert_eq!(next_incremental(&s, None, at(5, 0)), None, "no frequency");
        assert_eq!(next_incremental(&s, six, at(5, 0)), Some(at(7, 0)));
        let failed = ScheduleState { failures: 2, last_failure: Some(at(7, 0)), ..s };
        assert_eq!(next_incremental(&failed, six, at(7, 1)), Some(at(7, 2)), "retried after 2 minutes");
    }

    #[test]
    fn table() {
        let cases: &[Case] = &[
            ("no scheduled backup yet: now", ScheduleState::default(), DAY, at(5, 0), at(5, 0)),
            (
                "anchored to the last scheduled backup",
                ScheduleState { last_scheduled: Some(at(1, 0)), ..Default::default() },
                DAY,
                at(5, 0),
                at(25, 0),
            ),
            (
                "agent restarted late: due at once (in the past)",
                ScheduleState { last_scheduled: Some(at(1, 0)), ..Default::default() },
                DAY,
                at(30, 0),
                at(25, 0),
            ),
            (
                "first failure retries after a minute",
                ScheduleState { last_scheduled: Some(at(1, 0)), failures: 1, last_failure: Some(at(25, 0)) },
                DAY,
                at(25, 0),
                at(25, 1),
            ),
            (
                "third failure: four minutes",
                ScheduleState { last_scheduled: Some(at(1, 0)), failures: 3, last_failure: Some(at(25, 10)) },
                DAY,
                at(25, 10),
                at(25, 14),
            ),
            (
                "many failures: capped at 30 minutes",
                ScheduleState { last_scheduled: Some(at(1, 0)), failures: 40, last_failure: Some(at(30, 0)) },
                DAY,
                at(30, 0),
                at(30, 30),
            ),
            (
                "frequency changed at runtime: the next decision uses it",
                ScheduleState { last_scheduled: Some(at(1, 0)), ..Default::default() },
                Duration::from_secs(6 * 3600),
                at(2, 0),
                at(7, 0),
            ),
            (
                "failure with no backup ever: retry delay from the failure",
                ScheduleState { last_scheduled: None, failures: 2, last_failure: Some(at(3, 0)) },
                DAY,
                at(3, 0),
                at(3, 2),
            ),
        ];
        for (what, state, freq, now, want) in cases {
            assert_eq!(next_due(state, *freq, *now), *want, "{what}");
        }
    }

    /// A frequency no calendar can hold (from a config or a settings patch that slipped past
    /// validation) means "not in any foreseeable future", never a panic of the scheduler task.
    #[test]
    fn huge_frequencies_saturate() {
        let last = ScheduleState { last_scheduled: Some(at(1, 0)), ..Default::default() };
        for freq in [
            Duration::MAX,
            Duration::from_secs(u64::MAX / 2),
            Duration::from_secs(i64::MAX as u64 / 1000 + 1),
            Duration::from_secs(300_000 * 366 * 86400),
        ] {
            assert_eq!(next_due(&last, freq, at(2, 0)), DateTime::<Utc>::MAX_UTC, "{freq:?}");
        }
        // 100 years (the configuration's limit) is an ordinary date.
        let century = Duration::from_secs(100 * 365 * 86400);
        assert_eq!(next_due(&last, century, at(2, 0)), at(1, 0) + chrono::Duration::days(36500));
        // A failure at the end of time retries at the end of time.
        let late = ScheduleState {
            last_scheduled: Some(DateTime::<Utc>::MAX_UTC),
            failures: 3,
            last_failure: Some(DateTime::<Utc>::MAX_UTC - chrono::Duration::seconds(1)),
        };
        assert_eq!(next_due(&late, Duration::MAX, at(2, 0)), DateTime::<Utc>::MAX_UTC);
    }
}
