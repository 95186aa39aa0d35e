//! SIGHUP: the config file is read again and checked; a bad file (or a bad certificate) is
//! logged and nothing changes. Otherwise every value that changed is logged by its dotted key
//! ([`crate::config::diff`]; secrets as changed, never their value), what can change live is
//! swapped in, and the rest is marked "(applies at restart)".
//!
//! Live: the `[tls]` certificates (files read again even when the paths did not change: a
//! renewal), `[core]` but `[core.cache]` (the proxy's pools, timeouts and limits; requests
//! under way end on the pools they began with), and the routes: `[core] hosts` and
//! `media_hosts` (a new [`Router`] for the requests that arrive from then on), unless `[core]`
//! itself appeared or went (the proxy is made at start), and `max_connections`
//! ([`ConnectionCap::resize`]). The next reload is compared with this
//! file, so a value that waits for a restart is named once.

use std::path::Path;
use std::sync::Arc;

use crate::config::{self, Change, Config, ConfigError};
use crate::listen::cap::ConnectionCap;
use crate::listen::tls::{Certificates, TlsError};
use crate::proxy::Proxy;
use crate::router::{Router, SharedRouter};

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file could not be read, parsed or validated (the message names the key).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A certificate or key file could not be used (the message names the file).
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// `serve` started without `--config`.
    #[error("serve runs on the embedded default config: there is no file to read again")]
    NoFile,
}

/// What a reload may touch: the config last read and the parts that change live.
pub struct Reloader {
    current: parking_lot::Mutex<Config>,
    certificates: Option<Arc<Certificates>>,
    proxy: Option<Arc<Proxy>>,
    routes: SharedRouter,
    cap: Arc<ConnectionCap>,
}

impl Reloader {
    /// For a server started from `config`, with its certificates and proxy, if any, the
    /// routes in use and the connection cap of the public listeners.
    pub fn new(
        config: Config,
        certificates: Option<Arc<Certificates>>,
        proxy: Option<Arc<Proxy>>,
        routes: SharedRouter,
        cap: Arc<ConnectionCap>,
    ) -> Reloader {
        Reloader {
            current: parking_lot::Mutex::new(config),
            certificates,
            proxy,
            routes,
            cap,
        }
    }

    /// Reads the config file again; see the module's doc. Returns the changes (also those
    /// that wait for a restart); every outcome is logged.
    pub fn reload(&self) -> Result<Vec<Change>, ReloadError> {
        let mut current = self.current.lock();
        let path = current.source.clone();
        let result = self.apply(&mut current, &path);
        if let Err(e) = &result {
            tracing::error!(config = %path.display(), error = %e, "config not reloaded: the running config stays");
        }
        result
    }

    fn apply(&self, current: &mut Config, path: &Path) -> Result<Vec<Change>, ReloadError> {
        if path == Path::new(config::EMBEDDED) {
            return Err(ReloadError::NoFile);
        }
        let new = config::load(path)?;
        // Certificates before anything else: a bad one refuses the whole reload.
        if let (Some(certs), Some(tls)) = (&self.certificates, &new.tls) {
            certs.reload_from(&tls.certificates)?;
        }
        let changes = config::diff(&current.settings, &new.settings);
        let mut later = 0;
        for c in &changes {
            match self.live(&c.key, &new) {
                true => tracing::info!("{c}"),
                false => {
                    later += 1;
                    tracing::warn!("{c} (applies at restart)");
                }
            }
        }
        if let (Some(proxy), Some(core)) = (&self.proxy, &new.core) {
            proxy.update(core);
        }
        self.cap.resize(
            new.max_connections
                .unwrap_or_else(crate::listen::cap::default_max_connections),
        );
        self.cap.per_ip.set_max(new.max_connections_per_ip);
        // The trusted proxies count as the proxy uses them (updated above, or kept when
        // `[core]` went: the proxy runs on until a restart).
        self.cap
            .per_ip
            .set_exempt(crate::serve::per_ip_exempt(&new, self.proxy.as_deref()));
        if self.routes_live(&new) {
            let routes = Router::of(&new);
            let routes = self
                .routes
                .get()
                .with_hosts(routes.media_hosts().to_vec(), routes.core_hosts().to_vec());
            self.routes.set(routes);
        }
        tracing::info!(
            config = %path.display(),
            changed = changes.len(),
            at_restart = later,
            "config reloaded"
        );
        *current = new;
        Ok(changes)
    }

    /// Whether a change to `key` took effect now.
    fn live(&self, key: &str, new: &Config) -> bool {
        let under = |table: &str| {
            key.strip_prefix(table)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        };
        if under("tls.certificates") {
            return self.certificates.is_some() && new.tls.is_some();
        }
        if key == "max_connections"
            || key == "max_connections_per_ip"
            || under("max_connections_per_ip_exempt")
        {
            return true;
        }
        if under("core.hosts") || under("media_hosts") {
            return self.routes_live(new);
        }
        // The core cache (opened at start) and the buffers' budgets stay as they are.
        let at_start = [
            "core.cache",
            "core.max_temp_bytes",
            "core.max_buffer_memory",
        ];
        if under("core") && !at_start.iter().any(|k| under(k)) {
            return self.proxy.is_some() && new.core.is_some();
        }
        false
    }

    /// Whether the new hosts can route now: the proxy (made at start, or not) still matches
    /// whether there is a `[core]`; adding or removing it waits for a restart, and so do its
    /// hosts.
    fn routes_live(&self, new: &Config) -> bool {
        self.proxy.is_some() == new.core.is_some()
    }
}
