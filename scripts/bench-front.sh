#!/usr/bin/env bash
# The front-door benchmark (issue 8 §8): fediedge vs nginx over TLS (4 KiB over HTTP/1.1 and
# HTTP/2, 1 MiB) and as a reverse proxy to a fast upstream (req/s and p99), side by side; and
# (issue 9 §7) a cached ~10 KB API response: fediedge [core.cache] vs nginx proxy_cache and
# Varnish.
#
#   scripts/bench-front.sh           # install nginx, h2load, wrk, varnish if missing, build, run
#   FRONT_BENCH_ONLY=api scripts/bench-front.sh     # only the cached API measurement
#
# Environment knobs (passed through to the program): FRONT_BENCH_SECS (default 5),
# FRONT_BENCH_ROUNDS (default 3), FRONT_BENCH_CLIENT_THREADS (default 1),
# FRONT_BENCH_STRICT=1 (exit 1 if a target is missed), FRONT_BENCH_ONLY (comma-separated subset
# of tls-small-h1,tls-small-h2,tls-large,proxy,api; default all). Method: docs/benchmarks.md.
set -euo pipefail

cd "$(dirname "$0")/.."

sudo_if_needed() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v h2load >/dev/null 2>&1 || missing+=(nghttp2-client)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v varnishd >/dev/null 2>&1 || [ -x /usr/sbin/varnishd ] || missing+=(varnish)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "bench-front: installing ${missing[*]}" >&2
    if ! ls /var/lib/apt/lists/*_Packages >/dev/null 2>&1; then
        sudo_if_needed apt-get update
    fi
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" ||
        { sudo_if_needed apt-get update && sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"; }
    # Debian's packages may start their system services; the benchmark runs its own copies on
    # free loopback ports and must not leave anything running.
    for svc in nginx varnish varnishncsa; do
        sudo_if_needed service "$svc" stop >/dev/null 2>&1 || true
        if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
            sudo_if_needed systemctl disable --now "$svc" >/dev/null 2>&1 || true
        fi
    done
fi

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo build --release
# `cargo bench` builds the bench program (release profile) and runs it; it also sets the path
# of the fediedge binary the program starts.
exec cargo bench --bench front
