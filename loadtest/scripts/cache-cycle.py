#!/usr/bin/env python3
"""Replays the fault suite's request sequence (the load generator's
SplitMix64 draws, default scenario, seed 1, 500/s for 11 s per row, rows
11.064 s apart) through the gateway's two per-user caches with a fixed
30 s life from creation, and prints the `Assign` calls for known users per
row. It showed why every third row of the suite ran twice the pipelines
(docs/faults.md, run 13). It models the caches only: no degraded answers,
no restarts.

    loadtest/scripts/cache-cycle.py
"""
import collections

M = (1 << 64) - 1


class Rng:
    def __init__(self, seed):
        self.x = seed

    def next(self):
        self.x = (self.x + 0x9E3779B97F4A7C15) & M
        z = self.x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        return z ^ (z >> 31)

    def unit(self):
        return (self.next() >> 11) / (1 << 53)

    def below(self, n):
        return self.next() % max(n, 1)


def sequence(rate=500, seconds=11, items=1500):
    rng, out = Rng(1), []
    for n in range(rate * seconds):
        u = rng.unit()
        if u < 0.2:
            user = None  # a cold user: never cached
        elif u < 0.3:
            user = f"u{rng.below(20)}"
        else:
            user = f"u{rng.below(2000)}"
        rng.below(items)
        out.append((n / rate, user, rng.unit() < 0.85))
    return out


def main(rows=15, row_s=11.064, ttl=30.0):
    seq, answers, assignments = sequence(), {}, {}
    for row in range(rows):
        t0, calls = row * row_s, collections.Counter()
        for at, user, recommend in seq:
            if not recommend or user is None:
                continue
            t = t0 + at
            if user in answers and t - answers[user] < ttl:
                continue
            answers[user] = t
            if user in assignments and t - assignments[user] < ttl:
                continue
            assignments[user] = t
            calls[int(at)] += 1
        print(f"row {row:2d}: {sum(calls.values()):5d} Assign calls for known users")


if __name__ == '__main__':
    main()
