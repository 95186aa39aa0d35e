//! `[alerts]` (thresholds; on by default) and `[canary]` (media fetched through the edge
//! itself): what makes `/healthz` answer 503 and the status page show an alert
//! (docs/config.md, "Alerts and the media canary").

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// `[alerts]` as written. Every threshold has a default; the section may be left out.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    /// Time between evaluations. Default `10s`.
    #[serde(default = "d_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Rates and shares are taken over this window. Default `5m`.
    #[serde(default = "d_window", with = "humantime_serde")]
    pub window: Duration,
    /// Alert when more than this share of media responses in the window are 404. Default 0.5.
    #[serde(default = "d_404")]
    pub media_404_share: f64,
    /// Fewest media responses in the window for the 404 share to count. Default 20.
    #[serde(default = "d_min_requests")]
    pub min_requests: u64,
    /// Alert when more than this share of a store's reads in the window failed. Default 0.2.
    #[serde(default = "d_store")]
    pub store_error_share: f64,
    /// Fewest reads of a store in the window for its error share to count. Default 5.
    #[serde(default = "d_min_store_reads")]
    pub min_store_reads: u64,
    /// Alert when more copies than this wait for the primary. Default 10000.
    #[serde(default = "d_wb_pending")]
    pub writeback_pending: u64,
    /// Alert when the oldest copy waiting for the primary is older. Default `1h`.
    #[serde(default = "d_wb_age", with = "humantime_serde")]
    pub writeback_oldest_age: Duration,
    /// Alert when a Sidekiq queue's latency is over this. Default `5m`.
    #[serde(default = "d_latency", with = "humantime_serde")]
    pub sidekiq_latency: Duration,
    /// Per-queue latency thresholds, over `sidekiq_latency`. Default `push` and
    /// `ingress` at `1m` (what users feel first).
    #[serde(default = "d_queue_latency")]
    pub sidekiq_queue_latency: BTreeMap<String, String>,
    /// Alert when Sidekiq's retry set holds more jobs. Default 1000.
    #[serde(default = "d_retry")]
    pub sidekiq_retry: u64,
    /// Alert when the dead set grows by more than this within the window. Default 50.
    #[serde(default = "d_dead")]
    pub sidekiq_dead_growth: u64,
}

fn d_interval() -> Duration {
    Duration::from_secs(10)
}
fn d_window() -> Duration {
    Duration::from_secs(300)
}
fn d_404() -> f64 {
    0.5
}
fn d_min_requests() -> u64 {
    20
}
fn d_store() -> f64 {
    0.2
}
fn d_min_store_reads() -> u64 {
    5
}
fn d_wb_pending() -> u64 {
    10_000
}
fn d_wb_age() -> Duration {
    Duration::from_secs(3600)
}
fn d_latency() -> Duration {
    Duration::from_secs(300)
}
fn d_queue_latency() -> BTreeMap<String, String> {
    [("push", "1m"), ("ingress", "1m")]
        .into_iter()
        .map(|(q, t)| (q.to_owned(), t.to_owned()))
        .collect()
}
fn d_retry() -> u64 {
    1000
}
fn d_dead() -> u64 {
    50
}

impl Default for RawAlerts {
    fn default() -> Self {
        toml::from_str("").expect("every [alerts] key has a default")
    }
}

/// Validated `[alerts]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertsConfig {
    /// Time between evaluations.
    pub interval: Duration,
    /// Window of rates and shares.
    pub window: Duration,
    /// 404 share of media responses that alerts.
    pub media_404_share: f64,
    /// Fewest media responses for the 404 share to count.
    pub min_requests: u64,
    /// Error share of a store's reads that alerts.
    pub store_error_share: f64,
    /// Fewest reads of a store for its error share to count.
    pub min_store_reads: u64,
    /// Queued copies that alert.
    pub writeback_pending: u64,
    /// Age of the oldest queued copy that alerts.
    pub writeback_oldest_age: Duration,
    /// Default Sidekiq queue latency that alerts.
    pub sidekiq_latency: Duration,
    /// Per-queue latency thresholds.
    pub sidekiq_queue_latency: BTreeMap<String, Duration>,
    /// Retry set size that alerts.
    pub sidekiq_retry: u64,
    /// Dead set growth within the window that alerts.
    pub sidekiq_dead_growth: u64,
}

impl AlertsConfig {
    /// The latency threshold of `queue`.
    pub fn latency_of(&self, queue: &str) -> Duration {
        self.sidekiq_queue_latency
            .get(queue)
            .copied()
            .unwrap_or(self.sidekiq_latency)
    }
}

impl Default for AlertsConfig {
    fn default() -> Self {
        RawAlerts::default()
            .validate(Path::new("(defaults)"))
            .expect("the defaults are valid")
    }
}

impl RawAlerts {
    /// Checks the section; errors name `alerts.<key>`.
    pub fn validate(self, path: &Path) -> Result<AlertsConfig, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: format!("alerts.{key}"),
            message,
        };
        if self.interval < Duration::from_secs(1) {
            return Err(invalid("interval", "must be at least 1s".into()));
        }
        if self.window < self.interval {
            return Err(invalid("window", "must be at least `interval`".into()));
        }
        for (key, v) in [
            ("media_404_share", self.media_404_share),
            ("store_error_share", self.store_error_share),
        ] {
            if !(0.0..=1.0).contains(&v) || v.is_nan() {
                return Err(invalid(key, format!("{v} is not a share between 0 and 1")));
            }
        }
        let mut per_queue = BTreeMap::new();
        for (q, t) in self.sidekiq_queue_latency {
            let d = humantime::parse_duration(&t).map_err(|e| {
                invalid(
                    &format!("sidekiq_queue_latency.{q}"),
                    format!("{t:?} is not a duration like \"1m\": {e}"),
                )
            })?;
            per_queue.insert(q, d);
        }
        Ok(AlertsConfig {
            interval: self.interval,
            window: self.window,
            media_404_share: self.media_404_share,
            min_requests: self.min_requests,
            store_error_share: self.store_error_share,
            min_store_reads: self.min_store_reads,
            writeback_pending: self.writeback_pending,
            writeback_oldest_age: self.writeback_oldest_age,
            sidekiq_latency: self.sidekiq_latency,
            sidekiq_queue_latency: per_queue,
            sidekiq_retry: self.sidekiq_retry,
            sidekiq_dead_growth: self.sidekiq_dead_growth,
        })
    }
}

/// `[canary]` as written: media keys fetched through the edge's own listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCanary {
    /// Keys (without `url_prefix`) of media known to exist, e.g. an old avatar. Default none:
    /// each round the edge writes a new probe object under `probe_prefix` into the primary,
    /// fetches it through itself (a miss: primary, then cache) and deletes the previous one.
    #[serde(default)]
    pub keys: Vec<String>,
    /// Where probe objects go when `keys` is empty. Default `fediedge-canary/`.
    #[serde(default = "d_probe_prefix")]
    pub probe_prefix: String,
    /// Time between rounds. Default `60s`.
    #[serde(default = "d_canary_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Time one fetch may take, body included. Default `10s`.
    #[serde(default = "d_canary_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Failed rounds in a row of one key before the alert. Default 2.
    #[serde(default = "d_failures")]
    pub failures: u32,
}

fn d_probe_prefix() -> String {
    "fediedge-canary/".into()
}
fn d_canary_interval() -> Duration {
    Duration::from_secs(60)
}
fn d_canary_timeout() -> Duration {
    Duration::from_secs(10)
}
fn d_failures() -> u32 {
    2
}

/// What the canary fetches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CanaryKeys {
    /// Media the admin named.
    Configured(Vec<String>),
    /// Probe objects the edge writes under this prefix, one per round.
    Probe(String),
}

/// Validated `[canary]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanaryConfig {
    /// What to fetch.
    pub keys: CanaryKeys,
    /// Time between rounds.
    pub interval: Duration,
    /// Time one fetch may take.
    pub timeout: Duration,
    /// Failed rounds in a row before the alert.
    pub failures: u32,
}

impl RawCanary {
    /// Checks the section; errors name `canary.<key>`.
    pub fn validate(self, path: &Path) -> Result<CanaryConfig, ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key: format!("canary.{key}"),
            message,
        };
        let check = |key: &str, k: &str| {
            crate::key::Key::parse(k)
                .map(|_| ())
                .map_err(|e| invalid(key, format!("{k:?} is not a media key: {e}")))
        };
        if self.interval < Duration::from_secs(1) {
            return Err(invalid("interval", "must be at least 1s".into()));
        }
        if self.timeout.is_zero() {
            return Err(invalid("timeout", "must be more than 0s".into()));
        }
        if self.failures == 0 {
            return Err(invalid("failures", "must be at least 1".into()));
        }
        let keys = if self.keys.is_empty() {
            check("probe_prefix", &format!("{}probe-1.txt", self.probe_prefix))?;
            CanaryKeys::Probe(self.probe_prefix)
        } else {
            for k in &self.keys {
                check("keys", k)?;
            }
            CanaryKeys::Configured(self.keys)
        };
        Ok(CanaryConfig {
            keys,
            interval: self.interval,
            timeout: self.timeout,
            failures: self.failures,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn load(extra: &str) -> Result<crate::config::Config, String> {
        crate::config::from_str(extra, Path::new("t.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_apply_without_the_sections() {
        let c = load("").unwrap();
        assert_eq!(c.alerts, super::AlertsConfig::default());
        assert_eq!(c.alerts.latency_of("push").as_secs(), 60);
        assert_eq!(c.alerts.latency_of("default").as_secs(), 300);
        assert!(c.canary.is_none());
    }

    #[test]
    fn canary_without_keys_probes() {
        let c = load("[canary]\n").unwrap().canary.unwrap();
        assert_eq!(c.keys, super::CanaryKeys::Probe("fediedge-canary/".into()));
        assert_eq!((c.interval.as_secs(), c.failures), (60, 2));
    }

    #[test]
    fn bad_values_and_unknown_keys_are_refused_by_name() {
        for (text, key) in [
            (
                "[alerts]\nmedia_404_share = 1.5\n",
                "alerts.media_404_share",
            ),
            (
                "[alerts]\ninterval = \"10s\"\nwindow = \"5s\"\n",
                "alerts.window",
            ),
            (
                "[alerts]\nsidekiq_queue_latency = { push = \"soon\" }\n",
                "alerts.sidekiq_queue_latency.push",
            ),
            ("[alerts]\nlatency = \"1m\"\n", "latency"),
            ("[canary]\nkeys = [\"../etc/passwd\"]\n", "canary.keys"),
            ("[canary]\nfailures = 0\n", "canary.failures"),
            ("[canary]\nurl = \"http://x\"\n", "url"),
        ] {
            let e = load(text).unwrap_err();
            assert!(e.contains(key), "{text}: {e}");
        }
    }
}
