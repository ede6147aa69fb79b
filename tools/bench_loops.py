"""Issue 14 (LOOPS) benchmark: prints ONE JSON object with every figure.

    .venv/bin/python tools/bench_loops.py [--count N] [--interval MS]   (make bench-loops, ~12 minutes)
    .venv/bin/python tools/bench_loops.py --only cpu [--cpu-rounds N]   (the PoP CPU figure alone)

Real processes over loopback (tools/loops_scenarios.py): unix-port device,
PoPs a1 -> a2 with the link emulator on that middle segment (20 ms each way,
40 ms segment RTT), gateway and echo service. Each mode runs on a fresh
network, the "off" run of each loss pattern in the same invocation is the
baseline for extra bytes, added latency and PoP CPU. Nothing is asserted
(host_tests/test_loops_e2e.py asserts bounds).

segment_delay (the repair's own cost, measured per packet): the PoPs run
with MICROTUN_SEG_TRACE, the ingress a1 stamps each seq when it first sends
it, the egress a2 when it releases it (both time.monotonic() on this host);
extra = that one-way time - the median one-way time of the packets that
arrived first time in the same run. extra_recovered_ms: the repaired
packets only; extra_all_ms: every packet (its p99 is the target's "added
latency p99": at 5 % loss it falls among the repaired ones);
extra_first_time_ms: the packets that needed no repair, i.e. what this
machine's scheduling alone adds (the floor); added_p99_ms = p99 of all -
p99 of those, the repair's share of the tail.
added_latency_p99_ms (end to end, noisier) = echo RTT p99 of the mode - echo
RTT p99 of "off" under the same loss in the same invocation (the replies do
not cross the lossy segment; the tail that scheduling on the shared machine
gives every mode cancels out).
extra_bytes = bytes the emulator saw on the segment, both directions
(data, retransmissions, parities, NACKs, pings, pongs) / the same for "off" - 1.
pop_cpu: utime + stime of a1 and a2 from /proc over the run's window
(from the device's session up to its last echo), as percent of one CPU per
PoP (pct_of_one_cpu), and the difference to "off" in percentage points
(cpu_pp_vs_off). Total CPU, not CPU per datagram: a mode's own datagrams
(parities, pings, pongs, NACKs) are part of its cost. us_per_datagram is
the same CPU per datagram the PoPs received.
noloss_cpu (the target's figure): one run per mode, on its own, is within
the noise of a shared machine (single runs of the same mode spread 1.5
points). So each round runs "off" and the mode AT ONCE, two networks side
by side, each pinned to its own core (the cores swap every round), and
takes the difference; whatever else loads the machine then loads both. An
"off" against "off" pair in every round (noloss_cpu.noise_off_vs_off) shows the noise
floor of the method in the same run. The figure is the median over the
rounds. per_packet_cost is the segment's own cost in-process, without the
other processes: warm (a tight loop) and cold (the caches emptied before
each packet, as a PoP woken a few hundred times a second finds them; the
real processes' difference follows the cold figures).
segment_egress.repair_ms = the egress's own record, gap seen -> repaired.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loops_scenarios as ls  # noqa: E402

MODES = ("off", "nack", "fec", "nack+fec")
# adaptive FEC: parities per 24 move within 0..6 from the egress's reported loss (residual target 1 %)
ADAPTIVE = {"fec_m_min": 0, "fec_m": 6, "fec_target": 0.01}
# Gilbert-Elliott, mean burst 4 (P(bad -> good) = 0.25), long-run loss 5 %
GE = {"p_good_to_bad": round(0.05 * 0.25 / 0.95, 5), "p_bad_to_good": 0.25}


def _pct(r):
    """CPU of the two PoPs over the run's window, percent of one CPU per PoP."""
    return 100.0 * sum(r["pop_cpu_s"].values()) / r["cpu_window_s"] / len(r["pop_cpu_s"])


def _pop_cpu(r, base):
    return {"s": r["pop_cpu_s"], "window_s": r["cpu_window_s"], "datagrams": r["pop_packets"],
            "us_per_datagram": round(1e6 * sum(r["pop_cpu_s"].values()) / max(1, sum(r["pop_packets"].values())), 1),
            "pct_of_one_cpu": round(_pct(r), 2), "cpu_pp_vs_off": round(_pct(r) - _pct(base), 2)}


def figures(rows):
    base = rows["off"]
    out = {}
    for m, r in rows.items():
        out[m] = {
            "delivered_ratio": r["delivered_ratio"], "duplicates_delivered": r["duplicates_delivered"],
            "extra_bytes": round(r["segment_bytes"] / base["segment_bytes"] - 1, 4),
            "segment_delay": r["segment_delay"],
            "added_p99_ms": round(r["segment_delay"]["extra_all_ms"]["p99"] - r["segment_delay"]["extra_first_time_ms"]["p99"], 1)
            if r["segment_delay"] and r["segment_delay"]["extra_first_time_ms"] else None,
            "added_latency_p99_ms": (r["rtt_ms_p99"] - base["rtt_ms_p99"])
            if r["rtt_ms_p99"] is not None and base["rtt_ms_p99"] is not None else None,
            "rtt_ms": {"p50": r["rtt_ms_median"], "p90": r["rtt_ms_p90"], "p99": r["rtt_ms_p99"], "max": r["rtt_ms_max"]},
            "pop_cpu": _pop_cpu(r, base),
            "ce_marks_gateway": r["ce_marks_gateway"],
            "segment_egress": {k: {f: v[f] for f in ("loss", "gaps", "recovered_nack", "recovered_fec", "unrecovered",
                                                     "nacks_sent", "repair_ms", "ce_marked")}
                               for k, v in r["segments"].items() if v["role"] == "egress" and k.startswith("a2/")},
        }
    return out


def per_packet_cost(n=20000, size=250, runs=3, cold_n=200, fec_groups=8):
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
    data = bytes(outer.seal(outer.TYPE_DATA, 100, outer.HopKey(k1), inner))   # recvfrom gives bytes

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
    specs = {"plain": pop.RouteSpec(100, k1, nxt, 0, 200, k2),
             "ingress": pop.RouteSpec(100, k1, nxt, 0, 200, k2, seg_out=cfg),
             "egress": pop.RouteSpec(100, k1, nxt, 0, 200, k2, seg_in=cfg)}
    snd = segment.Sender(cfg, 100, outer.HopKey(k1))
    segs = [bytes(snd.data(inner, False, i * 0.001)[0]) for i in range(n)]
    pkts = {"plain": [data] * n, "ingress": [data] * n, "egress": segs}
    out = {"payload_bytes": size}
    for k, key in (("plain", "plain_us"), ("ingress", "nack_ingress_us"), ("egress", "nack_egress_us")):
        out[key] = timed(specs[k], pkts[k])
    # The same with the caches emptied before each packet (16 MB written, 3,000 lists
    # read), as at a PoP woken a few hundred times a second among other processes:
    # the real processes' cost follows this one, not the warm loop's (docs/LOOPS.md).
    junk = bytearray(16 << 20)
    lists = [list(range(64)) for _ in range(3000)]

    def cold_receive(f, pkt, src):
        for j in range(0, len(junk), 64):
            junk[j] ^= 1
        sum(x[3] for x in lists)
        t = time.perf_counter_ns()
        f.receive(pkt, src)
        dt = time.perf_counter_ns() - t
        f.seg_q.clear()
        return dt
    fwd = {k: pop.Forwarder(pop.build_table([specs[k]]), log) for k in specs}
    cold = {k: [] for k in specs}
    for i in range(cold_n):
        for k in specs:
            cold[k].append(cold_receive(fwd[k], pkts[k][i], ("127.0.0.1", 5)))
    for k, key in (("plain", "cold_plain_us"), ("ingress", "cold_nack_ingress_us"), ("egress", "cold_nack_egress_us")):
        out[key] = round(statistics.median(cold[k][10:]) / 1000, 1)
    # fixed FEC (3 parities per 24): the packet that closes a group at the ingress
    # (it encodes the group), and a parity at the egress, against a data packet
    fcfg = segment.SegConfig("fec")
    now = [1.0]
    fi = pop.Forwarder(pop.build_table([pop.RouteSpec(100, k1, nxt, 0, 200, k2, seg_out=fcfg)]), log,
                       clock=lambda: now[0])
    fe = pop.Forwarder(pop.build_table([pop.RouteSpec(100, k1, nxt, 0, 200, k2, seg_in=fcfg)]), log,
                       clock=lambda: now[0] + 0.02)
    fsnd = segment.Sender(fcfg, 100, outer.HopKey(k1))
    fc = {"data_in": [], "close_in": [], "data_out": [], "parity_out": []}
    for g in range(fec_groups):
        for i in range(fcfg.fec_k):
            now[0] += 0.005
            fc["close_in" if i == fcfg.fec_k - 1 else "data_in"].append(cold_receive(fi, data, ("127.0.0.1", 5)))
            for p in fsnd.data(inner, False, now[0]):
                p = bytes(p)
                fc["parity_out" if p[0] & 0x0F == outer.TYPE_SEG_REPAIR else "data_out"].append(
                    cold_receive(fe, p, ("127.0.0.1", 6)))
    med = {k: statistics.median(v[2:]) / 1000 for k, v in fc.items()}
    out["cold_fec_group_close_extra_us"] = round(med["close_in"] - med["data_in"], 1)
    out["cold_fec_parity_at_egress_us"] = round(med["parity_out"], 1)
    out["cold_fec_data_at_egress_us"] = round(med["data_out"], 1)
    return out


def sans_io_link(n=4000, loss=0.05, seed=3):
    """The NACK mode over the fake link of host_tests/test_segment.py (exact
    20 ms each way, 5 % loss both ways, 200 packets/s, fake clock): the
    repair's extra delay as the design gives it, with no scheduling noise."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "host_tests"))
    import test_segment as ts
    from microtun_host.segment import SegConfig
    link = ts.Link(SegConfig("nack"), loss=loss, seed=seed)
    link.snd.trace, link.rcv.trace = [], []
    link.stream(n)
    sent = dict(link.snd.trace)
    ex = [(round((t - sent[s] - ts.ONE_WAY) * 1000, 3) + 0.0, how) for s, t, how in link.rcv.trace]
    return {"packets": n, "loss_both_ways": loss, "delivered_ratio": round(len(link.delivered) / n, 4),
            "extra_all_ms": ls.quantiles([x for x, _ in ex]),
            "extra_recovered_ms": ls.quantiles([x for x, how in ex if how == "nack"])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--interval", type=int, default=5, help="ms between messages (200/s)")
    ap.add_argument("--size", type=int, default=200, help="app payload bytes")
    ap.add_argument("--cpu-rounds", type=int, default=3,
                    help="rounds of side-by-side pairs (off and each mode at once) for the PoP CPU figure")
    ap.add_argument("--only", choices=("cpu",), help="cpu: only the PoP CPU pairs (noloss_cpu, ~4 minutes)")
    a = ap.parse_args()
    res = {"setup": {"count": a.count, "interval_ms": a.interval, "payload_bytes": a.size,
                     "segment_rtt_ms": 2 * ls.SEGMENT_ONE_WAY_MS, "fec": "k=24 data + m=3 parities (12.5 %)",
                     "fec_adaptive": ADAPTIVE,
                     "bursty": GE},
           "targets": {"random5.nack.delivered_ratio": ">= 0.997 (off: ~0.95)",
                       "random5.nack.segment_delay.extra_all_ms.p99": "<= 50 (segment RTT 40 + 10)",
                       "random5.fec": "delivered_ratio >= 0.99 at extra_bytes <= 0.15, no NACK",
                       "noloss": "extra_bytes <= 0.03 (nack); noloss_cpu.<mode>.cpu_pp_vs_off_median <= 1",
                       "critical": "duplicates_delivered 0"}}
    cost = per_packet_cost()
    # at the run's rate (interval_ms, both directions cross the segment): a PoP is
    # ingress for one direction and egress for the other
    pps = 1000.0 / a.interval
    for warm in ("", "cold_"):
        cost["%spop_cpu_pp_nack_at_run_rate" % warm] = round(
            ((cost[warm + "nack_ingress_us"] - cost[warm + "plain_us"]) +
             (cost[warm + "nack_egress_us"] - cost[warm + "plain_us"])) * pps / 1e4, 3)
    res["load_average_start"] = _load()
    res["per_packet_cost"] = cost
    res["random5_nack_sans_io"] = sans_io_link()
    print("per packet: %s" % json.dumps(cost), file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="microtun-bench-loops-") as tmp:
        def go(name, mode, tag=None, **kw):
            d = Path(tmp) / ("%s-%s" % (name, (tag or mode).replace("+", "_")))
            d.mkdir()
            r = ls.run(d, mode, count=a.count, interval=a.interval, size=a.size, **kw)
            print("%s %s: %s" % (name, tag or mode, json.dumps({k: r[k] for k in (
                "delivered_ratio", "segment_bytes", "rtt_ms_p99", "pop_cpu_s", "segment_delay")})), file=sys.stderr)
            return r
        for name, imp in (("random5", {"loss": 0.05, "seed": 5}), ("bursty_ge4", dict(GE, seed=6)),
                          ("noloss", {"seed": 7})) if a.only is None else ():
            rows = {m: go(name, m, imp=imp) for m in MODES}
            if name != "bursty_ge4":
                rows["fec_adaptive"] = go(name, "fec", tag="fec_adaptive", imp=imp, seg=ADAPTIVE)
            res[name] = figures(rows)
            if "fec_adaptive" in rows:
                res[name]["fec_adaptive"]["ingress"] = {
                    f: v[f] for k, v in rows["fec_adaptive"]["segments"].items()
                    if k.startswith("a1/out:") for f in ("fec_m", "loss", "parities", "sent")}
        # PoP CPU at no loss: "off" and the mode at once, side by side, pinned apart
        # (see the module doc); the figure is the median over the rounds
        cores = sorted(os.sched_getaffinity(0))
        res["noloss_cpu_method"] = {
            "pairs": "off and the mode at once, each network on its own core" if len(cores) >= 2 else
                     "off and the mode at once, unpinned (this process may use one core only)",
            "rounds": a.cpu_rounds, "cores": cores[:2], "trace": False}
        pairs = {m: [] for m in ("noise_off_vs_off",) + MODES[1:] + ("fec_adaptive",)}
        for k in range(a.cpu_rounds):
            for m in pairs:
                mode, seg = {"noise_off_vs_off": ("off", None), "fec_adaptive": ("fec", ADAPTIVE)}.get(m, (m, None))
                off, r = cpu_pair(Path(tmp), k, m, mode, seg, a, cores)
                pairs[m].append({"pp": round(_pct(r) - _pct(off), 2), "off_pct": round(_pct(off), 2),
                                 "mode_pct": round(_pct(r), 2)})
                print("cpu round %d %s: %s" % (k, m, json.dumps(pairs[m][-1])), file=sys.stderr)
        res["noloss_cpu"] = {m: {"cpu_pp_vs_off_median": statistics.median(x["pp"] for x in v),
                                 "cpu_pp_vs_off_pairs": [x["pp"] for x in v],
                                 "off_pct_of_one_cpu_pairs": [x["off_pct"] for x in v]}
                             for m, v in pairs.items()}
        if a.only is not None:
            res["load_average_end"] = _load()
            print(json.dumps(res))
            return
        crit = go("critical", "nack", imp={"loss": 0.05, "seed": 8}, policy="critical", second_route=True)
        res["critical_two_paths_nack"] = {"sent": crit["sent"], "delivered_ratio": crit["delivered_ratio"],
                                          "duplicates_delivered": crit["duplicates_delivered"]}
    res["load_average_end"] = _load()
    print(json.dumps(res))


def cpu_pair(tmp, k, tag, mode, seg, a, cores):
    """Round k: "off" and `mode` on two networks at once, each network's
    processes pinned to one of two cores (a thread's affinity passes to the
    processes it starts; the cores swap with k). Returns (off's run, mode's)."""
    out = {}

    def go(which, m, sg):
        if len(cores) >= 2:
            os.sched_setaffinity(0, {cores[(k + which) % 2]})
        d = tmp / ("cpu%d-%s-%d" % (k, tag.replace("+", "_"), which))
        d.mkdir()
        try:
            out[which] = ls.run(d, m, imp={"seed": 7}, seg=sg, count=a.count, interval=a.interval, size=a.size,
                                trace=False)
        except BaseException as e:          # reported by the caller, not lost in the thread
            out[which] = e
    ts = [threading.Thread(target=go, args=(0, "off", None)), threading.Thread(target=go, args=(1, mode, seg))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for which in (0, 1):
        if isinstance(out.get(which), BaseException):
            raise out[which]
    return out[0], out[1]


def _load():
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


if __name__ == "__main__":
    main()
