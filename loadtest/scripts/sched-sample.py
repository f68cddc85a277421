#!/usr/bin/env python3
"""CPU and run-queue wait of every recmesh process, redis-server and kdamond,
every 20 ms, summed over each process's threads from
/proc/<pid>/task/*/schedstat (run ns, wait ns). One JSON line per sample:
[epoch_ms, {name: [run_ms, wait_ms]}] (only entries over 0.5 ms).

    loadtest/scripts/sched-sample.py OUT SECONDS

It costs CPU itself (it reads every thread's file 50 times a second): use
it to see who ran and who waited around an event, not to measure
capacity. docs/faults.md, run 13.
"""
import json
import os
import sys
import time


def procs():
    out = {}
    for p in os.listdir('/proc'):
        if not p.isdigit():
            continue
        try:
            cmd = open(f'/proc/{p}/cmdline', 'rb').read().split(b'\0')[0].decode()
            comm = open(f'/proc/{p}/comm').read().strip()
        except OSError:
            continue
        name = os.path.basename(cmd) or comm
        if name.startswith(('recmesh', 'redis-server')) or 'kdamond' in comm:
            out[p] = name
    return out


def run_wait(p):
    r = w = 0
    try:
        for t in os.listdir(f'/proc/{p}/task'):
            f = open(f'/proc/{p}/task/{t}/schedstat').read().split()
            r += int(f[0])
            w += int(f[1])
    except OSError:
        pass
    return r, w


def main():
    out = open(sys.argv[1], 'w')
    end = time.time() + float(sys.argv[2])
    names, seen = procs(), time.time()
    prev = {p: run_wait(p) for p in names}
    while time.time() < end:
        time.sleep(0.02)
        if time.time() - seen > 1:  # restarted processes get new pids
            names, seen = procs(), time.time()
        rec = {}
        for p, n in names.items():
            r, w = run_wait(p)
            pr, pw = prev.get(p, (r, w))
            prev[p] = (r, w)
            if r - pr > 500_000 or w - pw > 500_000:
                rec[n] = [round((r - pr) / 1e6, 1), round((w - pw) / 1e6, 1)]
        out.write(json.dumps([int(time.time() * 1000), rec]) + "\n")


if __name__ == '__main__':
    main()
