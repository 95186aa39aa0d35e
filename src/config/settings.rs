//! The reload diff (issue 8 §7): what a config file said, as a tree, and the values that
//! differ between two of them, by dotted key (`core.web`, `fallback[0].bucket`).
//!
//! The tree is the raw config ([`super::RawConfig`], defaults filled in) serialized to JSON
//! values, so every key is named as it is written in the file and a new key needs nothing here.
//! Secrets are masked by their type ([`super::secrets::Secret`]); an S3 key or the cache
//! buster's secret that came from a `_file` or the environment is masked into the tree after
//! it is resolved, so a changed key file shows too. The diff says that a secret changed, never
//! its value. A new secret key must be typed `Secret` in its raw shape (and, if it can come
//! from a file, be masked in from the validated config in [`Settings::of`]): a plain `String`
//! would be shown.

use serde_json::{Map, Value};

use super::secrets::{mask, MASK};
use super::{Config, RawConfig, StoreKind};

/// What a config file said, secrets masked. Its `Debug` shows nothing of it.
#[derive(Clone, Default)]
pub struct Settings(Value);

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Settings(..)")
    }
}

impl Settings {
    /// The tree of `raw`, with the S3 keys of the validated `config` masked in (wherever they
    /// were read from).
    pub(super) fn of(raw: &RawConfig, config: &Config) -> Settings {
        // Plain structs, string keys: serializing cannot fail.
        let mut tree = serde_json::to_value(raw).expect("the raw config serializes");
        // `None`: the primary; `Some(i)`: `fallback[i]`.
        let stores = std::iter::once((None, &config.primary)).chain(
            config
                .fallbacks
                .iter()
                .enumerate()
                .map(|(i, s)| (Some(i), s)),
        );
        for (index, store) in stores {
            let StoreKind::S3(s3) = &store.kind else {
                continue;
            };
            let table = match index {
                Some(i) => tree.get_mut("fallback").and_then(|f| f.get_mut(i)),
                None => tree.get_mut("primary"),
            };
            if let Some(Value::Object(t)) = table {
                t.insert("access_key_id".into(), mask(&s3.access_key_id).into());
                t.insert(
                    "secret_access_key".into(),
                    mask(&s3.secret_access_key).into(),
                );
            }
        }
        if let (Some(b), Some(Value::Object(t))) =
            (&config.cache_buster, tree.get_mut("cache_buster"))
        {
            t.insert("secret".into(), mask(&b.secret).into());
        }
        Settings(tree)
    }
}

/// One value that differs between two configs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The dotted key, as written in the file: `core.web`, `tls.certificates[0].cert`.
    pub key: String,
    /// The old and new values as TOML-like text (`(unset)` when absent), or `None` for a
    /// secret, which is never shown.
    pub values: Option<(String, String)>,
}

impl std::fmt::Display for Change {
    /// `changed `core.web` from ["10.0.0.2:3000"] to ["10.0.0.3:3000"]`, or
    /// `changed `primary.secret_access_key` (a secret: value not shown)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.values {
            Some((from, to)) => write!(f, "changed `{}` from {from} to {to}", self.key),
            None => write!(f, "changed `{}` (a secret: value not shown)", self.key),
        }
    }
}

/// Every value that differs from `old` to `new`, sorted by key.
pub fn diff(old: &Settings, new: &Settings) -> Vec<Change> {
    let mut out = Vec::new();
    walk(String::new(), &old.0, &new.0, &mut out);
    out
}

fn walk(key: String, old: &Value, new: &Value, out: &mut Vec<Change>) {
    if old == new {
        return;
    }
    let child = |k: &str| match key.is_empty() {
        true => k.to_owned(),
        false => format!("{key}.{k}"),
    };
    let empty = Map::new();
    match (old, new) {
        // Tables (also one that appears or goes: each of its values is named).
        (Value::Object(_) | Value::Null, Value::Object(_) | Value::Null) => {
            let (a, b) = (
                old.as_object().unwrap_or(&empty),
                new.as_object().unwrap_or(&empty),
            );
            let mut keys: Vec<&String> = b.keys().collect();
            keys.extend(a.keys().filter(|k| !b.contains_key(*k)));
            for k in keys {
                let (x, y) = (
                    a.get(k).unwrap_or(&Value::Null),
                    b.get(k).unwrap_or(&Value::Null),
                );
                walk(child(k), x, y, out);
            }
        }
        // Arrays of tables (`[[fallback]]`, `tls.certificates`): by index.
        (Value::Array(a), Value::Array(b)) if tables(a) && tables(b) => {
            for i in 0..a.len().max(b.len()) {
                let (x, y) = (
                    a.get(i).unwrap_or(&Value::Null),
                    b.get(i).unwrap_or(&Value::Null),
                );
                walk(format!("{key}[{i}]"), x, y, out);
            }
        }
        _ if is_secret(old) || is_secret(new) => out.push(Change { key, values: None }),
        _ => out.push(Change {
            key,
            values: Some((show(old), show(new))),
        }),
    }
}

fn tables(a: &[Value]) -> bool {
    a.iter().all(|v| v.is_object())
}

fn is_secret(v: &Value) -> bool {
    match v {
        Value::String(s) => s.starts_with(MASK),
        Value::Array(a) => a.iter().any(is_secret),
        Value::Object(o) => o.values().any(is_secret),
        _ => false,
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::Null => "(unset)".into(),
        v => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn settings(text: &str) -> Settings {
        super::super::from_str(text, Path::new("test.toml"))
            .unwrap()
            .settings
    }

    fn lines(old: &str, new: &str) -> Vec<String> {
        diff(&settings(old), &settings(new))
            .iter()
            .map(|c| c.to_string())
            .collect()
    }

    const CORE: &str = "[core]\nhosts = [\"a.example\"]\nweb = [\"10.0.0.2:3000\"]\n";

    #[test]
    fn changed_values_are_named_by_their_dotted_key() {
        let new = CORE.replace("10.0.0.2:3000", "10.0.0.3:3000") + "connect_timeout = \"5s\"\n";
        assert_eq!(
            lines(CORE, &new),
            [
                "changed `core.connect_timeout` from \"2s\" to \"5s\"",
                "changed `core.web` from [\"10.0.0.2:3000\"] to [\"10.0.0.3:3000\"]",
            ]
        );
        assert!(lines(CORE, CORE).is_empty());
        // A key written with its default value is no change.
        assert!(lines(CORE, &format!("{CORE}connect_timeout = \"2s\"\n")).is_empty());
        assert_eq!(
            lines("", "[cache]\ndir = \"/c\"\n")[0],
            "changed `cache.dir` from (unset) to \"/c\""
        );
        assert_eq!(
            lines("", "max_flight_memory = \"1GiB\"\nworker_threads = 4\n"),
            [
                "changed `max_flight_memory` from \"256.0 MiB\" to \"1.0 GiB\"",
                "changed `worker_threads` from (unset) to 4",
            ]
        );
    }

    #[test]
    fn secrets_show_as_changed_never_their_value() {
        let s3 = |secret: &str, bucket: &str| {
            format!(
                "[[fallback]]\ntype = \"s3\"\nendpoint = \"http://127.0.0.1:1\"\nbucket = \"{bucket}\"\naccess_key_id = \"GKold\"\nsecret_access_key = \"{secret}\"\n"
            )
        };
        let out = lines(&s3("hunter2", "b"), &s3("correct-horse", "c"));
        assert_eq!(
            out,
            [
                "changed `fallback[0].bucket` from \"b\" to \"c\"",
                "changed `fallback[0].secret_access_key` (a secret: value not shown)",
            ]
        );
        let redis = |u: &str| format!("[sidekiq]\nredis_url = \"{u}\"\n");
        let out = lines(
            &redis("redis://:hunter2@127.0.0.1:6379/0"),
            &redis("redis://:swordfish@127.0.0.1:6379/0"),
        );
        assert_eq!(
            out,
            ["changed `sidekiq.redis_url` (a secret: value not shown)"]
        );
        assert!(!format!("{:?}", settings(&s3("hunter2", "b"))).contains("hunter2"));
        let buster =
            |s: &str| format!("[cache_buster]\nsecret_header = \"X-Buster\"\nsecret = \"{s}\"\n");
        assert_eq!(
            lines(&buster("hunter2"), &buster("swordfish")),
            ["changed `cache_buster.secret` (a secret: value not shown)"]
        );
    }

    #[test]
    fn a_secret_read_from_a_file_shows_when_the_file_changes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("secret");
        std::fs::write(&f, "hunter2\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let text = format!(
            "[primary]\ntype = \"s3\"\nendpoint = \"http://h\"\nbucket = \"b\"\naccess_key_id = \"a\"\nsecret_access_key_file = {f:?}\n"
        );
        let before = settings(&text);
        std::fs::write(&f, "swordfish\n").unwrap();
        let after = settings(&text);
        let out: Vec<String> = diff(&before, &after)
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(
            out,
            ["changed `primary.secret_access_key` (a secret: value not shown)"]
        );
    }

    #[test]
    fn tables_that_come_and_go_and_arrays_of_tables_are_walked() {
        let tls = |c: &str| {
            format!("[tls]\nlisten = \"127.0.0.1:0\"\ncertificates = [{{ cert = \"/a.pem\", key = \"/a.key\" }}{c}]\n")
        };
        assert_eq!(
            lines(&tls(""), &tls(", { cert = \"/b.pem\", key = \"/b.key\" }")),
            [
                "changed `tls.certificates[1].cert` from (unset) to \"/b.pem\"",
                "changed `tls.certificates[1].key` from (unset) to \"/b.key\"",
            ]
        );
        let out = lines(CORE, "");
        assert!(
            out.contains(&"changed `core.web` from [\"10.0.0.2:3000\"] to (unset)".to_owned()),
            "{out:?}"
        );
    }
}
