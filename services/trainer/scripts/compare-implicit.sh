#!/usr/bin/env bash
# recmesh beside the `implicit` library (ALS, BPR, ItemKNN) and EASE on
# exactly the same split and metric code, on MovieLens-100k (recmesh's
# served pipeline in process and through the real Recommend RPC, `eval
# --grpc`); then ALS training time at
# equal factors, iterations and threads on MovieLens-100k and on a synthetic
# set of 1M interactions. Installs implicit from PyPI when missing.
set -euo pipefail
# implicit asks for single-threaded BLAS (it parallelises itself).
export OPENBLAS_NUM_THREADS=1
cd "$(dirname "$0")/../../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME}/.cache/recmesh/target}"
bash services/trainer/scripts/fetch-movielens.sh
cargo build --release -q -p recmesh-trainer -p recmesh
T="$CARGO_TARGET_DIR/release/recmesh-trainer"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
threads=$(nproc)

echo "== MovieLens-100k, per-user temporal split: recmesh (in process, and over gRPC)"
"$T" eval --recbole data/ml-100k --grpc 2>/dev/null
echo "== the same split: implicit, EASE (lambda tuned on validation)"
"$T" export-split --recbole data/ml-100k --out "$work/ml"
python3 services/trainer/scripts/peers.py "$work/ml" "$work/ml-lists" --threads "$threads"
python3 services/trainer/scripts/ease.py "$work/ml" "$work/ml-lists"
"$T" score-lists --recbole data/ml-100k --lists "$work"/ml-lists/*.tsv 2>/dev/null

echo "== ALS training time, 64 factors, 15 iterations, $threads threads"
"$T" als-time --recbole data/ml-100k --threads "$threads"
python3 services/trainer/scripts/peers.py "$work/ml" "$work/none" --threads "$threads" --only-als
"$T" export-split --demo-items 50000 --demo-users 20000 --demo-interactions 1000000 --out "$work/big"
"$T" als-time --demo-items 50000 --demo-users 20000 --demo-interactions 1000000 --threads "$threads"
python3 services/trainer/scripts/peers.py "$work/big" "$work/none" --threads "$threads" --only-als
