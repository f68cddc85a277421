#!/usr/bin/env bash
# The full test suite: the README's second command, and what CI runs.
#
# The Redis tests run against a real `redis-server` (started by the tests on
# free ports, with their own data directories). Everything the tests need is
# installed here when missing, so this stays the one command.
set -euo pipefail
cd "$(dirname "$0")/.."

# Reuse a build directory outside the clone when one exists; cargo creates it
# otherwise, so nothing depends on it being there.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME}/.cache/recmesh/target}"

# Servers and tools the tests run for real, installed through apt-get when
# missing: redis-server (features and experiments on Redis), promtool (the
# metrics exposition check), kubectl (renders k8s/ with kustomize).
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v kubectl >/dev/null 2>&1 || need+=(kubernetes-client)
if [ "${#need[@]}" -gt 0 ]; then
    echo "tests: installing ${need[*]} with apt-get" >&2
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
        || { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
fi

# The fault suite (tests/faults.rs) runs the service binaries as processes.
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
