#!/usr/bin/env bash
# Installs the Debian packages the integration tests run against, when they are missing:
# redis-server (the Sidekiq monitor's tests start their own, on a free port, also with TLS and
# as a sentinel), ruby-sidekiq (a real Sidekiq 6 that writes its own data into that Redis) and
# openssl (test certificates for rediss://), chromium + chromium-driver (the status page is
# tested in a real headless browser over WebDriver), prometheus (promtool checks the alert
# rules shipped in dist/), and nodejs, npm and curl for the RFC 9111 suite
# (scripts/cache-tests.sh, run by scripts/test.sh against fediedge), e2fsprogs and mount (an
# ext4 image loop-mounted by the disk tests).
set -euo pipefail

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v sidekiq >/dev/null 2>&1 || missing+=(ruby-sidekiq)
command -v ruby >/dev/null 2>&1 || missing+=(ruby)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
command -v curl >/dev/null 2>&1 || missing+=(curl)
# tests/it/disk_midbody.rs makes an ext4 image (e2fsprogs) and loop-mounts it (mount).
command -v mkfs.ext4 >/dev/null 2>&1 || missing+=(e2fsprogs)
command -v losetup >/dev/null 2>&1 || missing+=(mount)
# Mastodon ≤ 4.3 ran Sidekiq under redis-namespace; the real-Sidekiq test does too.
ruby -e 'require "redis/namespace"' >/dev/null 2>&1 || missing+=(ruby-redis-namespace)

if [ ${#missing[@]} -eq 0 ]; then
  echo "test packages already installed (redis-server, ruby-sidekiq, ruby-redis-namespace, openssl, chromium, chromium-driver, prometheus, nodejs, npm, curl, e2fsprogs, mount)"
  exit 0
fi

echo "installing ${missing[*]} with apt-get"
sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
$sudo apt-get update -q
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
# The package starts a system Redis where systemd runs; the tests never use it.
redis-server --version
