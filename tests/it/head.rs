//! Answers to HEAD made by the edge itself (the router's 421, the proxy's 502/503/504, the
//! media handler's 404) have no body over HTTP/2 either. hyper's HTTP/1.1 server drops a
//! HEAD's body; its HTTP/2 server sent it as DATA frames and the client's h2 reset the
//! stream (PROTOCOL_ERROR, RFC 9113 §8.1.1) until the listener answered every HEAD without
//! one (found in the review of session 7).

use crate::proxy::{edge_with_core, CORE};

/// A HEAD over h2; the result of reading its (empty) body.
async fn head_body(c: &reqwest::Client, url: &str) -> (u16, Result<bytes::Bytes, reqwest::Error>) {
    let r = c.head(url).send().await.unwrap();
    assert_eq!(r.version(), http::Version::HTTP_2);
    (r.status().as_u16(), r.bytes().await)
}

#[tokio::test]
async fn head_of_a_misdirected_name_has_no_body_over_h2() {
    let dir = tempfile::tempdir().unwrap();
    let (root, table) = crate::proxy_tls::tls(dir.path(), &[CORE, "other.test"]);
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let core = dead.local_addr().unwrap();
    drop(dead);
    let edge = edge_with_core(dir.path(), &[core], &table).await;
    let addr = edge.running.https_addr.expect("a TLS listener");
    let c = crate::proxy_tls::client(&root, addr, false);
    let (status, body) = head_body(&c, &format!("https://other.test:{}/", addr.port())).await;
    assert_eq!(status, 421);
    assert!(
        matches!(&body, Ok(b) if b.is_empty()),
        "a HEAD's answer has no body: {body:?}"
    );
}

#[tokio::test]
async fn head_to_core_when_core_is_down_has_no_body_over_h2() {
    let dir = tempfile::tempdir().unwrap();
    let (root, table) = crate::proxy_tls::tls(dir.path(), &[CORE]);
    // Nothing listens there: the connect is refused, the proxy answers 502 itself.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let core = dead.local_addr().unwrap();
    drop(dead);
    let edge = edge_with_core(dir.path(), &[core], &table).await;
    let addr = edge.running.https_addr.expect("a TLS listener");
    let c = crate::proxy_tls::client(&root, addr, false);
    let (status, body) = head_body(
        &c,
        &format!("https://{CORE}:{}/api/v1/instance", addr.port()),
    )
    .await;
    assert_eq!(status, 502);
    assert!(
        matches!(&body, Ok(b) if b.is_empty()),
        "a HEAD's answer has no body: {body:?}"
    );
}

/// The media handler's own 404 (a key found nowhere) to a HEAD: no body either.
#[tokio::test]
async fn head_of_missing_media_has_no_body_over_h2() {
    let dir = tempfile::tempdir().unwrap();
    let (root, table) = crate::proxy_tls::tls(dir.path(), &[CORE, "files.test"]);
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let core = dead.local_addr().unwrap();
    drop(dead);
    let edge = edge_with_core(dir.path(), &[core], &table).await;
    let addr = edge.running.https_addr.expect("a TLS listener");
    let c = crate::proxy_tls::client(&root, addr, false);
    let (status, body) = head_body(
        &c,
        &format!("https://files.test:{}/nothing.png", addr.port()),
    )
    .await;
    assert_eq!(status, 404);
    assert!(
        matches!(&body, Ok(b) if b.is_empty()),
        "a HEAD's answer has no body: {body:?}"
    );
}
