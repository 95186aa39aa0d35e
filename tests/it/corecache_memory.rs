//! The core cache's fills within `max_flight_memory` (shared with media fetches): a response
//! with no room in memory now is passed to its client whole and not stored, one with room is
//! stored, and the room comes back once a fill is done.

use std::time::{Duration, Instant};

use crate::common::{client, start_edge, TestEdge};
use crate::corecache::{reply, Core, Reply};
use crate::proxy::CORE;

const BUDGET_KIB: usize = 64;

async fn edge(dir: &std::path::Path, core: &Core) -> TestEdge {
    let root = dir.join("primary");
    std::fs::create_dir_all(&root).unwrap();
    let toml = format!(
        "max_flight_memory = \"{BUDGET_KIB}KiB\"\n\
         [primary]\ntype = \"fs\"\nroot = \"{}\"\n\
         [core]\nhosts = [\"{CORE}\"]\nweb = [\"{}\"]\nhealth_check_interval = \"0s\"\n\
         [core.cache]\ndir = \"{}\"\nmax_size = \"16MiB\"\n",
        root.display(),
        core.addr(),
        dir.join("core-cache").display()
    );
    start_edge(dir, &toml).await
}

/// `(status, X-Cache-Status, body)` of a GET as the instance's host.
async fn fetch(edge: &TestEdge, path: &str) -> (u16, String, String) {
    let resp = client()
        .get(format!("http://{}{path}", edge.running.addr))
        .header("host", CORE)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let cache = resp
        .headers()
        .get("x-cache-status")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, cache, resp.text().await.unwrap())
}

fn cacheable(body: &str) -> Reply {
    let headers = [
        ("content-type", "application/json"),
        ("cache-control", "public, max-age=300"),
    ];
    reply(200, &headers, body)
}

/// `n` bytes of JSON-ish text, different for each `seed`.
fn text(n: usize, seed: u8) -> String {
    (0..n)
        .map(|i| (b'a' + ((i * 7 + seed as usize) % 26) as u8) as char)
        .collect()
}

#[tokio::test]
async fn a_response_without_room_in_memory_is_passed_on_whole_and_the_room_comes_back() {
    let big = text(200_000, 1); // over the whole budget
    let fits = text((BUDGET_KIB - 4) * 1024, 2); // fits only if no room is held
    let small = text(10_000, 3);
    let core = {
        let (big, fits, small) = (big.clone(), fits.clone(), small.clone());
        Core::start(move |seen, _| match seen.path.as_str() {
            "/api/v1/big" => cacheable(&big),
            "/api/v1/fits" => cacheable(&fits),
            _ => cacheable(&small),
        })
        .await
    };
    let dir = tempfile::tempdir().unwrap();
    let edge = edge(dir.path(), &core).await;

    // No room: every client still gets the exact bytes; nothing is stored.
    for _ in 0..3 {
        let (status, cache, got) = fetch(&edge, "/api/v1/big").await;
        assert_eq!((status, cache.as_str()), (200, "MISS"));
        assert!(got == big, "bytes differ from core's");
    }
    assert_eq!(
        core.count("/api/v1/big"),
        3,
        "a body with no room is not stored"
    );

    // Room: stored, then a hit.
    let (status, cache, got) = fetch(&edge, "/api/v1/small").await;
    assert_eq!((status, cache.as_str(), got == small), (200, "MISS", true));
    let (status, cache, got) = fetch(&edge, "/api/v1/small").await;
    assert_eq!((status, cache.as_str(), got == small), (200, "HIT", true));
    assert_eq!(core.count("/api/v1/small"), 1);

    // Every fill above gave its room back: a body needing nearly the whole budget is stored
    // (asked again until it is, as a fill may still be finishing; with a leak it never is).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, cache, got) = fetch(&edge, "/api/v1/fits").await;
        assert_eq!(status, 200);
        assert!(got == fits, "bytes differ from core's");
        if cache == "HIT" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the near-budget body was never stored"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
