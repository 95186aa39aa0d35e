#!/usr/bin/env bash
# Runs every test of fediedge: unit tests and the integration tests against real files, real
# HTTP origins, real Garage nodes (installed here when missing, then reused), a real
# redis-server and Sidekiq (Debian packages, installed when missing), and the Debian package
# build (cargo-deb, installed with cargo when missing). Then the public RFC 9111 cache test
# suite against fediedge's core cache (scripts/cache-tests.sh; about 30 s): at least 150 of
# its 165 required tests must pass (158 at the time of writing; docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-garage.sh
bash scripts/install-test-deps.sh
bash scripts/install-cargo-deb.sh
export GARAGE_BIN="${CARGO_HOME:-$HOME/.cargo}/bin/garage"
cargo test --locked "$@"
CACHE_TESTS_TARGETS=fediedge CACHE_TESTS_MIN_REQUIRED=150 bash scripts/cache-tests.sh
