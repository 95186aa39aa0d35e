//! Listing what to copy into the migration table: the store's own listing, or a key file.
//!
//! The listing runs beside the copies: each batch of keys is recorded (with the listing
//! cursor) in one transaction and the dispatcher is woken; copies start with the first batch.

use std::path::Path;
use std::sync::Arc;

use futures_util::StreamExt;
use tokio::sync::Notify;

use super::progress::Counters;
use super::state::{self, Route};
use crate::key::{Key, KeyError};
use crate::ledger::{Ledger, LedgerError};
use crate::store::{StoreError, StoreHandle};

/// Keys recorded per transaction.
const BATCH: usize = 500;

/// Why the listing stopped early.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The store's listing failed.
    #[error("listing failed: {0}")]
    Store(#[from] StoreError),
    /// The key file could not be read.
    #[error("cannot read key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The ledger could not record the keys.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// Where the listing records its keys and whom it wakes.
#[derive(Clone)]
pub struct Sink {
    /// The ledger holding the migration table.
    pub ledger: Ledger,
    /// The migration the keys belong to.
    pub route: Route,
    /// Woken after each recorded batch and at the end.
    pub notify: Arc<Notify>,
    /// Totals shown by the progress display.
    pub counters: Arc<Counters>,
}

impl Sink {
    async fn record(
        &self,
        batch: Vec<(String, Option<u64>, Option<String>)>,
        cursor: Option<String>,
    ) -> Result<(), PlanError> {
        let route = self.route.clone();
        let (added, bytes) = self
            .ledger
            .run(move |c| state::add_listed(c, &route, &batch, cursor.as_deref()))
            .await?;
        self.counters.add_listed(added, bytes);
        self.notify.notify_one();
        Ok(())
    }
}

/// Lists `store` (after `start_after`) into the migration table.
pub async fn list_store(
    store: &StoreHandle,
    start_after: Option<Key>,
    sink: &Sink,
) -> Result<(), PlanError> {
    let mut stream = store.list(start_after.as_ref())?.ready_chunks(BATCH);
    while let Some(items) = stream.next().await {
        let mut batch = Vec::with_capacity(items.len());
        let mut failure = None;
        for item in items {
            match item {
                Ok(listed) => batch.push((
                    listed.key.as_str().to_owned(),
                    Some(listed.size),
                    listed.md5.map(hex::encode),
                )),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let cursor = batch.last().map(|(k, _, _)| k.clone());
        if !batch.is_empty() {
            sink.record(batch, cursor).await?;
        }
        if let Some(e) = failure {
            return Err(e.into());
        }
    }
    Ok(())
}

/// Reads a key file into the migration table; returns how many lines were refused (each is
/// logged with its line number).
pub async fn list_file(path: &Path, sink: &Sink) -> Result<u64, PlanError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|source| PlanError::KeyFile {
            path: path.display().to_string(),
            source,
        })?;
    let mut bad = 0u64;
    let mut batch = Vec::with_capacity(BATCH);
    for (n, line) in text.lines().enumerate() {
        match parse_key_line(line) {
            None => {}
            Some(Ok(key)) => batch.push((key.as_str().to_owned(), None, None)),
            Some(Err(e)) => {
                bad += 1;
                tracing::warn!(file = %path.display(), line = n + 1, text = line, error = %e, "key refused");
            }
        }
        if batch.len() == BATCH {
            sink.record(std::mem::take(&mut batch), None).await?;
        }
    }
    if !batch.is_empty() {
        sink.record(batch, None).await?;
    }
    Ok(bad)
}

/// One line of a key file: `None` for blank lines and `#` comments, else the key with any
/// leading `./`, `/` or path up to and including `public/system/` removed (so the output of
/// `find public/system -type f` on the old host can be given as it is).
pub fn parse_key_line(line: &str) -> Option<Result<Key, KeyError>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let mut key = match line.find("public/system/") {
        Some(at) => &line[at + "public/system/".len()..],
        None => line,
    };
    loop {
        if let Some(rest) = key.strip_prefix("./") {
            key = rest;
        } else if let Some(rest) = key.strip_prefix('/') {
            key = rest;
        } else {
            break;
        }
    }
    Some(Key::parse(key))
}

#[cfg(test)]
mod tests {
    use super::parse_key_line;

    #[test]
    fn key_lines() {
        let k = |l: &str| parse_key_line(l).map(|r| r.map(|k| k.as_str().to_owned()));
        let want = "media_attachments/files/000/000/001/original/a.png";
        for line in [
            "media_attachments/files/000/000/001/original/a.png",
            "./media_attachments/files/000/000/001/original/a.png",
            "/media_attachments/files/000/000/001/original/a.png",
            "public/system/media_attachments/files/000/000/001/original/a.png",
            "./public/system/media_attachments/files/000/000/001/original/a.png",
            "/home/mastodon/live/public/system/media_attachments/files/000/000/001/original/a.png",
            "  media_attachments/files/000/000/001/original/a.png  ",
        ] {
            assert_eq!(k(line), Some(Ok(want.to_owned())), "{line}");
        }
        assert_eq!(k(""), None);
        assert_eq!(k("   "), None);
        assert_eq!(k("# a comment"), None);
        assert!(matches!(k("a/../b"), Some(Err(_))));
        assert!(matches!(k("a//b"), Some(Err(_))));
    }
}
