//! The load budget on the source: requests per second and bytes per second (token buckets,
//! from the `governor` crate); the number of objects in work at once is a semaphore held by
//! the dispatcher ([`super::run_copy`]).
//!
//! Every request sent to the source (GET, and the HEAD that `--keys` and `--verify` may need)
//! takes one op token before it is sent; every body chunk takes its length in byte tokens as
//! it is read, so a slow budget slows the reading itself and the source sees the rate asked.
//! Requests to the primary are not counted: the budget protects the old store.

use std::num::NonZeroU32;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

/// Largest byte burst, and so the largest piece a chunk is split into for the byte bucket.
const MAX_BYTE_BURST: u32 = 1024 * 1024;
/// Smallest byte burst (very low rates would otherwise wait per few bytes).
const MIN_BYTE_BURST: u32 = 16 * 1024;

/// Rate limits as seen by the source. Cheap to share behind an `Arc`.
pub struct Budget {
    ops: Option<DefaultDirectRateLimiter>,
    bytes: Option<(DefaultDirectRateLimiter, u32)>,
}

impl Budget {
    /// `ops_per_sec` requests per second with no burst (evenly spaced: the test at the source
    /// sees the rate from the first second); `bytes_per_sec` with a burst of a tenth of a
    /// second (between 16 KiB and 1 MiB). `None` or 0: unlimited.
    pub fn new(ops_per_sec: Option<u32>, bytes_per_sec: Option<u64>) -> Budget {
        let ops = ops_per_sec
            .and_then(NonZeroU32::new)
            .map(|r| RateLimiter::direct(Quota::per_second(r).allow_burst(NonZeroU32::MIN)));
        let bytes = bytes_per_sec.filter(|&b| b > 0).map(|b| {
            let rate = NonZeroU32::new(b.min(u32::MAX as u64) as u32).unwrap_or(NonZeroU32::MIN);
            let burst = ((b / 10).min(MAX_BYTE_BURST as u64) as u32).max(MIN_BYTE_BURST);
            let burst_nz = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
            (
                RateLimiter::direct(Quota::per_second(rate).allow_burst(burst_nz)),
                burst,
            )
        });
        Budget { ops, bytes }
    }

    /// Waits until one more request may be sent to the source.
    pub async fn op(&self) {
        if let Some(l) = &self.ops {
            l.until_ready().await;
        }
    }

    /// Waits until `n` more body bytes may be read from the source.
    pub async fn bytes(&self, n: usize) {
        let Some((l, burst)) = &self.bytes else {
            return;
        };
        let mut left = n as u64;
        while left > 0 {
            let piece = left.min(*burst as u64) as u32;
            let Some(piece_nz) = NonZeroU32::new(piece) else {
                return;
            };
            // Cannot fail: `piece` never exceeds the burst the quota was built with.
            let _ = l.until_n_ready(piece_nz).await;
            left -= piece as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn bytes_are_paced() {
        // 100 KiB/s: 60 KiB after the 16 KiB burst takes about 0.44 s.
        let b = Budget::new(None, Some(100 * 1024));
        let start = Instant::now();
        b.bytes(60 * 1024).await;
        assert!(start.elapsed() >= Duration::from_millis(350));
    }

    #[test]
    fn unlimited_does_not_wait() {
        use futures_util::FutureExt;
        // Ready at the first poll: no timer, no clock involved.
        let b = Budget::new(None, None);
        for _ in 0..1000 {
            assert!(b.op().now_or_never().is_some());
            assert!(b.bytes(1 << 20).now_or_never().is_some());
        }
    }
}
