//! Facts about Mastodon deployments: env files, Sidekiq units. (Being built: issue 4.)

use std::path::Path;
use std::process::ExitCode;

/// `fediedge config from-mastodon FILE`: prints the equivalent fediedge config.
pub fn from_mastodon_command(_file: &Path) -> ExitCode {
    ExitCode::FAILURE
}
