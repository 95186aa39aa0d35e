//! The command line: subcommands, runtime start-up and exit codes.
//!
//! - [`migrate`]: `fediedge migrate` around the [`crate::migrate::Job`] library.

pub mod migrate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// A media edge for fediverse instances.
#[derive(Debug, Parser)]
#[command(name = "fediedge", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve media: local cache, a chain of stores, pull-through copies into the primary.
    Serve {
        /// Config file (TOML). Without it: the embedded default, `./var/media` served at
        /// `http://127.0.0.1:8080/system/`.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Copy every object of a fallback store into the primary, under a load budget.
    Migrate(migrate::MigrateArgs),
    /// Find configuration errors before users do.
    Doctor(crate::doctor::DoctorArgs),
    /// Show Mastodon's Sidekiq as Redis holds it: queues, latency, processes, what no process
    /// serves. Read-only.
    Queues(crate::sidekiq::QueuesArgs),
    /// Config helpers.
    #[command(subcommand)]
    Config(ConfigCommand),
}

/// `fediedge config …`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the fediedge config equivalent to a Mastodon env file.
    FromMastodon {
        /// The Mastodon env file (e.g. `.env.production`).
        file: PathBuf,
    },
}

/// Sets up logging to stderr; `RUST_LOG` selects what is shown (default `info`).
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only on a terminal: journald and log files get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Runs a parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Serve { config } => {
            let config = match config {
                None => crate::config::embedded_default(),
                Some(path) => match crate::config::load(&path) {
                    Ok(c) => c,
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(2);
                    }
                },
            };
            let rt = runtime(config.worker_threads);
            let served = rt.block_on(crate::serve::serve_until_signal(config));
            // The drain is over: a blocking thread still stuck (a hung NFS mount) must not
            // hold the exit.
            rt.shutdown_timeout(std::time::Duration::from_secs(1));
            match served {
                // Signalled and drained (whatever the drain had to cut is logged).
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Migrate(args) => runtime(None).block_on(migrate::run(args)),
        Command::Doctor(args) => crate::doctor::run(args),
        Command::Queues(args) => runtime(None).block_on(crate::sidekiq::command::run(args)),
        Command::Config(ConfigCommand::FromMastodon { file }) => {
            crate::mastodon::from_mastodon_command(&file)
        }
    }
}

/// A multi-threaded runtime; `workers` threads, or tokio's default (one per core, or
/// `TOKIO_WORKER_THREADS`).
fn runtime(workers: Option<usize>) -> tokio::runtime::Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    builder
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime")
}
