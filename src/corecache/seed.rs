//! Stored responses written straight into a core cache directory, in the layout the cache
//! reads at start: for the benchmark of a start with a large cache
//! (`benches/core_cache_start.rs`) and tests that need many entries without a request each.
//! The edge itself never calls it.

use std::io;
use std::path::Path;

use http::{header, HeaderMap, HeaderValue, StatusCode};

use super::policy;
use super::store::{own_id, url_key, Scheme};

/// Writes one stored `200` response per `(path, body)` for `host` (lower case, no port) with
/// the response `headers` (they must make it storable, e.g. `cache-control: public,
/// max-age=…`), as a plain-HTTP GET with only `Host: host` stored it. Returns how many were written.
#[doc(hidden)]
pub fn seed(
    dir: &Path,
    host: &str,
    headers: &HeaderMap,
    entries: impl IntoIterator<Item = (String, Vec<u8>)>,
) -> io::Result<usize> {
    let now = std::time::SystemTime::now();
    let mut req = HeaderMap::new();
    req.insert(
        header::HOST,
        HeaderValue::from_str(host).map_err(io::Error::other)?,
    );
    let mut n = 0;
    for (path, body) in entries {
        let preq = policy::policy_request(Scheme::Http, &path, &req);
        let Some(mut meta) = policy::build(host, &path, &preq, None, StatusCode::OK, headers, now)
        else {
            return Err(io::Error::other(
                "the headers do not make the response storable",
            ));
        };
        meta.len = body.len() as u64;
        let id = own_id(&url_key(host, &path), n as u64);
        let sub = dir.join("objects").join(&id[..2]).join(&id[2..4]);
        std::fs::create_dir_all(&sub)?;
        std::fs::write(sub.join(format!("{id}.body")), &body)?;
        std::fs::write(sub.join(format!("{id}.meta")), serde_json::to_vec(&meta)?)?;
        n += 1;
    }
    Ok(n)
}
