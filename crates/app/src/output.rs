//! Human output: progress bars on a terminal (bytes, throughput, ETA), one-line summaries
//! otherwise; byte and duration formatting.

use std::io::IsTerminal;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use walnut_core::backup::Progress;

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// Shows a progress bar for `progress` until the returned guard is dropped (terminal only).
pub struct Bar {
    task: Option<tokio::task::JoinHandle<()>>,
    bar: Option<indicatif::ProgressBar>,
}

impl Bar {
    pub fn start(what: &str, progress: Arc<Progress>, quiet: bool) -> Bar {
        if quiet || !std::io::stderr().is_terminal() {
            return Bar { task: None, bar: None };
        }
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
                .expect("template")
                .progress_chars("=> "),
        );
        bar.set_message(what.to_string());
        let b = bar.clone();
        let task = tokio::spawn(async move {
            loop {
                b.set_length(progress.total.load(Ordering::Relaxed));
                b.set_position(progress.done.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Bar { task: Some(task), bar: Some(bar) }
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

pub fn rate(bytes_n: u64, d: Duration) -> String {
    let secs = d.as_secs_f64().max(0.001);
    format!("{}/s", bytes((bytes_n as f64 / secs) as u64))
}
