//! The health of a local directory the edge writes to (the cache, `data_dir`): what its last
//! write (or a flight's temp file that could not be read back) showed, logged once on each
//! change and exported as `fediedge_disk_state{dir}`.
//!
//! There is no separate probe: every flight tries the disk first (a temp file with its room
//! reserved up front), so the first write that succeeds after space returns turns the state
//! back to ok and caching resumes by itself, also after a restart on a still-full disk.

use std::io;

use parking_lot::Mutex;

use crate::metrics::Metrics;
use crate::store::DiskState;

/// The last known state of one local directory.
pub struct DiskHealth {
    dir: &'static str,
    state: Mutex<DiskState>,
    metrics: Metrics,
}

impl DiskHealth {
    /// Starts as ok; `dir` is the label: `cache` or `data_dir`.
    pub fn new(dir: &'static str, metrics: Metrics) -> DiskHealth {
        metrics.set_disk_state(dir, DiskState::Ok.code(), false);
        DiskHealth {
            dir,
            state: Mutex::new(DiskState::Ok),
            metrics,
        }
    }

    /// The label of the directory.
    pub fn dir(&self) -> &'static str {
        self.dir
    }

    /// The state now.
    pub fn state(&self) -> DiskState {
        *self.state.lock()
    }

    /// Records a failed write (or read-back).
    pub fn failed(&self, e: &io::Error) {
        self.set(DiskState::of(e), Some(e));
    }

    /// Records a successful write.
    pub fn ok(&self) {
        self.set(DiskState::Ok, None);
    }

    fn set(&self, new: DiskState, error: Option<&io::Error>) {
        let old = {
            let mut state = self.state.lock();
            if *state == new {
                return;
            }
            std::mem::replace(&mut *state, new)
        };
        self.metrics.set_disk_state(self.dir, new.code(), true);
        match error {
            None => tracing::info!(
                dir = self.dir,
                was = old.as_str(),
                "local disk writable again: caching resumes"
            ),
            Some(e) => tracing::warn!(
                dir = self.dir,
                state = new.as_str(),
                error = %e,
                "local disk {}: serving without it until a write succeeds",
                new.as_str()
            ),
        }
    }
}
