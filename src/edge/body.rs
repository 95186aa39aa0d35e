//! Response bodies read from a file, also one that a flight is still writing: bytes reach the
//! client as they land, and the last one is held back until the flight has verified the body.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::sync::watch;

use crate::flight::{End, FlightState};

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

/// Waits until more than `pos` bytes may be read for a response ending at `end`; returns how
/// many may.
///
/// The response's last byte is held back until the flight is complete (length and checksum
/// verified): a follower's response, whole body or range, can then still be aborted if the
/// body turns out damaged, instead of ending as if whole.
async fn wait_for_bytes(
    rx: &mut watch::Receiver<FlightState>,
    pos: u64,
    end: u64,
) -> io::Result<u64> {
    loop {
        {
            let state = rx.borrow_and_update();
            let readable = match &state.end {
                Some(End::Complete) => state.written,
                _ => state.written.min(end.saturating_sub(1)),
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
