#!/usr/bin/env bash
# fediedge migrate vs rclone copy: same directory, same Garage node, same concurrency.
# Usage: bash scripts/bench-migrate.sh        (BENCH_FILES=2000 BENCH_CONCURRENCY=8 by default)
# Installs rclone (Debian package) and Garage when missing, then runs the release-built bench.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v rclone >/dev/null 2>&1; then
    echo "installing rclone (apt)" >&2
    apt-get update -qq
    apt-get install -y -qq rclone >/dev/null
fi
if [ -z "${GARAGE_BIN:-}" ] && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/garage" ]; then
    bash scripts/install-garage.sh
fi

export BENCH_FILES="${BENCH_FILES:-2000}"
export BENCH_CONCURRENCY="${BENCH_CONCURRENCY:-8}"
echo "rclone: $(rclone version | head -1)" >&2
cargo bench --bench migrate
