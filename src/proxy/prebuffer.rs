//! The start of a request body, read before an upstream is chosen.
//!
//! nginx reads a whole request body before it opens a connection to the upstream
//! (`proxy_request_buffering on`, spooling to disk past 16 KiB). fediedge reads the first
//! [`PREBUFFER`] bytes here, in memory; a longer body is then read to its end too (`stored`,
//! into memory and a temp file, with `[core] buffer_requests`, the default) or streams to
//! core as it comes (`buffer_requests = false`, or when the temp file cannot be written). So:
//!
//! - a client that trickles a small body (a status, a favourite, an ActivityPub delivery)
//!   holds no upstream connection and none of the upstream's connection cap while it does:
//!   a few hundred slow clients cannot take the pool's every slot;
//! - a body read whole can be sent again, so a `POST` goes to another upstream when the first
//!   one refuses the connection (nothing was sent), as nginx does (`proxy_next_upstream error`
//!   without `non_idempotent` still passes on a request that was not sent).
//!
//! A client silent longer than the pool's `idle_timeout` while the start is read gets 408;
//! later, its body is cut with a `TimedOut` error (the upstream's connection is not held by a
//! client that stopped), which the proxy answers with 408 too if core has not answered yet.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;

use super::body::Silence;

/// Bytes of a request body read before an upstream is chosen: nginx's
/// `client_body_buffer_size` on 64-bit systems. Reading stops at the first piece that reaches
/// it, so a request in this phase holds this much plus at most one piece (what hyper had read
/// from the connection already); beyond it, the body streams as it comes.
pub const PREBUFFER: usize = 16 * 1024;

/// What was read of a request body.
pub enum Start<B> {
    /// The whole body: sent as often as needed.
    Whole(Bytes),
    /// The first pieces; the rest (or trailers) is still to come.
    Partial(Prefixed<B>),
}

/// Why the start of a body could not be read.
#[derive(Debug)]
pub enum StartError {
    /// The client's body failed (cut, or past the size limit: the caller's limit flag says).
    Client(std::io::Error),
    /// The client sent nothing for this long.
    Silent(Duration),
}

/// Reads `body` until it ends or `max` bytes have come, waiting at most `silence` (if any)
/// for each piece.
pub async fn read<B>(
    mut body: B,
    max: usize,
    silence: Option<Duration>,
) -> Result<Start<B>, StartError>
where
    B: Body<Data = Bytes, Error = std::io::Error> + Unpin,
{
    let mut pieces = VecDeque::new();
    let mut len = 0;
    loop {
        if body.is_end_stream() {
            return Ok(Start::Whole(concat(pieces, len)));
        }
        if len >= max {
            return Ok(Start::Partial(Prefixed::new(pieces, None, body, silence)));
        }
        let frame = match silence {
            Some(d) => tokio::time::timeout(d, body.frame())
                .await
                .map_err(|_| StartError::Silent(d))?,
            None => body.frame().await,
        };
        match frame {
            None => return Ok(Start::Whole(concat(pieces, len))),
            Some(Err(e)) => return Err(StartError::Client(e)),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    len += data.len();
                    if !data.is_empty() {
                        pieces.push_back(data);
                    }
                }
                // Trailers: passed on after the pieces, the body is not sent again.
                Err(trailers) => {
                    let start = Prefixed::new(pieces, Some(trailers), body, silence);
                    return Ok(Start::Partial(start));
                }
            },
        }
    }
}

/// One `Bytes` of the pieces (no copy for a body that came in one piece).
fn concat(mut pieces: VecDeque<Bytes>, len: usize) -> Bytes {
    match pieces.len() {
        0 => Bytes::new(),
        1 => pieces.pop_front().expect("one piece"),
        _ => {
            let mut all = BytesMut::with_capacity(len);
            for p in pieces {
                all.extend_from_slice(&p);
            }
            all.freeze()
        }
    }
}

/// A body that gives the pieces read ahead, then the rest of the client's body, cut when the
/// client is silent longer than `silence` while the upstream waits for more.
pub struct Prefixed<B> {
    pieces: VecDeque<Bytes>,
    trailers: Option<Frame<Bytes>>,
    rest: B,
    /// Bytes still in `pieces`.
    held: u64,
    silence: Silence,
}

impl<B> Prefixed<B> {
    fn new(
        pieces: VecDeque<Bytes>,
        trailers: Option<Frame<Bytes>>,
        rest: B,
        silence: Option<Duration>,
    ) -> Self {
        let held = pieces.iter().map(|p| p.len() as u64).sum();
        Prefixed {
            pieces,
            trailers,
            rest,
            held,
            silence: Silence::new(silence),
        }
    }
}

impl<B> Prefixed<B> {
    /// The longest silence allowed between two pieces (zero: none).
    pub fn silence_limit(&self) -> Duration {
        self.silence.limit().unwrap_or_default()
    }
}

impl<B> Body for Prefixed<B>
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
        if let Some(piece) = this.pieces.pop_front() {
            this.held -= piece.len() as u64;
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        if let Some(trailers) = this.trailers.take() {
            return Poll::Ready(Some(Ok(trailers)));
        }
        let polled = Pin::new(&mut this.rest).poll_frame(cx);
        this.silence.watch(
            polled,
            cx,
            "the client sent no more of its request body within the idle timeout",
        )
    }

    fn is_end_stream(&self) -> bool {
        self.pieces.is_empty() && self.trailers.is_none() && self.rest.is_end_stream()
    }

    /// The pieces held and what the client's body says is left: exact when it knows its
    /// length, so the upstream gets the same `Content-Length`.
    fn size_hint(&self) -> SizeHint {
        super::body::plus(self.rest.size_hint(), self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use http_body_util::{BodyExt, StreamBody};

    fn pieces(parts: &[&'static [u8]]) -> impl Body<Data = Bytes, Error = std::io::Error> + Unpin {
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn a_body_under_the_limit_is_read_whole_in_one_piece() {
        let Start::Whole(b) = read(pieces(&[b"ab", b"", b"cd"]), 8, None).await.unwrap() else {
            panic!("whole expected");
        };
        assert_eq!(&b[..], b"abcd");
    }

    #[tokio::test]
    async fn a_longer_body_gives_its_start_then_the_rest_in_order() {
        let start = read(pieces(&[b"0123", b"4567", b"89"]), 5, None)
            .await
            .unwrap();
        let Start::Partial(p) = start else {
            panic!("partial expected");
        };
        assert_eq!(p.held, 8, "read until past the limit");
        let all = p.collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], b"0123456789");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_silent_after_the_start_is_cut_after_the_silence_limit() {
        let frames = futures_util::stream::iter([Ok(Frame::data(Bytes::from_static(b"0123")))])
            .chain(futures_util::stream::pending());
        let start = read(StreamBody::new(frames), 2, Some(Duration::from_secs(60)))
            .await
            .unwrap();
        let Start::Partial(mut p) = start else {
            panic!("partial expected");
        };
        let first = p.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"0123");
        let cut = p.frame().await.unwrap().unwrap_err();
        assert_eq!(cut.kind(), std::io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_told_after_the_silence_limit() {
        let body = StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, std::io::Error>,
        >());
        let r = read(body, 8, Some(Duration::from_secs(60))).await;
        assert!(matches!(r, Err(StartError::Silent(d)) if d == Duration::from_secs(60)));
    }
}
