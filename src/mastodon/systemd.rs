//! The parts of a systemd service unit the doctor needs: `ExecStart=`, `Environment=`,
//! `EnvironmentFile=`, `ReadWritePaths=`, `ProtectSystem=` and `WorkingDirectory=`.
//!
//! Follows systemd.syntax(7) and systemd.exec(5) as far as these keys go: `#`/`;` comment lines,
//! a trailing `\` continues a line, `Environment=` takes space-separated, optionally quoted
//! `VAR=value` words and accumulates over lines, an empty assignment resets a list setting,
//! `EnvironmentFile=` and `ReadWritePaths=` entries may be prefixed with `-` (ignore if
//! missing) and `ReadWritePaths=` entries with `+`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One `EnvironmentFile=` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvFileRef {
    /// The path.
    pub path: PathBuf,
    /// True with a `-` prefix: a missing file is not an error.
    pub optional: bool,
}

/// A parsed service unit.
#[derive(Debug, Clone, Default)]
pub struct Unit {
    /// Where it came from.
    pub path: PathBuf,
    /// The last `ExecStart=` of `[Service]`, prefixes (`@-:+!`) removed, split into words.
    pub exec_start: Option<Vec<String>>,
    /// Line of that `ExecStart=`.
    pub exec_start_line: usize,
    /// `Environment=` assignments in order (later wins).
    pub environment: Vec<(String, String)>,
    /// `EnvironmentFile=` entries in order.
    pub environment_files: Vec<EnvFileRef>,
    /// `ReadWritePaths=` entries, prefixes removed.
    pub read_write_paths: Vec<PathBuf>,
    /// `ProtectSystem=` value, if set.
    pub protect_system: Option<String>,
    /// `WorkingDirectory=` value, if set.
    pub working_directory: Option<PathBuf>,
}

impl Unit {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> std::io::Result<Unit> {
        Ok(parse(&std::fs::read_to_string(path)?, path))
    }

    /// The value of `key` set by `Environment=` (the last one wins).
    pub fn env(&self, key: &str) -> Option<&str> {
        self.environment
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The environment the service starts with: `EnvironmentFile=` files that can be read here
    /// first, then `Environment=` (systemd applies `EnvironmentFile=` after `Environment=`, so a
    /// file value wins; we follow that order). Unreadable files are returned separately.
    pub fn full_environment(&self) -> (BTreeMap<String, String>, Vec<EnvFileRef>) {
        let mut env: BTreeMap<String, String> = self.environment.iter().cloned().collect();
        let mut unreadable = Vec::new();
        for f in &self.environment_files {
            match std::fs::read_to_string(&f.path) {
                Ok(text) => env.extend(parse_environment_file(&text)),
                Err(_) => unreadable.push(f.clone()),
            }
        }
        (env, unreadable)
    }
}

/// Parses unit text; `path` is only recorded.
pub fn parse(text: &str, path: &Path) -> Unit {
    let mut unit = Unit {
        path: path.to_owned(),
        ..Unit::default()
    };
    let mut section = String::new();
    let mut pending = String::new();
    let mut pending_line = 0;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if pending.is_empty() {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            pending_line = line_no;
        } else if line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(stripped) = line.strip_suffix('\\') {
            pending.push_str(stripped);
            pending.push(' ');
            continue;
        }
        pending.push_str(line);
        let full = std::mem::take(&mut pending);
        if full.starts_with('[') && full.ends_with(']') {
            section = full[1..full.len() - 1].to_owned();
            continue;
        }
        if section != "Service" {
            continue;
        }
        let Some((key, value)) = full.split_once('=') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "ExecStart" => {
                if value.is_empty() {
                    unit.exec_start = None;
                } else {
                    let v = value.trim_start_matches(['@', '-', ':', '+', '!']);
                    unit.exec_start = Some(split_words(v));
                    unit.exec_start_line = pending_line;
                }
            }
            "Environment" => {
                if value.is_empty() {
                    unit.environment.clear();
                }
                for word in split_words(value) {
                    if let Some((k, v)) = word.split_once('=') {
                        unit.environment.push((k.to_owned(), v.to_owned()));
                    }
                }
            }
            "EnvironmentFile" => {
                if value.is_empty() {
                    unit.environment_files.clear();
                } else {
                    let optional = value.starts_with('-');
                    unit.environment_files.push(EnvFileRef {
                        path: PathBuf::from(value.trim_start_matches('-')),
                        optional,
                    });
                }
            }
            "ReadWritePaths" => {
                if value.is_empty() {
                    unit.read_write_paths.clear();
                }
                for word in split_words(value) {
                    unit.read_write_paths
                        .push(PathBuf::from(word.trim_start_matches(['-', '+'])));
                }
            }
            "ProtectSystem" => unit.protect_system = Some(value.to_owned()),
            "WorkingDirectory" => {
                unit.working_directory = Some(PathBuf::from(value.trim_start_matches('-')))
            }
            _ => {}
        }
    }
    unit
}

/// Splits a command line or a list setting into words: whitespace separates, `"…"` and `'…'`
/// group, a backslash escapes the next character.
pub fn split_words(s: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut it = s.chars();
    while let Some(c) = it.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), '\\') => {
                if let Some(n) = it.next() {
                    cur.push(n);
                }
            }
            (Some(_), c) => cur.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '\\') => {
                if let Some(n) = it.next() {
                    cur.push(n);
                    in_word = true;
                }
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

/// Parses an `EnvironmentFile=` file the way systemd does: `KEY=VALUE` lines, `#`/`;`
/// comments, surrounding quotes removed.
pub fn parse_environment_file(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim();
            let v = if v.len() >= 2
                && ((v.starts_with('"') && v.ends_with('"'))
                    || (v.starts_with('\'') && v.ends_with('\'')))
            {
                &v[1..v.len() - 1]
            } else {
                v
            };
            out.push((k.trim().to_owned(), v.to_owned()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = "[Unit]\nDescription=mastodon-sidekiq\nAfter=network.target\n\n[Service]\nType=simple\nUser=mastodon\nWorkingDirectory=/home/mastodon/live\nEnvironment=\"RAILS_ENV=production\"\nEnvironment=\"DB_POOL=25\"\nEnvironment=\"MALLOC_ARENA_MAX=2\"\nEnvironment=\"LD_PRELOAD=libjemalloc.so\"\nExecStart=/home/mastodon/.rbenv/shims/bundle exec sidekiq -c 25\nTimeoutSec=15\nRestart=always\nProtectSystem=strict\nReadWritePaths=/home/mastodon/live\n";

    #[test]
    fn shipped_unit() {
        let u = parse(SHIPPED, Path::new("mastodon-sidekiq.service"));
        assert_eq!(u.env("DB_POOL"), Some("25"));
        assert_eq!(u.env("RAILS_ENV"), Some("production"));
        assert_eq!(
            u.exec_start.as_deref().unwrap(),
            [
                "/home/mastodon/.rbenv/shims/bundle",
                "exec",
                "sidekiq",
                "-c",
                "25"
            ]
        );
        assert_eq!(u.exec_start_line, 13);
        assert_eq!(u.read_write_paths, [PathBuf::from("/home/mastodon/live")]);
        assert_eq!(u.protect_system.as_deref(), Some("strict"));
    }

    #[test]
    fn several_assignments_continuations_and_resets() {
        let u = parse(
            "[Service]\nEnvironment=\"A=1\" \"B=two words\" C=3\nEnvironment=\nEnvironment=D=4\nExecStart=-/usr/bin/env \\\n  bundle exec sidekiq -q default\nReadWritePaths=-/a +/b\nEnvironmentFile=-/etc/x.env\n",
            Path::new("u"),
        );
        assert_eq!(u.environment, [("D".to_string(), "4".to_string())]);
        assert_eq!(
            u.exec_start.unwrap(),
            ["/usr/bin/env", "bundle", "exec", "sidekiq", "-q", "default"]
        );
        assert_eq!(
            u.read_write_paths,
            [PathBuf::from("/a"), PathBuf::from("/b")]
        );
        assert!(u.environment_files[0].optional);
        let u = parse(
            "[Service]\nEnvironment=\"A=1\" \"B=two words\"\n",
            Path::new("u"),
        );
        assert_eq!(u.env("B"), Some("two words"));
    }

    #[test]
    fn environment_file_syntax() {
        let v = parse_environment_file("# c\nA=1\nB=\"x y\"\n; c\nexport C=3\n");
        assert_eq!(v.len(), 3);
        assert_eq!(v[1], ("B".to_string(), "x y".to_string()));
    }
}
