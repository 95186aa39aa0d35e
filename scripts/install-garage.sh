#!/usr/bin/env bash
# Installs the Garage binary the S3 integration tests run against, into the user's cargo home.
# The build takes a long while on a small machine, so an existing binary of the pinned version
# is reused; CI machines keep $CARGO_HOME between runs.
set -euo pipefail

GARAGE_VERSION="${GARAGE_VERSION:-2.5.0}"
CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}"
bin="$CARGO_HOME/bin/garage"

if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "v${GARAGE_VERSION}"; then
  echo "garage ${GARAGE_VERSION} already installed at $bin"
  exit 0
fi

echo "building garage ${GARAGE_VERSION} with cargo (slow the first time; cached afterwards)"
# sqlite with bundled C libraries: no system packages needed, and the smallest feature set
# that gives a working single-node server for tests.
cargo install garage --version "${GARAGE_VERSION}" --locked \
  --no-default-features --features bundled-libs,sqlite
"$bin" --version
