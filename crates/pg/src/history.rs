//! Timeline history files (`00000002.history`): one line per ancestor timeline,
//! `<parent TLI>\t<switch point LSN>\t<reason>`; comments start with `#`.

use crate::lsn::{Lsn, TimelineId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryEntry {
    /// An ancestor timeline...
    pub tli: TimelineId,
    /// ...which ended (switched to its child) here.
    pub switchpoint: Lsn,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("timeline history line {line}: {reason}")]
pub struct HistoryError {
    pub line: usize,
    pub reason: String,
}

/// Parses a history file's text into its ancestor entries, oldest first.
pub fn parse_history(text: &str) -> Result<Vec<HistoryEntry>, HistoryError> {
    let mut out: Vec<HistoryEntry> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |reason: &str| HistoryError { line: i + 1, reason: reason.to_string() };
        let mut fields = line.split_whitespace();
        let tli: u32 = fields.next().and_then(|t| t.parse().ok()).ok_or_else(|| err("bad timeline ID"))?;
        let lsn: Lsn = fields.next().and_then(|l| l.parse().ok()).ok_or_else(|| err("bad switch point"))?;
        if let Some(prev) = out.last()
            && (tli <= prev.tli.0 || lsn < prev.switchpoint)
        {
            return Err(err("timeline IDs and switch points must increase"));
        }
        out.push(HistoryEntry { tli: TimelineId(tli), switchpoint: lsn });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parses_postgres_history() {
        let h = parse_history("1\t0/3000000\tno recovery target specified\n\n2\t0/50000A8\tat restore point \"x\"\n")
            .unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(h[1], HistoryEntry { tli: TimelineId(2), switchpoint: Lsn(0x50000A8) });
        assert!(parse_history("2\t0/1\tx\n1\t0/2\ty\n").is_err());
        assert!(parse_history("x\t0/1\n").is_err());
        assert!(parse_history("# comment\n").unwrap().is_empty());
    }
}
