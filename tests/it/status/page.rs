//! The status page in a real headless Chromium (Debian `chromium` + `chromium-driver`, driven
//! over WebDriver with fantoccini): it loads without console errors, shows the numbers
//! `/metrics` shows, follows them live without a reload, fits a phone's width, and reads
//! without JavaScript too.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

use super::{metrics, value, wait_healthz, wait_metric};
use crate::common::garage::free_port;
use crate::common::{client, start_edge};
use crate::sidekiq::fill::{Filler, Sidekiq};
use crate::sidekiq::server::RedisServer;

/// chromedriver on a free loopback port, killed on drop.
struct Driver {
    child: std::process::Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start() -> Driver {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "chromedriver (Debian chromium-driver; scripts/install-test-deps.sh installs it)",
            );
        let driver = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let start = Instant::now();
        loop {
            let ready = client()
                .get(format!("{}/status", driver.url))
                .send()
                .await
                .ok()
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ready {
                return driver;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "chromedriver never ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A headless Chromium the size of a phone, keeping its console log.
    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=412,915"],
            }),
        );
        caps.insert("goog:loggingPrefs".into(), json!({"browser": "ALL"}));
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a Chromium session")
    }
}

/// chromedriver's browser log (`POST /session/{id}/se/log`), which WebDriver itself lacks.
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or("")))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.into()))
    }
}

/// The console messages since the last call, as `LEVEL message`.
async fn console(browser: &Client) -> Vec<String> {
    let log = browser
        .issue_cmd(BrowserLog)
        .await
        .expect("the browser log");
    log.as_array()
        .expect("a list of entries")
        .iter()
        .map(|e| format!("{} {}", e["level"].as_str().unwrap_or("?"), e["message"]))
        .collect()
}

async fn text(browser: &Client, css: &str) -> String {
    browser
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css} on the page: {e}"))
        .text()
        .await
        .unwrap()
}

/// Waits until the page (live, without a reload) shows `want` in `css`.
async fn wait_text(browser: &Client, css: &str, want: &str) {
    let start = Instant::now();
    loop {
        let got = match browser.find(Locator::Css(css)).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{css} shows {got:?}, never {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_in_chromium_shows_the_edges_numbers_live() {
    let pw = "page-pw-Qz8";
    let redis = RedisServer::start_with(Some(pw), &[]);
    let mut f = Filler::new(redis.connection().await, None);
    f.push(Sidekiq::V8_1, "default", 30.0).await;
    f.heartbeat(
        Sidekiq::V8_1,
        "w1",
        1,
        &[
            "default",
            "push",
            "ingress",
            "mailers",
            "pull",
            "scheduler",
            "fasp",
        ],
        10,
        1,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("primary");
    std::fs::create_dir_all(root.join("a")).unwrap();
    std::fs::write(root.join("a/b.png"), b"media bytes").unwrap();
    let missing = "accounts/avatars/000/000/009/original/gone.png";
    let extra = format!(
        "[primary]\ntype = \"fs\"\nroot = \"{}\"\n[cache]\ndir = \"{}\"\nmax_size = \"8MiB\"\n\
         [sidekiq]\nredis_url = \"{}\"\ninterval = \"1s\"\n\
         [canary]\nkeys = [\"{missing}\"]\ninterval = \"1h\"\nfailures = 1\n\
         [alerts]\ninterval = \"1s\"\nwindow = \"1m\"\n",
        root.display(),
        dir.path().join("cache").display(),
        redis.url(),
    );
    let edge = start_edge(dir.path(), &extra).await;
    for _ in 0..2 {
        let r = client()
            .get(format!("{}a/b.png", edge.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    wait_metric(
        &edge.admin,
        "fediedge_sidekiq_queue_size{queue=\"default\"} 1",
    )
    .await;
    wait_healthz(&edge.admin, "the canary alert", |code, body| {
        code == 503 && body.contains("canary:")
    })
    .await;

    // Without JavaScript: the numbers are in the HTML itself.
    let html = client().get(&edge.admin).send().await.unwrap();
    assert_eq!(html.status(), 200);
    let csp = html.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    let html = html.text().await.unwrap();
    assert!(html.contains("<dd id=\"requests-total\">3</dd>"), "{html}");
    assert!(!html.contains(pw), "the Redis password on the page");
    assert!(
        html.contains(&format!("data-alert=\"canary:{missing}\"")),
        "{html}"
    );
    assert!(
        !html.contains("src=\"http") && !html.contains("href=\"http"),
        "external asset: {html}"
    );

    let driver = Driver::start().await;
    let browser = driver.browser().await;
    browser.goto(&format!("{}/", edge.admin)).await.unwrap();
    assert_eq!(browser.title().await.unwrap(), "fediedge status");
    browser
        .execute("window.__kept = 42; return 0", vec![])
        .await
        .unwrap();

    // The numbers /metrics has: requests (two GETs and the canary's one), the queue, the alert.
    let m = metrics(&edge.admin).await;
    let served: f64 = m
        .lines()
        .filter(|l| l.starts_with("fediedge_requests_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(text(&browser, "#requests-total").await, format!("{served}"));
    assert_eq!(
        text(&browser, "tr[data-status=\"404\"] td:nth-child(2)").await,
        "1"
    );
    assert_eq!(
        text(&browser, "tr[data-queue=\"default\"] td.size").await,
        "1"
    );
    let latency = value(
        &m,
        "fediedge_sidekiq_queue_latency_seconds{queue=\"default\"}",
    )
    .unwrap();
    let shown = text(&browser, "tr[data-queue=\"default\"] td.latency").await;
    let shown: f64 = shown.trim_end_matches(" s").parse().unwrap();
    assert!(
        (shown - latency).abs() < 5.0,
        "page {shown}, metrics {latency}"
    );
    assert_eq!(
        text(&browser, "#cache-objects").await,
        value(&m, "fediedge_cache_objects").unwrap().to_string()
    );
    let alert = text(&browser, &format!("li[data-alert=\"canary:{missing}\"]")).await;
    assert!(alert.contains("answered 404 Not Found"), "{alert}");
    assert_eq!(text(&browser, "#health").await, "1 active alert");

    // The edge's numbers change; the page follows without a reload.
    for _ in 0..4 {
        let r = client()
            .get(format!("{}a/b.png", edge.base))
            .send()
            .await
            .unwrap();
        r.bytes().await.unwrap();
    }
    f.push(Sidekiq::V8_1, "default", 1.0).await;
    f.push(Sidekiq::V8_1, "default", 1.0).await;
    wait_text(&browser, "#requests-total", &format!("{}", served + 4.0)).await;
    wait_text(&browser, "tr[data-queue=\"default\"] td.size", "3").await;
    // A migration moving, recorded in the ledger as `fediedge migrate` does (the edge's
    // publisher copies it into /metrics every 5 s), then done.
    let config = fediedge::config::from_str(&extra, std::path::Path::new("t.toml")).unwrap();
    let route = fediedge::migrate::Route {
        source: "old".into(),
        destination: config.primary.destination(),
    };
    let ledger = edge.running.ledger.clone();
    let r = route.clone();
    ledger
        .run(move |c| {
            use fediedge::migrate::state;
            state::begin(c, &r)?;
            let keys: Vec<_> = (0..10)
                .map(|i| (format!("m/{i}.png"), Some(100), None))
                .collect();
            state::add_listed(c, &r, &keys, None)?;
            state::listing_finished(c, &r)
        })
        .await
        .unwrap();
    let copy = |from: usize, to: usize| {
        let (ledger, r) = (ledger.clone(), route.clone());
        async move {
            ledger
                .run(move |c| {
                    for i in from..to {
                        let copy = fediedge::ledger::Copy {
                            key: format!("m/{i}.png"),
                            destination: r.destination.clone(),
                            size: 100,
                            md5: "0".repeat(32),
                            source: r.source.clone(),
                            via: "migrate".into(),
                            copied_at: fediedge::ledger::now(),
                        };
                        fediedge::migrate::state::mark_copied(c, &r.source, &copy)?;
                    }
                    Ok::<_, fediedge::ledger::LedgerError>(())
                })
                .await
                .unwrap()
        }
    };
    copy(0, 2).await;
    wait_text(&browser, "#migration-objects", "2 of 10").await;
    copy(2, 6).await;
    wait_text(&browser, "#migration-objects", "6 of 10").await;
    let eta = text(&browser, "#migration-eta").await;
    assert!(
        eta.ends_with('s') || eta.ends_with('m') || eta.ends_with('h'),
        "an ETA while moving: {eta:?}"
    );
    copy(6, 10).await;
    wait_text(&browser, "#migration-eta", "done").await;
    let kept = browser
        .execute("return window.__kept", vec![])
        .await
        .unwrap();
    assert_eq!(
        kept,
        Value::from(42),
        "the page was reloaded instead of updated"
    );

    // Fits a phone: nothing wider than the 412 px window.
    let widths = browser
        .execute(
            "return [document.documentElement.scrollWidth, window.innerWidth]",
            vec![],
        )
        .await
        .unwrap();
    let (scroll, inner) = (widths[0].as_i64().unwrap(), widths[1].as_i64().unwrap());
    assert!(
        scroll <= inner,
        "page {scroll} px wide in a {inner} px window"
    );

    // No console errors while loading and updating; the check itself sees one when there is.
    let messages = console(&browser).await;
    assert!(
        !messages
            .iter()
            .any(|m| m.starts_with("SEVERE") || m.starts_with("WARNING")),
        "{messages:?}"
    );
    browser
        .execute("console.error('seen by the check'); return 0", vec![])
        .await
        .unwrap();
    let messages = console(&browser).await;
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("SEVERE") && m.contains("seen by the check")),
        "{messages:?}"
    );

    // For the record: what Chromium showed, as text and as a picture.
    let shown = browser
        .execute("return document.body.innerText", vec![])
        .await
        .unwrap();
    println!(
        "--- the status page as Chromium rendered it ---\n{}",
        shown.as_str().unwrap()
    );
    let png = browser.screenshot().await.unwrap();
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    std::fs::write(&shot, png).unwrap();
    println!("screenshot: {}", shot.display());

    // The edge goes away: the page keeps its last view and says it is stale.
    let stopped = edge.running.shutdown().await;
    assert!(stopped.clean(), "{stopped:?}");
    let start = Instant::now();
    loop {
        let updated = text(&browser, "#updated").await;
        if updated.starts_with("stale: the edge does not answer") {
            assert!(updated.contains("as of "), "{updated}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{updated}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        text(&browser, "tr[data-queue=\"default\"] td.size").await,
        "3"
    );
    browser.close().await.unwrap();
}
