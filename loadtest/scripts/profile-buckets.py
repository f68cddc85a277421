#!/usr/bin/env python3
"""Where a profiled process spends its CPU, by concern.

Reads `perf script --no-inline -F comm,pid,tid,ip,sym` output (stdin or a file)
of a `perf record --call-graph dwarf` run and puts each sample in the first
bucket, in the order below, that any frame of its stack matches. Prints each
bucket's share, then the leaf symbols that take the most samples.

    perf record -F 199 --call-graph dwarf,65528 -p PID -o perf.data -- sleep 5
    perf script -i perf.data --no-inline -F comm,pid,tid,ip,sym | \
        loadtest/scripts/profile-buckets.py [--pid PID] [FILE]

With `--pid`, only that process's samples count (one recording of several
processes, `perf record -p A,B,...`, read once per process).

The buckets are patterns on symbol names; a sample none matches is "other".
"""

import collections
import re
import sys

# Checked in this order: a sample's stack goes to the first that matches.
BUCKETS = [
    ("prost encode/decode", r"prost::|::encode_raw|::merge_field|encoded_len"),
    ("retrieval handler", r"recmesh_retrieval::"),
    ("ranking handler", r"recmesh_ranking::"),
    ("reranker handler", r"recmesh_reranker::"),
    ("features handler", r"recmesh_features::"),
    ("experiments handler", r"recmesh_experiments::"),
    ("gateway handler", r"recmesh_gateway::"),
    ("hyper/h2 server side", r"hyper::proto::h2::server|hyper::server|h2::server|tonic::transport::server|tonic::server"),
    ("hyper/h2 client side", r"hyper::proto::h2::client|hyper::client|h2::client|tonic::transport::channel|tower::buffer|recmesh_mesh::"),
    ("h2 connection (either side)", r"h2::proto::|h2::codec|h2::frame|hpack"),
    ("runtime parking and waking", r"tokio::runtime::(scheduler|park|time|driver)|epoll_wait|futex|tokio::runtime::io"),
]


def samples(lines):
    """Yields each sample's process id (from `pid/tid`, else None) and
    frames (leaf first)."""
    frames, pid = [], None
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            if frames:
                yield pid, frames
            frames, pid = [], None
            continue
        if line.startswith((" ", "\t")):
            parts = line.strip().split(None, 1)
            frames.append(parts[1] if len(parts) > 1 else parts[0])
        else:
            # The sample's header: comm, then pid/tid.
            m = re.search(r"\s(\d+)/\d+\b", line)
            pid = m.group(1) if m else None
    if frames:
        yield pid, frames


def main():
    args = sys.argv[1:]
    want = None
    if args[:1] == ["--pid"]:
        if len(args) < 2:
            sys.exit("--pid needs a process id")
        want, args = args[1], args[2:]
    src = open(args[0]) if args else sys.stdin
    compiled = [(name, re.compile(p)) for name, p in BUCKETS]
    counts = collections.Counter()
    leaves = collections.Counter()
    total = 0
    for pid, frames in samples(src):
        if want is not None and pid != want:
            continue
        total += 1
        leaves[frames[0]] += 1
        for name, rx in compiled:
            if any(rx.search(f) for f in frames):
                counts[name] += 1
                break
        else:
            counts["other"] += 1
    if total == 0:
        sys.exit("no samples read: pass `perf script --no-inline -F comm,pid,tid,ip,sym` output (and a --pid that was recorded)")
    print(f"{total} samples")
    for name, _ in BUCKETS + [("other", None)]:
        print(f"{100 * counts[name] / total:6.1f}%  {name}")
    print("\ntop leaf symbols:")
    for sym, n in leaves.most_common(25):
        print(f"{100 * n / total:6.1f}%  {sym[:140]}")


if __name__ == "__main__":
    main()
