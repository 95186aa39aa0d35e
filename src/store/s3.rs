//! An S3-compatible bucket (Garage is the reference; any S3 works), through Apache OpenDAL.
//!
//! Objects are written with Mastodon's own headers (`Cache-Control: public,
//! max-age=315576000, immutable` and the source's Content-Type), and a single-part write is
//! verified by comparing the MD5 we computed with the ETag the bucket returns.

use std::path::Path;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::TryStreamExt;
use opendal::{ErrorKind, Operator};
use tokio::io::AsyncReadExt;

use super::{md5_from_etag, ListStream, Listed, Object, ObjectMeta, Store, StoreError};
use crate::config::{S3Config, StoreConfig};
use crate::key::Key;

/// Objects up to this size are written in one PUT (and so get an MD5 ETag to verify against);
/// larger ones go up in parts of this size.
const PART_SIZE: usize = 16 * 1024 * 1024;

/// Mastodon writes media with this header; copies keep it.
const MEDIA_CACHE_CONTROL: &str = "public, max-age=315576000, immutable";

/// An S3 bucket.
pub struct S3Store {
    name: String,
    op: Operator,
}

fn content_type(key: &Key, meta: &ObjectMeta) -> String {
    meta.content_type
        .clone()
        .unwrap_or_else(|| key.guess_content_type().to_owned())
}

impl S3Store {
    /// Builds the OpenDAL operator. Nothing is sent until the first request.
    pub fn new(name: &str, s3: &S3Config, config: &StoreConfig) -> Result<Self, StoreError> {
        opendal::install_default();
        let mut builder = opendal::services::S3::default()
            .bucket(&s3.bucket)
            .endpoint(&s3.endpoint)
            .region(&s3.region)
            .access_key_id(&s3.access_key_id)
            .secret_access_key(&s3.secret_access_key)
            .root(&format!("/{}", s3.prefix))
            // Credentials come from our config only: never from ~/.aws or the EC2 metadata.
            .disable_config_load()
            .disable_ec2_metadata();
        if s3.virtual_host_style {
            builder = builder.enable_virtual_host_style();
        }
        let op = Operator::new(builder).map_err(|e| StoreError::backend(name, e))?;
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .pool_max_idle_per_host(config.max_concurrency)
            .build()
            .map_err(|e| StoreError::backend(name, e))?;
        let transport = opendal::HttpTransporter::new(
            opendal_http_transport_reqwest::ReqwestTransport::new(client),
        );
        let ctx = op.context().with_http_transport(transport);
        Ok(S3Store {
            name: name.to_owned(),
            op: op.with_context(ctx),
        })
    }

    /// Checks what the bucket says it stored against what we sent: the ETag of a single-part
    /// PUT is the MD5 of the body; otherwise (multipart, or no MD5 known) the stored length.
    async fn check_stored(
        &self,
        key: &Key,
        written: &opendal::Metadata,
        meta: &ObjectMeta,
    ) -> Result<(), StoreError> {
        let ok = match (meta.md5, written.etag().and_then(md5_from_etag)) {
            (Some(want), Some(got)) => want == got,
            _ => {
                let stored = self.head(key).await?.ok_or_else(|| {
                    StoreError::backend(&self.name, format!("{key}: vanished after put"))
                })?;
                stored.size == meta.size
                    && match (meta.md5, stored.md5) {
                        (Some(want), Some(got)) => want == got,
                        _ => true,
                    }
            }
        };
        if ok {
            Ok(())
        } else {
            Err(StoreError::Integrity {
                store: self.name.clone(),
                key: key.to_string(),
                detail: format!(
                    "the bucket did not store the {} bytes sent (etag {:?})",
                    meta.size,
                    written.etag()
                ),
            })
        }
    }

    fn error(&self, key: &Key, e: opendal::Error) -> StoreError {
        // OpenDAL's Display carries the operation, path and service context; it never includes
        // the credentials, which live in the signer.
        StoreError::backend(&self.name, format!("{key}: {e}"))
    }
}

fn meta_of(m: &opendal::Metadata) -> ObjectMeta {
    let etag = m.etag().map(str::to_owned);
    ObjectMeta {
        size: m.content_length(),
        content_type: m.content_type().map(str::to_owned),
        md5: etag.as_deref().and_then(md5_from_etag),
        etag,
        last_modified: m.last_modified().map(Into::into),
    }
}

#[async_trait]
impl Store for S3Store {
    async fn get(&self, key: &Key) -> Result<Option<Object>, StoreError> {
        let meta = match self.op.stat(key.as_str()).await {
            Ok(m) => m,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.error(key, e)),
        };
        let meta = meta_of(&meta);
        // Pin the read to the version we just looked at, so that a concurrent overwrite
        // cannot splice two objects into one body.
        // No `.chunk()`: one streamed GET, so bytes flow as they arrive and the stall timeout
        // measures silence, not the time to fetch a whole chunk.
        let mut reader = self.op.reader_with(key.as_str());
        if let Some(etag) = &meta.etag {
            reader = reader.if_match(etag);
        }
        let reader = reader.await.map_err(|e| self.error(key, e))?;
        let stream = reader
            .into_bytes_stream(0..meta.size)
            .await
            .map_err(|e| self.error(key, e))?;
        let name = self.name.clone();
        let body = stream.map_err(move |e| StoreError::backend(&name, e));
        Ok(Some(Object {
            meta,
            body: Box::pin(body),
        }))
    }

    async fn head(&self, key: &Key) -> Result<Option<ObjectMeta>, StoreError> {
        match self.op.stat(key.as_str()).await {
            Ok(m) => Ok(Some(meta_of(&m))),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.error(key, e)),
        }
    }

    async fn put(&self, key: &Key, src: &Path, meta: &ObjectMeta) -> Result<(), StoreError> {
        let read_error =
            |e: std::io::Error| StoreError::backend(&self.name, format!("{}: {e}", src.display()));
        if meta.size as usize <= PART_SIZE {
            let body = tokio::fs::read(src).await.map_err(read_error)?;
            return self.put_bytes(key, body.into(), meta).await;
        }
        let mut file = tokio::fs::File::open(src).await.map_err(read_error)?;
        let mut writer = self
            .op
            .writer_with(key.as_str())
            .content_type(&content_type(key, meta))
            .cache_control(MEDIA_CACHE_CONTROL)
            .chunk(PART_SIZE)
            .await
            .map_err(|e| self.error(key, e))?;
        let mut buf = vec![0u8; 1024 * 1024];
        loop {
            let n = file.read(&mut buf).await.map_err(read_error)?;
            if n == 0 {
                break;
            }
            if let Err(e) = writer.write(buf[..n].to_vec()).await {
                let _ = writer.abort().await;
                return Err(self.error(key, e));
            }
        }
        let written = writer.close().await.map_err(|e| self.error(key, e))?;
        self.check_stored(key, &written, meta).await
    }

    async fn put_bytes(&self, key: &Key, body: Bytes, meta: &ObjectMeta) -> Result<(), StoreError> {
        if body.len() as u64 != meta.size {
            return Err(StoreError::Integrity {
                store: self.name.clone(),
                key: key.to_string(),
                detail: format!("{} bytes given, {} announced", body.len(), meta.size),
            });
        }
        let written = self
            .op
            .write_with(key.as_str(), body)
            .content_type(&content_type(key, meta))
            .cache_control(MEDIA_CACHE_CONTROL)
            .await
            .map_err(|e| self.error(key, e))?;
        self.check_stored(key, &written, meta).await
    }

    async fn delete(&self, key: &Key) -> Result<(), StoreError> {
        self.op
            .delete(key.as_str())
            .await
            .map_err(|e| self.error(key, e))
    }

    fn list(&self, start_after: Option<&Key>) -> Result<ListStream, StoreError> {
        let op = self.op.clone();
        let name = self.name.clone();
        let start_after = start_after.map(|k| k.as_str().to_owned());
        let stream = futures_util::stream::once(async move {
            let mut lister = op.lister_with("").recursive(true);
            if let Some(s) = &start_after {
                lister = lister.start_after(s);
            }
            lister.await
        })
        .map_err({
            let name = name.clone();
            move |e| StoreError::backend(&name, e)
        })
        .map_ok({
            let name = name.clone();
            move |lister| {
                let name = name.clone();
                lister.map_err(move |e| StoreError::backend(&name, e))
            }
        })
        .try_flatten()
        .try_filter_map(|entry| async move {
            let (path, meta) = entry.into_parts();
            if !meta.is_file() {
                return Ok(None);
            }
            Ok(Key::parse(&path).ok().map(|key| Listed {
                key,
                size: meta.content_length(),
                md5: meta.etag().and_then(md5_from_etag),
            }))
        });
        Ok(Box::pin(stream))
    }
}
