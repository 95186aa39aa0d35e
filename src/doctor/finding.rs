//! What the doctor reports: findings with a severity, and the two output formats.

use std::fmt::Write as _;

use serde::Serialize;

/// How bad a finding is. Errors make the exit code 2, warnings 1; info never counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing; nothing is wrong.
    Info,
    /// Probably wrong, or right by accident.
    Warning,
    /// Broken: media, federation or jobs do not work as the admin meant.
    Error,
}

impl Severity {
    /// `error`, `warning` or `info`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// One problem found. Messages never contain secret values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// How bad it is.
    pub severity: Severity,
    /// The file (or files, comma-separated) the finding is about.
    pub file: String,
    /// The key, option or setting concerned, if one.
    pub key: Option<String>,
    /// What is wrong.
    pub message: String,
    /// Stable rule id, e.g. `env-bool` (listed in docs/doctor.md).
    pub rule: &'static str,
    /// How to fix it.
    pub fix: String,
}

impl Finding {
    /// Builds a finding.
    pub fn new(
        severity: Severity,
        rule: &'static str,
        file: impl Into<String>,
        key: Option<&str>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            severity,
            file: file.into(),
            key: key.map(str::to_owned),
            message: message.into(),
            rule,
            fix: fix.into(),
        }
    }
}

/// The exit code for a set of findings: 2 if any error, 1 if only warnings, 0 otherwise.
pub fn exit_code(findings: &[Finding]) -> u8 {
    match findings.iter().map(|f| f.severity).max() {
        Some(Severity::Error) => 2,
        Some(Severity::Warning) => 1,
        _ => 0,
    }
}

/// `{"findings": [...]}`.
pub fn to_json(findings: &[Finding]) -> String {
    #[derive(Serialize)]
    struct Out<'a> {
        findings: &'a [Finding],
    }
    serde_json::to_string_pretty(&Out { findings }).expect("findings serialize")
}

/// One block per finding, then a summary line.
pub fn to_human(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        let _ = write!(out, "{}[{}]: {}", f.severity.as_str(), f.rule, f.file);
        if let Some(key) = &f.key {
            let _ = write!(out, ": {key}");
        }
        out.push('\n');
        for line in f.message.lines() {
            let _ = writeln!(out, "    {line}");
        }
        for (i, line) in f.fix.lines().enumerate() {
            let lead = if i == 0 { "fix: " } else { "     " };
            let _ = writeln!(out, "    {lead}{line}");
        }
        out.push('\n');
    }
    let count = |s| findings.iter().filter(|f| f.severity == s).count();
    let _ = writeln!(
        out,
        "{} error(s), {} warning(s), {} info",
        count(Severity::Error),
        count(Severity::Warning),
        count(Severity::Info)
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes() {
        let f = |s| Finding::new(s, "r", "f", None, "m", "x");
        assert_eq!(exit_code(&[]), 0);
        assert_eq!(exit_code(&[f(Severity::Info)]), 0);
        assert_eq!(exit_code(&[f(Severity::Info), f(Severity::Warning)]), 1);
        assert_eq!(exit_code(&[f(Severity::Error), f(Severity::Warning)]), 2);
    }

    #[test]
    fn json_shape() {
        let f = Finding::new(Severity::Warning, "env-bool", "a", Some("K"), "m", "x");
        let v: serde_json::Value = serde_json::from_str(&to_json(&[f])).unwrap();
        assert_eq!(v["findings"][0]["severity"], "warning");
        assert_eq!(v["findings"][0]["key"], "K");
        assert_eq!(v["findings"][0]["rule"], "env-bool");
    }
}
