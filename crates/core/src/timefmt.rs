//! How walnut writes times into stored JSON: RFC 3339 in UTC with microseconds
//! (`2026-01-01T12:00:00.123456Z`), for `#[serde(with = "crate::timefmt")]` fields. Reading
//! accepts any RFC 3339 time.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serializer};

pub fn serialize<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Micros, true))
}

/// `t` as it reads back once stored (microseconds): for a value kept in memory beside the stored
/// one, so that the two compare equal.
pub fn as_stored(t: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::SubsecRound;
    t.trunc_subsecs(6)
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    let text = String::deserialize(d)?;
    DateTime::parse_from_rfc3339(&text).map(|t| t.with_timezone(&Utc)).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct T {
        #[serde(with = "super")]
        at: chrono::DateTime<chrono::Utc>,
    }

    #[test]
    fn round_trips_byte_identical() {
        let text = r#"{"at":"2026-01-01T12:00:00.123456Z"}"#;
        let t: T = serde_json::from_str(text).unwrap();
        assert_eq!(serde_json::to_string(&t).unwrap(), text);
        assert!(serde_json::from_str::<T>(r#"{"at":"yesterday"}"#).is_err());
    }

    #[test]
    fn as_stored_is_what_reads_back() {
        let at = chrono::DateTime::from_timestamp(1_790_000_000, 123_456_789).unwrap();
        let back: T = serde_json::from_str(&serde_json::to_string(&T { at }).unwrap()).unwrap();
        assert_ne!(back.at, at);
        assert_eq!(back.at, super::as_stored(at));
    }
}
