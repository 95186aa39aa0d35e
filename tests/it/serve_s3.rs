//! `fediedge serve` with an S3 primary on a real Garage node.

use std::path::Path;
use std::time::Duration;

use crate::common::garage::Garage;
use crate::common::origin::Origin;
use crate::common::{bytes, client, eventually, start_edge};

const KEY: &str = "cache/media_attachments/files/109/348/502/375/432/917/original/0123abcd.png";

fn s3_store(g: &Garage) -> fediedge::store::StoreHandle {
    let text = format!("[primary]\n{}", g.store_toml());
    let config = fediedge::config::from_str(&text, Path::new("t.toml")).unwrap();
    fediedge::store::open(&config.primary, fediedge::metrics::Metrics::new()).unwrap()
}

async fn object_in(g: &Garage, key: &str) -> Option<Vec<u8>> {
    use futures_util::StreamExt;
    let store = s3_store(g);
    let key = fediedge::key::Key::parse(key).unwrap();
    let mut obj = store.get(&key).await.unwrap()?;
    let mut out = Vec::new();
    while let Some(chunk) = obj.body.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    Some(out)
}

#[tokio::test]
async fn pull_through_copies_into_garage_and_the_primary_serves_it_afterwards() {
    let garage = Garage::start();
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    let body = bytes(123_457, 7);
    origin.put(KEY, body.clone());
    let config = format!(
        "url_prefix = \"/\"\n[primary]\n{}[[fallback]]\nname = \"old-nfs-nginx\"\ntype = \"http\"\nurl = \"{}\"\n",
        garage.store_toml(),
        origin.url()
    );
    let edge = start_edge(dir.path(), &config).await;
    let base = format!("http://{}/", edge.running.addr);
    let r = client().get(format!("{base}{KEY}")).send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "FALLBACK");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &body[..]);
    let mut stored = None;
    for _ in 0..200 {
        stored = object_in(&garage, KEY).await;
        if stored.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        stored.as_deref(),
        Some(&body[..]),
        "copied whole into the bucket"
    );
    let meta = s3_store(&garage)
        .head(&fediedge::key::Key::parse(KEY).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(meta.content_type.as_deref(), Some("image/png"));
    assert_eq!(
        meta.md5.map(hex::encode),
        Some(hex::encode(<md5::Md5 as md5::Digest>::digest(&body)))
    );

    // No cache: the next request is answered by the primary, not the old origin.
    let r = client().get(format!("{base}{KEY}")).send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "MISS");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &body[..]);
    assert_eq!(origin.gets(KEY), 1);
    edge.running.shutdown().await;
}

#[tokio::test]
async fn copies_wait_out_a_primary_outage_and_a_restart() {
    let garage = Garage::start();
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    let body = bytes(50_000, 8);
    origin.put(KEY, body.clone());
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let down = garage
        .store_toml()
        .replace(&garage.endpoint, &format!("http://{closed}"));
    let fallback = format!(
        "[[fallback]]\ntype = \"http\"\nurl = \"{}\"\n",
        origin.url()
    );
    let edge = start_edge(
        dir.path(),
        &format!(
            "[primary]\n{down}connect_timeout = \"300ms\"\nfirst_byte_timeout = \"1s\"\n{fallback}"
        ),
    )
    .await;
    let r = client()
        .get(format!("{}{KEY}", edge.base))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "served from the fallback while the primary is down"
    );
    assert_eq!(r.bytes().await.unwrap().as_ref(), &body[..]);
    let ledger = edge.running.ledger.clone();
    eventually(Duration::from_secs(10), "a failed attempt", || {
        edge.running
            .metrics
            .render()
            .contains("fediedge_writebacks_total{outcome=\"failed\"}")
    })
    .await;
    assert_eq!(ledger.with(fediedge::ledger::ops::pending).unwrap(), 1);
    edge.running.shutdown().await;
    drop(ledger);

    // Restart with the primary back: the queued copy happens, from the staged body (the
    // origin is not asked again).
    let edge = start_edge(
        dir.path(),
        &format!("[primary]\n{}{fallback}", garage.store_toml()),
    )
    .await;
    let ledger = edge.running.ledger.clone();
    eventually(Duration::from_secs(20), "the queued copy", || {
        ledger.with(fediedge::ledger::ops::pending).unwrap() == 0
    })
    .await;
    assert_eq!(object_in(&garage, KEY).await.as_deref(), Some(&body[..]));
    let record = ledger
        .with(|c| fediedge::ledger::ops::copied(c, KEY))
        .unwrap()
        .unwrap();
    assert_eq!(record.size, 50_000);
    assert_eq!(origin.gets(KEY), 1);
    let staged: Vec<_> = std::fs::read_dir(dir.path().join("var/staging"))
        .unwrap()
        .collect();
    assert!(staged.is_empty(), "staged bodies are removed once copied");
    edge.running.shutdown().await;
}

#[tokio::test]
async fn an_old_bucket_as_fallback_is_copied_into_a_new_one_with_its_content_type() {
    let garage = Garage::start();
    let old = garage.add_bucket("old-media");
    let dir = tempfile::tempdir().unwrap();
    // Put an object into the old bucket through the store layer (as Mastodon would have).
    let src = dir.path().join("src.webp");
    let body = bytes(70_000, 9);
    std::fs::write(&src, &body).unwrap();
    let old_config =
        fediedge::config::from_str(&format!("[primary]\n{old}"), Path::new("t.toml")).unwrap();
    let old_store =
        fediedge::store::open(&old_config.primary, fediedge::metrics::Metrics::new()).unwrap();
    let key = fediedge::key::Key::parse("accounts/avatars/000/000/002/original/x.webp").unwrap();
    let meta = fediedge::store::ObjectMeta {
        size: body.len() as u64,
        content_type: Some("image/webp".into()),
        ..Default::default()
    };
    old_store.put(&key, &src, &meta).await.unwrap();

    let edge = start_edge(
        dir.path(),
        &format!(
            "url_prefix = \"/\"\n[cache]\nmax_size = \"10MiB\"\n[primary]\n{}[[fallback]]\nname = \"old-bucket\"\n{old}",
            garage.store_toml()
        ),
    )
    .await;
    let url = format!("http://{}/{}", edge.running.addr, key);
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "FALLBACK");
    assert_eq!(r.headers()["content-type"], "image/webp");
    assert_eq!(r.bytes().await.unwrap().as_ref(), &body[..]);
    // The client's last byte goes out before the cache bookkeeping: wait for it.
    let cache = edge.running.cache.clone().unwrap();
    eventually(Duration::from_secs(10), "cached", || cache.usage().1 == 1).await;
    let r = client().get(&url).send().await.unwrap();
    assert_eq!(r.headers()["x-cache-status"], "HIT");
    let ledger = edge.running.ledger.clone();
    eventually(Duration::from_secs(10), "copied", || {
        ledger
            .with(|c| fediedge::ledger::ops::copied(c, key.as_str()))
            .unwrap()
            .is_some()
    })
    .await;
    let new_meta = s3_store(&garage).head(&key).await.unwrap().unwrap();
    assert_eq!(new_meta.content_type.as_deref(), Some("image/webp"));
    assert_eq!(
        object_in(&garage, key.as_str()).await.as_deref(),
        Some(&body[..])
    );
    edge.running.shutdown().await;
}

/// Mastodon with `S3_KEY_PREFIX=mastodon` and an alias host: the URL is
/// `https://<alias>/mastodon/<key>` and the object is `mastodon/<key>` at the bucket root.
/// `config from-mastodon` gives `url_prefix = "/mastodon/"` and `prefix = "mastodon"`.
#[tokio::test]
async fn a_key_prefix_is_taken_off_the_url_and_put_back_once() {
    let garage = Garage::start();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("x");
    std::fs::write(&src, b"prefixed").unwrap();
    let raw = s3_store(&garage);
    let meta = fediedge::store::ObjectMeta {
        size: 8,
        ..Default::default()
    };
    let object_key = "mastodon/media_attachments/files/000/000/001/original/p.png";
    raw.put(&fediedge::key::Key::parse(object_key).unwrap(), &src, &meta)
        .await
        .unwrap();
    let edge = start_edge(
        dir.path(),
        &format!(
            "url_prefix = \"/mastodon/\"\n[primary]\n{}prefix = \"mastodon\"\n",
            garage.store_toml()
        ),
    )
    .await;
    let r = client()
        .get(format!("http://{}/{object_key}", edge.running.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "prefixed");
    edge.running.shutdown().await;
}
