//! The reload diff (issue 8 §7): SIGHUP to the real binary re-reads its config file, logs
//! every changed value by its dotted key (a secret without its value), moves traffic to new
//! upstreams, and keeps the old config when the new file is bad.

use std::net::SocketAddr;
use std::path::Path;

use crate::listen::{exits_0, field, kill, spawn_binary};
use crate::proxy::{Mode, Upstream, CORE, WAIT};

/// The binary's stderr, every line kept.
struct Log {
    rx: tokio::sync::mpsc::UnboundedReceiver<String>,
    all: Vec<String>,
}

impl Log {
    /// The next line containing `what` (panics if the process ends or WAIT passes first).
    async fn line_with(&mut self, what: &str) -> String {
        let found = tokio::time::timeout(WAIT, async {
            while let Some(line) = self.rx.recv().await {
                self.all.push(line.clone());
                if line.contains(what) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            _ => panic!(
                "no log line with {what:?}; log so far:\n{}",
                self.all.join("\n")
            ),
        }
    }

    /// Every line from the start to the process's end.
    async fn until_exit(mut self) -> Vec<String> {
        while let Some(line) = self.rx.recv().await {
            self.all.push(line);
        }
        self.all
    }
}

fn config(dir: &Path, web: SocketAddr, secret: &str, negative_ttl: &str) -> String {
    // The S3 fallback is never asked (only core is requested): it carries the secret.
    format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
         negative_ttl = \"{negative_ttl}\"\n\
         [[fallback]]\ntype = \"s3\"\nendpoint = \"http://127.0.0.1:9\"\nbucket = \"media\"\n\
         access_key_id = \"GK-reload-test\"\nsecret_access_key = \"{secret}\"\n\
         [core]\nhosts = [\"{CORE}\"]\nweb = [\"{web}\"]\nhealth_check_interval = \"0s\"\n",
        dir.join("var").display()
    )
}

/// A GET of `/about` with `Host: host`; the status.
async fn get_as(addr: SocketAddr, host: &str) -> u16 {
    crate::common::client()
        .get(format!("http://{addr}/about"))
        .header("host", host)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// [`get_as`] the instance's host.
async fn get_core(addr: SocketAddr) -> u16 {
    get_as(addr, CORE).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_logs_the_diff_moves_traffic_and_keeps_the_old_config_when_the_new_is_bad() {
    const OLD_SECRET: &str = "old-s3cr3t-Zq9pW2";
    const NEW_SECRET: &str = "new-s3cr3t-Xv7mK4";
    let (a, b) = (
        Upstream::start(Mode::Answer).await,
        Upstream::start(Mode::Answer).await,
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fediedge.toml");
    std::fs::write(&file, config(dir.path(), a.addr, OLD_SECRET, "10s")).unwrap();
    let (child, rx) = spawn_binary(&file);
    let mut log = Log {
        rx,
        all: Vec::new(),
    };
    let addr: SocketAddr = field(&log.line_with("serving media").await, "addr")
        .parse()
        .unwrap();
    assert_eq!(get_core(addr).await, 200);
    assert_eq!((a.requests(), b.requests()), (1, 0));

    // A new upstream, a new secret, and a value that waits for a restart.
    std::fs::write(&file, config(dir.path(), b.addr, NEW_SECRET, "20s")).unwrap();
    kill(&child, "HUP");
    let web = log.line_with("changed `core.web`").await;
    assert!(
        web.contains(&format!(
            "changed `core.web` from [\"{}\"] to [\"{}\"]",
            a.addr, b.addr
        )),
        "{web}"
    );
    assert!(!web.contains("restart"), "applied live: {web}");
    let secret = log
        .line_with("changed `fallback[0].secret_access_key`")
        .await;
    assert!(secret.contains("value not shown"), "{secret}");
    let ttl = log.line_with("changed `negative_ttl`").await;
    assert!(
        ttl.contains("from \"10s\" to \"20s\" (applies at restart)"),
        "{ttl}"
    );
    log.line_with("config reloaded").await;
    assert_eq!(get_core(addr).await, 200);
    assert_eq!(
        (a.requests(), b.requests()),
        (1, 1),
        "traffic went to the new upstream"
    );

    // A bad file: refused, naming the key; the running config stays.
    std::fs::write(
        &file,
        config(dir.path(), a.addr, OLD_SECRET, "10s").replace(&a.addr.to_string(), "nope"),
    )
    .unwrap();
    kill(&child, "HUP");
    let refused = log.line_with("config not reloaded").await;
    assert!(refused.contains("core.web"), "{refused}");
    assert_eq!(get_core(addr).await, 200);
    assert_eq!(
        (a.requests(), b.requests()),
        (1, 2),
        "still the new upstream"
    );

    // The same file again: nothing changed since the last good one.
    std::fs::write(&file, config(dir.path(), b.addr, NEW_SECRET, "20s")).unwrap();
    kill(&child, "HUP");
    let same = log.line_with("config reloaded").await;
    assert!(same.contains("changed=0"), "{same}");

    kill(&child, "TERM");
    exits_0(child).await;
    let all = log.until_exit().await.join("\n");
    for s in [OLD_SECRET, NEW_SECRET] {
        assert!(!all.contains(s), "a secret reached the log:\n{all}");
    }
}

/// An upstream that tells when a request arrived and answers `from the old upstream` only once
/// `release` is notified.
async fn gated_upstream() -> (
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<()>,
    std::sync::Arc<tokio::sync::Notify>,
) {
    use http_body_util::Full;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (arrived_tx, arrived) = tokio::sync::mpsc::unbounded_channel();
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let r = release.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (arrived_tx, r) = (arrived_tx.clone(), r.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let (arrived_tx, r) = (arrived_tx.clone(), r.clone());
                    async move {
                        let released = r.notified();
                        let _ = arrived_tx.send(());
                        released.await;
                        let body = Full::new(bytes::Bytes::from("from the old upstream"));
                        Ok::<_, std::convert::Infallible>(http::Response::new(body))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, arrived, release)
}

#[tokio::test]
async fn a_request_under_way_ends_on_the_old_pool_while_new_ones_use_the_new() {
    let (old, mut arrived, release) = gated_upstream().await;
    let new = Upstream::start(Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fediedge.toml");
    std::fs::write(&file, config(dir.path(), old, "s", "10s")).unwrap();
    let running = fediedge::serve::start(fediedge::config::load(&file).unwrap())
        .await
        .unwrap();
    let addr = running.addr;
    let under_way = tokio::spawn(async move {
        let r = crate::common::client()
            .get(format!("http://{addr}/slow"))
            .header("host", CORE)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    });
    tokio::time::timeout(WAIT, arrived.recv())
        .await
        .expect("the request reached the old upstream");

    std::fs::write(&file, config(dir.path(), new.addr, "s", "10s")).unwrap();
    let changes = running.reload_config().expect("a good config reloads");
    let keys: Vec<&str> = changes.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys, ["core.web"]);
    assert_eq!(get_core(addr).await, 200);
    assert_eq!(new.requests(), 1, "a new request goes to the new upstream");

    release.notify_one();
    let (status, body) = tokio::time::timeout(WAIT, under_way)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "from the old upstream"));

    // A bad file changes nothing and says why.
    std::fs::write(&file, "[core]\nhosts = [\"a.example\"]\nweb = []\n").unwrap();
    let err = running.reload_config().unwrap_err().to_string();
    assert!(err.contains("core.web"), "{err}");
    assert_eq!(get_core(addr).await, 200);
    assert_eq!(new.requests(), 2);
    running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_new_core_hosts_and_logs_them() {
    const NEW: &str = "new.example.test";
    let up = Upstream::start(Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fediedge.toml");
    let old = config(dir.path(), up.addr, "s", "10s");
    std::fs::write(&file, &old).unwrap();
    let (child, rx) = spawn_binary(&file);
    let mut log = Log {
        rx,
        all: Vec::new(),
    };
    let addr: SocketAddr = field(&log.line_with("serving media").await, "addr")
        .parse()
        .unwrap();
    assert_eq!(get_as(addr, CORE).await, 200);
    assert_eq!(get_as(addr, NEW).await, 421, "not a core host yet");
    assert_eq!(up.requests(), 1);

    // The instance's names change: NEW routes to core, CORE no longer does.
    let hosts = format!("hosts = [\"{CORE}\"]");
    std::fs::write(&file, old.replace(&hosts, &format!("hosts = [\"{NEW}\"]"))).unwrap();
    kill(&child, "HUP");
    let line = log.line_with("changed `core.hosts`").await;
    assert!(
        line.contains(&format!(
            "changed `core.hosts` from [\"{CORE}\"] to [\"{NEW}\"]"
        )),
        "{line}"
    );
    assert!(!line.contains("restart"), "applied live: {line}");
    let done = log.line_with("config reloaded").await;
    assert!(done.contains("at_restart=0"), "{done}");
    assert_eq!(get_as(addr, NEW).await, 200);
    assert_eq!(up.requests(), 2, "the new name reached core");
    assert_eq!(
        get_as(addr, CORE).await,
        421,
        "the old name is no longer served"
    );
    assert_eq!(up.requests(), 2);

    kill(&child, "TERM");
    exits_0(child).await;
}

#[tokio::test]
async fn a_reload_that_adds_core_leaves_the_routes_for_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fediedge.toml");
    let media_only = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n",
        dir.path().join("var").display()
    );
    std::fs::write(&file, &media_only).unwrap();
    let running = fediedge::serve::start(fediedge::config::load(&file).unwrap())
        .await
        .unwrap();
    let up = Upstream::start(Mode::Answer).await;
    std::fs::write(
        &file,
        format!(
            "{media_only}[core]\nhosts = [\"{CORE}\"]\nweb = [\"{}\"]\n",
            up.addr
        ),
    )
    .unwrap();
    let changes = running.reload_config().expect("a good config reloads");
    assert!(changes.iter().any(|c| c.key == "core.hosts"), "{changes:?}");
    // No proxy was made at start: the new core host is not routed (media, as before: 404).
    assert_eq!(get_as(running.addr, CORE).await, 404);
    assert_eq!(up.requests(), 0);
    running.shutdown().await;
}

#[tokio::test]
async fn a_reload_adds_a_media_host() {
    const FILES: &str = "files.example.test";
    let up = Upstream::start(Mode::Answer).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("media");
    std::fs::create_dir_all(root.join("a")).unwrap();
    std::fs::write(root.join("a/b.png"), "png").unwrap();
    let file = dir.path().join("fediedge.toml");
    let text = |media_hosts: &str| {
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
             media_hosts = [{media_hosts}]\n[primary]\ntype = \"fs\"\nroot = \"{}\"\n\
             [core]\nhosts = [\"{CORE}\"]\nweb = [\"{}\"]\nhealth_check_interval = \"0s\"\n",
            dir.path().join("var").display(),
            root.display(),
            up.addr
        )
    };
    std::fs::write(&file, text("")).unwrap();
    let running = fediedge::serve::start(fediedge::config::load(&file).unwrap())
        .await
        .unwrap();
    let get = |host: &'static str| {
        let addr = running.addr;
        async move {
            let r = crate::common::client()
                .get(format!("http://{addr}/a/b.png"))
                .header("host", host)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(get(FILES).await.0, 421, "not a media host yet");

    std::fs::write(&file, text(&format!("\"{FILES}\""))).unwrap();
    let changes = running.reload_config().expect("a good config reloads");
    let keys: Vec<&str> = changes.iter().map(|c| c.key.as_str()).collect();
    assert_eq!(keys, ["media_hosts"]);
    assert_eq!(get(FILES).await, (200, "png".to_owned()));
    // The instance's own name still goes to core.
    assert_eq!(get(CORE).await.0, 200);
    assert_eq!(up.requests(), 1);
    running.shutdown().await;
}
