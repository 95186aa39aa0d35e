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

# shellcheck source=scripts/bench-tools.sh
. scripts/bench-tools.sh
bench_tools bench-edge nginx:nginx varnishd:varnish

# 1,000 concurrent clients need file descriptors on both sides of loopback.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

cargo build --release
# `cargo bench` builds the bench program (release profile) and runs it; it also sets the path
# of the fediedge binary the program starts.
exec cargo bench --bench edge
