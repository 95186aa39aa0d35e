//! The record kept beside each cached body (`<md5(key)>.meta`, JSON).

use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use crate::key::Key;
use crate::store::ObjectMeta;

/// What the cache keeps about an object besides its body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CachedMeta {
    /// The key (checked on load, so two keys can never share a file).
    pub key: String,
    /// Body length.
    pub size: u64,
    /// MD5 of the body, hex.
    pub md5: String,
    /// Content-Type from the source, if it gave one.
    pub content_type: Option<String>,
    /// ETag from the source.
    pub etag: Option<String>,
    /// Last-Modified from the source, seconds since the epoch.
    pub last_modified: Option<u64>,
    /// Name of the store the body came from.
    pub source: String,
}

impl CachedMeta {
    /// Builds the cache record of a verified body.
    pub fn new(key: &Key, meta: &ObjectMeta, md5: [u8; 16], source: &str) -> Self {
        CachedMeta {
            key: key.as_str().to_owned(),
            size: meta.size,
            md5: hex::encode(md5),
            content_type: meta.content_type.clone(),
            etag: meta.etag.clone(),
            last_modified: meta
                .last_modified
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
            source: source.to_owned(),
        }
    }

    /// The record as store metadata (for responses and write-backs).
    pub fn to_object_meta(&self) -> ObjectMeta {
        let mut md5 = [0u8; 16];
        let md5 = hex::decode_to_slice(&self.md5, &mut md5).ok().map(|_| md5);
        ObjectMeta {
            size: self.size,
            content_type: self.content_type.clone(),
            etag: self.etag.clone(),
            last_modified: self
                .last_modified
                .map(|s| UNIX_EPOCH + std::time::Duration::from_secs(s)),
            md5,
        }
    }
}
