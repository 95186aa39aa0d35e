//! The status page at `/` on `admin_listen`: one self-contained HTML document (no external
//! asset, no build step), rendered on the server so it reads with JavaScript off (it then
//! refreshes itself every 10 s); with JavaScript, a few lines fetch `/status/live` (the same
//! fragment) every 2 s and swap it in. Readable on a phone (one column, no fixed widths).
//!
//! Shows only what `/metrics` shows (store names from the config, queue names, canary keys,
//! core upstream addresses): never a store's URL, a Redis URL or a secret. Rates are over the
//! last ~30 s of readings.

use std::fmt::Write;
use std::time::Duration;

use crate::metrics::Metrics;

use super::sample::{get, is, Sample};
use super::Status;

/// How far back the page's rates reach.
const RATE_SPAN: Duration = Duration::from_secs(30);

const STYLE: &str = "
body{font-family:system-ui,sans-serif;margin:0;padding:.5rem 1rem;background:#fafafa;color:#222;max-width:70rem}
h1{font-size:1.3rem;margin:.3rem 0}h2{font-size:1.05rem;margin:1rem 0 .3rem}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.3rem .8rem;margin:.5rem 0;overflow-x:auto}
table{border-collapse:collapse;width:100%}td,th{text-align:left;padding:.15rem .5rem .15rem 0;border-bottom:1px solid #eee;white-space:nowrap}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.1rem 1rem;margin:.3rem 0}dd{margin:0;font-variant-numeric:tabular-nums}
li{overflow-wrap:anywhere}
.bad{color:#b00020;font-weight:bold}.ok{color:#1b5e20;font-weight:bold}.muted{color:#777}
";

/// Refreshes the live part without reloading (a relative URL: the page may sit behind a
/// proxy under a path); a failed refresh leaves the last view up, marked stale.
const SCRIPT: &str = "
(function(){
  var live=document.getElementById('live');
  function tick(){
    fetch('status/live',{cache:'no-store'}).then(function(r){
      if(!r.ok){throw new Error('answered '+r.status)}
      return r.text();
    }).then(function(t){live.innerHTML=t})
      .catch(function(e){
        var u=document.getElementById('updated');
        if(u){u.className='bad';u.textContent='stale: the edge does not answer ('+e.message+'); '+u.textContent.replace(/^stale:.*?; /,'')}
      });
  }
  setInterval(tick,2000);
})();
";

/// The whole page.
pub fn page(status: &Status, metrics: &Metrics) -> String {
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
<title>fediedge status</title><noscript><meta http-equiv=\"refresh\" content=\"10\"></noscript>\
<style>{STYLE}</style></head><body><h1>fediedge</h1><main id=\"live\">{}</main>\
<script>{SCRIPT}</script></body></html>\n",
        live(status, metrics)
    )
}

/// The part that changes (`/status/live`).
pub fn live(status: &Status, metrics: &Metrics) -> String {
    let now = Sample::parse(&metrics.render());
    let (then, span) = status
        .reading_about(RATE_SPAN)
        .unwrap_or_else(|| (now.clone(), Duration::ZERO));
    let v = View {
        now: &now,
        then: &then,
        secs: span.as_secs_f64(),
    };
    let mut out = format!(
        "<p class=\"muted\" id=\"updated\">as of {}</p>",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    );
    alerts(&mut out, status);
    v.media(&mut out);
    v.stores(&mut out);
    v.writeback(&mut out, status);
    v.migration(&mut out);
    v.cache(&mut out);
    canary(&mut out, status);
    v.queues(&mut out);
    v.core(&mut out);
    out
}

/// Escapes text for HTML (element content and quoted attributes). Five characters: not worth
/// a templating crate.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn bytes(n: f64) -> String {
    bytesize::ByteSize(n.max(0.0) as u64).to_string()
}

fn dur(secs: f64) -> String {
    humantime::format_duration(Duration::from_secs(secs.max(0.0) as u64)).to_string()
}

fn num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x:.2}")
    }
}

/// A `<dt>/<dd>` row; `id` names the value for tools and tests.
fn row(out: &mut String, label: &str, id: &str, value: &str, bad: bool) {
    let class = if bad { " class=\"bad\"" } else { "" };
    let _ = write!(
        out,
        "<dt>{}</dt><dd id=\"{id}\"{class}>{}</dd>",
        esc(label),
        esc(value)
    );
}

fn alerts(out: &mut String, status: &Status) {
    let active = status.active();
    out.push_str("<section id=\"alerts\"><h2>Alerts</h2>");
    if active.is_empty() {
        out.push_str("<p id=\"health\" class=\"ok\">healthy: no alert</p>");
    } else {
        let _ = write!(
            out,
            "<p id=\"health\" class=\"bad\">{} active alert{}</p><ul>",
            active.len(),
            if active.len() == 1 { "" } else { "s" }
        );
        for (name, why) in &active {
            let _ = write!(
                out,
                "<li class=\"bad\" data-alert=\"{}\">{}</li>",
                esc(name),
                esc(why)
            );
        }
        out.push_str("</ul>");
    }
    out.push_str("</section>");
}

fn canary(out: &mut String, status: &Status) {
    let all = status.canaries();
    if all.is_empty() {
        return;
    }
    out.push_str("<section id=\"canary\"><h2>Media canary</h2><table><tr><th>canary</th><th>state</th><th>rounds</th><th>last error</th></tr>");
    for c in &all {
        let (class, state) = if c.failures_in_a_row == 0 {
            ("ok", "ok".to_owned())
        } else {
            ("bad", format!("failing ({} in a row)", c.failures_in_a_row))
        };
        let _ = write!(
            out,
            "<tr data-canary=\"{}\"><td>{}</td><td class=\"{class}\">{}</td><td>{}</td><td>{}</td></tr>",
            esc(&c.name),
            esc(&c.name),
            esc(&state),
            c.rounds,
            esc(c.last_error.as_deref().unwrap_or("-"))
        );
    }
    out.push_str("</table></section>");
}

struct View<'a> {
    now: &'a Sample,
    then: &'a Sample,
    secs: f64,
}

impl View<'_> {
    fn delta(&self, name: &str, keep: impl Fn(&super::Labels) -> bool) -> f64 {
        (self.now.sum(name, &keep) - self.then.sum(name, &keep)).max(0.0)
    }

    fn rate(&self, d: f64) -> String {
        if self.secs < 0.5 {
            "-".into()
        } else {
            format!("{:.1}", d / self.secs)
        }
    }

    fn media(&self, out: &mut String) {
        const REQ: &str = "fediedge_requests_total";
        let total = self.now.total(REQ);
        let recent = self.delta(REQ, |_| true);
        let hits = self.delta(REQ, is("cache_status", "HIT"));
        let nf = self.delta(REQ, is("status", "404"));
        let share = |x: f64| {
            if recent > 0.0 {
                format!("{:.0}%", 100.0 * x / recent)
            } else {
                "-".into()
            }
        };
        out.push_str("<section id=\"media\"><h2>Media</h2><dl>");
        row(
            out,
            "requests/s",
            "requests-per-second",
            &self.rate(recent),
            false,
        );
        row(out, "requests served", "requests-total", &num(total), false);
        row(out, "hit ratio", "hit-ratio", &share(hits), false);
        let bps = self.delta("fediedge_response_body_bytes_total", |_| true);
        let bps = if self.secs < 0.5 {
            "-".into()
        } else {
            format!("{}/s", bytes(bps / self.secs))
        };
        row(out, "bytes/s", "bytes-per-second", &bps, false);
        row(
            out,
            "404 share",
            "share-404",
            &share(nf),
            recent > 0.0 && nf * 2.0 > recent,
        );
        out.push_str(
            "</dl><table><tr><th>status</th><th>since start</th><th>recent share</th></tr>",
        );
        let mut codes = self.now.label_values(REQ, "status");
        codes.sort();
        for code in codes {
            let n = self.now.sum(REQ, is("status", &code));
            let d = self.delta(REQ, is("status", &code));
            let _ = write!(
                out,
                "<tr data-status=\"{}\"><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&code),
                esc(&code),
                num(n),
                share(d)
            );
        }
        out.push_str("</table></section>");
    }

    fn stores(&self, out: &mut String) {
        const F: &str = "fediedge_store_fetches_total";
        let stores = self.now.label_values(F, "store");
        if stores.is_empty() {
            return;
        }
        out.push_str("<section id=\"stores\"><h2>Stores</h2><table><tr><th>store</th><th>reads/s</th><th>errors (recent)</th><th>errors (since start)</th><th>first byte (recent mean)</th></tr>");
        for s in stores {
            let st = is("store", &s);
            let err = |l: &super::Labels| {
                get(l, "store") == Some(&s) && get(l, "outcome") == Some("error")
            };
            let n = self.delta("fediedge_store_first_byte_seconds_count", &st);
            let sum = self.delta("fediedge_store_first_byte_seconds_sum", &st);
            let mean = if n > 0.0 {
                format!("{:.1} ms", 1000.0 * sum / n)
            } else {
                "-".into()
            };
            let recent_err = self.delta(F, err);
            let _ = write!(
                out,
                "<tr data-store=\"{}\"><td>{}</td><td>{}</td><td{}>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&s),
                esc(&s),
                self.rate(self.delta(F, &st)),
                if recent_err > 0.0 { " class=\"bad\"" } else { "" },
                num(recent_err),
                num(self.now.sum(F, err)),
                mean
            );
        }
        out.push_str("</table></section>");
    }

    fn writeback(&self, out: &mut String, status: &Status) {
        out.push_str("<section id=\"writeback\"><h2>Copies to the primary</h2><dl>");
        row(
            out,
            "queued",
            "writeback-pending",
            &num(self.now.value("fediedge_writeback_pending")),
            false,
        );
        let oldest = status
            .writeback_oldest()
            .map_or("-".into(), |d| dur(d.as_secs_f64()));
        row(out, "oldest waits", "writeback-oldest", &oldest, false);
        let failed = self
            .now
            .sum("fediedge_writebacks_total", is("outcome", "failed"));
        row(
            out,
            "failed attempts",
            "writeback-failed",
            &num(failed),
            false,
        );
        for (l, v) in self.now.series("fediedge_disk_state") {
            let dir = get(l, "dir").unwrap_or("?");
            let state = match *v as i64 {
                0 => "ok",
                1 => "full",
                2 => "read-only",
                _ => "failing",
            };
            row(
                out,
                &format!("{dir} disk"),
                &format!("disk-{dir}"),
                state,
                *v != 0.0,
            );
        }
        out.push_str("</dl></section>");
    }

    fn migration(&self, out: &mut String) {
        let total = self.now.value("fediedge_migration_bytes_total");
        let objects = self.now.value("fediedge_migration_objects_total");
        if objects == 0.0 {
            return;
        }
        let done = self.now.value("fediedge_migration_bytes_done");
        let od = self.now.value("fediedge_migration_objects_done");
        let rate = self.delta("fediedge_migration_bytes_done", |_| true) / self.secs.max(1.0);
        let eta = if done >= total {
            "done".into()
        } else if rate > 0.0 {
            dur((total - done) / rate)
        } else {
            "- (not moving)".into()
        };
        out.push_str("<section id=\"migration\"><h2>Migration</h2><dl>");
        row(
            out,
            "objects",
            "migration-objects",
            &format!("{} of {}", num(od), num(objects)),
            false,
        );
        let pct = if total > 0.0 {
            100.0 * done / total
        } else {
            100.0
        };
        row(
            out,
            "bytes",
            "migration-bytes",
            &format!("{} of {} ({pct:.1}%)", bytes(done), bytes(total)),
            false,
        );
        row(out, "ETA", "migration-eta", &eta, false);
        out.push_str("</dl></section>");
    }

    fn cache(&self, out: &mut String) {
        if !self.now.has("fediedge_cache_bytes") {
            return;
        }
        out.push_str("<section id=\"cache\"><h2>Cache</h2><dl>");
        row(
            out,
            "size",
            "cache-bytes",
            &bytes(self.now.value("fediedge_cache_bytes")),
            false,
        );
        row(
            out,
            "objects",
            "cache-objects",
            &num(self.now.value("fediedge_cache_objects")),
            false,
        );
        row(
            out,
            "in memory",
            "cache-memory",
            &bytes(self.now.value("fediedge_cache_memory_bytes")),
            false,
        );
        out.push_str("</dl></section>");
    }

    fn queues(&self, out: &mut String) {
        if !self.now.has("fediedge_sidekiq_up") {
            return;
        }
        out.push_str("<section id=\"queues\"><h2>Sidekiq</h2>");
        if self.now.value("fediedge_sidekiq_up") < 1.0 {
            out.push_str(
                "<p class=\"bad\" id=\"sidekiq-down\">Sidekiq's Redis cannot be read</p></section>",
            );
            return;
        }
        out.push_str(
            "<table><tr><th>queue</th><th>waiting</th><th>latency</th><th>processes</th></tr>",
        );
        for (l, size) in self.now.series("fediedge_sidekiq_queue_size") {
            let q = get(l, "queue").unwrap_or("?");
            let latency = self
                .now
                .sum("fediedge_sidekiq_queue_latency_seconds", is("queue", q));
            let procs = self
                .now
                .sum("fediedge_sidekiq_queue_processes", is("queue", q));
            let served = if procs == 0.0 {
                "<td class=\"bad\">none (unserved)</td>".to_owned()
            } else {
                format!("<td>{}</td>", num(procs))
            };
            let _ = write!(
                out,
                "<tr data-queue=\"{}\"><td>{}</td><td class=\"size\">{}</td><td class=\"latency\">{latency:.1} s</td>{served}</tr>",
                esc(q),
                esc(q),
                num(*size),
            );
        }
        out.push_str("</table><dl>");
        for set in ["scheduled", "retry", "dead"] {
            let n = self.now.sum("fediedge_sidekiq_set_size", is("set", set));
            row(out, set, &format!("sidekiq-{set}"), &num(n), false);
        }
        row(
            out,
            "processes",
            "sidekiq-processes",
            &num(self.now.value("fediedge_sidekiq_processes")),
            false,
        );
        let busy = format!(
            "{} of {}",
            num(self.now.value("fediedge_sidekiq_busy")),
            num(self.now.value("fediedge_sidekiq_concurrency"))
        );
        row(out, "busy threads", "sidekiq-busy", &busy, false);
        out.push_str("</dl></section>");
    }

    fn core(&self, out: &mut String) {
        let ups = self.now.series("fediedge_upstream_up");
        if ups.is_empty() {
            return;
        }
        out.push_str("<section id=\"core\"><h2>Core upstreams</h2><table><tr><th>pool</th><th>upstream</th><th>health</th><th>breaker</th></tr>");
        for (l, v) in ups {
            let (pool, up) = (
                get(l, "pool").unwrap_or("?"),
                get(l, "upstream").unwrap_or("?"),
            );
            let b = self.now.sum("fediedge_upstream_breaker_state", |x| {
                get(x, "pool") == Some(pool) && get(x, "upstream") == Some(up)
            });
            let breaker = match b as i64 {
                0 => "closed",
                1 => "open",
                _ => "half-open",
            };
            let health = if *v >= 1.0 {
                "<td class=\"ok\">up</td>"
            } else {
                "<td class=\"bad\">down</td>"
            };
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{}</td>{health}<td>{breaker}</td></tr>",
                esc(pool),
                esc(up)
            );
        }
        out.push_str("</table></section>");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped() {
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
