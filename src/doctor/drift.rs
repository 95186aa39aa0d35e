//! Drift between the env files of several nodes of one instance: keys that must agree but do
//! not, and keys present on some nodes only. Secret values are compared, never printed.

use std::collections::{BTreeMap, BTreeSet};

use super::finding::{Finding, Severity};
use crate::mastodon::dotenv::EnvFile;
use crate::mastodon::keys::{self, Kind};

/// One node: its name (`NODE=PATH` on the command line, else the path) and its env.
pub struct Node {
    /// Name used in messages.
    pub name: String,
    /// Its parsed env file.
    pub env: EnvFile,
}

/// The value Mastodon acts on: booleans normalised to `true`/`false`, defaults filled in.
fn effective(env: &EnvFile, key: &str, default: Option<&str>) -> Option<String> {
    let v = env.get(key);
    if keys::kind(key) == Some(Kind::Bool) {
        return Some((v == Some("true")).to_string());
    }
    v.or(default).map(str::to_owned)
}

/// Compares every node with every other.
pub fn lint(nodes: &[Node]) -> Vec<Finding> {
    let mut out = Vec::new();
    if nodes.len() < 2 {
        return out;
    }
    let files = nodes
        .iter()
        .map(|n| n.env.path.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut reported: BTreeSet<&str> = BTreeSet::new();
    for &(key, default) in keys::MUST_AGREE {
        // value → nodes having it.
        let mut groups: BTreeMap<Option<String>, Vec<&str>> = BTreeMap::new();
        for n in nodes {
            groups
                .entry(effective(&n.env, key, default))
                .or_default()
                .push(&n.name);
        }
        if groups.len() < 2 {
            continue;
        }
        reported.insert(key);
        let secret = keys::is_secret(key);
        let described: Vec<String> = groups
            .iter()
            .enumerate()
            .map(|(i, (value, names))| {
                let v = match value {
                    None => "unset".to_owned(),
                    Some(_) if secret => format!("value #{}", i + 1),
                    Some(v) => keys::shown(key, v),
                };
                format!("{v} on {}", names.join(", "))
            })
            .collect();
        out.push(Finding::new(
            Severity::Error,
            "drift-value",
            files.clone(),
            Some(key),
            format!(
                "{key} differs between nodes ({}): it must be the same on every node of one \
                 instance{}.",
                described.join("; "),
                if secret { " (values not shown)" } else { "" }
            ),
            format!("Copy the correct {key} line to every node's env file."),
        ));
    }
    let all_keys: BTreeSet<&str> = nodes
        .iter()
        .flat_map(|n| n.env.entries.iter().map(|e| e.key.as_str()))
        // A name that looks like a value is reported by `env-key-looks-like-value`, unnamed.
        .filter(|k| keys::is_displayable_key(k))
        .collect();
    for key in all_keys {
        if reported.contains(key) {
            continue;
        }
        let (with, without): (Vec<&Node>, Vec<&Node>) = nodes.iter().partition(|n| n.env.has(key));
        if without.is_empty() {
            continue;
        }
        let must_agree = keys::MUST_AGREE.iter().any(|(k, _)| *k == key);
        let sev = if keys::NODE_LOCAL.contains(&key) || must_agree {
            // Node-local by nature, or must-agree keys whose effective value agrees anyway.
            Severity::Info
        } else {
            Severity::Warning
        };
        let names = |v: &[&Node]| {
            v.iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push(Finding::new(
            sev,
            "drift-key-missing",
            files.clone(),
            Some(key),
            format!(
                "{key} is set on {} but not on {}{}.",
                names(&with),
                names(&without),
                if must_agree {
                    " (the effective value is the same everywhere)"
                } else {
                    ""
                }
            ),
            "Keep the nodes' env files identical except for node-local settings.",
        ));
    }
    out
}
