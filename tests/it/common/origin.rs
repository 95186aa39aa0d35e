//! A real HTTP origin, in-process, that can count, delay, truncate, stall and hang.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use parking_lot::Mutex;

/// How the origin answers for one key.
#[derive(Clone, Debug, Default)]
pub struct Behaviour {
    /// Wait this long before sending headers.
    pub delay: Duration,
    /// Send this many bytes, then `stall_for`, then the rest.
    pub pause_after: Option<usize>,
    /// How long to pause at `pause_after`; with `truncate`, the connection closes instead.
    pub stall_for: Duration,
    /// Close the connection after `pause_after` bytes (fewer than announced).
    pub truncate: bool,
    /// Never answer.
    pub hang: bool,
    /// Before the headers, wait until this reads `true`: a request the origin holds until the
    /// test releases it (an event, not a timer).
    pub hold: Option<tokio::sync::watch::Receiver<bool>>,
    /// Send this Content-MD5 (base64) instead of none.
    pub content_md5: Option<String>,
    /// Send no ETag (as an origin that gives none).
    pub no_etag: bool,
    /// At `pause_after`, wait until this reads `true` (after `stall_for`): a pause that the
    /// test ends on an event instead of a timer.
    pub gate: Option<tokio::sync::watch::Receiver<bool>>,
    /// After `gate`, send this many more bytes, then wait again until this reads `true`.
    pub then: Option<(usize, tokio::sync::watch::Receiver<bool>)>,
}

struct Object {
    body: Bytes,
    behaviour: Behaviour,
}

/// The origin; serves `GET /system/<key>`.
pub struct Origin {
    /// Where it listens.
    pub addr: SocketAddr,
    objects: Arc<Mutex<HashMap<String, Object>>>,
    gets: Arc<Mutex<HashMap<String, usize>>>,
    total: Arc<AtomicUsize>,
    in_flight: Arc<InFlight>,
    bodies: Arc<InFlight>,
    arrivals: Arc<Mutex<Vec<Instant>>>,
    _task: tokio::task::JoinHandle<()>,
}

/// Requests being answered now, and the most seen at once (headers sent or not).
#[derive(Default)]
struct InFlight {
    now: AtomicUsize,
    max: AtomicUsize,
}

/// Counts one request in flight until dropped.
struct InFlightGuard(Arc<InFlight>);

impl InFlightGuard {
    fn new(g: &Arc<InFlight>) -> Self {
        let n = g.now.fetch_add(1, Ordering::SeqCst) + 1;
        g.max.fetch_max(n, Ordering::SeqCst);
        InFlightGuard(g.clone())
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::SeqCst);
    }
}

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

impl Origin {
    /// Starts an empty origin on a free port.
    pub async fn start() -> Origin {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let objects: Arc<Mutex<HashMap<String, Object>>> = Arc::default();
        let gets: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let total = Arc::new(AtomicUsize::new(0));
        let in_flight: Arc<InFlight> = Arc::default();
        let bodies: Arc<InFlight> = Arc::default();
        let arrivals: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let (o, g, t) = (objects.clone(), gets.clone(), total.clone());
        let (f, a, bo) = (in_flight.clone(), arrivals.clone(), bodies.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (o, g, t, f, a) = (o.clone(), g.clone(), t.clone(), f.clone(), a.clone());
                let bo = bo.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        a.lock().push(Instant::now());
                        let (o, g, t, f) = (o.clone(), g.clone(), t.clone(), f.clone());
                        // A GET counts from its arrival until its body is sent or dropped.
                        let sending =
                            (req.method() == hyper::Method::GET).then(|| InFlightGuard::new(&bo));
                        async move {
                            let _in_flight = InFlightGuard::new(&f);
                            let r = answer(req, &o, &g, &t).await;
                            Ok::<_, Infallible>(r.map(|body| {
                                match sending {
                                    None => body,
                                    Some(guard) => body
                                        .map_frame(move |frame| {
                                            let _held = &guard;
                                            frame
                                        })
                                        .boxed_unsync(),
                                }
                            }))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Origin {
            addr,
            objects,
            gets,
            total,
            in_flight,
            bodies,
            arrivals,
            _task: task,
        }
    }

    /// Base URL for a `[[fallback]]` of type http.
    pub fn url(&self) -> String {
        format!("http://{}/system/", self.addr)
    }

    /// Adds an object that is served plainly.
    pub fn put(&self, key: &str, body: impl Into<Bytes>) {
        self.put_with(key, body, Behaviour::default());
    }

    /// Adds an object with a behaviour.
    pub fn put_with(&self, key: &str, body: impl Into<Bytes>, behaviour: Behaviour) {
        self.objects.lock().insert(
            key.to_owned(),
            Object {
                body: body.into(),
                behaviour,
            },
        );
    }

    /// GET requests received for `key`.
    pub fn gets(&self, key: &str) -> usize {
        self.gets.lock().get(key).copied().unwrap_or(0)
    }

    /// Requests of any method received for `key`.
    pub fn total_for(&self, key: &str) -> usize {
        let suffix = format!(" {key}");
        self.gets
            .lock()
            .iter()
            .filter(|(k, _)| k.as_str() == key || k.ends_with(&suffix))
            .map(|(_, n)| n)
            .sum()
    }

    /// All requests received.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    /// When each request arrived (its headers read), in order of arrival.
    pub fn arrivals(&self) -> Vec<Instant> {
        self.arrivals.lock().clone()
    }

    /// Requests being answered now (until their headers are ready).
    pub fn in_flight_now(&self) -> usize {
        self.in_flight.now.load(Ordering::SeqCst)
    }

    /// The most requests the origin was answering at once (counted until the headers are
    /// ready, so a `delay` makes requests overlap).
    pub fn max_in_flight(&self) -> usize {
        self.in_flight.max.load(Ordering::SeqCst)
    }

    /// GETs being answered now, bodies included (from arrival until the body is sent whole
    /// or dropped).
    pub fn gets_now(&self) -> usize {
        self.bodies.now.load(Ordering::SeqCst)
    }

    /// The most GETs the origin was answering at once, bodies included.
    pub fn max_gets_at_once(&self) -> usize {
        self.bodies.max.load(Ordering::SeqCst)
    }
}

async fn answer(
    req: hyper::Request<hyper::body::Incoming>,
    objects: &Mutex<HashMap<String, Object>>,
    gets: &Mutex<HashMap<String, usize>>,
    total: &AtomicUsize,
) -> hyper::Response<Body> {
    total.fetch_add(1, Ordering::SeqCst);
    let key = req
        .uri()
        .path()
        .strip_prefix("/system/")
        .map(|k| {
            percent_encoding::percent_decode_str(k)
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    // GETs are counted under the key, other methods under "METHOD key".
    let counted = if req.method() == hyper::Method::GET {
        key.clone()
    } else {
        format!("{} {key}", req.method())
    };
    *gets.lock().entry(counted).or_default() += 1;
    let found = objects
        .lock()
        .get(&key)
        .map(|o| (o.body.clone(), o.behaviour.clone()));
    let Some((body, b)) = found else {
        let mut r = hyper::Response::new(full(Bytes::from_static(b"not found")));
        *r.status_mut() = hyper::StatusCode::NOT_FOUND;
        return r;
    };
    if b.hang {
        std::future::pending::<()>().await;
    }
    if let Some(mut hold) = b.hold.clone() {
        let _ = hold.wait_for(|released| *released).await;
    }
    tokio::time::sleep(b.delay).await;
    let len = body.len();
    let resp_body = if req.method() == hyper::Method::HEAD {
        full(Bytes::new())
    } else if let Some(at) = b.pause_after {
        let first = body.slice(..at);
        let rest = body.slice(at..);
        let stall = b.stall_for;
        let truncate = b.truncate;
        let (gate, then) = (b.gate.clone(), b.then.clone());
        let s = futures_util::stream::unfold(0u8, move |step| {
            let (first, rest, mut gate) = (first.clone(), rest.clone(), gate.clone());
            let mut then = then.clone();
            async move {
                match step {
                    0 => Some((Ok(Frame::data(first)), 1)),
                    1 => {
                        tokio::time::sleep(stall).await;
                        if let Some(g) = gate.as_mut() {
                            let _ = g.wait_for(|open| *open).await;
                        }
                        if truncate {
                            return Some((Err(std::io::Error::other("truncated on purpose")), 3));
                        }
                        match &then {
                            Some((n, _)) => Some((Ok(Frame::data(rest.slice(..*n))), 2)),
                            None => Some((Ok(Frame::data(rest)), 3)),
                        }
                    }
                    2 => {
                        let (n, g) = then.as_mut()?;
                        let _ = g.wait_for(|open| *open).await;
                        Some((Ok(Frame::data(rest.slice(*n..))), 3))
                    }
                    _ => None,
                }
            }
        });
        StreamBody::new(s).boxed_unsync()
    } else {
        full(body)
    };
    let mut r = hyper::Response::new(resp_body);
    let h = r.headers_mut();
    h.insert("content-length", len.into());
    if !b.no_etag {
        h.insert("etag", format!("\"origin-{len:x}\"").parse().unwrap());
    }
    h.insert(
        "last-modified",
        "Tue, 14 Nov 2023 22:13:20 GMT".parse().unwrap(),
    );
    if key.ends_with(".png") {
        h.insert("content-type", "image/png".parse().unwrap());
    }
    if let Some(md5) = b.content_md5 {
        h.insert("content-md5", md5.parse().unwrap());
    }
    r
}

fn full(b: Bytes) -> Body {
    Full::new(b).map_err(|never| match never {}).boxed_unsync()
}
