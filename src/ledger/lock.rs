//! `data_dir/lock`: one `serve` per data directory.
//!
//! `serve` releases every write-back claim at start (the claims of a process that died are
//! void). A second `serve` on the same `data_dir` would release the first one's live claims
//! and copy the same bodies twice, and both would clear the same temp directories. So `serve`
//! holds an exclusive advisory lock (`flock`) on `data_dir/lock` for its lifetime and writes
//! its PID into the file; a second one is refused at start, naming the directory and that PID.
//! The kernel drops the lock when the process ends, however it ends, so a stale file never
//! blocks a restart.
//!
//! `migrate` does not take the lock: it is meant to run beside `serve` (the ledger is SQLite in
//! WAL mode, and migrate neither claims queue rows nor clears `serve`'s directories).
//!
//! `flock` comes from `rustix` (already built for `tempfile`) rather than
//! `std::fs::File::try_lock`, which needs Rust 1.89 and the crate's `rust-version` is 1.85.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use rustix::fs::{flock, FlockOperation};

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error(
        "{dir} is in use by another fediedge serve{}; stop it or give this one another data_dir",
        .pid.as_deref().map(|p| format!(" (PID {p})")).unwrap_or_default()
    )]
    Held {
        /// The data directory.
        dir: PathBuf,
        /// The PID written by the holder, if it could be read.
        pid: Option<String>,
    },
    /// The lock file could not be opened or written.
    #[error("cannot lock {path}: {source}")]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// The held lock; released when dropped (or when the process ends).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    path: PathBuf,
}

impl DataDirLock {
    /// Takes the lock on `data_dir/lock` (creating the directory and the file if needed), or
    /// fails at once if another process holds it.
    pub fn acquire(data_dir: &Path) -> Result<DataDirLock, LockError> {
        let path = data_dir.join("lock");
        let io = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(data_dir).map_err(io)?;
        // Not truncated on open: the holder's PID must survive our failed attempt.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        if let Err(e) = flock(&file, FlockOperation::NonBlockingLockExclusive) {
            if e == rustix::io::Errno::WOULDBLOCK {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(LockError::Held {
                    dir: data_dir.to_owned(),
                    pid: (!pid.is_empty()).then(|| pid.to_owned()),
                });
            }
            return Err(io(e.into()));
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(DataDirLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        let err = DataDirLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        assert!(
            err.contains(&format!("PID {}", std::process::id())),
            "{err}"
        );
        drop(first);
        DataDirLock::acquire(dir.path()).unwrap();
    }
}
