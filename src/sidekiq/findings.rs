//! What is wrong with a live Sidekiq, as doctor-style findings (rules in `docs/queues.md`).
//!
//! The checks follow Mastodon's own admin check (`sidekiq_process_check.rb`: every queue
//! Mastodon uses is served by a live process) and its scaling guide (`scheduler` in exactly
//! one process). A quiet process (TSTP, or shutting down) fetches nothing, so it serves no
//! queue here.

use crate::doctor::{Finding, Severity};

use super::{Snapshot, FASP_QUEUE, REQUIRED_QUEUES};

/// Fills `snapshot.unserved` and `snapshot.findings`. `needs_fasp`: the data shows Mastodon
/// 4.4+ (Sidekiq 7+), which also needs `fasp`. `source` names the Redis (redacted).
pub fn analyse(snapshot: &mut Snapshot, needs_fasp: bool, source: &str) {
    let required = |q: &str| REQUIRED_QUEUES.contains(&q) || (needs_fasp && q == FASP_QUEUE);
    snapshot.unserved = snapshot
        .queues
        .iter()
        .filter(|q| q.processes == 0)
        .map(|q| q.name.clone())
        .collect();
    let mut out = Vec::new();
    let finding = |sev, rule, key: Option<&str>, msg: String, fix: &str| {
        Finding::new(sev, rule, source, key, msg, fix)
    };
    let working: Vec<_> = snapshot.processes.iter().filter(|p| !p.quiet).collect();
    if working.is_empty() {
        out.push(finding(
            Severity::Error,
            "queues-no-process",
            None,
            format!(
                "no live Sidekiq process ({} live but quiet, {} dead in the `processes` set): \
                 no job runs; {} queue(s) wait unserved: {}.",
                snapshot.processes.len(),
                snapshot.dead_processes.len(),
                snapshot.unserved.len(),
                snapshot.unserved.join(", ")
            ),
            "Start mastodon-sidekiq (systemctl status mastodon-sidekiq; journalctl -u \
             mastodon-sidekiq).",
        ));
    } else {
        for q in &snapshot.queues {
            if q.processes > 0 {
                continue;
            }
            let jobs = match q.size {
                0 => "empty".to_owned(),
                n => format!(
                    "{n} job(s) waiting, the oldest for {:.0} s",
                    q.latency_seconds
                ),
            };
            if q.name == "scheduler" {
                out.push(finding(
                    Severity::Error,
                    "queues-scheduler-missing",
                    Some("scheduler"),
                    format!(
                        "no live Sidekiq process serves `scheduler` ({jobs}): sidekiq-scheduler \
                         only enqueues cron jobs from a process listening on it, so no scheduled \
                         job runs."
                    ),
                    "Add `-q scheduler` to exactly one Sidekiq unit.",
                ));
            } else if required(&q.name) {
                out.push(finding(
                    Severity::Error,
                    "queues-unserved",
                    Some(&q.name),
                    format!(
                        "no live Sidekiq process serves `{}` ({jobs}): its jobs never run.",
                        q.name
                    ),
                    "Add the queue to a unit's `-q` list, or drop every `-q` from one unit so it \
                     serves all queues of config/sidekiq.yml.",
                ));
            } else {
                let sev = if q.size > 0 {
                    Severity::Warning
                } else {
                    Severity::Info
                };
                out.push(finding(
                    sev,
                    "queues-unserved-other",
                    Some(&q.name),
                    format!(
                        "queue `{}` exists but no live Sidekiq process serves it ({jobs}).",
                        q.name
                    ),
                    "Serve it, or drain it if nothing pushes to it any more.",
                ));
            }
        }
    }
    let schedulers: Vec<&str> = working
        .iter()
        .filter(|p| p.queues.iter().any(|q| q == "scheduler"))
        .map(|p| p.identity.as_str())
        .collect();
    if schedulers.len() > 1 {
        out.push(finding(
            Severity::Error,
            "queues-scheduler-multiple",
            Some("scheduler"),
            format!(
                "{} live processes serve `scheduler` ({}); it must run in exactly one, or cron \
                 jobs run twice or are skipped (mastodon/mastodon#14764).",
                schedulers.len(),
                schedulers.join(", ")
            ),
            "Keep `scheduler` in one unit; give the others explicit `-q` lists without it.",
        ));
    }
    for p in snapshot.processes.iter().filter(|p| p.quiet) {
        out.push(finding(
            Severity::Warning,
            "queues-quiet-process",
            Some(&p.identity),
            format!(
                "process {} is quiet: it fetches no new job, so it serves none of its queues ({}).",
                p.identity,
                p.queues.join(", ")
            ),
            "Expected for a moment during a restart; otherwise restart the process.",
        ));
    }
    if !snapshot.dead_processes.is_empty() {
        out.push(finding(
            Severity::Info,
            "queues-dead-process",
            None,
            format!(
                "{} member(s) of the `processes` set have no heartbeat any more (dead, not \
                 counted): {}.",
                snapshot.dead_processes.len(),
                snapshot.dead_processes.join(", ")
            ),
            "Nothing to do: Sidekiq's web UI removes them; this monitor never writes.",
        ));
    }
    for q in snapshot.queues.iter().filter(|q| q.unreadable_job) {
        out.push(finding(
            Severity::Warning,
            "queues-unreadable-job",
            Some(&q.name),
            format!(
                "the oldest job of `{}` is not Sidekiq job JSON; its latency is shown as 0.",
                q.name
            ),
            "Look at it with `redis-cli LINDEX queue:NAME -1`.",
        ));
    }
    out.sort_by_key(|f| std::cmp::Reverse(f.severity));
    snapshot.findings = out;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sidekiq::{ProcessStat, QueueStat};

    fn queue(name: &str, size: u64, processes: usize) -> QueueStat {
        QueueStat {
            name: name.into(),
            size,
            latency_seconds: 0.0,
            processes,
            exists: true,
            unreadable_job: false,
        }
    }

    fn proc(id: &str, queues: &[&str], quiet: bool) -> ProcessStat {
        ProcessStat {
            identity: id.into(),
            hostname: "h".into(),
            queues: queues.iter().map(|q| q.to_string()).collect(),
            concurrency: 5,
            busy: 0,
            quiet,
            version: None,
        }
    }

    fn snapshot(queues: Vec<QueueStat>, processes: Vec<ProcessStat>) -> Snapshot {
        Snapshot {
            queues,
            scheduled: 0,
            retry: 0,
            dead: 0,
            processed: 0,
            failed: 0,
            processes,
            unserved: vec![],
            findings: vec![],
            dead_processes: vec![],
        }
    }

    fn rules(s: &Snapshot) -> Vec<(&'static str, Option<&str>)> {
        s.findings
            .iter()
            .map(|f| (f.rule, f.key.as_deref()))
            .collect()
    }

    #[test]
    fn unserved_required_and_other_queues() {
        let mut s = snapshot(
            vec![
                queue("default", 0, 1),
                queue("push", 3, 0),
                queue("scheduler", 0, 0),
                queue("old", 0, 0),
                queue("legacy", 2, 0),
            ],
            vec![proc("a", &["default"], false)],
        );
        analyse(&mut s, false, "redis://x");
        assert_eq!(s.unserved, ["push", "scheduler", "old", "legacy"]);
        assert_eq!(
            rules(&s),
            [
                ("queues-unserved", Some("push")),
                ("queues-scheduler-missing", Some("scheduler")),
                ("queues-unserved-other", Some("legacy")),
                ("queues-unserved-other", Some("old")),
            ]
        );
        assert_eq!(s.findings[2].severity, Severity::Warning);
        assert_eq!(s.findings[3].severity, Severity::Info);
    }

    #[test]
    fn scheduler_twice_and_quiet_processes() {
        let mut s = snapshot(
            vec![queue("scheduler", 0, 2)],
            vec![
                proc("a", &["scheduler"], false),
                proc("b", &["scheduler"], false),
                proc("c", &["scheduler"], true),
            ],
        );
        analyse(&mut s, false, "redis://x");
        assert_eq!(
            rules(&s),
            [
                ("queues-scheduler-multiple", Some("scheduler")),
                ("queues-quiet-process", Some("c")),
            ]
        );
        assert!(s.findings[0].message.contains("2 live processes"));
    }

    #[test]
    fn fasp_is_required_only_for_sidekiq_7_and_later() {
        let mut s = snapshot(vec![queue("fasp", 0, 0)], vec![proc("a", &["x"], false)]);
        analyse(&mut s, true, "r");
        assert_eq!(rules(&s), [("queues-unserved", Some("fasp"))]);
        analyse(&mut s, false, "r");
        assert_eq!(rules(&s), [("queues-unserved-other", Some("fasp"))]);
    }

    #[test]
    fn no_process_at_all_is_one_error() {
        let mut s = snapshot(vec![queue("default", 1, 0)], vec![]);
        s.dead_processes = vec!["h:1:dead".into()];
        analyse(&mut s, false, "r");
        assert_eq!(
            rules(&s),
            [("queues-no-process", None), ("queues-dead-process", None)]
        );
    }
}
