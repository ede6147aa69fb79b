"""What the PoP's defences cost per packet: Forwarder.receive() in process
(sans-I/O, no sockets), microseconds per call for each kind of datagram a
PoP meets in normal use and under attack. Prints one JSON object.

    .venv/bin/python tools/bench_pop_cost.py [--calls 20000] [--runs 5]

Each figure is the best of --runs runs of --calls calls (the VM is shared;
the best run is the least disturbed). "data_forward" is the fast path every
forwarded packet takes; the rest are what floods and replays cost
(docs/OUTER.md §5). The socket side (reading in bursts) is measured by
tools/bench_pop.py.
"""
import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

# BENCH_LIB=/other/lib measures another checkout (A/B), as tools/bench_pop.py does
sys.path.insert(0, os.environ.get("BENCH_LIB") or str(Path(__file__).resolve().parent.parent / "lib"))

from microtun import outer                              # noqa: E402
from microtun_host import pop                           # noqa: E402
from microtun_host.config import Address                # noqa: E402

K_DEV = bytes(range(32))
K_NEXT = bytes(range(32, 64))
DEV = ("198.51.100.7", 40000)
NEXT = ("127.0.0.1", 9001)


def forwarder():
    specs = [pop.RouteSpec(100, K_DEV, Address(4, NEXT[0], NEXT[1]), 0, 200, K_NEXT),
             pop.RouteSpec(201, K_NEXT, None, 100, 101, K_DEV)]
    log = logging.getLogger("bench_pop_cost")
    log.addHandler(logging.NullHandler())
    log.propagate = False
    log.setLevel(logging.INFO)
    f = pop.Forwarder(pop.build_table(specs), log)
    f.receive(outer.seal(outer.TYPE_DATA, 100, outer.HopKey(K_DEV), b"x" * 40), DEV)   # learn DEV
    return f


def init_packet(hk):
    """An outer DATA packet carrying an inner INIT (type 1, 148 bytes; the
    number is spelled out so that BENCH_LIB may name an older checkout)."""
    return outer.seal(outer.TYPE_DATA, 100, hk, bytes((1, 0, 0, 0)) + os.urandom(148 - 4))


def cases(calls):
    """(name, [(datagram, source)] of length calls, setup(forwarder))."""
    hk, hk_next = outer.HopKey(K_DEV), outer.HopKey(K_NEXT)
    data = outer.seal(outer.TYPE_DATA, 100, hk, os.urandom(60))
    down = outer.seal(outer.TYPE_DATA, 201, hk_next, os.urandom(60))
    bad = outer.seal(outer.TYPE_DATA, 100, hk_next, os.urandom(60))
    captured_init = init_packet(hk)
    fresh_inits = [init_packet(hk) for _ in range(calls)]
    rnd = [os.urandom(100) for _ in range(calls)]
    spoofed = [("10.%d.%d.%d" % (i >> 16, (i >> 8) & 255, i & 255), 1) for i in range(calls)]
    keepalive = outer.seal(outer.TYPE_HOP_KEEPALIVE, 100, hk, b"")

    def replay_setup(f):
        f.receive(captured_init, DEV)           # forwarded once: every later copy is a replay

    return [
        ("data_forward", [(data, DEV)] * calls, None),
        ("data_downlink_to_learned", [(down, NEXT)] * calls, None),
        ("data_bad_mac", [(bad, DEV)] * calls, None),
        ("random_100_bytes", [(d, DEV) for d in rnd], None),
        ("unknown_label", [(outer.seal(outer.TYPE_DATA, 555, hk, b"x" * 40), DEV)] * calls, None),
        ("init_replay_spoofed_sources", [(captured_init, s) for s in spoofed], replay_setup),
        ("init_fresh_over_label_budget", [(p, DEV) for p in fresh_inits], None),
        ("data_from_new_source_challenge_outstanding", [(data, s) for s in spoofed], None),
        ("keepalive_from_new_source_challenge_outstanding", [(keepalive, s) for s in spoofed], None),
    ]


def run(calls, runs):
    out = {}
    for name, items, setup in cases(calls):
        best = None
        for _ in range(runs):
            f = forwarder()
            if setup:
                setup(f)
            recv = f.receive
            t0 = time.perf_counter()
            for d, a in items:
                recv(d, a)
                if getattr(f, "extra", None):
                    f.extra.clear()
            dt = time.perf_counter() - t0
            best = dt if best is None or dt < best else best
        s = f.stats()
        out[name] = {"us_per_packet": round(best / calls * 1e6, 2),
                     "forwarded": s["forwarded"], "challenges": s.get("challenges", 0),
                     "drops": {k: v for k, v in s["drops"].items() if v}}
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    res = run(args.calls, args.runs)
    print(json.dumps({"bench": "pop_cost", "python": "%d.%d.%d" % sys.version_info[:3],
                      "calls": args.calls, "runs": args.runs, "cases": res}))


if __name__ == "__main__":
    main()
