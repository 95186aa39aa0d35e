//! `fediedge doctor`: lints of Mastodon env files, Sidekiq units and fediedge's own config,
//! and live probes of the configured stores.
//!
//! - [`finding`]: findings, severities, human and JSON output, the exit code.
//! - [`env_rules`]: one Mastodon env file, as dotenv and Mastodon read it.
//! - [`storage_rules`]: the media storage keys of one env file (S3, Swift, Azure, local).
//! - [`sidekiq`]: the Sidekiq units together (queues, scheduler, DB_POOL, writable paths).
//! - [`drift`]: several nodes' env files against each other.
//! - [`probe`]: live checks of the stores of a fediedge config.
//!
//! Every rule is documented in `docs/doctor.md`. No finding ever prints a secret value.

pub mod drift;
pub mod env_rules;
pub mod finding;
pub mod probe;
pub mod redact;
pub mod sidekiq;
pub mod storage_rules;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub use finding::{Finding, Severity};

use crate::config::ConfigError;
use crate::mastodon::dotenv::EnvFile;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One block per finding, for people.
    Human,
    /// `{"findings": [{"severity", "file", "key", "message", "rule", "fix"}, …]}`.
    Json,
}

/// Arguments of `fediedge doctor`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// fediedge config file to check with the same code `serve` uses at start.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Mastodon env files (`.env.production`), one per node; `NODE=PATH` names the node in
    /// drift reports (default: the path). Several files are compared with each other.
    #[arg(long = "mastodon-env", value_name = "[NODE=]FILE", num_args = 1..)]
    pub mastodon_env: Vec<String>,
    /// Every Sidekiq systemd unit of the deployment (checked together: every queue served,
    /// `scheduler` in exactly one).
    #[arg(long = "sidekiq-unit", value_name = "FILE", num_args = 1..)]
    pub sidekiq_unit: Vec<PathBuf>,
    /// Probe every store of `--config` live: reachable, credentials accepted.
    #[arg(long)]
    pub probe: bool,
    /// Also write, read back and delete a small object in every writable store (implies
    /// `--probe`).
    #[arg(long)]
    pub probe_write: bool,
    /// Canary key that must exist in every store and is read through (default: a key that
    /// surely does not exist, which each store must answer as absent).
    #[arg(long, value_name = "KEY")]
    pub probe_key: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    pub format: Format,
}

/// Runs the doctor; the exit code is 2 on any error, 1 on warnings only, 0 when clean.
pub fn run(args: DoctorArgs) -> ExitCode {
    let mut findings = check(&args);
    // Errors first, then warnings, then info; the order of discovery within each.
    findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
    match args.format {
        Format::Json => println!("{}", finding::to_json(&findings)),
        Format::Human => print!("{}", finding::to_human(&findings)),
    }
    ExitCode::from(finding::exit_code(&findings))
}

/// Splits `NODE=PATH` (a name without `/`) from a plain path.
pub fn node_spec(spec: &str) -> (String, PathBuf) {
    if let Some((name, path)) = spec.split_once('=') {
        if !name.is_empty() && !name.contains('/') && !Path::new(spec).exists() {
            return (name.to_owned(), PathBuf::from(path));
        }
    }
    (spec.to_owned(), PathBuf::from(spec))
}

/// Runs every check the arguments ask for and returns the findings, scrubbed of every secret
/// text of the env files read ([`redact::Secrets`]).
pub fn check(args: &DoctorArgs) -> Vec<Finding> {
    let mut secrets = redact::Secrets::default();
    let mut out = check_all(args, &mut secrets);
    for f in &mut out {
        secrets.scrub_finding(f);
    }
    out
}

fn check_all(args: &DoctorArgs, secrets: &mut redact::Secrets) -> Vec<Finding> {
    let mut out = Vec::new();
    let probe = args.probe || args.probe_write;
    if args.config.is_none() && args.mastodon_env.is_empty() && args.sidekiq_unit.is_empty() {
        out.push(Finding::new(
            Severity::Error,
            "doctor-nothing-to-check",
            "-",
            None,
            "nothing to check.",
            "Give --config, --mastodon-env and/or --sidekiq-unit.",
        ));
        return out;
    }
    if let Some(path) = &args.config {
        out.extend(check_config(path, probe, args, secrets));
    } else if probe {
        out.push(Finding::new(
            Severity::Error,
            "probe-no-config",
            "-",
            Some("--probe"),
            "--probe needs the fediedge config whose stores it should probe.",
            "Add --config /etc/fediedge/fediedge.toml.",
        ));
    }
    let mut nodes = Vec::new();
    for spec in &args.mastodon_env {
        let (name, path) = node_spec(spec);
        match EnvFile::load(&path) {
            Ok(env) => {
                secrets.add_env(&env);
                out.extend(env_rules::lint(&env));
                // Drift compares only the assignments whose names may be printed.
                let (env, _) = env_rules::split_names(&env);
                nodes.push(drift::Node { name, env });
            }
            Err(e) => out.push(Finding::new(
                Severity::Error,
                "env-unreadable",
                path.display().to_string(),
                None,
                format!("cannot read the env file: {e}"),
                "Check the path given to --mastodon-env.",
            )),
        }
    }
    out.extend(drift::lint(&nodes));
    let envs: Vec<EnvFile> = nodes.into_iter().map(|n| n.env).collect();
    out.extend(sidekiq::lint(&args.sidekiq_unit, &envs));
    out
}

/// Loads the fediedge config with `serve`'s own loader, then probes it if asked.
fn check_config(
    path: &Path,
    probe: bool,
    args: &DoctorArgs,
    secrets: &mut redact::Secrets,
) -> Vec<Finding> {
    let file = path.display().to_string();
    let config = match crate::config::load(path) {
        Ok(c) => c,
        Err(e) => {
            let key = match &e {
                ConfigError::Invalid { key, .. } => Some(key.as_str()),
                _ => None,
            };
            return vec![Finding::new(
                Severity::Error,
                "config-invalid",
                file,
                key,
                format!("`fediedge serve` would refuse this config: {e}"),
                "Fix the key named in the message (see the config reference).",
            )];
        }
    };
    secrets.add_config(&config);
    if !probe {
        return Vec::new();
    }
    let opts = probe::ProbeOptions {
        key: args.probe_key.clone(),
        write: args.probe_write,
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return vec![Finding::new(
                Severity::Error,
                "probe-runtime",
                file,
                None,
                format!("cannot start the async runtime: {e}"),
                "Retry; check the process limits.",
            )]
        }
    };
    rt.block_on(probe::probe(&config, &file, &opts))
}
