"""Runs the `implicit` library's ALS, BPR and ItemKNN on a split exported by
`recmesh-trainer export-split`, and writes their top-K lists for
`recmesh-trainer score-lists` (the same split, users and metric code as
recmesh's own evaluation). Prints each model's training time.

    bash services/trainer/scripts/compare-implicit.sh     # does all of it

Settings match recmesh's defaults where both have them: 64 factors, 15 ALS
iterations, regularisation 0.01, and the same number of threads.
"""

import argparse
import os
import subprocess
import sys
import time

try:
    import implicit  # noqa: F401
except ImportError:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "implicit==0.7.3"])

import numpy as np
import scipy.sparse as sp
from implicit.als import AlternatingLeastSquares
from implicit.bpr import BayesianPersonalizedRanking
from implicit.nearest_neighbours import BM25Recommender, CosineRecommender


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("split_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--factors", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only-als", action="store_true", help="time ALS only, write no lists")
    a = ap.parse_args()

    users, items, rows, cols, vals = {}, {}, [], [], []
    with open(os.path.join(a.split_dir, "train.tsv")) as f:
        next(f)
        for line in f:
            u, i, s = line.rstrip("\n").split("\t")
            r = users.setdefault(u, len(users))
            c = items.setdefault(i, len(items))
            rows.append(r)
            cols.append(c)
            vals.append(float(s))
    m = sp.coo_matrix((vals, (rows, cols)), shape=(len(users), len(items)), dtype=np.float32).tocsr()
    m.sum_duplicates()
    # Keep the strongest event of a (user, item), as recmesh does.
    m.data = np.minimum(m.data, 8.0).astype(np.float32)
    item_ids = {v: k for k, v in items.items()}
    with open(os.path.join(a.split_dir, "test_users.txt")) as f:
        test_users = [u for u in (line.strip() for line in f) if u in users]

    models = {
        "implicit-als": lambda: AlternatingLeastSquares(
            factors=a.factors, regularization=0.01, iterations=a.iterations,
            num_threads=a.threads, random_state=42, calculate_training_loss=False),
    }
    if not a.only_als:
        models.update({
            "implicit-bpr": lambda: BayesianPersonalizedRanking(
                factors=a.factors, iterations=100, num_threads=a.threads, random_state=42),
            "implicit-itemknn-cosine": lambda: CosineRecommender(K=50, num_threads=a.threads),
            "implicit-itemknn-bm25": lambda: BM25Recommender(K=50, num_threads=a.threads),
        })
    os.makedirs(a.out_dir, exist_ok=True)
    print(f"{m.shape[0]} users x {m.shape[1]} items, {m.nnz} non-zeros, {a.threads} threads")
    for name, make in models.items():
        model = make()
        started = time.perf_counter()
        model.fit(m, show_progress=False)
        seconds = time.perf_counter() - started
        print(f"{name}: fit {seconds:.2f}s")
        if a.only_als:
            continue
        uids = np.array([users[u] for u in test_users])
        ids, _ = model.recommend(uids, m[uids], N=a.k, filter_already_liked_items=True)
        with open(os.path.join(a.out_dir, name + ".tsv"), "w") as f:
            for u, row in zip(test_users, ids):
                f.write(u + "\t" + ",".join(item_ids[int(i)] for i in row if i >= 0) + "\n")


if __name__ == "__main__":
    main()
