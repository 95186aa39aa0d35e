//! The start of a request body is read before an upstream is chosen (src/proxy/prebuffer.rs):
//! a slow client holds none of the upstream's connection cap, a body read whole goes to
//! another upstream when the first refuses the connection, and a silent client gets 408.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::proxy::{edge_with_core, get, Mode, Upstream, CORE, WAIT};
use crate::common::{client, TestEdge};

fn post(edge: &TestEdge, body: Vec<u8>) -> reqwest::RequestBuilder {
    client()
        .post(format!("http://{}/api/v1/statuses", edge.running.addr))
        .header("host", CORE)
        .body(body)
}

/// Reads from `stream` until `got` holds a whole response head, and returns it.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut piece = [0u8; 1024];
        let n = tokio::time::timeout(WAIT, stream.read(&mut piece))
            .await
            .expect("an answer within the wait")
            .unwrap();
        assert!(n > 0, "the edge closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&piece[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn a_client_sending_its_body_slowly_holds_no_upstream_slot() {
    let up = Upstream::start(Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    // One request at a time to the only upstream.
    let edge = edge_with_core(dir.path(), &[up.addr], "max_connections_per_upstream = 1\n").await;
    let mut slow = TcpStream::connect(edge.running.addr).await.unwrap();
    let head = format!(
        "POST /api/v1/statuses HTTP/1.1\r\nhost: {CORE}\r\ncontent-length: 10\r\nexpect: 100-continue\r\n\r\n"
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    // The edge asks for the body (hyper's `100 Continue` when the body is first read): it
    // is reading it now, before any upstream was picked.
    let interim = read_head(&mut slow).await;
    assert!(interim.starts_with("HTTP/1.1 100"), "{interim}");
    slow.write_all(b"hello").await.unwrap();
    // Half the body is in; the only slot is free for another client.
    let r = get(&edge, CORE, "/api/v1/timelines/public")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "the slow client held the upstream's slot");
    assert_eq!(up.requests(), 1, "only the GET reached core so far");
    slow.write_all(b"world").await.unwrap();
    let answer = read_head(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let (method, path, headers, len) = up.last();
    assert_eq!(
        (method.as_str(), path.as_str(), len),
        ("POST", "/api/v1/statuses", 10)
    );
    assert_eq!(headers["content-length"], "10");
}

#[tokio::test]
async fn a_post_read_whole_goes_to_another_upstream_when_the_first_refuses() {
    let refused = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refused_addr = refused.local_addr().unwrap();
    drop(refused);
    let good = Upstream::start(Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    // Both idle: the first in order, which refuses, is picked first.
    let edge = edge_with_core(dir.path(), &[refused_addr, good.addr], "").await;
    let r = post(&edge, b"status=hello".to_vec()).send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "nothing was sent: tried on the other upstream"
    );
    assert_eq!(good.requests(), 1);
    let (method, _, _, len) = good.last();
    assert_eq!((method.as_str(), len), ("POST", 12), "the whole body, once");

    // A body longer than what is read ahead streams: a refused connection gives it back
    // unread, and it goes whole to the other upstream.
    let dir = tempfile::tempdir().unwrap();
    let other = Upstream::start(Mode::Answer).await;
    let streams = "buffer_requests = false\n";
    let edge = edge_with_core(dir.path(), &[refused_addr, other.addr], streams).await;
    let r = post(&edge, vec![b'm'; 64 * 1024]).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(other.requests(), 1);
    assert_eq!(other.last().3, 64 * 1024, "the whole streamed body, once");
}

#[tokio::test]
async fn a_client_silent_in_the_middle_of_its_body_gets_408_and_core_sees_nothing() {
    let up = Upstream::start(Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[up.addr], "idle_timeout = \"1s\"\n").await;
    let mut silent = TcpStream::connect(edge.running.addr).await.unwrap();
    let head = format!(
        "POST /api/v1/statuses HTTP/1.1\r\nhost: {CORE}\r\ncontent-length: 10\r\n\r\nhello"
    );
    silent.write_all(head.as_bytes()).await.unwrap();
    let answer = read_head(&mut silent).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(up.requests(), 0);
    assert_eq!(up.accepts(), 0, "no connection to core was opened");
}

#[tokio::test]
async fn a_client_silent_after_the_start_of_a_long_body_gets_408_and_frees_the_upstream_slot() {
    let up = Upstream::start(Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let extra =
        "max_connections_per_upstream = 1\nidle_timeout = \"1s\"\nbuffer_requests = false\n";
    let edge = edge_with_core(dir.path(), &[up.addr], extra).await;
    let mut silent = TcpStream::connect(edge.running.addr).await.unwrap();
    let head = format!(
        "POST /api/v1/media HTTP/1.1\r\nhost: {CORE}\r\ncontent-length: {}\r\n\r\n",
        64 * 1024
    );
    silent.write_all(head.as_bytes()).await.unwrap();
    // More than is read ahead: the body streams to core, then the client stops.
    silent.write_all(&[b'm'; 20 * 1024]).await.unwrap();
    let answer = read_head(&mut silent).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // The only slot is free again.
    let r = get(&edge, CORE, "/api/v1/timelines/public")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
