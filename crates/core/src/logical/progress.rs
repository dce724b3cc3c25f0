//! Progress of captures, restores and copies: counters shared with whoever displays them, and
//! what `pg_dump --verbose` / `pg_restore --verbose` lines say (pure).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// What a running capture, restore or copy has done so far.
#[derive(Debug, Default)]
pub struct LogicalProgress {
    /// Bytes of dump produced (capture, copy) or read (restore).
    pub bytes: AtomicU64,
    /// Bytes stored in the repository (capture).
    pub stored: AtomicU64,
    /// Tables whose data is done, of the tables the databases hold.
    pub tables_done: AtomicU64,
    pub tables_total: AtomicU64,
    /// Indexes and constraints created (restore, copy).
    pub post_data_done: AtomicU64,
    pub databases_done: AtomicU64,
    pub databases_total: AtomicU64,
    /// What is going on now (a database's name, "indexes and constraints", ...).
    pub phase: Mutex<String>,
    /// Called (on the thread that changed it) each time the phase changes.
    hook: PhaseHook,
}

/// The phase at which `pg_restore` builds indexes and constraints after the data is in.
pub const POST_DATA: &str = "indexes and constraints";

type PhaseFn = Box<dyn Fn(&str) + Send + Sync>;

#[derive(Default)]
struct PhaseHook(Mutex<Option<PhaseFn>>);

impl std::fmt::Debug for PhaseHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PhaseHook")
    }
}

impl LogicalProgress {
    pub fn set_phase(&self, phase: impl Into<String>) {
        let phase = phase.into();
        let changed = {
            let mut p = self.phase.lock().expect("progress phase");
            let changed = *p != phase;
            *p = phase.clone();
            changed
        };
        if changed && let Some(f) = self.hook.0.lock().expect("phase hook").as_ref() {
            f(&phase);
        }
    }

    /// Calls `f` with every new phase as it begins (a display that must say so at once).
    pub fn on_phase(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        *self.hook.0.lock().expect("phase hook") = Some(Box::new(f));
    }

    pub fn phase(&self) -> String {
        self.phase.lock().expect("progress phase").clone()
    }

    /// `tables 3/10, 1.2 GiB` style counters: (bytes, tables done, tables total).
    pub fn snapshot(&self) -> (u64, u64, u64) {
        let done = self.tables_done.load(Ordering::Relaxed);
        let total = self.tables_total.load(Ordering::Relaxed).max(done);
        (self.bytes.load(Ordering::Relaxed), done, total)
    }
}

/// What one `--verbose` line of `pg_dump` or `pg_restore` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A table's data: dumped (`dumping contents of table "s.t"`) or restored (`processing data
    /// for table "s.t"`).
    TableData(String),
    /// Post-data: an index, a constraint, a trigger... being created by `pg_restore`.
    PostData(String),
    /// An error the program reports (`pg_dump: error: ...`).
    Error(String),
    /// A warning (`pg_restore: warning: ...`).
    Warning(String),
    /// Anything else.
    Other,
}

/// Parses one stderr line of `pg_dump`, `pg_dumpall` or `pg_restore` (PostgreSQL 15's wording).
pub fn parse_line(line: &str) -> Line {
    let text = line.trim_end();
    let rest = ["pg_dump: ", "pg_restore: ", "pg_dumpall: "].iter().find_map(|p| text.strip_prefix(p));
    let Some(rest) = rest else {
        return Line::Other;
    };
    if let Some(e) = rest.strip_prefix("error: ") {
        return Line::Error(e.to_string());
    }
    if let Some(w) = rest.strip_prefix("warning: ") {
        return Line::Warning(w.to_string());
    }
    for p in ["dumping contents of table ", "processing data for table "] {
        if let Some(t) = rest.strip_prefix(p) {
            return Line::TableData(t.trim_matches('"').to_string());
        }
    }
    const POST: &[&str] = &[
        "creating INDEX ",
        "creating CONSTRAINT ",
        "creating FK CONSTRAINT ",
        "creating TRIGGER ",
        "creating INDEX ATTACH ",
    ];
    for p in POST {
        if rest.starts_with(p) {
            return Line::PostData(rest.strip_prefix("creating ").unwrap_or(rest).to_string());
        }
    }
    Line::Other
}

/// The last lines of a program's stderr worth quoting in an error (its errors first, else its
/// last lines), on one line.
#[derive(Debug, Default)]
pub struct StderrTail {
    errors: Vec<String>,
    last: std::collections::VecDeque<String>,
}

impl StderrTail {
    pub fn push(&mut self, line: &str, parsed: &Line) {
        if let Line::Error(e) = parsed
            && self.errors.len() < 5
        {
            self.errors.push(e.clone());
        }
        if !matches!(parsed, Line::TableData(_) | Line::PostData(_)) && !line.trim().is_empty() {
            self.last.push_back(line.trim().to_string());
            if self.last.len() > 3 {
                self.last.pop_front();
            }
        }
    }

    pub fn summary(&self) -> String {
        if !self.errors.is_empty() {
            return self.errors.join("; ");
        }
        let v: Vec<&str> = self.last.iter().map(String::as_str).collect();
        if v.is_empty() { "no message".into() } else { v.join("; ") }
    }

    pub fn errors(&self) -> &[String] {
        &self.errors
    }
}

/// Counts a `--verbose` line into `progress`; returns what it was.
pub fn count_line(progress: &LogicalProgress, line: &str) -> Line {
    let parsed = parse_line(line);
    match &parsed {
        Line::TableData(_) => {
            progress.tables_done.fetch_add(1, Ordering::Relaxed);
        }
        Line::PostData(_) => {
            progress.post_data_done.fetch_add(1, Ordering::Relaxed);
        }
        _ => {}
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbose_lines() {
        assert_eq!(parse_line("pg_dump: dumping contents of table \"public.t\""), Line::TableData("public.t".into()));
        assert_eq!(
            parse_line("pg_restore: processing data for table \"s p.ünï\"\n"),
            Line::TableData("s p.ünï".into())
        );
        assert_eq!(
            parse_line("pg_restore: creating INDEX \"public.t_g_idx\""),
            Line::PostData("INDEX \"public.t_g_idx\"".into())
        );
        assert_eq!(
            parse_line("pg_restore: creating FK CONSTRAINT \"public.c c_fk\""),
            Line::PostData("FK CONSTRAINT \"public.c c_fk\"".into())
        );
        assert_eq!(parse_line("pg_restore: creating TABLE \"public.t\""), Line::Other);
        assert_eq!(
            parse_line("pg_dump: error: query failed: ERROR:  permission denied"),
            Line::Error("query failed: ERROR:  permission denied".into())
        );
        assert_eq!(
            parse_line("pg_restore: warning: errors ignored on restore: 1"),
            Line::Warning("errors ignored on restore: 1".into())
        );
        assert_eq!(parse_line("pg_dump: reading schemas"), Line::Other);
        assert_eq!(parse_line("random"), Line::Other);

        let p = LogicalProgress::default();
        p.tables_total.store(1, Ordering::Relaxed);
        for l in [
            "pg_dump: dumping contents of table \"a.b\"",
            "pg_dump: dumping contents of table \"a.c\"",
            "pg_dump: reading",
        ] {
            count_line(&p, l);
        }
        assert_eq!(p.snapshot(), (0, 2, 2), "the total is never below what is done");

        let mut tail = StderrTail::default();
        for l in [
            "pg_dump: reading schemas",
            "pg_dump: error: connection failed",
            "pg_dump: dumping contents of table \"a\"",
        ] {
            tail.push(l, &parse_line(l));
        }
        assert_eq!(tail.summary(), "connection failed");
    }
}
