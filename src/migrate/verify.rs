//! `--verify`: re-checks copied objects against the source.
//!
//! For every key the migration copied (into the primary configured now) or found in the primary (and every key the edge copied
//! from that source by pull-through), both stores are asked for metadata: the sizes must match,
//! and the MD5s where both stores give one (S3 single-part ETag, `Content-MD5`); the primary's
//! MD5 must also match the one recorded in the ledger at copy time. `--verify-deep` reads both
//! bodies and compares their MD5s, for stores that vouch for none (directories, most origins).
//! Source requests go through the same budget as copies.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::worker::Ctx;
use crate::key::Key;
use crate::ledger;
use crate::store::{BodyCheck, StoreError, StoreHandle};

/// The result of a verification.
#[derive(Debug, Default)]
pub struct Verified {
    /// Keys checked.
    pub checked: u64,
    /// Keys that differ, with what differs, in key order.
    pub differences: Vec<(String, String)>,
    /// Keys that could not be checked (a store failed), with the error.
    pub errors: Vec<(String, String)>,
}

/// Checks `keys`, `concurrency` at a time; stops early (with what it has) on `stop`.
pub async fn verify(
    ctx: Arc<Ctx>,
    keys: Vec<String>,
    deep: bool,
    concurrency: usize,
    stop: CancellationToken,
) -> Verified {
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let checked = Arc::new(AtomicU64::new(0));
    let found: Arc<Mutex<Verified>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    for key in keys {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p,
            _ = stop.cancelled() => break,
        };
        let Ok(permit) = permit else { break };
        let (ctx, checked, found) = (ctx.clone(), checked.clone(), found.clone());
        tasks.spawn(async move {
            let _permit = permit;
            match check(&ctx, &key, deep).await {
                Ok(None) => {}
                Ok(Some(diff)) => {
                    tracing::warn!(key, difference = diff, "the copy differs from the source");
                    found.lock().differences.push((key, diff));
                }
                Err(e) => {
                    tracing::warn!(key, error = %e, "could not verify");
                    found.lock().errors.push((key, e.to_string()));
                }
            }
            checked.fetch_add(1, Relaxed);
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let mut out = std::mem::take(&mut *found.lock());
    out.checked = checked.load(Relaxed);
    out.differences.sort();
    out.errors.sort();
    out
}

/// `Ok(Some(what differs))`, `Ok(None)` when the copy matches.
async fn check(ctx: &Ctx, key: &str, deep: bool) -> Result<Option<String>, StoreError> {
    let Ok(k) = Key::parse(key) else {
        return Ok(Some("not a valid key".into()));
    };
    let Some(there) = ctx.primary.head(&k).await? else {
        return Ok(Some("missing in the primary".into()));
    };
    ctx.budget.op().await;
    let Some(src) = ctx.source.head(&k).await? else {
        return Ok(Some("no longer in the source".into()));
    };
    if there.size != src.size {
        return Ok(Some(format!(
            "size {} in the primary, {} in the source",
            there.size, src.size
        )));
    }
    if let (Some(a), Some(b)) = (there.md5, src.md5) {
        if a != b {
            return Ok(Some(format!(
                "MD5 {} in the primary, {} in the source",
                hex::encode(a),
                hex::encode(b)
            )));
        }
    }
    let (owned, destination) = (key.to_owned(), ctx.route.destination.clone());
    let recorded = ctx
        .ledger
        .run(move |c| ledger::ops::copied_to(c, &owned, &destination))
        .await
        .map_err(|e| StoreError::backend("ledger", e))?;
    if let (Some(copy), Some(md5)) = (recorded, there.md5) {
        if copy.md5 != hex::encode(md5) && copy.size == there.size {
            return Ok(Some(format!(
                "MD5 {} in the primary, {} recorded at copy time",
                hex::encode(md5),
                copy.md5
            )));
        }
    }
    if deep {
        ctx.budget.op().await;
        let a = body_md5(&ctx.source, &k, Some(ctx)).await?;
        let b = body_md5(&ctx.primary, &k, None).await?;
        match (a, b) {
            (Some(a), Some(b)) if a != b => {
                return Ok(Some(format!(
                    "content differs: MD5 {} in the primary, {} in the source",
                    hex::encode(b),
                    hex::encode(a)
                )))
            }
            (None, _) => return Ok(Some("no longer in the source".into())),
            (_, None) => return Ok(Some("missing in the primary".into())),
            _ => {}
        }
    }
    Ok(None)
}

/// MD5 and length check of a whole body; `budget` set for reads from the source.
async fn body_md5(
    store: &StoreHandle,
    key: &Key,
    budget: Option<&Ctx>,
) -> Result<Option<[u8; 16]>, StoreError> {
    let Some(object) = store.get(key).await? else {
        return Ok(None);
    };
    let integrity = |detail: String| StoreError::Integrity {
        store: store.name().to_owned(),
        key: key.to_string(),
        detail,
    };
    let mut check = BodyCheck::new(&object.meta);
    let mut body = object.body;
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        if let Some(ctx) = budget {
            ctx.budget.bytes(chunk.len()).await;
        }
        check.update(&chunk).map_err(|e| integrity(e.to_string()))?;
    }
    check
        .finish()
        .map(Some)
        .map_err(|e| integrity(e.to_string()))
}
