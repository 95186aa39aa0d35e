//! The "cached API" measurement of the front-door benchmark (issue 9 §7): a cached anonymous
//! API response (about 10 KB of JSON, Mastodon's headers for `GET /api/v1/instance`) answered
//! by fediedge's core cache (`[core]` + `[core.cache]`), nginx `proxy_cache` and Varnish, all
//! in front of the same in-process upstream, in the same run.
//!
//! Each server is warmed until it answers from its cache (fediedge `X-Cache-Status: HIT`,
//! nginx `$upstream_cache_status` sent as `X-Cache-Status`, Varnish two ids in `X-Varnish`),
//! then measured with `wrk --latency` (plain HTTP, the same connections as the proxy test),
//! in rounds of alternating order. The ratio is fediedge against the better of nginx and
//! Varnish. The upstream counts its requests: a measurement that reached it is flagged.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::bail;
use bytes::Bytes;
use http_body_util::Full;

use super::{
    find_program, free_addr, loadavg, servers, ticks_per_sec, version, wrk_run, Figure, Server,
    Settings,
};

/// The target: fediedge ≥ 1.3× the better of nginx and Varnish (req/s).
const TARGET_API: f64 = 1.3;
const API_PATH: &str = "/api/v1/instance";
/// About the size of a real instance's `/api/v1/instance` answer.
const API_BODY: usize = 10 * 1024;
/// What Mastodon sends for `/api/v1/instance` (`cache_even_if_authenticated!`: max-age 300 and
/// the stale extensions; it clears `Vary`, see /work/shared/MASTODON.md).
const API_CACHE_CONTROL: &str =
    "public, max-age=300, stale-while-revalidate=30, stale-if-error=86400";

const NAMES: [&str; 3] = ["fediedge", "nginx", "varnish"];

/// The upstream: `GET /api/v1/instance` answers the JSON with Mastodon's headers; anything else
/// is a 404. It counts the requests it answers.
struct Upstream {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
}

impl Upstream {
    fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

async fn start_upstream() -> anyhow::Result<Upstream> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let body = Bytes::from(instance_json());
    let etag = format!("W/\"{:016x}\"", body.len() as u64 * 0x9E37_79B9);
    let requests = Arc::new(AtomicU64::new(0));
    let count = requests.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let _ = stream.set_nodelay(true);
            let (body, etag, count) = (body.clone(), etag.clone(), count.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: http::Request<_>| {
                    count.fetch_add(1, Ordering::Relaxed);
                    let b = http::Response::builder();
                    let resp = if req.uri().path() == API_PATH {
                        b.header("content-type", "application/json; charset=utf-8")
                            .header("cache-control", API_CACHE_CONTROL)
                            .header("etag", etag.as_str())
                            .header("x-content-type-options", "nosniff")
                            .header("x-frame-options", "DENY")
                            .header("referrer-policy", "same-origin")
                            .header("x-request-id", "bench")
                            .body(Full::new(body.clone()))
                    } else {
                        b.status(404).body(Full::new(Bytes::new()))
                    };
                    std::future::ready(Ok::<_, Infallible>(resp.expect("a response")))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(Upstream { addr, requests })
}

/// A `/api/v1/instance`-shaped JSON document of `API_BODY` bytes.
fn instance_json() -> String {
    let head = r#"{"uri":"bench.example","title":"Bench","short_description":"","description":"An instance for the benchmark","email":"admin@bench.example","version":"4.3.0","urls":{"streaming_api":"wss://bench.example"},"stats":{"user_count":1000,"status_count":100000,"domain_count":5000},"languages":["en"],"registrations":false,"approval_required":false,"invites_enabled":true,"configuration":{"statuses":{"max_characters":500,"max_media_attachments":4}},"rules":["#;
    let mut s = String::from(head);
    for i in 0.. {
        let rule = format!(
            r#"{}{{"id":"{i}","text":"Rule {i}: be kind to each other and to the moderators."}}"#,
            if i > 0 { "," } else { "" }
        );
        // Room for the rule, then `]}`.
        if s.len() + rule.len() + 2 > API_BODY {
            break;
        }
        s.push_str(&rule);
    }
    s.push(']');
    // Pad with JSON whitespace to the exact size.
    s.push_str(&" ".repeat(API_BODY - 1 - s.len()));
    s.push('}');
    s
}

/// Runs the measurement; `true` when the target is met (or not strict).
pub(super) async fn run(settings: &Settings, dir: &Path) -> anyhow::Result<bool> {
    let wrk = find_program("WRK_BIN", "wrk")?;
    let upstream = start_upstream().await?;
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut servers = [
        start_fediedge(&dir.join("api-fediedge"), upstream.addr)?,
        start_nginx(&dir.join("api-nginx"), upstream.addr, cores)?,
        start_varnish(
            &dir.join("api-varnish"),
            upstream.addr,
            settings.accept_encoding.is_some(),
        )?,
    ];
    for s in &mut servers {
        s.wait_ready().await?;
    }
    for s in &servers {
        warm(s, &upstream).await?;
    }

    println!("cached API (issue 9 §7): GET {API_PATH}, {API_BODY} B JSON, {API_CACHE_CONTROL}");
    println!("load average {}", loadavg());
    for s in &servers {
        println!("{}: {}", s.name, s.version);
    }
    println!("wrk: {}", version(&wrk, "-v"));
    println!();

    let mut results: [Vec<Figure>; 3] = Default::default();
    let mut upstream_hits = 0;
    for round in 0..settings.rounds {
        for k in 0..3 {
            // Rotate which server goes first.
            let i = (k + round) % 3;
            let server = &servers[i];
            let (before, seen) = (server.cpu_ticks(), upstream.requests());
            let ae = settings.accept_encoding.as_deref();
            let mut f = wrk_run(&wrk, server.plain, settings.secs, settings.threads, ae).await?;
            let ticks = server.cpu_ticks().saturating_sub(before);
            let reached = upstream.requests() - seen;
            upstream_hits += reached;
            let requests = f.rps * settings.secs as f64;
            if requests > 0.0 {
                f.cpu_us_per_req = ticks as f64 * 1e6 / ticks_per_sec() / requests;
            }
            println!(
                "round {} {:<34} {:<9} {:>12.1}  p99 {:.2} ms  errors {}  CPU {:.1} µs/req  upstream requests {reached}",
                round + 1,
                "cached API (req/s)",
                server.name,
                f.rps,
                f.p99.unwrap_or_default().as_secs_f64() * 1e3,
                f.errors,
                f.cpu_us_per_req,
            );
            results[i].push(f);
        }
    }
    Ok(report(&results, upstream_hits, settings.strict))
}

fn report(results: &[Vec<Figure>; 3], upstream_hits: u64, strict: bool) -> bool {
    let best = |runs: &[Figure]| {
        runs.iter()
            .max_by(|a, b| a.rps.total_cmp(&b.rps))
            .cloned()
            .unwrap_or_default()
    };
    let median = |runs: &[Figure]| {
        let mut v: Vec<f64> = runs.iter().map(|f| f.rps).collect();
        v.sort_by(f64::total_cmp);
        match v.len() {
            0 => 0.0,
            n if n % 2 == 0 => (v[n / 2 - 1] + v[n / 2]) / 2.0,
            n => v[n / 2],
        }
    };
    let bests: Vec<Figure> = results.iter().map(|r| best(r)).collect();
    // The better of nginx and Varnish, by best-round req/s.
    let other = if bests[1].rps >= bests[2].rps { 1 } else { 2 };
    let ratio = bests[0].rps / bests[other].rps.max(f64::MIN_POSITIVE);
    let ratio_median = median(&results[0]) / median(&results[other]).max(f64::MIN_POSITIVE);
    let errors: u64 = bests.iter().map(|f| f.errors).sum();
    let met = ratio >= TARGET_API && errors == 0;
    println!();
    println!("| server | best req/s | p99 (best round) | CPU µs/req | median req/s |");
    println!("|---|---:|---:|---:|---:|");
    for (i, f) in bests.iter().enumerate() {
        println!(
            "| {} | {:.1} | {:.2} ms | {:.1} | {:.1} |",
            NAMES[i],
            f.rps,
            f.p99.unwrap_or_default().as_secs_f64() * 1e3,
            f.cpu_us_per_req,
            median(&results[i])
        );
    }
    println!();
    println!(
        "cached API: fediedge / {} = {ratio:.2}× best, {ratio_median:.2}× median; target ≥ {TARGET_API:.1}×: {}{}",
        NAMES[other],
        if met { "met" } else { "missed" },
        if errors > 0 { format!(" ({errors} errors)") } else { String::new() }
    );
    // What each hit costs the server itself, whatever the client's share of the cores.
    let cpu = |runs: &[Figure]| {
        let mut v: Vec<f64> = runs.iter().map(|f| f.cpu_us_per_req).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    println!(
        "CPU per hit (median round), {} ÷ fediedge: {:.2}×",
        NAMES[other],
        cpu(&results[other]) / cpu(&results[0]).max(f64::MIN_POSITIVE)
    );
    if upstream_hits > 0 {
        // max-age is 300 s: a long run may revalidate; anything else means a server did not
        // answer from its cache.
        println!("note: {upstream_hits} requests reached the upstream during the measurements");
    }
    met || !strict
}

/// GETs the API path until the server answers from its cache, then checks that one more
/// request does not reach the upstream.
async fn warm(server: &Server, upstream: &Upstream) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let url = format!("http://{}{API_PATH}", server.plain);
    for _ in 0..20 {
        let seen = upstream.requests();
        let r = client.get(&url).send().await?;
        let status = r.status();
        let hit = match server.name {
            "varnish" => r
                .headers()
                .get("x-varnish")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.split_whitespace().count() == 2),
            _ => r
                .headers()
                .get("x-cache-status")
                .is_some_and(|v| v == "HIT"),
        };
        let body = r.bytes().await?;
        if status != 200 || body.len() != API_BODY {
            bail!(
                "{}: {API_PATH} answered {status} with {} bytes",
                server.name,
                body.len()
            );
        }
        if hit && upstream.requests() == seen {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    bail!("{}: {API_PATH} never answered from its cache", server.name)
}

// The servers. Each has one plain listener (`Server::tls` is the same address, for
// `wait_ready`).

fn start_fediedge(dir: &Path, upstream: SocketAddr) -> anyhow::Result<Server> {
    let bin = std::env::var("FEDIEDGE_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::PathBuf::from(env!("CARGO_BIN_EXE_fediedge")));
    let media = dir.join("media");
    std::fs::create_dir_all(&media)?;
    let (plain, admin) = (free_addr()?, free_addr()?);
    let config = format!(
        r#"listen = "{plain}"
admin_listen = "{admin}"
url_prefix = "/system/"
data_dir = "{var}"

[cache]
dir = "{cache}"
max_size = "1GiB"

[primary]
type = "fs"
root = "{media}"

[core]
hosts = ["127.0.0.1"]
web = ["{upstream}"]
health_check_interval = "0s"

[core.cache]
dir = "{core_cache}"
max_size = "1GiB"
"#,
        var = dir.join("var").display(),
        cache = dir.join("cache").display(),
        media = media.display(),
        core_cache = dir.join("core-cache").display(),
    );
    let proc = servers::start_fediedge(&bin, dir, &config)?;
    Ok(Server {
        name: "fediedge",
        version: format!("{}, [core.cache]", bin.display()),
        tls: plain,
        plain,
        proc,
    })
}

/// nginx with Mastodon's `proxy_cache` setup (dist/nginx.conf: `proxy_cache_path … levels=1:2
/// keys_zone=CACHE:10m inactive=7d max_size=1g`, `proxy_cache_valid 200 7d` only for answers
/// without caching headers, `proxy_cache_use_stale … updating …`), plus `proxy_cache_lock` and
/// `proxy_cache_background_update`; upstream keep-alive as in the proxy test.
fn start_nginx(dir: &Path, upstream: SocketAddr, workers: usize) -> anyhow::Result<Server> {
    let bin = find_program("NGINX_BIN", "nginx")?;
    for d in ["tmp", "logs", "cache"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let plain = free_addr()?;
    // As the proxy test: fediedge's `max_idle_per_upstream` default (256) in all.
    let keepalive = (256 / workers).max(1);
    let config = format!(
        r#"{head}  proxy_cache_path {d}/cache levels=1:2 keys_zone=CACHE:10m inactive=7d max_size=1g;
  upstream core {{
    server {upstream};
    keepalive {keepalive};
  }}
  server {{
    listen {plain} backlog=4096;
    location / {{
{MASTODON_PROXY}{MASTODON_GZIP}      proxy_cache CACHE;
      proxy_cache_valid 200 7d;
      proxy_cache_valid 410 24h;
      proxy_cache_use_stale error timeout updating http_500 http_502 http_503 http_504;
      proxy_cache_lock on;
      proxy_cache_background_update on;
      add_header X-Cache-Status $upstream_cache_status;
      proxy_pass http://core;
    }}
  }}
}}
"#,
        head = servers::nginx_config_head(dir, workers),
        d = dir.display(),
        MASTODON_PROXY = servers::MASTODON_PROXY,
        MASTODON_GZIP = servers::MASTODON_GZIP,
    );
    let proc = servers::start_nginx(&bin, dir, &config)?;
    Ok(Server {
        name: "nginx",
        version: format!("{}, {workers} workers, proxy_cache", version(&bin, "-v")),
        tls: plain,
        plain,
        proc,
    })
}

/// Varnish with the built-in VCL (only a backend is declared): it honours `Cache-Control`
/// (`max-age`, `stale-while-revalidate` as grace) and passes requests with `Authorization` or
/// `Cookie`, as a plain Varnish in front of Mastodon would. `gzip` (the clients take gzip):
/// `beresp.do_gzip`, so that it stores the answer compressed and hands that to them, as the
/// other two compress for them.
fn start_varnish(dir: &Path, upstream: SocketAddr, gzip: bool) -> anyhow::Result<Server> {
    let bin = find_program("VARNISHD_BIN", "varnishd")?;
    let plain = free_addr()?;
    let mut vcl = format!(
        "vcl 4.1;\n\nbackend core {{\n  .host = \"{}\";\n  .port = \"{}\";\n}}\n",
        upstream.ip(),
        upstream.port()
    );
    if gzip {
        vcl.push_str("\nsub vcl_backend_response {\n  set beresp.do_gzip = true;\n}\n");
    }
    let proc = servers::start_varnishd(&bin, dir, plain, &vcl)?;
    Ok(Server {
        name: "varnish",
        version: version(&bin, "-V"),
        tls: plain,
        plain,
        proc,
    })
}
