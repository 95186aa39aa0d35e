//! The environment variables Mastodon reads, what kind of value each takes, and which are
//! secret.
//!
//! The table drives three lints: exact booleans, "unknown key close to a known one", and
//! drift between nodes. It lists the keys of `.env.production.sample`, the admin docs
//! (`content/en/admin/config.md`, `optional/object-storage.md`) and the media/storage keys read
//! by `config/initializers/paperclip.rb` (see `shared/MASTODON.md`). Families with many
//! provider-specific keys (`OIDC_*`, `SAML_*`, `CAS_*`, `LDAP_*`, `PAM_*`, `OTEL_*`, …) are
//! accepted by prefix, so that a real key missing from the table is never reported as a typo.

/// How Mastodon reads a key's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Compared with the exact string `true` (`ENV['X'] == 'true'`): anything else is false.
    Bool,
    /// Free text, a number, a host or a URL: checked by specific rules, if any.
    Text,
    /// A secret: its value is never printed.
    Secret,
}

/// Every key Mastodon (4.x) is known to read, with its kind.
pub const KNOWN: &[(&str, Kind)] = &[
    // Federation and domains.
    ("LOCAL_DOMAIN", Kind::Text),
    ("WEB_DOMAIN", Kind::Text),
    ("ALTERNATE_DOMAINS", Kind::Text),
    ("AUTHORIZED_FETCH", Kind::Bool),
    ("LIMITED_FEDERATION_MODE", Kind::Bool),
    ("DISALLOW_UNAUTHENTICATED_API_ACCESS", Kind::Bool),
    ("SINGLE_USER_MODE", Kind::Bool),
    ("EMAIL_DOMAIN_ALLOWLIST", Kind::Text),
    ("EMAIL_DOMAIN_DENYLIST", Kind::Text),
    ("EMAIL_DOMAIN_WHITELIST", Kind::Text),
    ("EMAIL_DOMAIN_BLACKLIST", Kind::Text),
    ("DEFAULT_LOCALE", Kind::Text),
    ("ALLOWED_PRIVATE_ADDRESSES", Kind::Text),
    ("ALLOW_ACCESS_TO_HIDDEN_SERVICE", Kind::Text),
    ("HTTP_PROXY", Kind::Text),
    ("HTTP_PROXY_CONNECT_TIMEOUT", Kind::Text),
    ("TRUSTED_PROXY_IP", Kind::Text),
    ("SOURCE_BASE_URL", Kind::Text),
    ("GITHUB_REPOSITORY", Kind::Text),
    ("STREAMING_API_BASE_URL", Kind::Text),
    ("STREAMING_CLUSTER_NUM", Kind::Text),
    ("IP_RETENTION_PERIOD", Kind::Text),
    ("SESSION_RETENTION_PERIOD", Kind::Text),
    ("MAX_REQUEST_POOL_SIZE", Kind::Text),
    ("MAX_POLL_OPTIONS", Kind::Text),
    ("MAX_TOOT_CHARS", Kind::Text),
    // Rails, Puma and processes.
    ("RAILS_ENV", Kind::Text),
    ("NODE_ENV", Kind::Text),
    ("PORT", Kind::Text),
    ("BIND", Kind::Text),
    ("SOCKET", Kind::Text),
    ("RAILS_SERVE_STATIC_FILES", Kind::Text),
    ("RAILS_LOG_LEVEL", Kind::Text),
    ("RAILS_LOG_TO_STDOUT", Kind::Text),
    ("WEB_CONCURRENCY", Kind::Text),
    ("MAX_THREADS", Kind::Text),
    ("MIN_THREADS", Kind::Text),
    ("PERSISTENT_TIMEOUT", Kind::Text),
    ("SIDEKIQ_CONCURRENCY", Kind::Text),
    ("MALLOC_ARENA_MAX", Kind::Text),
    ("LD_PRELOAD", Kind::Text),
    ("FFMPEG_BINARY", Kind::Text),
    ("MASTODON_USE_LIBVIPS", Kind::Text),
    ("BUNDLE_GEMFILE", Kind::Text),
    // Secrets.
    ("SECRET_KEY_BASE", Kind::Secret),
    ("OTP_SECRET", Kind::Secret),
    ("VAPID_PRIVATE_KEY", Kind::Secret),
    ("VAPID_PUBLIC_KEY", Kind::Text),
    ("ACTIVE_RECORD_ENCRYPTION_DETERMINISTIC_KEY", Kind::Secret),
    ("ACTIVE_RECORD_ENCRYPTION_KEY_DERIVATION_SALT", Kind::Secret),
    ("ACTIVE_RECORD_ENCRYPTION_PRIMARY_KEY", Kind::Secret),
    // PostgreSQL.
    ("DB_HOST", Kind::Text),
    ("DB_PORT", Kind::Text),
    ("DB_NAME", Kind::Text),
    ("DB_USER", Kind::Text),
    ("DB_PASS", Kind::Secret),
    ("DB_POOL", Kind::Text),
    ("DB_SSLMODE", Kind::Text),
    ("DATABASE_URL", Kind::Secret),
    ("PREPARED_STATEMENTS", Kind::Text),
    ("REPLICA_DB_HOST", Kind::Text),
    ("REPLICA_DB_PORT", Kind::Text),
    ("REPLICA_DB_NAME", Kind::Text),
    ("REPLICA_DB_USER", Kind::Text),
    ("REPLICA_DB_PASS", Kind::Secret),
    ("REPLICA_PREPARED_STATEMENTS", Kind::Text),
    ("REPLICA_DATABASE_URL", Kind::Secret),
    // Redis.
    ("REDIS_HOST", Kind::Text),
    ("REDIS_PORT", Kind::Text),
    ("REDIS_DB", Kind::Text),
    ("REDIS_USER", Kind::Text),
    ("REDIS_PASSWORD", Kind::Secret),
    ("REDIS_URL", Kind::Secret),
    ("REDIS_NAMESPACE", Kind::Text),
    ("REDIS_SENTINELS", Kind::Text),
    ("REDIS_SENTINEL_MASTER", Kind::Text),
    ("REDIS_SENTINEL_PORT", Kind::Text),
    ("REDIS_SENTINEL_USERNAME", Kind::Text),
    ("REDIS_SENTINEL_PASSWORD", Kind::Secret),
    ("SIDEKIQ_REDIS_HOST", Kind::Text),
    ("SIDEKIQ_REDIS_PORT", Kind::Text),
    ("SIDEKIQ_REDIS_DB", Kind::Text),
    ("SIDEKIQ_REDIS_USER", Kind::Text),
    ("SIDEKIQ_REDIS_PASSWORD", Kind::Secret),
    ("SIDEKIQ_REDIS_URL", Kind::Secret),
    ("SIDEKIQ_REDIS_NAMESPACE", Kind::Text),
    ("SIDEKIQ_REDIS_SENTINELS", Kind::Text),
    ("SIDEKIQ_REDIS_SENTINEL_MASTER", Kind::Text),
    ("CACHE_REDIS_HOST", Kind::Text),
    ("CACHE_REDIS_PORT", Kind::Text),
    ("CACHE_REDIS_DB", Kind::Text),
    ("CACHE_REDIS_USER", Kind::Text),
    ("CACHE_REDIS_PASSWORD", Kind::Secret),
    ("CACHE_REDIS_URL", Kind::Secret),
    ("CACHE_REDIS_NAMESPACE", Kind::Text),
    ("CACHE_REDIS_SENTINELS", Kind::Text),
    ("CACHE_REDIS_SENTINEL_MASTER", Kind::Text),
    // Elasticsearch.
    ("ES_ENABLED", Kind::Bool),
    ("ES_HOST", Kind::Text),
    ("ES_PORT", Kind::Text),
    ("ES_USER", Kind::Text),
    ("ES_PASS", Kind::Secret),
    ("ES_PREFIX", Kind::Text),
    ("ES_PRESET", Kind::Text),
    ("ES_CA_FILE", Kind::Text),
    // Email.
    ("SMTP_SERVER", Kind::Text),
    ("SMTP_PORT", Kind::Text),
    ("SMTP_LOGIN", Kind::Text),
    ("SMTP_PASSWORD", Kind::Secret),
    ("SMTP_FROM_ADDRESS", Kind::Text),
    ("SMTP_REPLY_TO", Kind::Text),
    ("SMTP_RETURN_PATH", Kind::Text),
    ("SMTP_DOMAIN", Kind::Text),
    ("SMTP_DELIVERY_METHOD", Kind::Text),
    ("SMTP_AUTH_METHOD", Kind::Text),
    ("SMTP_CA_FILE", Kind::Text),
    ("SMTP_OPENSSL_VERIFY_MODE", Kind::Text),
    ("SMTP_ENABLE_STARTTLS", Kind::Text),
    ("SMTP_ENABLE_STARTTLS_AUTO", Kind::Text),
    ("SMTP_TLS", Kind::Text),
    ("SMTP_SSL", Kind::Text),
    ("SMTP_READ_TIMEOUT", Kind::Text),
    ("SMTP_OPEN_TIMEOUT", Kind::Text),
    // Media: S3.
    ("S3_ENABLED", Kind::Bool),
    ("S3_BUCKET", Kind::Text),
    ("AWS_ACCESS_KEY_ID", Kind::Secret),
    ("AWS_SECRET_ACCESS_KEY", Kind::Secret),
    ("S3_REGION", Kind::Text),
    ("S3_PROTOCOL", Kind::Text),
    ("S3_HOSTNAME", Kind::Text),
    ("S3_ENDPOINT", Kind::Text),
    ("S3_OVERRIDE_PATH_STYLE", Kind::Bool),
    ("S3_ALIAS_HOST", Kind::Text),
    ("S3_CLOUDFRONT_HOST", Kind::Text),
    ("S3_KEY_PREFIX", Kind::Text),
    ("S3_PERMISSION", Kind::Text),
    ("S3_SIGNATURE_VERSION", Kind::Text),
    ("S3_OPEN_TIMEOUT", Kind::Text),
    ("S3_READ_TIMEOUT", Kind::Text),
    ("S3_RETRY_LIMIT", Kind::Text),
    ("S3_MULTIPART_THRESHOLD", Kind::Text),
    ("S3_STORAGE_CLASS", Kind::Text),
    ("S3_FORCE_SINGLE_REQUEST", Kind::Bool),
    ("S3_ENABLE_CHECKSUM_MODE", Kind::Bool),
    ("S3_BATCH_DELETE_LIMIT", Kind::Text),
    ("S3_BATCH_DELETE_RETRY", Kind::Text),
    // Media: Swift, Azure, filesystem.
    ("SWIFT_ENABLED", Kind::Bool),
    ("SWIFT_USERNAME", Kind::Text),
    ("SWIFT_TENANT", Kind::Text),
    ("SWIFT_PASSWORD", Kind::Secret),
    ("SWIFT_PROJECT_ID", Kind::Text),
    ("SWIFT_AUTH_URL", Kind::Text),
    ("SWIFT_REGION", Kind::Text),
    ("SWIFT_CONTAINER", Kind::Text),
    ("SWIFT_DOMAIN_NAME", Kind::Text),
    ("SWIFT_CACHE_TTL", Kind::Text),
    ("SWIFT_OBJECT_URL", Kind::Text),
    ("SWIFT_TEMP_URL_KEY", Kind::Secret),
    ("AZURE_ENABLED", Kind::Bool),
    ("AZURE_STORAGE_ACCOUNT", Kind::Text),
    ("AZURE_STORAGE_ACCESS_KEY", Kind::Secret),
    ("AZURE_CONTAINER_NAME", Kind::Text),
    ("AZURE_ALIAS_HOST", Kind::Text),
    ("PAPERCLIP_ROOT_PATH", Kind::Text),
    ("PAPERCLIP_ROOT_URL", Kind::Text),
    ("CDN_HOST", Kind::Text),
    ("EXTRA_MEDIA_HOSTS", Kind::Text),
    ("EXTRA_DATA_HOSTS", Kind::Text),
    ("CACHE_BUSTER_ENABLED", Kind::Bool),
    ("CACHE_BUSTER_HTTP_METHOD", Kind::Text),
    ("CACHE_BUSTER_SECRET_HEADER", Kind::Text),
    ("CACHE_BUSTER_SECRET", Kind::Secret),
    // Translation, captcha, misc.
    ("DEEPL_API_KEY", Kind::Secret),
    ("DEEPL_PLAN", Kind::Text),
    ("LIBRE_TRANSLATE_ENDPOINT", Kind::Text),
    ("LIBRE_TRANSLATE_API_KEY", Kind::Secret),
    ("HCAPTCHA_SITE_KEY", Kind::Text),
    ("HCAPTCHA_SECRET_KEY", Kind::Secret),
    ("STATSD_ADDR", Kind::Text),
    ("STATSD_NAMESPACE", Kind::Text),
    ("STATSD_SIDEKIQ", Kind::Text),
    ("OMNIAUTH_ONLY", Kind::Text),
];

/// Prefixes of provider families whose keys are accepted without being listed one by one.
pub const KNOWN_PREFIXES: &[&str] = &[
    "OIDC_",
    "SAML_",
    "CAS_",
    "LDAP_",
    "PAM_",
    "OTEL_",
    "OMNIAUTH_",
    "MASTODON_PROMETHEUS_EXPORTER_",
    "FETCH_REPLIES_",
    "BUNDLE_",
    "RUBY_",
    "GEM_",
];

/// Keys whose value matters only for the node itself (pools, listeners, threads); they may
/// legitimately differ between nodes.
pub const NODE_LOCAL: &[&str] = &[
    "DB_POOL",
    "BIND",
    "PORT",
    "SOCKET",
    "WEB_CONCURRENCY",
    "MAX_THREADS",
    "MIN_THREADS",
    "SIDEKIQ_CONCURRENCY",
    "STREAMING_CLUSTER_NUM",
    "MALLOC_ARENA_MAX",
    "LD_PRELOAD",
    "PAPERCLIP_ROOT_PATH",
    "DB_HOST",
    "DB_PORT",
    "REDIS_HOST",
    "REDIS_PORT",
    "TRUSTED_PROXY_IP",
];

/// Keys that must have the same effective value on every node of one instance, with the
/// value Mastodon uses when the key is unset (`None`: no default).
pub const MUST_AGREE: &[(&str, Option<&str>)] = &[
    ("LOCAL_DOMAIN", None),
    ("WEB_DOMAIN", None),
    ("ALTERNATE_DOMAINS", None),
    ("CDN_HOST", None),
    ("SECRET_KEY_BASE", None),
    ("OTP_SECRET", None),
    ("VAPID_PRIVATE_KEY", None),
    ("VAPID_PUBLIC_KEY", None),
    ("ACTIVE_RECORD_ENCRYPTION_DETERMINISTIC_KEY", None),
    ("ACTIVE_RECORD_ENCRYPTION_KEY_DERIVATION_SALT", None),
    ("ACTIVE_RECORD_ENCRYPTION_PRIMARY_KEY", None),
    ("AUTHORIZED_FETCH", Some("false")),
    ("LIMITED_FEDERATION_MODE", Some("false")),
    ("SINGLE_USER_MODE", Some("false")),
    ("DB_NAME", None),
    ("REDIS_NAMESPACE", None),
    ("ES_PREFIX", None),
    ("S3_ENABLED", Some("false")),
    ("S3_BUCKET", None),
    ("S3_ALIAS_HOST", None),
    ("S3_CLOUDFRONT_HOST", None),
    ("S3_ENDPOINT", None),
    ("S3_HOSTNAME", None),
    ("S3_REGION", Some("us-east-1")),
    ("S3_PROTOCOL", Some("https")),
    ("S3_KEY_PREFIX", None),
    ("S3_PERMISSION", Some("public-read")),
    ("S3_OVERRIDE_PATH_STYLE", Some("false")),
    ("SWIFT_ENABLED", Some("false")),
    ("SWIFT_CONTAINER", None),
    ("SWIFT_OBJECT_URL", None),
    ("AZURE_ENABLED", Some("false")),
    ("AZURE_CONTAINER_NAME", None),
    ("AZURE_ALIAS_HOST", None),
    ("PAPERCLIP_ROOT_URL", Some("/system")),
    ("EXTRA_MEDIA_HOSTS", None),
    ("STREAMING_API_BASE_URL", None),
];

/// The kind of a known key, `None` for an unknown key.
pub fn kind(key: &str) -> Option<Kind> {
    KNOWN.iter().find(|(k, _)| *k == key).map(|(_, kind)| *kind)
}

/// True if Mastodon reads `key` (listed, or in a known provider family).
pub fn is_known(key: &str) -> bool {
    kind(key).is_some() || KNOWN_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// True if the value of `key` must never be printed: listed secrets, and by name anything
/// that looks like a password, secret, private key, token or credentials URL.
pub fn is_secret(key: &str) -> bool {
    if let Some(kind) = kind(key) {
        return kind == Kind::Secret;
    }
    // An unknown key may be a misspelt secret (`OTP_SECRT`): its value is never shown.
    if closest_known(key).is_some()
        || !key
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
    {
        return true;
    }
    let k = key.to_ascii_uppercase();
    [
        "PASS",
        "SECRET",
        "TOKEN",
        "PRIVATE",
        "CREDENTIAL",
        "_KEY",
        "KEY_",
        "SALT",
        "_URL",
    ]
    .iter()
    .any(|w| k.contains(w) && !(k.contains("KEY_PREFIX") && *w == "KEY_"))
        || k.ends_with("KEY")
}

/// The value as it may appear in a message: quoted, or `<hidden>` for secrets.
///
/// This is the one door through which an env value reaches the doctor's output. A value of a
/// non-secret key is shown, except the password of a URL's userinfo
/// (`https://user:p4ss@host` → `https://user:<hidden>@host`); a value whose key name itself
/// does not look like a key (see [`is_displayable_key`]) is hidden too.
pub fn shown(key: &str, value: &str) -> String {
    if is_secret(key) || !is_displayable_key(key) || looks_like_token(value) {
        "<hidden>".into()
    } else {
        format!("{:?}", redact_userinfo(value))
    }
}

/// True if `value` looks like a key or token pasted under a key that is not secret
/// (`S3_HOSTNAME=wJalrXUtnFEMI/K7MDENG…`): 16 characters or more from the base64/hex
/// alphabets, with letters and digits (two or more, or one in a word without `_`/`-` or in
/// mixed case), no dot, no `://`.
pub fn looks_like_token(value: &str) -> bool {
    let v = value.trim();
    v.len() >= 16
        && !v.contains("://")
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || "+/=_-".contains(c))
        && v.chars().any(|c| c.is_ascii_alphabetic())
        && v.chars().any(|c| c.is_ascii_digit())
        && (v.chars().filter(|c| c.is_ascii_digit()).count() >= 2
            || !v.contains(['_', '-'])
            || (v.chars().any(|c| c.is_ascii_uppercase())
                && v.chars().any(|c| c.is_ascii_lowercase())))
}

/// `value` with the password of every `scheme://user:password@` replaced by `<hidden>`, and a
/// userinfo without `:` (a token used as user name) hidden whole. A value without a scheme
/// that starts `user:password@host` loses its password too (an e-mail address is kept).
pub fn redact_userinfo(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    if !value.contains("://") {
        rest = redact_authority(rest, &mut out, true);
    }
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        rest = redact_authority(&rest[i + 3..], &mut out, false);
    }
    out.push_str(rest);
    out
}

/// Writes the userinfo at the start of `rest` to `out`, redacted, and returns what follows it
/// (all of `rest` when there is no userinfo). `need_colon`: only `user:password@` counts.
fn redact_authority<'a>(rest: &'a str, out: &mut String, need_colon: bool) -> &'a str {
    let authority_end = rest.find(['/', '?', '#', ' ']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return rest;
    };
    match rest[..at].split_once(':') {
        Some((user, _)) => {
            out.push_str(user);
            out.push_str(":<hidden>");
        }
        None if need_colon => return rest,
        None => out.push_str("<hidden>"),
    }
    &rest[at..]
}

/// True if `key`, a name read from an env file, may be printed.
///
/// Known keys, members of known families and near-misses of known keys (`3_BUCKET`) are
/// printed. Any other name must look like an environment variable name: an upper-case letter
/// first, then upper-case letters, digits, `_`, `.` or `-`, in short segments with few digits
/// (`MY_OWN_THING`, `S3-BUCKET`). A line holding a token, a hex or base64 secret or the rest
/// of a broken multi-line value parses as a key too (`wJalrXUtnFEMI`, `AKIAIOSFODNN7EXAMPLE`,
/// `0f4e1c…`); such a name is never printed.
pub fn is_displayable_key(key: &str) -> bool {
    if is_known(key) || closest_known(key).is_some() {
        return true;
    }
    let mut chars = key.chars();
    if !chars.next().is_some_and(|c| c.is_ascii_uppercase()) || key.len() > 64 {
        return false;
    }
    if !key
        .chars()
        .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || "_.-".contains(c))
    {
        return false;
    }
    key.split(['_', '.', '-']).all(|seg| {
        let digits = seg.chars().filter(char::is_ascii_digit).count();
        let vowel = seg.chars().any(|c| "AEIOUY".contains(c));
        seg.len() <= 14 && digits <= 2 && (seg.len() <= 5 || vowel)
    })
}

/// `key` as it may appear in a message: itself, or `<hidden name>`
/// (see [`is_displayable_key`]).
pub fn shown_key(key: &str) -> &str {
    if is_displayable_key(key) {
        key
    } else {
        "<hidden name>"
    }
}

/// The known key an unknown `key` was most likely meant to be, if one is close enough:
/// the same key in another case, or an edit distance of at most 2 (1 for short keys).
pub fn closest_known(key: &str) -> Option<&'static str> {
    let upper = key.to_ascii_uppercase();
    if let Some((k, _)) = KNOWN.iter().find(|(k, _)| *k == upper) {
        return Some(k);
    }
    let limit = if key.len() <= 6 { 1 } else { 2 };
    KNOWN
        .iter()
        // The distance is at least the difference in length: skip the costly comparison
        // (a long token compared with every key is what made the doctor slow).
        .filter(|(k, _)| k.len().abs_diff(upper.chars().count()) <= limit)
        .map(|(k, _)| (strsim::damerau_levenshtein(&upper, k), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_find_their_key() {
        assert_eq!(closest_known("3_BUCKET"), Some("S3_BUCKET"));
        assert_eq!(closest_known("S3_ENABLE"), Some("S3_ENABLED"));
        assert_eq!(closest_known("s3_enabled"), Some("S3_ENABLED"));
        assert_eq!(closest_known("S3_ALIAS_HOTS"), Some("S3_ALIAS_HOST"));
        assert_eq!(closest_known("MY_OWN_THING"), None);
    }

    #[test]
    fn secrets_are_recognised() {
        for k in [
            "SECRET_KEY_BASE",
            "OTP_SECRET",
            "AWS_SECRET_ACCESS_KEY",
            "DB_PASS",
            "SMTP_PASSWORD",
            "VAPID_PRIVATE_KEY",
            "MY_API_TOKEN",
            "SOME_KEY",
            "REDIS_URL",
        ] {
            assert!(is_secret(k), "{k}");
            assert_eq!(shown(k, "x"), "<hidden>");
        }
        for k in ["S3_BUCKET", "S3_KEY_PREFIX", "S3_ENABLED", "LOCAL_DOMAIN"] {
            assert!(!is_secret(k), "{k}");
        }
    }

    #[test]
    fn key_names_that_look_like_values_are_not_displayable() {
        for k in [
            "S3_BUCKET",
            "3_BUCKET",
            "MY_OWN_THING",
            "S3-BUCKET",
            "SECRET_X",
            "OIDC_CLIENT_SECRET",
        ] {
            assert!(is_displayable_key(k), "{k}");
        }
        for k in [
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI",
            "0f4e1c2b9a8d7e6f5a4b3c2d1e0f9a8b",
            "JBSWY3DPEHPK3PXP",
            "GK31c2f218a2e44f485b94239e",
            "PhdFyyfy5xJ7WVd2wVgmvkRgLRI4lZWq",
            "XKCDQZWPLMNB",
            "A1B2C3D4",
            "",
        ] {
            assert!(!is_displayable_key(k), "{k}");
            assert_eq!(shown_key(k), "<hidden name>");
            assert_eq!(shown(k, "v"), "<hidden>");
        }
    }

    #[test]
    fn tokens_under_ordinary_keys_are_hidden() {
        for v in [
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "AKIAIOSFODNN7EXAMPLE",
            "0f4e1c2b9a8d7e6f5a4b3c2d1e0f9a8b",
        ] {
            assert!(looks_like_token(v), "{v}");
            assert_eq!(shown("S3_HOSTNAME", v), "<hidden>");
        }
        for v in [
            "mastodon_production",
            "https://s3.garage.example.social",
            "files.example.social",
            "31556952",
            "us-east-1",
            "/home/mastodon/live/public/system",
            "15728640",
        ] {
            assert!(!looks_like_token(v), "{v}");
        }
    }

    #[test]
    fn url_passwords_are_hidden() {
        assert_eq!(
            redact_userinfo("redis://:p4ss@host:6379/0"),
            "redis://:<hidden>@host:6379/0"
        );
        assert_eq!(
            redact_userinfo("https://u:pw@a/x https://tok@b/"),
            "https://u:<hidden>@a/x https://<hidden>@b/"
        );
        assert_eq!(redact_userinfo("https://a/b@c"), "https://a/b@c");
        assert_eq!(
            redact_userinfo("u:pw@cdn.example"),
            "u:<hidden>@cdn.example"
        );
        assert_eq!(
            redact_userinfo("postmaster@mg.example"),
            "postmaster@mg.example"
        );
        assert_eq!(
            shown("S3_ENDPOINT", "https://k:s3cr3t@h"),
            "\"https://k:<hidden>@h\""
        );
    }

    #[test]
    fn the_table_has_no_duplicates() {
        let mut keys: Vec<_> = KNOWN.iter().map(|(k, _)| *k).collect();
        keys.sort();
        let n = keys.len();
        keys.dedup();
        assert_eq!(n, keys.len());
        for (k, _) in MUST_AGREE {
            assert!(is_known(k), "{k}");
        }
    }
}
