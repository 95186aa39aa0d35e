//! `fediedge doctor` tests (issue 4).
//!
//! Most tests run the checks in-process through `doctor::check` on files written to a temp
//! dir; the exit-code, JSON and `config from-mastodon` tests run the real binary.

use std::path::{Path, PathBuf};
use std::process::Command;

use fediedge::doctor::{self, DoctorArgs, Finding, Format, Severity};

const BIN: &str = env!("CARGO_BIN_EXE_fediedge");

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/doctor")
        .join(name)
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(data(name)).unwrap()
}

fn args() -> DoctorArgs {
    DoctorArgs {
        config: None,
        mastodon_env: Vec::new(),
        sidekiq_unit: Vec::new(),
        probe: false,
        probe_write: false,
        probe_key: None,
        format: Format::Human,
    }
}

/// A temp dir with helpers to write files into it.
struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        Dir(tempfile::tempdir().unwrap())
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

/// `base` with each `KEY` line replaced by `KEY=value` (appended if absent), or removed
/// for `None`.
fn edit(base: &str, edits: &[(&str, Option<&str>)]) -> String {
    let mut lines: Vec<String> = base.lines().map(str::to_owned).collect();
    for (key, value) in edits {
        let prefix = format!("{key}=");
        let at = lines.iter().position(|l| l.starts_with(&prefix));
        match (at, value) {
            (Some(i), Some(v)) => lines[i] = format!("{key}={v}"),
            (Some(i), None) => {
                lines.remove(i);
            }
            (None, Some(v)) => lines.push(format!("{key}={v}")),
            (None, None) => {}
        }
    }
    lines.join("\n") + "\n"
}

/// Runs the doctor on one env file (and optional units given as texts).
fn lint(env_text: &str, units: &[&str]) -> Vec<Finding> {
    let d = Dir::new();
    let mut a = args();
    a.mastodon_env = vec![d.write(".env.production", env_text).display().to_string()];
    for (i, u) in units.iter().enumerate() {
        a.sidekiq_unit
            .push(d.write(&format!("sidekiq-{i}.service"), u));
    }
    doctor::check(&a)
}

fn s3_env(edits: &[(&str, Option<&str>)]) -> Vec<Finding> {
    lint(&edit(&fixture("s3.env.production"), edits), &[])
}

fn local_env(edits: &[(&str, Option<&str>)]) -> Vec<Finding> {
    lint(&edit(&fixture("local.env.production"), edits), &[])
}

fn show(findings: &[Finding]) -> String {
    doctor::finding::to_human(findings)
}

/// Asserts a finding with this rule, severity and key exists and returns it.
#[track_caller]
fn find<'a>(findings: &'a [Finding], rule: &str, sev: Severity, key: &str) -> &'a Finding {
    findings
        .iter()
        .find(|f| f.rule == rule && f.severity == sev && f.key.as_deref() == Some(key))
        .unwrap_or_else(|| panic!("no {sev:?} {rule} for {key}; got:\n{}", show(findings)))
}

#[track_caller]
fn assert_none(findings: &[Finding], rule: &str) {
    assert!(
        !findings.iter().any(|f| f.rule == rule),
        "unexpected {rule}:\n{}",
        show(findings)
    );
}

#[track_caller]
fn assert_clean(findings: &[Finding]) {
    let bad: Vec<Finding> = findings
        .iter()
        .filter(|f| f.severity >= Severity::Warning)
        .cloned()
        .collect();
    assert!(
        bad.is_empty(),
        "expected no warnings or errors:\n{}",
        show(&bad)
    );
}

// ---- The seed's two incidents ----

#[test]
fn seed_s3_enabled_false_and_3_bucket() {
    let d = Dir::new();
    let mut a = args();
    a.mastodon_env = vec![data("seed.env.production").display().to_string()];
    let f = doctor::check(&a);
    let b = find(&f, "env-bool", Severity::Warning, "S3_ENABLED");
    assert!(b.message.contains("exact string 'true'"), "{}", b.message);
    let u = find(&f, "env-unknown-key", Severity::Error, "3_BUCKET");
    assert!(u.message.contains("S3_BUCKET"), "{}", u.message);
    assert!(u.fix.contains("Rename 3_BUCKET to S3_BUCKET"), "{}", u.fix);
    // Object storage was meant and nothing shows the media is local: an error by itself.
    let s = find(&f, "env-s3-disabled", Severity::Error, "S3_ENABLED");
    assert!(s.message.contains("local filesystem"), "{}", s.message);
    assert_eq!(doctor::finding::exit_code(&f), 2);
    drop(d);
}

#[test]
fn seed_sidekiq_only_default_queue() {
    let mut a = args();
    a.sidekiq_unit = vec![data("seed-sidekiq.service")];
    let f = doctor::check(&a);
    for q in ["push", "ingress", "mailers", "pull"] {
        let x = find(&f, "sidekiq-queue-unserved", Severity::Error, q);
        assert!(x.message.contains(&format!("`{q}`")), "{}", x.message);
        assert!(x.file.contains("seed-sidekiq.service"));
    }
    let s = find(
        &f,
        "sidekiq-scheduler-missing",
        Severity::Error,
        "scheduler",
    );
    assert!(s.message.contains("cron"), "{}", s.message);
    // fasp only exists since 4.4: a warning.
    find(&f, "sidekiq-queue-unserved", Severity::Warning, "fasp");
    assert_none(&f, "sidekiq-db-pool");
    assert!(!f.iter().any(|x| x.key.as_deref() == Some("default")));
}

// ---- Clean deployments: no warnings at all ----

#[test]
fn clean_s3_deployment_with_shipped_unit() {
    let f = lint(
        &fixture("s3.env.production"),
        &[&fixture("mastodon-sidekiq.service")],
    );
    assert_clean(&f);
}

#[test]
fn clean_local_deployment_with_shipped_unit() {
    let f = lint(
        &fixture("local.env.production"),
        &[&fixture("mastodon-sidekiq.service")],
    );
    assert_clean(&f);
}

#[test]
fn clean_split_queue_units() {
    let workers = "[Service]\nEnvironment=\"RAILS_ENV=production\" \"DB_POOL=20\"\nExecStart=/home/mastodon/.rbenv/shims/bundle exec sidekiq -c 20 -q default,8 -q push,6 -q ingress,4 -q mailers,2 -q pull -q fasp\n";
    let sched = "[Service]\nEnvironment=\"RAILS_ENV=production\"\nExecStart=/home/mastodon/.rbenv/shims/bundle exec sidekiq -c 5 -q scheduler\n";
    let f = lint(&fixture("s3.env.production"), &[workers, sched]);
    assert_clean(&f);
}

// ---- Env rules, one test per rule at least ----

#[test]
fn booleans_must_be_exactly_true() {
    for v in ["TRUE", "True", "1", "yes"] {
        let f = s3_env(&[("S3_ENABLED", Some(v))]);
        let b = find(&f, "env-bool", Severity::Error, "S3_ENABLED");
        assert!(b.message.contains("FALSE"), "{v}: {}", b.message);
        assert!(b.fix.contains("S3_ENABLED=true"), "{}", b.fix);
        // And S3 is then really off: its settings are reported as ignored.
        find(&f, "env-s3-disabled", Severity::Error, "S3_ENABLED");
    }
    for v in ["FALSE", "False", "0", "no"] {
        let f = local_env(&[("S3_ENABLED", Some(v))]);
        find(&f, "env-bool", Severity::Warning, "S3_ENABLED");
    }
    let f = local_env(&[("AUTHORIZED_FETCH", Some("True"))]);
    find(&f, "env-bool", Severity::Error, "AUTHORIZED_FETCH");
    let f = local_env(&[("S3_ENABLED", Some("false"))]);
    assert_none(&f, "env-bool");
}

#[test]
fn unknown_key_close_to_a_known_one() {
    // S3_ENABLED removed: the typo is the only attempt, an error.
    let f = s3_env(&[("S3_ENABLED", None), ("S3_ENABLE", Some("true"))]);
    let u = find(&f, "env-unknown-key", Severity::Error, "S3_ENABLE");
    assert!(u.message.contains("S3_ENABLED"), "{}", u.message);
    // The real key is also set: the typo line is dead, a warning.
    let f = s3_env(&[("S3_ALIAS_HOTS", Some("x.example"))]);
    find(&f, "env-unknown-key", Severity::Warning, "S3_ALIAS_HOTS");
    // Environment names are case-sensitive.
    let f = local_env(&[("s3_enabled", Some("true"))]);
    find(&f, "env-unknown-key", Severity::Error, "s3_enabled");
    // Keys far from any known key, and provider families, are left alone.
    let f = local_env(&[
        ("MY_BACKUP_TARGET", Some("x")),
        ("OIDC_CLIENT_ID", Some("y")),
    ]);
    assert_none(&f, "env-unknown-key");
}

#[test]
fn s3_bucket_missing() {
    let f = s3_env(&[("S3_BUCKET", None)]);
    find(&f, "env-s3-bucket", Severity::Error, "S3_BUCKET");
    let f = s3_env(&[("S3_BUCKET", Some(""))]);
    find(&f, "env-s3-bucket", Severity::Error, "S3_BUCKET");
}

#[test]
fn s3_credentials_missing() {
    let f = s3_env(&[("AWS_SECRET_ACCESS_KEY", None)]);
    find(
        &f,
        "env-s3-credentials",
        Severity::Warning,
        "AWS_SECRET_ACCESS_KEY",
    );
}

#[test]
fn s3_alias_host_format() {
    for (v, fixed) in [
        (
            "https://files.example.social",
            "S3_ALIAS_HOST=files.example.social",
        ),
        (
            "files.example.social/",
            "S3_ALIAS_HOST=files.example.social",
        ),
        ("", "files.example.com"),
    ] {
        let f = s3_env(&[("S3_ALIAS_HOST", Some(v))]);
        let x = find(&f, "env-s3-alias-host", Severity::Error, "S3_ALIAS_HOST");
        assert!(x.fix.contains(fixed), "{v:?}: {}", x.fix);
    }
    // A path after the host is fine (supported since #25273).
    let f = s3_env(&[("S3_ALIAS_HOST", Some("example.social/media"))]);
    assert_none(&f, "env-s3-alias-host");
    // The legacy name is checked the same way, and noted.
    let f = s3_env(&[
        ("S3_ALIAS_HOST", None),
        ("S3_CLOUDFRONT_HOST", Some("https://cdn.example")),
    ]);
    find(
        &f,
        "env-s3-alias-host",
        Severity::Error,
        "S3_CLOUDFRONT_HOST",
    );
    find(
        &f,
        "env-s3-cloudfront-host",
        Severity::Info,
        "S3_CLOUDFRONT_HOST",
    );
}

#[test]
fn s3_endpoint_format() {
    let f = s3_env(&[("S3_ENDPOINT", Some("s3.garage.example.social"))]);
    let x = find(&f, "env-s3-endpoint", Severity::Error, "S3_ENDPOINT");
    assert!(
        x.fix.contains("https://s3.garage.example.social"),
        "{}",
        x.fix
    );
    let f = s3_env(&[("S3_ENDPOINT", Some(""))]);
    find(&f, "env-s3-endpoint", Severity::Error, "S3_ENDPOINT");
}

#[test]
fn non_aws_endpoint_needs_hostname_or_alias() {
    let f = s3_env(&[("S3_ALIAS_HOST", None)]);
    let x = find(&f, "env-s3-hostname", Severity::Error, "S3_HOSTNAME");
    assert!(
        x.message.contains("s3-garage.amazonaws.com"),
        "{}",
        x.message
    );
    assert!(
        x.fix.contains("S3_HOSTNAME=s3.garage.example.social"),
        "{}",
        x.fix
    );
    let f = s3_env(&[
        ("S3_ALIAS_HOST", None),
        ("S3_HOSTNAME", Some("s3.garage.example.social")),
    ]);
    assert_clean(&f);
    let f = s3_env(&[
        ("S3_ALIAS_HOST", None),
        ("S3_HOSTNAME", Some("https://s3.garage.example.social")),
    ]);
    find(&f, "env-s3-hostname", Severity::Error, "S3_HOSTNAME");
}

#[test]
fn aws_defaults_give_a_host_that_does_not_exist() {
    let f = s3_env(&[
        ("S3_ALIAS_HOST", None),
        ("S3_ENDPOINT", None),
        ("S3_REGION", None),
    ]);
    let x = find(
        &f,
        "env-s3-default-hostname",
        Severity::Warning,
        "S3_HOSTNAME",
    );
    assert!(
        x.message.contains("s3-us-east-1.amazonaws.com"),
        "{}",
        x.message
    );
    assert!(x.message.contains("does not exist"), "{}", x.message);
}

#[test]
fn cdn_host_needs_a_scheme() {
    let f = local_env(&[("CDN_HOST", Some("assets.example.social"))]);
    let x = find(&f, "env-cdn-host", Severity::Error, "CDN_HOST");
    assert!(x.fix.contains("https://assets.example.social"));
}

#[test]
fn s3_protocol_http_and_garbage() {
    let f = s3_env(&[("S3_PROTOCOL", Some("http"))]);
    find(&f, "env-s3-protocol", Severity::Warning, "S3_PROTOCOL");
    let f = s3_env(&[("S3_PROTOCOL", Some("https://"))]);
    find(&f, "env-s3-protocol", Severity::Error, "S3_PROTOCOL");
    let f = s3_env(&[("S3_PROTOCOL", Some("https"))]);
    assert_none(&f, "env-s3-protocol");
}

#[test]
fn swift_object_url_must_be_https() {
    let f = local_env(&[
        ("SWIFT_ENABLED", Some("true")),
        ("SWIFT_CONTAINER", Some("media")),
        (
            "SWIFT_OBJECT_URL",
            Some("http://swift.example/v1/AUTH_x/media"),
        ),
    ]);
    find(
        &f,
        "env-swift-object-url",
        Severity::Error,
        "SWIFT_OBJECT_URL",
    );
    let f = local_env(&[
        ("SWIFT_ENABLED", Some("true")),
        (
            "SWIFT_OBJECT_URL",
            Some("https://swift.example/v1/AUTH_x/media"),
        ),
    ]);
    assert_none(&f, "env-swift-object-url");
}

#[test]
fn several_backends_enabled() {
    let f = s3_env(&[("SWIFT_ENABLED", Some("true"))]);
    let x = find(
        &f,
        "env-multiple-backends",
        Severity::Warning,
        "S3_ENABLED,SWIFT_ENABLED",
    );
    assert!(x.message.contains("S3"), "{}", x.message);
}

#[test]
fn multipart_threshold_is_bytes() {
    let f = s3_env(&[("S3_MULTIPART_THRESHOLD", Some("15"))]);
    let x = find(
        &f,
        "env-s3-multipart-threshold",
        Severity::Warning,
        "S3_MULTIPART_THRESHOLD",
    );
    assert!(x.message.contains("15 bytes"), "{}", x.message);
    let f = s3_env(&[("S3_MULTIPART_THRESHOLD", Some("15728640"))]);
    assert_none(&f, "env-s3-multipart-threshold");
}

#[test]
fn s3_permission() {
    let f = s3_env(&[("S3_PERMISSION", Some("private"))]);
    find(&f, "env-s3-permission", Severity::Warning, "S3_PERMISSION");
    let f = s3_env(&[("S3_PERMISSION", Some("public"))]);
    find(&f, "env-s3-permission", Severity::Error, "S3_PERMISSION");
    let f = s3_env(&[]);
    find(&f, "env-s3-permission", Severity::Info, "S3_PERMISSION");
    let f = s3_env(&[("S3_PERMISSION", Some("public-read"))]);
    assert_none(&f, "env-s3-permission");
}

#[test]
fn s3_key_prefix_and_empty_storage_class() {
    let f = s3_env(&[("S3_KEY_PREFIX", Some("/mastodon/"))]);
    find(&f, "env-s3-key-prefix", Severity::Warning, "S3_KEY_PREFIX");
    let f = s3_env(&[("S3_KEY_PREFIX", Some("mastodon"))]);
    find(&f, "env-s3-key-prefix", Severity::Info, "S3_KEY_PREFIX");
    let f = s3_env(&[("S3_STORAGE_CLASS", Some(""))]);
    find(
        &f,
        "env-empty-presence",
        Severity::Warning,
        "S3_STORAGE_CLASS",
    );
    let f = s3_env(&[
        ("S3_OVERRIDE_PATH_STYLE", Some("true")),
        ("S3_ENDPOINT", None),
    ]);
    find(
        &f,
        "env-s3-override-path-style",
        Severity::Info,
        "S3_OVERRIDE_PATH_STYLE",
    );
}

#[test]
fn redis_namespace_and_never_read_namespaces() {
    let f = local_env(&[("REDIS_NAMESPACE", Some("mastodon"))]);
    let x = find(
        &f,
        "env-redis-namespace",
        Severity::Error,
        "REDIS_NAMESPACE",
    );
    assert!(x.message.contains("4.4"), "{}", x.message);
    let f = local_env(&[("SIDEKIQ_REDIS_NAMESPACE", Some("mastodon"))]);
    find(
        &f,
        "env-ignored-key",
        Severity::Warning,
        "SIDEKIQ_REDIS_NAMESPACE",
    );
}

#[test]
fn process_only_keys_in_dotenv() {
    for k in ["RAILS_ENV", "PORT", "BIND", "SOCKET", "NODE_ENV"] {
        let f = local_env(&[(k, Some("production"))]);
        find(&f, "env-process-only", Severity::Warning, k);
    }
}

#[test]
fn sidekiq_concurrency_in_dotenv_is_ignored() {
    let env = edit(
        &fixture("local.env.production"),
        &[("SIDEKIQ_CONCURRENCY", Some("25"))],
    );
    let f = lint(&env, &[&fixture("mastodon-sidekiq.service")]);
    find(
        &f,
        "env-sidekiq-concurrency-ignored",
        Severity::Warning,
        "SIDEKIQ_CONCURRENCY",
    );
    // The shipped unit has `-c 25`: the unit itself is fine.
    assert_none(&f, "sidekiq-concurrency-ignored");
    // A unit without -c relies on it and runs 5 threads.
    let unit = fixture("mastodon-sidekiq.service").replace(" -c 25", "");
    let f = lint(&env, &[&unit]);
    let x = find(&f, "sidekiq-concurrency-ignored", Severity::Warning, "-c");
    assert!(x.message.contains("5 threads"), "{}", x.message);
    assert!(x.fix.contains("-c 25"), "{}", x.fix);
    // SIDEKIQ_CONCURRENCY in the unit's Environment= counts.
    let unit = fixture("mastodon-sidekiq.service")
        .replace(" -c 25", "")
        .replace(
            "\"DB_POOL=25\"",
            "\"DB_POOL=10\" \"SIDEKIQ_CONCURRENCY=25\"",
        );
    let f = lint(&fixture("local.env.production"), &[&unit]);
    let x = find(&f, "sidekiq-db-pool", Severity::Error, "DB_POOL");
    assert!(
        x.message.contains("SIDEKIQ_CONCURRENCY=25"),
        "{}",
        x.message
    );
}

#[test]
fn dotenv_syntax_traps() {
    let base = fixture("local.env.production");
    let f = lint(&format!("{base}S3-BUCKET=media\n"), &[]);
    find(&f, "env-line-ignored", Severity::Warning, "S3-BUCKET");
    let f = lint(&format!("export MY_TOKEN\n{base}"), &[]);
    find(&f, "env-export-unset", Severity::Error, "MY_TOKEN");
    let f = lint(&format!("{base}SMTP_PORT=25\n"), &[]);
    let x = find(&f, "env-duplicate-key", Severity::Warning, "SMTP_PORT");
    assert!(x.message.contains("different values"), "{}", x.message);
    let f = lint(&edit(&base, &[("DB_PASS", Some("hunter#2"))]), &[]);
    let x = find(&f, "env-value-cut-at-hash", Severity::Warning, "DB_PASS");
    assert!(
        !x.message.contains("hunter"),
        "secret printed: {}",
        x.message
    );
    let f = lint(&edit(&base, &[("DB_PASS", Some("pa$w0rdX1"))]), &[]);
    let x = find(&f, "env-value-substituted", Severity::Warning, "DB_PASS");
    // The name after `$` is part of the password: counted, not shown.
    assert!(
        !x.message.contains("w0rdX1"),
        "secret printed: {}",
        x.message
    );
    assert!(x.message.contains("1 `$NAME` reference"), "{}", x.message);
    let f = lint(&edit(&base, &[("SMTP_LOGIN", Some("me$HOSTNAME"))]), &[]);
    let x = find(&f, "env-value-substituted", Severity::Warning, "SMTP_LOGIN");
    assert!(x.message.contains("$HOSTNAME"), "{}", x.message);
    let f = lint(&edit(&base, &[("DB_PASS", Some("'pa$word'"))]), &[]);
    assert_none(&f, "env-value-substituted");
    find(&f, "env-quoted-value", Severity::Info, "DB_PASS");
}

#[test]
fn domains_and_required_keys() {
    let f = local_env(&[("LOCAL_DOMAIN", Some("https://example.social"))]);
    let x = find(&f, "env-domain", Severity::Error, "LOCAL_DOMAIN");
    assert!(x.fix.contains("LOCAL_DOMAIN=example.social"), "{}", x.fix);
    let f = local_env(&[("LOCAL_DOMAIN", None)]);
    find(&f, "env-local-domain", Severity::Error, "LOCAL_DOMAIN");
    let f = local_env(&[("SECRET_KEY_BASE", None)]);
    find(
        &f,
        "env-secret-missing",
        Severity::Warning,
        "SECRET_KEY_BASE",
    );
}

#[test]
fn paperclip_root_url_and_path() {
    let f = local_env(&[("PAPERCLIP_ROOT_URL", Some("/system/"))]);
    find(
        &f,
        "env-paperclip-root-url",
        Severity::Warning,
        "PAPERCLIP_ROOT_URL",
    );
    let f = local_env(&[("PAPERCLIP_ROOT_PATH", Some("public/system"))]);
    find(
        &f,
        "env-paperclip-root-path",
        Severity::Warning,
        "PAPERCLIP_ROOT_PATH",
    );
}

// ---- Sidekiq units ----

#[test]
fn media_outside_read_write_paths() {
    let env = edit(
        &fixture("local.env.production"),
        &[("PAPERCLIP_ROOT_PATH", Some("/mnt/media"))],
    );
    let unit = fixture("mastodon-sidekiq.service");
    let f = lint(&env, &[&unit]);
    let x = find(
        &f,
        "sidekiq-read-only-media",
        Severity::Error,
        "ReadWritePaths",
    );
    assert!(x.message.contains("/mnt/media"), "{}", x.message);
    assert!(x.fix.contains("ReadWritePaths=/mnt/media"), "{}", x.fix);
    let fixed = unit.replace(
        "ReadWritePaths=/home/mastodon/live",
        "ReadWritePaths=/home/mastodon/live\nReadWritePaths=/mnt/media",
    );
    let f = lint(&env, &[&fixed]);
    assert_clean(&f);
    // With S3 nothing is written locally: no finding.
    let env = edit(
        &fixture("s3.env.production"),
        &[("PAPERCLIP_ROOT_PATH", Some("/mnt/media"))],
    );
    let f = lint(&env, &[&unit]);
    assert_none(&f, "sidekiq-read-only-media");
}

#[test]
fn db_pool_inherited_from_the_env_file() {
    let env = edit(&fixture("local.env.production"), &[("DB_POOL", Some("5"))]);
    let unit = fixture("mastodon-sidekiq.service").replace("Environment=\"DB_POOL=25\"\n", "");
    let f = lint(&env, &[&unit]);
    let x = find(&f, "sidekiq-db-pool", Severity::Error, "DB_POOL");
    assert!(x.message.contains("DB_POOL=5"), "{}", x.message);
    assert!(x.message.contains(".env.production"), "{}", x.message);
    assert!(x.message.contains("25 Sidekiq threads"), "{}", x.message);
    // The unit's own DB_POOL wins over the env file (process env beats dotenv).
    let f = lint(&env, &[&fixture("mastodon-sidekiq.service")]);
    assert_none(&f, "sidekiq-db-pool");
    // No DB_POOL anywhere: Sidekiq gets exactly its concurrency, fine.
    let f = lint(&fixture("local.env.production"), &[&unit]);
    assert_none(&f, "sidekiq-db-pool");
    // DB_POOL in the unit lower than -c.
    let unit = fixture("mastodon-sidekiq.service").replace("DB_POOL=25", "DB_POOL=10");
    let f = lint(&fixture("local.env.production"), &[&unit]);
    find(&f, "sidekiq-db-pool", Severity::Error, "DB_POOL");
}

#[test]
fn scheduler_in_two_processes() {
    let shipped = fixture("mastodon-sidekiq.service");
    let f = lint(&fixture("s3.env.production"), &[&shipped, &shipped]);
    let x = find(
        &f,
        "sidekiq-scheduler-multiple",
        Severity::Error,
        "scheduler",
    );
    assert!(x.message.contains("2 processes"), "{}", x.message);
}

#[test]
fn unknown_queue_and_bad_weight() {
    let unit = "[Service]\nEnvironment=RAILS_ENV=production\nExecStart=/usr/bin/bundle exec sidekiq -q default -q push -q ingress -q mailer -q pull,x -q scheduler -q fasp\n";
    let f = lint(&fixture("s3.env.production"), &[unit]);
    let x = find(&f, "sidekiq-unknown-queue", Severity::Warning, "-q");
    assert!(x.message.contains("\"mailers\""), "{}", x.message);
    find(&f, "sidekiq-queue-unserved", Severity::Error, "mailers");
    find(&f, "sidekiq-queue-weight", Severity::Warning, "-q");
}

#[test]
fn unit_without_rails_env_or_sidekiq() {
    let unit =
        fixture("mastodon-sidekiq.service").replace("Environment=\"RAILS_ENV=production\"\n", "");
    let f = lint(&fixture("s3.env.production"), &[&unit]);
    find(&f, "sidekiq-rails-env", Severity::Error, "Environment");
    let web = "[Service]\nEnvironment=RAILS_ENV=production\nExecStart=/home/mastodon/.rbenv/shims/bundle exec puma -C config/puma.rb\n";
    let f = lint(&fixture("s3.env.production"), &[web]);
    find(&f, "unit-not-sidekiq", Severity::Error, "ExecStart");
    let mut a = args();
    a.sidekiq_unit = vec![PathBuf::from("/nonexistent/mastodon-sidekiq.service")];
    let f = doctor::check(&a);
    assert!(f
        .iter()
        .any(|x| x.rule == "unit-unreadable" && x.severity == Severity::Error));
}

#[test]
fn shell_wrapped_exec_start() {
    let unit = "[Service]\nEnvironment=RAILS_ENV=production\nExecStart=/bin/bash -lc 'cd /home/mastodon/live && exec bundle exec sidekiq -c 5 -q default -q push'\n";
    let f = lint(&fixture("s3.env.production"), &[unit]);
    find(&f, "sidekiq-queue-unserved", Severity::Error, "ingress");
    assert!(!f.iter().any(|x| x.key.as_deref() == Some("push")));
    assert_none(&f, "unit-not-sidekiq");
}

// ---- Drift between nodes ----

#[test]
fn drift_between_nodes() {
    let d = Dir::new();
    let base = fixture("s3.env.production");
    let a = d.write("a.env", &base);
    let b = d.write(
        "b.env",
        &edit(
            &base,
            &[
                ("S3_BUCKET", Some("other-bucket")),
                ("SECRET_KEY_BASE", Some("0000differentsecret0000")),
                ("S3_REGION", None),
                ("SMTP_PORT", None),
            ],
        ),
    );
    let mut args = args();
    args.mastodon_env = vec![
        format!("edge1={}", a.display()),
        format!("edge2={}", b.display()),
    ];
    let f = doctor::check(&args);
    let x = find(&f, "drift-value", Severity::Error, "S3_BUCKET");
    assert!(
        x.message.contains("\"mastodon-media\" on edge1"),
        "{}",
        x.message
    );
    assert!(
        x.message.contains("\"other-bucket\" on edge2"),
        "{}",
        x.message
    );
    let x = find(&f, "drift-value", Severity::Error, "SECRET_KEY_BASE");
    assert!(
        !x.message.contains("differentsecret"),
        "secret printed: {}",
        x.message
    );
    assert!(
        !x.message.contains("0f4e1c2b"),
        "secret printed: {}",
        x.message
    );
    assert!(x.message.contains("edge1") && x.message.contains("edge2"));
    // S3_REGION=garage vs unset (= us-east-1): a real difference.
    find(&f, "drift-value", Severity::Error, "S3_REGION");
    let x = find(&f, "drift-key-missing", Severity::Warning, "SMTP_PORT");
    assert!(
        x.message.contains("set on edge1 but not on edge2"),
        "{}",
        x.message
    );
    // Identical nodes: no drift at all.
    let mut args2 = super_args(&[&a, &a]);
    args2.format = Format::Json;
    let f = doctor::check(&args2);
    assert!(
        !f.iter().any(|x| x.rule.starts_with("drift")),
        "{}",
        show(&f)
    );
}

fn super_args(envs: &[&Path]) -> DoctorArgs {
    let mut a = args();
    a.mastodon_env = envs.iter().map(|p| p.display().to_string()).collect();
    a
}

#[test]
fn drift_booleans_compare_by_meaning() {
    let d = Dir::new();
    let base = fixture("local.env.production");
    let a = d.write("a.env", &edit(&base, &[("S3_ENABLED", Some("false"))]));
    let b = d.write("b.env", &base);
    let c = d.write("c.env", &edit(&base, &[("S3_ENABLED", Some("TRUE"))]));
    // false vs unset: both false, only a presence note.
    let f = doctor::check(&super_args(&[&a, &b]));
    assert_none(&f, "drift-value");
    find(&f, "drift-key-missing", Severity::Info, "S3_ENABLED");
    // TRUE also means false: still no value drift (env-bool reports the TRUE).
    let f = doctor::check(&super_args(&[&a, &c]));
    assert_none(&f, "drift-value");
    find(&f, "env-bool", Severity::Error, "S3_ENABLED");
}

// ---- Secrets never printed ----

#[test]
fn no_secret_value_in_any_output() {
    let secret = "SUPERSECRETVALUE42";
    let env = edit(
        &fixture("seed.env.production"),
        &[
            ("SECRET_KEY_BASE", Some(secret)),
            ("AWS_SECRET_ACCESS_KEY", Some(secret)),
            ("DB_PASS", Some(&format!("{secret}#x"))),
            ("SMTP_PASSWORD", Some(&format!("{secret}$HOME"))),
            ("SECRET_KEY_BAS", Some(secret)),
            ("OTP_SECRET", Some(secret)),
            ("REDIS_NAMESPACE", Some("x")),
        ],
    ) + &format!("DB_PASS={secret}\nexport SECRET_X\nMY-TOKEN={secret}\n");
    let d = Dir::new();
    let a = d.write("a.env", &env);
    let b = d.write("b.env", &fixture("s3.env.production"));
    let f = doctor::check(&super_args(&[&a, &b]));
    assert!(f.len() > 10, "{}", show(&f));
    let human = show(&f);
    let json = doctor::finding::to_json(&f);
    assert!(!human.contains("SUPERSECRET"), "{human}");
    assert!(!json.contains("SUPERSECRET"), "{json}");
}

// ---- fediedge's own config ----

#[test]
fn invalid_fediedge_config_names_the_key() {
    let d = Dir::new();
    let p = d.write(
        "bad.toml",
        "[primary]\ntype = \"http\"\nurl = \"http://x/\"\n",
    );
    let mut a = args();
    a.config = Some(p);
    let f = doctor::check(&a);
    let x = find(&f, "config-invalid", Severity::Error, "primary.type");
    assert!(x.message.contains("read-only"), "{}", x.message);
    let p = d.write("typo.toml", "listne = \"127.0.0.1:1\"\n");
    a.config = Some(p);
    let f = doctor::check(&a);
    assert!(
        f[0].rule == "config-invalid" && f[0].message.contains("listne"),
        "{}",
        show(&f)
    );
    let p = d.write("ok.toml", "[primary]\ntype = \"fs\"\nroot = \"/tmp\"\n");
    a.config = Some(p);
    assert!(doctor::check(&a).is_empty());
}

// ---- The binary: exit codes and JSON ----

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
    )
}

#[test]
fn exit_codes_of_the_binary() {
    let d = Dir::new();
    let clean = data("s3.env.production");
    let unit = data("mastodon-sidekiq.service");
    let (code, out) = run(&[
        "doctor",
        "--mastodon-env",
        clean.to_str().unwrap(),
        "--sidekiq-unit",
        unit.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 error(s), 0 warning(s)"), "{out}");
    let warn = d.write(
        ".env.production",
        &edit(
            &fixture("s3.env.production"),
            &[("S3_PROTOCOL", Some("http"))],
        ),
    );
    let (code, out) = run(&["doctor", "--mastodon-env", warn.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("warning[env-s3-protocol]"), "{out}");
    assert!(out.contains("fix: "), "{out}");
    let (code, out) = run(&[
        "doctor",
        "--mastodon-env",
        data("seed.env.production").to_str().unwrap(),
    ]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("error[env-unknown-key]"), "{out}");
    let (code, _) = run(&["doctor"]);
    assert_eq!(code, 2);
}

#[test]
fn json_output_shape() {
    let (code, out) = run(&[
        "doctor",
        "--format",
        "json",
        "--mastodon-env",
        data("seed.env.production").to_str().unwrap(),
        "--sidekiq-unit",
        data("seed-sidekiq.service").to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 1, "only `findings` at the top: {out}");
    let findings = v["findings"].as_array().unwrap();
    assert!(findings.len() >= 8, "{out}");
    for f in findings {
        let sev = f["severity"].as_str().unwrap();
        assert!(["error", "warning", "info"].contains(&sev));
        assert!(f["file"].is_string());
        assert!(f["key"].is_string() || f["key"].is_null());
        assert!(!f["message"].as_str().unwrap().is_empty());
        assert!(f["rule"].is_string() && f["fix"].is_string());
    }
    assert!(findings
        .iter()
        .any(|f| f["key"] == "3_BUCKET" && f["severity"] == "error"));
    assert!(findings
        .iter()
        .any(|f| f["key"] == "scheduler" && f["severity"] == "error"));
    // A clean run is `{"findings": []}` apart from info.
    let (code, out) = run(&[
        "doctor",
        "--format=json",
        "--mastodon-env",
        data("local.env.production").to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .all(|f| f["severity"] == "info"));
}

// ---- config from-mastodon ----

fn from_mastodon(env_text: &str) -> (i32, String) {
    let d = Dir::new();
    let p = d.write(".env.production", env_text);
    run(&["config", "from-mastodon", p.to_str().unwrap()])
}

fn secret_file(d: &Dir, name: &str, value: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = d.write(name, value);
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

#[test]
fn from_mastodon_s3_alias_loads() {
    let env = edit(
        &fixture("s3.env.production"),
        &[("S3_KEY_PREFIX", Some("mastodon"))],
    );
    let (code, toml) = from_mastodon(&env);
    assert_eq!(code, 0, "{toml}");
    assert!(!toml.contains("b892c0665f0a"), "secret copied: {toml}");
    assert!(!toml.contains("GK31c2f218"), "key id copied: {toml}");
    assert!(toml.contains("AWS_SECRET_ACCESS_KEY"), "{toml}");
    // Loadable with credentials from 0600 files.
    let d = Dir::new();
    let id = secret_file(&d, "id", "GKtest");
    let sk = secret_file(&d, "sk", "sktest");
    let with_files = format!(
        "{toml}access_key_id_file = {:?}\nsecret_access_key_file = {:?}\n",
        id.display().to_string(),
        sk.display().to_string()
    );
    let c = fediedge::config::from_str(&with_files, Path::new("gen.toml")).unwrap();
    // Mastodon's URL is https://<alias>/mastodon/<key> and the object is mastodon/<key>:
    // the URL prefix takes the key prefix off, the store puts it back, once.
    assert_eq!(c.url_prefix, "/mastodon/");
    let fediedge::config::StoreKind::S3(s3) = &c.primary.kind else {
        panic!("not s3: {toml}")
    };
    assert_eq!(s3.endpoint, "https://s3.garage.example.social");
    assert_eq!(s3.bucket, "mastodon-media");
    assert_eq!(s3.region, "garage");
    assert_eq!(s3.prefix, "mastodon");
    assert!(!s3.virtual_host_style);
    // And loadable as printed, with the AWS_* environment Mastodon also uses.
    let p = d.write("gen.toml", &toml);
    let out = Command::new(BIN)
        .args(["doctor", "--config", p.to_str().unwrap()])
        .env("AWS_ACCESS_KEY_ID", "GKtest")
        .env("AWS_SECRET_ACCESS_KEY", "sktest")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn from_mastodon_s3_without_alias_and_aws() {
    let env = edit(
        &fixture("s3.env.production"),
        &[
            ("S3_ALIAS_HOST", None),
            ("S3_ENDPOINT", None),
            ("S3_REGION", Some("eu-west-1")),
        ],
    );
    let (code, toml) = from_mastodon(&env);
    assert_eq!(code, 0, "{toml}");
    let d = Dir::new();
    let id = secret_file(&d, "id", "a");
    let sk = secret_file(&d, "sk", "b");
    let text = format!(
        "{toml}access_key_id_file = {:?}\nsecret_access_key_file = {:?}\n",
        id.display().to_string(),
        sk.display().to_string()
    );
    let c = fediedge::config::from_str(&text, Path::new("gen.toml")).unwrap();
    assert_eq!(c.url_prefix, "/mastodon-media/");
    let fediedge::config::StoreKind::S3(s3) = &c.primary.kind else {
        panic!()
    };
    assert_eq!(s3.endpoint, "https://s3.eu-west-1.amazonaws.com");
    assert!(s3.virtual_host_style);
}

#[test]
fn from_mastodon_local_storage() {
    let (code, toml) = from_mastodon(&fixture("local.env.production"));
    assert_eq!(code, 0, "{toml}");
    let c = fediedge::config::from_str(&toml, Path::new("gen.toml")).unwrap();
    assert_eq!(c.url_prefix, "/system/");
    assert!(matches!(&c.primary.kind,
        fediedge::config::StoreKind::Fs { root } if root == Path::new("/home/mastodon/live/public/system")));
    assert!(c.cache.is_some());
    let env = edit(
        &fixture("local.env.production"),
        &[
            ("PAPERCLIP_ROOT_PATH", Some("/srv/media")),
            ("PAPERCLIP_ROOT_URL", Some("/media")),
        ],
    );
    let (_, toml) = from_mastodon(&env);
    let c = fediedge::config::from_str(&toml, Path::new("gen.toml")).unwrap();
    assert_eq!(c.url_prefix, "/media/");
    assert!(matches!(&c.primary.kind,
        fediedge::config::StoreKind::Fs { root } if root == Path::new("/srv/media")));
    // The seed's file is local storage (S3_ENABLED=FALSE): the config says so.
    let (code, toml) = run(&[
        "config",
        "from-mastodon",
        data("seed.env.production").to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    assert!(toml.contains("type = \"fs\""), "{toml}");
    // Swift cannot be expressed: refused with exit 2.
    let (code, _) = from_mastodon("SWIFT_ENABLED=true\n");
    assert_eq!(code, 2);
}

// ---- Probes ----

fn probe_args(config: &Path, write: bool, key: Option<&str>) -> DoctorArgs {
    let mut a = args();
    a.config = Some(config.to_owned());
    a.probe = true;
    a.probe_write = write;
    a.probe_key = key.map(str::to_owned);
    a
}

#[test]
fn probe_fs_store_read_and_write() {
    let d = Dir::new();
    let media = d.0.path().join("media");
    std::fs::create_dir_all(media.join("accounts/avatars/000/000/001/original")).unwrap();
    std::fs::write(
        media.join("accounts/avatars/000/000/001/original/a.png"),
        b"0123456789",
    )
    .unwrap();
    let cfg = d.write(
        "f.toml",
        &format!(
            "data_dir = {:?}\n[primary]\ntype = \"fs\"\nroot = {:?}\n",
            d.0.path().join("var").display().to_string(),
            media.display().to_string()
        ),
    );
    let f = doctor::check(&probe_args(&cfg, true, None));
    assert_clean(&f);
    find(&f, "probe-ok", Severity::Info, "store primary");
    find(&f, "probe-write-ok", Severity::Info, "store primary");
    // The probe object is gone afterwards.
    let left: Vec<_> = std::fs::read_dir(&media)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let probe_dir = media.join("fediedge-doctor-probe");
    assert!(
        !probe_dir.exists() || std::fs::read_dir(&probe_dir).unwrap().next().is_none(),
        "{left:?}"
    );
    // A canary that exists is read through; one that does not is a warning.
    let f = doctor::check(&probe_args(
        &cfg,
        false,
        Some("accounts/avatars/000/000/001/original/a.png"),
    ));
    let x = find(&f, "probe-ok", Severity::Info, "store primary");
    assert!(x.message.contains("10 bytes"), "{}", x.message);
    let f = doctor::check(&probe_args(&cfg, false, Some("accounts/nope.png")));
    find(
        &f,
        "probe-canary-missing",
        Severity::Warning,
        "store primary",
    );
}

#[test]
fn probe_unreachable_http_origin_is_an_error() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let d = Dir::new();
    let media = d.0.path().join("media");
    std::fs::create_dir_all(&media).unwrap();
    let cfg = d.write(
        "f.toml",
        &format!(
            "[primary]\ntype = \"fs\"\nroot = {:?}\n[[fallback]]\nname = \"old\"\ntype = \"http\"\nurl = \"http://127.0.0.1:{port}/system/\"\nconnect_timeout = \"2s\"\nfirst_byte_timeout = \"3s\"\n",
            media.display().to_string()
        ),
    );
    let f = doctor::check(&probe_args(&cfg, true, None));
    let x = find(&f, "probe-unreachable", Severity::Error, "store old");
    assert!(x.message.contains("old"), "{}", x.message);
    find(&f, "probe-write-skipped", Severity::Info, "store old");
    find(&f, "probe-write-ok", Severity::Info, "store primary");
    // Through the binary: exit code 2.
    let (code, out) = run(&["doctor", "--config", cfg.to_str().unwrap(), "--probe"]);
    assert_eq!(code, 2, "{out}");
}

/// A password in an http origin's URL is not printed by the probe, whatever the store layer's
/// error says.
#[test]
fn probe_never_prints_a_url_password() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let d = Dir::new();
    let media = d.0.path().join("media");
    std::fs::create_dir_all(&media).unwrap();
    let cfg = d.write(
        "f.toml",
        &format!(
            "[primary]\ntype = \"fs\"\nroot = {:?}\n[[fallback]]\nname = \"old\"\ntype = \"http\"\nurl = \"http://media:Zq8pL2vX9mN4@127.0.0.1:{port}/system/\"\nconnect_timeout = \"2s\"\nfirst_byte_timeout = \"3s\"\n",
            media.display().to_string()
        ),
    );
    let f = doctor::check(&probe_args(&cfg, false, None));
    let x = find(&f, "probe-unreachable", Severity::Error, "store old");
    assert!(
        x.message.contains("media:<hidden>@127.0.0.1"),
        "{}",
        x.message
    );
    assert!(!show(&f).contains("Zq8pL2vX9mN4"), "{}", show(&f));
    for format in ["human", "json"] {
        let (code, out) = run_all(&[
            "doctor",
            "--format",
            format,
            "--config",
            cfg.to_str().unwrap(),
            "--probe",
        ]);
        assert_eq!(code, 2, "{out}");
        assert!(!out.contains("Zq8pL2vX9mN4"), "{out}");
    }
}

#[test]
fn probe_without_config_is_refused() {
    let mut a = args();
    a.probe = true;
    a.mastodon_env = vec![data("local.env.production").display().to_string()];
    let f = doctor::check(&a);
    find(&f, "probe-no-config", Severity::Error, "--probe");
}

// ---- More rules ----

#[test]
fn azure_alias_host_and_command_substitution() {
    let f = local_env(&[
        ("AZURE_ENABLED", Some("true")),
        ("AZURE_ALIAS_HOST", Some("https://media.example.social/")),
    ]);
    let x = find(
        &f,
        "env-azure-alias-host",
        Severity::Error,
        "AZURE_ALIAS_HOST",
    );
    assert!(
        x.fix.contains("AZURE_ALIAS_HOST=media.example.social"),
        "{}",
        x.fix
    );
    let f = local_env(&[("SMTP_LOGIN", Some("$(cat /run/secrets/smtp_login)"))]);
    find(&f, "env-value-command", Severity::Info, "SMTP_LOGIN");
}

#[test]
fn invalid_concurrency_and_environment_files() {
    let unit = fixture("mastodon-sidekiq.service").replace("-c 25", "-c lots");
    let f = lint(&fixture("s3.env.production"), &[&unit]);
    find(&f, "sidekiq-concurrency", Severity::Error, "-c");
    // DB_POOL from a readable EnvironmentFile= counts as the unit's own.
    let d = Dir::new();
    let extra = d.write("sidekiq.env", "DB_POOL=5\n");
    let unit = fixture("mastodon-sidekiq.service").replace(
        "Environment=\"DB_POOL=25\"\n",
        &format!("EnvironmentFile={}\n", extra.display()),
    );
    let f = lint(&fixture("s3.env.production"), &[&unit]);
    let x = find(&f, "sidekiq-db-pool", Severity::Error, "DB_POOL");
    assert!(x.message.contains("DB_POOL=5"), "{}", x.message);
    // A missing one is noted; with `-` it is optional and not noted.
    let unit = fixture("mastodon-sidekiq.service").replace(
        "Environment=\"DB_POOL=25\"\n",
        "Environment=\"DB_POOL=25\"\nEnvironmentFile=/nonexistent/sidekiq.env\nEnvironmentFile=-/nonexistent/optional.env\n",
    );
    let f = lint(&fixture("s3.env.production"), &[&unit]);
    let notes: Vec<_> = f
        .iter()
        .filter(|x| x.rule == "unit-env-file-unread")
        .collect();
    assert_eq!(notes.len(), 1, "{}", show(&f));
    assert_eq!(notes[0].severity, Severity::Info);
    assert_clean(&f);
}

#[test]
fn unreadable_env_and_bad_probe_key() {
    let mut a = args();
    a.mastodon_env = vec!["/nonexistent/.env.production".into()];
    let f = doctor::check(&a);
    assert!(f
        .iter()
        .any(|x| x.rule == "env-unreadable" && x.severity == Severity::Error));
    let d = Dir::new();
    let cfg = d.write(
        "f.toml",
        &format!(
            "[primary]\ntype = \"fs\"\nroot = {:?}\n",
            d.0.path().display().to_string()
        ),
    );
    let f = doctor::check(&probe_args(&cfg, false, Some("../etc/passwd")));
    find(&f, "probe-key", Severity::Error, "store primary");
}

/// The operator doc lists every rule the code can emit (the closing note relies on it).
#[test]
fn every_rule_is_documented() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/doctor.md")).unwrap();
    let mut rules = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(root.join("src/doctor")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for part in text.split('"').skip(1).step_by(2) {
            let prefixes = [
                "env-", "sidekiq-", "unit-", "drift-", "config-", "probe-", "doctor-",
            ];
            if prefixes.iter().any(|p| part.starts_with(p))
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && part != "sidekiq-unit"
            {
                rules.insert(part.to_owned());
            }
        }
    }
    assert!(rules.len() > 50, "{rules:?}");
    let missing: Vec<_> = rules
        .iter()
        .filter(|r| !doc.contains(&format!("| `{r}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "rules missing from docs/doctor.md: {missing:?}"
    );
}

/// The seed's incident as drift: a good S3 node next to the two broken ones.
#[test]
fn seed_nodes_drift_from_the_good_node() {
    let mut a = args();
    a.mastodon_env = vec![
        format!("good={}", data("s3.env.production").display()),
        format!("edge1={}", data("seed.env.production").display()),
    ];
    let f = doctor::check(&a);
    let x = find(&f, "drift-value", Severity::Error, "S3_ENABLED");
    assert!(x.message.contains("\"true\" on good"), "{}", x.message);
    assert!(x.message.contains("\"false\" on edge1"), "{}", x.message);
    let x = find(&f, "drift-value", Severity::Error, "S3_BUCKET");
    assert!(x.message.contains("unset on edge1"), "{}", x.message);
    find(&f, "drift-key-missing", Severity::Warning, "3_BUCKET");
}

#[test]
fn probe_garage_bucket_credentials_and_write() {
    let garage = crate::common::garage::Garage::start();
    let d = Dir::new();
    let good = d.write(
        "good.toml",
        &format!(
            "data_dir = {:?}\n[primary]\n{}",
            d.0.path().join("var").display().to_string(),
            garage.store_toml()
        ),
    );
    let f = doctor::check(&probe_args(&good, true, None));
    assert_clean(&f);
    find(&f, "probe-ok", Severity::Info, "store primary");
    find(&f, "probe-write-ok", Severity::Info, "store primary");
    // A wrong secret is refused by the bucket: an error finding, never the secret itself.
    let bad = d.write(
        "bad.toml",
        &format!(
            "data_dir = {:?}\n[primary]\n{}",
            d.0.path().join("var").display().to_string(),
            garage.store_toml().replace(
                &garage.secret,
                "0000000000000000000000000000000000000000000000000000000000000000"
            )
        ),
    );
    let f = doctor::check(&probe_args(&bad, false, None));
    assert!(
        f.iter()
            .any(|x| x.severity == Severity::Error && x.key.as_deref() == Some("store primary")),
        "{f:?}"
    );
    assert!(!format!("{f:?}").contains(&garage.secret));
}

// ---- Issue 7 §6: no secret from any line, whatever its shape ----

/// Real-looking secrets, each under a key Mastodon reads, in the shape that key takes.
const SECRETS: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE"),
    (
        "AWS_SECRET_ACCESS_KEY",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    ),
    (
        "SECRET_KEY_BASE",
        "a4c123b1612dd272d1371c17149d439536b3216fdaeeb975729fae923d5a4fd12aabfe228f219e9cb0eb53f16947ccf25ec84d8dbc74254770f58904dba41ecc",
    ),
    (
        "OTP_SECRET",
        "cc3fc1626e53a13043b026c48bbf33feff9243a8f506b40928b5b7a767c76fb008f86bebb2737f6a6f0fb23c6f5da2cec255404e4fb440034d6608697a8d41be",
    ),
    (
        "VAPID_PRIVATE_KEY",
        "oKq0Zk9yW3rT1xV5bN7mC2pL4sD6fG8hJ0kQwErTyUi=",
    ),
    (
        "DATABASE_URL",
        "postgres://mastodon:Zq8pL2vX9mN4@db.internal:5432/mastodon_production",
    ),
    ("REDIS_URL", "redis://:p4ssR3dis9x@redis.internal:6379/0"),
    ("SMTP_PASSWORD", "Tr0ub4dor&3horse"),
];

/// Every way of writing `key` and `value` on a line (or two) that we test, most of them lines
/// dotenv skips, with a name for failure messages.
fn secret_line_forms(key: &str, value: &str) -> Vec<(&'static str, String)> {
    let mid = key.len() / 2;
    let misspelt = format!("{}{}", &key[..mid], &key[mid + 1..]);
    let half = value.len() / 2;
    let alnum: String = value
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(14)
        .collect();
    vec![
        ("KEY value", format!("{key} {value}")),
        ("KEY: value", format!("{key}: {value}")),
        ("KEY:value", format!("{key}:{value}")),
        ("export KEY value", format!("export {key} {value}")),
        ("\"KEY\"=\"value\"", format!("\"{key}\"=\"{value}\"")),
        ("'KEY'=value", format!("'{key}'={value}")),
        ("odd spacing", format!("   {key}   =   {value}   ")),
        ("odd spacing, no =", format!("\t {key} \t {value} ")),
        ("invalid key", format!("{key}-OLD={value}")),
        ("misspelt key", format!("{misspelt}={value}")),
        ("value with #", format!("{key}={value}#tail")),
        ("lone token", value.to_owned()),
        ("token and ==", format!("{value}==")),
        ("3_BUCKET near it", format!("3_BUCKET {value}")),
        ("export KEY # value", format!("export {key} # {value}")),
        (
            "broken multi-line quote",
            format!("{key}=\"{}\n{}", &value[..half], &value[half..]),
        ),
        ("$ substitution", format!("{key}=pre${alnum}")),
    ]
}

/// The texts of a secret that must never be printed: the value, a distinctive piece of it,
/// both halves (a value broken over two lines), its URL password and its letters and digits
/// (what `$NAME` substitution would name).
fn secret_parts(value: &str) -> Vec<String> {
    let mut parts = vec![value.to_owned()];
    match value.split_once("://").and_then(|(_, r)| r.split_once('@')) {
        Some((userinfo, _)) => parts.push(userinfo.rsplit(':').next().unwrap().to_owned()),
        None => {
            parts.push(value[4..14].to_owned());
            let half = value.len() / 2;
            parts.push(value[..half].to_owned());
            parts.push(value[half..].to_owned());
        }
    }
    let alnum: String = value
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(14)
        .collect();
    if !value.contains("://") {
        parts.push(alnum);
    }
    parts
}

#[track_caller]
fn assert_no_secret(out: &str, what: &str) {
    for (key, value) in SECRETS {
        for part in secret_parts(value) {
            assert!(
                !out.contains(&part),
                "{what}: a secret of {key} was printed ({part:?}):\n{out}"
            );
        }
    }
}

/// Runs the binary; stdout and stderr together, and the exit code.
fn run_all(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN).args(args).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap() + &String::from_utf8(out.stderr).unwrap();
    (out.status.code().unwrap(), text)
}

/// Checks one env file (next to a clean S3 node, so drift runs too) with the library and the
/// binary, human and JSON; returns the library's findings.
fn check_for_secrets(d: &Dir, name: &str, text: &str, what: &str) -> Vec<Finding> {
    let a = d.write(name, text);
    let b = data("s3.env.production");
    let mut args = super_args(&[&a, &b]);
    let f = doctor::check(&args);
    assert_no_secret(&show(&f), what);
    assert_no_secret(&doctor::finding::to_json(&f), what);
    assert_no_secret(&format!("{f:?}"), what);
    args.format = Format::Json;
    assert_eq!(doctor::check(&args), f);
    for format in ["human", "json"] {
        let (code, out) = run_all(&[
            "doctor",
            "--format",
            format,
            "--mastodon-env",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ]);
        assert!(code > 0, "{what}: {out}");
        assert_no_secret(&out, &format!("{what} ({format}, binary)"));
    }
    f
}

#[test]
fn no_secret_printed_from_any_line_shape() {
    let d = Dir::new();
    let base = fixture("local.env.production");
    let mut all = base.clone();
    let mut by_form = std::collections::BTreeMap::new();
    for (i, form) in secret_line_forms("K", "v").iter().enumerate() {
        let mut text = base.clone();
        for (key, value) in SECRETS {
            let (_, line) = &secret_line_forms(key, value)[i];
            text.push_str(line);
            text.push('\n');
        }
        all.push_str(&text[base.len()..]);
        let f = check_for_secrets(&d, &format!("form-{i}.env"), &text, form.0);
        by_form.insert(form.0, f);
    }
    // The forms are reported by the rules meant for them, by key only.
    let f = &by_form["value with #"];
    find(
        f,
        "env-value-cut-at-hash",
        Severity::Warning,
        "SMTP_PASSWORD",
    );
    let f = &by_form["export KEY # value"];
    let x = find(f, "env-export-unset", Severity::Error, "AWS_ACCESS_KEY_ID");
    assert!(
        x.message.contains("`export AWS_ACCESS_KEY_ID`"),
        "{}",
        x.message
    );
    let f = &by_form["$ substitution"];
    find(
        f,
        "env-value-substituted",
        Severity::Warning,
        "SECRET_KEY_BASE",
    );
    let f = &by_form["broken multi-line quote"];
    for (key, _) in SECRETS {
        find(f, "env-quote-unclosed", Severity::Warning, key);
    }
    assert!(
        f.iter().any(|x| x.rule == "env-key-looks-like-value"),
        "{}",
        show(f)
    );
    let f = check_for_secrets(&d, "all.env", &all, "all forms together");
    // The test looks at real findings: skipped lines are reported by key and shape...
    for (key, _) in SECRETS {
        let x = f
            .iter()
            .find(|x| x.rule == "env-line-ignored" && x.key.as_deref() == Some(key))
            .unwrap_or_else(|| panic!("no env-line-ignored for {key}:\n{}", show(&f)));
        assert!(x.message.contains("<value hidden>"), "{}", x.message);
        assert!(x.message.contains("line "), "{}", x.message);
    }
    // ... lines that are tokens by their number only, ...
    assert!(
        f.iter()
            .any(|x| x.rule == "env-line-ignored" && x.message.contains("<line hidden>")),
        "{}",
        show(&f)
    );
    assert!(
        f.iter()
            .any(|x| x.rule == "env-key-looks-like-value" && x.key.is_none()),
        "{}",
        show(&f)
    );
    // ... and drift of a secret by number.
    let x = find(&f, "drift-value", Severity::Error, "SECRET_KEY_BASE");
    assert!(x.message.contains("value #"), "{}", x.message);
}

/// The scrub also catches a secret a rule would print through an ordinary key: a URL
/// password in S3_ENDPOINT and the like is hidden, the rest of the URL is kept.
#[test]
fn url_passwords_in_ordinary_keys_are_hidden() {
    let f = s3_env(&[
        ("S3_ENDPOINT", Some("s3.example.com")),
        (
            "S3_ALIAS_HOST",
            Some("https://media:Zq8pL2vX9mN4@files.example.com/"),
        ),
    ]);
    let human = show(&f);
    assert!(!human.contains("Zq8pL2vX9mN4"), "{human}");
    let x = find(&f, "env-s3-alias-host", Severity::Error, "S3_ALIAS_HOST");
    assert!(
        x.message.contains("media:<hidden>@files.example.com"),
        "{}",
        x.message
    );
    find(&f, "env-s3-endpoint", Severity::Error, "S3_ENDPOINT");
}

/// `live/.env.production` with S3 configured but `S3_ENABLED=false`.
fn s3_disabled_node(d: &Dir) -> PathBuf {
    std::fs::create_dir_all(d.0.path().join("live")).unwrap();
    d.write(
        "live/.env.production",
        &edit(
            &fixture("s3.env.production"),
            &[("S3_ENABLED", Some("false"))],
        ),
    )
}

fn put_file(path: &Path) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, b"\x89PNG\r\n").unwrap();
}

#[test]
fn s3_disabled_is_an_error_by_itself() {
    let d = Dir::new();
    let env = s3_disabled_node(&d);
    let f = doctor::check(&super_args(&[&env]));
    let x = find(&f, "env-s3-disabled", Severity::Error, "S3_ENABLED");
    assert!(
        x.message.contains(&format!(
            "{}",
            d.0.path().join("live/public/system").display()
        )),
        "{}",
        x.message
    );
    // It is the only error, and the binary exits 2 for it.
    let errors: Vec<_> = f.iter().filter(|x| x.severity == Severity::Error).collect();
    assert_eq!(errors.len(), 1, "{}", show(&f));
    let (code, out) = run(&["doctor", "--mastodon-env", env.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("error[env-s3-disabled]"), "{out}");
    // Directories without a file are not media.
    let system = d.0.path().join("live/public/system");
    std::fs::create_dir_all(system.join("media_attachments/files/109")).unwrap();
    std::fs::create_dir_all(system.join("accounts/avatars")).unwrap();
    let f = doctor::check(&super_args(&[&env]));
    find(&f, "env-s3-disabled", Severity::Error, "S3_ENABLED");
    // A file elsewhere under the root is not media either.
    put_file(&system.join("robots.txt"));
    let f = doctor::check(&super_args(&[&env]));
    find(&f, "env-s3-disabled", Severity::Error, "S3_ENABLED");
}

#[test]
fn s3_disabled_is_a_warning_when_the_local_media_root_holds_media() {
    let d = Dir::new();
    let env = s3_disabled_node(&d);
    put_file(
        &d.0.path()
            .join("live/public/system/media_attachments/files/109/348/000/original/a1b2.png"),
    );
    let f = doctor::check(&super_args(&[&env]));
    let x = find(&f, "env-s3-disabled", Severity::Warning, "S3_ENABLED");
    assert!(x.message.contains("holds media"), "{}", x.message);
    assert!(
        x.message
            .contains("media_attachments/files/109/348/000/original/a1b2.png"),
        "{}",
        x.message
    );
    assert_none_errors(&f);
    let (code, out) = run(&["doctor", "--mastodon-env", env.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("warning[env-s3-disabled]"), "{out}");

    // PAPERCLIP_ROOT_PATH moves the media root: the default one no longer counts.
    let media = d.0.path().join("media");
    let text = std::fs::read_to_string(&env).unwrap()
        + &format!("PAPERCLIP_ROOT_PATH={}\n", media.display());
    std::fs::write(&env, text).unwrap();
    let f = doctor::check(&super_args(&[&env]));
    let x = find(&f, "env-s3-disabled", Severity::Error, "S3_ENABLED");
    assert!(
        x.message.contains(&format!("{}", media.display())),
        "{}",
        x.message
    );
    put_file(&media.join("accounts/avatars/000/000/001/original/me.jpg"));
    let f = doctor::check(&super_args(&[&env]));
    find(&f, "env-s3-disabled", Severity::Warning, "S3_ENABLED");
    assert_none_errors(&f);
}

#[track_caller]
fn assert_none_errors(f: &[Finding]) {
    assert!(
        !f.iter().any(|x| x.severity == Severity::Error),
        "{}",
        show(f)
    );
}
