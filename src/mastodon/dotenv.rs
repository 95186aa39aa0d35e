//! A dotenv parser faithful to what Mastodon runs: bkeepers/dotenv 3.x `lib/dotenv/parser.rb`.
//!
//! The doctor must see a `.env.production` exactly as Mastodon sees it, quirks included:
//!
//! - keys match `[\w.]+`, so `3_BUCKET` is a valid key and is set silently;
//! - the separator is `=` (spaces allowed around it) or `:` followed by whitespace;
//! - a value wrapped in `'…'`, `"…"` or `` `…` `` loses its quotes; the value is stripped;
//!   quoted values may span lines;
//! - in an unquoted value, `#` starts a comment even without a space before it;
//! - `\n`/`\r` are expanded in double quotes; backslash escapes are removed and `$VAR`,
//!   `${VAR}` and `$(cmd)` are substituted unless the value is single-quoted;
//! - `export KEY=value` is accepted; `export KEY` alone is an error unless `KEY` was set
//!   earlier in the file;
//! - a later line for the same key wins (the file is read into a hash);
//! - a line that does not fit the grammar is skipped without a word.
//!
//! The parser keeps what the linter needs on top: line numbers, the quote used, whether a `#`
//! cut an unquoted value, which variables were substituted, and the skipped lines.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One `KEY=value` assignment as dotenv reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value after quote stripping, unescaping and substitution.
    pub value: String,
    /// 1-based line of the key.
    pub line: usize,
    /// The quote character that wrapped the value, if any.
    pub quote: Option<char>,
    /// True if the line started with `export `.
    pub exported: bool,
    /// True if the line had no value at all (`KEY` or `export KEY`).
    pub no_value: bool,
    /// True if an unquoted value was cut by a `#` glued to it (`abc#def` → `abc`).
    pub cut_at_hash: bool,
    /// Variables referenced with `$NAME`/`${NAME}` that were not set earlier in the file
    /// (dotenv takes them from the process environment, usually giving an empty string).
    pub undefined_refs: Vec<String>,
    /// True if the value runs a command through `$(…)`.
    pub command_substitution: bool,
}

/// A line dotenv skips because it does not fit the grammar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedLine {
    /// 1-based line number.
    pub line: usize,
    /// The text of the line (trimmed).
    pub text: String,
}

/// A parsed env file.
#[derive(Debug, Clone, Default)]
pub struct EnvFile {
    /// Where it came from.
    pub path: PathBuf,
    /// Every assignment, in file order (duplicates included).
    pub entries: Vec<Entry>,
    /// Lines dotenv ignores.
    pub skipped: Vec<SkippedLine>,
    /// `export KEY` lines without a value for a key not set before: dotenv raises
    /// `Dotenv::FormatError` and Mastodon does not boot.
    pub unset_exports: Vec<SkippedLine>,
}

impl EnvFile {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> std::io::Result<EnvFile> {
        let text = std::fs::read_to_string(path)?;
        Ok(parse(&text, path))
    }

    /// The effective value of `key` (the last assignment wins).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.last(key).map(|e| e.value.as_str())
    }

    /// The last (effective) entry for `key`.
    pub fn last(&self, key: &str) -> Option<&Entry> {
        self.entries.iter().rev().find(|e| e.key == key)
    }

    /// True if `key` is assigned anywhere in the file (even to an empty value).
    pub fn has(&self, key: &str) -> bool {
        self.last(key).is_some()
    }

    /// The effective key → value map.
    pub fn map(&self) -> BTreeMap<String, String> {
        self.entries
            .iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect()
    }

    /// `ENV[key] == 'true'`, Mastodon's only notion of a true boolean.
    pub fn is_true(&self, key: &str) -> bool {
        self.get(key) == Some("true")
    }
}

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '.'
}

/// Parses dotenv text; `path` is only recorded.
pub fn parse(text: &str, path: &Path) -> EnvFile {
    let mut file = EnvFile {
        path: path.to_owned(),
        ..EnvFile::default()
    };
    let mut defined: BTreeMap<String, String> = BTreeMap::new();
    let chars: Vec<char> = text.chars().collect();
    let mut pos = 0;
    let mut line_no = 1;
    while pos < chars.len() {
        let line_end = find(&chars, pos, '\n').unwrap_or(chars.len());
        match parse_assignment(&chars, pos, line_end) {
            Some(parsed) => {
                let next = find(&chars, parsed.end, '\n')
                    .map(|p| p + 1)
                    .unwrap_or(chars.len());
                let newlines = chars[pos..next].iter().filter(|&&c| c == '\n').count();
                if parsed.no_value && parsed.exported && !defined.contains_key(&parsed.key) {
                    file.unset_exports.push(SkippedLine {
                        line: line_no,
                        text: text_of(&chars, pos, line_end),
                    });
                } else {
                    let entry = finish_value(parsed, line_no, &defined);
                    defined.insert(entry.key.clone(), entry.value.clone());
                    file.entries.push(entry);
                }
                line_no += newlines;
                pos = next;
            }
            None => {
                let t = text_of(&chars, pos, line_end);
                if !t.is_empty() && !t.starts_with('#') {
                    file.skipped.push(SkippedLine {
                        line: line_no,
                        text: t,
                    });
                }
                pos = line_end + 1;
                line_no += 1;
            }
        }
    }
    file
}

fn find(chars: &[char], from: usize, c: char) -> Option<usize> {
    chars[from.min(chars.len())..]
        .iter()
        .position(|&x| x == c)
        .map(|p| p + from)
}

fn text_of(chars: &[char], from: usize, to: usize) -> String {
    chars[from..to.min(chars.len())]
        .iter()
        .collect::<String>()
        .trim()
        .to_owned()
}

struct Parsed {
    key: String,
    raw_value: Option<String>,
    exported: bool,
    no_value: bool,
    cut_at_hash: bool,
    /// Index just past what the assignment consumed (a quoted value may span lines).
    end: usize,
}

fn is_space(c: char) -> bool {
    c == ' ' || c == '\t' || c == '\r' || c == '\x0b' || c == '\x0c'
}

/// Tries the dotenv `LINE` regex at a line start. `None` when the line does not match.
fn parse_assignment(chars: &[char], start: usize, line_end: usize) -> Option<Parsed> {
    let mut i = start;
    while i < line_end && is_space(chars[i]) {
        i += 1;
    }
    let mut exported = false;
    let rest: String = chars[i..line_end].iter().collect();
    if let Some(after) = rest.strip_prefix("export") {
        let spaces = after.chars().take_while(|&c| is_space(c)).count();
        if spaces > 0 {
            let key_start = i + 6 + spaces;
            if key_start < line_end && is_key_char(chars[key_start]) {
                exported = true;
                i = key_start;
            }
        }
    }
    let key_start = i;
    while i < line_end && is_key_char(chars[i]) {
        i += 1;
    }
    if i == key_start {
        return None;
    }
    let key: String = chars[key_start..i].iter().collect();
    // Separator: `\s*=\s*?` or `:\s+?`.
    let mut j = i;
    while j < line_end && is_space(chars[j]) {
        j += 1;
    }
    let has_sep = if j < line_end && chars[j] == '=' {
        j += 1;
        true
    } else if i < line_end && chars[i] == ':' && i + 1 < line_end && is_space(chars[i + 1]) {
        j = i + 2;
        true
    } else {
        false
    };
    if !has_sep {
        // No separator: only trailing whitespace and a comment may follow.
        return tail_ok(chars, i, line_end).then_some(Parsed {
            key,
            raw_value: None,
            exported,
            no_value: true,
            cut_at_hash: false,
            end: line_end,
        });
    }
    // Quoted value: `\s*'(?:\\'|[^'])*'`, same for `"`; may span lines.
    let mut q = j;
    while q < chars.len() && (is_space(chars[q]) || chars[q] == '\n') {
        q += 1;
    }
    if q < chars.len() && (chars[q] == '\'' || chars[q] == '"') {
        let quote = chars[q];
        let mut k = q + 1;
        while k < chars.len() {
            if chars[k] == '\\' && k + 1 < chars.len() && chars[k + 1] == quote {
                k += 2;
                continue;
            }
            if chars[k] == quote {
                break;
            }
            k += 1;
        }
        if k < chars.len() {
            let after_quote = k + 1;
            let end_of_that_line = find(chars, after_quote, '\n').unwrap_or(chars.len());
            if tail_ok(chars, after_quote, end_of_that_line) {
                return Some(Parsed {
                    key,
                    raw_value: Some(chars[j..after_quote].iter().collect()),
                    exported,
                    no_value: false,
                    cut_at_hash: false,
                    end: after_quote,
                });
            }
        }
    }
    // Unquoted value: `[^#\n]+`, then an optional comment.
    let hash = chars[j..line_end]
        .iter()
        .position(|&c| c == '#')
        .map(|p| p + j);
    let value_end = hash.unwrap_or(line_end);
    let raw: String = chars[j..value_end].iter().collect();
    let cut_at_hash = match hash {
        Some(h) => h > j && !is_space(chars[h - 1]) && !raw.trim().is_empty(),
        None => false,
    };
    Some(Parsed {
        key,
        raw_value: Some(raw),
        exported,
        no_value: false,
        cut_at_hash,
        end: line_end,
    })
}

/// True if only whitespace and an optional `#` comment follow `from` up to `to`.
fn tail_ok(chars: &[char], from: usize, to: usize) -> bool {
    let mut i = from;
    while i < to && is_space(chars[i]) {
        i += 1;
    }
    i == to || chars[i] == '#'
}

/// `parse_value`: strip, remove quotes, expand, unescape, substitute.
fn finish_value(p: Parsed, line: usize, defined: &BTreeMap<String, String>) -> Entry {
    let raw = p.raw_value.unwrap_or_default();
    let stripped = raw.trim_matches(|c: char| c.is_whitespace() || c == '\0');
    let mut quote = None;
    let mut value = stripped.to_owned();
    let mut cs = stripped.chars();
    if let (Some(first), Some(last)) = (cs.next(), stripped.chars().last()) {
        if stripped.chars().count() >= 2 && first == last && "'\"`".contains(first) {
            quote = Some(first);
            value = stripped[1..stripped.len() - 1].to_owned();
        }
    }
    if quote == Some('"') {
        value = value.replace("\\n", "\n").replace("\\r", "\r");
    }
    let mut undefined_refs = Vec::new();
    let mut command_substitution = false;
    if quote != Some('\'') {
        value = unescape(&value);
        command_substitution = value.contains("$(");
        value = substitute(&value, defined, &mut undefined_refs);
    }
    Entry {
        key: p.key,
        value,
        line,
        quote,
        exported: p.exported,
        no_value: p.no_value,
        cut_at_hash: p.cut_at_hash,
        undefined_refs,
        command_substitution,
    }
}

/// `value.gsub(/\\([^$])/, '\1')`.
fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut it = value.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\\' {
            if let Some(&n) = it.peek() {
                if n != '$' {
                    out.push(n);
                    it.next();
                    continue;
                }
            }
        }
        out.push(c);
    }
    out
}

/// `$VAR` / `${VAR}` substitution (dotenv's `Substitutions::Variable`): a variable set earlier
/// in the file is used; anything else comes from the process environment, which the doctor
/// cannot see, so it is recorded and replaced by an empty string. `\$` stays literal.
fn substitute(
    value: &str,
    defined: &BTreeMap<String, String>,
    undefined: &mut Vec<String>,
) -> String {
    let chars: Vec<char> = value.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '\\' && i + 1 < chars.len() && chars[i + 1] == '$' {
            out.push('$');
            i += 2;
            continue;
        }
        if chars[i] == '$' && i + 1 < chars.len() {
            let braced = chars[i + 1] == '{';
            let start = if braced { i + 2 } else { i + 1 };
            let mut end = start;
            while end < chars.len() && (chars[end].is_ascii_alphanumeric() || chars[end] == '_') {
                end += 1;
            }
            let closed = !braced || (end < chars.len() && chars[end] == '}');
            if end > start && closed {
                let name: String = chars[start..end].iter().collect();
                match defined.get(&name) {
                    Some(v) => out.push_str(v),
                    None => undefined.push(name),
                }
                i = if braced { end + 1 } else { end };
                continue;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> EnvFile {
        parse(text, Path::new(".env.production"))
    }

    #[test]
    fn basic_and_quotes() {
        let f = p("A=1\nB='two words'\nC=\"x\\ny\"\n  D = spaced  \nexport E=e\nF: colon\n");
        assert_eq!(f.get("A"), Some("1"));
        assert_eq!(f.get("B"), Some("two words"));
        assert_eq!(f.last("B").unwrap().quote, Some('\''));
        assert_eq!(f.get("C"), Some("x\ny"));
        assert_eq!(f.get("D"), Some("spaced"));
        assert_eq!(f.get("E"), Some("e"));
        assert!(f.last("E").unwrap().exported);
        assert_eq!(f.get("F"), Some("colon"));
        assert!(f.skipped.is_empty(), "{:?}", f.skipped);
    }

    #[test]
    fn digit_keys_are_valid_and_bad_lines_are_skipped() {
        let f = p("3_BUCKET=media\nS3-BUCKET=x\nS3 BUCKET=y\n# comment\n\n");
        assert_eq!(f.get("3_BUCKET"), Some("media"));
        assert_eq!(f.skipped.len(), 2);
        assert_eq!(f.skipped[0].line, 2);
        assert_eq!(f.skipped[1].line, 3);
    }

    #[test]
    fn hash_starts_a_comment_in_unquoted_values() {
        let f = p("DB_PASS=ab#cd\nX=value # note\nY='a#b'\n");
        assert_eq!(f.get("DB_PASS"), Some("ab"));
        assert!(f.last("DB_PASS").unwrap().cut_at_hash);
        assert_eq!(f.get("X"), Some("value"));
        assert!(!f.last("X").unwrap().cut_at_hash);
        assert_eq!(f.get("Y"), Some("a#b"));
    }

    #[test]
    fn substitution_and_escapes() {
        let f = p("A=x\nB=$A-${A}\nC='$A'\nD=p$ss\nE=\\$A\nF=$(whoami)\n");
        assert_eq!(f.get("B"), Some("x-x"));
        assert_eq!(f.get("C"), Some("$A"));
        assert_eq!(f.get("D"), Some("p"));
        assert_eq!(f.last("D").unwrap().undefined_refs, vec!["ss".to_string()]);
        assert_eq!(f.get("E"), Some("$A"));
        assert!(f.last("F").unwrap().command_substitution);
    }

    #[test]
    fn later_line_wins_and_multiline_quotes() {
        let f = p("A=1\nK=\"line1\nline2\"\nA=2\nB=\n");
        assert_eq!(f.get("A"), Some("2"));
        assert_eq!(f.get("K"), Some("line1\nline2"));
        assert_eq!(f.last("A").unwrap().line, 4);
        assert_eq!(f.get("B"), Some(""));
    }

    #[test]
    fn export_without_value() {
        let f = p("export A\nB=1\nexport B\nC\n");
        assert_eq!(f.unset_exports.len(), 1);
        assert_eq!(f.unset_exports[0].line, 1);
        assert_eq!(f.get("C"), Some(""));
        assert!(f.last("C").unwrap().no_value);
    }

    #[test]
    fn quoted_then_garbage_is_kept_verbatim() {
        let f = p("A='a' b\n");
        assert_eq!(f.get("A"), Some("'a' b"));
    }
}
