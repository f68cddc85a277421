#!/usr/bin/env bash
# The full test suite: the README's second command, and what CI runs.
#
# The Redis tests run against a real `redis-server` (started by the tests on
# free ports, with their own data directories); it is installed here through
# apt-get when missing, so this stays the one command.
set -euo pipefail
cd "$(dirname "$0")/.."

# Reuse a build directory outside the clone when one exists; cargo creates it
# otherwise, so nothing depends on it being there.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME}/.cache/recmesh/target}"

if ! command -v redis-server >/dev/null 2>&1; then
    echo "tests: redis-server not found; installing it with apt-get" >&2
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -qq redis-server >/dev/null \
        || { $sudo apt-get update -qq && $sudo apt-get install -y -qq redis-server >/dev/null; }
fi

cargo test --workspace --locked "$@"
