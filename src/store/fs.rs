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
    /// Opens the store at `root`. With `create`, a missing directory is created (the
    /// primary); without, it is refused: a fallback whose root is missing is most often an
    /// NFS mount that is not there, and serving 404s from an empty local directory instead is
    /// exactly the silent failure this project exists to prevent.
    pub fn new(name: &str, root: &Path, create: bool) -> Result<Self, StoreError> {
        if create {
            std::fs::create_dir_all(root).map_err(|e| {
                StoreError::backend(name, format!("cannot create {}: {e}", root.display()))
            })?;
        }
        let root = root.canonicalize().map_err(|e| {
            StoreError::backend(
                name,
                format!("cannot open {} (is it mounted?): {e}", root.display()),
            )
        })?;
        if !root.is_dir() {
            return Err(StoreError::backend(
                name,
                format!("{} is not a directory", root.display()),
            ));
        }
        Ok(FsStore {
            name: name.to_owned(),
            root,
        })
    }

    /// Runs blocking filesystem work off the async threads: a hung NFS mount must stall
    /// only the requests that touch it, and the caller's timeout must be able to give up.
    async fn blocking<T: Send + 'static>(
        &self,
        key: &Key,
        f: impl FnOnce(&Path, &Key) -> io::Result<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let root = self.root.clone();
        let k = key.clone();
        tokio::task::spawn_blocking(move || f(&root, &k))
            .await
            .map_err(|e| StoreError::backend(&self.name, e))?
            .map_err(|e| StoreError::backend(&self.name, format!("{key}: {e}")))
    }
}

/// The canonical path of `key`, if it exists and resolves inside `root` (symlinks included).
fn resolve(root: &Path, key: &Key) -> io::Result<Option<PathBuf>> {
    if key.as_str().split('/').next() == Some(TMP_DIR) {
        return Ok(None); // Our own temp files are not objects.
    }
    match root.join(key.as_str()).canonicalize() {
        Ok(real) if real.starts_with(root) => Ok(Some(real)),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "resolves outside the store root; refused",
        )),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens `key` as a regular file, with its metadata.
fn open_blocking(root: &Path, key: &Key) -> io::Result<Option<(std::fs::File, std::fs::Metadata)>> {
    let Some(path) = resolve(root, key)? else {
        return Ok(None);
    };
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if is_not_found(&e) => return Ok(None),
        Err(e) => return Err(e),
    };
    let m = file.metadata()?;
    Ok(m.is_file().then_some((file, m)))
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
        let Some((file, m)) = self.blocking(key, open_blocking).await? else {
            return Ok(None);
        };
        let name = self.name.clone();
        let body = ReaderStream::with_capacity(tokio::fs::File::from_std(file), 64 * 1024)
            .map(move |r| r.map_err(|e| StoreError::backend(&name, e)));
        Ok(Some(Object {
            meta: meta_of(&m),
            body: Box::pin(body),
        }))
    }

    async fn head(&self, key: &Key) -> Result<Option<ObjectMeta>, StoreError> {
        self.blocking(key, |root, key| {
            Ok(open_blocking(root, key)?.map(|(_, m)| meta_of(&m)))
        })
        .await
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
        self.blocking(key, |root, key| {
            let Some(path) = resolve(root, key)? else {
                return Ok(());
            };
            match std::fs::remove_file(path) {
                Err(e) if !is_not_found(&e) => Err(e),
                _ => Ok(()),
            }
        })
        .await
    }

    async fn open_file(
        &self,
        key: &Key,
    ) -> Result<Option<(std::fs::File, ObjectMeta)>, StoreError> {
        let opened = self.blocking(key, open_blocking).await?;
        Ok(opened.map(|(file, m)| (file, meta_of(&m))))
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
                        Ok(Listed {
                            key,
                            size,
                            md5: None,
                        })
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
    /// Writes a body with `fill` into a temp file inside the root, fsyncs it, renames it
    /// to `key`'s path and fsyncs the directories, so the object is durable when this returns.
    async fn install(
        &self,
        key: &Key,
        fill: impl FnOnce(&mut std::fs::File) -> io::Result<()> + Send + 'static,
    ) -> Result<(), StoreError> {
        self.blocking(key, move |root, key| install_blocking(root, key, fill))
            .await
    }
}

fn install_blocking(
    root: &Path,
    key: &Key,
    fill: impl FnOnce(&mut std::fs::File) -> io::Result<()>,
) -> io::Result<()> {
    let refused =
        |what: &str| io::Error::new(io::ErrorKind::PermissionDenied, format!("{what}; refused"));
    let mut segments: Vec<&str> = key.as_str().split('/').collect();
    let file_name = segments.pop().expect("a key has at least one segment");
    if segments.first().copied().unwrap_or(file_name) == TMP_DIR {
        return Err(refused("the store's temp directory is not a key"));
    }
    // Create the parent one directory at a time, checking each resolves inside the root, so
    // that a symlinked directory cannot make us create anything outside it.
    let mut parent = root.to_path_buf();
    // Directories in which this put created a directory: their entries must be synced too.
    let mut grown = Vec::new();
    for segment in segments {
        let next = parent.join(segment);
        match std::fs::create_dir(&next) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            Err(_) => {}
            Ok(()) => grown.push(parent.clone()),
        }
        let real = next.canonicalize()?;
        if !real.starts_with(root) {
            return Err(refused("a parent resolves outside the store root"));
        }
        parent = real;
    }
    let tmp_dir = root.join(TMP_DIR);
    std::fs::create_dir_all(&tmp_dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(&tmp_dir)?;
    fill(tmp.as_file_mut())?;
    tmp.as_file().sync_data()?;
    tmp.persist(parent.join(file_name)).map_err(|e| e.error)?;
    // The rename is durable only once the directories holding the old and the new name are:
    // without this, a power loss after the ledger records the copy (and the staged body is
    // removed) could leave no object behind.
    for dir in grown.iter().chain([&parent, &tmp_dir]) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
