//! The TLS listener serves the front door's routes too (issue 8 §6), over HTTP/2 and
//! HTTP/1.1: the HTTP/2 authority routes like a Host header, and core is told `https`.

use std::net::SocketAddr;
use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

use crate::proxy::{edge_with_core, Mode, Upstream, CORE};

/// A CA (its root for the client) and a leaf for `names` written to `dir`; returns the root
/// and the `[tls]` table.
pub fn tls(dir: &Path, names: &[&str]) -> (reqwest::Certificate, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    std::fs::write(dir.join("site.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("site.key"), key.serialize_pem()).unwrap();
    let table = format!(
        "[tls]\nlisten = \"127.0.0.1:0\"\ncertificates = [{{ cert = \"{}\", key = \"{}\" }}]\n",
        dir.join("site.pem").display(),
        dir.join("site.key").display()
    );
    (
        reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap(),
        table,
    )
}

pub fn client(root: &reqwest::Certificate, addr: SocketAddr, http1: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder().tls_certs_only([root.clone()]);
    for name in [CORE, "files.test", "other.test"] {
        b = b.resolve(name, addr);
    }
    if http1 {
        b = b.http1_only();
    }
    b.build().unwrap()
}

#[tokio::test]
async fn the_tls_listener_routes_like_the_plain_one_over_h2_and_http1() {
    let up = Upstream::start(Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let (root, table) = tls(dir.path(), &[CORE, "files.test", "other.test"]);
    let edge = edge_with_core(dir.path(), &[up.addr], &table).await;
    let addr = edge.running.https_addr.expect("a TLS listener");
    for http1 in [false, true] {
        let c = client(&root, addr, http1);
        let base = |host: &str| format!("https://{host}:{}", addr.port());
        let r = c
            .get(format!("{}/api/v1/instance", base(CORE)))
            .send()
            .await
            .unwrap();
        let version = r.version();
        assert_eq!(r.status(), 200, "{version:?}");
        assert!(r.text().await.unwrap().starts_with("from upstream"));
        let (_, path, h, _) = up.last();
        assert_eq!(path, "/api/v1/instance");
        assert_eq!(h["host"], format!("{CORE}:{}", addr.port()), "{version:?}");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-real-ip"], "127.0.0.1");
        let r = c
            .get(format!("{}/system/small.txt", base(CORE)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.text().await.unwrap(), "small");
        let r = c
            .get(format!("{}/small.txt", base("files.test")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.text().await.unwrap(), "small");
        let before = up.requests();
        let r = c
            .get(format!("{}/api/v1/instance", base("other.test")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 421, "{version:?}");
        assert_eq!(up.requests(), before);
    }
}

/// Full duplex through the proxy's own upstream connections: core answers at once and echoes
/// the request body as it comes, and the client sends each piece only once the previous one
/// came back. The request body's progress comes from the client's connection after the answer
/// has arrived (over HTTP/2, from another task than the request's): it must still wake the
/// upstream connection, driven by the request's task. A lost wake-up hangs here. The first
/// piece is longer than what the proxy reads of a body before it picks an upstream (16 KiB):
/// a shorter one would wait there for the rest, as behind nginx. With `buffer_requests =
/// false`: by default the whole body is read first.
#[tokio::test]
async fn a_request_body_still_coming_after_the_answer_reaches_core_over_h2_and_http1() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let echo =
                    hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| {
                        let (_, body) = req.into_parts();
                        async move { Ok::<_, std::convert::Infallible>(http::Response::new(body)) }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), echo)
                    .await;
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let (root, table) = tls(dir.path(), &[CORE]);
    // Streamed (read whole first, as by default, there is no full duplex: as behind nginx).
    let extra = format!("buffer_requests = false\n{table}");
    let edge = edge_with_core(dir.path(), &[up], &extra).await;
    let addr = edge.running.https_addr.expect("a TLS listener");
    for http1 in [false, true] {
        let c = client(&root, addr, http1);
        let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
        let pieces = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
        });
        let first = format!("{}piece 0;", "-".repeat(16 * 1024));
        tx.send(first.clone().into()).await.unwrap();
        let exchange = async move {
            let mut r = c
                .post(format!("https://{CORE}:{}/api/v1/echo", addr.port()))
                .body(reqwest::Body::wrap_stream(pieces))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let mut got = Vec::new();
            for n in 1..5 {
                let want = format!("piece {};", n - 1);
                while !got.ends_with(want.as_bytes()) {
                    let chunk = r.chunk().await.unwrap().expect("the echo goes on");
                    got.extend_from_slice(&chunk);
                }
                // Only now the next piece.
                tx.send(format!("piece {n};").into()).await.unwrap();
            }
            drop(tx); // The request body ends: so does the echo.
            while let Some(chunk) = r.chunk().await.unwrap() {
                got.extend_from_slice(&chunk);
            }
            got
        };
        let got = tokio::time::timeout(crate::proxy::WAIT, exchange)
            .await
            .unwrap_or_else(|_| panic!("stuck (HTTP/1.1 only: {http1})"));
        let want: String = (1..5).map(|n| format!("piece {n};")).collect();
        let want = format!("{first}{want}");
        assert_eq!(
            String::from_utf8(got).unwrap(),
            want,
            "HTTP/1.1 only: {http1}"
        );
    }
}
