"""Issue 14 (LOOPS) benchmark: prints ONE JSON object with every figure.

    .venv/bin/python tools/bench_loops.py [--count N] [--interval MS]   (make bench-loops, ~5 minutes)

Real processes over loopback (tools/loops_scenarios.py): unix-port device,
PoPs a1 -> a2 with the link emulator on that middle segment (20 ms each way,
40 ms segment RTT), gateway and echo service. Each mode runs on a fresh
network, the "off" run of each loss pattern in the same invocation is the
baseline for extra bytes, added latency and PoP CPU. Nothing is asserted
(host_tests/test_loops_e2e.py asserts bounds).

added_latency_p99_ms = echo RTT p99 of the mode - echo RTT median of "off"
under the same loss (the replies do not cross the lossy segment).
extra_bytes = bytes the emulator saw on the segment, both directions
(data, retransmissions, parities, NACKs, pings, pongs) / the same for "off" - 1.
pop_cpu_pp = CPU of a1 + a2 during the run, in percentage points of one
CPU, minus the same for "off" (on a shared, loaded machine this moves by
several points between identical runs); per_packet_cost times the rate is
the same difference without that noise.
segment_egress.repair_ms = the egress's own record, gap seen -> repaired.
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loops_scenarios as ls  # noqa: E402

MODES = ("off", "nack", "fec", "nack+fec")
# Gilbert-Elliott, mean burst 4 (P(bad -> good) = 0.25), long-run loss 5 %
GE = {"p_good_to_bad": round(0.05 * 0.25 / 0.95, 5), "p_bad_to_good": 0.25}


def figures(rows, interval, count):
    base = rows["off"]
    run_s = count * interval / 1000.0
    out = {}
    for m, r in rows.items():
        cpu = sum(r["pop_cpu_s"].values())
        out[m] = {
            "delivered_ratio": r["delivered_ratio"], "duplicates_delivered": r["duplicates_delivered"],
            "extra_bytes": round(r["segment_bytes"] / base["segment_bytes"] - 1, 4),
            "added_latency_p99_ms": (r["rtt_ms_p99"] - base["rtt_ms_median"]) if r["rtt_ms_p99"] is not None else None,
            "rtt_ms_median": r["rtt_ms_median"], "rtt_ms_p99": r["rtt_ms_p99"],
            "pop_cpu_s": r["pop_cpu_s"],
            "pop_cpu_pp": round(100 * (cpu - sum(base["pop_cpu_s"].values())) / run_s, 2),
            "ce_marks_gateway": r["ce_marks_gateway"],
            "segment_egress": {k: {f: v[f] for f in ("loss", "gaps", "recovered_nack", "recovered_fec", "unrecovered",
                                                     "nacks_sent", "repair_ms", "ce_marked")}
                               for k, v in r["segments"].items() if v["role"] == "egress" and k.startswith("a2/")},
        }
    return out


def per_packet_cost(n=20000, size=250, runs=3):
    """CPU µs per packet through pop.Forwarder (sans-I/O, no sockets):
    plain relay, into a NACK segment (ingress), out of one (egress). The
    PoP-CPU difference of a mode at a packet rate follows from it, without
    the noise of the shared machine's other processes."""
    import logging
    import time
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))
    from microtun import outer
    from microtun_host import pop, segment
    from microtun_host.config import Address
    k1, k2 = bytes(range(32)), bytes(range(1, 33))
    nxt = Address(4, "127.0.0.1", 9)
    log = logging.getLogger("bench")
    inner = bytes(range(256)) * (size // 256) + bytes(size % 256)
    data = outer.seal(outer.TYPE_DATA, 100, outer.HopKey(k1), inner)

    def timed(spec, pkts):
        best = None
        for _ in range(runs):
            f = pop.Forwarder(pop.build_table([spec]), log)
            t = time.process_time()
            for p in pkts:
                f.receive(p, ("127.0.0.1", 5))
                f.seg_q.clear()
            dt = (time.process_time() - t) / len(pkts) * 1e6
            best = dt if best is None else min(best, dt)
        return round(best, 2)
    cfg = segment.SegConfig("nack")
    plain = timed(pop.RouteSpec(100, k1, nxt, 0, 200, k2), [data] * n)
    ingress = timed(pop.RouteSpec(100, k1, nxt, 0, 200, k2, seg_out=cfg), [data] * n)
    snd = segment.Sender(cfg, 100, outer.HopKey(k1))
    segs = [snd.data(inner, False, i * 0.001)[0] for i in range(n)]
    egress = timed(pop.RouteSpec(100, k1, nxt, 0, 200, k2, seg_in=cfg), segs)
    return {"payload_bytes": size, "plain_us": plain, "nack_ingress_us": ingress, "nack_egress_us": egress}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--interval", type=int, default=5, help="ms between messages (200/s)")
    ap.add_argument("--size", type=int, default=200, help="app payload bytes")
    a = ap.parse_args()
    res = {"setup": {"count": a.count, "interval_ms": a.interval, "payload_bytes": a.size,
                     "segment_rtt_ms": 2 * ls.SEGMENT_ONE_WAY_MS, "fec": "k=24 data + m=3 parities (12.5 %)",
                     "bursty": GE},
           "targets": {"random5.nack.delivered_ratio": ">= 0.997 (off: ~0.95)",
                       "random5.nack.added_latency_p99_ms": "<= 50 (segment RTT 40 + 10)",
                       "random5.fec": "delivered_ratio >= 0.99 at extra_bytes <= 0.15, no NACK",
                       "noloss": "extra_bytes <= 0.03 (nack), pop_cpu_pp <= 1",
                       "critical": "duplicates_delivered 0"}}
    cost = per_packet_cost()
    # at the run's rate (interval_ms, both directions cross the segment): a PoP is
    # ingress for one direction and egress for the other
    pps = 1000.0 / a.interval
    cost["pop_cpu_pp_nack_at_run_rate"] = round(
        ((cost["nack_ingress_us"] - cost["plain_us"]) + (cost["nack_egress_us"] - cost["plain_us"])) * pps / 1e4, 3)
    res["per_packet_cost"] = cost
    print("per packet: %s" % json.dumps(cost), file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="microtun-bench-loops-") as tmp:
        def go(name, mode, **kw):
            d = Path(tmp) / ("%s-%s" % (name, mode.replace("+", "_")))
            d.mkdir()
            r = ls.run(d, mode, count=a.count, interval=a.interval, size=a.size, **kw)
            print("%s %s: %s" % (name, mode, json.dumps({k: r[k] for k in ("delivered_ratio", "segment_bytes",
                                                                            "rtt_ms_p99", "pop_cpu_s")})),
                  file=sys.stderr)
            return r
        for name, imp in (("random5", {"loss": 0.05, "seed": 5}), ("bursty_ge4", dict(GE, seed=6)),
                          ("noloss", {"seed": 7})):
            rows = {m: go(name, m, imp=imp) for m in MODES}
            res[name] = figures(rows, a.interval, a.count)
        crit = go("critical", "nack", imp={"loss": 0.05, "seed": 8}, policy="critical", second_route=True)
        res["critical_two_paths_nack"] = {"sent": crit["sent"], "delivered_ratio": crit["delivered_ratio"],
                                          "duplicates_delivered": crit["duplicates_delivered"]}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
