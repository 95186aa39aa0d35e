//! TLS for the listener: certificates chosen by SNI, reloaded without dropping connections.
//!
//! Each configured certificate is answered for the DNS names in its subject alternative names
//! (a `*.example.org` wildcard covers one label). A client that sends no name, or a name no
//! certificate has, gets the first one. [`Certificates::reload`] reads every file again and
//! swaps the whole set at once; a file that cannot be read or used leaves the old set serving.
//! Connections already open keep the certificate they were made with.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{CertificateFiles, TlsConfig};

/// Why certificates could not be loaded. Names the file; never shows key material.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or held no usable item.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// One certificate set, as loaded.
#[derive(Debug)]
struct Loaded {
    /// Exact DNS names (lower case) → certificate.
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.suffix` names: the suffix (lower case) → certificate.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// The first certificate: for clients without SNI or with an unknown name.
    default: Arc<CertifiedKey>,
    /// The names, in file order, for logs.
    names: Vec<String>,
}

impl Loaded {
    fn pick(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = name else {
            return self.default.clone();
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(c) = self.exact.get(&name) {
            return c.clone();
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(c) = self.wildcard.get(parent) {
                return c.clone();
            }
        }
        self.default.clone()
    }
}

/// The certificates in use, shared by the TLS listener's config and the reload.
#[derive(Debug)]
pub struct Certificates {
    files: RwLock<Vec<CertificateFiles>>,
    current: RwLock<Arc<Loaded>>,
}

impl Certificates {
    /// Reads every certificate and key; any problem names its file.
    pub fn load(files: &[CertificateFiles]) -> Result<Arc<Certificates>, TlsError> {
        let loaded = load_all(files)?;
        tracing::info!(names = ?loaded.names, "TLS certificates loaded");
        Ok(Arc::new(Certificates {
            files: RwLock::new(files.to_vec()),
            current: RwLock::new(Arc::new(loaded)),
        }))
    }

    /// Reads every file again and swaps the set in. On any error the old set keeps serving
    /// and the error (naming the file) is returned and logged. Open connections are not
    /// touched.
    pub fn reload(&self) -> Result<Vec<String>, TlsError> {
        let files = self.files.read().clone();
        self.reload_from(&files)
    }

    /// As [`Certificates::reload`], from `files` (a reloaded config's list), which are the
    /// files read from then on.
    pub fn reload_from(&self, files: &[CertificateFiles]) -> Result<Vec<String>, TlsError> {
        match load_all(files) {
            Ok(loaded) => {
                let names = loaded.names.clone();
                *self.current.write() = Arc::new(loaded);
                *self.files.write() = files.to_vec();
                tracing::info!(names = ?names, "TLS certificates reloaded");
                Ok(names)
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS certificates not reloaded; the previous ones keep serving");
                Err(e)
            }
        }
    }

    /// The rustls server config: TLS 1.3 and 1.2, ALPN `h2` then `http/1.1`.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

/// Picks the certificate for a handshake from the current set.
#[derive(Debug)]
struct Resolver(Arc<Certificates>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let current = self.0.current.read().clone();
        Some(current.pick(hello.server_name()))
    }
}

fn load_all(files: &[CertificateFiles]) -> Result<Loaded, TlsError> {
    let mut exact = HashMap::new();
    let mut wildcard = HashMap::new();
    let mut names = Vec::new();
    let mut default = None;
    for f in files {
        let (certified, dns_names) = load_one(f)?;
        let certified = Arc::new(certified);
        for n in dns_names {
            let n = n.to_ascii_lowercase();
            match n.strip_prefix("*.") {
                Some(suffix) => wildcard
                    .entry(suffix.to_owned())
                    .or_insert_with(|| certified.clone()),
                None => exact.entry(n.clone()).or_insert_with(|| certified.clone()),
            };
            names.push(n);
        }
        default.get_or_insert(certified);
    }
    let default = default.ok_or_else(|| TlsError::File {
        path: PathBuf::from("<tls.certificates>"),
        message: "no certificate configured".into(),
    })?;
    Ok(Loaded {
        exact,
        wildcard,
        default,
        names,
    })
}

/// Reads one chain and key; returns them with the chain's DNS names.
fn load_one(f: &CertificateFiles) -> Result<(CertifiedKey, Vec<String>), TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&f.cert)
        .map_err(|e| file_error(&f.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(&f.cert, e))?;
    let Some(leaf) = chain.first() else {
        return Err(file_error(&f.cert, "no CERTIFICATE in the file"));
    };
    let end_entity = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| file_error(&f.cert, format!("not a usable certificate: {e}")))?;
    let names: Vec<String> = end_entity.valid_dns_names().map(str::to_owned).collect();
    if names.is_empty() {
        return Err(file_error(
            &f.cert,
            "the certificate names no DNS name (subject alternative names)",
        ));
    }
    // The key's own error text is kept out: it could quote the file's content.
    let key = PrivateKeyDer::from_pem_file(&f.key)
        .map_err(|e| file_error(&f.key, pem_error_without_content(&e)))?;
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
        .map_err(|_| file_error(&f.key, "not a supported private key (RSA, ECDSA, Ed25519)"))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|_| {
        file_error(
            &f.key,
            format!("is not the key of the certificate in {}", f.cert.display()),
        )
    })?;
    Ok((certified, names))
}

/// A PEM error without any part of the file in it.
fn pem_error_without_content(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    match e {
        Error::Io(io) => io.to_string(),
        Error::NoItemsFound => "no PRIVATE KEY in the file".into(),
        _ => "not a valid PEM private key".into(),
    }
}

/// Builds the certificate set and rustls config for `[tls]`.
pub fn setup(tls: &TlsConfig) -> Result<(Arc<Certificates>, Arc<rustls::ServerConfig>), TlsError> {
    let certificates = Certificates::load(&tls.certificates)?;
    let config = certificates.server_config()?;
    Ok((certificates, config))
}
