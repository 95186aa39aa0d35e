//! Time from start to the first answered request with a large disk cache (issue 7 §5).
//!
//! Writes `EDGE_BENCH_OBJECTS` (default 1,000,000) small cached objects (body + `.meta`) into
//! a temp dir, or reuses `EDGE_BENCH_DIR` if it already holds them, drops the page cache when
//! it may (root), starts `fediedge serve` in-process and measures the time to the first
//! answered request (a HIT) and to the whole index loaded.
//!
//! `cargo bench --bench cache_start` (`EDGE_BENCH_OBJECTS=100000` for a quick run).

use std::path::Path;
use std::time::Instant;

#[path = "common/start.rs"]
mod start;

use md5::{Digest, Md5};

fn key(i: usize) -> String {
    format!(
        "media_attachments/files/{:03}/{:03}/{i}.png",
        i / 1000 % 1000,
        i % 1000
    )
}

/// Writes `n` cached objects of 16 bytes each under `cache/objects`.
fn populate(cache: &Path, n: usize) {
    let objects = cache.join("objects");
    for hh in 0..256 {
        std::fs::create_dir_all(objects.join(format!("{hh:02x}"))).unwrap();
    }
    let started = Instant::now();
    for i in 0..n {
        let k = key(i);
        let body = format!("{i:016}");
        let hash = hex::encode(Md5::digest(k.as_bytes()));
        let sub = objects.join(&hash[..2]);
        std::fs::write(sub.join(&hash), body.as_bytes()).unwrap();
        let meta = fediedge::cache::CachedMeta {
            key: k,
            size: body.len() as u64,
            md5: hex::encode(Md5::digest(body.as_bytes())),
            content_type: Some("image/png".into()),
            etag: None,
            last_modified: None,
            source: "primary".into(),
        };
        std::fs::write(
            sub.join(format!("{hash}.meta")),
            serde_json::to_vec(&meta).unwrap(),
        )
        .unwrap();
        if i % 100_000 == 99_999 {
            eprintln!("  {} objects written in {:?}", i + 1, started.elapsed());
        }
    }
}

fn main() {
    let setup = start::setup(
        "EDGE_BENCH_OBJECTS",
        "cache",
        "bench-objects",
        "cached objects",
        populate,
    );
    let (n, dir, cache) = (setup.n, &setup.dir, &setup.cache);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let text = format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n[primary]\ntype = \"fs\"\nroot = \"{}\"\n[cache]\ndir = \"{}\"\nmax_size = \"10GiB\"\n",
            dir.join("var").display(),
            dir.join("primary").display(),
            cache.display()
        );
        let config = fediedge::config::from_str(&text, Path::new("bench.toml")).unwrap();
        let started = Instant::now();
        let running = fediedge::serve::start(config).await.unwrap();
        let url = format!("http://{}/system/{}", running.addr, key(n / 2));
        let client = reqwest::Client::new();
        let r = client.get(&url).send().await.unwrap();
        let status = r.headers()["x-cache-status"].to_str().unwrap().to_owned();
        let body = r.bytes().await.unwrap();
        let first = started.elapsed();
        assert_eq!(status, "HIT");
        assert_eq!(body.as_ref(), format!("{:016}", n / 2).as_bytes());
        let cold = if setup.cold { "cold" } else { "warm" };
        println!(
            "cache_start: {n} objects, page cache {cold}: first answer (HIT) after {:.3} s",
            first.as_secs_f64()
        );
        let c = running.cache.clone().unwrap();
        c.loaded().await;
        println!(
            "cache_start: index loaded after {:.3} s ({} objects)",
            started.elapsed().as_secs_f64(),
            c.usage().1
        );
        running.shutdown().await;
    });
}
