//! The recovery configuration a restore writes into DEST: a pure function of the plan (what was
//! checked: backup, target, timeline) and the operator's options. Nothing here reads a raw CLI
//! string: the timeline written is the one the plan checked.

use super::RestoreError;
use crate::plan::{Plan, RecoveryTarget};
use std::path::Path;

/// What the server does once it reaches the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetAction {
    Promote,
    Pause,
    Shutdown,
}

impl TargetAction {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetAction::Promote => "promote",
            TargetAction::Pause => "pause",
            TargetAction::Shutdown => "shutdown",
        }
    }
}

impl std::str::FromStr for TargetAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "promote" => Ok(TargetAction::Promote),
            "pause" => Ok(TargetAction::Pause),
            "shutdown" => Ok(TargetAction::Shutdown),
            other => Err(format!("--target-action must be promote, pause or shutdown, got {other:?}")),
        }
    }
}

/// The operator's choices that shape the configuration (besides the plan).
#[derive(Debug, Clone)]
pub struct RecoveryOptions {
    /// The walnut command line that `restore_command` (and with `archive`, `archive_command`)
    /// runs, before its subcommand, already quoted for the shell.
    pub walnut: String,
    /// Stop just before the target instead of just after it.
    pub exclusive: bool,
    pub action: TargetAction,
    /// A follower: `standby.signal`, no target, keeps following the archive and new timelines.
    pub standby: bool,
    /// Keep archiving (on the new timeline) to the same repository.
    pub archive: bool,
    pub port: Option<u16>,
}

/// Every line walnut adds to `postgresql.auto.conf`, and the signal file it creates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryConf {
    /// `(setting, value as written)`, values quoted for postgresql.conf where needed.
    pub settings: Vec<(String, String)>,
    /// `recovery.signal` or `standby.signal`.
    pub signal: &'static str,
    /// A comment line saying what the restore was.
    pub comment: String,
}

/// A postgresql.conf string literal.
fn quote(v: &str) -> String {
    format!("'{}'", v.replace('\'', "''"))
}

impl RecoveryConf {
    /// Decides every line (see the module docs).
    pub fn from_plan(p: &Plan, o: &RecoveryOptions) -> RecoveryConf {
        let mut s: Vec<(String, String)> =
            vec![("restore_command".into(), quote(&format!("{} wal-fetch %f %p", o.walnut)))];
        match &p.recovery_target {
            RecoveryTarget::EndOfArchive => {}
            RecoveryTarget::Time(t) => {
                s.push(("recovery_target_time".into(), quote(&t.format("%Y-%m-%d %H:%M:%S%.6f+00").to_string())))
            }
            RecoveryTarget::Name(n) => s.push(("recovery_target_name".into(), quote(n))),
            RecoveryTarget::Lsn(l) | RecoveryTarget::PinnedEnd(l) => {
                s.push(("recovery_target_lsn".into(), quote(&l.to_string())))
            }
            RecoveryTarget::Xid(x) => s.push(("recovery_target_xid".into(), quote(&x.to_string()))),
            RecoveryTarget::Immediate => s.push(("recovery_target".into(), quote("immediate"))),
        }
        if !o.standby && p.recovery_target != RecoveryTarget::EndOfArchive {
            s.push(("recovery_target_action".into(), quote(o.action.as_str())));
            // The pinned end includes its last record: --exclusive is about the user's target.
            if o.exclusive && !matches!(p.recovery_target, RecoveryTarget::PinnedEnd(_)) {
                s.push(("recovery_target_inclusive".into(), "off".into()));
            }
        }
        // A follower keeps following whatever timeline the archive grows; a restore goes to the
        // timeline the plan checked.
        let timeline = if o.standby { "latest".to_string() } else { p.target_timeline.to_string() };
        s.push(("recovery_target_timeline".into(), quote(&timeline)));
        if o.archive {
            s.push(("archive_mode".into(), quote("on")));
            s.push(("archive_command".into(), quote(&format!("{} wal-push %p", o.walnut))));
        } else {
            s.push(("archive_mode".into(), quote("off")));
        }
        if let Some(port) = o.port {
            s.push(("port".into(), port.to_string()));
        }
        RecoveryConf {
            settings: s,
            signal: if o.standby { "standby.signal" } else { "recovery.signal" },
            comment: format!(
                "# walnut restore of backup {} to {}",
                p.backup_id,
                super::describe_target(&p.recovery_target)
            ),
        }
    }

    /// Appends the settings to `dest/postgresql.auto.conf`, writes an empty `postgresql.conf`
    /// when the backup has none (Debian keeps it in /etc), and the signal file last, each durably.
    /// The recovery settings of an earlier recovery that the backup holds (a backup of a cluster
    /// that was itself restored keeps them: PostgreSQL ignores them once promoted) are commented
    /// out first: another target kind beside this one's is refused by PostgreSQL ("multiple
    /// recovery targets specified"), and with none of this one's (the end of the archive) the old
    /// target would stop this recovery there.
    pub fn write(&self, dest: &Path) -> Result<(), RestoreError> {
        let auto = dest.join("postgresql.auto.conf");
        let mut text = disable_earlier_recovery(&std::fs::read_to_string(&auto).unwrap_or_default());
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text += &self.comment;
        text.push('\n');
        for (k, v) in &self.settings {
            text += &format!("{k} = {v}\n");
        }
        let write = |path: &Path, data: &[u8]| {
            crate::durable::write(path, data).map_err(RestoreError::io(format!("write {}", path.display())))
        };
        write(&auto, text.as_bytes())?;
        let conf = dest.join("postgresql.conf");
        if !conf.exists() {
            write(&conf, b"# written by walnut restore; settings are in postgresql.auto.conf\n")?;
        }
        write(&dest.join(self.signal), b"")
    }

    /// The value written for `key`, if any.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.settings.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// The settings of a recovery: they describe the restore that wrote them, never a later one.
const RECOVERY_SETTINGS: &[&str] = &[
    "restore_command",
    "archive_cleanup_command",
    "recovery_end_command",
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
    "recovery_target_inclusive",
    "recovery_target_action",
    "recovery_target_timeline",
];

/// `text` (a `postgresql.auto.conf`) with every recovery setting commented out, saying why.
fn disable_earlier_recovery(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let name = line.trim_start().split(|c: char| c == '=' || c.is_whitespace()).next().unwrap_or("");
        if RECOVERY_SETTINGS.iter().any(|s| s.eq_ignore_ascii_case(name)) {
            out += "# an earlier recovery's setting, disabled by walnut restore: ";
            out += line.trim_start();
        } else {
            out += line;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Range;
    use walnut_pg::{Lsn, TimelineId};

    fn plan(target: RecoveryTarget) -> Plan {
        let t = chrono::DateTime::parse_from_rfc3339("2026-01-01T12:00:00Z").unwrap().with_timezone(&chrono::Utc);
        Plan {
            backup_id: "20260101T110000".into(),
            backup_name: None,
            backup_timeline: TimelineId(1),
            backup_end_lsn: Lsn(0x3000100),
            target_timeline: TimelineId(2),
            recovery_target: target,
            first_segment_lsn: Lsn(0x3000000),
            last_segment_lsn: Lsn(0x9000000),
            segments: 7,
            restorable: Range {
                earliest_time: t,
                earliest_lsn: Lsn(0x3000100),
                latest_time: t,
                latest_lsn: Lsn(0xA000000),
                timeline: TimelineId(2),
            },
            notes: vec![],
        }
    }

    fn opts() -> RecoveryOptions {
        RecoveryOptions {
            walnut: "'/usr/bin/walnut' --config '/etc/walnut.toml'".into(),
            exclusive: false,
            action: TargetAction::Promote,
            standby: false,
            archive: false,
            port: None,
        }
    }

    #[test]
    fn table() {
        let t = chrono::DateTime::parse_from_rfc3339("2026-01-01T12:30:00.5Z").unwrap().with_timezone(&chrono::Utc);
        // (target, options, expected (key, value) lines besides restore_command, signal)
        type Case = (RecoveryTarget, RecoveryOptions, Vec<(&'static str, &'static str)>, &'static str);
        let cases: Vec<Case> = vec![
            (
                RecoveryTarget::EndOfArchive,
                opts(),
                vec![("recovery_target_timeline", "'2'"), ("archive_mode", "'off'")],
                "recovery.signal",
            ),
            (
                RecoveryTarget::Time(t),
                RecoveryOptions { exclusive: true, ..opts() },
                vec![
                    ("recovery_target_time", "'2026-01-01 12:30:00.500000+00'"),
                    ("recovery_target_action", "'promote'"),
                    ("recovery_target_inclusive", "off"),
                    ("recovery_target_timeline", "'2'"),
                    ("archive_mode", "'off'"),
                ],
                "recovery.signal",
            ),
            (
                RecoveryTarget::PinnedEnd(Lsn(0x9001234)),
                RecoveryOptions { exclusive: true, ..opts() },
                vec![
                    ("recovery_target_lsn", "'0/9001234'"),
                    ("recovery_target_action", "'promote'"),
                    ("recovery_target_timeline", "'2'"),
                    ("archive_mode", "'off'"),
                ],
                "recovery.signal",
            ),
            (
                RecoveryTarget::Name("it's".into()),
                RecoveryOptions { action: TargetAction::Pause, port: Some(5433), ..opts() },
                vec![
                    ("recovery_target_name", "'it''s'"),
                    ("recovery_target_action", "'pause'"),
                    ("recovery_target_timeline", "'2'"),
                    ("archive_mode", "'off'"),
                    ("port", "5433"),
                ],
                "recovery.signal",
            ),
            (
                RecoveryTarget::Immediate,
                RecoveryOptions { action: TargetAction::Shutdown, archive: true, ..opts() },
                vec![
                    ("recovery_target", "'immediate'"),
                    ("recovery_target_action", "'shutdown'"),
                    ("recovery_target_timeline", "'2'"),
                    ("archive_mode", "'on'"),
                    ("archive_command", "'''/usr/bin/walnut'' --config ''/etc/walnut.toml'' wal-push %p'"),
                ],
                "recovery.signal",
            ),
            (
                RecoveryTarget::EndOfArchive,
                RecoveryOptions { standby: true, ..opts() },
                vec![("recovery_target_timeline", "'latest'"), ("archive_mode", "'off'")],
                "standby.signal",
            ),
            (
                RecoveryTarget::Xid(1234),
                opts(),
                vec![
                    ("recovery_target_xid", "'1234'"),
                    ("recovery_target_action", "'promote'"),
                    ("recovery_target_timeline", "'2'"),
                    ("archive_mode", "'off'"),
                ],
                "recovery.signal",
            ),
        ];
        for (target, o, want, signal) in cases {
            let c = RecoveryConf::from_plan(&plan(target.clone()), &o);
            assert_eq!(c.settings[0].0, "restore_command");
            assert_eq!(c.settings[0].1, "'''/usr/bin/walnut'' --config ''/etc/walnut.toml'' wal-fetch %f %p'");
            let got: Vec<(&str, &str)> = c.settings[1..].iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            assert_eq!(got, want, "{target:?}");
            assert_eq!(c.signal, signal, "{target:?}");
        }
    }

    #[test]
    fn writes_durably_and_appends() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("postgresql.auto.conf"), "work_mem = '8MB'").unwrap();
        let c = RecoveryConf::from_plan(&plan(RecoveryTarget::EndOfArchive), &opts());
        c.write(d.path()).unwrap();
        let auto = std::fs::read_to_string(d.path().join("postgresql.auto.conf")).unwrap();
        assert!(auto.starts_with("work_mem = '8MB'\n# walnut restore of backup 20260101T110000"), "{auto}");
        assert!(auto.contains("recovery_target_timeline = '2'\n"), "{auto}");
        assert!(d.path().join("recovery.signal").exists() && d.path().join("postgresql.conf").exists());
    }

    #[test]
    fn an_earlier_recoverys_settings_are_disabled() {
        // A backup of a cluster that walnut restored to an LSN keeps that restore's settings.
        let d = tempfile::tempdir().unwrap();
        let earlier = "work_mem = '8MB'\n# walnut restore of backup X to LSN 0/30964E8\nrestore_command = 'walnut wal-fetch %f %p'\nrecovery_target_lsn = '0/30964E8'\n  Recovery_Target_Action='promote'\nrecovery_target_timeline = '1'\narchive_mode = 'on'\n# recovery_target_name = 'kept as a comment'\nrecovery_target_inclusive = off";
        std::fs::write(d.path().join("postgresql.auto.conf"), earlier).unwrap();
        let c = RecoveryConf::from_plan(&plan(RecoveryTarget::EndOfArchive), &opts());
        c.write(d.path()).unwrap();
        let auto = std::fs::read_to_string(d.path().join("postgresql.auto.conf")).unwrap();
        let active: Vec<&str> = auto.lines().map(str::trim).filter(|l| !l.starts_with('#') && !l.is_empty()).collect();
        let names: Vec<&str> = active.iter().map(|l| l.split(['=', ' ']).next().unwrap()).collect();
        assert!(
            names.iter().all(|n| !n.eq_ignore_ascii_case("recovery_target_lsn")
                && !n.eq_ignore_ascii_case("recovery_target_action")
                && !n.eq_ignore_ascii_case("recovery_target_inclusive")),
            "no earlier target is active: {auto}"
        );
        assert_eq!(names.iter().filter(|n| **n == "restore_command").count(), 1, "{auto}");
        assert_eq!(active.iter().filter(|l| l.starts_with("recovery_target_timeline")).count(), 1, "{auto}");
        assert!(active.contains(&"work_mem = '8MB'") && active.contains(&"archive_mode = 'on'"), "{auto}");
        assert!(auto.contains("disabled by walnut restore: recovery_target_lsn = '0/30964E8'\n"), "{auto}");
        assert!(auto.contains("\n# recovery_target_name = 'kept as a comment'\n"), "{auto}");
    }
}
