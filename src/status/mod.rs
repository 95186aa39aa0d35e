//! What is wrong, at a glance: the alert evaluator (`alerts.rs`), the media canary
//! (`canary.rs`) and the status page (`page.rs`), all reading the edge through its own
//! `/metrics` text (`sample.rs`). `serve` starts [`Status::run`] (and the canary, with
//! `[canary]`); the admin handler answers `/healthz` from [`Status::health`] and `/` from
//! [`page`].
//!
//! Its own series (`fediedge_alert_active`, `fediedge_canary_*`,
//! `fediedge_writeback_oldest_age_seconds`) are rendered by [`StatusCollector`].

pub mod alerts;
pub mod canary;
pub mod page;
pub mod sample;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::MetricType;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{AlertsConfig, CanaryConfig};
use crate::ledger::Ledger;
use crate::metrics::Metrics;

pub use sample::{Labels, Sample};

/// One canary (a configured key, or `probe`) as the last rounds left it.
#[derive(Debug, Clone, Default)]
pub struct CanaryState {
    /// The key, or `probe`.
    pub name: String,
    /// Failed rounds since the last success.
    pub failures_in_a_row: u32,
    /// Why the last failed round failed.
    pub last_error: Option<String>,
    /// When it last succeeded (Unix seconds).
    pub last_ok: Option<u64>,
    /// Rounds, ever.
    pub rounds: u64,
}

/// What the evaluator, the canary and the page share.
#[derive(Debug, Default)]
struct State {
    tracker: Mutex<alerts::Tracker>,
    canary: RwLock<Vec<CanaryState>>,
    canary_failures: RwLock<Option<u32>>,
    writeback_oldest: RwLock<Option<Duration>>,
}

/// Handle to the status room (cheap to clone).
#[derive(Clone)]
pub struct Status {
    state: Arc<State>,
    config: Arc<AlertsConfig>,
    /// Readings of `/metrics`, one per `interval`, over the window (the page's rates come
    /// from the one about 30 s old).
    samples: Arc<Mutex<VecDeque<(Instant, Sample)>>>,
}

impl std::fmt::Debug for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Status")
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Status {
    /// A status room with no reading yet; `canary` as configured.
    pub fn new(config: &AlertsConfig, canary: Option<&CanaryConfig>) -> Status {
        let state = State::default();
        *state.canary_failures.write() = canary.map(|c| c.failures);
        // The first reading is the process's start: every counter at zero, so what is
        // counted before the first tick still counts in the first window.
        let start = VecDeque::from([(Instant::now(), Sample::default())]);
        Status {
            state: Arc::new(state),
            config: Arc::new(config.clone()),
            samples: Arc::new(Mutex::new(start)),
        }
    }

    /// The collector of the room's own series, for [`Metrics::with_collectors`].
    pub fn collector(&self) -> StatusCollector {
        StatusCollector(self.state.clone())
    }

    /// The alerts active now.
    pub fn active(&self) -> alerts::Active {
        self.state.tracker.lock().active().clone()
    }

    /// `/healthz`: healthy, or the reasons it is not (one active alert per line).
    pub fn health(&self) -> Result<(), Vec<String>> {
        let active = self.active();
        if active.is_empty() {
            Ok(())
        } else {
            Err(active
                .into_iter()
                .map(|(name, why)| format!("{name}: {why}"))
                .collect())
        }
    }

    /// The canaries' state.
    pub fn canaries(&self) -> Vec<CanaryState> {
        self.state.canary.read().clone()
    }

    /// Records a canary round of `name` (`Err`: why it failed).
    pub fn canary_round(&self, name: &str, result: Result<(), String>) {
        let mut all = self.state.canary.write();
        let i = match all.iter().position(|c| c.name == name) {
            Some(i) => i,
            None => {
                all.push(CanaryState {
                    name: name.to_owned(),
                    ..CanaryState::default()
                });
                all.len() - 1
            }
        };
        let c = &mut all[i];
        c.rounds += 1;
        match result {
            Ok(()) => {
                c.failures_in_a_row = 0;
                c.last_ok = Some(unix_now());
            }
            Err(e) => {
                c.failures_in_a_row += 1;
                c.last_error = Some(e);
            }
        }
    }

    /// Reads `/metrics` and the write-back queue's oldest row, and evaluates the alerts,
    /// every `interval` until `stop`.
    pub async fn run(self, metrics: Metrics, ledger: Ledger, stop: CancellationToken) {
        loop {
            self.tick(&metrics, &ledger).await;
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(self.config.interval) => {}
            }
        }
    }

    async fn tick(&self, metrics: &Metrics, ledger: &Ledger) {
        let oldest = ledger
            .run(crate::ledger::ops::oldest_queued_at)
            .await
            .map_err(|e| tracing::debug!(error = %e, "cannot read the write-back queue"))
            .ok()
            .flatten()
            .map(|t| Duration::from_secs(unix_now().saturating_sub(t.max(0) as u64)));
        *self.state.writeback_oldest.write() = oldest;
        let now = Instant::now();
        let sample = Sample::parse(&metrics.render());
        let (then, span) = {
            let mut samples = self.samples.lock();
            samples.push_back((now, sample.clone()));
            while samples.len() > 1 && now.duration_since(samples[1].0) >= self.config.window {
                samples.pop_front();
            }
            let (t, s) = &samples[0];
            (s.clone(), now.duration_since(*t))
        };
        let canaries = self.canaries();
        let needed = *self.state.canary_failures.read();
        let active = alerts::evaluate(&alerts::Inputs {
            config: &self.config,
            now: &sample,
            then: &then,
            span: span.max(self.config.interval),
            writeback_oldest: oldest,
            canary: needed.map(|n| (canaries.as_slice(), n)),
        });
        self.state.tracker.lock().update(active);
    }

    /// The reading closest to `ago` before now (the oldest if none is that old), and its age.
    fn reading_about(&self, ago: Duration) -> Option<(Sample, Duration)> {
        let samples = self.samples.lock();
        let now = Instant::now();
        samples
            .iter()
            .find(|(t, _)| now.duration_since(*t) <= ago)
            .or(samples.front())
            .map(|(t, s)| (s.clone(), now.duration_since(*t)))
    }

    /// The age of the oldest copy waiting for the primary, as last read.
    pub fn writeback_oldest(&self) -> Option<Duration> {
        *self.state.writeback_oldest.read()
    }
}

/// Renders `fediedge_alert_active`, `fediedge_canary_*` and
/// `fediedge_writeback_oldest_age_seconds`.
#[derive(Debug)]
pub struct StatusCollector(Arc<State>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlertLabel {
    alert: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CanaryLabel {
    canary: String,
}

impl Collector for StatusCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let active = self.0.tracker.lock().active().clone();
        let mut m = enc.encode_descriptor(
            "alerts_active",
            "Alerts active now (each also makes /healthz answer 503)",
            None,
            MetricType::Gauge,
        )?;
        m.encode_gauge(&(active.len() as i64))?;
        let mut m = enc.encode_descriptor(
            "alert_active",
            "1 for each alert active now, by name",
            None,
            MetricType::Gauge,
        )?;
        for name in active.keys() {
            m.encode_family(&AlertLabel {
                alert: name.clone(),
            })?
            .encode_gauge(&1i64)?;
        }
        let oldest = self
            .0
            .writeback_oldest
            .read()
            .map_or(0, |d| d.as_secs() as i64);
        enc.encode_descriptor(
            "writeback_oldest_age_seconds",
            "Age of the oldest copy waiting for the primary (0: none)",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&oldest)?;
        if self.0.canary_failures.read().is_none() {
            return Ok(());
        }
        let canaries = self.0.canary.read().clone();
        let mut m = enc.encode_descriptor(
            "canary_ok",
            "1 if the canary's last round served the media, 0 if it failed",
            None,
            MetricType::Gauge,
        )?;
        for c in &canaries {
            m.encode_family(&CanaryLabel {
                canary: c.name.clone(),
            })?
            .encode_gauge(&i64::from(c.failures_in_a_row == 0))?;
        }
        let mut m = enc.encode_descriptor(
            "canary_failures_in_a_row",
            "Failed canary rounds since the last success",
            None,
            MetricType::Gauge,
        )?;
        for c in &canaries {
            m.encode_family(&CanaryLabel {
                canary: c.name.clone(),
            })?
            .encode_gauge(&(c.failures_in_a_row as i64))?;
        }
        let mut m = enc.encode_descriptor(
            "canary_rounds",
            "Canary rounds run (fetches of the key through the edge)",
            None,
            MetricType::Counter,
        )?;
        for c in &canaries {
            m.encode_family(&CanaryLabel {
                canary: c.name.clone(),
            })?
            .encode_counter::<prometheus_client::encoding::NoLabelSet, u64, u64>(&c.rounds, None)?;
        }
        Ok(())
    }
}
