//! One buffered body's temp file in `data_dir/tmp-proxy` (`spool`'s answers, `stored`'s
//! request bodies): unnamed (`O_TMPFILE`: nothing left behind by a crash), made at its first
//! use, appended to and read back with `pwrite`/`pread` on blocking threads (one file, two
//! offsets: tokio's `File` has one position), its bytes held under `[core] max_temp_bytes`
//! for as long as the `TempFile` lives. Bytes read are not reused, so the caps count every
//! byte written, as nginx's `proxy_max_temp_file_size` does.

use std::fs::File;
use std::future::Future;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinHandle;

use super::spool::Spooler;
use crate::flight::{DiskHealth, MemoryBudget};

/// A body's temp file, written at its end.
pub(super) struct TempFile {
    dir: PathBuf,
    room: MemoryBudget,
    disk: Arc<DiskHealth>,
    /// Most bytes for this body; 0 once the disk failed (the body goes on without it).
    max: u64,
    file: Option<Arc<File>>,
    written: u64,
    held: Option<OwnedSemaphorePermit>,
}

impl TempFile {
    /// Up to `max` bytes (and what `max_temp_bytes` has left) in `spooler`'s directory.
    pub(super) fn new(spooler: &Spooler, max: u64) -> TempFile {
        TempFile {
            dir: spooler.dir.clone(),
            room: spooler.disk_room.clone(),
            disk: spooler.disk.clone(),
            max,
            file: None,
            written: 0,
            held: None,
        }
    }

    /// Writes `data` at the end; where it went, or None: no room (this body's cap or
    /// `max_temp_bytes`), or the disk failed (told to the disk's health; no more tries).
    pub(super) async fn append(&mut self, data: &Bytes) -> Option<u64> {
        let (at, n) = (self.written, data.len() as u64);
        if at + n > self.max || !self.room.hold(&mut self.held, at, at + n) {
            return None;
        }
        let file = match &self.file {
            Some(f) => f.clone(),
            None => {
                let dir = self.dir.clone();
                match tokio::task::spawn_blocking(move || make(&dir)).await {
                    Ok(Ok(f)) => self.file.insert(Arc::new(f)).clone(),
                    Ok(Err(e)) => return self.failed(Some(&e), n),
                    Err(_) => return self.failed(None, n),
                }
            }
        };
        let bytes = data.clone();
        match tokio::task::spawn_blocking(move || file.write_all_at(&bytes, at)).await {
            Ok(Ok(())) => self.disk.ok(),
            Ok(Err(e)) => return self.failed(Some(&e), n),
            Err(_) => return self.failed(None, n),
        }
        self.written += n;
        Some(at)
    }

    /// A failed write of `n` bytes: the disk's health told, their room given back, no more
    /// tries for this body.
    fn failed(&mut self, e: Option<&std::io::Error>, n: u64) -> Option<u64> {
        if let Some(e) = e {
            self.disk.failed(e);
        }
        if let Some(held) = &mut self.held {
            MemoryBudget::shrink(held, self.written + n, self.written);
        }
        self.max = 0;
        None
    }

    /// The file, once made (its readers share it).
    pub(super) fn file(&self) -> Option<Arc<File>> {
        self.file.clone()
    }
}

/// The most read from a temp file at once (one frame of a body).
const READ_PIECE: u64 = 64 * 1024;

/// A read of a temp file under way (or none), for a body's `poll_frame`.
#[derive(Default)]
pub(super) struct Reading(Option<JoinHandle<std::io::Result<Bytes>>>);

impl Reading {
    /// Starts reading the next piece of the `len` bytes at `at` of `file` (at most
    /// [`READ_PIECE`]: one frame) on a blocking thread.
    pub(super) fn start(&mut self, file: Arc<File>, at: u64, len: u64) {
        let n = len.min(READ_PIECE);
        self.0 = Some(tokio::task::spawn_blocking(move || {
            let mut buf = vec![0; n as usize];
            file.read_exact_at(&mut buf, at)?;
            Ok(Bytes::from(buf))
        }));
    }

    /// Whether a read is under way.
    pub(super) fn is_some(&self) -> bool {
        self.0.is_some()
    }

    /// The bytes read, once the read under way is done; `Ready(None)`: none under way.
    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<std::io::Result<Bytes>>> {
        let Some(handle) = &mut self.0 else {
            return Poll::Ready(None);
        };
        let read = std::task::ready!(Pin::new(handle).poll(cx));
        self.0 = None;
        Poll::Ready(Some(read.map_err(std::io::Error::other).and_then(|r| r)))
    }
}

/// A new unnamed temp file in `dir`, which is made again if it went (an admin's clean-up of
/// `data_dir` while the edge runs). Blocking.
fn make(dir: &Path) -> std::io::Result<File> {
    match tempfile::tempfile_in(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir)?;
            tempfile::tempfile_in(dir)
        }
        made => made,
    }
}
