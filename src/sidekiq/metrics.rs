//! `fediedge_sidekiq_*` on `/metrics`: a poller keeps the latest [`Snapshot`], and a
//! Prometheus collector renders it at each scrape, so a queue that disappears from Redis
//! disappears from `/metrics` too.
//!
//! Unlike an exporter inside a Sidekiq process, this one lists every queue Mastodon needs,
//! served or not: `fediedge_sidekiq_queue_unserved{queue}` is 1 for a queue no live process
//! serves (the alert Mastodon's own exporter cannot give).

use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use tokio_util::sync::CancellationToken;

use super::read::{connect, read_with};
use super::{QueueStat, Snapshot, Target};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SetLabel {
    set: &'static str,
}

/// The latest read, shared by the poller (writes) and `/metrics` (reads).
#[derive(Debug, Default)]
pub struct SidekiqCollector {
    latest: RwLock<Option<Snapshot>>,
}

impl SidekiqCollector {
    /// A collector with nothing read yet (`fediedge_sidekiq_up 0`).
    pub fn new() -> Arc<SidekiqCollector> {
        Arc::new(SidekiqCollector::default())
    }

    /// Records a read (`None`: the read failed).
    pub fn set(&self, snapshot: Option<Snapshot>) {
        *self.latest.write() = snapshot;
    }
}

fn gauge<V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: V,
) -> Result<(), std::fmt::Error> {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

fn family<L: EncodeLabelSet, V: EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    items: impl IntoIterator<Item = (L, V)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in items {
        m.encode_family(&labels)?.encode_gauge(&v)?;
    }
    Ok(())
}

fn by_queue<'a, V>(
    s: &'a Snapshot,
    f: impl Fn(&QueueStat) -> V + 'a,
) -> impl Iterator<Item = (QueueLabel, V)> + 'a {
    s.queues.iter().map(move |q| {
        (
            QueueLabel {
                queue: q.name.clone(),
            },
            f(q),
        )
    })
}

impl Collector for SidekiqCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let latest = self.latest.read();
        let up = i64::from(latest.is_some());
        gauge(
            &mut enc,
            "sidekiq_up",
            "1 if the last read of Sidekiq's Redis worked",
            up,
        )?;
        let Some(s) = latest.as_ref() else {
            return Ok(());
        };
        family(
            &mut enc,
            "sidekiq_queue_size",
            "Jobs waiting, by queue",
            by_queue(s, |x| x.size as i64),
        )?;
        family(
            &mut enc,
            "sidekiq_queue_latency_seconds",
            "Age of the oldest waiting job, by queue",
            by_queue(s, |x| x.latency_seconds),
        )?;
        family(
            &mut enc,
            "sidekiq_queue_processes",
            "Live, non-quiet processes serving the queue",
            by_queue(s, |x| x.processes as i64),
        )?;
        family(
            &mut enc,
            "sidekiq_queue_unserved",
            "1 if no live process serves the queue (every queue Mastodon needs is listed)",
            by_queue(s, |x| i64::from(x.processes == 0)),
        )?;
        family(
            &mut enc,
            "sidekiq_set_size",
            "Jobs in the scheduled, retry and dead sets",
            [
                ("scheduled", s.scheduled),
                ("retry", s.retry),
                ("dead", s.dead),
            ]
            .map(|(set, n)| (SetLabel { set }, n as i64)),
        )?;
        for (name, help, v) in [
            ("sidekiq_processed", "Sidekiq's stat:processed", s.processed),
            ("sidekiq_failed", "Sidekiq's stat:failed", s.failed),
        ] {
            enc.encode_descriptor(name, help, None, MetricType::Counter)?
                .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
        }
        let n = |v: usize| v as i64;
        gauge(
            &mut enc,
            "sidekiq_processes",
            "Live Sidekiq processes",
            n(s.processes.len()),
        )?;
        gauge(
            &mut enc,
            "sidekiq_dead_processes",
            "Members of the processes set without a heartbeat",
            n(s.dead_processes.len()),
        )?;
        gauge(
            &mut enc,
            "sidekiq_busy",
            "Threads running a job",
            s.busy() as i64,
        )?;
        gauge(
            &mut enc,
            "sidekiq_concurrency",
            "Threads of all live processes",
            s.concurrency() as i64,
        )?;
        gauge(
            &mut enc,
            "sidekiq_unserved",
            "Queues no live process serves",
            n(s.unserved.len()),
        )?;
        Ok(())
    }
}

/// Reads `target` every `interval` into `collector` until `stop`; a failed read is logged
/// (redacted) and retried with a new connection at the next tick.
pub async fn poll(
    target: Target,
    interval: Duration,
    collector: Arc<SidekiqCollector>,
    stop: CancellationToken,
) {
    let mut con = None;
    loop {
        if con.is_none() {
            match connect(&target).await {
                Ok(c) => con = Some(c),
                Err(e) => tracing::warn!("sidekiq monitor: {e}"),
            }
        }
        if let Some(c) = con.as_mut() {
            match read_with(c, &target).await {
                Ok(s) => collector.set(Some(s)),
                Err(e) => {
                    tracing::warn!("sidekiq monitor: {e}");
                    collector.set(None);
                    con = None;
                }
            }
        } else {
            collector.set(None);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
