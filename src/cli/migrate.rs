//! `fediedge migrate`: the command line around [`crate::migrate::Job`]. Loads the config,
//! opens the stores and the ledger, runs the job with a progress display, and turns its
//! [`Summary`] into output and an exit code. The only place migrate prints.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use bytesize::ByteSize;
use tokio_util::sync::CancellationToken;

use crate::ledger::{schema::UNATTRIBUTED, Ledger};
use crate::migrate::progress::{self, Display};
use crate::migrate::{self, Job, MigrateError, Summary};

/// Arguments of `fediedge migrate`.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    /// Config file (TOML).
    #[arg(long)]
    pub config: PathBuf,
    /// The `[[fallback]]` store to copy from, by its `name`.
    #[arg(long, required_unless_present = "status")]
    pub from: Option<String>,
    /// Copy the keys listed in this file (one per line, as `find public/system -type f` gives
    /// them; a leading `./`, `/` or `…public/system/` is removed; blank lines and `#` comments
    /// are skipped) instead of listing the store. Needed for an http store, which cannot be
    /// listed.
    #[arg(long, value_name = "FILE")]
    pub keys: Option<PathBuf>,
    /// Objects copied at once (each holds at most one request to the source). Default 4.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub concurrency: u32,
    /// Most requests per second sent to the source (GET, and HEAD where needed). Default:
    /// unlimited.
    #[arg(long, value_name = "N")]
    pub max_ops_per_sec: Option<u32>,
    /// Most body bytes per second read from the source, e.g. `10MiB`. Default: unlimited.
    #[arg(long, value_name = "SIZE")]
    pub max_bytes_per_sec: Option<ByteSize>,
    /// Retries of a failed copy within the run, after waits of `--retry-delay` doubling each
    /// time. Default 3 (waits of 1s, 2s, 4s).
    #[arg(long, default_value_t = 3)]
    pub retries: u32,
    /// Wait before the first retry. Default `1s`.
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub retry_delay: humantime::Duration,
    /// Copy nothing: re-check what was copied from `--from` into the primary against the
    /// source (size, and MD5 where both stores give one) and print each difference; exit 1 if
    /// any.
    #[arg(long)]
    pub verify: bool,
    /// With `--verify`: read both bodies and compare their MD5s (reads everything again).
    #[arg(long)]
    pub verify_deep: bool,
    /// Print how far the migrations recorded in the ledger are, per source and destination,
    /// and exit. Safe while `serve` or another `migrate` runs.
    #[arg(long, conflicts_with_all = ["verify", "verify_deep", "keys"])]
    pub status: bool,
    /// Interval of the progress log lines when stderr is not a terminal. Default `10s`.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    pub log_every: humantime::Duration,
}

/// What a run did; its [`Report::exit_code`] is the process exit code.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// 0: done, nothing failed; 1: something failed or differs; 2: usage or config error;
    /// 130: interrupted (rerun to resume).
    pub code: u8,
    /// Objects copied by this run.
    pub copied: u64,
    /// Objects that needed no copy.
    pub skipped: u64,
    /// Objects this run gave up on.
    pub failed: u64,
    /// Bytes copied.
    pub bytes: u64,
    /// With `--verify`: objects checked.
    pub checked: u64,
    /// With `--verify`: objects that differ.
    pub differences: u64,
    /// The run was stopped before its end.
    pub interrupted: bool,
}

impl Report {
    fn error(code: u8, message: impl std::fmt::Display) -> Report {
        eprintln!("error: {message}");
        Report {
            code,
            ..Report::default()
        }
    }

    fn usage(message: impl std::fmt::Display) -> Report {
        Report::error(2, message)
    }

    fn from_error(e: MigrateError) -> Report {
        Report::error(if e.is_usage() { 2 } else { 1 }, e)
    }

    /// The process exit code.
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(self.code)
    }
}

/// Runs `fediedge migrate` and returns the exit code; Ctrl-C stops it cleanly.
pub async fn run(args: MigrateArgs) -> ExitCode {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // No signal handler: run to the end.
            std::future::pending::<()>().await;
        }
    };
    run_until(args, ctrl_c).await.exit_code()
}

/// Runs `fediedge migrate` until it ends or `stop` completes (then it stops as on Ctrl-C).
pub async fn run_until(
    args: MigrateArgs,
    stop: impl Future<Output = ()> + Send + 'static,
) -> Report {
    let config = match crate::config::load(&args.config) {
        Ok(c) => c,
        Err(e) => return Report::usage(e),
    };
    let data_dir = &config.data_dir;
    let ledger_error = |e| {
        Report::usage(format!(
            "cannot open the ledger in {}: {e}",
            data_dir.display()
        ))
    };
    if args.status {
        // Read-only in spirit: no store is opened, so old records are not attributed here.
        return match Ledger::open(data_dir) {
            Ok(ledger) => print_status(&ledger, args.from.as_deref()).await,
            Err(e) => ledger_error(e),
        };
    }
    let Some(from) = args.from.as_deref() else {
        return Report::usage("--from NAME is required");
    };
    let source_config = match migrate::source_config(&config, from) {
        Ok(s) => s,
        Err(e) => return Report::from_error(e),
    };
    let metrics = crate::metrics::Metrics::new();
    let source = match crate::store::open(source_config, metrics.clone()) {
        Ok(s) => s,
        Err(e) => return Report::usage(e),
    };
    let primary = match crate::store::open(&config.primary, metrics) {
        Ok(s) => s,
        Err(e) => return Report::usage(e),
    };
    // After the primary is opened: a missing fs root exists now, so its identity is final.
    let destination = config.primary.destination();
    let ledger = match Ledger::open_for(data_dir, &destination) {
        Ok(l) => l,
        Err(e) => return ledger_error(e),
    };
    let mut job = Job::new(source, primary, destination, ledger, data_dir);
    job.keys = args.keys.clone();
    job.concurrency = args.concurrency as usize;
    job.max_ops_per_sec = args.max_ops_per_sec;
    job.max_bytes_per_sec = args.max_bytes_per_sec.map(|b| b.as_u64());
    job.retries = args.retries;
    job.retry_delay = args.retry_delay.into();

    let token = CancellationToken::new();
    let watcher = {
        let token = token.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = stop => {
                    tracing::info!("stopping: reads under way are abandoned, verified copies finish");
                    token.cancel();
                }
                _ = token.cancelled() => {}
            }
        })
    };
    let report = if args.verify || args.verify_deep {
        verify(job, args.verify_deep, token.clone()).await
    } else {
        let shown = CancellationToken::new();
        let display = tokio::spawn(progress::show(
            Display::auto(args.log_every.into()),
            job.counters.clone(),
            shown.clone(),
        ));
        let result = job.run(token.clone()).await;
        shown.cancel();
        let _ = display.await;
        match result {
            Ok(summary) => print_summary(&summary),
            Err(e) => Report::from_error(e),
        }
    };
    watcher.abort();
    report
}

/// The summary line on stdout, errors and failed keys on stderr, and the exit code.
fn print_summary(s: &Summary) -> Report {
    let secs = s.elapsed.as_secs_f64().max(0.001);
    println!(
        "migrate {}: copied {} ({}), skipped {}, failed {}, in {:.1}s ({:.1} objects/s, {}/s){}",
        s.route.source,
        s.copied,
        ByteSize(s.bytes),
        s.skipped,
        s.failed,
        secs,
        s.copied as f64 / secs,
        ByteSize((s.bytes as f64 / secs) as u64),
        if s.interrupted {
            "; interrupted: run again to resume"
        } else {
            ""
        },
    );
    if s.refused_lines > 0 {
        eprintln!(
            "warning: {} lines of the key file were refused (see the log)",
            s.refused_lines
        );
    }
    for e in &s.errors {
        eprintln!("error: {e}");
    }
    for (key, attempts, reason) in &s.failures {
        eprintln!("failed: {key} ({attempts} attempts): {reason}");
    }
    let code = if !s.errors.is_empty() || s.failed > 0 {
        1
    } else if s.interrupted {
        130
    } else {
        0
    };
    Report {
        code,
        copied: s.copied,
        skipped: s.skipped,
        failed: s.failed,
        bytes: s.bytes,
        interrupted: s.interrupted,
        ..Report::default()
    }
}

async fn verify(job: Job, deep: bool, stop: CancellationToken) -> Report {
    let source = job.source.name().to_owned();
    let found = match job.verify(deep, stop.clone()).await {
        Ok(f) => f,
        Err(e) => return Report::from_error(e),
    };
    for (key, diff) in &found.differences {
        println!("DIFF {key}: {diff}");
    }
    for (key, e) in &found.errors {
        eprintln!("could not check {key}: {e}");
    }
    println!(
        "verify {source}: checked {}, {} differ, {} could not be checked{}",
        found.checked,
        found.differences.len(),
        found.errors.len(),
        if deep { " (deep: bodies compared)" } else { "" }
    );
    let bad = !found.differences.is_empty() || !found.errors.is_empty();
    Report {
        code: if bad {
            1
        } else if stop.is_cancelled() {
            130
        } else {
            0
        },
        checked: found.checked,
        differences: found.differences.len() as u64,
        interrupted: stop.is_cancelled(),
        ..Report::default()
    }
}

/// `--status`: one line per (source, destination), or only those of `from`.
async fn print_status(ledger: &Ledger, from: Option<&str>) -> Report {
    let all = match migrate::status(ledger).await {
        Ok(s) => s,
        Err(e) => return Report::from_error(e),
    };
    let shown: Vec<_> = all
        .into_iter()
        .filter(|s| from.is_none_or(|f| f == s.route.source))
        .collect();
    if shown.is_empty() {
        println!(
            "no migration recorded in {}{}",
            ledger.path().display(),
            from.map(|f| format!(" for {f:?}")).unwrap_or_default()
        );
        return Report::default();
    }
    for s in shown {
        let p = s.progress;
        let destination = if s.route.destination == UNATTRIBUTED {
            "(recorded before destinations were kept)"
        } else {
            &s.route.destination
        };
        println!(
            "{} -> {destination}: {} of {} objects, {} of {} bytes ({} of {}), {} failed; listing {}",
            s.route.source,
            p.objects_done,
            p.objects_total,
            p.bytes_done,
            p.bytes_total,
            ByteSize(p.bytes_done),
            ByteSize(p.bytes_total),
            p.failed,
            if s.listing_done {
                "complete"
            } else {
                "incomplete (a run is under way or was interrupted)"
            },
        );
    }
    Report::default()
}
