"""EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW
2019) on a split exported by `recmesh-trainer export-split`, for
`recmesh-trainer score-lists`: the same split, users and metric code as
recmesh's own evaluation.

    B = I - P / diag(P),  P = (X^T X + lambda I)^-1

X is the binary user x item matrix (an item the user had any event on).
lambda is tuned on the validation period: fitted on train_only.tsv, NDCG@K
of valid.tsv's items, over a grid; the best is refitted on train.tsv (train
+ validation) and its top-K lists written for the test users. Items a user
had in training are never recommended back, as implicit's models do.

    bash services/trainer/scripts/compare-implicit.sh     # runs it too
"""

import argparse
import math
import os
import time

import numpy as np
import scipy.sparse as sp


def read(path, items=None):
    users, rows, cols = {}, [], []
    items = {} if items is None else items
    with open(path) as f:
        next(f)
        for line in f:
            u, i, _ = line.rstrip("\n").split("\t")
            rows.append(users.setdefault(u, len(users)))
            cols.append(items.setdefault(i, len(items)))
    return users, items, rows, cols


def matrix(users, items, rows, cols):
    m = sp.coo_matrix(
        (np.ones(len(rows), dtype=np.float64), (rows, cols)), shape=(len(users), len(items))
    ).tocsr()
    m.data[:] = 1.0  # binary: duplicates summed above are one interaction
    return m


def fit(x, lam):
    g = (x.T @ x).toarray()
    g[np.diag_indices_from(g)] += lam
    p = np.linalg.inv(g)
    b = -p / np.diag(p)
    b[np.diag_indices_from(b)] = 0.0
    return b


def top_k(x, b, rows, k):
    scores = x[rows] @ b
    scores = np.asarray(scores)
    scores[x[rows].toarray() > 0] = -np.inf
    part = np.argpartition(-scores, k, axis=1)[:, :k]
    order = np.take_along_axis(scores, part, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(part, order, axis=1)


def ndcg(lists, relevant, k):
    total = 0.0
    for ranked, rel in zip(lists, relevant):
        dcg = sum(1.0 / math.log2(n + 2) for n, i in enumerate(ranked[:k]) if i in rel)
        ideal = sum(1.0 / math.log2(n + 2) for n in range(min(len(rel), k)))
        total += dcg / ideal if ideal > 0 else 0.0
    return total / max(len(lists), 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("split_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--lambdas", default="50,100,250,500,1000,2000")
    a = ap.parse_args()
    d = a.split_dir

    # Tune on validation: fit on the training period alone.
    users, items, rows, cols = read(os.path.join(d, "train_only.tsv"))
    x = matrix(users, items, rows, cols)
    valid_users, valid_rel = [], []
    with open(os.path.join(d, "valid.tsv")) as f:
        for line in f:
            u, its = line.rstrip("\n").split("\t")
            if u in users:
                valid_users.append(users[u])
                valid_rel.append({items[i] for i in its.split(",") if i in items})
    best = None
    for lam in (float(v) for v in a.lambdas.split(",")):
        b = fit(x, lam)
        lists = [list(r) for r in top_k(x, b, valid_users, a.k)]
        score = ndcg(lists, valid_rel, a.k)
        print(f"ease lambda {lam:g}: validation NDCG@{a.k} {score:.4f}")
        if best is None or score > best[1]:
            best = (lam, score)
    lam = best[0]

    # Refit on train + validation, lists for the test users.
    users, items, rows, cols = read(os.path.join(d, "train.tsv"))
    x = matrix(users, items, rows, cols)
    started = time.perf_counter()
    b = fit(x, lam)
    print(f"ease: lambda {lam:g} (best on validation), fit {time.perf_counter() - started:.2f}s")
    item_ids = {v: k for k, v in items.items()}
    with open(os.path.join(d, "test_users.txt")) as f:
        test = [u for u in (line.strip() for line in f) if u in users]
    os.makedirs(a.out_dir, exist_ok=True)
    lists = top_k(x, b, [users[u] for u in test], a.k)
    with open(os.path.join(a.out_dir, f"ease-lambda-{lam:g}.tsv"), "w") as f:
        for u, row in zip(test, lists):
            f.write(u + "\t" + ",".join(item_ids[int(i)] for i in row) + "\n")


if __name__ == "__main__":
    main()
