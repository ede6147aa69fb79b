"""LOOPS scenarios with real processes over loopback (issue 14): a unix-port
device, route a = a1 -> a2 with the link emulator on the middle segment
(a1 -> a2 goes through it, and the segment's NACKs and pongs come back
through it), the gateway and its echo service. Used by tools/bench_loops.py
(figures, JSON) and host_tests/test_loops_e2e.py (bounds).

    res = run(tmp, mode="nack", imp={"loss": 0.05}, count=2000, interval=5)

Delivery is counted at the gateway's channel-1 service (uplink, across
the lossy segment); latency from the device's echo round trips (the
replies come back a2 -> a1 directly, so the lossy segment is on the uplink
only); bytes on the segment from the emulator (both directions); CPU of
both PoPs from /proc.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from microtun_host.localnet import Net  # noqa: E402
from path_scenarios import Run, service_ids  # noqa: E402

SEGMENT_ONE_WAY_MS = 20          # 40 ms segment RTT


class LoopsNet(Net):
    """Net with the emulator between a1 and a2 (a2 is reached through it) and
    a [[segment]] a1-a2 in the topology."""

    def __init__(self, tmp, mode, seg=None, imp=None, second_route=False, policy="best", pop_workers=1):
        self.seg_mode = mode
        self.pop_workers = pop_workers
        self.seg_opts = dict(seg or {})
        self.mid_imp = dict(imp or {})
        routes = {"a": ["a1", "a2"]}
        if second_route:
            routes["b"] = ["b1", "b2"]
        super().__init__(tmp, routes=routes, devices={"d1": {}}, policy=policy, lossy={"a": {}})

    def write_topology(self):
        super().write_topology()
        text = self.topology.read_text()
        # the emulator (netem "a") sits in front of a2 instead of a1: a1 sends to a2's "reach"
        text = text.replace('via = "%s"\n' % self.netem["a"]["listen"], "")
        a2 = 'name = "a2"\nlisten = "%s"' % self.pops["a2"]["listen"]
        text = text.replace(a2, a2 + '\nreach = "%s"' % self.netem["a"]["listen"])
        seg = ['[[segment]]', 'pops = ["a1", "a2"]', 'mode = "%s"' % self.seg_mode]
        seg += ["%s = %s" % (k, v) for k, v in sorted(self.seg_opts.items())]
        self.topology.write_text(text + "\n" + "\n".join(seg) + "\n")

    def provision(self):
        out = super().provision()
        # only a1 goes through the emulator: the gateway sends to a2 directly
        g = self.out / "gateway.json"
        g.write_text(g.read_text().replace('"%s"' % self.netem["a"]["listen"], '"%s"' % self.pops["a2"]["listen"]))
        if self.pop_workers > 1:            # every PoP as a supervisor and its workers (microtun_host.workers)
            import json
            pops = {f.stem: (f, json.loads(f.read_text())) for f in (self.out / "pops").glob("*.json")}
            for f, cfg in pops.values():
                cfg["workers"] = self.pop_workers
            # provision gives a1 -> a2 the same label both ways (per-node label spaces); swap it for one
            # of the other parity, so the segment's in_label at a1 and its out_label (the label its NACKs
            # come back with) reach different workers unless the steering groups them
            a1 = [r for r in pops["a1"][1]["routes"] if "seg_out" in r][0]
            a2 = [r for r in pops["a2"][1]["routes"] if "seg_in" in r and r["in_label"] == a1["out_label"]][0]
            from microtun_host import workers
            group = [r["in_label"] for r in pops["a1"][1]["routes"]
                     if r is a1 or r.get("next") == "learn:%d" % a1["in_label"]]
            w = workers.group_worker(group, self.pop_workers)
            used = {r["in_label"] for r in pops["a2"][1]["routes"]}
            new = next(x for x in range(a1["in_label"] + 1, a1["in_label"] + 100)
                       if x not in used and x % self.pop_workers != w)
            a1["out_label"] = a2["in_label"] = new
            for f, cfg in pops.values():
                f.write_text(json.dumps(cfg))
        return out

    def start_netem(self, route, **imp):
        imp = dict(self.mid_imp, delay_ms=SEGMENT_ONE_WAY_MS, seed=imp.get("seed", self.mid_imp.get("seed", 1)))
        argv = [sys.executable, str(Path(__file__).resolve().parent / "netem.py"),
                "--listen", self.netem[route]["listen"], "--upstream", self.pops["a2"]["listen"],
                "--control", self.netem[route]["control"], "--seed", str(imp.pop("seed")),
                "--idle-timeout", "600"]
        for k, v in imp.items():
            argv += ["--" + k.replace("_", "-"), str(v)]
        self._spawn("netem-" + route, argv, None)
        self.wait_control(self.netem[route]["control"], "netem-" + route, netem=True)


def cpu_s(pid):
    """utime + stime of a process, seconds."""
    import os
    f = open("/proc/%d/stat" % pid).read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def segment_delays(traces):
    """Per packet across the segment a1 -> a2, from the PoPs' traces
    (MICROTUN_SEG_TRACE): the ingress's first send time and the egress's
    release time of each seq, both time.monotonic() on this one host.
    Returns {"baseline_ms": median one-way time of the packets that arrived
    first time, "all_ms": [extra ms of every released packet],
    "recovered_ms": [extra ms of each repaired packet]} where extra = one-way
    time - baseline; None without traces."""
    sent = {}
    for s, t in traces.get("out", []):
        sent.setdefault(s, []).append(t)
    rel = []
    for s, t, how in traces.get("in", []):
        ts = [x for x in sent.get(s, ()) if x <= t]
        if ts:
            rel.append((max(ts), t, how))    # seqs wrap: the latest send before the release
    if not rel:
        return None
    direct = sorted(t - t0 for t0, t, how in rel if how == "new")
    base = direct[len(direct) // 2] if direct else 0.0
    return {"baseline_ms": round(base * 1000, 2),
            "first_time_ms": [(t - t0 - base) * 1000 for t0, t, how in rel if how == "new"],
            "all_ms": [(t - t0 - base) * 1000 for t0, t, how in rel],
            "recovered_ms": [(t - t0 - base) * 1000 for t0, t, how in rel if how in ("nack", "fec")]}


def quantiles(xs):
    """{"n", "p50", "p90", "p99", "max"} of a list of ms (None if empty)."""
    if not xs:
        return None
    xs = sorted(xs)
    q = lambda f: round(xs[min(len(xs) - 1, int(len(xs) * f))], 1)     # noqa: E731
    return {"n": len(xs), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": round(xs[-1], 1)}


def run(tmp, mode, imp=None, seg=None, count=2000, interval=5, size=200, policy="best", second_route=False,
        trace=True, pop_workers=1):
    """One scenario on a fresh network. trace=False: the PoPs run without the
    per-packet trace (no segment_delay; the environment is left untouched, so
    several runs may go at once from threads, as the CPU pairs do)."""
    import os
    import time
    net = LoopsNet(tmp, mode, seg, imp, second_route=second_route, policy=policy, pop_workers=pop_workers)
    old = os.environ.get("MICROTUN_SEG_TRACE")
    if trace:
        os.environ["MICROTUN_SEG_TRACE"] = str(4 * count + 1000)      # the PoPs started now record per packet
    try:
        net.start()
        r = Run(net, "d1", "--count", str(count), "--interval", str(interval), "--size", str(size),
                "--linger", "2000")
        r.wait_connected()
        cpu0 = {p: cpu_s(net.procs[p].pid) for p in ("a1", "a2")}
        t0 = time.monotonic()
        res = r.result()
        cpu = {p: round(cpu_s(net.procs[p].pid) - cpu0[p], 3) for p in ("a1", "a2")}
        window = time.monotonic() - t0
        ids = service_ids(net)
        got = set(ids)
        st = net.netem_cmd(net.netem["a"]["control"], {"stats": True})["stats"]
        a1, a2 = net.pop_stats("a1"), net.pop_stats("a2")
        from microtun_host import control
        tr = {}
        for name, want in (("a1", "out"), ("a2", "in")) if trace else ():
            t = control.query(net.pops[name]["control"], {"cmd": "seg_trace"}, timeout=5)["traces"]
            tr[want] = [x for k, v in t.items() if k.startswith(want + ":") for x in v]
        delays = segment_delays(tr) if trace else None
        gw = [d for d in net.gw_status()["devices"] if d["name"] == "d1"][0]
        segs = {}
        for name, s in (("a1", a1), ("a2", a2)):
            for label, v in s.get("segments", {}).items():
                segs["%s/%s" % (name, label)] = v
        return {
            "mode": mode, "sent": res["sent"], "delivered": len(got),
            "delivered_ratio": round(len(got) / res["sent"], 4) if res["sent"] else 0.0,
            "duplicates_delivered": len(ids) - len(got),
            "rtt_ms_median": res["rtt_ms_median"], "rtt_ms_p90": res.get("rtt_ms_p90"), "rtt_ms_p99": res["rtt_ms_p99"],
            "rtt_ms_max": res.get("rtt_ms_max"),
            "segment_delay": None if delays is None else {
                "baseline_one_way_ms": delays["baseline_ms"], "extra_all_ms": quantiles(delays["all_ms"]),
                "extra_first_time_ms": quantiles(delays["first_time_ms"]),
                "extra_recovered_ms": quantiles(delays["recovered_ms"])},
            "pop_packets": {p: s["rx"] for p, s in (("a1", a1), ("a2", a2))},
            "segment_bytes": st["up"]["bytes_received"] + st["down"]["bytes_received"],
            "segment_bytes_up": st["up"]["bytes_received"], "segment_bytes_down": st["down"]["bytes_received"],
            "netem_dropped_up": sum(st["up"]["dropped"].values()),
            "pop_cpu_s": cpu, "cpu_window_s": round(window, 3),
            "ce_marks_gateway": sum(p.get("ce_marks", 0) for p in gw["paths"]),
            "ce_marks_device": res["health"]["driver"].get("ce_marks", 0),
            "segments": segs,
        }
    finally:
        net.stop()
        if trace:
            if old is None:
                os.environ.pop("MICROTUN_SEG_TRACE", None)
            else:
                os.environ["MICROTUN_SEG_TRACE"] = old
