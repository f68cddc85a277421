#!/usr/bin/env bash
# The full test suite: the README's second command, and what CI runs.
#
# Installs nothing today: every test runs on what `cargo` builds. Tests that
# need a server (redis-server from issue #6 on) install it here through
# apt-get when it is missing, so this stays the one command.
set -euo pipefail
cd "$(dirname "$0")/.."

# Reuse a build directory outside the clone when one exists; cargo creates it
# otherwise, so nothing depends on it being there.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME}/.cache/recmesh/target}"

cargo test --workspace --locked "$@"
