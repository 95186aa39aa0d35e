#!/usr/bin/env bash
# The edge benchmark (issue 2 §13): fediedge vs nginx (proxy_cache + proxy_cache_lock) and
# Varnish, side by side on this machine against one in-process origin.
#
#   scripts/bench-edge.sh            # install nginx/varnish if missing, build, run, print report
#
# Environment knobs (passed through to the program): EDGE_BENCH_SECS (default 5),
# EDGE_BENCH_ROUNDS (default 5), EDGE_BENCH_SERVERS (default fediedge,nginx,varnish),
# EDGE_BENCH_RSS_CLIENTS (default 1000), EDGE_BENCH_STRICT=1 (exit 1 if a target is missed).
# Results and method: docs/benchmarks.md.
set -euo pipefail

cd "$(dirname "$0")/.."

sudo_if_needed() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v varnishd >/dev/null 2>&1 || [ -x /usr/sbin/varnishd ] || missing+=(varnish)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "bench-edge: installing ${missing[*]}" >&2
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

# 1,000 concurrent clients need file descriptors on both sides of loopback.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo build --release
# `cargo bench` builds the bench program (release profile) and runs it; it also sets the path
# of the fediedge binary the program starts.
exec cargo bench --bench edge
