//! What the two start benchmarks (`cache_start.rs`, `core_cache_start.rs`) share: how many
//! objects (from the environment), the directory (`EDGE_BENCH_DIR`, kept for a rerun, or a
//! temporary one), writing the set once, and dropping the page cache.

use std::path::{Path, PathBuf};

/// A directory holding the benchmark's set, ready to start an edge on.
pub struct Setup {
    /// Objects in the set.
    pub n: usize,
    /// The edge's directory (`var/`, `primary/` and the cache below it).
    pub dir: PathBuf,
    /// The cache directory inside it.
    pub cache: PathBuf,
    /// Whether the page cache was dropped (root only): a cold start.
    pub cold: bool,
    _tmp: Option<tempfile::TempDir>,
}

/// `count_var` objects (default 1,000,000) in `<dir>/<sub>`, written by `populate` unless a
/// run before left the same number there (its count in `<sub>/<marker>`); then the page
/// cache dropped if this process may. `what` names the objects in the progress line.
pub fn setup(
    count_var: &str,
    sub: &str,
    marker: &str,
    what: &str,
    populate: impl FnOnce(&Path, usize),
) -> Setup {
    let n: usize = std::env::var(count_var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let (dir, tmp) = match std::env::var_os("EDGE_BENCH_DIR") {
        Some(d) => (PathBuf::from(d), None),
        None => {
            let tmp = tempfile::tempdir().unwrap();
            (tmp.path().to_owned(), Some(tmp))
        }
    };
    let cache = dir.join(sub);
    let have = std::fs::read_to_string(cache.join(marker)).ok();
    if have.as_deref() != Some(n.to_string().as_str()) {
        eprintln!("writing {n} {what} into {}", cache.display());
        populate(&cache, n);
        std::fs::write(cache.join(marker), n.to_string()).unwrap();
    }
    std::fs::create_dir_all(dir.join("primary")).unwrap();
    let cold = std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok();
    eprintln!(
        "page cache {}",
        if cold {
            "dropped"
        } else {
            "NOT dropped (not root?)"
        }
    );
    Setup {
        n,
        dir,
        cache,
        cold,
        _tmp: tmp,
    }
}
