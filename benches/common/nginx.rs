//! What the benchmark programs' nginx servers share: the top of the config (workers, logs,
//! limits, temp paths, keep-alive to clients), Mastodon's proxy headers, and starting nginx on
//! a generated config after `nginx -t` accepts it.
// Each benchmark program uses what it needs of this module.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use anyhow::bail;

use super::process::{is_root, spawn, Proc};

/// The config from its first line to the `http` block's shared settings (left open: the
/// caller adds its own settings, upstreams and servers, and closes it). `dir` holds the pid,
/// the logs and `tmp/`.
pub fn config_head(dir: &Path, workers: usize) -> String {
    let user = if is_root() { "user root root;" } else { "" };
    let d = dir.display();
    format!(
        r#"{user}
worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
worker_rlimit_nofile 65536;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  tcp_nodelay on;
  keepalive_timeout 65;
  keepalive_requests 1000000;
  client_body_temp_path {d}/tmp/client;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fastcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
"#
    )
}

/// Mastodon's `dist/nginx.conf` proxy settings to puma: HTTP/1.1 keep-alive and its headers.
pub const MASTODON_PROXY: &str = r#"      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      proxy_set_header X-Real-IP $remote_addr;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Forwarded-Proto $scheme;
      proxy_set_header Proxy "";
      proxy_pass_header Server;
      proxy_buffering on;
      proxy_redirect off;
"#;

/// Writes `config` to `dir/nginx.conf`, checks it with `nginx -t` and starts nginx on it in
/// the foreground (its output in `dir/nginx.out`).
pub fn start(bin: &Path, dir: &Path, config: &str) -> anyhow::Result<Proc> {
    let path = dir.join("nginx.conf");
    std::fs::write(&path, config)?;
    let command = || {
        let mut cmd = Command::new(bin);
        cmd.arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&path)
            .arg("-e")
            .arg(dir.join("logs/error.log"));
        cmd
    };
    let check = command().arg("-t").output()?;
    if !check.status.success() {
        bail!(
            "nginx -t refused the generated config: {}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
    let mut cmd = command();
    cmd.args(["-g", "daemon off;"]);
    spawn(cmd, dir.join("nginx.out"))
}
