//! Lints of the deployment's Sidekiq systemd units, taken together: every queue served,
//! `scheduler` in exactly one process, `DB_POOL` ≥ threads, media paths writable.
//!
//! Facts and sources: `shared/MASTODON.md` §3 (queues, CLI precedence, DB_POOL default, the
//! shipped unit) and §4 (Hachyderm's `-q default`, the missing `ingress` after 4.0, EROFS).

use std::path::{Path, PathBuf};

use super::finding::{Finding, Severity};
use crate::mastodon::dotenv::EnvFile;
use crate::mastodon::sidekiq::{self, SidekiqCommand, DEFAULT_CONCURRENCY, QUEUES};
use crate::mastodon::systemd::Unit;
use crate::mastodon::{backend, Backend, DEFAULT_MEDIA_ROOT};

/// Queues that only exist since a recent Mastodon: missing them is a warning, not an error.
const RECENT_QUEUES: &[(&str, &str)] = &[("fasp", "4.4")];

struct Served {
    file: String,
    queues: Vec<String>,
}

/// Lints every unit in `paths`; `envs` are the Mastodon env files of the same deployment
/// (for inherited `DB_POOL`, `SIDEKIQ_CONCURRENCY` and `PAPERCLIP_ROOT_PATH`).
pub fn lint(paths: &[PathBuf], envs: &[EnvFile]) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut served: Vec<Served> = Vec::new();
    for path in paths {
        let file = path.display().to_string();
        let unit = match Unit::load(path) {
            Ok(u) => u,
            Err(e) => {
                out.push(Finding::new(
                    Severity::Error,
                    "unit-unreadable",
                    file,
                    None,
                    format!("cannot read the unit: {e}"),
                    "Check the path given to --sidekiq-unit.",
                ));
                continue;
            }
        };
        let cmd = unit.exec_start.as_deref().and_then(sidekiq::parse_command);
        let Some(cmd) = cmd else {
            out.push(Finding::new(
                Severity::Error,
                "unit-not-sidekiq",
                file,
                Some("ExecStart"),
                "this unit has no ExecStart that runs `sidekiq`, so it serves no queue.",
                "Pass only Sidekiq units to --sidekiq-unit, or fix ExecStart \
                 (e.g. `/home/mastodon/.rbenv/shims/bundle exec sidekiq -c 25`).",
            ));
            continue;
        };
        lint_unit(&unit, &cmd, &file, envs, &mut out);
        let queues = if cmd.queues.is_empty() {
            QUEUES.iter().map(|q| q.to_string()).collect()
        } else {
            cmd.queues.iter().map(|q| q.name.clone()).collect()
        };
        served.push(Served { file, queues });
    }
    if !served.is_empty() {
        coverage(&served, &mut out);
    }
    out
}

fn lint_unit(
    unit: &Unit,
    cmd: &SidekiqCommand,
    file: &str,
    envs: &[EnvFile],
    out: &mut Vec<Finding>,
) {
    let at = format!("line {}", unit.exec_start_line);
    let (env, unreadable) = unit.full_environment();
    for f in unreadable.iter().filter(|f| !f.optional) {
        out.push(Finding::new(
            Severity::Info,
            "unit-env-file-unread",
            file,
            Some("EnvironmentFile"),
            format!(
                "EnvironmentFile={} cannot be read here, so its values were not checked \
                 (systemd refuses to start the unit if it is missing on the server).",
                f.path.display()
            ),
            "Run the doctor on the server, or pass that file with --mastodon-env.",
        ));
    }
    match env.get("RAILS_ENV").map(String::as_str) {
        None => out.push(Finding::new(
            Severity::Error,
            "sidekiq-rails-env",
            file,
            Some("Environment"),
            "the unit does not set RAILS_ENV: config/boot.rb aborts without it, and a dotenv \
             file cannot provide it.",
            "Add Environment=\"RAILS_ENV=production\" to [Service].",
        )),
        Some("production") => {}
        Some(other) => out.push(Finding::new(
            Severity::Warning,
            "sidekiq-rails-env",
            file,
            Some("Environment"),
            format!("RAILS_ENV={other:?}: Mastodon reads .env.production only in production."),
            "Use Environment=\"RAILS_ENV=production\".",
        )),
    }

    // Threads: `-c`, else SIDEKIQ_CONCURRENCY from the unit's environment, else 5.
    let (threads, threads_from) = match &cmd.concurrency {
        Some(c) => match c.parse::<u32>() {
            Ok(n) if n > 0 => (n, format!("`-c {n}`")),
            _ => {
                out.push(Finding::new(
                    Severity::Error,
                    "sidekiq-concurrency",
                    file,
                    Some("-c"),
                    format!("{at}: `-c {c}` is not a positive number of threads."),
                    "Give a number, e.g. `-c 25`.",
                ));
                return;
            }
        },
        None => match env.get("SIDEKIQ_CONCURRENCY").map(|v| v.parse::<u32>()) {
            Some(Ok(n)) if n > 0 => (n, format!("SIDEKIQ_CONCURRENCY={n} in the unit")),
            _ => (DEFAULT_CONCURRENCY, "the default (no -c)".to_owned()),
        },
    };
    if cmd.concurrency.is_none() && !env.contains_key("SIDEKIQ_CONCURRENCY") {
        if let Some((f, v)) = envs
            .iter()
            .find_map(|e| e.get("SIDEKIQ_CONCURRENCY").map(|v| (e, v)))
            .filter(|(_, v)| *v != DEFAULT_CONCURRENCY.to_string())
        {
            out.push(Finding::new(
                Severity::Warning,
                "sidekiq-concurrency-ignored",
                file,
                Some("-c"),
                format!(
                    "{at}: no `-c` and no SIDEKIQ_CONCURRENCY in the unit, so this process runs \
                     {DEFAULT_CONCURRENCY} threads: SIDEKIQ_CONCURRENCY={v} in {} is read too late \
                     to count.",
                    f.path.display()
                ),
                format!("Add `-c {v}` to ExecStart."),
            ));
        }
    }

    // DB_POOL: the unit's environment, else inherited from the dotenv file, else = threads.
    let pool = match env.get("DB_POOL") {
        Some(v) => Some((v.clone(), "the unit's environment".to_owned())),
        None => envs
            .iter()
            .filter_map(|e| {
                e.get("DB_POOL")
                    .map(|v| (v.to_owned(), e.path.display().to_string()))
            })
            .min_by_key(|(v, _)| v.parse::<u64>().unwrap_or(0)),
    };
    if let Some((v, from)) = pool {
        match v.parse::<u32>() {
            Ok(p) if p >= threads => {}
            Ok(p) => out.push(Finding::new(
                Severity::Error,
                "sidekiq-db-pool",
                file,
                Some("DB_POOL"),
                format!(
                    "DB_POOL={p} (from {from}) is less than the {threads} Sidekiq threads \
                     ({threads_from}): jobs wait for a connection and fail with \
                     ActiveRecord::ConnectionTimeoutError."
                ),
                format!(
                    "Set Environment=\"DB_POOL={threads}\" in this unit (or remove DB_POOL \
                     everywhere: Sidekiq then gets exactly its concurrency)."
                ),
            )),
            Err(_) => out.push(Finding::new(
                Severity::Error,
                "sidekiq-db-pool",
                file,
                Some("DB_POOL"),
                format!("DB_POOL={v:?} (from {from}) is not a number."),
                format!("Set Environment=\"DB_POOL={threads}\"."),
            )),
        }
    }

    for q in &cmd.queues {
        if !QUEUES.contains(&q.name.as_str()) {
            let near = QUEUES
                .iter()
                .min_by_key(|k| strsim::damerau_levenshtein(k, &q.name))
                .filter(|k| strsim::damerau_levenshtein(k, &q.name) <= 2);
            out.push(Finding::new(
                Severity::Warning,
                "sidekiq-unknown-queue",
                file,
                Some("-q"),
                format!(
                    "{at}: `-q {}`: Mastodon enqueues nothing on a queue named {:?}{}.",
                    q.name,
                    q.name,
                    near.map(|n| format!("; did you mean {n:?}?"))
                        .unwrap_or_default()
                ),
                format!("Mastodon's queues are {}.", QUEUES.join(", ")),
            ));
        }
        if let Some(w) = &q.weight {
            if w.parse::<u32>().is_err() {
                out.push(Finding::new(
                    Severity::Warning,
                    "sidekiq-queue-weight",
                    file,
                    Some("-q"),
                    format!(
                        "{at}: `-q {},{w}`: the weight must be a whole number.",
                        q.name
                    ),
                    format!("Write `-q {},N` with N ≥ 1.", q.name),
                ));
            }
        }
    }

    media_paths(unit, &env, file, envs, out);
}

/// With `ProtectSystem=strict` everything is read-only except `ReadWritePaths=`: the local
/// media directory must be in it, or uploads fail with `Errno::EROFS`.
fn media_paths(
    unit: &Unit,
    env: &std::collections::BTreeMap<String, String>,
    file: &str,
    envs: &[EnvFile],
    out: &mut Vec<Finding>,
) {
    if unit.protect_system.as_deref() != Some("strict") {
        return;
    }
    let mut roots: Vec<(PathBuf, String)> = Vec::new();
    if let Some(p) = env.get("PAPERCLIP_ROOT_PATH") {
        roots.push((PathBuf::from(p), "the unit's environment".into()));
    } else if envs.is_empty() {
        roots.push((PathBuf::from(DEFAULT_MEDIA_ROOT), "the default".into()));
    } else {
        for e in envs.iter().filter(|e| backend(e) == Backend::Local) {
            let (p, from) = match e.get("PAPERCLIP_ROOT_PATH") {
                Some(p) => (PathBuf::from(p), e.path.display().to_string()),
                None => (PathBuf::from(DEFAULT_MEDIA_ROOT), "the default".into()),
            };
            roots.push((p, from));
        }
    }
    let workdir = unit
        .working_directory
        .clone()
        .unwrap_or_else(|| PathBuf::from("/home/mastodon/live"));
    for (root, from) in roots {
        let root = if root.is_absolute() {
            root
        } else {
            workdir.join(root)
        };
        let covered = unit
            .read_write_paths
            .iter()
            .any(|rw| Path::new(&root).starts_with(rw));
        if !covered {
            out.push(Finding::new(
                Severity::Error,
                "sidekiq-read-only-media",
                file,
                Some("ReadWritePaths"),
                format!(
                    "ProtectSystem=strict makes everything read-only except ReadWritePaths ({}), \
                     but media is written to {} (PAPERCLIP_ROOT_PATH, {from}): uploads and remote \
                     media fetches fail with Errno::EROFS (mastodon/mastodon#21860).",
                    if unit.read_write_paths.is_empty() {
                        "none".to_owned()
                    } else {
                        unit.read_write_paths
                            .iter()
                            .map(|p| p.display().to_string())
                            .collect::<Vec<_>>()
                            .join(" ")
                    },
                    root.display()
                ),
                format!(
                    "Add `ReadWritePaths={}` to this unit and to mastodon-web.service.",
                    root.display()
                ),
            ));
        }
    }
}

/// Every queue served by some process, `scheduler` by exactly one.
fn coverage(served: &[Served], out: &mut Vec<Finding>) {
    let all_files = served
        .iter()
        .map(|s| s.file.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    for &q in QUEUES {
        let by: Vec<&str> = served
            .iter()
            .filter(|s| s.queues.iter().any(|x| x == q))
            .map(|s| s.file.as_str())
            .collect();
        if by.is_empty() {
            let recent = RECENT_QUEUES.iter().find(|(name, _)| *name == q);
            let (sev, rule, msg) = if q == "scheduler" {
                (
                    Severity::Error,
                    "sidekiq-scheduler-missing",
                    "no Sidekiq process serves the `scheduler` queue: sidekiq-scheduler only \
                     enqueues cron jobs from a process listening on it, so no scheduled job runs \
                     (media cleanup, trends, backups, ...)."
                        .to_owned(),
                )
            } else if let Some((_, since)) = recent {
                (
                    Severity::Warning,
                    "sidekiq-queue-unserved",
                    format!(
                        "no Sidekiq process serves the `{q}` queue (used since Mastodon {since}): \
                         its jobs pile up."
                    ),
                )
            } else {
                (
                    Severity::Error,
                    "sidekiq-queue-unserved",
                    format!(
                        "no Sidekiq process serves the `{q}` queue: its jobs pile up in Redis and \
                         never run (any `-q` replaces the whole queue list of sidekiq.yml)."
                    ),
                )
            };
            out.push(Finding::new(
                sev,
                rule,
                all_files.clone(),
                Some(q),
                msg,
                format!(
                    "Add `-q {q}` to one unit's ExecStart, or drop every `-q` from a unit so it \
                     serves all queues of config/sidekiq.yml."
                ),
            ));
        }
        if q == "scheduler" && by.len() > 1 {
            out.push(Finding::new(
                Severity::Error,
                "sidekiq-scheduler-multiple",
                by.join(", "),
                Some("scheduler"),
                format!(
                    "{} processes serve the `scheduler` queue ({}); it must run in exactly one, \
                     or cron jobs run twice or are skipped (mastodon/mastodon#14764).",
                    by.len(),
                    by.join(", ")
                ),
                "Keep `scheduler` in one unit; give the others explicit `-q` lists without it."
                    .to_owned(),
            ));
        }
    }
}
