#!/usr/bin/env bash
# Runs every test of fediedge: unit tests and the integration tests against real files, real
# HTTP origins, real Garage nodes (installed here when missing, then reused), a real
# redis-server and Sidekiq (Debian packages, installed when missing), and the Debian package
# build (cargo-deb, installed with cargo when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-garage.sh
bash scripts/install-test-deps.sh
bash scripts/install-cargo-deb.sh
export GARAGE_BIN="${CARGO_HOME:-$HOME/.cargo}/bin/garage"
cargo test --locked "$@"
