#!/usr/bin/env python3
"""Converts a recmesh dataset directory (items.tsv, interactions.tsv) into
items.parquet and interactions.parquet with pandas + pyarrow (Snappy, the
pandas defaults), for `recmesh-trainer ... --parquet DIR`.

    python3 services/trainer/scripts/to-parquet.py IN_DIR OUT_DIR

Needs `pip install pandas pyarrow`. Used to check the trainer's Parquet
reader against files another tool wrote (docs/evaluation.md).
"""
import os
import sys

import pandas as pd


def main() -> None:
    src, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    items = pd.read_csv(
        os.path.join(src, "items.tsv"), sep="\t", keep_default_na=False,
        dtype={"item_id": str, "category": str, "brand": str, "title": str},
    )
    items["in_stock"] = items["in_stock"].astype(bool)
    items["promoted"] = items["promoted"].astype(bool)
    items.to_parquet(os.path.join(out, "items.parquet"), index=False, row_group_size=2000)
    inter = pd.read_csv(
        os.path.join(src, "interactions.tsv"), sep="\t",
        dtype={"user_id": str, "item_id": str, "event": str},
    )
    inter.to_parquet(os.path.join(out, "interactions.parquet"), index=False, row_group_size=50_000)
    print(f"{len(items)} items, {len(inter)} interactions -> {out}")


if __name__ == "__main__":
    main()
