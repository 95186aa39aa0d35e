//! The proxy's connect timeout (issue 8 §5): an upstream whose TCP handshake never completes.
//! A listener whose accept queue is full (backlog 0, one connection waiting, never accepted)
//! makes Linux drop every further SYN, so a connect hangs as to a blackholed address, without
//! leaving loopback.

use std::net::SocketAddr;

use crate::proxy::{edge_with_core, get, Mode, Upstream, CORE, WAIT};

/// An address whose handshakes never complete, and what keeps it so.
async fn blackhole() -> (SocketAddr, tokio::net::TcpListener, tokio::net::TcpStream) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    // Fills the accept queue (never accepted).
    let filler = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Check the premise: a further connect does not complete.
    let probe = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        tokio::net::TcpStream::connect(addr),
    )
    .await;
    assert!(
        probe.is_err(),
        "the full accept queue let a connect through"
    );
    (addr, listener, filler)
}

#[tokio::test]
async fn a_handshake_that_never_completes_fails_at_connect_timeout_and_a_get_goes_elsewhere() {
    let (hole, _listener, _filler) = blackhole().await;
    let dir = tempfile::tempdir().unwrap();
    // The first-byte timeout is far longer than WAIT: only the connect timeout can end these.
    let timeouts =
        "connect_timeout = \"200ms\"\nfirst_byte_timeout = \"10m\"\nbreaker_failures = 100\n";
    let edge = edge_with_core(dir.path(), &[hole], timeouts).await;
    let r = tokio::time::timeout(WAIT, get(&edge, CORE, "/about").send())
        .await
        .expect("answered before WAIT")
        .unwrap();
    assert_eq!(
        r.status(),
        502,
        "a connect failure, not a first-byte timeout"
    );
    edge.running.shutdown().await;

    // With a second upstream, the GET (nothing was sent) is tried there.
    let up = Upstream::start(Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let edge = edge_with_core(dir.path(), &[hole, up.addr], timeouts).await;
    for _ in 0..4 {
        let r = tokio::time::timeout(WAIT, get(&edge, CORE, "/about").send())
            .await
            .expect("answered before WAIT")
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    assert_eq!(up.requests(), 4);
    edge.running.shutdown().await;
}
