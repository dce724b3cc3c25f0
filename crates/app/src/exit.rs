//! Exit codes, the contract with PostgreSQL (SPEC §9).

/// Success.
pub const OK: u8 = 0;
/// A failure PostgreSQL should retry (`wal-push`), or any command's ordinary failure.
pub const FAILURE: u8 = 1;
/// `wal-fetch`: the file is not in the archive (normal at the end of recovery).
pub const NOT_FOUND: u8 = 1;
/// `wal-fetch`: a real failure (corrupt object, storage unreachable after retries). Above 125,
/// so PostgreSQL stops recovery instead of treating it as the end of the archive.
pub const FATAL: u8 = 200;
