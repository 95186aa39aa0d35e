#!/usr/bin/env bash
# Installs cargo-deb, which the packaging test (tests/it/package.rs) runs to build the Debian
# package, into the user's cargo home. An installed cargo-deb is reused; CI machines keep
# $CARGO_HOME between runs, so only a fresh machine pays for the build (a few minutes).
set -euo pipefail

# Pinned: the packaging test packs the debug binary (`--profile dev`), which newer cargo-deb
# releases say they will refuse.
CARGO_DEB_VERSION="${CARGO_DEB_VERSION:-3.8.0}"
CARGO_HOME="${CARGO_HOME:-$HOME/.cargo}"
bin="$CARGO_HOME/bin/cargo-deb"

if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -qx "cargo-deb ${CARGO_DEB_VERSION}"; then
  echo "$("$bin" --version) already installed at $bin"
  exit 0
fi

echo "building cargo-deb ${CARGO_DEB_VERSION} with cargo (once; cached afterwards)"
cargo install cargo-deb --version "${CARGO_DEB_VERSION}" --locked
"$bin" --version
