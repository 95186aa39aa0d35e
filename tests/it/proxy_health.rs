//! Active health checks (issue 8 §4), the per-upstream series on `/metrics`, and the idle
//! timeout inside a response body; timeouts opening the breaker; keep-alive to core.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::client;
use crate::proxy::{edge_with_core, get, Mode, Upstream, CORE, WAIT};

#[tokio::test]
async fn a_failing_health_check_takes_an_upstream_out_until_it_passes() {
    let a = Upstream::start(Mode::Answer).await;
    let b = Upstream::start(Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(
        dir.path(),
        &[a.addr, b.addr],
        "health_check_interval = \"20ms\"\n",
    )
    .await;
    let metric = |up: &Upstream, name: &str| {
        format!("fediedge_{name}{{pool=\"web\",upstream=\"{}\"}}", up.addr)
    };
    let scrape = || async {
        client()
            .get(format!("{}/metrics", edge.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    a.state.health_fails.store(true, Ordering::SeqCst);
    let down = format!("{} 0", metric(&a, "upstream_up"));
    let start = std::time::Instant::now();
    while !scrape().await.contains(&down) {
        assert!(start.elapsed() < WAIT, "a never marked down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for _ in 0..4 {
        let r = get(&edge, CORE, "/api/v1/instance").send().await.unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(
        (a.requests(), b.requests()),
        (0, 4),
        "all to the healthy one"
    );
    assert!(a.state.health_checks.load(Ordering::SeqCst) > 0);
    let text = scrape().await;
    assert!(
        text.contains(&format!("{} 4", metric(&b, "upstream_requests_total"))),
        "{text}"
    );
    assert!(
        text.contains(&format!("{} 0", metric(&b, "upstream_breaker_state"))),
        "{text}"
    );

    a.state.health_fails.store(false, Ordering::SeqCst);
    let up = format!("{} 1", metric(&a, "upstream_up"));
    while !scrape().await.contains(&up) {
        assert!(start.elapsed() < WAIT, "a never marked up again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Both idle again: the first in order gets the next request.
    let r = get(&edge, CORE, "/api/v1/instance").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(a.requests(), 1, "back in the pool");
}

#[tokio::test]
async fn a_response_body_that_goes_silent_is_cut_at_the_idle_timeout() {
    let up = Upstream::start(Mode::Stall).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[up.addr], "idle_timeout = \"200ms\"\n").await;
    let mut r = get(&edge, CORE, "/api/v1/timelines/home")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.chunk().await.unwrap().unwrap(), "partial");
    assert!(
        r.chunk().await.is_err(),
        "the response is cut, not ended as if whole"
    );
    // The permit went with the body: the upstream is free again.
    let free = format!(
        "fediedge_upstream_in_flight{{pool=\"web\",upstream=\"{}\"}} 0",
        up.addr
    );
    let start = std::time::Instant::now();
    loop {
        let text = client()
            .get(format!("{}/metrics", edge.admin))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains(&free) {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "the permit was never given back: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn timeouts_open_the_breaker_too() {
    let up = Upstream::start(Mode::Hang).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(
        dir.path(),
        &[up.addr],
        "first_byte_timeout = \"500ms\"\nbreaker_failures = 2\nbreaker_cooldown = \"1h\"\n",
    )
    .await;
    for n in 1..=2 {
        let r = get(&edge, CORE, "/api/v1/timelines/home")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 504);
        crate::common::eventually(WAIT, "the request reached core", || up.requests() == n).await;
    }
    let r = get(&edge, CORE, "/api/v1/timelines/home")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        503,
        "answered at once, not after another timeout"
    );
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(up.requests(), 2, "the hung upstream was not asked again");
}

#[tokio::test]
async fn connections_to_core_are_kept_alive_and_reused() {
    let up = Upstream::start(Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[up.addr], "").await;
    for _ in 0..10 {
        let r = get(&edge, CORE, "/api/v1/instance").send().await.unwrap();
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    assert_eq!(up.requests(), 10);
    // Each connection goes back to the pool when its response has ended; a request may
    // come a moment before that and open another, but not one per request.
    assert!(
        up.accepts() <= 5,
        "{} connections for 10 requests",
        up.accepts()
    );
}
