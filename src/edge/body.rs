//! Response bodies read from a file, also one that a flight is still writing (or holding in
//! memory): bytes reach the client as they land, and the last one is held back until the
//! flight has verified the body. Bytes the flight cannot give (a cache disk that failed
//! mid-body) are read from the source again by that response alone, within a `max_flights`
//! slot: with none free in time, the response is cut (never spliced, never ended short as if
//! whole).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
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
                    Ok(Some(available)) => available.min(end),
                    Ok(None) => {
                        let e = io::Error::other("the flight kept the rest nowhere");
                        return Some((Err(e), (file, end, None)));
                    }
                    Err(e) => return Some((Err(e), (file, end, None))),
                },
            };
            let n = (available - pos).min(READ_CHUNK as u64) as usize;
            match read_at(file.clone(), pos, n).await {
                Ok(bytes) => Some((Ok(bytes), (file, pos + n as u64, progress))),
                Err(e) => Some((Err(e), (file, end, None))),
            }
        },
    )
}

/// Reads `start..end` of a body a flight is fetching, as its bytes are published: from the
/// temp file, or from memory for the part after a failed disk write. Bytes the flight cannot
/// give (its part on a cache disk that failed since, or a rest it kept nowhere) are read from
/// the source again by this reader on its own ([`crate::flight::Started::refetch`]), so a
/// local disk's fault never cuts the response. Its last byte then waits for both checks:
/// the read's own (the whole body read again), and the flight's if the flight gave it any
/// bytes.
pub fn read_flight(
    body: Arc<FlightBody>,
    start: u64,
    end: u64,
    progress: watch::Receiver<FlightState>,
) -> impl Stream<Item = io::Result<Bytes>> + Send {
    /// Where the next bytes come from.
    enum From {
        Flight(Arc<FlightBody>, watch::Receiver<FlightState>),
        /// The rest read from the source; with the flight that gave the bytes before.
        Source(Refetched, Option<watch::Receiver<FlightState>>),
        Done,
    }
    futures_util::stream::unfold(
        (From::Flight(body, progress), start),
        move |(mut from, pos)| async move {
            loop {
                match from {
                    From::Done => return None,
                    From::Source(mut rest, mut gave) => {
                        let bytes = match rest.next().await {
                            Some(Ok(bytes)) => bytes,
                            Some(Err(e)) => return Some((Err(e), (From::Done, end))),
                            None if pos < end => {
                                let e = io::Error::other("the source's body ended short");
                                return Some((Err(e), (From::Done, end)));
                            }
                            None => return None,
                        };
                        let next = pos + bytes.len() as u64;
                        if let (true, Some(rx)) = (next >= end, gave.as_mut()) {
                            if let Err(e) = flight_verified(rx).await {
                                return Some((Err(e), (From::Done, end)));
                            }
                        }
                        return Some((Ok(bytes), (From::Source(rest, gave), next)));
                    }
                    From::Flight(body, mut rx) => {
                        if pos >= end {
                            return None;
                        }
                        match from_flight(&body, &mut rx, pos, end).await {
                            Ok(Some(bytes)) => {
                                let next = pos + bytes.len() as u64;
                                return Some((Ok(bytes), (From::Flight(body, rx), next)));
                            }
                            Ok(None) => match refetch(&rx, pos > start, pos, end).await {
                                Ok(rest) => from = From::Source(rest, (pos > start).then_some(rx)),
                                Err(e) => return Some((Err(e), (From::Done, end))),
                            },
                            Err(e) => return Some((Err(e), (From::Done, end))),
                        }
                    }
                }
            }
        },
    )
}

/// The next bytes at `pos` that the flight can give; `None` when it cannot give them (they
/// are on a disk that failed, or kept nowhere).
async fn from_flight(
    body: &FlightBody,
    rx: &mut watch::Receiver<FlightState>,
    pos: u64,
    end: u64,
) -> io::Result<Option<Bytes>> {
    let Some(available) = wait_for_bytes(rx, pos, end).await? else {
        return Ok(None);
    };
    let n = (available.min(end) - pos).min(READ_CHUNK as u64);
    let bytes = match body.part(pos, n)? {
        Part::Memory(bytes) => bytes,
        Part::File(f, until) => {
            match read_at(f, pos, (until - pos) as usize).await {
                Ok(bytes) => bytes,
                // The flight's own temp file: a local disk's failure, not the source's. The
                // flight takes no more followers.
                Err(e) => {
                    tracing::debug!(error = %e, pos, "flight body unreadable: reading it from the source");
                    let started = rx.borrow().started.clone();
                    if let Some(started) = started {
                        started.unreadable(rx, &e);
                    }
                    return Ok(None);
                }
            }
        }
    };
    if bytes.is_empty() {
        return Err(io::Error::other("flight body shorter than published"));
    }
    Ok(Some(bytes))
}

/// `n` bytes of `file` at `pos`, read on a blocking thread.
async fn read_at(file: Arc<File>, pos: u64, n: usize) -> io::Result<Bytes> {
    tokio::task::spawn_blocking(move || {
        let mut buf = BytesMut::zeroed(n);
        file.read_exact_at(&mut buf, pos).map(|_| buf.freeze())
    })
    .await
    .unwrap_or_else(|e| Err(io::Error::other(e)))
}

/// Part of a body read again from its source.
type Refetched = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>;

/// `pos..end` of the body read again from the flight's source; `spliced`: the reader sent
/// bytes of the flight before.
async fn refetch(
    rx: &watch::Receiver<FlightState>,
    spliced: bool,
    pos: u64,
    end: u64,
) -> io::Result<Refetched> {
    let started = rx.borrow().started.clone();
    let started = started.ok_or_else(|| io::Error::other("a flight body before its start"))?;
    let whole = started.refetch(spliced).await.map_err(io::Error::other)?;
    Ok(Box::pin(slice_stream(whole, pos, end)))
}

/// Waits until the flight has verified its body (it reads its source to the end even when it
/// keeps nothing more): the bytes it gave a reader that then went to the source are checked.
async fn flight_verified(rx: &mut watch::Receiver<FlightState>) -> io::Result<()> {
    match rx.wait_for(|s| s.verified || s.end.is_some()).await {
        Ok(s) if s.verified => Ok(()),
        Ok(_) => Err(io::Error::other(
            "the flight failed before verifying the bytes it gave",
        )),
        Err(_) => Err(io::Error::other("fetch task ended without a result")),
    }
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
///
/// `None`: the flight keeps no more of the body ([`FlightState::rest_unkept`]); the reader
/// must get its bytes from the source.
async fn wait_for_bytes(
    rx: &mut watch::Receiver<FlightState>,
    pos: u64,
    end: u64,
) -> io::Result<Option<u64>> {
    loop {
        {
            let state = rx.borrow_and_update();
            let readable = if state.verified {
                state.written
            } else {
                state.written.min(end.saturating_sub(1))
            };
            if readable > pos {
                return Ok(Some(readable));
            }
            if state.rest_unkept && pos >= state.written {
                return Ok(None);
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

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    fn kept(written: u64) -> FlightState {
        FlightState {
            written,
            rest_unkept: true,
            ..FlightState::default()
        }
    }

    // A flight that keeps nothing past `written` (its disk failed mid-body, no memory left)
    // still reads its source on to verify what it gave: its readers go to the source for
    // the rest, but a last byte it gave still waits for that check.
    #[tokio::test]
    async fn past_what_a_flight_kept_a_reader_goes_to_the_source_and_its_last_byte_waits() {
        let (tx, rx) = watch::channel(kept(100));
        let mut r = rx.clone();
        let past = wait_for_bytes(&mut r, 100, 300).now_or_never();
        assert!(
            matches!(past, Some(Ok(None))),
            "past the kept part: to the source at once"
        );
        let mut r = rx.clone();
        let before = wait_for_bytes(&mut r, 50, 300).now_or_never();
        assert!(matches!(before, Some(Ok(Some(100)))), "the kept part");
        // A range that ends where the flight stopped keeping: all but its last byte, which
        // waits for the flight's check.
        let mut r = rx.clone();
        let ends_there = wait_for_bytes(&mut r, 50, 100).now_or_never();
        assert!(matches!(ends_there, Some(Ok(Some(99)))));
        let mut r = rx.clone();
        let mut last = Box::pin(wait_for_bytes(&mut r, 99, 100));
        assert!(
            last.as_mut().now_or_never().is_none(),
            "waits for the check"
        );
        tx.send_modify(|s| s.verified = true);
        assert!(matches!(last.await, Ok(Some(100))));
        // The flight ends NoRoom: past the kept part is still the source's, not an error.
        tx.send_modify(|s| s.end = Some(End::NoRoom));
        let mut r = rx.clone();
        let after = wait_for_bytes(&mut r, 100, 300).now_or_never();
        assert!(matches!(after, Some(Ok(None))));
    }

    #[tokio::test]
    async fn a_flight_that_fails_before_its_check_cuts_the_last_byte_it_gave() {
        let (tx, rx) = watch::channel(kept(100));
        let mut r = rx.clone();
        let mut last = Box::pin(wait_for_bytes(&mut r, 99, 100));
        assert!(last.as_mut().now_or_never().is_none());
        let e = crate::store::StoreError::backend("origin", "damaged");
        tx.send_modify(|s| s.end = Some(End::Failed(Arc::new(e))));
        assert!(last.await.is_err());
        let mut r = rx.clone();
        assert!(flight_verified(&mut r).await.is_err());
    }
}
