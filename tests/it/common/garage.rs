//! A real single-node Garage started for one test, in a temp dir, on free loopback ports.
//! It is killed when the [`Garage`] is dropped.
//!
//! The binary is `$GARAGE_BIN`, else `garage` from the cargo home (installed by
//! `scripts/install-garage.sh`, which the test command runs). A missing binary fails the test:
//! an S3 test that silently skips would count as passing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running Garage node with one bucket and one key allowed on it.
pub struct Garage {
    child: Child,
    _dir: tempfile::TempDir,
    /// S3 API endpoint, e.g. `http://127.0.0.1:39012`.
    pub endpoint: String,
    /// The bucket created for the test.
    pub bucket: String,
    /// Access key id.
    pub key_id: String,
    /// Secret key.
    pub secret: String,
    config: PathBuf,
    bin: PathBuf,
}

/// A port nobody listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The Garage binary (see the module doc); panics when it is missing.
pub fn garage_bin() -> PathBuf {
    if let Ok(p) = std::env::var("GARAGE_BIN") {
        return p.into();
    }
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"));
    let bin = home.join("bin/garage");
    assert!(
        bin.exists(),
        "garage not found at {}: run `bash scripts/install-garage.sh` (the README's test command does)",
        bin.display()
    );
    bin
}

impl Garage {
    /// Starts a node and creates bucket `media` with a read/write key.
    pub fn start() -> Garage {
        let bin = garage_bin();
        let dir = tempfile::tempdir().unwrap();
        let secret: String = (0..32).map(|i| format!("{:02x}", (i * 37) % 256)).collect();
        let NodeConfig {
            path: config, s3, ..
        } = write_node_config(dir.path(), 1, &secret);
        let log = std::fs::File::create(dir.path().join("garage.log")).unwrap();
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&config)
            .arg("server")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start garage");
        let mut g = Garage {
            child,
            _dir: dir,
            endpoint: format!("http://127.0.0.1:{s3}"),
            bucket: "media".into(),
            key_id: String::new(),
            secret: String::new(),
            config,
            bin,
        };
        // `node id` only reads the key file; `status` needs the RPC server up.
        let started = Instant::now();
        while let Err(e) = g.cli(&["status"]) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "garage did not start: {e}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let node = g
            .cli(&["node", "id", "-q"])
            .unwrap()
            .trim()
            .split('@')
            .next()
            .unwrap()
            .to_owned();
        g.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", &node])
            .unwrap();
        g.cli(&["layout", "apply", "--version", "1"]).unwrap();
        (g.key_id, g.secret) = create_key_and_bucket(|args| g.cli(args));
        g
    }

    /// Creates another bucket that the test key may read and write; returns its store TOML.
    pub fn add_bucket(&self, name: &str) -> String {
        create_bucket(|args| self.cli(args), name);
        self.store_toml()
            .replace("bucket = \"media\"", &format!("bucket = \"{name}\""))
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

    /// The `[primary]` (or fallback) TOML table body for this bucket.
    pub fn store_toml(&self) -> String {
        format!(
            "type = \"s3\"\nendpoint = \"{}\"\nbucket = \"{}\"\nregion = \"garage\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
            self.endpoint, self.bucket, self.key_id, self.secret
        )
    }
}

/// A node's config file and the ports it was given.
pub struct NodeConfig {
    /// The config file.
    pub path: PathBuf,
    /// S3 API port.
    pub s3: u16,
    /// Admin API port.
    pub admin: u16,
}

/// Writes `dir/garage.toml` for one node on free loopback ports (data and metadata in `dir`).
pub fn write_node_config(dir: &Path, replication_factor: u8, rpc_secret: &str) -> NodeConfig {
    let (rpc, s3, admin) = (free_port(), free_port(), free_port());
    let path = dir.join("garage.toml");
    std::fs::write(
        &path,
        format!(
            r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
replication_factor = {replication_factor}
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "{rpc_secret}"
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
    .unwrap();
    NodeConfig { path, s3, admin }
}

/// Creates key `fediedge-test` and bucket `media` it may read and write, through `cli`
/// (`garage` with a node's config); returns the key id and secret.
pub fn create_key_and_bucket(cli: impl Fn(&[&str]) -> Result<String, String>) -> (String, String) {
    let out = cli(&["key", "create", "fediedge-test"]).unwrap();
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {name} in: {out}"))
    };
    let key = (field("Key ID:"), field("Secret key:"));
    create_bucket(cli, "media");
    key
}

/// Creates bucket `name` that key `fediedge-test` may read and write.
pub fn create_bucket(cli: impl Fn(&[&str]) -> Result<String, String>, name: &str) {
    cli(&["bucket", "create", name]).unwrap();
    cli(&[
        "bucket",
        "allow",
        "--read",
        "--write",
        "--owner",
        name,
        "--key",
        "fediedge-test",
    ])
    .unwrap();
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
