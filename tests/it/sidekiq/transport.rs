//! The ways to reach Redis besides a plain URL: `rediss://` (TLS) and Sentinel, through the
//! real binary.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::fill::{Filler, Sidekiq};
use super::server::{free_port, RedisServer};

const BIN: &str = env!("CARGO_BIN_EXE_fediedge");

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (scripts/install-test-deps.sh installs it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a server certificate for 127.0.0.1, in `dir`.
fn certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        dir,
        &[
            &["req", "-x509"],
            &ec[..],
            &[
                "-days",
                "2",
                "-subj",
                "/CN=fediedge-test-ca",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
            ],
        ]
        .concat(),
    );
    openssl(
        dir,
        &[
            &["req"],
            &ec[..],
            &[
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                "srv.key",
                "-out",
                "srv.csr",
            ],
        ]
        .concat(),
    );
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "srv.pem",
        ],
    );
}

fn json(out: std::process::Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{e}: {text}\n{}", String::from_utf8_lossy(&out.stderr)))
}

/// `rediss://`: the monitor verifies the server's certificate against the CA the system
/// trusts (here `SSL_CERT_FILE`) and reads over TLS.
#[tokio::test]
async fn rediss_reads_over_tls() {
    let certs = tempfile::tempdir().unwrap();
    certificates(certs.path());
    let tls_port = free_port();
    let c = |f: &str| certs.path().join(f).display().to_string();
    let redis = RedisServer::spawn(Some("tls-pass-Q7"), &|port, _| {
        [
            "--port",
            &port.to_string(),
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &c("srv.pem"),
            "--tls-key-file",
            &c("srv.key"),
            "--tls-ca-cert-file",
            &c("ca.pem"),
            "--tls-auth-clients",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    });
    let mut f = Filler::new(redis.connection().await, None);
    f.push(Sidekiq::V8_1, "push", 30.0).await;
    f.heartbeat(Sidekiq::V8_1, "tls", 1, &["push"], 4, 1).await;

    let url = format!("rediss://:tls-pass-Q7@127.0.0.1:{tls_port}/0");
    let out = Command::new(BIN)
        .args(["queues", "--format", "json", "--redis", &url])
        .env("SSL_CERT_FILE", c("ca.pem"))
        .output()
        .unwrap();
    let v = json(out);
    assert_eq!(v["processes"][0]["hostname"], "tls");
    let push = v["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "push")
        .unwrap();
    assert_eq!(push["size"], 1);

    // Without the CA the certificate is refused: an error, not a silent plain connection.
    let out = Command::new(BIN)
        .args(["queues", "--redis", &url])
        .env("SSL_CERT_FILE", c("srv.csr"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("error") && !err.contains("tls-pass-Q7"),
        "{err}"
    );
}

/// Sentinel: the monitor asks a real sentinel for the master `mymaster` and reads it, with
/// the master's password, as Mastodon's `SIDEKIQ_REDIS_SENTINEL*` settings do; sentinels
/// without a password, with the master's, and with their own.
#[tokio::test]
async fn sentinel_finds_the_master() {
    let master = RedisServer::start_with(Some("master-pw-K2"), &[]);
    let mut f = Filler::new(master.connection().await, None);
    f.push(Sidekiq::V7_3, "mailers", 5.0).await;
    f.heartbeat(Sidekiq::V7_3, "behind-sentinel", 9, &["mailers"], 2, 0)
        .await;
    let master_port = master.port;
    let start_sentinel = |password: Option<&str>| {
        RedisServer::spawn(password, &|port, dir| {
            let conf = dir.join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "sentinel monitor mymaster 127.0.0.1 {master_port} 1\n\
                     sentinel auth-pass mymaster master-pw-K2\n"
                ),
            )
            .unwrap();
            vec![
                conf.display().to_string(),
                "--sentinel".into(),
                "--port".into(),
                port.to_string(),
            ]
        })
    };
    let read = |sentinel_port: u16, extra: &str| {
        let env = master.dir().join(".env.production");
        std::fs::write(
            &env,
            format!(
                "SIDEKIQ_REDIS_SENTINEL_MASTER=mymaster\nSIDEKIQ_REDIS_SENTINELS=127.0.0.1:{sentinel_port}\n\
                 SIDEKIQ_REDIS_PASSWORD=master-pw-K2\n{extra}"
            ),
        )
        .unwrap();
        let out = Command::new(BIN)
            .args(["queues", "--format", "json", "--mastodon-env"])
            .arg(&env)
            .output()
            .unwrap();
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !all.contains("master-pw-K2") && !all.contains("sentinel-pw-R5"),
            "{all}"
        );
        json(out)
    };

    // A sentinel without a password (Mastodon ≤ 4.3 sent none).
    let open = start_sentinel(None);
    let v = read(open.port, "");
    assert_eq!(v["processes"][0]["hostname"], "behind-sentinel");

    // A sentinel with the master's password, which Mastodon 4.4+ sends by default.
    let same = start_sentinel(Some("master-pw-K2"));
    let v = read(same.port, "");
    assert_eq!(v["processes"][0]["hostname"], "behind-sentinel");

    // A sentinel with its own password, given as SIDEKIQ_REDIS_SENTINEL_PASSWORD.
    let own = start_sentinel(Some("sentinel-pw-R5"));
    let v = read(own.port, "SIDEKIQ_REDIS_SENTINEL_PASSWORD=sentinel-pw-R5\n");
    assert_eq!(v["processes"][0]["hostname"], "behind-sentinel");
}
