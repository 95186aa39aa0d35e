//! Request bodies read whole before an upstream is chosen, as nginx's
//! `proxy_request_buffering on` (its default, which Mastodon's nginx keeps): past the
//! 16 KiB `prebuffer` reads, the rest of an upload is read at its client's pace into memory
//! (up to [`IN_MEMORY`], from the proxy's own `[core] max_buffer_memory`) and then an unnamed temp file in
//! `data_dir/tmp-proxy`, and only then sent to core, at core's pace (timed as a streamed body:
//! `idle_timeout` between pieces, then `first_byte_timeout`).
//!
//! Why: a media upload from a phone on a slow link (or a client that trickles a body on
//! purpose, a byte a minute) otherwise holds an upstream connection and its place under
//! `max_connections_per_upstream` for as long as it takes; a few hundred of them and every
//! other request gets 503. Read first, it holds only its own client connection, puma gets it
//! at LAN speed, and a body read whole goes to another upstream when the first refuses.
//!
//! A client silent for `idle_timeout` meanwhile gets 408 (core never hears of it); past
//! `max_request_body`, 413. When the temp file cannot be written (`data_dir` full or
//! failing: said once in the log and on `/metrics`), the body streams from there on, as with
//! `buffer_requests = false`: what was read first, then the rest as it comes.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::OwnedSemaphorePermit;

use super::prebuffer::{Prefixed, StartError};
use super::spool::{Spooler, IN_MEMORY};
use super::temp::{Reading, TempFile};

/// A request body read whole: its pieces in memory and in the temp file, sent as often as
/// needed ([`Stored::body`]).
pub struct Stored {
    pieces: Vec<Piece>,
    trailers: Option<HeaderMap>,
    len: u64,
    /// The memory budget held for the pieces in memory (given back with the last copy).
    memory: Option<OwnedSemaphorePermit>,
    /// The pieces past the memory share (its room under `max_temp_bytes` held as long).
    temp: TempFile,
}

enum Piece {
    Memory(Bytes),
    /// `len` bytes of the temp file from `at`.
    File {
        at: u64,
        len: u64,
    },
}

/// What was read of a request body.
pub enum Read<B> {
    /// All of it.
    Whole(Arc<Stored>),
    /// What could be kept, then the rest as it comes (the temp file failed).
    Partial(StoredBody<B>),
}

impl Spooler {
    /// Reads the rest of `start` (each piece within its silence limit, `Prefixed`'s own).
    pub async fn read_request<B>(&self, mut start: Prefixed<B>) -> Result<Read<B>, StartError>
    where
        B: Body<Data = Bytes, Error = std::io::Error> + Unpin,
    {
        self.metrics.proxy_request_buffered();
        let mut stored = Stored {
            pieces: Vec::new(),
            trailers: None,
            len: 0,
            memory: None,
            // As large as the body may be (`max_request_body` bounds it before).
            temp: TempFile::new(self, u64::MAX),
        };
        let mut in_memory = 0;
        loop {
            let data = match start.frame().await {
                None => break,
                Some(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                    return Err(StartError::Silent(start.silence_limit()))
                }
                Some(Err(e)) => return Err(StartError::Client(e)),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => data,
                    Err(frame) => {
                        stored.trailers = frame.into_trailers().ok();
                        break;
                    }
                },
            };
            let n = data.len() as u64;
            if n == 0 {
                continue;
            }
            stored.len += n;
            let to = in_memory + n;
            if to <= IN_MEMORY && self.memory.hold(&mut stored.memory, in_memory, to) {
                in_memory = to;
                stored.pieces.push(Piece::Memory(data));
                continue;
            }
            match stored.temp.append(&data).await {
                Some(at) => match stored.pieces.last_mut() {
                    Some(Piece::File { at: a, len }) if *a + *len == at => *len += n,
                    _ => stored.pieces.push(Piece::File { at, len: n }),
                },
                None => {
                    // No room, or the disk failed: the rest streams, this piece held in
                    // memory, then what is still to come.
                    stored.pieces.push(Piece::Memory(data));
                    return Ok(Read::Partial(StoredBody::new(
                        Arc::new(stored),
                        Some(start),
                    )));
                }
            }
        }
        Ok(Read::Whole(Arc::new(stored)))
    }
}

impl Stored {
    /// A body of these bytes, from the start.
    pub fn body(self: &Arc<Self>) -> StoredBody<super::UpBody> {
        StoredBody::new(self.clone(), None)
    }
}

/// A stored body read from its start, then (for a partial one) the rest of the client's.
pub struct StoredBody<B> {
    stored: Arc<Stored>,
    /// The next piece, and how far into it (a piece in the file is read in parts).
    next: usize,
    offset: u64,
    reading: Reading,
    trailers_sent: bool,
    rest: Option<Prefixed<B>>,
}

impl<B> StoredBody<B> {
    fn new(stored: Arc<Stored>, rest: Option<Prefixed<B>>) -> Self {
        StoredBody {
            stored,
            next: 0,
            offset: 0,
            reading: Reading::default(),
            trailers_sent: false,
            rest,
        }
    }
}

impl<B> Body for StoredBody<B>
where
    B: Body<Data = Bytes, Error = std::io::Error> + Unpin,
{
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
                this.offset += bytes.len() as u64;
                if let Some(Piece::File { len, .. }) = this.stored.pieces.get(this.next) {
                    if this.offset >= *len {
                        this.next += 1;
                        this.offset = 0;
                    }
                }
                return Poll::Ready(Some(Ok(Frame::data(bytes))));
            }
            match this.stored.pieces.get(this.next) {
                Some(Piece::Memory(bytes)) => {
                    this.next += 1;
                    return Poll::Ready(Some(Ok(Frame::data(bytes.clone()))));
                }
                Some(&Piece::File { at, len }) => {
                    let file = this.stored.temp.file().expect("a piece in the file");
                    this.reading
                        .start(file, at + this.offset, len - this.offset);
                }
                None => {
                    if let Some(rest) = &mut this.rest {
                        return Pin::new(rest).poll_frame(cx);
                    }
                    if !this.trailers_sent {
                        this.trailers_sent = true;
                        if let Some(t) = &this.stored.trailers {
                            return Poll::Ready(Some(Ok(Frame::trailers(t.clone()))));
                        }
                    }
                    return Poll::Ready(None);
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_none()
            && !self.reading.is_some()
            && self.next >= self.stored.pieces.len()
            && (self.trailers_sent || self.stored.trailers.is_none())
    }

    /// Exact for a whole body (core gets its `Content-Length`); for a partial one, what the
    /// client's body says is left and what was kept.
    fn size_hint(&self) -> SizeHint {
        let read: u64 = self.stored.pieces[..self.next]
            .iter()
            .map(|p| match p {
                Piece::Memory(b) => b.len() as u64,
                Piece::File { len, .. } => *len,
            })
            .sum::<u64>()
            + self.offset;
        let kept = self.stored.len - read;
        match &self.rest {
            None => SizeHint::with_exact(kept),
            Some(rest) => super::body::plus(rest.size_hint(), kept),
        }
    }
}
