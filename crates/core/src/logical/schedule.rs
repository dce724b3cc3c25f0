//! When the agent takes scheduled logical captures (`[logical] schedule`), as pure functions.
//!
//! Forms: `daily HH:MM UTC`, `weekly DAY HH:MM UTC` (DAY: monday..sunday or mon..sun) and
//! `every DURATION` (`every 6h`). Times are UTC: a schedule in another zone is refused rather than
//! guessed (daylight saving would move it twice a year).
//!
//! The anchor is the start of the newest DONE scheduled capture: the next capture is
//! the first occurrence after it, and an occurrence missed while the agent was down is taken
//! once, at once, not once per missed day.

use chrono::{DateTime, Datelike, Duration as ChronoDuration, NaiveTime, Timelike, Utc, Weekday};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    Daily { at: NaiveTime },
    Weekly { day: Weekday, at: NaiveTime },
    Every(Duration),
}

const FORMS: &str =
    "use \"daily HH:MM UTC\", \"weekly DAY HH:MM UTC\" (DAY: monday..sunday) or \"every DURATION\" (e.g. \"every 6h\")";

impl Schedule {
    /// Parses a schedule; `parse_duration` reads the duration of `every` (the config's own).
    pub fn parse(text: &str, parse_duration: impl Fn(&str) -> Result<Duration, String>) -> Result<Schedule, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let bad = |why: &str| format!("invalid schedule {text:?}: {why}; {FORMS}");
        let time_of = |t: &str| -> Result<NaiveTime, String> {
            NaiveTime::parse_from_str(t, "%H:%M")
                .map_err(|_| bad(&format!("{t:?} is not a time HH:MM (00:00 to 23:59)")))
        };
        let zone_ok = |rest: &[&str]| -> Result<(), String> {
            match rest {
                [] => Ok(()),
                [z] if z.eq_ignore_ascii_case("utc") || z.eq_ignore_ascii_case("z") => Ok(()),
                [z] => Err(bad(&format!(
                    "schedules are in UTC, {z:?} is not supported: convert the time to UTC and write UTC"
                ))),
                _ => Err(bad("too many words")),
            }
        };
        match words.as_slice() {
            [kind, t, rest @ ..] if kind.eq_ignore_ascii_case("daily") => {
                let at = time_of(t)?;
                zone_ok(rest)?;
                Ok(Schedule::Daily { at })
            }
            [kind, day, t, rest @ ..] if kind.eq_ignore_ascii_case("weekly") => {
                let day: Weekday = day.parse().map_err(|_| bad(&format!("{day:?} is not a day of the week")))?;
                let at = time_of(t)?;
                zone_ok(rest)?;
                Ok(Schedule::Weekly { day, at })
            }
            [kind, d] if kind.eq_ignore_ascii_case("every") => {
                let d = parse_duration(d).map_err(|e| bad(&e))?;
                if d < Duration::from_secs(1) {
                    return Err(bad("the interval must be at least 1s"));
                }
                Ok(Schedule::Every(d))
            }
            _ => Err(bad("unknown form")),
        }
    }

    /// The first occurrence strictly after `t`.
    pub fn after(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        match *self {
            Schedule::Every(d) => t + ChronoDuration::from_std(d).unwrap_or(ChronoDuration::MAX),
            Schedule::Daily { at } => {
                let today = t.date_naive().and_time(at).and_utc();
                if today > t { today } else { today + ChronoDuration::days(1) }
            }
            Schedule::Weekly { day, at } => {
                let ahead = (7 + day.num_days_from_monday() as i64 - t.weekday().num_days_from_monday() as i64) % 7;
                let candidate = (t.date_naive() + ChronoDuration::days(ahead)).and_time(at).and_utc();
                if candidate > t { candidate } else { candidate + ChronoDuration::days(7) }
            }
        }
    }

    /// When the next scheduled capture is due: the first occurrence after the newest scheduled
    /// capture's start (`last`), or now if that occurrence has passed (taken once, late); with
    /// no scheduled capture yet, the first occurrence after now.
    pub fn next_due(&self, last: Option<DateTime<Utc>>, now: DateTime<Utc>) -> DateTime<Utc> {
        match last {
            // A clock set back (or a capture stamped in the future): no burst, the next occurrence.
            Some(l) if l > now => self.after(now),
            Some(l) => self.after(l).max(now),
            None => self.after(now),
        }
    }
}

impl std::fmt::Display for Schedule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Schedule::Daily { at } => write!(f, "daily {:02}:{:02} UTC", at.hour(), at.minute()),
            Schedule::Weekly { day, at } => write!(f, "weekly {day} {:02}:{:02} UTC", at.hour(), at.minute()),
            Schedule::Every(d) => write!(f, "every {}s", d.as_secs()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().into()
    }

    fn dur(s: &str) -> Result<Duration, String> {
        match s.strip_suffix('h') {
            Some(h) => h.parse::<u64>().map(|h| Duration::from_secs(h * 3600)).map_err(|e| e.to_string()),
            None => s.strip_suffix('s').unwrap_or(s).parse().map(Duration::from_secs).map_err(|e| e.to_string()),
        }
    }

    #[test]
    fn parses_the_forms_and_names_what_is_wrong() {
        let at = NaiveTime::from_hms_opt(2, 0, 0).unwrap();
        assert_eq!(Schedule::parse("daily 02:00 UTC", dur).unwrap(), Schedule::Daily { at });
        assert_eq!(Schedule::parse("  Daily 02:00 ", dur).unwrap(), Schedule::Daily { at });
        assert_eq!(Schedule::parse("weekly sun 02:00 UTC", dur).unwrap(), Schedule::Weekly { day: Weekday::Sun, at });
        assert_eq!(Schedule::parse("weekly Sunday 02:00", dur).unwrap(), Schedule::Weekly { day: Weekday::Sun, at });
        assert_eq!(Schedule::parse("every 6h", dur).unwrap(), Schedule::Every(Duration::from_secs(6 * 3600)));
        for (bad, names) in [
            ("daily 2am", "is not a time"),
            ("daily 24:00 UTC", "is not a time"),
            ("daily 02:00 CET", "UTC"),
            ("weekly funday 02:00", "day of the week"),
            ("every 0s", "at least 1s"),
            ("every x", "invalid digit"),
            ("hourly", "unknown form"),
            ("", "unknown form"),
            ("daily 02:00 UTC extra", "too many words"),
        ] {
            let e = Schedule::parse(bad, dur).unwrap_err();
            assert!(e.contains(names) && e.contains("daily HH:MM UTC"), "{bad}: {e}");
        }
        assert_eq!(Schedule::parse("weekly mon 23:59", dur).unwrap().to_string(), "weekly Mon 23:59 UTC");
    }

    #[test]
    fn occurrences() {
        let daily = Schedule::parse("daily 02:00 UTC", dur).unwrap();
        assert_eq!(daily.after(t("2026-03-01T01:59:59Z")), t("2026-03-01T02:00:00Z"));
        assert_eq!(daily.after(t("2026-03-01T02:00:00Z")), t("2026-03-02T02:00:00Z"));
        assert_eq!(daily.after(t("2026-12-31T23:00:00Z")), t("2027-01-01T02:00:00Z"));
        // 2026-03-04 is a Wednesday.
        let weekly = Schedule::parse("weekly wed 02:00", dur).unwrap();
        assert_eq!(weekly.after(t("2026-03-04T01:00:00Z")), t("2026-03-04T02:00:00Z"));
        assert_eq!(weekly.after(t("2026-03-04T02:00:00Z")), t("2026-03-11T02:00:00Z"));
        assert_eq!(weekly.after(t("2026-03-05T00:00:00Z")), t("2026-03-11T02:00:00Z"));
        let every = Schedule::parse("every 6h", dur).unwrap();
        assert_eq!(every.after(t("2026-03-01T01:00:00Z")), t("2026-03-01T07:00:00Z"));
    }

    #[test]
    fn missed_occurrences_are_taken_once_and_the_first_waits_for_its_time() {
        let daily = Schedule::parse("daily 02:00 UTC", dur).unwrap();
        let now = t("2026-03-05T10:00:00Z");
        // No capture yet: the next 02:00, not at once.
        assert_eq!(daily.next_due(None, now), t("2026-03-06T02:00:00Z"));
        // Today's taken at 02:00:03: tomorrow's.
        assert_eq!(daily.next_due(Some(t("2026-03-05T02:00:03Z")), now), t("2026-03-06T02:00:00Z"));
        // The agent was down for three days: one capture now, then back on the schedule.
        assert_eq!(daily.next_due(Some(t("2026-03-02T02:00:00Z")), now), now);
        let after_catch_up = t("2026-03-05T10:05:00Z");
        assert_eq!(daily.next_due(Some(now), after_catch_up), t("2026-03-06T02:00:00Z"));
        // A capture stamped in the future (clock set back): no burst.
        assert_eq!(daily.next_due(Some(t("2026-03-09T02:00:00Z")), now), t("2026-03-06T02:00:00Z"));
    }
}
