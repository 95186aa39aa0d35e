//! One interface over every place media can live: a directory (also an NFS mount), an S3
//! bucket, an old HTTP origin (read-only).
//!
//! `serve` (read path, write-backs), `migrate` and `doctor --probe` all use [`Store`] through a
//! [`StoreHandle`], which adds what every store needs and no backend should write twice: the
//! concurrency limit, the connect/first-byte/stall timeouts and the per-store metrics.

mod fs;
mod http;
mod s3;

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{StoreConfig, StoreKind, StoreType};
use crate::key::Key;
use crate::metrics::Metrics;

pub use fs::FsStore;
pub use http::HttpStore;
pub use s3::S3Store;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer within the configured time.
    #[error("{store}: timed out after {after:?} ({what})")]
    Timeout {
        /// Store name.
        store: String,
        /// Which wait ran out.
        what: &'static str,
        /// How long we waited.
        after: Duration,
    },
    /// The body ended before the announced length, or the checksum did not match.
    #[error("{store}: {key}: incomplete or damaged body: {detail}")]
    Integrity {
        /// Store name.
        store: String,
        /// The key.
        key: String,
        /// What did not match.
        detail: String,
    },
    /// The store cannot take writes (an HTTP origin).
    #[error("{store}: read-only store")]
    ReadOnly {
        /// Store name.
        store: String,
    },
    /// Listing is not possible on this store (an HTTP origin): use a key file.
    #[error("{store}: this store cannot be listed; give the keys with --keys FILE")]
    NotListable {
        /// Store name.
        store: String,
    },
    /// Any other failure talking to the store (network, permissions, server errors).
    #[error("{store}: {detail}")]
    Backend {
        /// Store name.
        store: String,
        /// The underlying error, already formatted without secrets.
        detail: String,
    },
    /// The edge's own disk failed (a full, read-only or failing cache or `data_dir`), not a
    /// store.
    #[error("local disk ({dir}): {source}")]
    LocalIo {
        /// Which local directory: `cache` or `data_dir`.
        dir: &'static str,
        /// The error from the filesystem.
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// Builds a [`StoreError::Backend`].
    pub fn backend(store: &str, detail: impl std::fmt::Display) -> Self {
        StoreError::Backend {
            store: store.to_owned(),
            detail: detail.to_string(),
        }
    }

    /// Builds a [`StoreError::LocalIo`] for the local directory `dir`.
    pub fn local(dir: &'static str, source: std::io::Error) -> Self {
        StoreError::LocalIo { dir, source }
    }

    /// True if this was a timeout (maps to 504 rather than 502).
    pub fn is_timeout(&self) -> bool {
        matches!(self, StoreError::Timeout { .. })
    }

    /// True if the same operation may succeed when tried again later: a timeout, a damaged
    /// or cut body, a backend failure, a full local disk. False for what only a change of
    /// config or hardware can mend (a read-only store, an unlistable one, a read-only or
    /// failing local disk).
    pub fn retryable(&self) -> bool {
        match self {
            StoreError::Timeout { .. } | StoreError::Integrity { .. } => true,
            StoreError::Backend { .. } => true,
            StoreError::ReadOnly { .. } | StoreError::NotListable { .. } => false,
            StoreError::LocalIo { source, .. } => {
                matches!(DiskState::of(source), DiskState::Full)
            }
        }
    }
}

/// The health of a local directory the edge writes to (the cache, `data_dir`), as its last
/// write showed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskState {
    /// Writes succeed.
    Ok,
    /// No space (ENOSPC) or quota (EDQUOT) left: may mend itself when space is freed.
    Full,
    /// The filesystem is mounted read-only (EROFS).
    ReadOnly,
    /// Any other I/O error (EIO, permissions, a missing directory).
    Failing,
}

impl DiskState {
    /// Classifies a failed local write.
    pub fn of(e: &std::io::Error) -> DiskState {
        match e.kind() {
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => DiskState::Full,
            std::io::ErrorKind::ReadOnlyFilesystem => DiskState::ReadOnly,
            _ => DiskState::Failing,
        }
    }

    /// The state's name in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskState::Ok => "ok",
            DiskState::Full => "full",
            DiskState::ReadOnly => "read-only",
            DiskState::Failing => "failing",
        }
    }

    /// The value of the `fediedge_disk_state` gauge: 0 ok, 1 full, 2 read-only, 3 failing.
    pub fn code(self) -> i64 {
        match self {
            DiskState::Ok => 0,
            DiskState::Full => 1,
            DiskState::ReadOnly => 2,
            DiskState::Failing => 3,
        }
    }
}

/// Why a body does not match what its store announced.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// More bytes came than the announced length.
    #[error("more than the announced {size} bytes")]
    TooLong {
        /// The announced length.
        size: u64,
    },
    /// The body ended early.
    #[error("body ended after {seen} of {size} bytes")]
    Short {
        /// Bytes received.
        seen: u64,
        /// The announced length.
        size: u64,
    },
    /// The whole body came, but its MD5 is not the one the store vouched for.
    #[error("MD5 {got} does not match the source's {want}")]
    Md5 {
        /// MD5 of the received body, hex.
        got: String,
        /// MD5 the store announced, hex.
        want: String,
    },
}

/// What a store knows about one object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ObjectMeta {
    /// Length in bytes. Every store must know it before the body starts: it is what a
    /// truncated body is detected by.
    pub size: u64,
    /// Content-Type as the store gives it.
    pub content_type: Option<String>,
    /// Entity tag as the store gives it (quoted).
    pub etag: Option<String>,
    /// Last modification time.
    pub last_modified: Option<SystemTime>,
    /// MD5 of the body when the store vouches for it (S3 single-part ETag, `Content-MD5`).
    pub md5: Option<[u8; 16]>,
}

/// A body as a stream of chunks.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, StoreError>> + Send>>;

/// An object being read: its metadata and its body.
pub struct Object {
    /// Metadata, known before the first body byte.
    pub meta: ObjectMeta,
    /// The body. The stream does not check the length: [`crate::flight`] does.
    pub body: ByteStream,
}

/// One listed object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The key.
    pub key: Key,
    /// Size in bytes.
    pub size: u64,
    /// MD5 when the listing vouches for it (an S3 single-part ETag).
    pub md5: Option<[u8; 16]>,
}

/// One store backend. Keys are validated before they get here ([`Key`]).
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Opens `key` for reading; `Ok(None)` when the store does not have it.
    async fn get(&self, key: &Key) -> Result<Option<Object>, StoreError>;
    /// Metadata of `key`; `Ok(None)` when the store does not have it.
    async fn head(&self, key: &Key) -> Result<Option<ObjectMeta>, StoreError>;
    /// Stores the complete, already verified file `src` under `key`, atomically: readers see
    /// the old object or the new one, never a part.
    async fn put(&self, key: &Key, src: &Path, meta: &ObjectMeta) -> Result<(), StoreError>;
    /// Stores the complete, already verified `body` under `key`, atomically (as
    /// [`Store::put`], for bodies small enough to be held in memory: no temp file).
    async fn put_bytes(&self, key: &Key, body: Bytes, meta: &ObjectMeta) -> Result<(), StoreError>;
    /// Deletes `key` (no error if absent).
    async fn delete(&self, key: &Key) -> Result<(), StoreError>;
    /// Opens `key` as a local file, for stores that are local directories (served without a
    /// copy). Other stores answer `Ok(None)`.
    async fn open_file(
        &self,
        _key: &Key,
    ) -> Result<Option<(std::fs::File, ObjectMeta)>, StoreError> {
        Ok(None)
    }
    /// Lists every object, in the store's order, starting after `start_after` if given.
    fn list(&self, start_after: Option<&Key>) -> Result<ListStream, StoreError>;
}

/// A listing in progress.
pub type ListStream = Pin<Box<dyn Stream<Item = Result<Listed, StoreError>> + Send>>;

/// A store with its name, kind, limits, timeouts and metrics: what the rest of the program uses.
#[derive(Clone)]
pub struct StoreHandle {
    inner: Arc<dyn Store>,
    name: Arc<str>,
    kind: StoreType,
    limit: Arc<Semaphore>,
    first_byte_timeout: Duration,
    metrics: Metrics,
}

impl std::fmt::Debug for StoreHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}({})", self.kind, self.name)
    }
}

/// Builds the backend for a validated store config.
pub fn open(config: &StoreConfig, metrics: Metrics) -> Result<StoreHandle, StoreError> {
    let inner: Arc<dyn Store> = match &config.kind {
        StoreKind::Fs { root } => Arc::new(FsStore::new(&config.name, root, config.is_primary)?),
        StoreKind::S3(s3) => Arc::new(S3Store::new(&config.name, s3, config)?),
        StoreKind::Http { url } => Arc::new(HttpStore::new(&config.name, url, config)?),
    };
    Ok(StoreHandle {
        inner,
        name: config.name.as_str().into(),
        kind: config.kind.store_type(),
        limit: Arc::new(Semaphore::new(config.max_concurrency)),
        first_byte_timeout: config.first_byte_timeout,
        metrics,
    })
}

impl StoreHandle {
    /// The store's name from the config.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `fs`, `s3` or `http`.
    pub fn kind(&self) -> StoreType {
        self.kind
    }

    async fn permit(&self) -> OwnedSemaphorePermit {
        self.limit
            .clone()
            .acquire_owned()
            .await
            .expect("store semaphores are never closed")
    }

    /// Opens `key`; the concurrency permit is held until the body is dropped, the wait for a
    /// permit counts against the first-byte timeout, and each chunk must arrive within it (a
    /// stalled source is an error, not a hang).
    pub async fn get(&self, key: &Key) -> Result<Option<Object>, StoreError> {
        let started = Instant::now();
        let wait = self.first_byte_timeout;
        let opened = async {
            let permit = self.permit().await;
            Ok::<_, StoreError>(self.inner.get(key).await?.map(|o| (o, permit)))
        };
        let result = match tokio::time::timeout(wait, opened).await {
            Ok(r) => r,
            Err(_) => Err(self.timeout("first byte", wait)),
        };
        let outcome = match &result {
            Ok(Some(_)) => "hit",
            Ok(None) => "miss",
            Err(_) => "error",
        };
        self.metrics
            .store_fetch(&self.name, outcome, started.elapsed());
        let Some((object, permit)) = result? else {
            return Ok(None);
        };
        let body = stall_guard(object.body, wait, self.name.clone(), permit);
        Ok(Some(Object {
            meta: object.meta,
            body,
        }))
    }

    /// Metadata of `key`, under the same limit and timeout as [`StoreHandle::get`].
    pub async fn head(&self, key: &Key) -> Result<Option<ObjectMeta>, StoreError> {
        self.limited("head", self.first_byte_timeout, self.inner.head(key))
            .await
    }

    /// Runs `op` holding a concurrency permit, the wait for the permit included in `wait`.
    async fn limited<T>(
        &self,
        what: &'static str,
        wait: Duration,
        op: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let run = async {
            let _permit = self.permit().await;
            op.await
        };
        tokio::time::timeout(wait, run)
            .await
            .unwrap_or_else(|_| Err(self.timeout(what, wait)))
    }

    /// Time allowed for writing `size` bytes: the first-byte timeout plus the body at
    /// 256 KiB/s, a floor no working store falls under. A put has no chunks to guard, so this
    /// is what stops a hung primary from holding a write-back worker forever.
    fn write_timeout(&self, size: u64) -> Duration {
        self.first_byte_timeout + Duration::from_secs(size / (256 * 1024))
    }

    /// Stores a verified local file under `key`.
    pub async fn put(&self, key: &Key, src: &Path, meta: &ObjectMeta) -> Result<(), StoreError> {
        let wait = self.write_timeout(meta.size);
        self.limited("put", wait, self.inner.put(key, src, meta))
            .await
    }

    /// Stores a verified body held in memory under `key`.
    pub async fn put_bytes(
        &self,
        key: &Key,
        body: Bytes,
        meta: &ObjectMeta,
    ) -> Result<(), StoreError> {
        let wait = self.write_timeout(meta.size);
        self.limited("put", wait, self.inner.put_bytes(key, body, meta))
            .await
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &Key) -> Result<(), StoreError> {
        self.limited("delete", self.first_byte_timeout, self.inner.delete(key))
            .await
    }

    /// Opens `key` as a local file if the store is a local directory, within the first-byte
    /// timeout.
    pub async fn open_file(
        &self,
        key: &Key,
    ) -> Result<Option<(std::fs::File, ObjectMeta)>, StoreError> {
        let wait = self.first_byte_timeout;
        tokio::time::timeout(wait, self.inner.open_file(key))
            .await
            .unwrap_or_else(|_| Err(self.timeout("open", wait)))
    }

    /// Lists every object after `start_after`.
    pub fn list(&self, start_after: Option<&Key>) -> Result<ListStream, StoreError> {
        self.inner.list(start_after)
    }

    fn timeout(&self, what: &'static str, after: Duration) -> StoreError {
        StoreError::Timeout {
            store: self.name.to_string(),
            what,
            after,
        }
    }
}

/// Wraps a body so that a silence longer than `wait` ends it with a timeout error, and so that
/// the store's concurrency permit lives exactly as long as the body.
fn stall_guard(
    body: ByteStream,
    wait: Duration,
    store: Arc<str>,
    permit: OwnedSemaphorePermit,
) -> ByteStream {
    let state = (body, permit, false);
    Box::pin(futures_util::stream::unfold(
        state,
        move |(mut body, permit, done)| {
            let store = store.clone();
            async move {
                if done {
                    return None;
                }
                match tokio::time::timeout(wait, body.next()).await {
                    Ok(Some(item)) => Some((item, (body, permit, false))),
                    Ok(None) => None,
                    Err(_) => Some((
                        Err(StoreError::Timeout {
                            store: store.to_string(),
                            what: "body stalled",
                            after: wait,
                        }),
                        (body, permit, true),
                    )),
                }
            }
        },
    ))
}

/// Checks a body against what its store announced, as it is read: never more than the
/// announced length, then at the end exactly that length and, where the store vouched for
/// one, the same MD5. The one place this check is written; flights, `migrate` and its
/// `--verify` all use it.
pub struct BodyCheck {
    hasher: md5::Md5,
    seen: u64,
    size: u64,
    want: Option<[u8; 16]>,
}

impl BodyCheck {
    /// Starts checking a body described by `meta`.
    pub fn new(meta: &ObjectMeta) -> Self {
        BodyCheck {
            hasher: <md5::Md5 as md5::Digest>::new(),
            seen: 0,
            size: meta.size,
            want: meta.md5,
        }
    }

    /// Takes the next chunk; fails if the body grows past its announced length.
    pub fn update(&mut self, chunk: &[u8]) -> Result<(), BodyError> {
        self.seen += chunk.len() as u64;
        if self.seen > self.size {
            return Err(BodyError::TooLong { size: self.size });
        }
        md5::Digest::update(&mut self.hasher, chunk);
        Ok(())
    }

    /// Bytes taken so far.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Ends the check: the body's MD5 if it was whole and matched.
    pub fn finish(self) -> Result<[u8; 16], BodyError> {
        if self.seen != self.size {
            return Err(BodyError::Short {
                seen: self.seen,
                size: self.size,
            });
        }
        let md5: [u8; 16] = md5::Digest::finalize(self.hasher).into();
        match self.want {
            Some(want) if want != md5 => Err(BodyError::Md5 {
                got: hex::encode(md5),
                want: hex::encode(want),
            }),
            _ => Ok(md5),
        }
    }
}

/// Parses an S3-style ETag into an MD5 when it is one (32 hex digits, no multipart `-n`).
pub fn md5_from_etag(etag: &str) -> Option<[u8; 16]> {
    if etag.starts_with("W/") {
        return None; // A weak tag makes no promise about the bytes.
    }
    let t = etag.trim_matches('"');
    if t.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    hex::decode_to_slice(t, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_md5() {
        assert_eq!(
            md5_from_etag("\"d41d8cd98f00b204e9800998ecf8427e\"").map(hex::encode),
            Some("d41d8cd98f00b204e9800998ecf8427e".into())
        );
        assert_eq!(
            md5_from_etag("\"d41d8cd98f00b204e9800998ecf8427e-2\""),
            None
        );
        assert_eq!(md5_from_etag("\"5f1a-3e8\""), None);
    }

    #[test]
    fn disk_states_and_what_a_retry_can_mend() {
        let os = |n| std::io::Error::from_raw_os_error(n);
        assert_eq!(DiskState::of(&os(libc::ENOSPC)), DiskState::Full);
        assert_eq!(DiskState::of(&os(libc::EDQUOT)), DiskState::Full);
        assert_eq!(DiskState::of(&os(libc::EROFS)), DiskState::ReadOnly);
        assert_eq!(DiskState::of(&os(libc::EIO)), DiskState::Failing);
        assert!(StoreError::local("cache", os(libc::ENOSPC)).retryable());
        assert!(!StoreError::local("cache", os(libc::EROFS)).retryable());
        assert!(!StoreError::local("cache", os(libc::EIO)).retryable());
        assert!(StoreError::backend("s", "x").retryable());
        assert!(!StoreError::ReadOnly { store: "h".into() }.retryable());
        let e = StoreError::local("data_dir", os(libc::ENOSPC));
        assert!(e.to_string().starts_with("local disk (data_dir): "), "{e}");
    }

    #[test]
    fn body_errors_are_typed() {
        let meta = ObjectMeta {
            size: 3,
            md5: Some([0u8; 16]),
            ..ObjectMeta::default()
        };
        let mut c = BodyCheck::new(&meta);
        assert_eq!(c.update(b"abcd"), Err(BodyError::TooLong { size: 3 }));
        let mut c = BodyCheck::new(&meta);
        c.update(b"ab").unwrap();
        assert_eq!(c.finish(), Err(BodyError::Short { seen: 2, size: 3 }));
        let mut c = BodyCheck::new(&meta);
        c.update(b"abc").unwrap();
        assert!(matches!(c.finish(), Err(BodyError::Md5 { .. })));
    }
}
