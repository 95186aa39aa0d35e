//! `fediedge migrate`: bulk backfill of a fallback store into the primary. (Being built: issue 3.)

use std::process::ExitCode;

/// Arguments of `fediedge migrate`.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// Config file (TOML).
    #[arg(long)]
    pub config: std::path::PathBuf,
}

/// Runs a migration and returns the exit code.
pub async fn run(_args: MigrateArgs) -> ExitCode {
    ExitCode::FAILURE
}
