//! `max_connections` (issue 8, the front door): at the cap the public listeners stop
//! accepting, a waiting connection is served once another closes, the admin listener still
//! answers, and `/metrics` counts it all.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{client, start_edge};
use crate::listen::fs_primary;

const WAIT: Duration = Duration::from_secs(10);

/// A keep-alive HTTP/1.1 request for `small.txt` on `s`.
async fn ask(s: &mut TcpStream) {
    s.write_all(b"GET /system/small.txt HTTP/1.1\r\nHost: edge\r\n\r\n")
        .await
        .unwrap();
}

/// Reads one whole response to [`ask`] (its body is `small`).
async fn answer(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    tokio::time::timeout(WAIT, async {
        while !got.ends_with(b"small") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the response ended");
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("a response");
    String::from_utf8(got).unwrap()
}

/// A series' value on the admin listener's `/metrics` (fetched over HTTP).
pub async fn metric(admin: SocketAddr, name: &str) -> f64 {
    let text = client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .expect("the admin listener answers")
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// Polls `name` on `/metrics` until it equals `want` (WAIT at most).
pub(crate) async fn metric_becomes(admin: SocketAddr, name: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let got = metric(admin, name).await;
        if got == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} is {got}, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn at_the_cap_a_new_connection_waits_until_one_closes_and_admin_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "max_connections = 2\n{}[alerts]\ninterval = \"1s\"\n",
        fs_primary(dir.path())
    );
    let edge = start_edge(dir.path(), &extra).await;
    let (addr, admin) = (edge.running.addr, edge.running.admin_addr);
    assert_eq!(metric(admin, "fediedge_connections_max").await, 2.0);
    assert_eq!(metric(admin, "fediedge_connections_open").await, 0.0);

    // Two keep-alive connections, served and left open: the cap is reached.
    let mut first = TcpStream::connect(addr).await.unwrap();
    ask(&mut first).await;
    assert!(answer(&mut first).await.starts_with("HTTP/1.1 200"));
    let mut second = TcpStream::connect(addr).await.unwrap();
    ask(&mut second).await;
    assert!(answer(&mut second).await.starts_with("HTTP/1.1 200"));
    // The admin listener answers at the cap, and is not counted.
    assert_eq!(metric(admin, "fediedge_connections_open").await, 2.0);
    // The accept loop stopped at the cap.
    metric_becomes(admin, "fediedge_connection_cap_waits_total", 1.0).await;
    // ... which `/healthz` (on the admin listener) names.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let r = client()
            .get(format!("http://{admin}/healthz"))
            .send()
            .await
            .unwrap();
        let (status, text) = (r.status().as_u16(), r.text().await.unwrap());
        if text.contains("connection_cap: the listeners reached max_connections (2)") {
            assert_eq!(status, 503, "{text}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no alert: {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A third connects (the kernel's backlog takes it) but is not served.
    let mut third = TcpStream::connect(addr).await.unwrap();
    ask(&mut third).await;
    // The accept loop is stopped (the count above), so nothing can answer it: still two open
    // and not a byte for the third.
    assert_eq!(metric(admin, "fediedge_connections_open").await, 2.0);
    let mut buf = [0u8; 16];
    match third.try_read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the third connection got an answer at the cap: {other:?}"),
    }
    // The first closes: the third is accepted and served, and the count stays at the cap.
    drop(first);
    assert!(answer(&mut third).await.starts_with("HTTP/1.1 200"));
    assert_eq!(metric(admin, "fediedge_connections_open").await, 2.0);
    // Both close: the gauge goes back to zero.
    drop((second, third));
    metric_becomes(admin, "fediedge_connections_open", 0.0).await;
    assert!(edge.running.shutdown().await.clean());
}

#[tokio::test]
async fn max_connections_zero_is_refused_naming_the_key() {
    let err = fediedge::config::from_str("max_connections = 0\n", std::path::Path::new("t.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`max_connections`"), "{err}");
}

#[tokio::test]
async fn a_reload_raises_and_lowers_max_connections_without_dropping_one() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fediedge.toml");
    let text = |max: usize| {
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
             max_connections = {max}\n{}",
            dir.path().join("var").display(),
            fs_primary(dir.path())
        )
    };
    std::fs::write(&file, text(1)).unwrap();
    let running = fediedge::serve::start(fediedge::config::load(&file).unwrap())
        .await
        .unwrap();
    let (addr, admin) = (running.addr, running.admin_addr);
    let mut first = TcpStream::connect(addr).await.unwrap();
    ask(&mut first).await;
    answer(&mut first).await;
    metric_becomes(admin, "fediedge_connection_cap_waits_total", 1.0).await;

    // Raised: the waiting accept goes on, a second connection is served next to the first.
    std::fs::write(&file, text(2)).unwrap();
    let changes = running.reload_config().expect("a good config reloads");
    let keys: Vec<&str> = changes.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys, ["max_connections"]);
    let mut second = TcpStream::connect(addr).await.unwrap();
    ask(&mut second).await;
    assert!(answer(&mut second).await.starts_with("HTTP/1.1 200"));
    assert_eq!(metric(admin, "fediedge_connections_max").await, 2.0);
    assert_eq!(metric(admin, "fediedge_connections_open").await, 2.0);

    // Lowered to 1 with 2 open: both keep being served; a third is not, not even after one
    // of the two closes (2 → 1 open is not under the new cap), only after both did.
    std::fs::write(&file, text(1)).unwrap();
    running.reload_config().expect("a good config reloads");
    assert_eq!(metric(admin, "fediedge_connections_max").await, 1.0);
    ask(&mut first).await;
    assert!(answer(&mut first).await.starts_with("HTTP/1.1 200"));
    drop(first);
    metric_becomes(admin, "fediedge_connections_open", 1.0).await;
    let mut third = TcpStream::connect(addr).await.unwrap();
    ask(&mut third).await;
    ask(&mut second).await;
    assert!(answer(&mut second).await.starts_with("HTTP/1.1 200"));
    assert_eq!(metric(admin, "fediedge_connections_open").await, 1.0);
    let mut buf = [0u8; 16];
    match third.try_read(&mut buf) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("served over the lowered cap: {other:?}"),
    }
    drop(second);
    assert!(answer(&mut third).await.starts_with("HTTP/1.1 200"));
    assert_eq!(metric(admin, "fediedge_connections_open").await, 1.0);
    drop(third);
    running.shutdown().await;
}

/// Connects to `addr` from the local address `from` (any of 127.0.0.0/8 on Linux).
async fn connect_from(from: &str, addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(addr).await.unwrap()
}

/// Reads until the edge closes `s` (a refused connection) and returns what came.
async fn closed(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    match tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await {
        Ok(Ok(_)) => {}
        // Closed with our request unread: the kernel resets it.
        Ok(Err(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Err(_) => panic!("the edge kept a connection over max_connections_per_ip"),
    }
    got
}

#[tokio::test]
async fn max_connections_per_ip_closes_one_address_extra_connections_and_a_reload_lifts_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fediedge.toml");
    let text = |limit: &str| {
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
             {limit}{}",
            dir.path().join("var").display(),
            fs_primary(dir.path())
        )
    };
    std::fs::write(&file, text("max_connections_per_ip = 2\n")).unwrap();
    let running = fediedge::serve::start(fediedge::config::load(&file).unwrap())
        .await
        .unwrap();
    let (addr, admin) = (running.addr, running.admin_addr);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect_from("127.0.0.1", addr).await;
        ask(&mut s).await;
        assert!(answer(&mut s).await.starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    // A third from the same address is closed unanswered; another address is served.
    let mut third = connect_from("127.0.0.1", addr).await;
    ask(&mut third).await;
    assert_eq!(closed(&mut third).await, b"");
    assert_eq!(
        metric(admin, "fediedge_connections_refused_per_ip_total").await,
        1.0
    );
    let mut other = connect_from("127.0.0.2", addr).await;
    ask(&mut other).await;
    assert!(answer(&mut other).await.starts_with("HTTP/1.1 200"));
    // A place given back is taken again.
    drop(held.pop());
    metric_becomes(admin, "fediedge_connections_open", 2.0).await;
    let mut again = connect_from("127.0.0.1", addr).await;
    ask(&mut again).await;
    assert!(answer(&mut again).await.starts_with("HTTP/1.1 200"));

    // Reloaded without the key: no limit.
    std::fs::write(&file, text("")).unwrap();
    let changes = running.reload_config().expect("a good config reloads");
    let keys: Vec<&str> = changes.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys, ["max_connections_per_ip"]);
    for _ in 0..3 {
        let mut s = connect_from("127.0.0.1", addr).await;
        ask(&mut s).await;
        assert!(answer(&mut s).await.starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    assert_eq!(
        metric(admin, "fediedge_connections_refused_per_ip_total").await,
        1.0
    );
    drop((held, other, again));
    running.shutdown().await;
}

#[tokio::test]
async fn a_media_only_edge_exempts_its_cdn_from_max_connections_per_ip_and_a_reload_takes_it_back()
{
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fediedge.toml");
    let text = |exempt: &str| {
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
             max_connections_per_ip = 1\n{exempt}{}",
            dir.path().join("var").display(),
            fs_primary(dir.path())
        )
    };
    // A CDN's range: every address in it is unlimited, the rest keeps its limit.
    std::fs::write(
        &file,
        text("max_connections_per_ip_exempt = [\"127.0.0.2/31\"]\n"),
    )
    .unwrap();
    let running = fediedge::serve::start(fediedge::config::load(&file).unwrap())
        .await
        .unwrap();
    let (addr, admin) = (running.addr, running.admin_addr);
    let mut held = Vec::new();
    for from in [
        "127.0.0.2",
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.3",
        "127.0.0.1",
    ] {
        let mut s = connect_from(from, addr).await;
        ask(&mut s).await;
        assert!(answer(&mut s).await.starts_with("HTTP/1.1 200"), "{from}");
        held.push(s);
    }
    let mut second = connect_from("127.0.0.1", addr).await;
    ask(&mut second).await;
    assert_eq!(closed(&mut second).await, b"", "outside the range: limited");

    // Reloaded without the range: the CDN's open connections stay (not counted: they were
    // taken unlimited); new ones are limited.
    std::fs::write(&file, text("")).unwrap();
    let changes = running.reload_config().expect("a good config reloads");
    let keys: Vec<&str> = changes.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys, ["max_connections_per_ip_exempt"]);
    let mut cdn = connect_from("127.0.0.2", addr).await;
    ask(&mut cdn).await;
    assert!(answer(&mut cdn).await.starts_with("HTTP/1.1 200"));
    let mut over = connect_from("127.0.0.2", addr).await;
    ask(&mut over).await;
    assert_eq!(closed(&mut over).await, b"");
    ask(&mut held[0]).await;
    assert!(answer(&mut held[0]).await.starts_with("HTTP/1.1 200"));
    assert_eq!(
        metric(admin, "fediedge_connections_refused_per_ip_total").await,
        2.0
    );
    drop((held, cdn));
    running.shutdown().await;
}

#[test]
fn a_bad_exempt_range_is_refused_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fediedge.toml");
    std::fs::write(
        &file,
        format!(
            "listen = \"127.0.0.1:0\"\nmax_connections_per_ip_exempt = [\"cdn.example\"]\n{}",
            fs_primary(dir.path())
        ),
    )
    .unwrap();
    let err = fediedge::config::load(&file).unwrap_err().to_string();
    assert!(err.contains("max_connections_per_ip_exempt"), "{err}");
    assert!(err.contains("cdn.example"), "{err}");
}
