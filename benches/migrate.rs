//! `fediedge migrate` against `rclone copy`, from the same directory into two buckets of the same
//! real Garage node, at the same concurrency (issue 3 §8).
//!
//! Run it with `bash scripts/bench-migrate.sh` (installs rclone and Garage when missing, builds
//! in release). Settings from the environment: `BENCH_FILES` (default 2000), `BENCH_CONCURRENCY`
//! (default 8), `RCLONE` (default `rclone`), `GARAGE_BIN` (default `~/.cargo/bin/garage`),
//! `BENCH_DIR` (where the data set and Garage live; default a temp dir), `BENCH_FEDIEDGE_FIRST=1`
//! (run fediedge before rclone), `BENCH_WARMUP=0` (no untimed warm-up copy), `BENCH_TIME=1` (CPU time of each tool, by `/usr/bin/time`).
//!
//! The data set looks like a Mastodon `public/system`: attachments in `original/` and
//! `small/`, avatars and headers, preview cards; 98 % of files 10–100 KB, 2 % 1–5 MB.
//! Both tools verify: rclone checks size and MD5 after each upload (its default), fediedge
//! checks length and MD5 of each body and compares the MD5 with the ETag Garage returns.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Deterministic pseudo-random generator (xorshift), so every run has the same data set.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
}

/// Writes `n` files under `root`; returns their total size.
fn generate(root: &Path, n: usize) -> u64 {
    let mut rng = Rng(0x5eed_f00d_cafe_b0ba);
    let mut total = 0u64;
    let mut buf = Vec::new();
    for i in 0..n {
        let id = 109_348_502_375_432_000u64 + rng.range(0, 1 << 40);
        let d = format!("{id:018}");
        let hash = format!("{:016x}", rng.next());
        let key = match i % 10 {
            0 => format!(
                "accounts/avatars/{}/{}/{}/original/{hash}.png",
                &d[..3],
                &d[3..6],
                &d[6..9]
            ),
            1 => format!(
                "accounts/headers/{}/{}/{}/original/{hash}.jpeg",
                &d[..3],
                &d[3..6],
                &d[6..9]
            ),
            2 => format!(
                "cache/preview_cards/images/{}/{}/{}/original/{hash}.jpg",
                &d[..3],
                &d[3..6],
                &d[6..9]
            ),
            3..=5 => format!(
                "media_attachments/files/{}/{}/{}/{}/{}/{}/small/{hash}.jpg",
                &d[..3],
                &d[3..6],
                &d[6..9],
                &d[9..12],
                &d[12..15],
                &d[15..18]
            ),
            _ => format!(
                "media_attachments/files/{}/{}/{}/{}/{}/{}/original/{hash}.jpg",
                &d[..3],
                &d[3..6],
                &d[6..9],
                &d[9..12],
                &d[12..15],
                &d[15..18]
            ),
        };
        let size = if rng.range(0, 100) < 2 {
            rng.range(1_000_000, 5_000_000)
        } else {
            rng.range(10_000, 100_000)
        } as usize;
        buf.resize(size, 0);
        for chunk in buf.chunks_mut(8) {
            let x = rng.next().to_le_bytes();
            chunk.copy_from_slice(&x[..chunk.len()]);
        }
        let path = root.join(&key);
        std::fs::create_dir_all(path.parent().expect("keys have a parent")).expect("mkdir");
        std::fs::write(&path, &buf).expect("write data set");
        total += size as u64;
    }
    total
}

// ---- A real Garage node: a copy of tests/it/common/garage.rs, reduced to what the bench needs.
// A bench cannot import from tests/, and the harness is small enough that a copy beats a
// shared crate.

struct Garage {
    child: std::process::Child,
    endpoint: String,
    key_id: String,
    secret: String,
    config: PathBuf,
    bin: PathBuf,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Garage {
    fn start(dir: &Path, buckets: &[&str]) -> Garage {
        let bin = std::env::var("GARAGE_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                let home = std::env::var("CARGO_HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|_| {
                        PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cargo")
                    });
                home.join("bin/garage")
            });
        assert!(
            bin.exists(),
            "garage not found at {}: run scripts/install-garage.sh",
            bin.display()
        );
        let (rpc, s3, admin) = (free_port(), free_port(), free_port());
        let config = dir.join("garage.toml");
        let secret: String = (0..32)
            .map(|i| format!("{:02x}", (i * 37 + rpc as usize) % 256))
            .collect();
        std::fs::write(
            &config,
            format!(
                r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{secret}"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:{admin}"
"#,
                d = dir.display()
            ),
        )
        .expect("write garage.toml");
        let log = std::fs::File::create(dir.join("garage.log")).expect("garage.log");
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&config)
            .arg("server")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("cannot start garage");
        let mut g = Garage {
            child,
            endpoint: format!("http://127.0.0.1:{s3}"),
            key_id: String::new(),
            secret: String::new(),
            config,
            bin,
        };
        let started = Instant::now();
        let node = loop {
            match g.cli(&["node", "id", "-q"]) {
                Ok(out) => break out.trim().split('@').next().unwrap_or("").to_owned(),
                Err(e) if started.elapsed() > Duration::from_secs(30) => {
                    panic!("garage did not start: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "10G", &node])
            .expect("layout");
        g.cli(&["layout", "apply", "--version", "1"])
            .expect("layout apply");
        let out = g.cli(&["key", "create", "bench"]).expect("key");
        let field = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_else(|| panic!("no {name} in: {out}"))
        };
        g.key_id = field("Key ID:");
        g.secret = field("Secret key:");
        for b in buckets {
            g.cli(&["bucket", "create", b]).expect("bucket");
            g.cli(&[
                "bucket", "allow", "--read", "--write", "--owner", b, "--key", "bench",
            ])
            .expect("allow");
        }
        g
    }

    fn cli(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.bin)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- The two runs.

/// A command for `program`; with `BENCH_TIME=1`, under `/usr/bin/time` to show its CPU time.
fn tool(program: &str) -> Command {
    if env_or("BENCH_TIME", 0) == 1 {
        let mut c = Command::new("/usr/bin/time");
        c.args(["-f", "cpu: %U s user, %S s sys, %M KB max RSS"])
            .arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// Runs `cmd`, panics on failure, returns the wall time.
fn timed(what: &str, cmd: &mut Command) -> Duration {
    let started = Instant::now();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let took = started.elapsed();
    if !out.status.success() {
        panic!(
            "{what} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!("{what}: {}", String::from_utf8_lossy(&out.stdout).trim());
    let stderr = String::from_utf8_lossy(&out.stderr);
    if let Some(cpu) = stderr.lines().rev().find(|l| l.starts_with("cpu: ")) {
        eprintln!("{what}: {cpu}");
    }
    took
}

/// Objects and bytes in `bucket`, counted by listing it.
fn bucket_count(g: &Garage, bucket: &str) -> (u64, u64) {
    let text = format!(
        "[primary]\ntype = \"s3\"\nendpoint = \"{}\"\nbucket = \"{bucket}\"\nregion = \"garage\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
        g.endpoint, g.key_id, g.secret
    );
    let config = fediedge::config::from_str(&text, Path::new("bench.toml")).expect("config");
    let store =
        fediedge::store::open(&config.primary, fediedge::metrics::Metrics::new()).expect("store");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        use futures_util::StreamExt;
        let mut list = store.list(None).expect("list");
        let (mut n, mut bytes) = (0, 0);
        while let Some(item) = list.next().await {
            let item = item.expect("listing");
            n += 1;
            bytes += item.size;
        }
        (n, bytes)
    })
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects nothing here.
    let files: usize = env_or("BENCH_FILES", 2000);
    let concurrency: usize = env_or("BENCH_CONCURRENCY", 8);
    let rclone = std::env::var("RCLONE").unwrap_or_else(|_| "rclone".into());
    let keep = std::env::var("BENCH_DIR").ok().map(PathBuf::from);
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = keep.clone().unwrap_or_else(|| tmp.path().to_owned());
    let src = dir.join("system");
    let garage_dir = dir.join("garage");
    let _ = std::fs::remove_dir_all(&src);
    let _ = std::fs::remove_dir_all(&garage_dir);
    std::fs::create_dir_all(&garage_dir).expect("mkdir");

    let total = generate(&src, files);
    eprintln!(
        "data set: {files} files, {:.1} MB in {}",
        total as f64 / 1e6,
        src.display()
    );
    let g = Garage::start(&garage_dir, &["warmup", "rclone", "fediedge"]);

    let n = concurrency.to_string();
    let data_dir = dir.join("fediedge-data");
    let _ = std::fs::remove_dir_all(&data_dir);
    let config = dir.join("fediedge.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[primary]\ntype = \"s3\"\nendpoint = \"{}\"\nbucket = \"fediedge\"\nregion = \"garage\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\nmax_concurrency = {n}\n[[fallback]]\nname = \"old\"\ntype = \"fs\"\nroot = \"{}\"\nmax_concurrency = {n}\n",
            data_dir.display(),
            g.endpoint,
            g.key_id,
            g.secret,
            src.display()
        ),
    )
    .expect("write config");
    let run_rclone = |bucket: &str| {
        timed(
            "rclone copy",
            tool(&rclone)
                .args(["copy", &src.to_string_lossy(), &format!("garage:{bucket}")])
                .args(["--transfers", &n, "--checkers", &n, "--stats", "0"])
                .env("RCLONE_CONFIG_GARAGE_TYPE", "s3")
                .env("RCLONE_CONFIG_GARAGE_PROVIDER", "Other")
                .env("RCLONE_CONFIG_GARAGE_ENDPOINT", &g.endpoint)
                .env("RCLONE_CONFIG_GARAGE_REGION", "garage")
                .env("RCLONE_CONFIG_GARAGE_ACCESS_KEY_ID", &g.key_id)
                .env("RCLONE_CONFIG_GARAGE_SECRET_ACCESS_KEY", &g.secret)
                .env("RCLONE_CONFIG_GARAGE_FORCE_PATH_STYLE", "true")
                // rclone's S3 backend fails to start when AWS_CA_BUNDLE is set and its HTTP
                // transport is its own ("LoadCustomCABundleError"); Garage is plain HTTP here.
                .env_remove("AWS_CA_BUNDLE"),
        )
    };

    let run_fediedge = || {
        timed(
            "fediedge migrate",
            tool(env!("CARGO_BIN_EXE_fediedge"))
                .args([
                    "migrate",
                    "--config",
                    &config.to_string_lossy(),
                    "--from",
                    "old",
                ])
                .args(["--concurrency", &n])
                .env("RUST_LOG", "warn"),
        )
    };
    // The second run writes into a node that already holds the first run's objects; run
    // with BENCH_FEDIEDGE_FIRST=1 to see that the order does not decide the result.
    //
    // Garage stores each block once by its hash: a second upload of the same data writes no
    // block. So an untimed warm-up copy goes first, and both timed runs find every block
    // stored (what they measure is then the per-object work: requests, checks, metadata),
    // instead of the second run being favoured.
    if env_or("BENCH_WARMUP", 1) == 1 {
        run_rclone("warmup");
    }
    let (rclone_took, fediedge_took) = if env_or("BENCH_FEDIEDGE_FIRST", 0) == 1 {
        let f = run_fediedge();
        (run_rclone("rclone"), f)
    } else {
        let r = run_rclone("rclone");
        (r, run_fediedge())
    };

    for bucket in ["rclone", "fediedge"] {
        let (count, bytes) = bucket_count(&g, bucket);
        assert_eq!(
            (count, bytes),
            (files as u64, total),
            "bucket {bucket} is incomplete"
        );
    }
    let rate = |took: Duration| {
        (
            files as f64 / took.as_secs_f64(),
            total as f64 / 1e6 / took.as_secs_f64(),
        )
    };
    let (rf, rm) = rate(rclone_took);
    let (ff, fm) = rate(fediedge_took);
    println!("files={files} bytes={total} concurrency={concurrency}");
    println!(
        "rclone copy      {:>7.2}s  {rf:>8.1} files/s  {rm:>7.1} MB/s",
        rclone_took.as_secs_f64()
    );
    println!(
        "fediedge migrate {:>7.2}s  {ff:>8.1} files/s  {fm:>7.1} MB/s",
        fediedge_took.as_secs_f64()
    );
    println!("ratio fediedge/rclone: {:.2}x (files/s)", ff / rf);
}
