//! Pure decoding of what Sidekiq stores in Redis: job timestamps and process heartbeats.
//!
//! Read from sidekiq/sidekiq `lib/sidekiq/{api,client,launcher}.rb` at v6.5.12, v7.3.9,
//! v8.0.9 and v8.1.6:
//!
//! - A job is JSON; its `enqueued_at` (else `created_at`) is **float epoch seconds** up to
//!   7.x and **integer epoch milliseconds** from 8.0. Sidekiq 8 tells them apart by JSON type,
//!   so a queue filled before and after an upgrade holds both; so do we.
//! - A process's hash (key = its identity) holds `info` (JSON: `hostname`, `identity`,
//!   `queues`, `concurrency` up to 8.1.1, `capsules` from 8.0.9, `version` from 7.0.2),
//!   `busy`, `beat`, `quiet`, and from 8.1.2 a `concurrency` field of its own (8.1.2 drops it
//!   from `info`). The hash expires 60 s after the last heartbeat.

use serde_json::Value;

use super::ProcessStat;

/// When a job was enqueued, in epoch milliseconds: `enqueued_at`, else `created_at`; float
/// values are seconds (Sidekiq ≤ 7), integers milliseconds (Sidekiq 8). `None` if the job has
/// neither or they are not numbers.
pub fn enqueued_at_ms(job: &Value) -> Option<f64> {
    let ts = match job.get("enqueued_at") {
        Some(v) if !v.is_null() => v,
        _ => job.get("created_at")?,
    };
    match ts {
        Value::Number(n) if n.is_f64() => n.as_f64().map(|s| s * 1000.0),
        Value::Number(n) => n.as_i64().map(|ms| ms as f64),
        _ => None,
    }
}

/// Latency of a queue whose oldest job (the list's last element) is `job`, at `now_ms`:
/// seconds, never negative (a clock ahead of ours gives 0). `Err` if `job` is not JSON.
pub fn latency_seconds(job: &str, now_ms: i64) -> Result<f64, serde_json::Error> {
    let job: Value = serde_json::from_str(job)?;
    Ok(match enqueued_at_ms(&job) {
        Some(at) => ((now_ms as f64 - at) / 1000.0).max(0.0),
        // Sidekiq counts a job without a timestamp as enqueued now.
        None => 0.0,
    })
}

/// The fields of a process's heartbeat hash the monitor reads (`HMGET identity info
/// concurrency busy quiet`).
#[derive(Debug, Clone, Default)]
pub struct Heartbeat {
    /// `info`: JSON; `None` when the hash has expired (the process is dead).
    pub info: Option<String>,
    /// `concurrency` (Sidekiq 8.1.2+).
    pub concurrency: Option<String>,
    /// `busy`.
    pub busy: Option<String>,
    /// `quiet`: `"true"` once the process stopped fetching.
    pub quiet: Option<String>,
}

/// A live process from its heartbeat, or `None` if the hash has expired: a member of the
/// `processes` set without a hash is dead even though the set still names it (only a writer,
/// Sidekiq's `ProcessSet#cleanup`, removes it).
pub fn process(identity: &str, beat: &Heartbeat) -> Option<ProcessStat> {
    let info: Value = serde_json::from_str(beat.info.as_deref()?).unwrap_or(Value::Null);
    let text = |k: &str| info.get(k).and_then(Value::as_str).map(str::to_owned);
    let mut queues: Vec<String> = info
        .get("queues")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    // 8.x: each capsule's `weights` names its queues (Sidekiq's own `Process#queues`).
    let capsules = info.get("capsules").and_then(Value::as_object);
    for cap in capsules.into_iter().flat_map(|c| c.values()) {
        if let Some(w) = cap.get("weights").and_then(Value::as_object) {
            queues.extend(w.keys().cloned());
        }
    }
    let mut seen = std::collections::HashSet::new();
    queues.retain(|q| seen.insert(q.clone()));
    let field = |v: &Option<String>| v.as_deref().and_then(|s| s.trim().parse::<u64>().ok());
    let concurrency = field(&beat.concurrency)
        .or_else(|| info.get("concurrency").and_then(Value::as_u64))
        .or_else(|| {
            capsules.map(|c| {
                c.values()
                    .filter_map(|cap| cap.get("concurrency").and_then(Value::as_u64))
                    .sum()
            })
        })
        .unwrap_or(0);
    Some(ProcessStat {
        identity: text("identity").unwrap_or_else(|| identity.to_owned()),
        hostname: text("hostname").unwrap_or_default(),
        queues,
        concurrency,
        busy: field(&beat.busy).unwrap_or(0),
        quiet: beat.quiet.as_deref() == Some("true"),
        version: text("version"),
    })
}

/// The major version of a Sidekiq version string (`"7.3.9"` → 7).
pub fn major(version: &str) -> Option<u64> {
    version.split('.').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: i64 = 1_800_000_000_000;

    #[test]
    fn float_seconds_and_integer_millis_give_the_same_latency() {
        let old = r#"{"class":"A","enqueued_at":1799999880.5,"created_at":1799999000.0}"#;
        let new = r#"{"class":"A","enqueued_at":1799999880500,"created_at":1799999000000}"#;
        assert_eq!(latency_seconds(old, NOW_MS).unwrap(), 119.5);
        assert_eq!(latency_seconds(new, NOW_MS).unwrap(), 119.5);
    }

    #[test]
    fn a_whole_float_is_still_seconds() {
        let j = r#"{"enqueued_at":1799999990.0}"#;
        assert_eq!(latency_seconds(j, NOW_MS).unwrap(), 10.0);
    }

    #[test]
    fn created_at_when_enqueued_at_is_missing_and_never_negative() {
        assert_eq!(
            latency_seconds(r#"{"created_at":1799999970000}"#, NOW_MS).unwrap(),
            30.0
        );
        assert_eq!(
            latency_seconds(r#"{"enqueued_at":1900000000.0}"#, NOW_MS).unwrap(),
            0.0
        );
        assert_eq!(latency_seconds(r#"{"class":"A"}"#, NOW_MS).unwrap(), 0.0);
        assert!(latency_seconds("not json", NOW_MS).is_err());
    }

    fn beat(info: &str, concurrency: Option<&str>) -> Heartbeat {
        Heartbeat {
            info: Some(info.into()),
            concurrency: concurrency.map(Into::into),
            busy: Some("2".into()),
            quiet: Some("false".into()),
        }
    }

    #[test]
    fn sidekiq_6_5_and_7_info() {
        let p = process(
            "h:1:ab",
            &beat(
                r#"{"hostname":"h","identity":"h:1:ab","concurrency":25,"queues":["default","push"]}"#,
                None,
            ),
        )
        .unwrap();
        assert_eq!(p.queues, ["default", "push"]);
        assert_eq!((p.concurrency, p.busy, p.quiet), (25, 2, false));
    }

    #[test]
    fn sidekiq_8_1_concurrency_field_and_capsules() {
        let info = r#"{"hostname":"h","identity":"h:1:ab","version":"8.1.6",
            "capsules":{"default":{"concurrency":10,"mode":"weighted","weights":{"default":8,"fasp":1}},
                        "single":{"concurrency":1,"mode":"strict","weights":{"scheduler":0}}},
            "queues":["default","fasp","scheduler"]}"#;
        let p = process("h:1:ab", &beat(info, Some("11"))).unwrap();
        assert_eq!(p.concurrency, 11);
        assert_eq!(p.queues, ["default", "fasp", "scheduler"]);
        assert_eq!(p.version.as_deref().and_then(major), Some(8));
        // Without the field (8.0.9–8.1.1 put it in `info`; here only capsules say it).
        let p = process("h:1:ab", &beat(info, None)).unwrap();
        assert_eq!(p.concurrency, 11);
    }

    #[test]
    fn an_expired_hash_is_a_dead_process() {
        assert!(process("h:1:ab", &Heartbeat::default()).is_none());
    }
}
