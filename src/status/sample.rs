//! One reading of `/metrics`: the text [`crate::metrics::Metrics::render`] gives, parsed back
//! into series. Alerts and the status page read the edge through the same names Prometheus
//! does, so a rule in `dist/prometheus/` and the edge's own alert cannot disagree on what a
//! series means, and no room has to expose its counters twice.
//!
//! The parser is written here rather than taken from a crate: it reads only the edge's own
//! output (`name{label="value",…} number`), which prometheus-client writes in one shape.

use std::collections::HashMap;

/// Label pairs of one series, in the order written.
pub type Labels = Vec<(String, String)>;

/// Every series of one scrape, by metric name (as written, `_total` included).
#[derive(Debug, Default, Clone)]
pub struct Sample {
    series: HashMap<String, Vec<(Labels, f64)>>,
}

impl Sample {
    /// Parses the text exposition; lines it cannot read are skipped.
    pub fn parse(text: &str) -> Sample {
        let mut s = Sample::default();
        for line in text.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if let Some((name, labels, value)) = parse_line(line) {
                s.series.entry(name).or_default().push((labels, value));
            }
        }
        s
    }

    /// The series of `name`.
    pub fn series(&self, name: &str) -> &[(Labels, f64)] {
        self.series.get(name).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Whether any series of `name` was read.
    pub fn has(&self, name: &str) -> bool {
        !self.series(name).is_empty()
    }

    /// The sum of the series of `name` whose labels satisfy `keep`.
    pub fn sum(&self, name: &str, keep: impl Fn(&Labels) -> bool) -> f64 {
        self.series(name)
            .iter()
            .filter(|(l, _)| keep(l))
            .map(|(_, v)| v)
            .sum()
    }

    /// The sum of all series of `name`.
    pub fn total(&self, name: &str) -> f64 {
        self.sum(name, |_| true)
    }

    /// The value of the series of `name` without labels (0 if absent).
    pub fn value(&self, name: &str) -> f64 {
        self.total(name)
    }

    /// The distinct values of label `label` across the series of `name`, in first-seen order.
    pub fn label_values(&self, name: &str, label: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for (l, _) in self.series(name) {
            if let Some(v) = get(l, label) {
                if !out.iter().any(|o| o == v) {
                    out.push(v.to_owned());
                }
            }
        }
        out
    }
}

/// The value of label `key`.
pub fn get<'a>(labels: &'a Labels, key: &str) -> Option<&'a str> {
    labels
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A filter: label `key` is `value`.
pub fn is<'a>(key: &'a str, value: &'a str) -> impl Fn(&Labels) -> bool + 'a {
    move |l| get(l, key) == Some(value)
}

fn parse_line(line: &str) -> Option<(String, Labels, f64)> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            rest = rest.trim_start_matches(',');
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest.find('=')?;
            let key = rest[..eq].to_owned();
            let (value, r) = quoted(rest[eq + 1..].strip_prefix('"')?)?;
            labels.push((key, value));
            rest = r;
        }
    }
    // The value, then an optional timestamp or exemplar.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name, labels, value))
}

/// A label value up to its closing quote (after the opening one), unescaped, and the rest.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some((out, &s[i + 1..])),
            '\\' => match chars.next()?.1 {
                'n' => out.push('\n'),
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_edges_own_exposition() {
        let m = crate::metrics::Metrics::new();
        m.request(404, crate::metrics::CacheStatus::Miss);
        m.request(404, crate::metrics::CacheStatus::Miss);
        m.request(200, crate::metrics::CacheStatus::Hit);
        m.set_writeback_pending(7);
        m.store_fetch(
            &"old-disk".into(),
            "error",
            std::time::Duration::from_millis(3),
        );
        let s = Sample::parse(&m.render());
        assert_eq!(s.total("fediedge_requests_total"), 3.0);
        assert_eq!(s.sum("fediedge_requests_total", is("status", "404")), 2.0);
        assert_eq!(s.value("fediedge_writeback_pending"), 7.0);
        assert_eq!(
            s.label_values("fediedge_store_fetches_total", "store"),
            ["old-disk"]
        );
        assert_eq!(s.total("fediedge_store_first_byte_seconds_count"), 1.0);
        assert!(!s.has("fediedge_sidekiq_up"));
    }

    #[test]
    fn skips_what_it_cannot_read() {
        let s = Sample::parse("# HELP x y\nbroken{a=\"1\" 3\nok{a=\"x\\\\y\"} 2.5 123\n");
        assert!(!s.has("broken"));
        assert_eq!(s.series("ok"), [(vec![("a".into(), "x\\y".into())], 2.5)]);
    }
}
