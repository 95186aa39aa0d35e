//! Lints of one Mastodon env file (`.env.production`), as dotenv and Mastodon read it.
//!
//! Every rule id is listed with its meaning and fix in `docs/doctor.md`. Facts and sources are
//! in `shared/MASTODON.md` §1 and §4.

use std::collections::BTreeMap;

use super::finding::{Finding, Severity};
use crate::mastodon::dotenv::EnvFile;
use crate::mastodon::keys::{self, Kind};
use crate::mastodon::Backend;

/// Keys Mastodon says "cannot be defined in dotenv files" (they are read before dotenv runs).
const PROCESS_ONLY: &[&str] = &["RAILS_ENV", "PORT", "BIND", "SOCKET", "NODE_ENV"];

/// S3 canned ACLs.
const ACLS: &[&str] = &[
    "private",
    "public-read",
    "public-read-write",
    "authenticated-read",
    "aws-exec-read",
    "bucket-owner-read",
    "bucket-owner-full-control",
];

struct Lint<'a> {
    env: &'a EnvFile,
    file: String,
    out: Vec<Finding>,
}

impl Lint<'_> {
    fn add(
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
pub fn lint(env: &EnvFile) -> Vec<Finding> {
    let mut l = Lint {
        env,
        file: env.path.display().to_string(),
        out: Vec::new(),
    };
    syntax(&mut l);
    per_key(&mut l);
    storage(&mut l);
    hosts(&mut l);
    l.out
}

/// Lines dotenv skips or refuses, duplicates, values cut or substituted.
fn syntax(l: &mut Lint) {
    for s in &l.env.skipped {
        let shown_part = s.text.split('=').next().unwrap_or("").trim().to_owned();
        l.add(
            Severity::Warning,
            "env-line-ignored",
            Some(&shown_part),
            format!(
                "line {} is not a dotenv assignment, so Mastodon skips it without a word \
                 (keys may only contain letters, digits, `_` and `.`).",
                s.line
            ),
            "Write it as KEY=value with a valid key, or make it a comment with `#`.".into(),
        );
    }
    for s in &l.env.unset_exports {
        let key = s.text.trim_start_matches("export").trim().to_owned();
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
            l.add(
                Severity::Warning,
                "env-value-substituted",
                Some(&e.key),
                format!(
                    "line {}: dotenv replaces {} in the value of {} with the variable's value \
                     from the environment (usually empty): a `$` in a password is silently eaten.",
                    e.line,
                    e.undefined_refs
                        .iter()
                        .map(|v| format!("${v}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    e.key
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
                                format!("{meant} is not set at all, so Mastodon uses its default.")
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
            "{at}: {key}={value:?}: Mastodon compares {key} with the exact string 'true' \
             (case-sensitive); anything else, including TRUE, True, 1 and yes, is false, {what}."
        ),
        format!(
            "Write {key}={} (lower case).",
            if meant_true { "true" } else { "false" }
        ),
    );
}

/// Which storage backend Mastodon will use, and the checks that follow from it.
fn storage(l: &mut Lint) {
    let env = l.env;
    let backend = crate::mastodon::backend(env);
    let enabled: Vec<&str> = ["S3_ENABLED", "SWIFT_ENABLED", "AZURE_ENABLED"]
        .into_iter()
        .filter(|k| env.is_true(k))
        .collect();
    if enabled.len() > 1 {
        l.add(
            Severity::Warning,
            "env-multiple-backends",
            Some(&enabled.join(",")),
            format!(
                "{} are all 'true'; Mastodon uses only the first of S3, Swift, Azure ({:?}) and \
                 ignores the others.",
                enabled.join(", "),
                backend
            ),
            "Set only one of them to true.".into(),
        );
    }
    let s3_keys: Vec<&str> = ["S3_BUCKET", "S3_ENDPOINT", "S3_ALIAS_HOST", "S3_HOSTNAME"]
        .into_iter()
        .filter(|k| env.has(k))
        .collect();
    let typo_bucket = env.entries.iter().any(|e| {
        !keys::is_known(&e.key) && keys::closest_known(&e.key).is_some_and(|k| k.starts_with("S3_"))
    });
    if backend != Backend::S3 && (!s3_keys.is_empty() || typo_bucket) {
        let state = match env.get("S3_ENABLED") {
            Some(v) => format!("S3_ENABLED={v:?}, which is not 'true'"),
            None => "S3_ENABLED is not set".into(),
        };
        l.add(
            Severity::Warning,
            "env-s3-disabled",
            Some("S3_ENABLED"),
            format!(
                "{state}, but S3 settings are present: Mastodon stores and links media on the \
                 local filesystem ({}), and these S3 settings are ignored.",
                env.get("PAPERCLIP_ROOT_PATH")
                    .unwrap_or("/home/mastodon/live/public/system")
            ),
            "If media lives in S3, set S3_ENABLED=true; otherwise delete the S3_* lines.".into(),
        );
    }
    match backend {
        Backend::S3 => s3(l),
        Backend::Swift => {
            let url = env.get("SWIFT_OBJECT_URL").unwrap_or("");
            if !url.starts_with("https://") {
                l.add(
                    Severity::Error,
                    "env-swift-object-url",
                    Some("SWIFT_OBJECT_URL"),
                    format!(
                        "SWIFT_OBJECT_URL={url:?}: media URLs are SWIFT_OBJECT_URL/<key>, and a \
                         value not starting with https:// is left out of the Content-Security-Policy, \
                         so browsers block the media."
                    ),
                    "Set SWIFT_OBJECT_URL=https://<host>/<path-to-container> (no trailing slash).".into(),
                );
            }
        }
        Backend::Azure => {
            if let Some(v) = env.get("AZURE_ALIAS_HOST") {
                bare_host(l, "AZURE_ALIAS_HOST", v, "env-azure-alias-host");
            }
        }
        Backend::Local => local(l),
    }
}

fn s3(l: &mut Lint) {
    let env = l.env;
    if env.get("S3_BUCKET").is_none_or(|b| b.trim().is_empty()) {
        l.add(
            Severity::Error,
            "env-s3-bucket",
            Some("S3_BUCKET"),
            "S3_ENABLED=true but S3_BUCKET is missing or empty: Mastodon starts anyway and every \
             upload fails."
                .into(),
            "Set S3_BUCKET to the bucket name.".into(),
        );
    }
    for k in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
        if env.get(k).is_none_or(str::is_empty) {
            l.add(
                Severity::Warning,
                "env-s3-credentials",
                Some(k),
                format!("S3_ENABLED=true but {k} is not set in this file."),
                format!("Set {k}, unless the service environment or an instance role provides it."),
            );
        }
    }
    let endpoint = env.get("S3_ENDPOINT");
    let mut aws = true;
    if let Some(ep) = endpoint {
        if ep.trim().is_empty() {
            l.add(
                Severity::Error,
                "env-s3-endpoint",
                Some("S3_ENDPOINT"),
                "S3_ENDPOINT is present but empty: Mastodon checks presence, so the S3 client \
                 gets an empty endpoint and uploads fail."
                    .into(),
                "Delete the line (AWS) or set the full URL, e.g. S3_ENDPOINT=https://s3.example.com.".into(),
            );
        } else if !(ep.starts_with("https://") || ep.starts_with("http://")) {
            l.add(
                Severity::Error,
                "env-s3-endpoint",
                Some("S3_ENDPOINT"),
                format!("S3_ENDPOINT={ep:?} has no scheme; the S3 client needs a full URL."),
                format!("Write S3_ENDPOINT=https://{ep}"),
            );
        }
        aws = host_of(ep).ends_with("amazonaws.com");
    }
    let alias_key = if env.has("S3_ALIAS_HOST") {
        Some("S3_ALIAS_HOST")
    } else if env.has("S3_CLOUDFRONT_HOST") {
        Some("S3_CLOUDFRONT_HOST")
    } else {
        None
    };
    if env.has("S3_CLOUDFRONT_HOST") {
        l.add(
            Severity::Info,
            "env-s3-cloudfront-host",
            Some("S3_CLOUDFRONT_HOST"),
            format!(
                "S3_CLOUDFRONT_HOST is the legacy name of S3_ALIAS_HOST{}.",
                if alias_key == Some("S3_ALIAS_HOST") {
                    "; S3_ALIAS_HOST is also set and wins"
                } else {
                    ""
                }
            ),
            "Rename it to S3_ALIAS_HOST.".into(),
        );
    }
    if let Some(k) = alias_key {
        let v = env.get(k).unwrap_or("");
        bare_host(l, k, v, "env-s3-alias-host");
    } else {
        let region = env.get("S3_REGION").unwrap_or("us-east-1");
        match env.get("S3_HOSTNAME") {
            Some(h) => {
                if h.contains("://") || h.ends_with('/') || h.trim().is_empty() {
                    l.add(
                        Severity::Error,
                        "env-s3-hostname",
                        Some("S3_HOSTNAME"),
                        format!(
                            "S3_HOSTNAME={h:?} must be a bare host: media URLs are \
                             S3_PROTOCOL://S3_HOSTNAME/S3_BUCKET/<key>."
                        ),
                        format!("Write S3_HOSTNAME={}", host_of(h)),
                    );
                }
            }
            None if !aws => l.add(
                Severity::Error,
                "env-s3-hostname",
                Some("S3_HOSTNAME"),
                format!(
                    "S3_ENDPOINT points to a non-AWS provider but neither S3_ALIAS_HOST nor \
                     S3_HOSTNAME is set: media URLs are built from S3_HOSTNAME (not the endpoint) \
                     and default to https://s3-{region}.amazonaws.com/<bucket>/..., which does not \
                     hold your media."
                ),
                format!(
                    "Set S3_ALIAS_HOST=<public host serving the bucket> (recommended, e.g. \
                     fediedge) or S3_HOSTNAME={}",
                    endpoint.map(host_of).unwrap_or("<provider host>")
                ),
            ),
            None => l.add(
                Severity::Warning,
                "env-s3-default-hostname",
                Some("S3_HOSTNAME"),
                format!(
                    "Neither S3_ALIAS_HOST nor S3_HOSTNAME is set: media URLs use the default host \
                     s3-{region}.amazonaws.com{}.",
                    if region == "us-east-1" {
                        ", which does not exist (mastodon/mastodon PR #19932)"
                    } else {
                        ", a legacy AWS endpoint"
                    }
                ),
                format!("Set S3_ALIAS_HOST=<your media host>, or S3_HOSTNAME=s3.{region}.amazonaws.com."),
            ),
        }
    }
    if let Some(p) = env.get("S3_PROTOCOL") {
        if p == "http" {
            l.add(
                Severity::Warning,
                "env-s3-protocol",
                Some("S3_PROTOCOL"),
                "S3_PROTOCOL=http: media URLs are http:// on an https site, so browsers block \
                 them as mixed content (mastodon/mastodon#23109)."
                    .into(),
                "Serve the media host over HTTPS and delete S3_PROTOCOL (default https).".into(),
            );
        } else if p != "https" {
            l.add(
                Severity::Error,
                "env-s3-protocol",
                Some("S3_PROTOCOL"),
                format!(
                    "S3_PROTOCOL={p:?}: must be `https` or `http` (it becomes `{p}://` in URLs)."
                ),
                "Set S3_PROTOCOL=https or delete it.".into(),
            );
        }
    }
    if env.has("S3_OVERRIDE_PATH_STYLE") && endpoint.is_none() {
        l.add(
            Severity::Info,
            "env-s3-override-path-style",
            Some("S3_OVERRIDE_PATH_STYLE"),
            "S3_OVERRIDE_PATH_STYLE is only read together with S3_ENDPOINT.".into(),
            "Delete it, or set S3_ENDPOINT.".into(),
        );
    }
    if let Some(t) = env.get("S3_MULTIPART_THRESHOLD") {
        let n: u64 = t
            .trim()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
            .parse()
            .unwrap_or(0);
        if n < 5 * 1024 * 1024 {
            l.add(
                Severity::Warning,
                "env-s3-multipart-threshold",
                Some("S3_MULTIPART_THRESHOLD"),
                format!(
                    "S3_MULTIPART_THRESHOLD={t:?} is read as {n} bytes (Ruby `.to_i`), not \
                     megabytes: files above {n} bytes are uploaded in parts, and S3 parts must be \
                     at least 5 MiB."
                ),
                "Give bytes, e.g. S3_MULTIPART_THRESHOLD=15728640 (15 MiB), or delete it (that is the default).".into(),
            );
        }
    }
    if let Some(p) = env.get("S3_PERMISSION") {
        if p.is_empty() {
            l.add(
                Severity::Info,
                "env-s3-permission",
                Some("S3_PERMISSION"),
                "S3_PERMISSION is empty: uploads carry no ACL, so the bucket policy alone must \
                 make media public (needed for Cloudflare R2 and buckets with ACLs disabled)."
                    .into(),
                "Nothing to do if the bucket (or the proxy in front of it) serves media publicly."
                    .into(),
            );
        } else if p == "private" {
            l.add(
                Severity::Warning,
                "env-s3-permission",
                Some("S3_PERMISSION"),
                "S3_PERMISSION=private: media objects are not publicly readable, so direct media \
                 URLs answer 403 unless a proxy holding credentials (such as fediedge) serves them."
                    .into(),
                "Use S3_PERMISSION=public-read (default), or serve media through an authenticated proxy.".into(),
            );
        } else if !ACLS.contains(&p) {
            l.add(
                Severity::Error,
                "env-s3-permission",
                Some("S3_PERMISSION"),
                format!("S3_PERMISSION={p:?} is not an S3 canned ACL: every upload is refused."),
                format!("Use one of {}, or empty for no ACL.", ACLS.join(", ")),
            );
        }
    }
    if let Some(p) = env.get("S3_KEY_PREFIX") {
        if p.is_empty() || p.starts_with('/') || p.ends_with('/') {
            l.add(
                Severity::Warning,
                "env-s3-key-prefix",
                Some("S3_KEY_PREFIX"),
                format!(
                    "S3_KEY_PREFIX={p:?}: Mastodon checks presence and joins it with `/`, so an \
                     empty value or a leading/trailing slash gives keys with an empty segment."
                ),
                "Write the prefix without slashes (e.g. S3_KEY_PREFIX=mastodon), or delete the line.".into(),
            );
        } else {
            l.add(
                Severity::Info,
                "env-s3-key-prefix",
                Some("S3_KEY_PREFIX"),
                "S3_KEY_PREFIX adds path segments, so `tootctl media lookup` and `remove-orphans` \
                 (which expect 7 or 10 segments) do not recognise these keys."
                    .into(),
                "Nothing to do unless you rely on those tootctl commands.".into(),
            );
        }
    }
    if env.get("S3_STORAGE_CLASS") == Some("") {
        l.add(
            Severity::Warning,
            "env-empty-presence",
            Some("S3_STORAGE_CLASS"),
            "S3_STORAGE_CLASS is present but empty: Mastodon checks presence and sends an empty \
             X-Amz-Storage-Class, which providers refuse."
                .into(),
            "Delete the line or give a class such as STANDARD.".into(),
        );
    }
}

fn local(l: &mut Lint) {
    let env = l.env;
    if let Some(u) = env.get("PAPERCLIP_ROOT_URL") {
        if u.ends_with('/') || !(u.starts_with('/') || u.contains("://")) {
            l.add(
                Severity::Warning,
                "env-paperclip-root-url",
                Some("PAPERCLIP_ROOT_URL"),
                format!(
                    "PAPERCLIP_ROOT_URL={u:?}: media URLs are PAPERCLIP_ROOT_URL + \"/\" + key, so it \
                     must start with `/` and not end with `/` (default /system)."
                ),
                format!("Write PAPERCLIP_ROOT_URL=/{}", u.trim_matches('/')),
            );
        }
    }
    if let Some(p) = env.get("PAPERCLIP_ROOT_PATH") {
        if !p.starts_with('/') {
            l.add(
                Severity::Warning,
                "env-paperclip-root-path",
                Some("PAPERCLIP_ROOT_PATH"),
                format!(
                    "PAPERCLIP_ROOT_PATH={p:?} is relative: it resolves against each process's \
                     working directory, so web and Sidekiq may disagree."
                ),
                "Use an absolute path, e.g. /home/mastodon/live/public/system.".into(),
            );
        }
    }
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
                    format!("{k}={v:?} must be a bare domain (no scheme, no path, no slash)."),
                    format!("Write {k}={}", host_of(v)),
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
                    "CDN_HOST={v:?} has no scheme: it becomes Rails' asset_host and the base of \
                     local media URLs, which then break (mastodon/mastodon#1044)."
                ),
                format!("Write CDN_HOST=https://{v}"),
            );
        }
    }
}

/// An alias host must be `host[/path]`: no scheme, no trailing slash, not empty.
fn bare_host(l: &mut Lint, key: &str, v: &str, rule: &'static str) {
    let problem = if v.trim().is_empty() {
        Some("is present but empty, so media URLs become `https:///<key>`".to_owned())
    } else if v.contains("://") {
        Some(format!(
            "contains a scheme, so media URLs become `https://{v}/...` (mastodon/mastodon#21382)"
        ))
    } else if v.ends_with('/') {
        Some("ends with `/`, so media URLs get `//` before the key".to_owned())
    } else if v.contains(char::is_whitespace) {
        Some("contains whitespace".to_owned())
    } else {
        None
    };
    if let Some(problem) = problem {
        let fixed = v
            .split_once("://")
            .map(|(_, rest)| rest)
            .unwrap_or(v)
            .trim()
            .trim_end_matches('/');
        l.add(
            Severity::Error,
            rule,
            Some(key),
            format!("{key}={v:?} {problem}. It must be a host, optionally with a path, and nothing else."),
            if fixed.is_empty() {
                format!("Set {key}=files.example.com or delete the line.")
            } else {
                format!("Write {key}={fixed}")
            },
        );
    }
}

/// The host part of a URL or host string.
pub fn host_of(v: &str) -> &str {
    let rest = v.split_once("://").map(|(_, r)| r).unwrap_or(v);
    rest.split('/').next().unwrap_or(rest)
}
