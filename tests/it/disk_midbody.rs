//! A cache disk that fails in the middle of a body (issue 7 §1). A flight reserves its body's
//! room up front (`posix_fallocate`), so a disk that fills shows before the first byte, and a
//! write into that room fails only when the disk itself does. The test makes a real one do
//! so: an ext4 in a loop-mounted image, shut down with `EXT4_IOC_SHUTDOWN` (the kernel's own
//! "the device is gone", as xfstests' `godown`), after which every write and read on it
//! fails with EIO. With memory for the rest of the body, the herd shares the one fetch; a
//! request that needs bytes the flight cannot give (its file unreadable, or a rest kept
//! nowhere) reads the source again on its own: no client is cut for the disk's fault. Those
//! reads take `max_flights` slots as flights do: past the cap a request waits, then is cut,
//! and the source never sees more reads at once than the cap. A flight that stops writing
//! its temp file gives its temp-disk room back at once.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::origin::{Behaviour, Origin};
use crate::common::{bytes, client, eventually, start_edge, TestEdge};
use crate::disk::{files_under, get, metric, metric_count, stores};

/// An ext4 filesystem in an image file, loop-mounted for one test; unmounted when dropped.
struct Ext4 {
    image: PathBuf,
    dir: PathBuf,
}

impl Ext4 {
    /// Makes an ext4 of `mib` MiB in `image` and mounts it at `dir`. Fails the test, never
    /// skips it, when that is not possible (the tests run as root; mkfs.ext4 is e2fsprogs).
    fn mount(image: &Path, dir: &Path, mib: u64) -> Ext4 {
        let f = std::fs::File::create(image).unwrap();
        f.set_len(mib << 20).unwrap();
        run("mkfs.ext4", &["-q", "-F", image.to_str().unwrap()]);
        let disk = Ext4 {
            image: image.to_owned(),
            dir: dir.to_owned(),
        };
        disk.remount();
        disk
    }

    fn remount(&self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let (image, dir) = (self.image.to_str().unwrap(), self.dir.to_str().unwrap());
        run("mount", &["-o", "loop", image, dir]);
    }

    /// Shuts the filesystem down, its journal flushed first, as a disk that stopped
    /// answering: from now on its files can be neither written nor read.
    fn shut_down(&self) {
        use std::os::fd::AsRawFd;
        // _IOR('X', 125, __u32); EXT4_GOING_FLAGS_LOGFLUSH.
        const EXT4_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587D;
        let flags: u32 = 1;
        let dir = std::fs::File::open(&self.dir).unwrap();
        // SAFETY: the descriptor is open for the call; the kernel reads one u32 from `flags`.
        let rc = unsafe { libc::ioctl(dir.as_raw_fd(), EXT4_IOC_SHUTDOWN, &flags) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
    }

    fn unmount(&self) {
        run("umount", &[self.dir.to_str().unwrap()]);
    }
}

impl Drop for Ext4 {
    fn drop(&mut self) {
        // Lazy: the edge may still hold files open.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output();
    let out = out.unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd} {args:?}: {err}");
}

/// Reads `r` until `got` holds at least `n` bytes, or to its end with `None`.
async fn read_until(r: &mut reqwest::Response, got: &mut Vec<u8>, n: Option<usize>) {
    while n.is_none_or(|n| got.len() < n) {
        match r.chunk().await.expect("a whole body") {
            Some(chunk) => got.extend_from_slice(&chunk),
            None => {
                assert!(n.is_none(), "the body ended at {} bytes", got.len());
                return;
            }
        }
    }
}

/// Reads `r` on into `got` until it ends: whether it was cut (an error) rather than ended.
async fn read_to_cut(r: &mut reqwest::Response, got: &mut Vec<u8>) -> bool {
    loop {
        match r.chunk().await {
            Ok(Some(chunk)) => got.extend_from_slice(&chunk),
            Ok(None) => return false,
            Err(_) => return true,
        }
    }
}

/// The end of a flight whose first client (`r1`, `got` so far) cannot be served whole after
/// the disk failed: that client is cut, never ended as if whole; the request that joined
/// after the failure (`joiner`) got `body` whole from the source on its own; the origin saw
/// three GETs (the flight's, the joiner's, the first client's refetch) and two refetches
/// were made.
async fn cut_and_joined_alone(
    r1: &mut reqwest::Response,
    got: &mut Vec<u8>,
    joiner: tokio::task::JoinHandle<(u16, String, Vec<u8>)>,
    origin: &Origin,
    edge: &TestEdge,
    body: &[u8],
) {
    let cut = read_to_cut(r1, got).await;
    assert!(cut, "a body ended as if whole ({} bytes)", got.len());
    let (status, cache_status, whole) = joiner.await.unwrap();
    assert_eq!((status, cache_status.as_str()), (200, "FALLBACK"));
    assert!(whole == body, "the joiner's bytes differ from the source's");
    assert_eq!(
        origin.gets("m.png"),
        3,
        "the flight, the joiner, the first client's refetch"
    );
    assert_eq!(metric_count(edge, "fediedge_flight_refetches_total"), 2);
}

/// Sends a request for `url` after the disk failed and waits until it joined the flight
/// (the `joined`th follower) and, unable to read the flight's file, made the origin's
/// `gets`th fetch of `m.png` on its own; its answer comes from the returned task.
async fn join_and_fetch_alone(
    edge: &TestEdge,
    origin: &Origin,
    url: &str,
    joined: u64,
    gets: usize,
) -> tokio::task::JoinHandle<(u16, String, Vec<u8>)> {
    let joiner = tokio::spawn(get_whole(url.to_owned()));
    let coalesced = || metric_count(edge, "fediedge_coalesced_requests_total");
    eventually(Duration::from_secs(30), "the joiner joined", || {
        coalesced() == joined
    })
    .await;
    eventually(Duration::from_secs(30), "the joiner's own fetch", || {
        origin.gets("m.png") == gets
    })
    .await;
    joiner
}

#[tokio::test]
async fn a_cache_disk_that_fails_mid_body_serves_the_herd_exact_bytes_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start().await;
    let body = bytes(300_000, 21);
    // The origin sends 100,000 bytes and holds the rest until the disk has failed; then
    // 50,000 more, and holds the rest again until a late request has come.
    let (open, gate) = tokio::sync::watch::channel(false);
    let (open_rest, rest) = tokio::sync::watch::channel(false);
    let behaviour = Behaviour {
        pause_after: Some(100_000),
        gate: Some(gate),
        then: Some((50_000, rest)),
        ..Behaviour::default()
    };
    origin.put_with("m.png", body.clone(), behaviour);
    let disk = Ext4::mount(&dir.path().join("cache.img"), &dir.path().join("cache"), 16);
    let config = stores(dir.path(), &origin, "");
    let edge = start_edge(dir.path(), &config).await;

    // The leader and a follower of its flight each have the first 100,000 bytes, read from
    // the flight's temp file.
    let url = format!("{}m.png", edge.base);
    let (mut leader, mut follower) = (Vec::new(), Vec::new());
    let mut r1 = client().get(&url).send().await.unwrap();
    read_until(&mut r1, &mut leader, Some(100_000)).await;
    let mut r2 = client().get(&url).send().await.unwrap();
    read_until(&mut r2, &mut follower, Some(100_000)).await;
    assert_eq!(metric_count(&edge, "fediedge_coalesced_requests_total"), 1);
    assert_eq!(files_under(&dir.path().join("cache/tmp")).len(), 1);

    // The disk fails while the flight waits for the source's next bytes. A request joining
    // now still finds the flight, whose temp file can no longer be read: it reads the body
    // from the source on its own.
    disk.shut_down();
    let joiner = join_and_fetch_alone(&edge, &origin, &url, 2, 2).await;
    // The flight's next write fails, and the rest of the body goes to memory.
    open.send(true).unwrap();
    let state = |dir: &str| metric(&edge, &format!("fediedge_disk_state{{dir=\"{dir}\"}}"));
    eventually(
        Duration::from_secs(30),
        "the flight saw the disk fail",
        || state("cache").as_deref() == Some("3"),
    )
    .await;
    // A request now does not join that flight (its first part is on the dead disk): it
    // starts one of its own, held in memory from its first byte.
    let late = tokio::spawn(get_whole(url));
    eventually(
        Duration::from_secs(30),
        "the late request's own fetch",
        || origin.gets("m.png") == 3,
    )
    .await;
    open_rest.send(true).unwrap();
    read_until(&mut r1, &mut leader, None).await;
    read_until(&mut r2, &mut follower, None).await;
    assert!(
        leader == body,
        "the leader's bytes differ from the source's"
    );
    assert!(
        follower == body,
        "the follower's bytes differ from the source's"
    );
    let (status, cache_status, got) = late.await.unwrap();
    assert_eq!((status, cache_status.as_str()), (200, "FALLBACK"));
    assert!(
        got == body,
        "the late request's bytes differ from the source's"
    );
    let (status, cache_status, got) = joiner.await.unwrap();
    assert_eq!((status, cache_status.as_str()), (200, "FALLBACK"));
    assert!(got == body, "the joiner's bytes differ from the source's");
    assert_eq!(metric_count(&edge, "fediedge_coalesced_requests_total"), 2);
    // The leader's client and the follower had what was on disk and took the rest from
    // memory: only the joiner read the source again.
    assert_eq!(metric_count(&edge, "fediedge_flight_refetches_total"), 1);
    assert_eq!(origin.gets("m.png"), 3);
    eventually(Duration::from_secs(30), "the fetches ended", || {
        edge.running.fetches_under_way() == 0
    })
    .await;

    // Said once, for the cache's disk; not for data_dir's, although the failed flight's copy
    // for the primary could not read the body's first part back.
    assert_eq!(state("cache").as_deref(), Some("3"), "failing");
    assert_eq!(
        metric(&edge, "fediedge_disk_state_changes_total{dir=\"cache\"}").as_deref(),
        Some("1")
    );
    let data_dir_changes = "fediedge_disk_state_changes_total{dir=\"data_dir\"}";
    assert_eq!(metric_count(&edge, data_dir_changes), 0);
    // Nothing partial kept: nothing in the cache; the primary gets the whole body (the late
    // flight's copy, from memory).
    let cache = edge.running.cache.clone().unwrap();
    assert_eq!(cache.usage(), (0, 0));
    let copied = dir.path().join("primary/m.png");
    eventually(Duration::from_secs(30), "the copy in the primary", || {
        copied.exists()
    })
    .await;
    assert!(std::fs::read(&copied).unwrap() == body);
    edge.running.shutdown().await;
    drop(cache);
    nothing_kept_after_the_disk_comes_back(dir.path(), &disk, &config, &body).await;
}

/// The disk comes back: the dead flight's temp file is all it holds, and a restart clears
/// it; nothing of the body was ever stored, and it is served whole.
async fn nothing_kept_after_the_disk_comes_back(
    dir: &Path,
    disk: &Ext4,
    config: &str,
    body: &[u8],
) {
    disk.unmount();
    disk.remount();
    let kept = files_under(&dir.join("cache"));
    let tmp = dir.join("cache/tmp");
    assert!(kept.iter().all(|p| p.starts_with(&tmp)), "{kept:?}");
    let edge = start_edge(dir, config).await;
    let kept = files_under(&dir.join("cache"));
    assert!(kept.is_empty(), "{kept:?}");
    let (status, cache_status, got) = get(&edge, "m.png").await;
    assert_eq!(status, 200);
    assert_ne!(cache_status, "HIT", "nothing of it in the cache");
    assert!(got == body);
    edge.running.shutdown().await;
}

/// GETs `url` whole: status, `X-Cache-Status`, body (an aborted body fails the test).
async fn get_whole(url: String) -> (u16, String, Vec<u8>) {
    let r = client().get(url).send().await.unwrap();
    let cache = r.headers()["x-cache-status"].to_str().unwrap().to_owned();
    let status = r.status().as_u16();
    (
        status,
        cache,
        r.bytes().await.expect("a whole body").to_vec(),
    )
}

/// What [`held_fetch`] starts.
struct HeldFetch {
    origin: Origin,
    /// Opens the origin's gate: the rest of the body follows.
    open: tokio::sync::watch::Sender<bool>,
    disk: Ext4,
    edge: TestEdge,
    /// The edge's URL of `m.png`.
    url: String,
    /// The edge's config (for a restart).
    config: String,
}

/// An origin serving `stored` as `m.png` (with `behaviour`'s headers) that sends its first
/// 100,000 bytes, then holds the rest until `open`; a cache on a small loop-mounted ext4
/// under `dir`; an edge with 64 KiB for bodies in memory (less than the 200,000 bytes left
/// when the disk fails) and the top-level config lines `extra`.
async fn held_fetch(dir: &Path, stored: Vec<u8>, behaviour: Behaviour, extra: &str) -> HeldFetch {
    let origin = Origin::start().await;
    let (open, gate) = tokio::sync::watch::channel(false);
    let behaviour = Behaviour {
        pause_after: Some(100_000),
        gate: Some(gate),
        ..behaviour
    };
    origin.put_with("m.png", stored, behaviour);
    let disk = Ext4::mount(&dir.join("cache.img"), &dir.join("cache"), 16);
    let config = format!(
        "max_flight_memory = \"64KiB\"\n{extra}{}",
        stores(dir, &origin, "")
    );
    let edge = start_edge(dir, &config).await;
    let url = format!("{}m.png", edge.base);
    HeldFetch {
        origin,
        open,
        disk,
        edge,
        url,
        config,
    }
}

#[tokio::test]
async fn a_cache_disk_that_fails_mid_body_with_no_memory_left_cuts_no_client() {
    let dir = tempfile::tempdir().unwrap();
    let body = bytes(300_000, 22);
    let HeldFetch {
        origin,
        open,
        disk,
        edge,
        url,
        config,
    } = held_fetch(dir.path(), body.clone(), Behaviour::default(), "").await;

    // The leader's client and two followers each have the first 100,000 bytes, read from
    // the flight's temp file.
    let mut herd = Vec::new();
    for _ in 0..3 {
        let (mut r, mut got) = (client().get(&url).send().await.unwrap(), Vec::new());
        read_until(&mut r, &mut got, Some(100_000)).await;
        herd.push((r, got));
    }
    assert_eq!(metric_count(&edge, "fediedge_coalesced_requests_total"), 2);

    // The disk fails while the flight waits for the source's next bytes: a request joining
    // now still finds the flight, whose temp file can no longer be read. It reads the body
    // from the source on its own.
    disk.shut_down();
    let joiner = join_and_fetch_alone(&edge, &origin, &url, 3, 2).await;
    assert_eq!(edge.running.fetches_under_way(), 1, "the flight still runs");
    // The joiner found the flight's file unreadable: the flight takes no more followers,
    // though it has not written since. A request now starts a fetch of its own, which finds
    // no room on the disk or in memory: the body is streamed to it from the source.
    let early = tokio::spawn(get_whole(url.clone()));
    eventually(
        Duration::from_secs(30),
        "the early request's stream",
        || origin.gets("m.png") == 4,
    )
    .await;
    assert_eq!(
        metric_count(&edge, "fediedge_coalesced_requests_total"),
        3,
        "the early request joined no flight"
    );

    // The flight's next write fails and the rest fits nowhere: the flight ends with what it
    // had, and each of the herd reads the rest from the source on its own.
    open.send(true).unwrap();
    let state = |dir: &str| metric(&edge, &format!("fediedge_disk_state{{dir=\"{dir}\"}}"));
    eventually(
        Duration::from_secs(30),
        "the flight saw the disk fail",
        || state("cache").as_deref() == Some("3"),
    )
    .await;
    // A request after the failure starts a fetch of its own, which finds no room on the
    // disk or in memory: the body is streamed to it from the source.
    let (status, cache_status, got) = get_whole(url.clone()).await;
    assert_eq!((status, cache_status.as_str()), (200, "FALLBACK"));
    assert!(
        got == body,
        "the late request's bytes differ from the source's"
    );
    for (i, (mut r, mut got)) in herd.into_iter().enumerate() {
        read_until(&mut r, &mut got, None).await;
        assert!(got == body, "client {i}'s bytes differ from the source's");
    }
    let (status, cache_status, got) = joiner.await.unwrap();
    assert_eq!((status, cache_status.as_str()), (200, "FALLBACK"));
    assert!(got == body, "the joiner's bytes differ from the source's");
    let (status, cache_status, got) = early.await.unwrap();
    assert_eq!((status, cache_status.as_str()), (200, "FALLBACK"));
    assert!(
        got == body,
        "the early request's bytes differ from the source's"
    );
    eventually(Duration::from_secs(30), "the fetches ended", || {
        edge.running.fetches_under_way() == 0
    })
    .await;

    // Source GETs: the flight's; the joiner's; the early and the late request's fetches
    // (which found no room) and their streams; one each for the leader's client and the two
    // followers.
    assert_eq!(origin.gets("m.png"), 9);
    assert_eq!(metric_count(&edge, "fediedge_flight_refetches_total"), 4);
    // Said once. Nothing partial kept: nothing in the cache, no copy in the primary.
    let changes = "fediedge_disk_state_changes_total{dir=\"cache\"}";
    assert_eq!(metric(&edge, changes).as_deref(), Some("1"));
    let cache = edge.running.cache.clone().unwrap();
    assert_eq!(cache.usage(), (0, 0));
    assert!(!dir.path().join("primary/m.png").exists());
    edge.running.shutdown().await;
    drop(cache);
    nothing_kept_after_the_disk_comes_back(dir.path(), &disk, &config, &body).await;
}

/// Standard base64 (Content-MD5 is the base64 of the digest's 16 bytes). By hand: the crate
/// has no base64 dependency, for these 15 lines (checked below against RFC 1864's example).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for group in bytes.chunks(3) {
        let b = [
            group[0],
            *group.get(1).unwrap_or(&0),
            *group.get(2).unwrap_or(&0),
        ];
        let n = u32::from_be_bytes([0, b[0], b[1], b[2]]);
        for i in 0..4 {
            let c = ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char;
            out.push(if i <= group.len() { c } else { '=' });
        }
    }
    out
}

#[tokio::test]
async fn bytes_a_flight_gave_before_its_disk_failed_are_still_verified_by_it() {
    let dir = tempfile::tempdir().unwrap();
    let body = bytes(300_000, 23);
    let digest = |b: &[u8]| base64(&<md5::Md5 as md5::Digest>::digest(b));
    assert_eq!(
        digest(b""),
        "1B2M2Y8AsgTpgAmY7PhCfg==",
        "RFC 1864's encoding"
    );
    let md5 = digest(&body);
    // The flight's fetch gets a byte damaged in its first 100,000 (which the origin sends,
    // then holds the rest until the gate opens), under the right body's Content-MD5.
    let mut damaged = body.clone();
    damaged[10] ^= 0xff;
    let behaviour = Behaviour {
        content_md5: Some(md5.clone()),
        ..Behaviour::default()
    };
    let HeldFetch {
        origin,
        open,
        disk,
        edge,
        url,
        ..
    } = held_fetch(dir.path(), damaged, behaviour, "").await;
    let mut r1 = client().get(&url).send().await.unwrap();
    let mut got = Vec::new();
    read_until(&mut r1, &mut got, Some(100_000)).await;
    // From now on the origin answers the right body (same length, same ETag).
    let behaviour = Behaviour {
        content_md5: Some(md5),
        ..Behaviour::default()
    };
    origin.put_with("m.png", body.clone(), behaviour);

    // A request joining after the disk failed gets nothing from the flight: its own read of
    // the source is all it sends, and verified whole.
    disk.shut_down();
    let joiner = join_and_fetch_alone(&edge, &origin, &url, 1, 2).await;
    // The flight keeps nothing more, the first client reads the rest from the source, but
    // its first 100,000 bytes came from the flight: its last byte waits for the flight's
    // check, which fails. Its response is cut, never ended as if whole.
    open.send(true).unwrap();
    cut_and_joined_alone(&mut r1, &mut got, joiner, &origin, &edge, &body).await;
    assert!(got.len() < body.len());
    edge.running.shutdown().await;
}

#[tokio::test]
async fn a_response_under_way_is_cut_rather_than_spliced_with_a_body_nothing_identifies() {
    let dir = tempfile::tempdir().unwrap();
    let body = bytes(300_000, 24);
    // An origin that gives neither ETag nor Content-MD5: a length and a date do not show that
    // two of its answers are one body.
    let behaviour = Behaviour {
        no_etag: true,
        ..Behaviour::default()
    };
    let HeldFetch {
        origin,
        open,
        disk,
        edge,
        url,
        ..
    } = held_fetch(dir.path(), body.clone(), behaviour, "").await;
    let mut r1 = client().get(&url).send().await.unwrap();
    let mut got = Vec::new();
    read_until(&mut r1, &mut got, Some(100_000)).await;

    // A request joining after the disk failed has sent nothing: its own read of the source
    // needs no splice, and is served whole.
    disk.shut_down();
    let joiner = join_and_fetch_alone(&edge, &origin, &url, 1, 2).await;
    // The flight keeps nothing more: the first client, 100,000 bytes in, would have to
    // splice the source's new answer onto them, and nothing shows it is the same body. Cut.
    open.send(true).unwrap();
    cut_and_joined_alone(&mut r1, &mut got, joiner, &origin, &edge, &body).await;
    assert!(got.len() < body.len() && got == body[..got.len()]);
    edge.running.shutdown().await;
}

/// A herd larger than `max_flights` on a flight whose disk dies mid-body, with no memory
/// for the rest: each of them needs the body read again, and those reads are source reads
/// like any flight's. They share the cap with the flight (which still reads on to verify),
/// so the origin never answers more GETs of the body at once than `max_flights`; a follower
/// that gets no slot within `flight_queue_wait` is cut, never served wrong bytes.
#[tokio::test]
async fn a_herd_on_a_flight_whose_disk_failed_refetches_within_max_flights() {
    const MAX_FLIGHTS: usize = 2;
    const HERD: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let body = bytes(300_000, 25);
    // After the gate, the origin sends 50,000 bytes more (the flight's next write, which
    // fails), then holds every answer there until `open_rest`.
    let (open_rest, rest) = tokio::sync::watch::channel(false);
    let behaviour = Behaviour {
        then: Some((50_000, rest)),
        ..Behaviour::default()
    };
    let extra = format!("max_flights = {MAX_FLIGHTS}\nflight_queue_wait = \"1s\"\n");
    let HeldFetch {
        origin,
        open,
        disk,
        edge,
        url,
        ..
    } = held_fetch(dir.path(), body.clone(), behaviour, &extra).await;

    // The leader's client and three followers each have the first 100,000 bytes.
    let mut herd = Vec::new();
    for _ in 0..HERD {
        let (mut r, mut got) = (client().get(&url).send().await.unwrap(), Vec::new());
        read_until(&mut r, &mut got, Some(100_000)).await;
        herd.push((r, got));
    }
    assert_eq!(
        metric_count(&edge, "fediedge_coalesced_requests_total"),
        HERD as u64 - 1
    );
    // The disk fails; the flight's next write with it. The rest fits nowhere: every one of
    // the herd needs it from the source.
    disk.shut_down();
    open.send(true).unwrap();
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
    for (i, (mut r, mut got)) in herd.into_iter().enumerate() {
        let done_tx = done_tx.clone();
        tokio::spawn(async move {
            let cut = read_to_cut(&mut r, &mut got).await;
            done_tx.send((i, cut, got)).unwrap();
        });
    }
    drop(done_tx);
    // The flight holds one slot; the herd's refetches take what is left, the others wait
    // for one and are refused. Every one of the herd is either reading the source or refused.
    let refetched = || metric_count(&edge, "fediedge_flight_refetches_total");
    let refused = || metric_count(&edge, "fediedge_flight_refetches_refused_total");
    eventually(
        Duration::from_secs(30),
        "each of the herd refetching or refused",
        || {
            let n = refetched();
            n + refused() == HERD as u64 && origin.gets("m.png") == 1 + n as usize
        },
    )
    .await;
    assert!(
        origin.max_gets_at_once() <= MAX_FLIGHTS,
        "the origin answered {} GETs at once, past max_flights = {MAX_FLIGHTS}",
        origin.max_gets_at_once()
    );
    assert_eq!(refetched(), MAX_FLIGHTS as u64 - 1, "the free slots");
    // The refused ones were cut, with bytes of the body only.
    let mut ended = Vec::new();
    for _ in 0..refused() {
        let (i, cut, got) = done.recv().await.unwrap();
        assert!(cut, "client {i}: refused, yet its body ended as if whole");
        assert!(
            got.len() < body.len() && got == body[..got.len()],
            "client {i}: bytes other than the source's"
        );
        ended.push(i);
    }
    // The origin sends the rest: the flight verifies, and the refetches under way end whole.
    open_rest.send(true).unwrap();
    while let Some((i, cut, got)) = done.recv().await {
        assert!(!cut, "client {i}: cut although its refetch had a slot");
        assert!(got == body, "client {i}'s bytes differ from the source's");
        ended.push(i);
    }
    assert_eq!(ended.len(), HERD);
    assert!(origin.max_gets_at_once() <= MAX_FLIGHTS);
    assert_eq!(origin.gets("m.png"), MAX_FLIGHTS);
    eventually(Duration::from_secs(30), "the fetches ended", || {
        edge.running.fetches_under_way() == 0
    })
    .await;
    let cache = edge.running.cache.clone().unwrap();
    assert_eq!(cache.usage(), (0, 0), "nothing partial cached");
    edge.running.shutdown().await;
}

/// A flight whose disk failed mid-body keeps nothing more in its temp file, though it reads
/// its source on to verify what it gave: its temp-disk room (`max_flight_temp_bytes`) goes
/// back at once, and a new flight that needs that room starts while it still reads on.
#[tokio::test]
async fn a_flight_that_abandons_its_temp_file_gives_its_temp_room_back_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let body = bytes(300_000, 26);
    let (open_rest, rest) = tokio::sync::watch::channel(false);
    let behaviour = Behaviour {
        then: Some((50_000, rest)),
        ..Behaviour::default()
    };
    // Room for one body of 300,000 bytes on the temp disk, not two.
    let extra = "max_flight_temp_bytes = \"400KiB\"\nflight_queue_wait = \"1s\"\n";
    let HeldFetch {
        origin,
        open,
        disk,
        edge,
        url,
        ..
    } = held_fetch(dir.path(), body.clone(), behaviour, extra).await;
    let other = bytes(300_000, 27);
    origin.put("n.png", other.clone());
    let mut r1 = client().get(&url).send().await.unwrap();
    let mut got = Vec::new();
    read_until(&mut r1, &mut got, Some(100_000)).await;

    // The disk fails, then the flight's next write: the rest fits nowhere, and the client
    // reads it from the source; both reads are held by the origin, the flight's too.
    disk.shut_down();
    open.send(true).unwrap();
    let reading = tokio::spawn(async move {
        read_until(&mut r1, &mut got, None).await;
        got
    });
    eventually(
        Duration::from_secs(30),
        "the flight and the client's refetch both read on",
        || origin.gets("m.png") == 2 && origin.gets_now() == 2,
    )
    .await;
    // A new key's flight needs room for 300,000 bytes on the temp disk: the broken flight
    // gave its room back, so it is not made to wait and answered 503. (The disk is still
    // down and memory too small: its body is streamed to it from the source.)
    let (status, _, got_other) = get_whole(format!("{}n.png", edge.base)).await;
    assert_eq!(
        status, 200,
        "the new flight found the temp-disk budget still held"
    );
    assert!(got_other == other, "n.png's bytes differ from the source's");
    assert_eq!(origin.gets("m.png"), 2, "the broken flight still reads on");
    open_rest.send(true).unwrap();
    let got = reading.await.unwrap();
    assert!(got == body, "the client's bytes differ from the source's");
    edge.running.shutdown().await;
}
