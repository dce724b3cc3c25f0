//! Named points where a crash test stops walnut dead, as `kill -9` would: no destructor runs,
//! nothing is cleaned up. Inert unless the binary arms one at start (the app reads
//! `WALNUT_CRASH_AT`; libraries never read the environment). The crash tests
//! (crates/app/tests/crash.rs) prove that whatever is on disk or in the repository then is safe.

use std::sync::OnceLock;

static ARMED: OnceLock<Option<String>> = OnceLock::new();

/// Arms the point named `name` (once per process; later calls are ignored).
pub fn arm(name: Option<String>) {
    let _ = ARMED.set(name.filter(|n| !n.is_empty()));
}

/// Kills this process with SIGKILL if `name` is the armed point.
pub fn hit(name: &str) {
    if ARMED.get().and_then(|a| a.as_deref()) != Some(name) {
        return;
    }
    eprintln!("walnut: crash point {name}: killing myself (SIGKILL)");
    let pid = std::process::id().to_string();
    let _ = std::process::Command::new("kill").args(["-KILL", &pid]).status();
    // Where no `kill` program exists: abort, which also runs no destructor and cleans nothing.
    std::process::abort()
}
