//! The core cache keys by the scheme core is told (`X-Forwarded-Proto`): Rails builds
//! redirects, links and `secure` cookies from it, so what core answers an http request never
//! answers an https one (RFC 9111 §2: the key is the target URI, scheme included). HTTP/2
//! requests, which carry their name in the URI, are stored and revalidated with it as `Host`.

use crate::corecache::{cache_conf, fetch, hs, reply, Core};
use crate::proxy::{edge_with_core, CORE};
use crate::proxy_tls::{client, tls};

/// Core answers every URL with the scheme and host it was told, `public, max-age=600`.
async fn telling_core() -> Core {
    Core::start(|s, _| {
        reply(
            200,
            &[("cache-control", "public, max-age=600")],
            &format!("{} for {}", hs(s, "x-forwarded-proto"), hs(s, "host")),
        )
    })
    .await
}

async fn about(edge: &crate::common::TestEdge, proto: &str) -> (u16, String, String) {
    fetch(edge, "/about", &[("x-forwarded-proto", proto)]).await
}

/// Behind a trusted proxy that passes the scheme on: one entry per scheme, each answering
/// only its own; a value the cache cannot key (a list, two fields, another word) is passed
/// on and never stored.
#[tokio::test]
async fn each_scheme_a_trusted_proxy_names_has_entries_of_its_own() {
    let core = telling_core().await;
    let dir = tempfile::tempdir().unwrap();
    let trusted = "trusted_proxies = [\"127.0.0.0/8\"]\n";
    let edge = edge_with_core(
        dir.path(),
        &[core.addr()],
        &cache_conf(dir.path(), "16MiB", trusted),
    )
    .await;
    let told = |proto: &str| format!("{proto} for {CORE}");

    assert_eq!(
        about(&edge, "http").await,
        (200, "MISS".into(), told("http"))
    );
    assert_eq!(
        about(&edge, "https").await,
        (200, "MISS".into(), told("https")),
        "the http answer is not the https one"
    );
    assert_eq!(
        about(&edge, "http").await,
        (200, "HIT".into(), told("http"))
    );
    assert_eq!(
        about(&edge, "https").await,
        (200, "HIT".into(), told("https"))
    );
    assert_eq!(core.count("/about"), 2);

    for odd in ["https, http", "HTTPS", "wss"] {
        let (_, cache, body) = fetch(&edge, "/odd", &[("x-forwarded-proto", odd)]).await;
        assert_eq!((cache.as_str(), body), ("BYPASS", told(odd)), "{odd}");
    }
    let mut twice = crate::proxy::get(&edge, CORE, "/odd");
    for proto in ["https", "http"] {
        twice = twice.header("x-forwarded-proto", proto);
    }
    let r = twice.send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "BYPASS");
    let usage = edge.running.core_cache.as_ref().unwrap().usage();
    assert_eq!(usage.1, 2, "none of /odd's answers stored");
    let (_, cache, body) = fetch(&edge, "/odd", &[("x-forwarded-proto", "https")]).await;
    assert_eq!((cache.as_str(), body), ("MISS", told("https")));
}

/// The TLS listener's requests (`https`) and the plain one's (`http`) never share an entry,
/// and an HTTP/2 client's entry is revalidated with its `Host` (the URI's authority), not
/// the upstream's address.
#[tokio::test]
async fn https_and_http_listeners_never_share_and_http2_revalidates_with_its_host() {
    let core = Core::start(|s, _| {
        let body = format!("{} for {}", hs(s, "x-forwarded-proto"), hs(s, "host"));
        match hs(s, "if-none-match") {
            "\"v1\"" => reply(304, &[("etag", "\"v1\"")], ""),
            _ => reply(
                200,
                &[("cache-control", "no-cache"), ("etag", "\"v1\"")],
                &body,
            ),
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (root, table) = tls(dir.path(), &[CORE]);
    let conf = cache_conf(dir.path(), "16MiB", &table);
    let edge = edge_with_core(dir.path(), &[core.addr()], &conf).await;
    let addr = edge.running.https_addr.expect("a TLS listener");
    let name = format!("{CORE}:{}", addr.port());
    let url = format!("https://{name}/public");
    let h2 = client(&root, addr, false);

    let r = h2.get(&url).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.headers()["x-cache-status"], "MISS");
    assert_eq!(r.text().await.unwrap(), format!("https for {name}"));
    let r = h2.get(&url).send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "REVALIDATED");
    assert_eq!(r.text().await.unwrap(), format!("https for {name}"));
    let seen = core.last("/public");
    assert_eq!(hs(&seen, "if-none-match"), "\"v1\"", "a revalidation");
    assert_eq!(
        hs(&seen, "host"),
        name,
        "the client's name, not core's address"
    );

    // The same name over the plain listener: core's answer to http, stored apart.
    let plain = |path| {
        crate::common::client()
            .get(format!("http://{}{path}", edge.running.addr))
            .header("host", &name)
    };
    let r = plain("/public").send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "MISS");
    assert_eq!(r.text().await.unwrap(), format!("http for {name}"));
    let r = plain("/public").send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "REVALIDATED");
    assert_eq!(r.text().await.unwrap(), format!("http for {name}"));
    let r = h2.get(&url).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), format!("https for {name}"));
    assert_eq!(core.count("/public"), 5);
}

/// The scheme an entry is keyed by is the one core is told, also when a reload changes
/// `trusted_proxies` while the request waits (here, as a follower of another request to
/// its URL): the request keyed `http` (its peer untrusted when it came, its
/// `X-Forwarded-Proto: https` not passed on) tells core `http`, not the `https` the peer,
/// trusted by the time it is sent, names. Else core's answer for https would be stored for
/// http.
#[tokio::test]
async fn the_scheme_core_is_told_is_the_one_keyed_across_a_reload_of_trusted_proxies() {
    let (open, gate) = tokio::sync::watch::channel(false);
    let core = Core::start(move |s, n| match n {
        // The first request is held, and its answer (an error) not shared: its follower
        // goes to core on its own.
        1 => crate::corecache::Reply {
            gate: Some(gate.clone()),
            ..reply(503, &[], "first")
        },
        _ => reply(
            200,
            &[("cache-control", "public, max-age=600")],
            hs(s, "x-forwarded-proto"),
        ),
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("primary");
    std::fs::create_dir_all(&root).unwrap();
    let config = |trusted: &str| {
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ndata_dir = \"{}\"\n\
             media_hosts = [\"files.test\"]\n[primary]\ntype = \"fs\"\nroot = \"{}\"\n\
             [core]\nhosts = [\"{CORE}\"]\nweb = [\"{}\"]\nhealth_check_interval = \"0s\"\n\
             {trusted}{}",
            dir.path().join("var").display(),
            root.display(),
            core.addr(),
            cache_conf(dir.path(), "16MiB", "")
        )
    };
    let file = dir.path().join("fediedge.toml");
    std::fs::write(&file, config("")).unwrap();
    let running = fediedge::serve::start(fediedge::config::load(&file).unwrap())
        .await
        .unwrap();
    let addr = running.addr;
    let get = move |proto: Option<&'static str>| async move {
        let mut r = crate::common::client()
            .get(format!("http://{addr}/page"))
            .header("host", CORE);
        if let Some(p) = proto {
            r = r.header("x-forwarded-proto", p);
        }
        let r = r.send().await.unwrap();
        let cache = r.headers()["x-cache-status"].to_str().unwrap().to_owned();
        (cache, r.text().await.unwrap())
    };
    let coalesced = || {
        running
            .metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix("fediedge_coalesced_requests_total "))
            .map_or(0, |v| v.trim().parse::<u64>().unwrap())
    };

    let leader = tokio::spawn(get(None));
    crate::common::eventually(crate::proxy::WAIT, "the first request at core", || {
        core.count("/page") == 1
    })
    .await;
    // From an untrusted peer: keyed `http`, its `https` not for core.
    let follower = tokio::spawn(get(Some("https")));
    crate::common::eventually(crate::proxy::WAIT, "the second request follows", || {
        coalesced() == 1
    })
    .await;
    std::fs::write(&file, config("trusted_proxies = [\"127.0.0.0/8\"]\n")).unwrap();
    running.reload_config().expect("a good config reloads");
    open.send(true).unwrap();
    assert_eq!(leader.await.unwrap().1, "first");
    assert_eq!(
        follower.await.unwrap(),
        ("MISS".to_owned(), "http".to_owned()),
        "core told the scheme the request was keyed by"
    );
    assert_eq!(hs(&core.last("/page"), "x-forwarded-proto"), "http");
    crate::common::eventually(crate::proxy::WAIT, "stored", || {
        running.core_cache.as_ref().unwrap().usage().1 == 1
    })
    .await;
    // A plain request (no header: `http`) gets core's answer for http.
    assert_eq!(get(None).await, ("HIT".to_owned(), "http".to_owned()));
    running.shutdown().await;
}

/// Requests for one URL in two schemes never share an answer, so neither waits for the
/// other's: while core holds the http request, the https one goes to core at once (one
/// request per URL and scheme), and each gets its own answer.
#[tokio::test]
async fn a_request_does_not_wait_for_one_of_another_scheme() {
    let (open, gate) = tokio::sync::watch::channel(false);
    let core = Core::start(move |s, _| {
        let proto = hs(s, "x-forwarded-proto");
        let r = reply(200, &[("cache-control", "public, max-age=600")], proto);
        match proto {
            "http" => crate::corecache::Reply {
                gate: Some(gate.clone()),
                ..r
            },
            _ => r,
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let trusted = "trusted_proxies = [\"127.0.0.0/8\"]\n";
    let edge = std::sync::Arc::new(
        edge_with_core(
            dir.path(),
            &[core.addr()],
            &cache_conf(dir.path(), "16MiB", trusted),
        )
        .await,
    );
    let e = edge.clone();
    let http = tokio::spawn(async move { about(&e, "http").await });
    crate::common::eventually(crate::proxy::WAIT, "the http request at core", || {
        core.count("/about") == 1
    })
    .await;
    let e = edge.clone();
    let https = tokio::spawn(async move { about(&e, "https").await });
    crate::common::eventually(
        crate::proxy::WAIT,
        "the https request at core while the http one is held",
        || core.count("/about") == 2,
    )
    .await;
    assert_eq!(https.await.unwrap(), (200, "MISS".into(), "https".into()));
    open.send(true).unwrap();
    assert_eq!(http.await.unwrap(), (200, "MISS".into(), "http".into()));
}

/// A client that is not a trusted proxy cannot pick the scheme: its `X-Forwarded-Proto` is
/// neither passed to core nor used as the key, on either listener.
#[tokio::test]
async fn an_untrusted_clients_forwarded_proto_picks_no_scheme() {
    let core = telling_core().await;
    let dir = tempfile::tempdir().unwrap();
    let (root, table) = tls(dir.path(), &[CORE]);
    let edge = edge_with_core(
        dir.path(),
        &[core.addr()],
        &cache_conf(dir.path(), "16MiB", &table),
    )
    .await;
    let addr = edge.running.https_addr.expect("a TLS listener");
    let h2 = client(&root, addr, false);
    let url = format!("https://{CORE}:{}/about", addr.port());
    let name = format!("{CORE}:{}", addr.port());
    let over_tls = |proto: &'static str| {
        let (h2, url) = (h2.clone(), url.clone());
        async move {
            let r = h2
                .get(url)
                .header("x-forwarded-proto", proto)
                .send()
                .await
                .unwrap();
            let cache = r.headers()["x-cache-status"].to_str().unwrap().to_owned();
            (cache, r.text().await.unwrap())
        }
    };
    let https = format!("https for {name}");
    assert_eq!(over_tls("http").await, ("MISS".into(), https.clone()));
    assert_eq!(over_tls("wss").await, ("HIT".into(), https.clone()));
    assert_eq!(over_tls("https").await, ("HIT".into(), https));
    // The plain listener: `http`, whatever the client says.
    for (proto, cache) in [("https", "MISS"), ("http", "HIT"), ("wss", "HIT")] {
        assert_eq!(
            about(&edge, proto).await,
            (200, cache.into(), format!("http for {CORE}")),
            "{proto}"
        );
    }
    assert_eq!(core.count("/about"), 2);
}
