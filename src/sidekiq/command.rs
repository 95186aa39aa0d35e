//! `fediedge queues`: one snapshot as a table or as the JSON contract, or `--watch`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::doctor::finding;

use super::read::{connect, read_with};
use super::{SidekiqError, Snapshot, Target};

/// Output format of `fediedge queues`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A table of queues and processes, then the findings, for people.
    Human,
    /// `{queues, scheduled, retry, dead, processed, failed, processes, unserved, findings}`:
    /// the contract for other tools (docs/queues.md).
    Json,
}

/// Arguments of `fediedge queues`.
#[derive(Debug, clap::Args)]
pub struct QueuesArgs {
    /// Sidekiq's Redis: `redis://[:PASSWORD@]HOST[:PORT][/DB]`, `rediss://…` (TLS) or
    /// `unix:///PATH?db=N`. Also read from `FEDIEDGE_REDIS_URL`, which keeps the password out
    /// of the process list.
    #[arg(
        long,
        value_name = "URL",
        env = "FEDIEDGE_REDIS_URL",
        hide_env_values = true
    )]
    pub redis: Option<String>,
    /// Reach Redis through these sentinels (`HOST[:PORT],…`, port default 26379); the host of
    /// `--redis` is then the master's name, as in Mastodon: `redis://:PASSWORD@mymaster/0`.
    #[arg(long, value_name = "HOST[:PORT],…", requires = "redis")]
    pub sentinels: Option<String>,
    /// Key namespace (`REDIS_NAMESPACE` of Mastodon ≤ 4.3): keys are read as `NS:queues`, ….
    #[arg(long, value_name = "NS", requires = "redis")]
    pub namespace: Option<String>,
    /// Take the connection from a Mastodon env file, as Mastodon does: `SIDEKIQ_REDIS_URL`,
    /// else `SIDEKIQ_REDIS_*`, else `REDIS_URL`/`REDIS_HOST`/…, plus `REDIS_NAMESPACE`.
    #[arg(long = "mastodon-env", value_name = "FILE")]
    pub mastodon_env: Option<PathBuf>,
    /// Output format; `json` is the contract for other tools (see docs/queues.md).
    #[arg(long, value_enum, default_value = "human")]
    pub format: Format,
    /// Refresh until interrupted: the table in place, or one JSON object per line.
    #[arg(long)]
    pub watch: bool,
    /// Time between refreshes with `--watch`.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
}

impl QueuesArgs {
    /// The Redis to read, from `--mastodon-env` or `--redis`.
    pub fn target(&self) -> Result<Target, SidekiqError> {
        match (&self.mastodon_env, &self.redis) {
            (Some(file), _) => Target::from_mastodon_env(file),
            (None, Some(url)) => {
                Target::from_url(url, self.sentinels.as_deref(), self.namespace.clone())
            }
            (None, None) => Err(SidekiqError::Settings(
                "give --redis URL (or FEDIEDGE_REDIS_URL) or --mastodon-env FILE".into(),
            )),
        }
    }
}

/// Runs `fediedge queues`: exit code 2 on an error finding or a failed read, 1 on warnings,
/// 0 otherwise (with `--watch`, that of the last snapshot).
pub async fn run(args: QueuesArgs) -> ExitCode {
    let target = match args.target() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if !args.watch {
        return match once(&target).await {
            Ok(s) => {
                print!("{}", render(&s, &target, args.format));
                ExitCode::from(finding::exit_code(&s.findings))
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        };
    }
    watch(&target, &args).await
}

async fn once(target: &Target) -> Result<Snapshot, SidekiqError> {
    let mut con = connect(target).await?;
    read_with(&mut con, target).await
}

async fn watch(target: &Target, args: &QueuesArgs) -> ExitCode {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stdout().is_terminal();
    let mut con = None;
    let mut code = 2;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        if con.is_none() {
            con = connect(target)
                .await
                .map_err(|e| eprintln!("error: {e}"))
                .ok();
        }
        let mut out = String::new();
        if let Some(c) = con.as_mut() {
            match read_with(c, target).await {
                Ok(s) => {
                    code = finding::exit_code(&s.findings);
                    out = match args.format {
                        Format::Json => {
                            serde_json::to_string(&s).expect("snapshot serializes") + "\n"
                        }
                        // One line per finding, so the screen holds the whole picture.
                        Format::Human => table(&s, target, true),
                    };
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    code = 2;
                    con = None;
                }
            }
        }
        if tty && args.format == Format::Human {
            // Home, clear screen: the table is redrawn in place.
            out.insert_str(0, "\x1b[H\x1b[2J");
        }
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
        drop(stdout);
        tokio::select! {
            _ = &mut ctrl_c => return ExitCode::from(code),
            _ = tokio::time::sleep(args.interval) => {}
        }
    }
}

/// The snapshot in `format`.
pub fn render(s: &Snapshot, target: &Target, format: Format) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(s).expect("snapshot serializes") + "\n",
        Format::Human => table(s, target, false),
    }
}

/// `12.3s`, `5m03s`, `2h05m`, `3d04h`.
pub fn human_duration(secs: f64) -> String {
    let s = secs.max(0.0);
    let whole = s as u64;
    match whole {
        0..=59 => format!("{s:.1}s"),
        60..=3599 => format!("{}m{:02}s", whole / 60, whole % 60),
        3600..=86399 => format!("{}h{:02}m", whole / 3600, whole % 3600 / 60),
        _ => format!("{}d{:02}h", whole / 86400, whole % 86400 / 3600),
    }
}

/// The table; `compact`: findings one line each, without their fixes (`--watch`).
fn table(s: &Snapshot, target: &Target, compact: bool) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Sidekiq at {}: {} live process(es), {}/{} threads busy",
        target.redacted(),
        s.processes.len(),
        s.busy(),
        s.concurrency()
    );
    let width = s
        .queues
        .iter()
        .map(|q| q.name.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let _ = writeln!(
        out,
        "\n{:<width$}  {:>9}  {:>9}  {:>9}",
        "QUEUE", "SIZE", "LATENCY", "PROCESSES"
    );
    for q in &s.queues {
        let mark = if q.processes == 0 {
            "  <- unserved"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "{:<width$}  {:>9}  {:>9}  {:>9}{mark}",
            q.name,
            q.size,
            human_duration(q.latency_seconds),
            q.processes
        );
    }
    let _ = writeln!(
        out,
        "\nscheduled {}  retry {}  dead {}  processed {}  failed {}",
        s.scheduled, s.retry, s.dead, s.processed, s.failed
    );
    if !s.processes.is_empty() {
        let idw = s
            .processes
            .iter()
            .map(|p| p.identity.len())
            .max()
            .unwrap_or(7)
            .max(7);
        let _ = writeln!(out, "\n{:<idw$}  {:>11}  QUEUES", "PROCESS", "BUSY/THREADS");
        for p in &s.processes {
            let quiet = if p.quiet { " (quiet)" } else { "" };
            let _ = writeln!(
                out,
                "{:<idw$}  {:>11}  {}{quiet}",
                p.identity,
                format!("{}/{}", p.busy, p.concurrency),
                p.queues.join(",")
            );
        }
    }
    if !s.unserved.is_empty() {
        let _ = writeln!(out, "\nunserved: {}", s.unserved.join(", "));
    }
    out.push('\n');
    if !compact {
        out.push_str(&finding::to_human(&s.findings));
        return out;
    }
    for f in &s.findings {
        let key = f
            .key
            .as_deref()
            .map(|k| format!(" {k}"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{}[{}]{key}: {}",
            f.severity.as_str(),
            f.rule,
            f.message
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(human_duration(0.04), "0.0s");
        assert_eq!(human_duration(12.34), "12.3s");
        assert_eq!(human_duration(303.0), "5m03s");
        assert_eq!(human_duration(7500.0), "2h05m");
        assert_eq!(human_duration(273_600.0), "3d04h");
    }
}
