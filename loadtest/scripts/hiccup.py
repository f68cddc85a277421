#!/usr/bin/env python3
"""Platform pauses: on one CPU, sleep 1 ms in a loop for SECONDS and report
every wake-up more than THRESHOLD_MS late (what any thread there would see as
an unexplained pause), with its wall-clock time, so it can be put next to a
load test's trace; then a summary line.

    loadtest/scripts/hiccup.py SECONDS CPU [THRESHOLD_MS=5] > out.txt

Run one per CPU (0 and 1 here). `cyclictest` (Debian's rt-tests) measures the
same with less overhead but prints no times."""
import os
import sys
import time

secs = float(sys.argv[1])
cpu = int(sys.argv[2])
threshold = float(sys.argv[3]) if len(sys.argv) > 3 else 5.0
os.sched_setaffinity(0, {cpu})
end = time.perf_counter() + secs
n = over2 = over5 = over10 = 0
worst = 0.0
while True:
    before = time.perf_counter()
    if before > end:
        break
    time.sleep(0.001)
    late = (time.perf_counter() - before - 0.001) * 1000
    n += 1
    over2 += late > 2
    over5 += late > 5
    over10 += late > 10
    worst = max(worst, late)
    if late > threshold:
        # The pause ended now; it began `late` ms after the intended wake-up.
        print(f"pause cpu={cpu} ended_ms={time.time() * 1000:.0f} late_ms={late:.1f}", flush=True)
print(
    f"summary cpu={cpu} sleeps={n} seconds={secs:.0f} late_over_2ms={over2} "
    f"late_over_5ms={over5} late_over_10ms={over10} worst_ms={worst:.1f}",
    flush=True,
)
