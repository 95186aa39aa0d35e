//! Response buffering, as nginx's `proxy_buffering`: a large answer from puma is read as fast
//! as core sends it, into memory and then into a temp file, and the client reads it from
//! there at its own pace. Without it a client that reads slowly (a phone on a bad link, or
//! one that stops reading on purpose) holds the upstream's connection, and its place under
//! `max_connections_per_upstream`, for as long as it takes: a few hundred such clients and
//! every other request gets 503. With it the connection goes back to its upstream as soon as
//! core has answered.
//!
//! Which answers: those of the web pool whose body may not fit the client connection's own
//! buffers: longer than [`DIRECT_UP_TO`], or of unknown length. Not server-sent events
//! (`text/event-stream`: each event goes on as it comes, and the stream has no end), not an
//! answer core marks `X-Accel-Buffering: no` (nginx's rule), not the streaming pool.
//!
//! Where: the first [`IN_MEMORY`] bytes of each answer in memory, taken from the proxy's
//! own budget, `[core] max_buffer_memory` (apart from `max_flight_memory`: slow clients
//! must not starve the core cache's fills and media fetches of theirs); the rest in an
//! unnamed temp file (`O_TMPFILE`: nothing left behind by a crash) in `data_dir/tmp-proxy`,
//! up to `[core] max_response_temp_file` per answer. When neither has room (the budget is
//! spent, the file is at its cap, or the disk is full or failing: said once in the log and on
//! `/metrics`, as for the media cache), the reading waits for the client, as without
//! buffering: nothing is dropped, the client gets every byte, in order, and an upstream
//! that fails mid-body fails the client's body at the same place.
//!
//! The temp file: `temp`.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

use super::temp::{Reading, TempFile};
use crate::flight::{DiskHealth, MemoryBudget};
use crate::listen::Body;
use crate::metrics::Metrics;

/// Answers up to this long (by their `Content-Length`) go straight to the client: they fit
/// the buffers of its connection (hyper's, the socket's, HTTP/2's window), so even a client
/// that stops reading does not hold the upstream for them.
pub const DIRECT_UP_TO: u64 = 64 * 1024;

/// The bytes of one answer (or request body, past its first 16 KiB) held in memory before the
/// rest goes to the temp file: nginx's `proxy_buffers` (8 × 8 KiB).
pub const IN_MEMORY: u64 = 64 * 1024;

/// Where answers are buffered: `data_dir/tmp-proxy` and the memory budget.
pub struct Spooler {
    pub(super) dir: PathBuf,
    pub(super) memory: MemoryBudget,
    /// `[core] max_temp_bytes`: the bytes of every temp file in `dir` together (a budget in
    /// KiB, as the memory's; taken now or never).
    pub(super) disk_room: MemoryBudget,
    pub(super) disk: Arc<DiskHealth>,
    pub(super) metrics: Metrics,
    tasks: tokio_util::task::TaskTracker,
}

impl Spooler {
    /// Temp files in `dir` (made at the first one if missing: `temp`), `max_temp` bytes in all,
    /// `max_memory` bytes in memory (the proxy's own budget: `[core] max_buffer_memory`).
    /// `tasks`: where the readers of upstream bodies are tracked (a shutdown waits for them).
    pub fn new(
        dir: PathBuf,
        max_temp: u64,
        max_memory: u64,
        disk: Arc<DiskHealth>,
        metrics: Metrics,
        tasks: tokio_util::task::TaskTracker,
    ) -> Spooler {
        Spooler {
            dir,
            disk_room: MemoryBudget::new(max_temp),
            memory: MemoryBudget::new(max_memory),
            disk,
            metrics,
            tasks,
        }
    }

    /// The client's body for `body`, read from upstream by a task of its own from now on.
    /// `max_file`: bytes of this answer that may go to the temp file (0: memory only).
    pub fn spool(&self, body: Body, max_file: u64) -> Body {
        let shared = Arc::new(Shared::default());
        let size = body.size_hint();
        self.metrics.proxy_buffered();
        let writer = Writer {
            shared: shared.clone(),
            memory: self.memory.clone(),
            metrics: self.metrics.clone(),
            temp: TempFile::new(self, max_file),
        };
        self.tasks.spawn(writer.run(body));
        Spooled {
            shared,
            reading: Reading::default(),
            size,
        }
        .boxed_unsync()
    }
}

/// Whether an answer of the web pool is buffered (see the module's doc).
pub fn wanted(headers: &HeaderMap, body: &Body) -> bool {
    if body.is_end_stream() || body.size_hint().exact().is_some_and(|n| n <= DIRECT_UP_TO) {
        return false;
    }
    // The value before any `;` parameter (a media type's essence), compared as a token.
    let is = |name: &str, want: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case(want))
    };
    !is("content-type", "text/event-stream") && !is("x-accel-buffering", "no")
}

/// A piece of the answer not yet read by the client, in order.
enum Piece {
    /// Bytes in memory; `counted`: within `State::in_memory` and its budget (a piece that
    /// came when nothing else was waiting is held whatever its size, as it would be without
    /// buffering).
    Memory { bytes: Bytes, counted: bool },
    /// `len` bytes of the temp file from `at`.
    File { at: u64, len: u64 },
}

/// How the upstream's body ended.
enum End {
    Done(Option<HeaderMap>),
    /// Kept (not taken) so that every later poll fails too.
    Failed(std::io::ErrorKind, String),
}

#[derive(Default)]
struct Shared {
    state: parking_lot::Mutex<State>,
    /// Told when the client read something: room for the writer.
    room: Notify,
    /// Cancelled when the client's body is dropped: the writer stops.
    left: CancellationToken,
}

#[derive(Default)]
struct State {
    pieces: VecDeque<Piece>,
    /// Bytes of counted memory pieces, and the budget held for them.
    in_memory: u64,
    held: Option<OwnedSemaphorePermit>,
    file: Option<Arc<std::fs::File>>,
    /// The writer's temp file once it is done: its room under `max_temp_bytes` is held until
    /// the client has read it (dropped with the state).
    temp: Option<TempFile>,
    end: Option<End>,
    /// The client's body waiting for more.
    reader: Option<Waker>,
}

impl State {
    fn push(&mut self, piece: Piece) {
        self.pieces.push_back(piece);
        self.wake();
    }

    /// Wakes the client's body if it waits for more.
    fn wake(&mut self) {
        if let Some(w) = self.reader.take() {
            w.wake();
        }
    }
}

/// Reads the upstream's body into the pieces.
struct Writer {
    shared: Arc<Shared>,
    memory: MemoryBudget,
    metrics: Metrics,
    /// Where pieces go past the memory share.
    temp: TempFile,
}

impl Writer {
    async fn run(mut self, mut body: Body) {
        let left = self.shared.left.clone();
        let end = loop {
            let frame = tokio::select! {
                frame = body.frame() => frame,
                () = left.cancelled() => return,
            };
            let data = match frame {
                None => break End::Done(None),
                Some(Err(e)) => break End::Failed(e.kind(), e.to_string()),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(frame) => break End::Done(frame.into_trailers().ok()),
                },
            };
            if data.is_empty() {
                continue;
            }
            while !self.place(&data).await {
                // No room anywhere: wait for the client to read (as without buffering).
                tokio::select! {
                    () = self.shared.room.notified() => {}
                    () = left.cancelled() => return,
                }
            }
        };
        // The upstream's connection is released here (the body and its permit dropped),
        // before the client has read the rest.
        drop(body);
        let mut state = self.shared.state.lock();
        state.end = Some(end);
        state.temp = Some(self.temp);
        state.wake();
    }

    /// Puts `data` in memory or in the file; false when neither has room now.
    async fn place(&mut self, data: &Bytes) -> bool {
        if self.in_memory(data, false) || self.in_file(data).await {
            return true;
        }
        // Neither has room: a piece that comes when the client has read all the others is
        // held, outside the budget, as it would be without buffering (by hyper).
        self.in_memory(data, true)
    }

    /// Puts `data` in memory if the answer's share (or, when the client has read everything
    /// else, the piece whatever its size: a fast client's answer is not copied through the
    /// file) fits the budget; `anyway`: held when nothing else is, whatever the budget.
    fn in_memory(&self, data: &Bytes, anyway: bool) -> bool {
        let mut state = self.shared.state.lock();
        let state = &mut *state;
        let to = state.in_memory + data.len() as u64;
        let room = (to <= IN_MEMORY || state.pieces.is_empty())
            && self.memory.hold(&mut state.held, state.in_memory, to);
        if !(room || anyway && state.pieces.is_empty()) {
            return false;
        }
        if room {
            state.in_memory = to;
        }
        state.push(Piece::Memory {
            bytes: data.clone(),
            counted: room,
        });
        true
    }

    /// Puts `data` at the end of the temp file; false when it has no room or fails.
    async fn in_file(&mut self, data: &Bytes) -> bool {
        let made = self.temp.file().is_some();
        let Some(at) = self.temp.append(data).await else {
            return false;
        };
        let n = data.len() as u64;
        let mut state = self.shared.state.lock();
        if !made {
            self.metrics.proxy_spooled();
            state.file = self.temp.file();
        }
        match state.pieces.back_mut() {
            Some(Piece::File { at: a, len }) if *a + *len == at => {
                *len += n;
                state.wake();
            }
            _ => state.push(Piece::File { at, len: n }),
        }
        true
    }
}

/// The client's body: the pieces in order, then the upstream's end.
struct Spooled {
    shared: Arc<Shared>,
    /// A read of the temp file under way, for the piece at the front.
    reading: Reading,
    size: SizeHint,
}

impl http_body::Body for Spooled {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(read) = std::task::ready!(this.reading.poll(cx)) {
                let bytes = read?;
                let mut state = this.shared.state.lock();
                if let Some(Piece::File { at, len }) = state.pieces.front_mut() {
                    let n = bytes.len() as u64;
                    *at += n;
                    *len -= n;
                    if *len == 0 {
                        state.pieces.pop_front();
                    }
                }
                drop(state);
                this.shared.room.notify_one();
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            let mut state = this.shared.state.lock();
            match state.pieces.pop_front() {
                Some(Piece::Memory { bytes, counted }) => {
                    if counted {
                        let was = state.in_memory;
                        state.in_memory -= bytes.len() as u64;
                        let now = state.in_memory;
                        if let Some(held) = &mut state.held {
                            MemoryBudget::shrink(held, was, now);
                        }
                    }
                    drop(state);
                    this.shared.room.notify_one();
                    return Poll::Ready(Some(Ok(Frame::data(bytes))));
                }
                Some(Piece::File { at, len }) => {
                    // Stays at the front until read.
                    state.pieces.push_front(Piece::File { at, len });
                    let file = state.file.clone().expect("a piece in the file has a file");
                    drop(state);
                    this.reading.start(file, at, len);
                }
                None => {
                    return match &state.end {
                        Some(End::Done(None)) => Poll::Ready(None),
                        Some(End::Done(Some(_))) => {
                            let Some(End::Done(trailers)) = state.end.replace(End::Done(None))
                            else {
                                unreachable!("trailers are there")
                            };
                            Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))))
                        }
                        Some(End::Failed(kind, message)) => {
                            Poll::Ready(Some(Err(std::io::Error::new(*kind, message.clone()))))
                        }
                        None => {
                            state.reader = Some(cx.waker().clone());
                            Poll::Pending
                        }
                    };
                }
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        self.size
    }
}

impl Drop for Spooled {
    fn drop(&mut self) {
        self.shared.left.cancel();
    }
}
