//! N edges in front of a Garage cluster (issue 11): three real Garage nodes (replication
//! factor 3), two in-process edges sharing the bucket, each with its own cache, `data_dir` and
//! ledger, each reaching the cluster through its own [`Link`] (edge A to node 0, edge B to
//! node 1), and a real HTTP origin as the old store every edge falls back to.
//!
//! Each test ends with one `cluster figures:` line on stderr (objects, failures injected,
//! objects lost, run time); `cargo test --test it cluster -- --nocapture` shows them.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::join_all;
use futures_util::StreamExt;

use crate::common::garage_cluster::{GarageCluster, Link};
use crate::common::origin::{Behaviour, Origin};
use crate::common::{bytes, client, eventually, start_edge, TestEdge};

/// Long enough for write-backs that wait out a backoff of a few attempts; a bound on a
/// background effect, not a timing assertion.
const COPIED: Duration = Duration::from_secs(120);

/// A Mastodon-like key in group `group`.
fn key(group: &str, i: usize) -> String {
    format!(
        "media_attachments/files/111/{group}/{:03}/original/{i:016x}.png",
        i / 10
    )
}

/// Bodies from 1 KB to ~300 KB, and one of 5 MiB (several chunks on every path).
fn body(group: &str, i: usize) -> Vec<u8> {
    let seed = group.bytes().fold(i as u8, |a, b| a.wrapping_mul(31) ^ b);
    let len = if i == 3 {
        5 * 1024 * 1024 + 17
    } else {
        1_000 + (i * 37_337) % 300_000
    };
    bytes(len, seed)
}

/// The objects of one group: `n` keys with their bodies, put on the origin.
fn group(origin: &Origin, name: &str, n: usize) -> Vec<(String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let (k, b) = (key(name, i), body(name, i));
            origin.put(&k, b.clone());
            (k, b)
        })
        .collect()
}

/// Starts an edge in `dir` with a cache, the cluster at `endpoint` as primary and the origin
/// as fallback `old-origin`. Returns the edge and its config text (for `fediedge migrate`).
async fn edge(
    dir: &std::path::Path,
    cluster: &GarageCluster,
    endpoint: &str,
    origin: &Origin,
) -> (TestEdge, String) {
    let config = format!(
        "[cache]\nmax_size = \"256MiB\"\n[primary]\n{}connect_timeout = \"2s\"\nfirst_byte_timeout = \"3s\"\n[[fallback]]\nname = \"old-origin\"\ntype = \"http\"\nurl = \"{}\"\n",
        cluster.store_toml_at(endpoint),
        origin.url()
    );
    (start_edge(dir, &config).await, config)
}

/// An edge and the HTTP client the test talks to it with (one per edge: building a client
/// per request loads root certificates each time, and 60 requests would start one after the
/// other instead of at once).
struct Edge {
    edge: TestEdge,
    http: reqwest::Client,
}

impl std::ops::Deref for Edge {
    type Target = TestEdge;
    fn deref(&self) -> &TestEdge {
        &self.edge
    }
}

/// One answer of an edge: status, `X-Cache-Status`, body.
struct Answer {
    status: u16,
    cache: String,
    body: Bytes,
}

async fn get(edge: &Edge, key: &str) -> Answer {
    let r = edge
        .http
        .get(format!("{}{key}", edge.base))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let cache = r.headers()["x-cache-status"].to_str().unwrap().to_owned();
    let body = r.bytes().await.unwrap_or_default();
    Answer {
        status,
        cache,
        body,
    }
}

/// GETs every object of `objects` through `edge` at once; asserts each is whole and answered
/// with `expect` as `X-Cache-Status`.
async fn get_all(edge: &Edge, objects: &[(String, Vec<u8>)], expect: &str, what: &str) {
    let answers = join_all(objects.iter().map(|(k, _)| get(edge, k))).await;
    for ((k, b), a) in objects.iter().zip(answers) {
        assert_eq!(a.status, 200, "{what}: {k}");
        assert_eq!(a.cache, expect, "{what}: {k}");
        assert!(a.body.as_ref() == &b[..], "{what}: {k} not whole");
    }
}

/// Waits until `edge`'s ledger records a copy of every key of `objects` and its write-back
/// queue is empty. An empty queue alone is not enough: a response may end before its copy is
/// even queued. On timeout, the message lists what is still queued, with each copy's attempts
/// and last error.
async fn copied(edge: &Edge, objects: &[(String, Vec<u8>)], what: &str) {
    let ledger = edge.running.ledger.clone();
    let started = Instant::now();
    while !ledger.with(|c| {
        objects
            .iter()
            .all(|(k, _)| fediedge::ledger::ops::copied(c, k).unwrap().is_some())
            && fediedge::ledger::ops::pending(c).unwrap() == 0
    }) {
        if started.elapsed() > COPIED {
            let queue = ledger.with(|c| {
                let mut rows = c
                    .prepare("SELECT key, attempts, last_error FROM writeback_queue")
                    .unwrap();
                rows.query_map([], |r| {
                    Ok(format!(
                        "{} attempts {}: {}",
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Option<String>>(2)?.unwrap_or_default()
                    ))
                })
                .unwrap()
                .map(Result::unwrap)
                .collect::<Vec<_>>()
            });
            panic!(
                "timed out waiting for: {what}; still queued:\n{}",
                queue.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn queued(edge: &Edge) -> u64 {
    edge.running
        .ledger
        .with(fediedge::ledger::ops::pending)
        .unwrap()
}

/// The bucket as seen through `endpoint`, read with fediedge's own S3 store.
fn bucket(cluster: &GarageCluster, endpoint: &str) -> fediedge::store::StoreHandle {
    let text = format!("[primary]\n{}", cluster.store_toml_at(endpoint));
    let config = fediedge::config::from_str(&text, std::path::Path::new("t.toml")).unwrap();
    fediedge::store::open(&config.primary, fediedge::metrics::Metrics::new()).unwrap()
}

/// Reads `key` from `store`; why not when absent or unreadable.
async fn read(store: &fediedge::store::StoreHandle, key: &str) -> Result<Vec<u8>, String> {
    let key = fediedge::key::Key::parse(key).unwrap();
    let mut obj = store
        .get(&key)
        .await
        .map_err(|e| e.to_string())?
        .ok_or("absent")?;
    let mut out = Vec::new();
    while let Some(chunk) = obj.body.next().await {
        let chunk = chunk.map_err(|e| format!("after {} bytes: {e}", out.len()))?;
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Reads every object back through `endpoint`; returns how many are missing or not whole.
/// A read that fails (the node busy, a quorum not reached yet: no answer about the object)
/// is asked again until [`COPIED`] has passed; "absent" and wrong bytes count at once.
async fn lost(cluster: &GarageCluster, endpoint: &str, objects: &[(String, Vec<u8>)]) -> usize {
    let store = bucket(cluster, endpoint);
    let started = Instant::now();
    let read_settled = |k: &str| {
        let store = &store;
        let k = k.to_owned();
        async move {
            loop {
                match read(store, &k).await {
                    Err(e) if e != "absent" && started.elapsed() < COPIED => {
                        eprintln!("read of {k} via {endpoint} failed, asking again: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    r => return r,
                }
            }
        }
    };
    let reads = join_all(objects.iter().map(|(k, _)| read_settled(k))).await;
    let mut lost = 0;
    for ((k, b), r) in objects.iter().zip(reads) {
        if r.as_deref() != Ok(&b[..]) {
            eprintln!(
                "LOST via {endpoint}: {k} ({} bytes): {:?}",
                b.len(),
                r.map(|r| format!("{} bytes read", r.len()))
            );
            lost += 1;
        }
    }
    lost
}

fn figures(test: &str, objects: usize, failures: usize, lost: usize, started: Instant) {
    eprintln!(
        "cluster figures: {test}: objects {objects}, failures injected {failures}, objects lost {lost}, run time {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// Waits until each node of `nodes` answers an S3 request for the bucket with the test's key
/// (a HEAD of a key nobody writes: "absent" needs the node to know key and bucket and to
/// reach a read quorum). Every node reporting every node up is necessary, not proof: this is
/// what an edge will ask. A bound on the cluster settling, not a timing assertion.
async fn serving(cluster: &GarageCluster, nodes: &[usize]) {
    let probe = fediedge::key::Key::parse(&key("probe", 0)).unwrap();
    for &i in nodes {
        let store = bucket(cluster, &format!("http://{}", cluster.s3_addr(i)));
        let started = Instant::now();
        loop {
            match store.head(&probe).await {
                Ok(None) => break,
                other => assert!(
                    started.elapsed() < COPIED,
                    "garage node {i} does not serve the bucket: {other:?} (log: {})",
                    cluster.log(i).display()
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The rig: cluster, origin, one link per edge, two edges.
struct Rig {
    cluster: GarageCluster,
    origin: Origin,
    links: [Link; 2],
    edges: [Edge; 2],
    configs: [String; 2],
    _dirs: [tempfile::TempDir; 2],
}

impl Rig {
    async fn start() -> Rig {
        // The edges' logs (write-back failures with their errors), shown with a failing
        // test's output; `RUST_LOG` picks the level.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "fediedge=info".into()),
            )
            .with_test_writer()
            .try_init();
        let cluster = tokio::task::block_in_place(GarageCluster::start);
        serving(&cluster, &[0, 1, 2]).await;
        let origin = Origin::start().await;
        let links = [
            Link::start(cluster.s3_addr(0)).await,
            Link::start(cluster.s3_addr(1)).await,
        ];
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let (a, ca) = edge(dirs[0].path(), &cluster, &links[0].endpoint(), &origin).await;
        let (b, cb) = edge(dirs[1].path(), &cluster, &links[1].endpoint(), &origin).await;
        Rig {
            cluster,
            origin,
            links,
            edges: [a, b].map(|edge| Edge {
                edge,
                http: client(),
            }),
            configs: [ca, cb],
            _dirs: dirs,
        }
    }

    /// Objects lost, read back through every node that is up (`up`).
    async fn lost_via(&self, up: &[usize], objects: &[(String, Vec<u8>)]) -> usize {
        let mut n = 0;
        for &i in up {
            let endpoint = format!("http://{}", self.cluster.s3_addr(i));
            n += lost(&self.cluster, &endpoint, objects).await;
        }
        n
    }

    async fn shutdown(self) {
        let [a, b] = self.edges;
        a.edge.running.shutdown().await;
        b.edge.running.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_object_pulled_through_edge_a_is_served_by_edge_b_from_the_primary() {
    let started = Instant::now();
    let rig = Rig::start().await;
    let [a, b] = &rig.edges;
    let objects = group(&rig.origin, "ab", 24);

    get_all(a, &objects, "FALLBACK", "edge A, first request").await;
    copied(a, &objects, "edge A's copies into the cluster").await;
    get_all(b, &objects, "MISS", "edge B, from the primary").await;
    get_all(a, &objects, "HIT", "edge A, from its cache").await;
    get_all(b, &objects, "HIT", "edge B, from its cache").await;

    for (k, _) in &objects {
        assert_eq!(rig.origin.gets(k), 1, "one GET at the old origin for {k}");
    }
    assert_eq!(queued(b), 0, "edge B had nothing to copy");
    let lost = rig.lost_via(&[0, 1, 2], &objects).await;
    assert_eq!(lost, 0);
    figures("edge A to edge B", objects.len(), 0, lost, started);
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_storage_node_stops_neither_edge_and_loses_nothing() {
    let started = Instant::now();
    let mut rig = Rig::start().await;
    let before = group(&rig.origin, "before", 12);
    let crashed = group(&rig.origin, "crashed", 12);
    let noticed = group(&rig.origin, "noticed", 12);
    let back = group(&rig.origin, "back", 12);
    get_all(&rig.edges[0], &before, "FALLBACK", "A, all nodes up").await;
    copied(&rig.edges[0], &before, "A's copies, all nodes up").await;

    // Node 2 crashes. Right away (Garage has not noticed yet) and once the cluster reports it
    // down, both edges read from the primary and copy into it.
    tokio::task::block_in_place(|| rig.cluster.kill(2));
    let [a, b] = &rig.edges;
    get_all(b, &before, "MISS", "B reads what A copied, node 2 dead").await;
    get_all(a, &crashed, "FALLBACK", "A pulls through, node 2 dead").await;
    copied(a, &crashed, "A's copies with node 2 dead").await;
    tokio::task::block_in_place(|| rig.cluster.wait_degraded(0));
    get_all(b, &noticed, "FALLBACK", "B pulls through, node 2 down").await;
    copied(b, &noticed, "B's copies with node 2 down").await;
    get_all(a, &noticed, "MISS", "A reads what B copied, node 2 down").await;
    get_all(b, &crashed, "MISS", "B reads what A copied, node 2 down").await;

    tokio::task::block_in_place(|| rig.cluster.restart(2));
    serving(&rig.cluster, &[0, 1, 2]).await;
    let [a, b] = &rig.edges;
    get_all(a, &back, "FALLBACK", "A pulls through, node 2 back").await;
    copied(a, &back, "A's copies, node 2 back").await;
    get_all(b, &back, "MISS", "B reads what A copied, node 2 back").await;

    let all: Vec<_> = [&before[..], &crashed, &noticed, &back].concat();
    for (k, _) in &all {
        assert_eq!(rig.origin.gets(k), 1, "one GET at the old origin for {k}");
    }
    // Every object reads back whole through each node, the one that was dead included.
    let mut lost = rig.lost_via(&[0, 1, 2], &all).await;
    // Then node 0 dies: nodes 1 and 2 must now make the quorum, so node 2 is a working
    // replica again, not just a process that answers.
    tokio::task::block_in_place(|| rig.cluster.kill(0));
    lost += rig.lost_via(&[1, 2], &all).await;

    // Node 0 is edge A's endpoint: for A, the cluster is gone (connections refused). A
    // serves from its cache and the old origin and queues its copies until node 0 is back.
    let orphans = group(&rig.origin, "orphans", 6);
    let a = &rig.edges[0];
    get_all(a, &back, "HIT", "A, its own node dead: its cache").await;
    get_all(a, &orphans, "FALLBACK", "A, its own node dead: the origin").await;
    // A response may end just before its copy is queued: wait for the queue to fill.
    eventually(COPIED, "A queued every copy", || {
        queued(a) == orphans.len() as u64
    })
    .await;
    tokio::task::block_in_place(|| rig.cluster.restart(0));
    serving(&rig.cluster, &[0, 1, 2]).await;
    copied(&rig.edges[0], &orphans, "A's copies once its node is back").await;
    let all: Vec<_> = [all, orphans].concat();
    lost += rig.lost_via(&[0, 1, 2], &all).await;
    assert_eq!(
        lost,
        0,
        "objects lost (node logs: {})",
        rig.cluster.log(2).display()
    );
    figures("a storage node dies", all.len(), 3, lost, started);
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edge_cut_off_from_the_cluster_serves_from_cache_and_fallback_and_catches_up() {
    let started = Instant::now();
    let rig = Rig::start().await;
    let [a, b] = &rig.edges;
    let cached = group(&rig.origin, "cached", 12);
    let during = group(&rig.origin, "during", 12);
    let by_b = group(&rig.origin, "byb", 12);
    // New media Mastodon uploaded to the cluster itself: the old origin never had it.
    let fresh: Vec<_> = (0..4)
        .map(|i| (key("fresh", i), body("fresh", i + 10)))
        .collect();
    let store = bucket(&rig.cluster, &format!("http://{}", rig.cluster.s3_addr(1)));
    for (k, b) in &fresh {
        let meta = fediedge::store::ObjectMeta {
            size: b.len() as u64,
            ..Default::default()
        };
        let key = fediedge::key::Key::parse(k).unwrap();
        store
            .put_bytes(&key, Bytes::from(b.clone()), &meta)
            .await
            .unwrap();
    }
    get_all(a, &cached, "FALLBACK", "A before the cut").await;
    copied(a, &cached, "A's copies before the cut").await;

    rig.links[0].cut();
    get_all(a, &cached, "HIT", "A cut off: its cache").await;
    get_all(a, &during, "FALLBACK", "A cut off: the old origin").await;
    let unreachable = get(a, &fresh[0].0).await;
    assert_eq!(
        (unreachable.status, unreachable.cache.as_str()),
        (504, "ERROR"),
        "a key only the cluster has cannot be served by a cut-off edge without it in cache"
    );
    // Edge B is not cut off: it serves from the cluster and copies into it meanwhile.
    get_all(b, &fresh, "MISS", "B while A is cut off").await;
    get_all(b, &by_b, "FALLBACK", "B pulls through while A is cut off").await;
    copied(b, &by_b, "B's copies while A is cut off").await;
    // A has queued its copies and tried at least once, in vain.
    let metrics = a.running.metrics.clone();
    eventually(COPIED, "A's first failed copy attempt", || {
        metrics
            .render()
            .contains("fediedge_writebacks_total{outcome=\"failed\"}")
    })
    .await;
    eventually(COPIED, "A queued every copy", || {
        queued(a) == during.len() as u64
    })
    .await;
    let s = &store;
    let heads = join_all(
        during
            .iter()
            .map(|(k, _)| async move { s.head(&fediedge::key::Key::parse(k).unwrap()).await }),
    )
    .await;
    assert!(
        heads.iter().all(|h| matches!(h, Ok(None))),
        "nothing of A's reached the cluster yet: {heads:?}"
    );

    rig.links[0].restore();
    copied(a, &during, "A catches up once the cluster is back").await;
    get_all(a, &fresh, "MISS", "A back: the cluster's own media").await;
    get_all(b, &during, "MISS", "B reads what A copied after the cut").await;

    let all: Vec<_> = [cached, during, by_b, fresh].concat();
    for (k, _) in all.iter().filter(|(k, _)| !k.contains("/fresh/")) {
        assert_eq!(rig.origin.gets(k), 1, "one GET at the old origin for {k}");
    }
    let lost = rig.lost_via(&[0, 1, 2], &all).await;
    assert_eq!(lost, 0);
    figures("an edge is cut off", all.len(), 1, lost, started);
    rig.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_and_two_edges_copying_the_same_keys_leave_one_whole_object_per_key() {
    let started = Instant::now();
    let rig = Rig::start().await;
    let n = 30;
    // The origin answers slowly, so the three readers' GETs of a key overlap.
    let objects: Vec<_> = (0..n)
        .map(|i| {
            let (k, b) = (key("race", i), body("race", i));
            let slow = Behaviour {
                delay: Duration::from_millis(500),
                ..Default::default()
            };
            rig.origin.put_with(&k, b.clone(), slow);
            (k, b)
        })
        .collect();
    // `fediedge migrate` runs on edge A's host with edge A's config: same ledger, same link.
    let dir = &rig.edges[0].dir;
    let config = dir.join("fediedge.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n{}",
            dir.join("var").display(),
            rig.configs[0]
        ),
    )
    .unwrap();
    let keys = dir.join("keys.txt");
    let list: Vec<_> = objects.iter().map(|(k, _)| k.as_str()).collect();
    std::fs::write(&keys, list.join("\n")).unwrap();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_fediedge"));
    cmd.args(["migrate", "--config"])
        .arg(&config)
        .args(["--from", "old-origin", "--keys"])
        .arg(&keys)
        .args(["--concurrency", "8"]);
    let migrate = tokio::task::spawn_blocking(move || cmd.output().unwrap());
    let [a, b] = &rig.edges;
    let answers = join_all(
        objects
            .iter()
            .flat_map(|(k, _)| [get(a, k), get(b, k)])
            .collect::<Vec<_>>(),
    )
    .await;
    let out = migrate.await.unwrap();
    assert!(
        out.status.success(),
        "migrate: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for (i, a) in answers.iter().enumerate() {
        let (k, b) = &objects[i / 2];
        assert_eq!(a.status, 200, "{k}");
        assert!(a.body.as_ref() == &b[..], "{k} answered whole");
    }
    // Every key an edge answered from the old origin is queued for copying by that edge:
    // each edge's ledger must record those copies and its queue drain (no copy stuck behind
    // a backoff). Every copier puts the same verified bytes, so the order does not matter.
    let pending = (queued(a), queued(b));
    for (i, (edge, name)) in [(a, "A"), (b, "B")].into_iter().enumerate() {
        let fell_back: Vec<_> = objects
            .iter()
            .enumerate()
            .filter(|(j, _)| answers[2 * j + i].cache == "FALLBACK")
            .map(|(_, o)| o.clone())
            .collect();
        copied(
            edge,
            &fell_back,
            &format!("edge {name}'s copies after the race"),
        )
        .await;
    }

    // One object per key in the bucket, each whole, and nothing else.
    let store = bucket(&rig.cluster, &format!("http://{}", rig.cluster.s3_addr(2)));
    let mut listed: Vec<_> = store
        .list(None)
        .unwrap()
        .map(|l| l.unwrap())
        .collect::<Vec<_>>()
        .await;
    listed.sort_by(|x, y| x.key.as_str().cmp(y.key.as_str()));
    let mut expected: Vec<_> = objects.iter().map(|(k, b)| (k.clone(), b.len())).collect();
    expected.sort();
    let got: Vec<_> = listed
        .iter()
        .map(|l| (l.key.as_str().to_owned(), l.size as usize))
        .collect();
    assert_eq!(got, expected, "the bucket holds exactly one object per key");
    let lost = rig.lost_via(&[0, 1, 2], &objects).await;
    assert_eq!(lost, 0);
    let gets: Vec<_> = objects.iter().map(|(k, _)| rig.origin.gets(k)).collect();
    let raced = gets.iter().filter(|&&g| g > 1).count();
    assert!(
        raced > 0,
        "no key was read by two copiers at once: the race did not happen ({gets:?})"
    );
    let fallback = answers.iter().filter(|a| a.cache == "FALLBACK").count();
    eprintln!(
        "cluster figures: race: {raced} of {n} keys read from the old origin by 2 or more copiers at once, {} origin GETs, {fallback} of {} edge answers FALLBACK, copies still queued at A/B when the race ended: {pending:?}, migrate: {}",
        gets.iter().sum::<usize>(),
        answers.len(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    figures("migrate and two edges race", n, 0, lost, started);
    rig.shutdown().await;
}
