//! Where a flight keeps the body it is fetching: a temp file, and from the first failed
//! write on (a full, read-only or failing disk) a bounded buffer in memory. Readers take the
//! part before the failure from the file and the rest from memory, so every client gets the
//! exact bytes whichever way the disk went.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The body of one flight, shared by the leader (who writes) and every follower (who read).
pub struct FlightBody {
    file: Option<Arc<File>>,
    spill: OnceLock<Spill>,
}

/// The part of a body held in memory, from offset `at` on.
struct Spill {
    at: u64,
    buf: Mutex<Vec<u8>>,
    /// Its share of the memory budget, given back when the last reader is done.
    _permit: OwnedSemaphorePermit,
}

/// Where the bytes at one offset are.
pub enum Part {
    /// In the file, up to the given offset.
    File(Arc<File>, u64),
    /// In memory: the bytes asked for, copied.
    Memory(Bytes),
}

impl FlightBody {
    /// A body written to `file`.
    pub fn file(file: Arc<File>) -> FlightBody {
        FlightBody {
            file: Some(file),
            spill: OnceLock::new(),
        }
    }

    /// A body held in memory from its first byte (no usable disk), within `permit`.
    pub fn memory(permit: OwnedSemaphorePermit, size: u64) -> FlightBody {
        let body = FlightBody {
            file: None,
            spill: OnceLock::new(),
        };
        body.spill_from(0, permit, size);
        body
    }

    /// Moves the rest of the body, from `at` on, into memory.
    pub fn spill_from(&self, at: u64, permit: OwnedSemaphorePermit, size: u64) {
        let _ = self.spill.set(Spill {
            at,
            buf: Mutex::new(Vec::with_capacity((size - at) as usize)),
            _permit: permit,
        });
    }

    /// True once the body (or its tail) is in memory.
    pub fn in_memory(&self) -> bool {
        self.spill.get().is_some()
    }

    /// Appends a chunk to the part in memory (only after [`FlightBody::spill_from`]).
    pub fn push(&self, chunk: &[u8]) {
        if let Some(s) = self.spill.get() {
            s.buf.lock().extend_from_slice(chunk);
        }
    }

    /// The file being written, if the body still goes to disk.
    pub fn disk_file(&self) -> Option<&Arc<File>> {
        self.file.as_ref().filter(|_| !self.in_memory())
    }

    /// Where to read at most `n` bytes at `pos` (all of them published as written).
    pub fn part(&self, pos: u64, n: u64) -> io::Result<Part> {
        match (self.spill.get(), &self.file) {
            (Some(s), _) if pos >= s.at => {
                let buf = s.buf.lock();
                let from = (pos - s.at) as usize;
                let to = (from + n as usize).min(buf.len());
                Ok(Part::Memory(Bytes::copy_from_slice(&buf[from..to])))
            }
            (Some(s), Some(f)) => Ok(Part::File(f.clone(), (pos + n).min(s.at))),
            (None, Some(f)) => Ok(Part::File(f.clone(), pos + n)),
            (Some(_), None) => unreachable!("a memory body starts at 0"),
            (None, None) => Err(io::Error::other(
                "a flight body with neither file nor memory",
            )),
        }
    }

    /// Writes the whole (verified) body into `out`: the file's part, then memory's.
    pub fn copy_to(&self, out: &mut File) -> Result<(), CopyError> {
        let at = self.spill.get().map_or(u64::MAX, |s| s.at);
        if let (Some(f), true) = (&self.file, at > 0) {
            let mut pos = 0;
            let mut buf = vec![0u8; 256 * 1024];
            while pos < at {
                let n = f.read_at(&mut buf, pos).map_err(CopyError::Read)?;
                if n == 0 {
                    break;
                }
                let n = n.min((at - pos) as usize);
                out.write_all(&buf[..n]).map_err(CopyError::Write)?;
                pos += n as u64;
            }
        }
        if let Some(s) = self.spill.get() {
            out.write_all(&s.buf.lock()).map_err(CopyError::Write)?;
        }
        out.sync_data().map_err(CopyError::Write)
    }
}

/// Why [`FlightBody::copy_to`] failed: each side is a different disk.
#[derive(Debug)]
pub enum CopyError {
    /// Reading the body's part in its temp file (a disk that failed mid-body).
    Read(io::Error),
    /// Writing the copy.
    Write(io::Error),
}

/// Reserves `size` bytes of disk for `file` (`posix_fallocate`), so that a full disk shows
/// before the first byte is published rather than in the middle of the body. Filesystems
/// that cannot preallocate are not an error.
pub fn preallocate(file: &File, size: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    if size == 0 {
        return Ok(());
    }
    // SAFETY: the descriptor is open for the whole call; posix_fallocate touches no memory.
    let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, size as libc::off_t) };
    match rc {
        0 | libc::EOPNOTSUPP | libc::EINVAL => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// Creates a temp file in `dir` with room for `size` bytes.
pub fn create_temp(dir: &Path, size: u64) -> io::Result<tempfile::NamedTempFile> {
    let tmp = tempfile::NamedTempFile::new_in(dir)?;
    preallocate(tmp.as_file(), size)?;
    Ok(tmp)
}

/// The bounds on the work flights may take on: how many run at once, how many temp-disk
/// bytes they hold, how much memory bodies without a disk may take.
pub struct Limits {
    flights: Slots,
    temp: Arc<Semaphore>,
    temp_total: u32,
    memory: MemoryBudget,
    queue_wait: Duration,
}

/// `max_flights`: the slots of every source read a flight makes for clients, its own fetch
/// and its followers' refetches ([`super::refetch`]) alike, with the time one may wait for a
/// slot.
#[derive(Clone)]
pub struct Slots {
    sem: Arc<Semaphore>,
    queue_wait: Duration,
}

impl Slots {
    /// A slot if one is free now.
    pub fn now(&self) -> Option<OwnedSemaphorePermit> {
        self.sem.clone().try_acquire_owned().ok()
    }

    /// A slot, waiting up to the queue time; `None` when none freed up in time.
    pub async fn wait(&self) -> Option<OwnedSemaphorePermit> {
        let acquire = self.sem.clone().acquire_owned();
        tokio::time::timeout(self.queue_wait, acquire)
            .await
            .ok()?
            .ok()
    }
}

/// `stream` holding a `max_flights` slot: given back when it ends or its reader leaves.
pub fn holding(
    stream: crate::store::ByteStream,
    slot: OwnedSemaphorePermit,
) -> crate::store::ByteStream {
    use futures_util::StreamExt;
    Box::pin(stream.map(move |chunk| {
        let _held = &slot;
        chunk
    }))
}

/// `max_flight_memory`: the bytes of bodies held in memory while they are received, shared by
/// media fetches whose disk failed and the core cache's fills, in whole KiB. Taken now or
/// never: a body that does not fit is passed on without being held (streamed to each client
/// on its own, not cached).
#[derive(Clone, Debug)]
pub struct MemoryBudget {
    sem: Arc<Semaphore>,
    total: u32,
}

impl MemoryBudget {
    /// A budget of `bytes`.
    pub fn new(bytes: u64) -> MemoryBudget {
        MemoryBudget {
            sem: Arc::new(Semaphore::new(kib(bytes) as usize)),
            total: kib(bytes),
        }
    }

    /// Room for `bytes`, if that much is free now.
    pub fn take(&self, bytes: u64) -> Option<OwnedSemaphorePermit> {
        let n = kib(bytes);
        if n > self.total {
            return None;
        }
        self.sem.clone().try_acquire_many_owned(n).ok()
    }

    /// Grows `held` (room for `from` bytes, taken from this budget) to room for `to` bytes;
    /// false when that much is not free now (`held` is then unchanged).
    pub fn grow(&self, held: &mut OwnedSemaphorePermit, from: u64, to: u64) -> bool {
        let more = kib(to).saturating_sub(kib(from));
        if more == 0 {
            return true;
        }
        match self.sem.clone().try_acquire_many_owned(more) {
            Ok(p) => {
                held.merge(p);
                true
            }
            Err(_) => false,
        }
    }

    /// Makes `held` (room for `from` bytes, or none yet) room for `to` bytes; false when that
    /// much is not free now (`held` is then unchanged).
    pub fn hold(&self, held: &mut Option<OwnedSemaphorePermit>, from: u64, to: u64) -> bool {
        match held {
            Some(h) => self.grow(h, from, to),
            None => self.take(to).map(|p| *held = Some(p)).is_some(),
        }
    }

    /// Shrinks `held` (room for `from` bytes) to room for `to` bytes, giving the rest back.
    pub fn shrink(held: &mut OwnedSemaphorePermit, from: u64, to: u64) {
        let less = kib(from).saturating_sub(kib(to));
        if less > 0 {
            drop(held.split(less as usize));
        }
    }

    /// Bytes (whole KiB) free now.
    pub fn available(&self) -> u64 {
        self.sem.available_permits() as u64 * 1024
    }

    /// Bytes (whole KiB) taken now.
    pub fn in_use(&self) -> u64 {
        (u64::from(self.total) * 1024).saturating_sub(self.available())
    }
}

/// Budgets count whole KiB (a semaphore counts in `u32`).
fn kib(bytes: u64) -> u32 {
    bytes.div_ceil(1024).min(u32::MAX as u64) as u32
}

impl Limits {
    /// `max_flights` fetches at once, `max_temp` bytes of temp files, `max_memory` bytes of
    /// bodies held in memory; a flight waits up to `queue_wait` for its slot and its temp
    /// bytes before it gives up (503).
    pub fn new(max_flights: usize, max_temp: u64, max_memory: u64, queue_wait: Duration) -> Self {
        Limits {
            flights: Slots {
                sem: Arc::new(Semaphore::new(max_flights)),
                queue_wait,
            },
            temp: Arc::new(Semaphore::new(kib(max_temp) as usize)),
            temp_total: kib(max_temp),
            memory: MemoryBudget::new(max_memory),
            queue_wait,
        }
    }

    /// A flight slot if one is free now.
    pub fn flight_now(&self) -> Option<OwnedSemaphorePermit> {
        self.flights.now()
    }

    /// A flight slot, waiting briefly; `None` when none freed up in time.
    pub async fn flight(&self) -> Option<OwnedSemaphorePermit> {
        self.flights.wait().await
    }

    /// The flight slots, for a follower's refetch to take one as a flight does.
    pub fn slots(&self) -> Slots {
        self.flights.clone()
    }

    /// Temp-disk room for a body of `size` if that much is free now.
    pub fn temp_now(&self, size: u64) -> Option<OwnedSemaphorePermit> {
        let n = kib(size).min(self.temp_total);
        self.temp.clone().try_acquire_many_owned(n).ok()
    }

    /// Temp-disk room for a body of `size`, waiting briefly. A body larger than the whole
    /// budget takes all of it (it runs alone rather than never).
    pub async fn temp(&self, size: u64) -> Option<OwnedSemaphorePermit> {
        let n = kib(size).min(self.temp_total);
        let acquire = self.temp.clone().acquire_many_owned(n);
        tokio::time::timeout(self.queue_wait, acquire)
            .await
            .ok()?
            .ok()
    }

    /// Memory for `size` bytes of body, now or never (a body that does not fit is streamed
    /// to each client on its own instead).
    pub fn memory(&self, size: u64) -> Option<OwnedSemaphorePermit> {
        self.memory.take(size)
    }

    /// The memory budget, for the core cache's fills to share.
    pub fn memory_budget(&self) -> MemoryBudget {
        self.memory.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Paused time: the queue's wait runs on tokio's clock, advanced by the runtime when
    // every task waits, so these take no real time and no machine load can change them.

    #[test]
    fn the_memory_budget_grows_a_hold_in_whole_kib_and_takes_it_back_on_drop() {
        let budget = MemoryBudget::new(8 * 1024);
        let mut held = budget.take(0).expect("nothing is always free");
        assert!(budget.grow(&mut held, 0, 1));
        assert!(budget.grow(&mut held, 1, 1024), "the same KiB");
        assert_eq!(budget.available(), 7 * 1024);
        assert!(budget.grow(&mut held, 1024, 8 * 1024));
        assert!(
            !budget.grow(&mut held, 8 * 1024, 8 * 1024 + 1),
            "past the budget"
        );
        assert_eq!(budget.available(), 0, "a refused growth takes nothing");
        assert!(budget.take(1).is_none());
        drop(held);
        assert_eq!(budget.available(), 8 * 1024);
        assert!(
            budget.take(8 * 1024 + 1).is_none(),
            "larger than the whole budget"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn past_max_flights_a_flight_waits_the_queue_time_then_gives_up() {
        let limits = Limits::new(1, 1 << 20, 1 << 20, Duration::from_secs(2));
        let _held = limits.flight().await.expect("a free slot");
        assert!(limits.flight_now().is_none(), "none free now");
        let asked = tokio::time::Instant::now();
        assert!(limits.flight().await.is_none());
        assert_eq!(asked.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refetch_takes_its_slot_from_the_same_max_flights() {
        let limits = Limits::new(2, 1 << 20, 1 << 20, Duration::from_secs(2));
        let _flight = limits.flight_now().expect("a free slot");
        let slots = limits.slots();
        let refetch = slots.now().expect("the other slot");
        assert!(
            limits.flight_now().is_none(),
            "a refetch holds a flight's slot"
        );
        assert!(
            slots.wait().await.is_none(),
            "a second refetch waits, then gives up"
        );
        drop(refetch);
        assert!(limits.flight_now().is_some(), "given back when it ends");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_freed_while_a_flight_queues_is_taken() {
        let limits = Arc::new(Limits::new(1, 1 << 20, 1 << 20, Duration::from_secs(2)));
        let held = limits.flight().await.expect("a free slot");
        let waiter = tokio::spawn({
            let limits = limits.clone();
            async move { limits.flight().await.is_some() }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(held);
        assert!(
            waiter.await.unwrap(),
            "the freed slot went to the queued flight"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn temp_bytes_wait_the_queue_time_and_a_huge_body_takes_the_whole_budget() {
        let limits = Limits::new(4, 100 * 1024, 1 << 20, Duration::from_secs(2));
        let first = limits.temp(80 * 1024).await.expect("room");
        assert!(limits.temp_now(80 * 1024).is_none(), "no room now");
        assert!(limits.temp_now(20 * 1024).is_some(), "what is left");
        assert!(
            limits.temp(80 * 1024).await.is_none(),
            "no room past the cap"
        );
        drop(first);
        // Larger than the whole budget: takes all of it rather than never running.
        let huge = limits.temp(10 << 20).await.expect("all of the budget");
        assert!(limits.temp(1).await.is_none());
        drop(huge);
        assert!(limits.temp(1).await.is_some());
    }
}
