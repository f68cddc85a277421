#!/usr/bin/env bash
# Fetches MovieLens-100k as RecBole atomic files from the `recbole==1.2.1`
# wheel on PyPI into data/ml-100k/ (git-ignored; never committed).
set -euo pipefail
cd "$(dirname "$0")/../../.."
out=data/ml-100k
if [ -f "$out/ml-100k.inter" ]; then
  echo "already there: $out"
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --dest "$tmp" recbole==1.2.1
mkdir -p "$out"
python3 - "$tmp" "$out" <<'PY'
import glob, os, sys, zipfile
tmp, out = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "recbole-*.whl"))[0])
for name in ("ml-100k.inter", "ml-100k.item", "ml-100k.user"):
    with open(os.path.join(out, name), "wb") as f:
        f.write(wheel.read("recbole/dataset_example/ml-100k/" + name))
PY
echo "wrote $out: $(wc -l < "$out/ml-100k.inter") interaction lines"
