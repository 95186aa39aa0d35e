//! Progress of a run: shared counters, shown as a bar on a terminal and as periodic log lines
//! otherwise (oha's monitor and its `--no-tui` rule: no bar when stderr is not a TTY).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytesize::ByteSize;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_util::sync::CancellationToken;

use super::state::Progress;

/// Counters updated by the listing and the workers, read by the display and the summary.
#[derive(Debug, Default)]
pub struct Counters {
    /// Keys in the migration table for this source (earlier runs included).
    pub objects_total: AtomicU64,
    /// Known bytes of those keys.
    pub bytes_total: AtomicU64,
    /// Keys done before this run.
    pub done_before: AtomicU64,
    /// Bytes done before this run.
    pub bytes_before: AtomicU64,
    /// Keys copied by this run.
    pub copied: AtomicU64,
    /// Bytes copied by this run.
    pub copied_bytes: AtomicU64,
    /// Keys this run found already copied or already in the primary.
    pub skipped: AtomicU64,
    /// Bytes of those keys.
    pub skipped_bytes: AtomicU64,
    /// Keys this run gave up on.
    pub failed: AtomicU64,
    /// Objects waiting now at the live-work gate of a backfill inside `serve`.
    pub held_at_gate: AtomicU64,
}

impl Counters {
    /// Starts from what the ledger holds for the source (before the listing adds to it).
    pub fn set_base(&self, p: Progress) {
        self.objects_total.store(p.objects_total, Relaxed);
        self.bytes_total.store(p.bytes_total, Relaxed);
        self.done_before.store(p.objects_done, Relaxed);
        self.bytes_before.store(p.bytes_done, Relaxed);
    }

    /// Counts newly listed keys.
    pub fn add_listed(&self, objects: u64, bytes: u64) {
        self.objects_total.fetch_add(objects, Relaxed);
        self.bytes_total.fetch_add(bytes, Relaxed);
    }

    /// Counts a size learnt while copying (keys from a file are listed without one).
    pub fn learn_size(&self, bytes: u64) {
        self.bytes_total.fetch_add(bytes, Relaxed);
    }

    /// Objects done (before and during this run), objects total, bytes done, bytes total.
    pub fn snapshot(&self) -> (u64, u64, u64, u64) {
        let done =
            self.done_before.load(Relaxed) + self.copied.load(Relaxed) + self.skipped.load(Relaxed);
        let bytes = self.bytes_before.load(Relaxed)
            + self.copied_bytes.load(Relaxed)
            + self.skipped_bytes.load(Relaxed);
        let total = self.objects_total.load(Relaxed);
        let bytes_total = self.bytes_total.load(Relaxed);
        (done, total.max(done), bytes, bytes_total.max(bytes))
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Display {
    /// A bar on stderr (a terminal).
    Bar,
    /// An `info` log line every so often.
    Log(Duration),
}

impl Display {
    /// A bar if stderr is a terminal, else log lines every `every`.
    pub fn auto(every: Duration) -> Display {
        if std::io::stderr().is_terminal() {
            Display::Bar
        } else {
            Display::Log(every)
        }
    }
}

/// Shows progress until `done` is cancelled.
pub async fn show(display: Display, counters: Arc<Counters>, done: CancellationToken) {
    match display {
        Display::Bar => bar(counters, done).await,
        Display::Log(every) => log(counters, done, every).await,
    }
}

async fn bar(counters: Arc<Counters>, done: CancellationToken) {
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} objects {msg} ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    let started = Instant::now();
    let (_, _, bytes_at_start, _) = counters.snapshot();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = done.cancelled() => break,
        }
        let (objects, total, bytes, bytes_total) = counters.snapshot();
        bar.set_length(total);
        bar.set_position(objects);
        let rate = (bytes - bytes_at_start) as f64 / started.elapsed().as_secs_f64().max(0.001);
        bar.set_message(format!(
            "{} / {} ({}/s)",
            ByteSize(bytes),
            ByteSize(bytes_total),
            ByteSize(rate as u64)
        ));
    }
    bar.finish_and_clear();
}

async fn log(counters: Arc<Counters>, done: CancellationToken, every: Duration) {
    let started = Instant::now();
    let (objects_at_start, _, bytes_at_start, _) = counters.snapshot();
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = done.cancelled() => return,
        }
        let (objects, total, bytes, bytes_total) = counters.snapshot();
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let rate = (objects - objects_at_start) as f64 / secs;
        let eta = if rate > 0.0 && total > objects {
            humantime::format_duration(Duration::from_secs(
                ((total - objects) as f64 / rate) as u64,
            ))
            .to_string()
        } else {
            "unknown".into()
        };
        tracing::info!(
            "migrate: {objects} of {total} objects, {} of {}, {rate:.1} objects/s, {}/s, {} failed, ETA {eta}",
            ByteSize(bytes),
            ByteSize(bytes_total),
            ByteSize(((bytes - bytes_at_start) as f64 / secs) as u64),
            counters.failed.load(Relaxed),
        );
    }
}
