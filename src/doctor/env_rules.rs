//! Lints of one Mastodon env file (`.env.production`), as dotenv and Mastodon read it.
//!
//! Every rule id is listed with its meaning and fix in `docs/doctor.md`. Facts and sources are
//! in `shared/MASTODON.md` §1 and §4.

use std::collections::BTreeMap;

use super::finding::{Finding, Severity};
use crate::mastodon::dotenv::EnvFile;
use crate::mastodon::keys::{self, Kind};

/// Keys Mastodon says "cannot be defined in dotenv files" (they are read before dotenv runs).
const PROCESS_ONLY: &[&str] = &["RAILS_ENV", "PORT", "BIND", "SOCKET", "NODE_ENV"];

/// One file being linted, and what was found so far.
pub(super) struct Lint<'a> {
    pub(super) env: &'a EnvFile,
    pub(super) file: String,
    pub(super) out: Vec<Finding>,
    /// Lines following an unclosed quote in the whole file
    /// ([`continuation_lines`](super::redact::continuation_lines)).
    continuation: BTreeMap<usize, usize>,
}

impl Lint<'_> {
    pub(super) fn add(
        &mut self,
        sev: Severity,
        rule: &'static str,
        key: Option<&str>,
        msg: String,
        fix: String,
    ) {
        self.out
            .push(Finding::new(sev, rule, self.file.clone(), key, msg, fix));
    }

    fn line(&self, key: &str) -> String {
        self.env
            .last(key)
            .map(|e| format!("line {}", e.line))
            .unwrap_or_default()
    }
}

/// Runs every env rule on one file.
///
/// Assignments whose key name looks like a value (see [`keys::is_displayable_key`]) are
/// reported once, by line, as `env-key-looks-like-value`, and left out of every other rule, so
/// that no rule prints such a name.
pub fn lint(env: &EnvFile) -> Vec<Finding> {
    let (named, odd) = split_names(env);
    let mut l = Lint {
        env: &named,
        file: env.path.display().to_string(),
        out: Vec::new(),
        continuation: super::redact::continuation_lines(env),
    };
    for line in odd {
        l.add(
            Severity::Warning,
            "env-key-looks-like-value",
            None,
            format!(
                "line {line} sets a variable whose name looks like a value (a token, a pasted \
                 secret, or the rest of a quoted value that spans lines); dotenv sets it \
                 silently. The name is not shown."
            ),
            format!(
                "Look at line {line}: if a quoted value above it spans lines, check its closing \
                 quote; if it is a stray secret, delete it (and rotate that secret if this file \
                 was shared)."
            ),
        );
    }
    syntax(&mut l);
    per_key(&mut l);
    super::storage_rules::storage(&mut l);
    hosts(&mut l);
    l.out
}

/// `env` without the assignments whose name must not be printed
/// ([`redact::name_hidden`](super::redact::name_hidden)), and the lines of those.
pub fn split_names(env: &EnvFile) -> (EnvFile, Vec<usize>) {
    let continuation = super::redact::continuation_lines(env);
    let mut named = env.clone();
    let mut odd = Vec::new();
    named.entries.retain(|e| {
        let hidden = super::redact::name_hidden(e, &continuation);
        if hidden {
            odd.push(e.line);
        }
        !hidden
    });
    (named, odd)
}

/// Lines dotenv skips or refuses, duplicates, values cut or substituted.
fn syntax(l: &mut Lint) {
    for e in &l.env.entries {
        if super::redact::opens_unclosed_quote(e) {
            l.add(
                Severity::Warning,
                "env-quote-unclosed",
                Some(&e.key),
                format!(
                    "line {}: the value of {} starts with a quote that is never closed, so \
                     dotenv keeps the quote character as part of the value and reads the lines \
                     below as lines of their own.",
                    e.line, e.key
                ),
                "Add the missing closing quote after the last character of the value (a quoted \
                 value may span lines)."
                    .into(),
            );
        }
    }
    for s in &l.env.skipped {
        // Never the line itself: its value may be a secret in any shape.
        let (key, shape) = match l.continuation.get(&s.line) {
            Some(from) => (
                None,
                format!("<line hidden>: it follows the unclosed quote of line {from}"),
            ),
            None => super::redact::skipped_shape(&s.text),
        };
        l.add(
            Severity::Warning,
            "env-line-ignored",
            key.as_deref(),
            format!(
                "line {} is not a dotenv assignment, so Mastodon skips it without a word \
                 (keys may only contain letters, digits, `_` and `.`): {shape}.",
                s.line
            ),
            "Write it as KEY=value with a valid key, or make it a comment with `#`.".into(),
        );
    }
    for s in &l.env.unset_exports {
        // `export KEY [# comment]`: the key only, never the comment.
        let key: String = s
            .text
            .trim_start_matches("export")
            .trim_start()
            .chars()
            .take_while(|&c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
            .collect();
        let key = keys::shown_key(&key).to_owned();
        l.add(
            Severity::Error,
            "env-export-unset",
            Some(&key),
            format!(
                "line {}: `export {key}` has no value and {key} is not set earlier in the file: \
                 dotenv raises Dotenv::FormatError and Mastodon does not start.",
                s.line
            ),
            format!("Give it a value (`export {key}=...`) or delete the line."),
        );
    }
    let mut seen: BTreeMap<&str, Vec<&crate::mastodon::dotenv::Entry>> = BTreeMap::new();
    for e in &l.env.entries {
        seen.entry(e.key.as_str()).or_default().push(e);
    }
    for (key, entries) in &seen {
        if entries.len() < 2 {
            continue;
        }
        let lines: Vec<String> = entries.iter().map(|e| e.line.to_string()).collect();
        let last = entries.last().expect("two entries");
        let differ = entries.iter().any(|e| e.value != last.value);
        l.add(
            if differ {
                Severity::Warning
            } else {
                Severity::Info
            },
            "env-duplicate-key",
            Some(key),
            format!(
                "{key} is set on lines {}{}; dotenv keeps the last one (line {}).",
                lines.join(", "),
                if differ { " with different values" } else { "" },
                last.line
            ),
            "Keep one line per key.".into(),
        );
    }
    let mut quoted = Vec::new();
    for e in l.env.entries.iter() {
        if l.env.last(&e.key).map(|x| x.line) != Some(e.line) {
            continue;
        }
        if e.cut_at_hash {
            l.add(
                Severity::Warning,
                "env-value-cut-at-hash",
                Some(&e.key),
                format!(
                    "line {}: in an unquoted value `#` starts a comment, so the value of {} \
                     ends just before the `#` (now {}).",
                    e.line,
                    e.key,
                    keys::shown(&e.key, &e.value)
                ),
                "Put the value in single quotes: KEY='value#with-hash'.".into(),
            );
        }
        if !e.undefined_refs.is_empty() {
            // The names after `$` are part of the value: shown only for non-secret keys.
            let refs = if keys::is_secret(&e.key) {
                format!(
                    "{} `$NAME` reference(s) (not shown: the value is secret)",
                    e.undefined_refs.len()
                )
            } else {
                e.undefined_refs
                    .iter()
                    .map(|v| format!("${v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            l.add(
                Severity::Warning,
                "env-value-substituted",
                Some(&e.key),
                format!(
                    "line {}: dotenv replaces {refs} in the value of {} with the variable's value \
                     from the environment (usually empty): a `$` in a password is silently eaten.",
                    e.line, e.key
                ),
                "If the `$` is literal, put the value in single quotes (KEY='pa$$word') or \
                 escape it as `\\$`."
                    .into(),
            );
        }
        if e.command_substitution {
            l.add(
                Severity::Info,
                "env-value-command",
                Some(&e.key),
                format!(
                    "line {}: the value of {} runs a command through `$(...)` each time Mastodon \
                     loads the file.",
                    e.line, e.key
                ),
                "Fine if intended; single-quote the value if the `$(` is literal.".into(),
            );
        }
        if e.quote.is_some() {
            quoted.push(e.key.clone());
        }
    }
    if !quoted.is_empty() {
        l.add(
            Severity::Info,
            "env-quoted-value",
            Some(&quoted.join(",")),
            format!(
                "{} quoted value(s). dotenv strips the quotes, but Docker Compose's `env_file:` \
                 kept them verbatim in older versions (mastodon/mastodon#16895, #33382).",
                quoted.len()
            ),
            "Only if this file is also used as a Compose env_file: drop the quotes where the \
             value has no spaces or `#`."
                .into(),
        );
    }
}

/// Rules that look at one key at a time.
fn per_key(l: &mut Lint) {
    let map = l.env.map();
    for (key, value) in &map {
        let at = l.line(key);
        match keys::kind(key) {
            Some(Kind::Bool) => boolean(l, key, value, &at),
            Some(_) => {}
            None if keys::is_known(key) => {}
            None => {
                if let Some(meant) = keys::closest_known(key) {
                    let absent = !map.contains_key(meant);
                    l.add(
                        if absent {
                            Severity::Error
                        } else {
                            Severity::Warning
                        },
                        "env-unknown-key",
                        Some(key),
                        format!(
                            "{at}: Mastodon does not read {key}; did you mean {meant}? {}",
                            if absent {
                                format!(
                                    "{meant} is not set at all, so Mastodon treats it as unset."
                                )
                            } else {
                                format!("{meant} is also set, so this line is dead.")
                            }
                        ),
                        format!("Rename {key} to {meant} (environment names are case-sensitive)."),
                    );
                }
            }
        }
        if PROCESS_ONLY.contains(&key.as_str()) {
            l.add(
                Severity::Warning,
                "env-process-only",
                Some(key),
                format!(
                    "{at}: {key} cannot be set in a dotenv file: it is read before dotenv loads \
                     (config/boot.rb aborts without RAILS_ENV), so this line has no effect."
                ),
                format!(
                    "Set {key} in the systemd unit (Environment=\"{key}=...\") and delete it here."
                ),
            );
        }
        if key == "SIDEKIQ_CONCURRENCY" {
            l.add(
                Severity::Warning,
                "env-sidekiq-concurrency-ignored",
                Some(key),
                format!(
                    "{at}: SIDEKIQ_CONCURRENCY in a dotenv file is ignored: config/sidekiq.yml is \
                     evaluated before Rails loads dotenv, so Sidekiq runs 5 threads unless `-c` \
                     or the unit's environment says otherwise."
                ),
                "Use `-c N` in the Sidekiq unit's ExecStart, or Environment=\"SIDEKIQ_CONCURRENCY=N\".".into(),
            );
        }
        if key == "REDIS_NAMESPACE" {
            l.add(
                Severity::Error,
                "env-redis-namespace",
                Some(key),
                format!(
                    "{at}: REDIS_NAMESPACE was deprecated in 4.3 and Mastodon 4.4+ aborts at boot \
                     when it is set."
                ),
                "Migrate the keys with mastodon/redis_namespace_migration, set ES_PREFIX to the \
                 old namespace if Elasticsearch is used, then remove REDIS_NAMESPACE."
                    .into(),
            );
        }
        if key == "SIDEKIQ_REDIS_NAMESPACE" || key == "CACHE_REDIS_NAMESPACE" {
            l.add(
                Severity::Warning,
                "env-ignored-key",
                Some(key),
                format!("{at}: {key} is documented but no Mastodon version ever read it."),
                "Delete it; it does not separate anything.".into(),
            );
        }
    }
    if !map.contains_key("LOCAL_DOMAIN") {
        l.add(
            Severity::Error,
            "env-local-domain",
            Some("LOCAL_DOMAIN"),
            "LOCAL_DOMAIN is not set: Mastodon falls back to `localhost:3000` and every \
             federated identity and URL is wrong."
                .into(),
            "Set LOCAL_DOMAIN=example.com (the domain in your users' handles; never change it \
             after federation started)."
                .into(),
        );
    }
    if !map.contains_key("SECRET_KEY_BASE") {
        l.add(
            Severity::Warning,
            "env-secret-missing",
            Some("SECRET_KEY_BASE"),
            "SECRET_KEY_BASE is not set in this file; Mastodon refuses to start without it \
             unless the service environment provides it."
                .into(),
            "Generate one with `bundle exec rails secret` and set it on every node (the same value).".into(),
        );
    }
}

fn boolean(l: &mut Lint, key: &str, value: &str, at: &str) {
    if value == "true" || value == "false" {
        return;
    }
    let lower = value.trim().to_ascii_lowercase();
    let meant_true = matches!(
        lower.as_str(),
        "true" | "1" | "yes" | "y" | "on" | "enabled" | "t"
    );
    let meant_false = matches!(
        lower.as_str(),
        "false" | "0" | "no" | "n" | "off" | "disabled" | "f" | ""
    );
    let (sev, what) = if meant_true {
        (
            Severity::Error,
            "so it means FALSE: the setting is off although it looks on",
        )
    } else if meant_false {
        (
            Severity::Warning,
            "so it means false, as intended, but only by accident",
        )
    } else {
        (Severity::Error, "so this value means false")
    };
    l.add(
        sev,
        "env-bool",
        Some(key),
        format!(
            "{at}: {key}={}: Mastodon compares {key} with the exact string 'true' \
             (case-sensitive); anything else, including TRUE, True, 1 and yes, is false, {what}.",
            keys::shown(key, value)
        ),
        format!(
            "Write {key}={} (lower case).",
            if meant_true { "true" } else { "false" }
        ),
    );
}

/// Domains and CDN_HOST.
fn hosts(l: &mut Lint) {
    let env = l.env;
    for k in ["LOCAL_DOMAIN", "WEB_DOMAIN"] {
        if let Some(v) = env.get(k) {
            if v.is_empty()
                || v.contains("://")
                || v.contains('/')
                || v.contains(char::is_whitespace)
            {
                l.add(
                    Severity::Error,
                    "env-domain",
                    Some(k),
                    format!(
                        "{k}={} must be a bare domain (no scheme, no path, no slash).",
                        keys::shown(k, v)
                    ),
                    format!(
                        "Write {k}={}",
                        super::storage_rules::host_of(&keys::redact_userinfo(v))
                    ),
                );
            }
        }
    }
    if let Some(v) = env.get("CDN_HOST") {
        if v.is_empty() {
            l.add(
                Severity::Warning,
                "env-cdn-host",
                Some("CDN_HOST"),
                "CDN_HOST is present but empty.".into(),
                "Delete the line or set a full URL such as https://assets.example.com.".into(),
            );
        } else if !(v.starts_with("https://") || v.starts_with("http://")) {
            l.add(
                Severity::Error,
                "env-cdn-host",
                Some("CDN_HOST"),
                format!(
                    "CDN_HOST={} has no scheme: it becomes Rails' asset_host and the base of \
                     local media URLs, which then break (mastodon/mastodon#1044).",
                    keys::shown("CDN_HOST", v)
                ),
                format!("Write CDN_HOST=https://{}", keys::redact_userinfo(v)),
            );
        }
    }
}
