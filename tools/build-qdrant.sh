#!/usr/bin/env bash
# Builds a real Qdrant server from source into ~/.cache/recmesh/tools/qdrant,
# for the `qdrant` ANN backend's tests (libs/vector/tests/contract.rs and the
# e2e Recommend with ann.backend = "qdrant"), which use it when it is there
# and say plainly when they skip.
#
#   bash tools/build-qdrant.sh QDRANT_SRC RAFT_RS_SRC
#
# The release: v1.18.3, the newest whose `rust-version` (1.94) fits the
# Rust 1.95 here (v1.19.0 asks for 1.97).
#
# Qdrant publishes no server binary to the registries these machines reach,
# and GitHub is not reachable from them: QDRANT_SRC and RAFT_RS_SRC are
# clones (or bare mirrors) of https://github.com/qdrant/qdrant and
# https://github.com/tikv/raft-rs, e.g. the search tool's `fetch` snapshots
# under /work/.mirror. Qdrant's two git dependencies are replaced by local
# sources: raft-rs at the commit Qdrant pins, and Qdrant's tonic fork
# (branch v0.14.6-qdrant, not in any snapshot here) by crates.io tonic 0.14.6
# with the one change Qdrant's code calls, the fork's commit 37718d9
# (`Endpoint::http2_max_local_error_reset_streams`), applied below.
# Needs `protoc` and the protobuf well-known types (apt-get protobuf-compiler
# libprotobuf-dev; installed when missing). About 900 crates: most
# of an hour on 2 cores.
set -euo pipefail

tag="v1.18.3"
raft_rev="aafb07c7bab439c6139926a77dfafc5b10e9bc84"
tools="${HOME}/.cache/recmesh/tools/qdrant"
work="${HOME}/.cache/recmesh/src"
src="$work/qdrant-${tag}"

if [ -x "$tools/qdrant" ] && grep -q "^$tag " "$tools/VERSION" 2>/dev/null; then
    echo "qdrant ${tag} already at $tools/qdrant"
    exit 0
fi
if [ $# -lt 2 ]; then
    echo "usage: $0 QDRANT_SRC RAFT_RS_SRC (clones of qdrant/qdrant and tikv/raft-rs)" >&2
    exit 2
fi

# protoc and the well-known types (google/protobuf/*.proto) the protos import.
if ! command -v protoc >/dev/null 2>&1 || [ ! -f /usr/include/google/protobuf/duration.proto ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        protobuf-compiler libprotobuf-dev >/dev/null
fi

checkout() { # origin rev dir
    if [ ! -d "$3" ]; then
        local tmp
        tmp=$(mktemp -d)
        git clone --quiet --no-checkout "$1" "$tmp/repo"
        git -C "$tmp/repo" -c advice.detachedHead=false checkout --quiet "$2"
        mkdir -p "$(dirname "$3")"
        mv "$tmp/repo" "$3"
        rm -rf "$tmp"
    fi
}
checkout "$1" "$tag" "$src"
checkout "$2" "$raft_rev" "$work/raft-rs-${raft_rev:0:12}"

# tonic 0.14.6 from crates.io, with the fork's change.
tonic="$work/tonic-0.14.6-qdrant"
if [ ! -d "$tonic" ]; then
    fetchdir=$(mktemp -d)
    mkdir -p "$fetchdir/src"
    printf '[package]\nname = "fetch"\nversion = "0.0.0"\nedition = "2021"\n[dependencies]\ntonic = { version = "=0.14.6", default-features = false }\n' > "$fetchdir/Cargo.toml"
    echo 'fn main() {}' > "$fetchdir/src/main.rs"
    (cd "$fetchdir" && cargo fetch --quiet)
    registry=$(dirname "$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 2 -type d -name 'tonic-0.14.6' | head -1)")
    cp -r "$registry/tonic-0.14.6" "$tonic"
    rm -rf "$fetchdir"
    python3 - "$tonic" <<'PY'
import sys, pathlib
root = pathlib.Path(sys.argv[1]) / "src/transport/channel"
def edit(path, old, new, count):
    text = path.read_text()
    assert text.count(old) == count, (path, old, text.count(old))
    path.write_text(text.replace(old, new))
e = root / "endpoint.rs"
edit(e, "    pub(crate) http2_adaptive_window: Option<bool>,\n",
     "    pub(crate) http2_adaptive_window: Option<bool>,\n"
     "    pub(crate) http2_max_local_error_reset_streams: Option<Option<usize>>,\n", 1)
edit(e, "            http2_adaptive_window: None,\n",
     "            http2_adaptive_window: None,\n"
     "            http2_max_local_error_reset_streams: None,\n", 2)
edit(e, "    /// Sets the `SETTINGS_HEADER_TABLE_SIZE` option for HTTP2 connections.\n",
     "    /// Sets the maximum number of local resets due to protocol errors made by the remote end.\n"
     "    /// Uses `hyper`'s default otherwise.\n"
     "    pub fn http2_max_local_error_reset_streams(self, max: Option<usize>) -> Self {\n"
     "        Endpoint {\n"
     "            http2_max_local_error_reset_streams: Some(max),\n"
     "            ..self\n"
     "        }\n"
     "    }\n\n"
     "    /// Sets the `SETTINGS_HEADER_TABLE_SIZE` option for HTTP2 connections.\n", 1)
c = root / "service/connection.rs"
edit(c, "        if let Some(val) = endpoint.http2_adaptive_window {\n            settings.adaptive_window(val);\n        }\n",
     "        if let Some(val) = endpoint.http2_adaptive_window {\n            settings.adaptive_window(val);\n        }\n\n"
     "        if let Some(val) = endpoint.http2_max_local_error_reset_streams {\n"
     "            settings.max_local_error_reset_streams(val);\n        }\n", 1)
PY
fi

# Point Qdrant's git dependencies at the local sources (its Cargo.lock then
# changes only in those three entries): the tonic patch, and raft-rs (raft
# at its root, raft-proto in proto/).
raft="$work/raft-rs-${raft_rev:0:12}"
python3 - "$src/Cargo.toml" "$tonic" "$raft" "$raft_rev" <<'PY'
import sys, pathlib
path, tonic, raft, rev = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
text = path.read_text()
for old, new in [
    ('tonic = { git = "https://github.com/qdrant/tonic", branch = "v0.14.6-qdrant" }',
     f'tonic = {{ path = "{tonic}" }}'),
    (f'raft-proto = {{ git = "https://github.com/tikv/raft-rs", rev = "{rev}"',
     f'raft-proto = {{ path = "{raft}/proto"'),
    (f'raft = {{ git = "https://github.com/tikv/raft-rs", rev = "{rev}"',
     f'raft = {{ path = "{raft}"'),
]:
    if old in text:
        text = text.replace(old, new)
    else:
        assert new in text, f"Cargo.toml: neither {old!r} nor {new!r}"
path.write_text(text)
PY

commit=$(git -C "$src" rev-parse HEAD)
# The api crate stamps the commit into the binary.
export GIT_COMMIT_ID="$commit"
(cd "$src" && cargo build --release --bin qdrant)
mkdir -p "$tools"
cp "$src/target/release/qdrant" "$tools/qdrant"
echo "$tag $commit" > "$tools/VERSION"
echo "qdrant ${tag} (${commit}) at $tools/qdrant"
