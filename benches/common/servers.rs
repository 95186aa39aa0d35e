//! Starting the servers the benchmark programs compare, on a generated config: fediedge,
//! nginx (after `nginx -t` accepts it; with the config head and Mastodon's proxy settings the
//! nginx servers share) and Varnish.
// Each benchmark program uses what it needs of this module.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use anyhow::bail;

use super::process::{is_root, spawn, Proc};

/// The config from its first line to the `http` block's shared settings (left open: the
/// caller adds its own settings, upstreams and servers, and closes it). `dir` holds the pid,
/// the logs and `tmp/`.
pub fn nginx_config_head(dir: &Path, workers: usize) -> String {
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

/// Mastodon's `dist/nginx.conf` gzip settings (its `server` block), as fediedge's `[core]
/// gzip` default mirrors them: the benchmark clients send no `Accept-Encoding`, so neither
/// compresses, and both mark compressible answers `Vary: Accept-Encoding`.
pub const MASTODON_GZIP: &str = r#"      gzip on;
      gzip_vary on;
      gzip_proxied any;
      gzip_comp_level 6;
      gzip_buffers 16 8k;
      gzip_http_version 1.1;
      gzip_types text/plain text/css application/json application/javascript text/xml application/xml application/xml+rss text/javascript image/svg+xml image/x-icon;
"#;

/// Writes `config` to `dir/fediedge.toml` and starts `fediedge serve` on it (its log in
/// `dir/fediedge.log`, at the default level).
pub fn start_fediedge(bin: &Path, dir: &Path, config: &str) -> anyhow::Result<Proc> {
    let path = dir.join("fediedge.toml");
    std::fs::write(&path, config)?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .arg("--config")
        .arg(&path)
        .env_remove("RUST_LOG");
    spawn(cmd, dir.join("fediedge.log"))
}

/// Writes `vcl` to `dir/default.vcl` and starts varnishd in the foreground on `listen`
/// (working directory `dir/work`, 256 MiB of malloc storage, no jail; its output in
/// `dir/varnishd.log`).
pub fn start_varnishd(
    bin: &Path,
    dir: &Path,
    listen: SocketAddr,
    vcl: &str,
) -> anyhow::Result<Proc> {
    let workdir = dir.join("work");
    std::fs::create_dir_all(&workdir)?; // `dir` too
    let path = dir.join("default.vcl");
    std::fs::write(&path, vcl)?;
    let mut cmd = Command::new(bin);
    cmd.arg("-F")
        .arg("-n")
        .arg(&workdir)
        .arg("-a")
        .arg(listen.to_string())
        .arg("-T")
        .arg("127.0.0.1:0")
        .arg("-f")
        .arg(&path)
        .args(["-s", "malloc,256m", "-j", "none"]);
    spawn(cmd, dir.join("varnishd.log"))
}

/// Writes `config` to `dir/nginx.conf`, checks it with `nginx -t` and starts nginx on it in
/// the foreground (its output in `dir/nginx.out`).
pub fn start_nginx(bin: &Path, dir: &Path, config: &str) -> anyhow::Result<Proc> {
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
