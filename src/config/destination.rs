//! Where a store's objects land, as one string: the identity the ledger records every copy
//! under, so that pointing `[primary]` somewhere else starts a new record instead of
//! inheriting the old one's (issue 7).

use std::path::Path;

use super::{StoreConfig, StoreKind};

impl StoreConfig {
    /// The store's destination identity: `fs:<canonical root>`, `s3:<endpoint>/<bucket>/<prefix>`
    /// or `http:<url>`. Two configs that write to the same place give the same string; the
    /// name, the limits and the credentials play no part (and never appear in it).
    ///
    /// An fs root is canonicalized (symlinks resolved) when it exists, else made absolute:
    /// call this after the store is opened (which creates a missing primary root) so that the
    /// string does not change once the directory exists. An S3 endpoint's scheme and host are
    /// lower-cased and a trailing `/` is dropped; the bucket and prefix are kept as written
    /// (S3 names are case-sensitive).
    pub fn destination(&self) -> String {
        match &self.kind {
            StoreKind::Fs { root } => format!("fs:{}", canonical(root)),
            StoreKind::S3(s3) => {
                let endpoint = normalize_endpoint(&s3.endpoint);
                let prefix = s3.prefix.trim_matches('/');
                if prefix.is_empty() {
                    format!("s3:{endpoint}/{}", s3.bucket)
                } else {
                    format!("s3:{endpoint}/{}/{prefix}", s3.bucket)
                }
            }
            StoreKind::Http { url } => format!("http:{}", normalize_endpoint(url)),
        }
    }
}

fn canonical(root: &Path) -> String {
    root.canonicalize()
        .or_else(|_| std::path::absolute(root))
        .unwrap_or_else(|_| root.to_owned())
        .display()
        .to_string()
}

/// `HTTP://Host:3900/` → `http://host:3900`; a path after the host keeps its case.
fn normalize_endpoint(url: &str) -> String {
    let url = url.trim_end_matches('/');
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    format!(
        "{}://{}{path}",
        scheme.to_ascii_lowercase(),
        host.to_ascii_lowercase()
    )
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    fn primary(store: &str) -> crate::config::StoreConfig {
        let text = format!("[primary]\n{store}\n");
        crate::config::from_str(&text, Path::new("t.toml"))
            .unwrap()
            .primary
    }

    fn s3(endpoint: &str, bucket: &str, prefix: &str, key: &str, name: &str) -> String {
        primary(&format!(
            "name = \"{name}\"\ntype = \"s3\"\nendpoint = \"{endpoint}\"\nbucket = \"{bucket}\"\n\
             prefix = \"{prefix}\"\naccess_key_id = \"{key}\"\nsecret_access_key = \"s3cr3t-{key}\"\n\
             max_concurrency = 3"
        ))
        .destination()
    }

    #[test]
    fn s3_is_endpoint_bucket_and_prefix_never_credentials() {
        let d = s3("https://S3.Example.com/", "media", "system", "AK1", "new");
        assert_eq!(d, "s3:https://s3.example.com/media/system");
        assert!(!d.contains("AK1") && !d.contains("s3cr3t"), "{d}");
        // Another name or other credentials: the same place.
        assert_eq!(
            s3("https://s3.example.com", "media", "system", "AK2", "x"),
            d
        );
        // Another bucket, prefix or endpoint: another place.
        assert_ne!(
            s3("https://s3.example.com", "media2", "system", "AK1", "new"),
            d
        );
        assert_ne!(
            s3("https://s3.example.com", "media", "other", "AK1", "new"),
            d
        );
        assert_ne!(
            s3("https://fsn1.hetzner.com", "media", "system", "AK1", "new"),
            d
        );
        assert_eq!(
            s3("https://s3.example.com", "media", "", "AK1", "new"),
            "s3:https://s3.example.com/media"
        );
    }

    #[test]
    fn fs_is_the_canonical_root() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("media");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink(&real, dir.path().join("link")).unwrap();
        let canon = real.canonicalize().unwrap();
        let want = format!("fs:{}", canon.display());
        let via_link = format!("type = \"fs\"\nroot = \"{}/link/\"", dir.path().display());
        assert_eq!(primary(&via_link).destination(), want);
        let dotted = format!("type = \"fs\"\nroot = \"{}/./media\"", dir.path().display());
        assert_eq!(primary(&dotted).destination(), want);
        let other = format!("type = \"fs\"\nroot = \"{}\"", dir.path().display());
        assert_ne!(primary(&other).destination(), want);
    }
}
