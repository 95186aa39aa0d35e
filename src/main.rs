//! The `fediedge` binary: parse the command line and hand over to the library.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = fediedge::cli::Cli::parse();
    fediedge::cli::init_tracing();
    fediedge::cli::run(cli)
}
