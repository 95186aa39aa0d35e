#!/usr/bin/env bash
# Runs every test of fediedge: unit tests and the integration tests against real files, real
# HTTP origins and a real Garage node (installed here when missing, then reused).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-garage.sh
export GARAGE_BIN="${CARGO_HOME:-$HOME/.cargo}/bin/garage"
cargo test --locked "$@"
