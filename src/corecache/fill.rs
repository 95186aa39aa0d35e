//! Filling the cache: one upstream request per URL and scheme at a time ([`Flights`]; an
//! answer for one scheme never answers the other, so their requests do not wait for each
//! other), and the response
//! body teed to the cache as it streams to the client ([`TeeBody`]).
//!
//! A storable response with a known length (up to the entry limit) is received by a task of
//! its own into a [`Shared`] buffer, which the leader's client and every follower (same URL
//! while it is under way, and the request matches the response's `Vary`) read as it grows;
//! the task runs to the end even if every client left, then stores the body. A storable
//! response of unknown length goes to the leader's client through a [`TeeBody`]; followers
//! then wait until it is stored (at most the proxy's first-byte timeout) and look again. A
//! response that is not storable releases the followers as soon as its head is seen: they
//! go to core on their own.

use std::collections::HashMap;
use std::io::Write;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use parking_lot::Mutex;
use tokio::sync::{watch, OwnedSemaphorePermit};

use super::store::{Id, Meta, Scheme, Store};
use crate::flight::MemoryBudget;
use crate::listen::Body;

/// The requests to core under way for cacheable URLs, one table per scheme
/// ([`Scheme::index`]).
#[derive(Default)]
pub struct Flights {
    maps: [Mutex<Table>; 2],
}

/// A scheme's requests under way, by URL key: what their followers watch.
type Table = HashMap<String, watch::Receiver<Option<Arc<Shared>>>>;

/// Leading a URL's request, or following one.
pub enum Join {
    /// This request goes upstream; the guard releases the followers when dropped.
    Leader(FlightGuard),
    /// Another request is under way: wait for it (`changed()` returns when its response is
    /// shared, or when it is done).
    Follower(watch::Receiver<Option<Arc<Shared>>>),
}

/// Held by the leader until its response is stored or found not storable.
pub struct FlightGuard {
    flights: Arc<Flights>,
    scheme: Scheme,
    key: String,
    shared: watch::Sender<Option<Arc<Shared>>>,
}

impl FlightGuard {
    /// Hands the response being received to the followers.
    pub fn publish(&self, shared: Arc<Shared>) {
        self.shared.send_replace(Some(shared));
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.flights.maps[self.scheme.index()]
            .lock()
            .remove(&self.key);
    }
}

impl Flights {
    /// Leads or follows the request for `key` in `scheme`.
    pub fn join(self: &Arc<Self>, scheme: Scheme, key: &str) -> Join {
        let mut map = self.maps[scheme.index()].lock();
        if let Some(rx) = map.get(key) {
            return Join::Follower(rx.clone());
        }
        let (tx, rx) = watch::channel(None);
        map.insert(key.to_owned(), rx);
        Join::Leader(FlightGuard {
            flights: self.clone(),
            scheme,
            key: key.to_owned(),
            shared: tx,
        })
    }

    /// Leads `key` only if nobody does (background revalidation).
    pub fn try_lead(self: &Arc<Self>, scheme: Scheme, key: &str) -> Option<FlightGuard> {
        match self.join(scheme, key) {
            Join::Leader(g) => Some(g),
            Join::Follower(_) => None,
        }
    }
}

/// What is needed to store the body once it has all come.
pub struct Commit {
    /// The store.
    pub store: Arc<Store>,
    /// The entry's meta (`len` set at the end).
    pub meta: Meta,
    /// The entries the new one replaces (same URL, same selecting headers).
    pub replaces: Vec<Id>,
    /// Released once stored (or not).
    pub guard: Option<FlightGuard>,
    /// When the request went to core.
    pub sent: std::time::Instant,
}

impl Commit {
    /// Writes the body to a temp file and stores it (blocking). `_room`: the memory the
    /// chunks hold, given back once they are written.
    fn store(mut self, chunks: Vec<Bytes>, len: u64, _room: Option<OwnedSemaphorePermit>) {
        self.meta.len = len;
        let result = (|| -> std::io::Result<()> {
            let mut tmp = tempfile::NamedTempFile::new_in(self.store.tmp_dir())?;
            for c in &chunks {
                tmp.write_all(c)?;
            }
            tmp.as_file().sync_data()?;
            self.store.insert(
                tmp.into_temp_path(),
                self.meta.clone(),
                &self.replaces,
                self.sent,
            )
        })();
        if let Err(e) = result {
            tracing::warn!(error = %e, path = %self.meta.path, "core cache: a response could not be stored");
        }
        drop(self.guard.take());
    }
}

/// A response body on its way to the client, copied in memory for the cache; stored only
/// when it ended whole (no error, the announced length, under the size limit) and the copy
/// always had room in the memory budget (else the copy is dropped and the body only passed
/// on).
pub struct TeeBody {
    inner: Body,
    chunks: Vec<Bytes>,
    len: u64,
    limit: u64,
    expected: Option<u64>,
    commit: Option<Commit>,
    memory: MemoryBudget,
    /// Room for `len` bytes, taken from `memory`.
    room: Option<OwnedSemaphorePermit>,
}

impl TeeBody {
    /// `limit`: largest body kept; `expected`: the response's `Content-Length`;
    /// `bodiless`: a response without a body (204, `Content-Length: 0`), stored at once
    /// (hyper may never poll its body).
    pub fn new(
        inner: Body,
        limit: u64,
        expected: Option<u64>,
        commit: Commit,
        bodiless: bool,
        memory: MemoryBudget,
    ) -> TeeBody {
        let room = memory.take(0);
        let mut tee = TeeBody {
            inner,
            chunks: Vec::new(),
            len: 0,
            limit,
            expected,
            commit: Some(commit),
            memory,
            room,
        };
        if bodiless {
            tee.commit_now();
        }
        tee
    }
}

impl TeeBody {
    fn commit_now(&mut self) {
        if let Some(commit) = self.commit.take() {
            let chunks = std::mem::take(&mut self.chunks);
            let (len, room) = (self.len, self.room.take());
            tokio::task::spawn_blocking(move || commit.store(chunks, len, room));
        }
    }

    /// Stops copying: nothing of this body is stored (the followers go to core).
    fn give_up(&mut self) {
        self.commit = None;
        self.chunks = Vec::new();
        self.room = None;
    }
}

impl http_body::Body for TeeBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let (Some(data), true) = (f.data_ref(), this.commit.is_some()) {
                    let from = this.len;
                    this.len += data.len() as u64;
                    let room = match &mut this.room {
                        Some(held) => this.memory.grow(held, from, this.len),
                        None => false,
                    };
                    if this.len > this.limit || !room {
                        this.give_up();
                    } else {
                        this.chunks.push(data.clone());
                        // hyper stops polling once the announced length is written: the
                        // body is whole then.
                        if this.expected == Some(this.len) {
                            this.commit_now();
                        }
                    }
                }
            }
            Some(Err(_)) => this.give_up(),
            None => {
                if this.expected.is_none_or(|n| n == this.len) {
                    this.commit_now();
                }
                this.give_up();
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        // Never claimed early: the end must be polled to commit the body.
        false
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body being received from core, read by every client of its URL as it grows.
pub struct Shared {
    /// The response as it will be stored (`len` is its announced length).
    pub meta: Arc<Meta>,
    state: Mutex<SharedState>,
    tick: watch::Sender<()>,
    /// Room for the whole body in the memory budget, given back when the last reader is done.
    _room: OwnedSemaphorePermit,
}

#[derive(Default)]
struct SharedState {
    chunks: Vec<Bytes>,
    /// Set at the end: Ok when whole, Err with the reason when cut.
    end: Option<Result<(), String>>,
}

impl Shared {
    /// Receives `body` in a task of its own (to the end, whoever still reads), then stores it
    /// and releases `guard`. Returns the buffer, already published to the followers. `room`:
    /// the memory the whole body may take.
    pub fn start(
        commit: Commit,
        body: Body,
        guard: FlightGuard,
        room: OwnedSemaphorePermit,
    ) -> Arc<Shared> {
        let shared = Arc::new(Shared {
            meta: Arc::new(commit.meta.clone()),
            state: Mutex::default(),
            tick: watch::channel(()).0,
            _room: room,
        });
        guard.publish(shared.clone());
        let s = shared.clone();
        tokio::spawn(async move {
            use http_body_util::BodyExt;
            let mut body = body;
            let mut len = 0u64;
            let mut last = Bytes::new();
            let end = loop {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(mut data) = frame.into_data() {
                            len += data.len() as u64;
                            if len == s.meta.len && !data.is_empty() {
                                // The last byte waits until the body is stored: a client
                                // that has it whole finds it in the cache right after.
                                last = data.split_off(data.len() - 1);
                            }
                            s.state.lock().chunks.push(data);
                            s.tick.send_replace(());
                        }
                    }
                    Some(Err(e)) => break Err(e.to_string()),
                    None if len == s.meta.len => break Ok(()),
                    None => break Err("core's response ended short".to_owned()),
                }
            };
            if end.is_ok() {
                let mut chunks = s.state.lock().chunks.clone();
                chunks.push(last.clone());
                let mut commit = commit;
                commit.guard = Some(guard);
                let _ = tokio::task::spawn_blocking(move || commit.store(chunks, len, None)).await;
            }
            let mut st = s.state.lock();
            if end.is_ok() && !last.is_empty() {
                st.chunks.push(last);
            }
            st.end = Some(end);
            drop(st);
            s.tick.send_replace(());
        });
        shared
    }

    /// The body from its first byte, as it comes.
    pub fn body(self: &Arc<Self>) -> Body {
        use http_body_util::BodyExt;
        let rx = self.tick.subscribe();
        let stream = futures_util::stream::unfold(
            (self.clone(), Some(0usize), rx),
            |(s, at, mut rx)| async move {
                let i = at?;
                loop {
                    rx.borrow_and_update();
                    {
                        let st = s.state.lock();
                        if let Some(c) = st.chunks.get(i) {
                            let c = c.clone();
                            return Some((Ok(Frame::data(c)), (s.clone(), Some(i + 1), rx)));
                        }
                        match &st.end {
                            Some(Ok(())) => return None,
                            Some(Err(e)) => {
                                let e = std::io::Error::other(e.clone());
                                return Some((Err(e), (s.clone(), None, rx)));
                            }
                            None => {}
                        }
                    }
                    if rx.changed().await.is_err() {
                        return None;
                    }
                }
            },
        );
        http_body_util::StreamBody::new(stream).boxed_unsync()
    }
}
