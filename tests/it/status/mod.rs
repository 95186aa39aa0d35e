//! Alerts, the media canary and the status page (issue 10 §3–§5), against a real edge: real
//! files, a real HTTP origin, a real `redis-server` filled as Sidekiq does, `promtool`, and a
//! real headless Chromium over chromedriver.

mod alerts;
mod dist;
mod page;

use std::time::{Duration, Instant};

use crate::common::client;

/// `/healthz`: status code and body.
pub async fn healthz(admin: &str) -> (u16, String) {
    let r = client()
        .get(format!("{admin}/healthz"))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// `/metrics` text.
pub async fn metrics(admin: &str) -> String {
    client()
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// Polls `/healthz` every 100 ms until `ok` holds for it; panics with the last answer after
/// a minute (the evaluator runs every second in these tests).
pub async fn wait_healthz(admin: &str, what: &str, ok: impl Fn(u16, &str) -> bool) -> String {
    let start = Instant::now();
    loop {
        let (code, body) = healthz(admin).await;
        if ok(code, &body) {
            return body;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "timed out waiting for /healthz: {what}; last answer {code}:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `/metrics` until it has the line `want`; returns the scrape.
pub async fn wait_metric(admin: &str, want: &str) -> String {
    let start = Instant::now();
    loop {
        let m = metrics(admin).await;
        if m.lines().any(|l| l == want) {
            return m;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{want} never in:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of the series written exactly as `series` (name and labels).
pub fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    })
}

/// Fast evaluations for tests: every second, over `window`.
pub fn fast_alerts(window: &str, extra: &str) -> String {
    format!("[alerts]\ninterval = \"1s\"\nwindow = \"{window}\"\n{extra}")
}
