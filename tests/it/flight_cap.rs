//! The bounds on fetches (issue 7 §5): past `max_flights` or `max_flight_temp_bytes` a new
//! fetch queues for `flight_queue_wait`, then is answered 503 with `Retry-After`; one that
//! gets room while it queues runs. Events only: the origin holds bodies behind a gate and the
//! tests wait on `fediedge_flights_waiting`; the length of the wait itself is checked on
//! tokio's paused clock (the `flight::body` unit tests).

use std::time::Duration;

use tokio::sync::watch;

use crate::common::origin::{Behaviour, Origin};
use crate::common::{bytes, client, eventually, start_edge, TestEdge};
use crate::disk::{files_under, metric_count, stores};

/// Each limit, with the keys whose held fetches fill it.
const LIMITS: [(&str, &[(&str, usize)]); 2] = [
    ("max_flights = 2", &[("h1.png", 50_000), ("h2.png", 50_000)]),
    ("max_flight_temp_bytes = \"100KiB\"", &[("h1.png", 80_000)]),
];

/// An edge whose `limit` is filled by fetches the origin holds after their first 1000 bytes.
struct AtTheCap {
    edge: TestEdge,
    origin: Origin,
    release: watch::Sender<bool>,
    holders: Vec<tokio::task::JoinHandle<(String, Vec<u8>)>>,
    dir: tempfile::TempDir,
}

async fn at_the_cap(limit: &str, queue_wait: &str, held: &[(&'static str, usize)]) -> AtTheCap {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    let (release, gate) = watch::channel(false);
    for (i, &(k, n)) in held.iter().enumerate() {
        let behaviour = Behaviour {
            pause_after: Some(1000),
            gate: Some(gate.clone()),
            ..Behaviour::default()
        };
        origin.put_with(k, bytes(n, i as u8), behaviour);
    }
    origin.put("next.png", bytes(80_000, 9));
    let config = format!(
        "{limit}\nflight_queue_wait = \"{queue_wait}\"\n{}",
        stores(dir.path(), &origin, "")
    );
    let edge = start_edge(dir.path(), &config).await;
    let holders = held
        .iter()
        .map(|&(k, _)| {
            let url = format!("{}{k}", edge.base);
            tokio::spawn(async move {
                let r = client().get(url).send().await.unwrap();
                (
                    k.to_owned(),
                    r.bytes().await.expect("a whole body").to_vec(),
                )
            })
        })
        .collect();
    eventually(
        Duration::from_secs(30),
        "every held fetch at the origin",
        || held.iter().all(|&(k, _)| origin.gets(k) == 1),
    )
    .await;
    AtTheCap {
        edge,
        origin,
        release,
        holders,
        dir,
    }
}

impl AtTheCap {
    /// Opens the origin's gate: the held fetches end whole, and the edge stops cleanly.
    async fn finish(self, held: &[(&'static str, usize)]) {
        self.release.send(true).unwrap();
        for (h, (i, &(k, n))) in self.holders.into_iter().zip(held.iter().enumerate()) {
            assert!(h.await.unwrap() == (k.to_owned(), bytes(n, i as u8)));
        }
        assert!(self.edge.running.shutdown().await.clean());
    }
}

#[tokio::test]
async fn past_either_limit_a_new_fetch_queues_then_gets_503_with_retry_after() {
    for (limit, held) in LIMITS {
        let cap = at_the_cap(limit, "50ms", held).await;
        let r = client()
            .get(format!("{}next.png", cap.edge.base))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "{limit}");
        assert_eq!(r.headers()["retry-after"], "2");
        assert_eq!(r.headers()["x-cache-status"], "BUSY");
        let edge = &cap.edge;
        assert_eq!(
            metric_count(edge, "fediedge_flight_waits_total"),
            1,
            "{limit}: queued"
        );
        assert_eq!(metric_count(edge, "fediedge_overloaded_requests_total"), 1);
        assert_eq!(metric_count(edge, "fediedge_flights_waiting"), 0);
        if limit.starts_with("max_flights") {
            assert_eq!(
                cap.origin.gets("next.png"),
                0,
                "nothing fetched past the cap"
            );
        } else {
            // The disk does not grow: only the held body has a temp file.
            let tmp = files_under(&cap.dir.path().join("cache/tmp"));
            assert_eq!(tmp.len(), 1, "{tmp:?}");
        }
        cap.finish(held).await;
    }
}

#[tokio::test]
async fn past_either_limit_a_queued_fetch_runs_when_room_frees() {
    for (limit, held) in LIMITS {
        // A bound for failure only: the fetch must run when room frees, not when this ends.
        let cap = at_the_cap(limit, "10min", held).await;
        let next = tokio::spawn({
            let url = format!("{}next.png", cap.edge.base);
            async move {
                let r = client().get(url).send().await.unwrap();
                (r.status().as_u16(), r.bytes().await.expect("a whole body"))
            }
        });
        eventually(Duration::from_secs(30), "the new fetch queued", || {
            metric_count(&cap.edge, "fediedge_flights_waiting") == 1
        })
        .await;
        let tmp = files_under(&cap.dir.path().join("cache/tmp"));
        assert_eq!(
            tmp.len(),
            held.len(),
            "{limit}: no temp file for the queued fetch"
        );
        let (edge, origin) = (&cap.edge, &cap.origin);
        if limit.starts_with("max_flights") {
            assert_eq!(origin.gets("next.png"), 0, "nothing fetched while queued");
        }
        cap.release.send(true).unwrap();
        let (status, got) = next.await.unwrap();
        assert_eq!(status, 200, "{limit}");
        assert!(
            got.as_ref() == bytes(80_000, 9),
            "bytes differ from the source's"
        );
        assert_eq!(metric_count(edge, "fediedge_flight_waits_total"), 1);
        assert_eq!(metric_count(edge, "fediedge_overloaded_requests_total"), 0);
        assert_eq!(metric_count(edge, "fediedge_flights_waiting"), 0);
        cap.finish(held).await;
    }
}
