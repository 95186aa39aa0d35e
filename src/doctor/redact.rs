//! Keeping secrets out of the doctor's output.
//!
//! Two layers. Rules never format a value themselves: a value goes through
//! [`keys::shown`](crate::mastodon::keys::shown), a key name read from a file through
//! [`keys::shown_key`](crate::mastodon::keys::shown_key), and a line dotenv skips is described
//! by its shape only ([`skipped_shape`]), never echoed. Then, before anything is printed,
//! [`Secrets::scrub`] removes from every finding any text that came from a secret value, a
//! skipped line or a name that looks like a value, in case a rule slipped.

use std::collections::{BTreeMap, BTreeSet};

use super::finding::Finding;
use crate::config::{Config, StoreKind};
use crate::mastodon::dotenv::{Entry, EnvFile};
use crate::mastodon::keys;

/// Texts shorter than this are not scrubbed (they would match ordinary words); the first
/// layer keeps them out.
const MIN_SCRUB: usize = 6;

/// What replaces a scrubbed text.
const HIDDEN: &str = "<hidden>";

/// A line dotenv skipped, described without its value: the key if it may be printed, and the
/// line's shape (`KEY <value hidden>`) with the reason dotenv cannot read it.
pub fn skipped_shape(text: &str) -> (Option<String>, String) {
    let t = text.trim();
    let (export, body) = match t.strip_prefix("export") {
        Some(r) if r.starts_with(char::is_whitespace) => ("export ", r.trim_start()),
        _ => ("", t),
    };
    let quote = body.chars().next().filter(|c| "'\"`".contains(*c));
    let (name, rest) = match quote {
        Some(q) => match body[1..].find(q) {
            Some(end) => (&body[1..1 + end], &body[2 + end..]),
            None => ("", body),
        },
        None => {
            let end = body
                .find(|c: char| !(c.is_alphanumeric() || "_.-".contains(c)))
                .unwrap_or(body.len());
            (&body[..end], &body[end..])
        }
    };
    if name.is_empty() || !keys::is_displayable_key(name) {
        return (
            None,
            "<line hidden>: it does not start with a key name (a token, a pasted secret, or \
             the rest of a quoted value that spans lines?)"
                .into(),
        );
    }
    let after = rest.trim_start();
    let spaced = after.len() != rest.len();
    let shown_name = match quote {
        Some(q) => format!("{q}{name}{q}"),
        None => name.to_owned(),
    };
    let valid_name = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_.".contains(c));
    let (sep, why) = match after.chars().next() {
        None => (
            "",
            "the key has characters dotenv does not accept in key names",
        ),
        Some(_) if quote.is_some() => ("", "the key is quoted"),
        Some(_) if !valid_name => (
            "",
            "the key has characters dotenv does not accept in key names",
        ),
        Some('=') => ("", "dotenv cannot read the value"),
        Some(':') if !spaced => ("", "`KEY:value` needs a space after the `:`"),
        Some(_) if spaced => (" ", "there is no `=` between the key and the value"),
        Some(_) => ("", "dotenv cannot read it"),
    };
    let shape = match after.chars().next() {
        None => format!("{export}{shown_name}"),
        Some(c @ ('=' | ':')) => format!("{export}{shown_name}{c}<value hidden>"),
        Some(_) => format!("{export}{shown_name}{sep}<value hidden>"),
    };
    (Some(name.to_owned()), format!("`{shape}`: {why}"))
}

/// True if the value of `e` opens a quote it does not close: dotenv then keeps the quote in
/// the value and reads the following lines on their own (`KEY="abc` / `def"`).
pub fn opens_unclosed_quote(e: &Entry) -> bool {
    e.quote.is_none() && e.value.starts_with(['"', '\'', '`'])
}

/// Lines that follow a value whose quote is not closed, up to the next real assignment (one
/// with a value and a printable name): they may hold the rest of that value, so no part of
/// them is printed, not even a name. Maps each such line to the line of the value.
pub fn continuation_lines(env: &EnvFile) -> BTreeMap<usize, usize> {
    // (line, starts a continuation, ends one)
    let mut items: Vec<(usize, bool, bool)> = env
        .entries
        .iter()
        .map(|e| {
            let proper = !e.no_value && keys::is_displayable_key(&e.key);
            (e.line, opens_unclosed_quote(e), proper)
        })
        .chain(
            env.skipped
                .iter()
                .chain(&env.unset_exports)
                .map(|s| (s.line, false, false)),
        )
        .collect();
    items.sort();
    let mut out = BTreeMap::new();
    let mut open: Option<usize> = None;
    for (line, opens, proper) in items {
        if opens {
            open = Some(line);
            continue;
        }
        match open {
            Some(_) if proper => open = None,
            Some(from) => {
                out.insert(line, from);
            }
            None => {}
        }
    }
    out
}

/// True if the name of `e` must not be printed: it looks like a value
/// ([`keys::is_displayable_key`]), it is a lone word on its line that Mastodon does not read
/// (`NN7EXAMPLE`: a token, or a piece of one), or it follows an unclosed quote.
pub fn name_hidden(e: &Entry, continuation: &BTreeMap<usize, usize>) -> bool {
    !keys::is_displayable_key(&e.key)
        || (e.no_value
            && !e.exported
            && !keys::is_known(&e.key)
            && keys::closest_known(&e.key).is_none())
        || continuation.contains_key(&e.line)
}

/// Texts read from env files that must never appear in the output.
#[derive(Debug, Default)]
pub struct Secrets {
    texts: BTreeSet<String>,
}

impl Secrets {
    /// Records the secret texts of `env`: values of secret keys (and URL passwords of the
    /// others), names that look like values, and every token of the lines dotenv skipped.
    pub fn add_env(&mut self, env: &EnvFile) {
        let continuation = continuation_lines(env);
        for e in &env.entries {
            let hidden = name_hidden(e, &continuation);
            if hidden {
                self.add(&e.key);
            }
            if hidden || keys::is_secret(&e.key) || opens_unclosed_quote(e) {
                self.add_value(&e.value);
                self.add_value(e.value.trim_start_matches(['"', '\'', '`']));
            } else {
                self.add_url_passwords(&e.value);
            }
        }
        for s in env.skipped.iter().chain(&env.unset_exports) {
            self.add(&s.text);
            let all = continuation.contains_key(&s.line);
            for tok in s
                .text
                .split(|c: char| c.is_whitespace() || "=:'\"`#".contains(c))
            {
                if tok != "export" && (all || !keys::is_displayable_key(tok)) {
                    self.add(tok);
                }
            }
            self.add_url_passwords(&s.text);
        }
    }

    /// Records the secrets of a fediedge config: every S3 secret and access key, and the URL
    /// passwords of endpoints and http origins (probe errors may quote a URL).
    pub fn add_config(&mut self, config: &Config) {
        for sc in std::iter::once(&config.primary).chain(&config.fallbacks) {
            match &sc.kind {
                StoreKind::S3(s3) => {
                    self.add(&s3.secret_access_key);
                    self.add(&s3.access_key_id);
                    self.add_url_passwords(&s3.endpoint);
                }
                StoreKind::Http { url } => self.add_url_passwords(url),
                StoreKind::Fs { .. } => {}
            }
        }
    }

    fn add_value(&mut self, v: &str) {
        self.add(v.trim());
        for tok in v.split(char::is_whitespace) {
            self.add(tok);
        }
        self.add_url_passwords(v);
    }

    fn add_url_passwords(&mut self, v: &str) {
        for part in v.split("://").skip(1) {
            let authority = part.split(['/', '?', '#', ' ']).next().unwrap_or("");
            if let Some((userinfo, _)) = authority.rsplit_once('@') {
                let password = userinfo.split_once(':').map_or(userinfo, |(_, p)| p);
                self.add(password);
            }
        }
    }

    fn add(&mut self, t: &str) {
        if t.chars().count() >= MIN_SCRUB {
            self.texts.insert(t.to_owned());
        }
    }

    /// `s` with every recorded text replaced by `<hidden>` (longest texts first).
    pub fn scrub(&self, s: &str) -> String {
        let mut texts: Vec<&String> = self.texts.iter().collect();
        texts.sort_by_key(|t| std::cmp::Reverse(t.len()));
        let mut out = s.to_owned();
        for t in texts {
            if out.contains(t.as_str()) {
                out = out.replace(t.as_str(), HIDDEN);
            }
        }
        out
    }

    /// Scrubs the key, message and fix of `f`.
    pub fn scrub_finding(&self, f: &mut Finding) {
        if let Some(k) = &f.key {
            f.key = Some(self.scrub(k));
        }
        f.message = self.scrub(&f.message);
        f.fix = self.scrub(&f.fix);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_never_hold_the_value() {
        let secret = "wJalrXUtnFEMI/K7MDENG";
        for (line, key, shape) in [
            (
                format!("S3_SECRET_KEY {secret}"),
                Some("S3_SECRET_KEY"),
                "`S3_SECRET_KEY <value hidden>`",
            ),
            (
                format!("AWS_SECRET_ACCESS_KEY:{secret}"),
                Some("AWS_SECRET_ACCESS_KEY"),
                "`AWS_SECRET_ACCESS_KEY:<value hidden>`",
            ),
            (
                format!("\"SECRET_KEY_BASE\"=\"{secret}\""),
                Some("SECRET_KEY_BASE"),
                "`\"SECRET_KEY_BASE\"=<value hidden>`",
            ),
            (
                format!("S3-BUCKET={secret}"),
                Some("S3-BUCKET"),
                "`S3-BUCKET=<value hidden>`",
            ),
            (
                format!("export OTP_SECRET {secret}"),
                Some("OTP_SECRET"),
                "`export OTP_SECRET <value hidden>`",
            ),
            (secret.to_owned(), None, "<line hidden>"),
            (format!("{secret}=="), None, "<line hidden>"),
            (format!("  {secret}  x"), None, "<line hidden>"),
        ] {
            let (k, s) = skipped_shape(&line);
            assert_eq!(k.as_deref(), key, "{line}");
            assert!(s.starts_with(shape), "{line}: {s}");
            assert!(!s.contains("wJalr") && !s.contains("K7MDENG"), "{s}");
        }
    }

    #[test]
    fn scrub_removes_every_recorded_text() {
        let env = crate::mastodon::dotenv::parse(
            "DB_PASS=hunter2hunter2\nREDIS_URL=redis://:p4ssw0rd@host\nS3_ENDPOINT=https://k:abcdef@h\nSECRET_KEY_BASE deadbeefcafe\n",
            std::path::Path::new(".env"),
        );
        let mut s = Secrets::default();
        s.add_env(&env);
        let out = s.scrub("a hunter2hunter2 b p4ssw0rd c abcdef d deadbeefcafe e SECRET_KEY_BASE");
        assert_eq!(
            out,
            "a <hidden> b <hidden> c <hidden> d <hidden> e SECRET_KEY_BASE"
        );
        // The `export` of a skipped line is a word of the grammar, not a secret.
        let env = crate::mastodon::dotenv::parse(
            "export DB_PASS # hunter2hunter2\n",
            std::path::Path::new(".env"),
        );
        let mut s = Secrets::default();
        s.add_env(&env);
        assert_eq!(
            s.scrub("`export DB_PASS` hunter2hunter2"),
            "`export DB_PASS` <hidden>"
        );
    }
}
