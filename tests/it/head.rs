//! Answers to HEAD made by the edge itself (the router's 421, the proxy's 502/503/504, the
//! media handler's 404) have no body over HTTP/2 either. hyper's HTTP/1.1 server drops a
//! HEAD's body; its HTTP/2 server sent it as DATA frames and the client's h2 reset the
//! stream (PROTOCOL_ERROR, RFC 9113 §8.1.1) until the listener answered every HEAD without
//! one (found in the review of session 7).

use crate::proxy::{edge_with_core, CORE};

/// An edge whose TLS listener serves `names`, in front of a core that refuses every
/// connection; a HEAD of `host` and `path` over h2: its status, after checking that its
/// answer has no body.
async fn head_over_h2(names: &[&str], host: &str, path: &str) -> u16 {
    let dir = tempfile::tempdir().unwrap();
    let (root, table) = crate::proxy_tls::tls(dir.path(), names);
    // Nothing listens there: the connect is refused, the proxy answers 502 itself.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let core = dead.local_addr().unwrap();
    drop(dead);
    let edge = edge_with_core(dir.path(), &[core], &table).await;
    let addr = edge.running.https_addr.expect("a TLS listener");
    let c = crate::proxy_tls::client(&root, addr, false);
    let r = c
        .head(format!("https://{host}:{}{path}", addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    let status = r.status().as_u16();
    let body = r.bytes().await;
    assert!(
        matches!(&body, Ok(b) if b.is_empty()),
        "a HEAD's answer has no body: {body:?}"
    );
    status
}

#[tokio::test]
async fn head_of_a_misdirected_name_has_no_body_over_h2() {
    assert_eq!(
        head_over_h2(&[CORE, "other.test"], "other.test", "/").await,
        421
    );
}

#[tokio::test]
async fn head_to_core_when_core_is_down_has_no_body_over_h2() {
    assert_eq!(head_over_h2(&[CORE], CORE, "/api/v1/instance").await, 502);
}

/// The media handler's own 404 (a key found nowhere) to a HEAD: no body either.
#[tokio::test]
async fn head_of_missing_media_has_no_body_over_h2() {
    let names = [CORE, "files.test"];
    assert_eq!(
        head_over_h2(&names, "files.test", "/nothing.png").await,
        404
    );
}
