//! `--probe` / `--probe-write`: live checks of every store of a fediedge config, through the
//! same store layer `serve` uses.
//!
//! Per store: a HEAD of a canary key (reachable, credentials accepted); with `--probe-key` the
//! canary must exist and its body is read through. With `--probe-write` (not on read-only http
//! stores) a small object `fediedge-doctor-probe/<random>` is written, checked and deleted.

use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;

use super::finding::{Finding, Severity};
use crate::config::{Config, StoreConfig};
use crate::key::Key;
use crate::store::{self, ObjectMeta, StoreHandle};

/// A key no store holds: a HEAD of it must answer "absent", anything else is a failure.
pub const DEFAULT_CANARY: &str = "fediedge-doctor-probe/canary-that-does-not-exist";

/// What to probe.
pub struct ProbeOptions {
    /// Canary key given by the admin (must exist), or `None` for [`DEFAULT_CANARY`].
    pub key: Option<String>,
    /// Also write, read back and delete a probe object.
    pub write: bool,
}

/// Probes the primary and every fallback of `config`; `file` names the config in findings.
pub async fn probe(config: &Config, file: &str, opts: &ProbeOptions) -> Vec<Finding> {
    let mut out = Vec::new();
    let metrics = crate::metrics::Metrics::new();
    let stores = std::iter::once(&config.primary).chain(config.fallbacks.iter());
    for sc in stores {
        let key_name = format!("store {}", sc.name);
        let finding = |sev, rule, msg: String, fix: &str| {
            Finding::new(sev, rule, file, Some(&key_name), msg, fix)
        };
        let handle = match store::open(sc, metrics.clone()) {
            Ok(h) => h,
            Err(e) => {
                out.push(finding(
                    Severity::Error,
                    "probe-open",
                    format!("cannot open store {:?} ({}): {e}", sc.name, describe(sc)),
                    "Fix the store settings in the config.",
                ));
                continue;
            }
        };
        read_probe(&handle, sc, opts, &finding, &mut out).await;
        if opts.write {
            write_probe(&handle, sc, &finding, &mut out).await;
        }
    }
    out
}

/// The store's kind and location, without the password of a URL.
fn describe(sc: &StoreConfig) -> String {
    crate::mastodon::keys::redact_userinfo(&format!("{:?}", sc.kind))
}

async fn read_probe(
    handle: &StoreHandle,
    sc: &StoreConfig,
    opts: &ProbeOptions,
    finding: &dyn Fn(Severity, &'static str, String, &str) -> Finding,
    out: &mut Vec<Finding>,
) {
    let canary = opts.key.as_deref().unwrap_or(DEFAULT_CANARY);
    let key = match Key::parse(canary) {
        Ok(k) => k,
        Err(e) => {
            out.push(finding(
                Severity::Error,
                "probe-key",
                format!("--probe-key {canary:?}: {e}"),
                "Give a key as it appears after the URL prefix, e.g. media_attachments/files/…",
            ));
            return;
        }
    };
    match handle.head(&key).await {
        Err(e) => out.push(finding(
            Severity::Error,
            "probe-unreachable",
            format!(
                "store {:?} ({}) did not answer a HEAD of {canary:?}: {e}",
                sc.name,
                describe(sc)
            ),
            "Check that the store is up and reachable from this host, and that the \
             credentials and bucket are right.",
        )),
        Ok(None) if opts.key.is_some() => out.push(finding(
            Severity::Warning,
            "probe-canary-missing",
            format!(
                "store {:?} answered, but does not have {canary:?}.",
                sc.name
            ),
            "Give a key that exists in every store, or check the store's root/bucket/prefix.",
        )),
        Ok(None) => out.push(finding(
            Severity::Info,
            "probe-ok",
            format!(
                "store {:?} ({}) is reachable and answered a HEAD.",
                sc.name,
                describe(sc)
            ),
            "Nothing to do.",
        )),
        Ok(Some(meta)) => match read_all(handle, &key).await {
            Ok(n) if n == meta.size => out.push(finding(
                Severity::Info,
                "probe-ok",
                format!("store {:?} served {canary:?} ({n} bytes).", sc.name),
                "Nothing to do.",
            )),
            Ok(n) => out.push(finding(
                Severity::Error,
                "probe-read",
                format!(
                    "store {:?}: {canary:?} announced {} bytes but {n} arrived.",
                    sc.name, meta.size
                ),
                "Check the store (a proxy truncating bodies, a damaged object).",
            )),
            Err(e) => out.push(finding(
                Severity::Error,
                "probe-read",
                format!("store {:?}: reading {canary:?} failed: {e}", sc.name),
                "Check the store's permissions for reads.",
            )),
        },
    }
}

async fn read_all(handle: &StoreHandle, key: &Key) -> Result<u64, String> {
    let Some(obj) = handle.get(key).await.map_err(|e| e.to_string())? else {
        return Err("vanished between HEAD and GET".into());
    };
    let mut body = obj.body;
    let mut n = 0u64;
    while let Some(chunk) = body.next().await {
        n += chunk.map_err(|e| e.to_string())?.len() as u64;
    }
    Ok(n)
}

async fn write_probe(
    handle: &StoreHandle,
    sc: &StoreConfig,
    finding: &dyn Fn(Severity, &'static str, String, &str) -> Finding,
    out: &mut Vec<Finding>,
) {
    if handle.kind() == crate::config::StoreType::Http {
        out.push(finding(
            Severity::Info,
            "probe-write-skipped",
            format!(
                "store {:?} is an http origin (read-only): no write probe.",
                sc.name
            ),
            "Nothing to do.",
        ));
        return;
    }
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        ^ (u128::from(std::process::id()) << 64);
    let name = format!("fediedge-doctor-probe/{nonce:x}");
    let key = Key::parse(&name).expect("probe keys are valid");
    let body = format!("fediedge doctor probe {nonce:x}\n");
    let result: Result<(), String> = async {
        let tmp = TempFile(std::env::temp_dir().join(format!("fediedge-doctor-probe-{nonce:x}")));
        std::fs::write(&tmp.0, &body).map_err(|e| format!("temp file: {e}"))?;
        let meta = ObjectMeta {
            size: body.len() as u64,
            content_type: Some("text/plain".into()),
            ..ObjectMeta::default()
        };
        handle
            .put(&key, &tmp.0, &meta)
            .await
            .map_err(|e| format!("write refused: {e}"))?;
        let head = handle.head(&key).await;
        let delete = handle.delete(&key).await;
        match head {
            Ok(Some(m)) if m.size == meta.size => {}
            Ok(Some(m)) => return Err(format!("wrote {} bytes, read back {}", meta.size, m.size)),
            Ok(None) => return Err("the object written is not there".into()),
            Err(e) => return Err(format!("HEAD after write failed: {e}")),
        }
        delete.map_err(|e| format!("delete refused (remove {name} by hand): {e}"))?;
        match handle.head(&key).await {
            Ok(None) => Ok(()),
            Ok(Some(_)) => Err(format!("still present after delete: remove {name} by hand")),
            Err(e) => Err(format!("HEAD after delete failed: {e}")),
        }
    }
    .await;
    out.push(match result {
        Ok(()) => finding(
            Severity::Info,
            "probe-write-ok",
            format!("store {:?}: wrote, read back and deleted {name}.", sc.name),
            "Nothing to do.",
        ),
        Err(e) => finding(
            Severity::Error,
            "probe-write",
            format!("store {:?}: write probe failed: {e}", sc.name),
            "Check write permissions (fs: directory owner and mode; s3: the key's policy).",
        ),
    });
}

/// A local file removed when dropped.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
