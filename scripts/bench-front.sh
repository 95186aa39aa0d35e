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

# shellcheck source=scripts/bench-tools.sh
. scripts/bench-tools.sh
bench_tools bench-front nginx:nginx h2load:nghttp2-client wrk:wrk varnishd:varnish

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo build --release
# `cargo bench` builds the bench program (release profile) and runs it; it also sets the path
# of the fediedge binary the program starts.
exec cargo bench --bench front
