//! The Prometheus rules and the Grafana dashboard in `dist/`: `promtool` checks the rules
//! (and their unit tests in tests/data/prometheus), checks every dashboard query as PromQL, and
//! every `fediedge_*` series either file names is one a real edge exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{metrics, wait_metric};
use crate::common::origin::Origin;
use crate::common::{client, start_edge};
use crate::sidekiq::fill::{Filler, Sidekiq};
use crate::sidekiq::server::RedisServer;

fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

const RULES: &str = "dist/prometheus/fediedge-alerts.yml";
const DASHBOARD: &str = "dist/grafana/fediedge-dashboard.json";

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .expect("promtool (Debian package prometheus; scripts/install-test-deps.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// Every `fediedge_…` name in `text`.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("fediedge_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// The dashboard's queries, each with its panel's title.
fn dashboard_queries() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo(DASHBOARD)).unwrap();
    let d: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert_eq!(d["uid"], "fediedge");
    let panels = d["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let mut out = Vec::new();
    for p in panels {
        let title = p["title"]
            .as_str()
            .expect("every panel has a title")
            .to_owned();
        let targets = p["targets"].as_array().expect("every panel has targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            let expr = t["expr"].as_str().expect("a PromQL expr").to_owned();
            out.push((title.clone(), expr));
        }
    }
    out
}

#[test]
fn promtool_checks_the_rules_and_their_tests() {
    let out = promtool(&["check", "rules", repo(RULES).to_str().unwrap()]);
    assert!(out.contains("SUCCESS: 14 rules found"), "{out}");
    let out = promtool(&[
        "test",
        "rules",
        repo("tests/data/prometheus/fediedge-alerts.test.yml")
            .to_str()
            .unwrap(),
    ]);
    assert!(out.contains("SUCCESS"), "{out}");
}

/// promtool has no check for a dashboard; its queries become recording rules, which it parses.
#[test]
fn every_dashboard_query_is_valid_promql() {
    let queries = dashboard_queries();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in queries.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(expr).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yml");
    std::fs::write(&file, rules).unwrap();
    let out = promtool(&["check", "rules", file.to_str().unwrap()]);
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{out}"
    );
}

/// An edge with every part that exports series (cache, fallback, canary, Sidekiq, core),
/// after some traffic: every name the rules and the dashboard use is on its `/metrics`.
#[tokio::test]
async fn rules_and_dashboard_name_only_series_the_edge_exports() {
    let origin = Origin::start().await;
    origin.put("a/b.png", &b"media"[..]);
    let redis = RedisServer::start();
    let mut f = Filler::new(redis.connection().await, None);
    f.push(Sidekiq::V8_1, "default", 2.0).await;
    f.heartbeat(Sidekiq::V8_1, "w1", 1, &["default"], 5, 1)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("primary");
    std::fs::create_dir_all(&root).unwrap();
    let extra = format!(
        "[primary]\ntype = \"fs\"\nroot = \"{}\"\n[cache]\ndir = \"{}\"\nmax_size = \"8MiB\"\n\
         [[fallback]]\nname = \"old\"\ntype = \"http\"\nurl = \"{}\"\n\
         [sidekiq]\nredis_url = \"{}\"\ninterval = \"1s\"\n\
         [canary]\ninterval = \"1s\"\n\
         [core]\nhosts = [\"example.social\"]\nweb = [\"{}\"]\n\
         [alerts]\ninterval = \"1s\"\n",
        root.display(),
        dir.path().join("cache").display(),
        origin.url(),
        redis.url(),
        origin.addr
    );
    let edge = start_edge(dir.path(), &extra).await;
    let r = client()
        .get(format!("{}a/b.png", edge.base))
        .header("host", "example.social")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    wait_metric(&edge.admin, "fediedge_sidekiq_up 1").await;
    wait_metric(&edge.admin, "fediedge_canary_ok{canary=\"probe\"} 1").await;
    crate::common::eventually(
        std::time::Duration::from_secs(30),
        "the copy into the primary",
        || root.join("a/b.png").exists(),
    )
    .await;
    let m = metrics(&edge.admin).await;
    let exported: BTreeSet<String> = m
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    let rules = std::fs::read_to_string(repo(RULES)).unwrap();
    let queries: String = dashboard_queries()
        .into_iter()
        .map(|(_, e)| e + "\n")
        .collect();
    let named: BTreeSet<String> = names_in(&rules)
        .into_iter()
        .chain(names_in(&queries))
        .collect();
    assert!(named.len() >= 20, "{named:?}");
    let missing: Vec<_> = named.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "named in dist/ but not exported: {missing:?}\n/metrics:\n{m}"
    );
}
