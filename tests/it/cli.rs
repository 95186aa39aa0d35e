//! The real binary: the embedded default and config refusals.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_fediedge");

#[test]
fn serve_refuses_a_bad_config_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (text, key) in [
        ("listne = \"127.0.0.1:1\"\n", "listne"),
        ("[cache]\nmax_size = \"lots\"\n", "max_size"),
        (
            "[[fallback]]\ntype = \"http\"\nurl = \"old-host/system/\"\n",
            "fallback[0].url",
        ),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{text}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{text:?}: {err}");
    }
}

/// `fediedge serve` with no flags serves `./var/media` at 127.0.0.1:8080/system/.
#[test]
fn serve_with_no_flags_runs_the_embedded_default() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("var/media/accounts")).unwrap();
    std::fs::write(dir.path().join("var/media/accounts/hello.txt"), "hello").unwrap();
    let mut child = Command::new(BIN)
        .arg("serve")
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let body = loop {
        match http::blocking_get("http://127.0.0.1:8080/system/accounts/hello.txt") {
            Ok(body) => break body,
            Err(e) if started.elapsed() > Duration::from_secs(15) => {
                let _ = child.kill();
                panic!("embedded default did not answer: {e}");
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(body, "hello");
    assert!(
        dir.path().join("var/ledger.sqlite").exists(),
        "data lives in ./var"
    );
}

mod http {
    /// A blocking GET without pulling reqwest's blocking feature: a tiny runtime per call.
    pub fn blocking_get(url: &str) -> Result<String, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let r = ::reqwest::get(url).await.map_err(|e| e.to_string())?;
            if !r.status().is_success() {
                return Err(format!("status {}", r.status()));
            }
            r.text().await.map_err(|e| e.to_string())
        })
    }
}
