//! Review (session 7): `Idempotency-Key` when the first post's client goes away.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

use crate::common::{client, eventually};
use crate::proxy::{edge_with_core, CORE, WAIT};

/// Puma's place, as puma behaves: a request that arrived is worked on to its end whether or
/// not the connection it came on is still open (Rails does not abort a controller action
/// when the client leaves). Posts are numbered as they arrive; each waits for the gate.
async fn puma(
    created: Arc<AtomicUsize>,
    gate: tokio::sync::watch::Receiver<bool>,
) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (created, gate) = (created.clone(), gate.clone());
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (created, mut gate) = (created.clone(), gate.clone());
                        // The action runs on its own: the connection's end does not stop it.
                        let work = tokio::spawn(async move {
                            let _ = req.into_body().collect().await;
                            let n = created.fetch_add(1, Ordering::SeqCst) + 1;
                            let _ = gate.wait_for(|open| *open).await;
                            n
                        });
                        async move {
                            let n = work.await.unwrap();
                            http::Response::builder()
                                .status(201)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(format!("{{\"id\":\"{n}\"}}"))))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// A phone posts a status with `Idempotency-Key`; its network drops while core works on it;
/// the app sends the same post again with the same key (the case the header exists for).
/// The first post reached core and core creates it whatever the edge does with its
/// connection; the edge, seeing its client gone, drops its claim on the key (and its
/// connection to core), so the retry is sent to core as a new post: two statuses. The retry
/// should wait for the first post's answer and get it (`REPLAY`).
#[tokio::test]
async fn review_a_retry_after_the_first_posts_client_left_is_not_posted_twice() {
    let created = Arc::new(AtomicUsize::new(0));
    let gate = tokio::sync::watch::channel(false);
    let core = puma(created.clone(), gate.1.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[core], "").await;
    let post = || {
        client()
            .post(format!("http://{}/api/v1/statuses", edge.running.addr))
            .header("host", CORE)
            .header("authorization", "Bearer alice")
            .header("idempotency-key", "k1")
            .header("content-type", "application/json")
            .body("{\"status\":\"hello\"}")
            .send()
    };
    let first = tokio::spawn(post());
    eventually(WAIT, "the first post at core", || {
        created.load(Ordering::SeqCst) == 1
    })
    .await;
    first.abort();
    eventually(WAIT, "the edge saw its client leave", || {
        edge.running.open_connections() == 0
    })
    .await;
    let retry = tokio::spawn(post());
    // Core finishes what it has (the first post, and the retry if it was sent).
    gate.0.send_replace(true);
    let r = retry.await.unwrap().unwrap();
    let status = r.status().as_u16();
    let body = r.text().await.unwrap();
    assert_eq!(
        (status, body.as_str(), created.load(Ordering::SeqCst)),
        (201, "{\"id\":\"1\"}", 1),
        "the retry's answer, and the statuses core created"
    );
}
