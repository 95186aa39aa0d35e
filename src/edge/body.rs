//! Response bodies read from a file, also one that a flight is still writing (or holding in
//! memory): bytes reach the client as they land, and the last one is held back until the
//! flight has verified the body.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::sync::watch;

use crate::flight::{End, FlightBody, FlightState, Part};
use crate::store::ByteStream;

/// Size of the pieces read from a body file for a response.
const READ_CHUNK: usize = 64 * 1024;

/// Reads `start..end` of `file` as a stream of chunks. With `progress`, the file is still being
/// written: the stream waits for each byte to be published and fails if the flight fails.
pub fn read_range(
    file: Arc<File>,
    start: u64,
    end: u64,
    progress: Option<watch::Receiver<FlightState>>,
) -> impl Stream<Item = io::Result<Bytes>> + Send {
    futures_util::stream::unfold(
        (file, start, progress),
        move |(file, pos, mut progress)| async move {
            if pos >= end {
                return None;
            }
            let available = match progress.as_mut() {
                None => end,
                Some(rx) => match wait_for_bytes(rx, pos, end).await {
                    Ok(available) => available.min(end),
                    Err(e) => return Some((Err(e), (file, end, None))),
                },
            };
            let n = (available - pos).min(READ_CHUNK as u64) as usize;
            let f = file.clone();
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = BytesMut::zeroed(n);
                f.read_exact_at(&mut buf, pos).map(|_| buf.freeze())
            })
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e)));
            match read {
                Ok(bytes) => Some((Ok(bytes), (file, pos + n as u64, progress))),
                Err(e) => Some((Err(e), (file, end, None))),
            }
        },
    )
}

/// Reads `start..end` of a body a flight is fetching, as its bytes are published: from the
/// temp file, or from memory for the part after a failed disk write.
pub fn read_flight(
    body: Arc<FlightBody>,
    start: u64,
    end: u64,
    progress: watch::Receiver<FlightState>,
) -> impl Stream<Item = io::Result<Bytes>> + Send {
    futures_util::stream::unfold(
        (body, start, Some(progress)),
        move |(body, pos, progress)| async move {
            let mut rx = progress?;
            if pos >= end {
                return None;
            }
            let available = match wait_for_bytes(&mut rx, pos, end).await {
                Ok(available) => available.min(end),
                Err(e) => return Some((Err(e), (body, end, None))),
            };
            let n = (available - pos).min(READ_CHUNK as u64);
            let read = match body.part(pos, n) {
                Ok(Part::Memory(bytes)) => Ok(bytes),
                Ok(Part::File(f, until)) => {
                    let n = (until - pos) as usize;
                    tokio::task::spawn_blocking(move || {
                        let mut buf = BytesMut::zeroed(n);
                        f.read_exact_at(&mut buf, pos).map(|_| buf.freeze())
                    })
                    .await
                    .unwrap_or_else(|e| Err(io::Error::other(e)))
                }
                Err(e) => Err(e),
            };
            match read {
                Ok(bytes) if !bytes.is_empty() => {
                    let next = pos + bytes.len() as u64;
                    Some((Ok(bytes), (body, next, Some(rx))))
                }
                Ok(_) => Some((
                    Err(io::Error::other("flight body shorter than published")),
                    (body, end, None),
                )),
                Err(e) => Some((Err(e), (body, end, None))),
            }
        },
    )
}

/// Cuts `start..end` out of a body streamed from its source (which holds back its own last
/// chunk until verified). A range that ends before the body does still waits for the body's
/// verification before its last piece goes out.
pub fn slice_stream(
    body: ByteStream,
    start: u64,
    end: u64,
) -> impl Stream<Item = io::Result<Bytes>> + Send {
    futures_util::stream::unfold((Some(body), 0u64), move |(body, mut pos)| async move {
        use futures_util::StreamExt;
        let mut body = body?;
        loop {
            let chunk = match body.next().await {
                None => return None,
                Some(Err(e)) => return Some((Err(io::Error::other(e)), (None, pos))),
                Some(Ok(c)) => c,
            };
            let (from, to) = (pos, pos + chunk.len() as u64);
            pos = to;
            if to <= start || from >= end {
                continue;
            }
            let piece =
                chunk.slice((start.saturating_sub(from)) as usize..(end.min(to) - from) as usize);
            if to < end {
                return Some((Ok(piece), (Some(body), pos)));
            }
            // The range's last piece: only once the rest of the body is verified.
            while let Some(rest) = body.next().await {
                if let Err(e) = rest {
                    return Some((Err(io::Error::other(e)), (None, pos)));
                }
            }
            return Some((Ok(piece), (None, pos)));
        }
    })
}

/// Waits until more than `pos` bytes may be read for a response ending at `end`; returns how
/// many may.
///
/// The response's last byte is held back until the flight has verified the body (length and
/// checksum; staging and caching come after and do not hold it): a follower's response, whole body or range, can then still be aborted if the
/// body turns out damaged, instead of ending as if whole.
async fn wait_for_bytes(
    rx: &mut watch::Receiver<FlightState>,
    pos: u64,
    end: u64,
) -> io::Result<u64> {
    loop {
        {
            let state = rx.borrow_and_update();
            let readable = if state.verified {
                state.written
            } else {
                state.written.min(end.saturating_sub(1))
            };
            if readable > pos {
                return Ok(readable);
            }
            match &state.end {
                Some(End::Failed(e)) => {
                    return Err(io::Error::other(format!("source failed mid-body: {e}")))
                }
                Some(_) => return Err(io::Error::other("source ended before the requested bytes")),
                None => {}
            }
        }
        if rx.changed().await.is_err() {
            return Err(io::Error::other("fetch task ended without a result"));
        }
    }
}
