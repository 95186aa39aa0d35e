//! A directory store: a local disk or an NFS mount.
//!
//! Written by hand rather than through OpenDAL's fs service because we need two guarantees it
//! does not give: a path that resolves (through symlinks) outside the root is refused, and a
//! put is a temp file + fsync + rename inside the root, so a reader never sees a part.

use std::io;
use std::path::{Path, PathBuf};

use std::io::Write;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio_util::io::ReaderStream;

use super::{ListStream, Listed, Object, ObjectMeta, Store, StoreError};
use crate::key::Key;

/// Temp files of puts live here, inside the root so that the final rename is atomic.
const TMP_DIR: &str = ".fediedge-tmp";

/// A directory store.
pub struct FsStore {
    name: String,
    root: PathBuf,
}

impl FsStore {
    /// Opens the store at `root`, creating the directory if it is missing.
    pub fn new(name: &str, root: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root).map_err(|e| {
            StoreError::backend(name, format!("cannot create {}: {e}", root.display()))
        })?;
        let root = root.canonicalize().map_err(|e| {
            StoreError::backend(name, format!("cannot open {}: {e}", root.display()))
        })?;
        Ok(FsStore {
            name: name.to_owned(),
            root,
        })
    }

    /// The canonical path of `key`, if it exists and resolves inside the root.
    fn resolve(&self, key: &Key) -> Result<Option<PathBuf>, StoreError> {
        let path = self.root.join(key.as_str());
        match path.canonicalize() {
            Ok(real) if real.starts_with(&self.root) => Ok(Some(real)),
            Ok(_) => Err(StoreError::backend(
                &self.name,
                format!("{key}: resolves outside the store root; refused"),
            )),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.io(key, e)),
        }
    }

    fn io(&self, key: &Key, e: io::Error) -> StoreError {
        StoreError::backend(&self.name, format!("{key}: {e}"))
    }
}

fn is_not_found(e: &io::Error) -> bool {
    // ENOTDIR: a path component is a file, so the key cannot exist.
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

fn meta_of(m: &std::fs::Metadata) -> ObjectMeta {
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    ObjectMeta {
        size: m.len(),
        content_type: None,
        // The same shape nginx gives a static file, so ETags survive a move from nginx.
        etag: Some(format!("\"{mtime:x}-{:x}\"", m.len())),
        last_modified: m.modified().ok(),
        md5: None,
    }
}

#[async_trait]
impl Store for FsStore {
    async fn get(&self, key: &Key) -> Result<Option<Object>, StoreError> {
        let Some(path) = self.resolve(key)? else {
            return Ok(None);
        };
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(self.io(key, e)),
        };
        let m = file.metadata().await.map_err(|e| self.io(key, e))?;
        if !m.is_file() {
            return Ok(None);
        }
        let name = self.name.clone();
        let body = ReaderStream::with_capacity(file, 64 * 1024)
            .map(move |r| r.map_err(|e| StoreError::backend(&name, e)));
        Ok(Some(Object {
            meta: meta_of(&m),
            body: Box::pin(body),
        }))
    }

    async fn head(&self, key: &Key) -> Result<Option<ObjectMeta>, StoreError> {
        let Some(path) = self.resolve(key)? else {
            return Ok(None);
        };
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Some(meta_of(&m))),
            Ok(_) => Ok(None),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(self.io(key, e)),
        }
    }

    async fn put(&self, key: &Key, src: &Path, _meta: &ObjectMeta) -> Result<(), StoreError> {
        let src = src.to_owned();
        self.install(key, move |tmp| {
            io::copy(&mut std::fs::File::open(&src)?, tmp)?;
            Ok(())
        })
        .await
    }

    async fn put_bytes(
        &self,
        key: &Key,
        body: Bytes,
        _meta: &ObjectMeta,
    ) -> Result<(), StoreError> {
        self.install(key, move |tmp| tmp.write_all(&body)).await
    }

    async fn delete(&self, key: &Key) -> Result<(), StoreError> {
        let Some(path) = self.resolve(key)? else {
            return Ok(());
        };
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(self.io(key, e)),
        }
    }

    async fn open_file(
        &self,
        key: &Key,
    ) -> Result<Option<(std::fs::File, ObjectMeta)>, StoreError> {
        let Some(path) = self.resolve(key)? else {
            return Ok(None);
        };
        let opened = tokio::task::spawn_blocking(move || -> io::Result<Option<_>> {
            let file = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if is_not_found(&e) => return Ok(None),
                Err(e) => return Err(e),
            };
            let m = file.metadata()?;
            Ok(m.is_file().then(|| (file, meta_of(&m))))
        })
        .await
        .map_err(|e| StoreError::backend(&self.name, e))?;
        opened.map_err(|e| self.io(key, e))
    }

    fn list(&self, start_after: Option<&Key>) -> Result<ListStream, StoreError> {
        let root = self.root.clone();
        let name = self.name.clone();
        let start_after = start_after.cloned();
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        // walkdir is blocking; one thread walks and feeds a bounded channel.
        tokio::task::spawn_blocking(move || {
            let walk = walkdir::WalkDir::new(&root)
                .sort_by_file_name()
                .into_iter()
                .filter_entry(|e| e.file_name() != TMP_DIR);
            for entry in walk {
                let item = match entry {
                    Ok(e) if e.file_type().is_file() => {
                        let Ok(rel) = e.path().strip_prefix(&root) else {
                            continue;
                        };
                        let Some(rel) = rel.to_str() else { continue };
                        let Ok(key) = Key::parse(rel) else { continue };
                        if start_after.as_ref().is_some_and(|s| &key <= s) {
                            continue;
                        }
                        let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                        Ok(Listed { key, size })
                    }
                    Ok(_) => continue,
                    Err(e) => Err(StoreError::backend(&name, e)),
                };
                if tx.blocking_send(item).is_err() {
                    return;
                }
            }
        });
        Ok(Box::pin(tokio_stream_from(rx)))
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

impl FsStore {
    /// Writes a body with `fill` into a temp file inside the root, fsyncs it and renames it
    /// to `key`'s path.
    async fn install(
        &self,
        key: &Key,
        fill: impl FnOnce(&mut std::fs::File) -> io::Result<()> + Send + 'static,
    ) -> Result<(), StoreError> {
        let root = self.root.clone();
        let key = key.clone();
        let name = self.name.clone();
        tokio::task::spawn_blocking(move || install_blocking(&root, &key, fill))
            .await
            .map_err(|e| StoreError::backend(&name, e))?
            .map_err(|e| StoreError::backend(&name, e))
    }
}

fn install_blocking(
    root: &Path,
    key: &Key,
    fill: impl FnOnce(&mut std::fs::File) -> io::Result<()>,
) -> io::Result<()> {
    let dest = root.join(key.as_str());
    let parent = dest
        .parent()
        .expect("a key always has a parent under the root");
    std::fs::create_dir_all(parent)?;
    let real_parent = parent.canonicalize()?;
    if !real_parent.starts_with(root) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{key}: parent resolves outside the store root; refused"),
        ));
    }
    let tmp_dir = root.join(TMP_DIR);
    std::fs::create_dir_all(&tmp_dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(&tmp_dir)?;
    fill(tmp.as_file_mut())?;
    tmp.as_file().sync_data()?;
    tmp.persist(real_parent.join(dest.file_name().expect("keys end in a file name")))
        .map_err(|e| e.error)?;
    Ok(())
}
