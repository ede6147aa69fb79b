"""Issue 15: gateway failover with real processes over loopback; prints ONE
JSON object.

    .venv/bin/python tools/bench_failover.py [--runs 3]        (~15 s a run)

Topology: a unix-port device with two routes (a: a1 -> a2, b: b1 -> b2),
every message critical (a copy on each path), a primary gateway and a
standby with the same identity (`standby` in the topology: same key,
registry and links); a2 and b2 probe both and send to the one that answers.
3 s after the device connected the primary gets SIGKILL. Targets: the
device's messages arrive again within 3 s (resume_s), critical messages
lost no more than were in flight (sent between the kill and the resume),
0 duplicates delivered. See tools/path_scenarios.py,
scenario_gateway_failover.
"""
import argparse
import json
import os
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "lib"))
import path_scenarios as sc  # noqa: E402
from microtun_host import scratch  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    tmp = scratch.mkdtemp("microtun-bench-failover-")
    load = [os.getloadavg()]
    runs = []
    for i in range(args.runs):
        d = Path(tmp) / ("run%d" % i)
        d.mkdir()
        r = sc.scenario_gateway_failover(d)
        print("run %d: %s" % (i, json.dumps(r)), file=sys.stderr)
        runs.append(r)
    load.append(os.getloadavg())
    resumes = [r["resume_s"] for r in runs if r["resume_s"] is not None]
    print(json.dumps({
        "bench": "gateway_failover", "runs": len(runs),
        "resume_s": {"max": max(resumes) if resumes else None,
                     "median": statistics.median(resumes) if resumes else None, "target_max": 3.0},
        "critical_lost": [r["critical_lost"] for r in runs], "in_flight": [r["in_flight"] for r in runs],
        "duplicates_delivered": [r["duplicates_delivered"] for r in runs], "target_duplicates": 0,
        "never_resumed": sum(1 for r in runs if r["resume_s"] is None),
        "loadavg_before_after": [[round(x, 2) for x in l] for l in load],
        "detail": runs}))


if __name__ == "__main__":
    main()
