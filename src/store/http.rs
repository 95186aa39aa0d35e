//! A read-only HTTP origin: the old nginx (or any web server) that still serves the media.
//!
//! reqwest directly rather than OpenDAL's http service: we need the response headers as they
//! are (Content-Type, Content-MD5, Last-Modified) and a refusal of bodies whose length is not
//! announced, since a length is what a truncated body is detected by.

use std::path::Path;

use async_trait::async_trait;
use futures_util::StreamExt;
use reqwest::header::{HeaderMap, CONTENT_LENGTH, CONTENT_TYPE, ETAG, LAST_MODIFIED};
use reqwest::StatusCode;

use super::{ListStream, Object, ObjectMeta, Store, StoreError};
use crate::config::StoreConfig;
use crate::key::Key;

/// An HTTP origin.
pub struct HttpStore {
    name: String,
    base: String,
    client: reqwest::Client,
}

impl HttpStore {
    /// Builds the client for the origin at `base` (ending in `/`).
    pub fn new(name: &str, base: &str, config: &StoreConfig) -> Result<Self, StoreError> {
        let client = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            // Origins may be tiny: keep connections for reuse but let them go when idle.
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .user_agent(concat!("fediedge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| StoreError::backend(name, e))?;
        Ok(HttpStore {
            name: name.to_owned(),
            base: base.to_owned(),
            client,
        })
    }

    fn url(&self, key: &Key) -> String {
        format!("{}{}", self.base, key.url_encoded())
    }

    fn error(&self, e: reqwest::Error) -> StoreError {
        // Display of a reqwest error includes the URL, never credentials (origins take none).
        StoreError::backend(&self.name, e)
    }

    fn meta(&self, key: &Key, headers: &HeaderMap) -> Result<ObjectMeta, StoreError> {
        let text = |h| {
            headers
                .get(h)
                .and_then(|v: &reqwest::header::HeaderValue| v.to_str().ok())
        };
        let size = text(CONTENT_LENGTH)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| StoreError::Integrity {
                store: self.name.clone(),
                key: key.to_string(),
                detail: "origin announced no Content-Length; the body could not be verified".into(),
            })?;
        let md5 = text(reqwest::header::HeaderName::from_static("content-md5")).and_then(|v| {
            use base64_decode::decode16;
            decode16(v)
        });
        Ok(ObjectMeta {
            size,
            content_type: text(CONTENT_TYPE).map(str::to_owned),
            etag: text(ETAG).map(str::to_owned),
            last_modified: text(LAST_MODIFIED).and_then(|v| httpdate::parse_http_date(v).ok()),
            md5,
        })
    }
}

/// Content-MD5 is the base64 of the 16 digest bytes (RFC 1864).
mod base64_decode {
    /// Decodes standard base64 of exactly 16 bytes. Hand-written because it is the only base64
    /// in the program and is 15 lines; a crate would be heavier than the code.
    pub fn decode16(s: &str) -> Option<[u8; 16]> {
        const ALPHABET: &[u8; 64] =
            b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let s = s.trim().trim_end_matches('=');
        let mut bits: u32 = 0;
        let mut nbits = 0;
        let mut out = Vec::with_capacity(18);
        for c in s.bytes() {
            let v = ALPHABET.iter().position(|&a| a == c)? as u32;
            bits = (bits << 6) | v;
            nbits += 6;
            if nbits >= 8 {
                nbits -= 8;
                out.push((bits >> nbits) as u8);
                bits &= (1 << nbits) - 1;
            }
        }
        out.try_into().ok()
    }
}

#[async_trait]
impl Store for HttpStore {
    async fn get(&self, key: &Key) -> Result<Option<Object>, StoreError> {
        let resp = self
            .client
            .get(self.url(key))
            .send()
            .await
            .map_err(|e| self.error(e))?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND | StatusCode::GONE | StatusCode::FORBIDDEN => return Ok(None),
            other => {
                return Err(StoreError::backend(
                    &self.name,
                    format!("{key}: origin answered {other}"),
                ))
            }
        }
        let meta = self.meta(key, resp.headers())?;
        let name = self.name.clone();
        let body = resp
            .bytes_stream()
            .map(move |r| r.map_err(|e| StoreError::backend(&name, e)));
        Ok(Some(Object {
            meta,
            body: Box::pin(body),
        }))
    }

    async fn head(&self, key: &Key) -> Result<Option<ObjectMeta>, StoreError> {
        let resp = self
            .client
            .head(self.url(key))
            .send()
            .await
            .map_err(|e| self.error(e))?;
        match resp.status() {
            StatusCode::OK => self.meta(key, resp.headers()).map(Some),
            StatusCode::NOT_FOUND | StatusCode::GONE | StatusCode::FORBIDDEN => Ok(None),
            other => Err(StoreError::backend(
                &self.name,
                format!("{key}: origin answered {other}"),
            )),
        }
    }

    async fn put(&self, _key: &Key, _src: &Path, _meta: &ObjectMeta) -> Result<(), StoreError> {
        Err(StoreError::ReadOnly {
            store: self.name.clone(),
        })
    }

    async fn put_bytes(
        &self,
        _key: &Key,
        _body: bytes::Bytes,
        _meta: &ObjectMeta,
    ) -> Result<(), StoreError> {
        Err(StoreError::ReadOnly {
            store: self.name.clone(),
        })
    }

    async fn delete(&self, _key: &Key) -> Result<(), StoreError> {
        Err(StoreError::ReadOnly {
            store: self.name.clone(),
        })
    }

    fn list(&self, _start_after: Option<&Key>) -> Result<ListStream, StoreError> {
        Err(StoreError::NotListable {
            store: self.name.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn content_md5_decodes() {
        // md5("") = d41d8cd98f00b204e9800998ecf8427e
        let d = super::base64_decode::decode16("1B2M2Y8AsgTpgAmY7PhCfg==").unwrap();
        assert_eq!(hex::encode(d), "d41d8cd98f00b204e9800998ecf8427e");
        assert!(super::base64_decode::decode16("abc").is_none());
    }
}
