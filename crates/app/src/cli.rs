//! Command-line flags (raw); `cmd` validates them into actions.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "walnut", version, about = "Continuous archiving and point-in-time recovery for PostgreSQL")]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args, Clone)]
pub struct Global {
    /// Configuration file (TOML).
    #[arg(long, global = true, env = "WALNUT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Repository URL: file:///path, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix.
    #[arg(long, global = true, value_name = "URL")]
    pub repo: Option<String>,
    /// Machine-readable output on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// More logging (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Archive one WAL file (archive_command = 'walnut --config FILE wal-push %p').
    WalPush {
        /// The file, as PostgreSQL passes it (%p).
        path: PathBuf,
    },
    /// Restore one WAL file (restore_command = 'walnut --config FILE wal-fetch %f %p').
    WalFetch {
        /// The WAL file name PostgreSQL asks for (%f).
        name: String,
        /// Where to write it (%p).
        dest: PathBuf,
    },
    /// Take a base backup of a running cluster.
    BackupPush {
        /// The data directory (default: [postgres] pgdata, PGDATA, or what the server says).
        #[arg(long)]
        pgdata: Option<PathBuf>,
        /// A unique name for this backup: [A-Za-z0-9._-]{1,64}.
        #[arg(long)]
        name: Option<String>,
        /// Store only the blocks changed since the parent backup began (found in the archived
        /// WAL); a full backup when there is nothing to build on or the chain is [backup]
        /// max_chain long.
        #[arg(long)]
        incremental: bool,
        /// The parent of an incremental backup (ID, name or LATEST; default: the newest DONE
        /// backup in this server's timeline history).
        #[arg(long, value_name = "REF", requires = "incremental")]
        parent: Option<String>,
        /// Read the data directory at most this fast, e.g. 50MB/s (default [backup] max_rate).
        #[arg(long, value_name = "RATE", value_parser = crate::config::parse_rate)]
        max_rate: Option<crate::config::Rate>,
    },
    /// List backups.
    BackupList {
        /// More columns: LSNs, sizes, duration.
        #[arg(long)]
        detail: bool,
    },
    /// Show one backup (ID, name or LATEST).
    BackupShow { reference: String },
    /// Download a base backup into an empty directory (no recovery configuration).
    BackupFetch {
        dest: PathBuf,
        reference: String,
        /// Restore a tablespace elsewhere than its source location: NAME=DIR or OID=DIR (repeatable).
        #[arg(long, value_name = "NAME=DIR")]
        tablespace_map: Vec<String>,
    },
    /// Timelines, archived WAL ranges, gaps, time ranges, restore points, restorable windows.
    WalShow,
    /// Check archive integrity: WAL continuity from every backup, history files against segments,
    /// every segment object's header; with --deep, every segment's checksum and records.
    WalVerify {
        /// Download every segment, verify its checksum and decode all of it.
        #[arg(long)]
        deep: bool,
    },
    /// Read every backup's objects and the WAL it needs, check each against its checksum, and
    /// give a verdict per backup: restorable to [earliest, latest], or what breaks it.
    Verify {
        /// Only this backup (ID, name or LATEST).
        #[arg(long, value_name = "REF")]
        backup: Option<String>,
        /// Also read every file in the parts against the manifest and decode every WAL record.
        #[arg(long)]
        deep: bool,
    },
    /// Re-encrypt every WAL file and backup to the configured [encryption] recipients (objects
    /// in clear or encrypted to other keys); each is proven readable before it replaces the old.
    /// Prints what it would do; re-encrypts only with --confirm.
    Rekey {
        #[arg(long)]
        confirm: bool,
    },
    /// One restore drill: the latest backup restored to the latest point into a scratch
    /// directory, started, checked (connections, pg_amcheck when installed, [drill] query),
    /// timed and removed.
    Drill {
        /// Where to restore (default [drill] scratch_dir, else state_dir/drill).
        #[arg(long, value_name = "DIR")]
        scratch: Option<PathBuf>,
        /// Port for the restored server (default [drill] port, else a free one).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        port: Option<u16>,
    },
    /// Print a new age identity (secret key) with its public key as a comment, in the format
    /// of an age identity file (for the benchmarks and tests; any age key generator works).
    #[command(hide = true)]
    AgeKeygen,
    /// Time each stage of a push and a fetch of WAL segment files against the repository (for
    /// the benchmarks; the objects go to probe keys and are deleted).
    #[command(hide = true)]
    WalStages {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Decode WAL segment files and print their summaries and the decoding throughput.
    WalInspect {
        /// Segment files (named as in pg_wal).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Set up archiving on a running cluster, prove it works, take the first base backup.
    Enable {
        /// Restart PostgreSQL (pg_ctl) when archive_mode needs it.
        #[arg(long)]
        restart: bool,
    },
    /// The long-running agent: scheduled backups, retention, HTTP admin API, metrics.
    Agent {
        /// Address to listen on (default [agent] listen, 127.0.0.1:5500).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Pre-flight checks: PostgreSQL, archiving, repository, identity, last backup.
    Check,
    /// Manual retention (prints the plan; deletes only with --confirm).
    Delete {
        #[command(subcommand)]
        what: crate::cmd::retention::DeleteWhat,
    },
    /// Retention by the configured policy (recovery_window, minimum_redundancy).
    Retention {
        #[command(subcommand)]
        what: RetentionWhat,
    },
    /// Logical backups (pg_dump/pg_restore): capture (also from the archive at a past point with
    /// --at), list, show, delete, restore into a database, copy between databases, download.
    Logical {
        #[command(subcommand)]
        what: crate::cmd::logical::LogicalCmd,
    },
    /// Create a named restore point and make sure it is archived.
    RestorePoint { name: String },
    /// Plan, validate, fetch and configure a point-in-time restore.
    Restore(crate::cmd::restore::RestoreArgs),
    /// The showcase: a throwaway cluster, a backup, a disaster, a point-in-time restore.
    Demo {
        /// Keep the temporary directory.
        #[arg(long)]
        keep: bool,
    },
    /// Print the resolved configuration (secrets redacted), to debug what walnut will use.
    #[command(hide = true)]
    ShowConfig,
    /// Keep the prefetch spool ahead of recovery, from NAME on (started in the background by
    /// wal-fetch when none runs; exits when recovery asks for nothing new).
    #[command(hide = true)]
    WalPrefetch { name: String },
    /// Archive the `.ready` segments of PG_WAL as a long-running worker (started on demand by
    /// wal-push when `[wal] worker = true`).
    #[command(hide = true)]
    WalWorker { pg_wal: std::path::PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum RetentionWhat {
    /// Apply the policy (prints the plan; deletes only with --confirm).
    Apply {
        #[arg(long)]
        confirm: bool,
    },
}
