//! The TLS listener (issue 8 §1–2): HTTP/2 and HTTP/1.1 by ALPN, certificates by SNI,
//! reload without dropping connections, the redirect listener and ACME challenges.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

use crate::common::{bytes, start_edge};
use crate::listen::{
    assert_refused, exits_0, field, kill, line_with, read_rest, spawn_binary, BIG,
};

/// A test certificate authority.
pub(crate) struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub(crate) fn new() -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "fediedge test CA");
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// The CA's certificate, for a rustls client.
    pub(crate) fn der(&self) -> rustls::pki_types::CertificateDer<'static> {
        self.issuer.der().clone()
    }

    pub(crate) fn root(&self) -> reqwest::Certificate {
        reqwest::Certificate::from_pem(self.issuer.pem().as_bytes()).unwrap()
    }

    /// A leaf certificate for `names`, written as `<stem>.pem` and `<stem>.key` in `dir`.
    pub(crate) fn leaf(&self, dir: &Path, stem: &str, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let leaf = Leaf {
            cert: dir.join(format!("{stem}.pem")),
            key: dir.join(format!("{stem}.key")),
            der: cert.der().to_vec(),
        };
        std::fs::write(&leaf.cert, cert.pem()).unwrap();
        std::fs::write(&leaf.key, key.serialize_pem()).unwrap();
        leaf
    }
}

/// A certificate's files and its DER bytes (to recognise it on the wire).
pub(crate) struct Leaf {
    cert: PathBuf,
    key: PathBuf,
    der: Vec<u8>,
}

impl Leaf {
    /// Copies this certificate over `to`'s files (what a renewal does).
    fn install_as(&self, to: &Leaf) {
        std::fs::copy(&self.cert, &to.cert).unwrap();
        std::fs::copy(&self.key, &to.key).unwrap();
    }
}

/// An fs primary holding `a.png` (100,000 bytes) and `[tls]` with `leaves`.
pub(crate) fn tls_config(dir: &Path, leaves: &[&Leaf], acme: Option<&Path>) -> String {
    let root = dir.join("primary");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("a.png"), bytes(100_000, 3)).unwrap();
    let certs: Vec<String> = leaves
        .iter()
        .map(|l| {
            format!(
                "{{ cert = \"{}\", key = \"{}\" }}",
                l.cert.display(),
                l.key.display()
            )
        })
        .collect();
    let mut text = format!(
        "[primary]\ntype = \"fs\"\nroot = \"{}\"\n[tls]\nlisten = \"127.0.0.1:0\"\ncertificates = [{}]\n",
        root.display(),
        certs.join(", ")
    );
    if let Some(acme) = acme {
        text += &format!(
            "redirect_listen = \"127.0.0.1:0\"\nacme_challenge_dir = \"{}\"\n",
            acme.display()
        );
    }
    text
}

/// A client trusting only `ca`, reaching `name` at `addr`; HTTP/1.1 only if `http1`.
fn tls_client(ca: &Ca, name: &str, addr: SocketAddr, http1: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .tls_certs_only([ca.root()])
        .resolve(name, addr)
        .tls_info(true);
    if http1 {
        b = b.http1_only();
    }
    b.build().unwrap()
}

/// The DER of the certificate the server showed for `resp`'s connection.
fn peer_cert(resp: &reqwest::Response) -> Vec<u8> {
    resp.extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|i| i.peer_certificate())
        .expect("TLS info")
        .to_vec()
}

/// Status, headers (without Date) and body of a response, to compare across protocols.
async fn summary(resp: reqwest::Response) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let status = resp.status().as_u16();
    let mut headers: Vec<(String, String)> = resp
        .headers()
        .iter()
        .filter(|(k, _)| *k != "date")
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
        .collect();
    headers.sort();
    (status, headers, resp.bytes().await.unwrap().to_vec())
}

#[tokio::test]
async fn media_answers_the_same_over_h2_and_http1() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let leaf = ca.leaf(dir.path(), "media", &["media.example"]);
    let edge = start_edge(dir.path(), &tls_config(dir.path(), &[&leaf], None)).await;
    let https = edge.running.https_addr.unwrap();
    let url = format!("https://media.example:{}/system/a.png", https.port());
    let body = bytes(100_000, 3);

    let mut answers = Vec::new();
    for (http1, version) in [
        (false, reqwest::Version::HTTP_2),
        (true, reqwest::Version::HTTP_11),
    ] {
        let c = tls_client(&ca, "media.example", https, http1);
        let whole = c.get(&url).send().await.unwrap();
        assert_eq!(whole.version(), version, "ALPN chose the protocol");
        let whole = summary(whole).await;
        assert_eq!(whole.0, 200);
        assert!(whole.2 == body, "whole body over {version:?}");
        let range = c
            .get(&url)
            .header("range", "bytes=1000-1999")
            .send()
            .await
            .unwrap();
        assert_eq!(range.version(), version);
        let range = summary(range).await;
        assert_eq!(range.0, 206);
        assert_eq!(range.2, body[1000..2000]);
        let head = summary(c.head(&url).send().await.unwrap()).await;
        let cond = summary(
            c.get(&url)
                .header("if-none-match", whole_etag(&whole.1))
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(cond.0, 304);
        answers.push((whole, range, head, cond));
    }
    assert_eq!(answers[0], answers[1], "HTTP/2 and HTTP/1.1 answer alike");

    // TLS 1.2 too; and the plain listener still answers HTTP/1.1.
    let tls12 = reqwest::Client::builder()
        .tls_certs_only([ca.root()])
        .resolve("media.example", https)
        .tls_version_max(reqwest::tls::Version::TLS_1_2)
        .build()
        .unwrap();
    let r = tls12.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let plain = reqwest::get(format!("{}a.png", edge.base)).await.unwrap();
    assert_eq!(plain.version(), reqwest::Version::HTTP_11);
    assert!(plain.bytes().await.unwrap() == body);
    assert!(edge.running.shutdown().await.clean());
}

fn whole_etag(headers: &[(String, String)]) -> String {
    headers
        .iter()
        .find(|(k, _)| k == "etag")
        .map(|(_, v)| v.clone())
        .expect("an ETag")
}

#[tokio::test]
async fn an_h2_response_under_way_completes_during_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let leaf = ca.leaf(dir.path(), "media", &["media.example"]);
    let config = tls_config(dir.path(), &[&leaf], None);
    std::fs::write(dir.path().join("primary/big.bin"), bytes(BIG, 7)).unwrap();
    let edge = start_edge(dir.path(), &config).await;
    let https = edge.running.https_addr.unwrap();
    let mut slow = tls_client(&ca, "media.example", https, false)
        .get(format!(
            "https://media.example:{}/system/big.bin",
            https.port()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(slow.version(), reqwest::Version::HTTP_2);
    // HTTP/2 flow control: the edge cannot finish before the client reads on.
    let first = slow.chunk().await.unwrap().expect("a first piece");

    let closed = edge.running.listeners_closed();
    let shutdown = tokio::spawn(edge.running.shutdown());
    closed.cancelled().await;
    assert_refused(https, std::net::TcpStream::connect(https));
    let got = read_rest(slow, first.to_vec()).await;
    assert_eq!(got.len(), BIG);
    assert!(got == bytes(BIG, 7), "the body arrived damaged");
    let stopped = shutdown.await.unwrap();
    assert!(stopped.clean(), "{stopped:?}");
}

#[tokio::test]
async fn sni_picks_the_certificate_of_each_name() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let social = ca.leaf(dir.path(), "social", &["social.example"]);
    let media = ca.leaf(dir.path(), "media", &["media.example", "*.cdn.example"]);
    let edge = start_edge(
        dir.path(),
        &tls_config(dir.path(), &[&social, &media], None),
    )
    .await;
    let https = edge.running.https_addr.unwrap();
    for (name, leaf) in [
        ("social.example", &social),
        ("media.example", &media),
        ("eu.cdn.example", &media),
    ] {
        let r = tls_client(&ca, name, https, false)
            .get(format!("https://{name}:{}/system/a.png", https.port()))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(r.status(), 200, "{name}");
        assert!(peer_cert(&r) == leaf.der, "{name} got another certificate");
    }
    // A name no certificate has gets the first one (which the client then refuses, unless
    // told not to check names).
    let lenient = reqwest::Client::builder()
        .tls_certs_only([ca.root()])
        .tls_danger_accept_invalid_hostnames(true)
        .resolve("unknown.example", https)
        .tls_info(true)
        .build()
        .unwrap();
    let r = lenient
        .get(format!(
            "https://unknown.example:{}/system/a.png",
            https.port()
        ))
        .send()
        .await
        .unwrap();
    assert!(
        peer_cert(&r) == social.der,
        "the first certificate is the default"
    );
    edge.running.shutdown().await;
}

#[tokio::test]
async fn reload_swaps_certificates_and_keeps_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let live = ca.leaf(dir.path(), "live", &["media.example"]);
    let first_der = live.der.clone();
    let edge = start_edge(dir.path(), &tls_config(dir.path(), &[&live], None)).await;
    let https = edge.running.https_addr.unwrap();
    let url = format!("https://media.example:{}/system/a.png", https.port());
    // A client that keeps its HTTP/2 connection open across the reload.
    let kept = tls_client(&ca, "media.example", https, false);
    let r = kept.get(&url).send().await.unwrap();
    assert!(peer_cert(&r) == first_der);
    r.bytes().await.unwrap();

    let renewed = ca.leaf(dir.path(), "renewed", &["media.example"]);
    renewed.install_as(&live);
    edge.running.reload().expect("a good certificate reloads");
    let r = tls_client(&ca, "media.example", https, false)
        .get(&url)
        .send()
        .await
        .unwrap();
    assert!(
        peer_cert(&r) == renewed.der,
        "new connections get the new one"
    );
    // The open connection was not dropped: the same connection (with the old certificate)
    // answers again.
    let again = kept.get(&url).send().await.unwrap();
    assert_eq!(again.status(), 200);
    assert!(
        peer_cert(&again) == first_der,
        "the kept connection is the old one"
    );

    // A damaged certificate file: refused, naming the file; the renewed one keeps serving.
    std::fs::write(&live.cert, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    let err = edge.running.reload().unwrap_err().to_string();
    assert!(err.contains(&live.cert.display().to_string()), "{err}");
    // A key that is not the certificate's: refused, naming the key file.
    let other = ca.leaf(dir.path(), "other", &["media.example"]);
    std::fs::copy(&renewed.cert, &live.cert).unwrap();
    std::fs::copy(&other.key, &live.key).unwrap();
    let err = edge.running.reload().unwrap_err().to_string();
    assert!(err.contains(&live.key.display().to_string()), "{err}");
    assert!(!err.contains("PRIVATE KEY-----"), "no key material: {err}");
    let r = tls_client(&ca, "media.example", https, false)
        .get(&url)
        .send()
        .await
        .unwrap();
    assert!(
        peer_cert(&r) == renewed.der,
        "the previous good set still serves"
    );
    drop((kept, r, again));
    edge.running.shutdown().await;
}

#[tokio::test]
async fn the_redirect_listener_sends_to_https_and_serves_acme_challenges() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let leaf = ca.leaf(dir.path(), "media", &["media.example"]);
    let acme = dir.path().join("acme");
    std::fs::create_dir_all(&acme).unwrap();
    std::fs::write(acme.join("tok-EN_1"), "tok-EN_1.thumbprint").unwrap();
    std::fs::write(dir.path().join("secret"), "not for you").unwrap();
    let edge = start_edge(dir.path(), &tls_config(dir.path(), &[&leaf], Some(&acme))).await;
    let https = edge.running.https_addr.unwrap();
    let plain = edge.running.redirect_addr.unwrap();
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = c
        .get(format!("http://{plain}/system/a.png?v=2"))
        .header("host", "media.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(
        r.headers()["location"],
        format!("https://media.example:{}/system/a.png?v=2", https.port()).as_str()
    );
    let r = c
        .get(format!(
            "http://{plain}/.well-known/acme-challenge/tok-EN_1"
        ))
        .header("host", "media.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "tok-EN_1.thumbprint");
    for path in ["missing", "..%2Fsecret", "sub/tok-EN_1", ""] {
        let r = c
            .get(format!("http://{plain}/.well-known/acme-challenge/{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    edge.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_reloads_certificates_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let live = ca.leaf(dir.path(), "live", &["media.example"]);
    let first_der = live.der.clone();
    let config = dir.path().join("fediedge.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n{}",
            dir.path().join("var").display(),
            tls_config(dir.path(), &[&live], None)
        ),
    )
    .unwrap();
    let (child, mut lines) = spawn_binary(&config);
    let https: SocketAddr = field(&line_with(&mut lines, "serving https").await, "addr")
        .parse()
        .unwrap();
    let url = format!("https://media.example:{}/system/a.png", https.port());
    let get = || async {
        tls_client(&ca, "media.example", https, false)
            .get(&url)
            .send()
            .await
            .unwrap()
    };
    assert!(peer_cert(&get().await) == first_der);

    let renewed = ca.leaf(dir.path(), "renewed", &["media.example"]);
    renewed.install_as(&live);
    kill(&child, "HUP");
    line_with(&mut lines, "TLS certificates reloaded").await;
    assert!(peer_cert(&get().await) == renewed.der);

    std::fs::write(&live.cert, "garbage").unwrap();
    kill(&child, "HUP");
    let refused = line_with(&mut lines, "not reloaded").await;
    assert!(
        refused.contains(&live.cert.display().to_string()),
        "{refused}"
    );
    assert!(peer_cert(&get().await) == renewed.der);

    kill(&child, "TERM");
    exits_0(child).await;
}

#[tokio::test]
async fn a_bad_certificate_stops_the_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let good = ca.leaf(dir.path(), "good", &["media.example"]);
    let other = ca.leaf(dir.path(), "other", &["social.example"]);
    // The key of another certificate.
    std::fs::copy(&other.key, &good.key).unwrap();
    let text = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n{}",
        dir.path().join("var").display(),
        tls_config(dir.path(), &[&good], None)
    );
    let config = fediedge::config::from_str(&text, Path::new("test.toml")).unwrap();
    let err = match fediedge::serve::start(config).await {
        Ok(_) => panic!("started with a key that is not the certificate's"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains(&good.key.display().to_string()), "{err}");
    assert!(!err.contains("PRIVATE KEY"), "no key material: {err}");
}

#[tokio::test]
async fn the_tls_and_plain_listeners_share_max_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let leaf = ca.leaf(dir.path(), "site", &["edge.test"]);
    let extra = format!(
        "max_connections = 1\n{}",
        tls_config(dir.path(), &[&leaf], None)
    );
    let edge = start_edge(dir.path(), &extra).await;
    let admin = edge.running.admin_addr;
    let https = edge.running.https_addr.unwrap();

    // One plain keep-alive connection, served and left open: the cap is reached.
    let mut plain = tokio::net::TcpStream::connect(edge.running.addr)
        .await
        .unwrap();
    plain
        .write_all(b"HEAD /system/a.png HTTP/1.1\r\nHost: edge.test\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 256];
        let n = plain.read(&mut b).await.unwrap();
        assert!(n > 0, "closed");
        head.extend_from_slice(&b[..n]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"));
    assert_eq!(
        crate::listen_cap::metric(admin, "fediedge_connections_open").await,
        1.0
    );

    // An HTTPS request waits: the TLS listener counts under the same cap.
    let client = tls_client(&ca, "edge.test", https, false);
    let url = format!("https://edge.test:{}/system/a.png", https.port());
    let waiting = tokio::spawn(async move {
        let r = client.get(url).send().await.unwrap();
        (r.status().as_u16(), r.bytes().await.unwrap().len())
    });
    for _ in 0..3 {
        assert_eq!(
            crate::listen_cap::metric(admin, "fediedge_connections_open").await,
            1.0
        );
    }
    assert!(!waiting.is_finished(), "served over the cap");
    // The plain connection closes: the HTTPS request is served.
    drop(plain);
    let got = tokio::time::timeout(std::time::Duration::from_secs(10), waiting)
        .await
        .expect("served once the plain connection closed")
        .unwrap();
    assert_eq!(got, (200, 100_000));
    edge.running.shutdown().await;
}

/// Idle clients do not keep their connection (and their place under `max_connections`): an
/// HTTP/2 connection with nothing under way and an idle HTTP/1.1 keep-alive connection are
/// closed by the edge. Paused time: the runtime's clock jumps ahead whenever everything waits.
#[tokio::test(start_paused = true)]
async fn idle_h2_and_http1_connections_are_closed_by_the_edge() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let leaf = ca.leaf(dir.path(), "site", &["edge.test"]);
    let edge = start_edge(dir.path(), &tls_config(dir.path(), &[&leaf], None)).await;
    let admin = edge.running.admin_addr;
    let https = edge.running.https_addr.unwrap();
    let open = || crate::listen_cap::metric(admin, "fediedge_connections_open");

    // HTTP/2, kept open by the client for as long as the edge allows.
    let h2 = reqwest::Client::builder()
        .tls_certs_only([ca.root()])
        .resolve("edge.test", https)
        .pool_idle_timeout(None)
        .build()
        .unwrap();
    let r = h2
        .get(format!("https://edge.test:{}/system/a.png", https.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.bytes().await.unwrap().len(), 100_000);
    assert_eq!(open().await, 1.0);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(600);
    while open().await != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the idle HTTP/2 connection stays open"
        );
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }

    // HTTP/1.1: one request, then silence; the edge closes the connection.
    let mut plain = tokio::net::TcpStream::connect(edge.running.addr)
        .await
        .unwrap();
    plain
        .write_all(b"HEAD /system/a.png HTTP/1.1\r\nHost: edge.test\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let read_all = plain.read_to_end(&mut got);
    tokio::time::timeout(std::time::Duration::from_secs(600), read_all)
        .await
        .expect("the idle HTTP/1.1 connection is closed by the edge")
        .unwrap();
    assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
    // The edge's side lingers until the client closes too.
    drop(plain);
    while open().await != 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "still counted");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    edge.running.shutdown().await;
}

/// The slow-client guard: an HTTP/1.1 client that takes longer than the idle timeout to send
/// its header block (or sends nothing at all) is dropped without an answer, so it does not
/// hold its place under `max_connections`. Paused time, as above.
#[tokio::test(start_paused = true)]
async fn a_client_too_slow_to_send_its_header_block_is_dropped() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let leaf = ca.leaf(dir.path(), "site", &["edge.test"]);
    let edge = start_edge(dir.path(), &tls_config(dir.path(), &[&leaf], None)).await;
    let connect = || tokio::net::TcpStream::connect(edge.running.addr);
    let mut partial = connect().await.unwrap();
    partial
        .write_all(b"GET /system/a.png HTTP/1.1\r\nHost: edge.te")
        .await
        .unwrap();
    let mut silent = connect().await.unwrap();
    for (what, conn) in [
        ("half a header block", &mut partial),
        ("nothing", &mut silent),
    ] {
        let mut got = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(600),
            conn.read_to_end(&mut got),
        )
        .await
        .unwrap_or_else(|_| panic!("a client that sent {what} keeps its connection"))
        .unwrap();
        assert!(got.is_empty(), "{what}: answered {got:?}");
    }
    // A client that finishes its request in time is answered on a connection as old.
    let mut prompt = connect().await.unwrap();
    prompt
        .write_all(b"HEAD /system/a.png HTTP/1.1\r\nHost: edge.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    prompt.read_to_end(&mut got).await.unwrap();
    assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
    edge.running.shutdown().await;
}
