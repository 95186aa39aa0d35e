#!/usr/bin/env bash
# Runs every test of fediedge: unit tests and the integration tests against real files, real
# HTTP origins, a real Garage node (installed here when missing, then reused), and a real
# redis-server and Sidekiq (Debian packages, installed when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-garage.sh
bash scripts/install-test-deps.sh
export GARAGE_BIN="${CARGO_HOME:-$HOME/.cargo}/bin/garage"
cargo test --locked "$@"
