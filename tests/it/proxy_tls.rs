//! The TLS listener serves the front door's routes too (issue 8 §6), over HTTP/2 and
//! HTTP/1.1: the HTTP/2 authority routes like a Host header, and core is told `https`.

use std::net::SocketAddr;
use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

use crate::proxy::{edge_with_core, Mode, Upstream, CORE};

/// A CA (its root for the client) and a leaf for `names` written to `dir`; returns the root
/// and the `[tls]` table.
fn tls(dir: &Path, names: &[&str]) -> (reqwest::Certificate, String) {
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

fn client(root: &reqwest::Certificate, addr: SocketAddr, http1: bool) -> reqwest::Client {
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
