//! Time from start to the first answered core request with a large core cache (`[core.cache]`),
//! the core cache's sibling of `cache_start.rs` (issue 7 §5's precedent, for issue 9's cache).
//!
//! Writes `EDGE_BENCH_ENTRIES` (default 1,000,000) stored core responses of about 200 bytes
//! (a `.body` and its `.meta` each, through `fediedge::corecache::seed`) into a temp dir, or
//! reuses `EDGE_BENCH_DIR` if it already holds them, drops the page cache when it may
//! (root), starts `fediedge serve` in-process and times the first answered request (a HIT on
//! the entry in the middle) and the whole index loaded. Core itself is a closed port: every
//! answer timed here comes from the cache.
//!
//! `cargo bench --bench core_cache_start` (`EDGE_BENCH_ENTRIES=100000` for a quick run).

use std::path::Path;
use std::time::Instant;

#[path = "common/start.rs"]
mod start;

const HOST: &str = "example.test";

fn path(i: usize) -> String {
    format!("/api/v1/statuses/{}", 100_000_000_000_000_000u64 + i as u64)
}

fn body(i: usize) -> Vec<u8> {
    format!("{{\"id\":\"{i}\",\"content\":\"{}\"}}", "x".repeat(160)).into_bytes()
}

/// Writes `n` stored responses under `dir`.
fn populate(dir: &Path, n: usize) {
    let mut headers = http::HeaderMap::new();
    headers.insert("cache-control", "public, max-age=31536000".parse().unwrap());
    headers.insert("content-type", "application/json".parse().unwrap());
    let started = Instant::now();
    let mut written = 0;
    while written < n {
        let chunk = (written..n.min(written + 100_000)).map(|i| (path(i), body(i)));
        written += fediedge::corecache::seed(dir, HOST, &headers, chunk).unwrap();
        eprintln!("  {written} entries written in {:?}", started.elapsed());
    }
}

fn main() {
    let setup = start::setup(
        "EDGE_BENCH_ENTRIES",
        "core-cache",
        "bench-entries",
        "stored core responses",
        populate,
    );
    let (n, dir, cache) = (setup.n, &setup.dir, &setup.cache);
    // A port nothing listens on: core is never asked (health checks off).
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let core = closed.local_addr().unwrap();
    drop(closed);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let text = format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\nmedia_hosts = [\"files.test\"]\n[primary]\ntype = \"fs\"\nroot = \"{}\"\n[core]\nhosts = [\"{HOST}\"]\nweb = [\"{core}\"]\nhealth_check_interval = \"0s\"\n[core.cache]\ndir = \"{}\"\nmax_size = \"10GiB\"\n",
            dir.join("var").display(),
            dir.join("primary").display(),
            cache.display()
        );
        let config = fediedge::config::from_str(&text, Path::new("bench.toml")).unwrap();
        let started = Instant::now();
        let running = fediedge::serve::start(config).await.unwrap();
        let url = format!("http://{}{}", running.addr, path(n / 2));
        let r = reqwest::Client::new()
            .get(&url)
            .header("host", HOST)
            .send()
            .await
            .unwrap();
        let status = r.headers()["x-cache-status"].to_str().unwrap().to_owned();
        let got = r.bytes().await.unwrap();
        let first = started.elapsed();
        assert_eq!(status, "HIT");
        assert_eq!(got.as_ref(), body(n / 2).as_slice());
        let cold = if setup.cold { "cold" } else { "warm" };
        println!(
            "core_cache_start: {n} entries, page cache {cold}: first answer (HIT) after {:.3} s",
            first.as_secs_f64()
        );
        let c = running.core_cache.clone().unwrap();
        c.loaded().await;
        println!(
            "core_cache_start: index loaded after {:.3} s ({} entries)",
            started.elapsed().as_secs_f64(),
            c.usage().1
        );
        running.shutdown().await;
    });
}
