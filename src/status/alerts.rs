//! Alert conditions over two readings of `/metrics` (now, and the start of the window) and
//! the canary's state; [`Tracker`] logs each alert once when it starts and once when it
//! clears. The same signals, as Prometheus rules: `dist/prometheus/fediedge-alerts.yml`.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::AlertsConfig;

use super::sample::{get, is, Sample};
use super::CanaryState;

/// Active alerts: a stable name (`kind` or `kind:subject`) → why, in words.
pub type Active = BTreeMap<String, String>;

/// What the conditions read.
pub struct Inputs<'a> {
    /// The thresholds.
    pub config: &'a AlertsConfig,
    /// The reading now.
    pub now: &'a Sample,
    /// The reading at the start of the window (or the first one, after a start).
    pub then: &'a Sample,
    /// How far apart the readings are.
    pub span: Duration,
    /// Age of the oldest copy waiting for the primary.
    pub writeback_oldest: Option<Duration>,
    /// The canary, if configured: each key's state, and the failures in a row that alert.
    pub canary: Option<(&'a [CanaryState], u32)>,
}

fn delta(now: &Sample, then: &Sample, name: &str, keep: impl Fn(&super::Labels) -> bool) -> f64 {
    (now.sum(name, &keep) - then.sum(name, &keep)).max(0.0)
}

fn pct(x: f64) -> String {
    format!("{:.0}%", x * 100.0)
}

fn human(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// Every alert condition that holds.
pub fn evaluate(i: &Inputs) -> Active {
    let mut out = Active::new();
    let (c, now, then) = (i.config, i.now, i.then);
    let window = human(i.span);
    if let Some((keys, needed)) = i.canary {
        for k in keys.iter().filter(|k| k.failures_in_a_row >= needed) {
            out.insert(
                format!("canary:{}", k.name),
                format!(
                    "media canary {} failed {} round(s) in a row: {}",
                    k.name,
                    k.failures_in_a_row,
                    k.last_error.as_deref().unwrap_or("?")
                ),
            );
        }
    }
    let all = delta(now, then, "fediedge_requests_total", |_| true);
    let nf = delta(now, then, "fediedge_requests_total", is("status", "404"));
    if all >= c.min_requests as f64 && all > 0.0 && nf / all > c.media_404_share {
        out.insert(
            "media_404_share".into(),
            format!(
                "{} of {all} media responses in the last {window} were 404 (threshold {})",
                pct(nf / all),
                pct(c.media_404_share)
            ),
        );
    }
    for store in now.label_values("fediedge_store_fetches_total", "store") {
        let reads = delta(
            now,
            then,
            "fediedge_store_fetches_total",
            is("store", &store),
        );
        let errors = delta(now, then, "fediedge_store_fetches_total", |l| {
            get(l, "store") == Some(&store) && get(l, "outcome") == Some("error")
        });
        if reads >= c.min_store_reads as f64 && errors / reads > c.store_error_share {
            out.insert(
                format!("store_errors:{store}"),
                format!(
                    "store {store}: {errors} of {reads} reads failed in the last {window} (threshold {})",
                    pct(c.store_error_share)
                ),
            );
        }
    }
    let pending = now.value("fediedge_writeback_pending");
    if pending > c.writeback_pending as f64 {
        out.insert(
            "writeback_pending".into(),
            format!(
                "{pending} copies wait for the primary (threshold {})",
                c.writeback_pending
            ),
        );
    }
    if let Some(age) = i.writeback_oldest.filter(|a| *a > c.writeback_oldest_age) {
        out.insert(
            "writeback_oldest_age".into(),
            format!(
                "the oldest copy has waited {} for the primary (threshold {})",
                human(age),
                human(c.writeback_oldest_age)
            ),
        );
    }
    for (labels, v) in now.series("fediedge_disk_state") {
        let dir = get(labels, "dir").unwrap_or("?");
        let state = match *v as i64 {
            0 => continue,
            1 => "full",
            2 => "read-only",
            _ => "failing",
        };
        out.insert(
            format!("disk:{dir}"),
            format!("the {dir} directory is {state}"),
        );
    }
    sidekiq(i, &mut out, &window);
    core(now, &mut out);
    let waits = delta(now, then, "fediedge_connection_cap_waits_total", |_| true);
    if waits > 0.0 {
        out.insert(
            "connection_cap".into(),
            format!(
                "the listeners reached max_connections ({}) {waits} time(s) in the last {window}: \
                 new clients waited to connect (raise max_connections with LimitNOFILE, or look \
                 for a flood of idle connections)",
                now.value("fediedge_connections_max")
            ),
        );
    }
    out
}

fn sidekiq(i: &Inputs, out: &mut Active, window: &str) {
    let (c, now) = (i.config, i.now);
    if !now.has("fediedge_sidekiq_up") {
        return;
    }
    if now.value("fediedge_sidekiq_up") < 1.0 {
        // Down at both ends of the window: not merely not read yet after a start.
        if i.then.has("fediedge_sidekiq_up") && i.then.value("fediedge_sidekiq_up") < 1.0 {
            out.insert(
                "sidekiq_unreachable".into(),
                format!("Sidekiq's Redis could not be read for the last {window}"),
            );
        }
        return;
    }
    for (labels, v) in now.series("fediedge_sidekiq_queue_latency_seconds") {
        let q = get(labels, "queue").unwrap_or("?");
        let limit = c.latency_of(q);
        if *v > limit.as_secs_f64() {
            out.insert(
                format!("sidekiq_latency:{q}"),
                format!(
                    "Sidekiq queue {q}: oldest job waits {} (threshold {})",
                    human(Duration::from_secs_f64(*v)),
                    human(limit)
                ),
            );
        }
    }
    for (labels, v) in now.series("fediedge_sidekiq_queue_unserved") {
        let q = get(labels, "queue").unwrap_or("?");
        if *v >= 1.0 {
            out.insert(
                format!("sidekiq_unserved:{q}"),
                format!("Sidekiq queue {q} is served by no live process"),
            );
        }
    }
    let retry = now.sum("fediedge_sidekiq_set_size", is("set", "retry"));
    if retry > c.sidekiq_retry as f64 {
        out.insert(
            "sidekiq_retry".into(),
            format!(
                "{retry} jobs in Sidekiq's retry set (threshold {})",
                c.sidekiq_retry
            ),
        );
    }
    // A gauge: growth counts only from a reading that had it (not from the start's zero).
    let dead = delta(now, i.then, "fediedge_sidekiq_set_size", is("set", "dead"));
    if i.then.has("fediedge_sidekiq_set_size") && dead > c.sidekiq_dead_growth as f64 {
        out.insert(
            "sidekiq_dead_growth".into(),
            format!(
                "{dead} jobs died in the last {window} (threshold {})",
                c.sidekiq_dead_growth
            ),
        );
    }
}

fn core(now: &Sample, out: &mut Active) {
    for pool in now.label_values("fediedge_upstream_up", "pool") {
        let up = now.sum("fediedge_upstream_up", is("pool", &pool));
        if up < 1.0 {
            out.insert(
                format!("core_down:{pool}"),
                format!("every {pool} upstream of core fails its health check"),
            );
        }
    }
    for (labels, v) in now.series("fediedge_upstream_breaker_state") {
        if *v == 1.0 {
            let pool = get(labels, "pool").unwrap_or("?");
            let up = get(labels, "upstream").unwrap_or("?");
            out.insert(
                format!("core_breaker:{pool}:{up}"),
                format!("the circuit breaker of {pool} upstream {up} is open"),
            );
        }
    }
}

/// The alerts active after the last evaluation; logs what starts and what clears.
#[derive(Debug, Default)]
pub struct Tracker {
    active: Active,
}

impl Tracker {
    /// Takes the new set of active alerts, logging each change once.
    pub fn update(&mut self, next: Active) {
        for (name, why) in &next {
            if !self.active.contains_key(name) {
                tracing::warn!(alert = %name, "alert started: {why}");
            }
        }
        for name in self.active.keys() {
            if !next.contains_key(name) {
                tracing::info!(alert = %name, "alert cleared");
            }
        }
        self.active = next;
    }

    /// The alerts active now.
    pub fn active(&self) -> &Active {
        &self.active
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{CacheStatus, Metrics};

    fn eval(now: &Metrics, then: &Sample) -> Active {
        let config = AlertsConfig::default();
        let now = Sample::parse(&now.render());
        evaluate(&Inputs {
            config: &config,
            now: &now,
            then,
            span: Duration::from_secs(300),
            writeback_oldest: Some(Duration::from_secs(4000)),
            canary: None,
        })
    }

    #[test]
    fn a_404_storm_over_the_window_alerts_and_a_quiet_edge_does_not() {
        let m = Metrics::new();
        let then = Sample::parse(&m.render());
        for _ in 0..19 {
            m.request(404, CacheStatus::Miss);
        }
        let a = eval(&m, &then);
        assert!(!a.contains_key("media_404_share"), "{a:?}");
        m.request(404, CacheStatus::Miss);
        let a = eval(&m, &then);
        assert_eq!(
            a["media_404_share"],
            "100% of 20 media responses in the last 5m were 404 (threshold 50%)"
        );
        // Counted from the window's start: the same storm, now in the past, is quiet.
        let later = Sample::parse(&m.render());
        assert!(!eval(&m, &later).contains_key("media_404_share"));
        assert!(a.contains_key("writeback_oldest_age"));
    }

    fn eval_text(now: &str, then: &str) -> Active {
        let config = AlertsConfig::default();
        evaluate(&Inputs {
            config: &config,
            now: &Sample::parse(now),
            then: &Sample::parse(then),
            span: Duration::from_secs(300),
            writeback_oldest: None,
            canary: None,
        })
    }

    #[test]
    fn disks_core_and_sidekiq_conditions() {
        let now = "fediedge_disk_state{dir=\"cache\"} 1\nfediedge_disk_state{dir=\"data_dir\"} 0\n\
            fediedge_upstream_up{pool=\"web\",upstream=\"10.0.0.2:3000\"} 0\n\
            fediedge_upstream_up{pool=\"web\",upstream=\"10.0.0.3:3000\"} 0\n\
            fediedge_upstream_up{pool=\"streaming\",upstream=\"10.0.0.2:4000\"} 1\n\
            fediedge_upstream_breaker_state{pool=\"web\",upstream=\"10.0.0.3:3000\"} 1\n\
            fediedge_sidekiq_up 1\nfediedge_sidekiq_set_size{set=\"dead\"} 500\n";
        let a = eval_text(now, "");
        let names: Vec<_> = a.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "core_breaker:web:10.0.0.3:3000",
                "core_down:web",
                "disk:cache"
            ],
            "{a:?}"
        );
        assert_eq!(a["disk:cache"], "the cache directory is full");
        // The dead set grew by 451 since a reading that had it.
        let a = eval_text(
            now,
            "fediedge_sidekiq_up 1\nfediedge_sidekiq_set_size{set=\"dead\"} 49\n",
        );
        assert!(
            a["sidekiq_dead_growth"].starts_with("451 jobs died"),
            "{a:?}"
        );
    }

    #[test]
    fn sidekiq_unreachable_only_when_down_across_the_window() {
        assert!(eval_text("fediedge_sidekiq_up 0\n", "").is_empty());
        assert!(eval_text("fediedge_sidekiq_up 0\n", "fediedge_sidekiq_up 1\n").is_empty());
        let a = eval_text("fediedge_sidekiq_up 0\n", "fediedge_sidekiq_up 0\n");
        assert_eq!(
            a["sidekiq_unreachable"],
            "Sidekiq's Redis could not be read for the last 5m"
        );
    }

    #[test]
    fn reaching_max_connections_in_the_window_alerts() {
        let then = "fediedge_connections_max 100\nfediedge_connection_cap_waits_total 3\n";
        assert!(eval_text(then, then).is_empty());
        let now = "fediedge_connections_max 100\nfediedge_connection_cap_waits_total 5\n";
        let a = eval_text(now, then);
        assert!(
            a["connection_cap"].starts_with(
                "the listeners reached max_connections (100) 2 time(s) in the last 5m"
            ),
            "{a:?}"
        );
    }

    #[test]
    fn tracker_keeps_what_is_active() {
        let mut t = Tracker::default();
        t.update(Active::from([("a".into(), "why".into())]));
        t.update(Active::new());
        assert!(t.active().is_empty());
    }
}
