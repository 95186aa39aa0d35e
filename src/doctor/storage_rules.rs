//! Lints of the media storage settings of one Mastodon env file: which backend Mastodon
//! selects, and the S3 / Swift / Azure / local-filesystem keys that build media URLs.
//!
//! Facts and sources: `shared/MASTODON.md` §1 ("Selecting the backend", "S3 variables",
//! "Swift, Azure and local storage") and §4.

use std::path::{Path, PathBuf};

use super::env_rules::Lint;
use super::finding::Severity;
use crate::mastodon::dotenv::EnvFile;
use crate::mastodon::keys;
use crate::mastodon::Backend;

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

/// Which storage backend Mastodon will use, and the checks that follow from it.
pub(super) fn storage(l: &mut Lint) {
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
    // Object storage was meant: S3_*/AWS_* keys (or a misspelt S3 key) are present.
    let s3_keys: Vec<&str> = env
        .entries
        .iter()
        .map(|e| e.key.as_str())
        .filter(|k| (k.starts_with("S3_") && *k != "S3_ENABLED") || k.starts_with("AWS_"))
        .collect();
    let typo_bucket = env.entries.iter().any(|e| {
        !keys::is_known(&e.key) && keys::closest_known(&e.key).is_some_and(|k| k.starts_with("S3_"))
    });
    if backend != Backend::S3 && (!s3_keys.is_empty() || typo_bucket) {
        let state = match env.get("S3_ENABLED") {
            Some(v) => format!(
                "S3_ENABLED={}, which is not 'true'",
                keys::shown("S3_ENABLED", v)
            ),
            None => "S3_ENABLED is not set".into(),
        };
        if backend == Backend::Local {
            s3_disabled(l, &state);
        } else {
            l.add(
                Severity::Warning,
                "env-s3-disabled",
                Some("S3_ENABLED"),
                format!(
                    "{state}, but S3 settings are present: Mastodon stores media in {backend:?} \
                     and ignores them."
                ),
                "Delete the S3_* lines, or set S3_ENABLED=true if media lives in S3.".into(),
            );
        }
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
                        "SWIFT_OBJECT_URL={}: media URLs are SWIFT_OBJECT_URL/<key>, and a \
                         value not starting with https:// is left out of the Content-Security-Policy, \
                         so browsers block the media.",
                        keys::shown("SWIFT_OBJECT_URL", url)
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

/// The seed's incident: S3 keys say object storage was meant, but S3_ENABLED is not `true`,
/// so Mastodon writes and links media on the local filesystem. An error, unless the local
/// media root visibly holds the media (then local storage is real and the S3 keys are stale).
fn s3_disabled(l: &mut Lint, state: &str) {
    let (root, found) = local_media(l.env);
    let root_shown = root.display();
    match found {
        Some(file) => l.add(
            Severity::Warning,
            "env-s3-disabled",
            Some("S3_ENABLED"),
            format!(
                "{state}, but S3 settings are present. The local media root {root_shown} holds \
                 media ({}), so media really is on the local filesystem and these S3 settings are \
                 ignored.",
                file.strip_prefix(&root).unwrap_or(&file).display()
            ),
            "If media lives in S3, set S3_ENABLED=true; otherwise delete the S3_* and AWS_* \
             lines."
                .into(),
        ),
        None => l.add(
            Severity::Error,
            "env-s3-disabled",
            Some("S3_ENABLED"),
            format!(
                "{state}, but S3 settings are present, so object storage was meant. Mastodon \
                 stores and links media on the local filesystem instead ({root_shown}, which \
                 holds no media here): new uploads never reach the bucket, and media URLs point \
                 at this node's /system path."
            ),
            "Set S3_ENABLED=true (exactly, lower case). If media really is local, run the \
             doctor where the media root is mounted, or delete the S3_* and AWS_* lines."
                .into(),
        ),
    }
}

/// Media sub-directories Mastodon creates under the media root (`:class/:attachment/…`).
const MEDIA_DIRS: &[&str] = &[
    "media_attachments",
    "accounts",
    "custom_emojis",
    "site_uploads",
    "cache",
];

/// How many directory entries [`local_media`] looks at before giving up.
const MEDIA_SCAN_LIMIT: usize = 10_000;

/// The local media root of `env` and the first media file found in it, if any.
///
/// The root is PAPERCLIP_ROOT_PATH (a relative path is taken from the Mastodon directory),
/// else `<Mastodon dir>/public/system`; the Mastodon directory (Rails.root) is the env file's
/// directory, where dotenv reads `.env.production` from (`live/.env.production` →
/// `live/public/system`). Media means a regular file under one of [`MEDIA_DIRS`].
pub fn local_media(env: &EnvFile) -> (PathBuf, Option<PathBuf>) {
    let dir = match env.path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let root = match env.get("PAPERCLIP_ROOT_PATH").filter(|p| !p.is_empty()) {
        Some(p) => dir.join(p),
        None => dir.join("public/system"),
    };
    let mut budget = MEDIA_SCAN_LIMIT;
    let found = MEDIA_DIRS
        .iter()
        .find_map(|sub| first_file(&root.join(sub), &mut budget));
    (root, found)
}

/// The first regular file under `dir` (depth first, symlinks inside not followed).
fn first_file(dir: &Path, budget: &mut usize) -> Option<PathBuf> {
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            if *budget == 0 {
                return None;
            }
            *budget -= 1;
            match entry.file_type() {
                Ok(t) if t.is_file() => return Some(entry.path()),
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                _ => {}
            }
        }
    }
    None
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
                format!(
                    "S3_ENDPOINT={} has no scheme; the S3 client needs a full URL.",
                    keys::shown("S3_ENDPOINT", ep)
                ),
                format!("Write S3_ENDPOINT=https://{}", keys::redact_userinfo(ep)),
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
                            "S3_HOSTNAME={} must be a bare host: media URLs are \
                             S3_PROTOCOL://S3_HOSTNAME/S3_BUCKET/<key>.",
                            keys::shown("S3_HOSTNAME", h)
                        ),
                        format!("Write S3_HOSTNAME={}", host_of(&keys::redact_userinfo(h))),
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
                    endpoint
                        .map(|e| host_of(&keys::redact_userinfo(e)).to_owned())
                        .unwrap_or("<provider host>".into())
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
                    "S3_PROTOCOL={}: must be `https` or `http` (it becomes the URLs' scheme).",
                    keys::shown("S3_PROTOCOL", p)
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
                    "S3_MULTIPART_THRESHOLD={} is read as {n} bytes (Ruby `.to_i`), not \
                     megabytes: files above {n} bytes are uploaded in parts, and S3 parts must be \
                     at least 5 MiB.",
                    keys::shown("S3_MULTIPART_THRESHOLD", t)
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
                format!(
                    "S3_PERMISSION={} is not an S3 canned ACL: every upload is refused.",
                    keys::shown("S3_PERMISSION", p)
                ),
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
                    "S3_KEY_PREFIX={}: Mastodon checks presence and joins it with `/`, so an \
                     empty value or a leading/trailing slash gives keys with an empty segment.",
                    keys::shown("S3_KEY_PREFIX", p)
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
                    "PAPERCLIP_ROOT_URL={}: media URLs are PAPERCLIP_ROOT_URL + \"/\" + key, so it \
                     must start with `/` and not end with `/` (default /system).",
                    keys::shown("PAPERCLIP_ROOT_URL", u)
                ),
                format!(
                    "Write PAPERCLIP_ROOT_URL=/{}",
                    keys::redact_userinfo(u).trim_matches('/')
                ),
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
                    "PAPERCLIP_ROOT_PATH={} is relative: it resolves against each process's \
                     working directory, so web and Sidekiq may disagree.",
                    keys::shown("PAPERCLIP_ROOT_PATH", p)
                ),
                "Use an absolute path, e.g. /home/mastodon/live/public/system.".into(),
            );
        }
    }
}

/// An alias host must be `host[/path]`: no scheme, no trailing slash, not empty.
fn bare_host(l: &mut Lint, key: &str, raw: &str, rule: &'static str) {
    let v: &str = &keys::redact_userinfo(raw);
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
            format!(
                "{key}={} {problem}. It must be a host, optionally with a path, and nothing else.",
                keys::shown(key, raw)
            ),
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
