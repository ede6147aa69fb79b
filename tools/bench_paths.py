"""Issue 5 integration benchmark: prints ONE JSON object with every figure.

    .venv/bin/python tools/bench_paths.py          (about 2 minutes)

Real processes over loopback (unix-port device, CPython PoPs, gateway and
link emulators), plus the idle-airtime figure from the sans-I/O stack on a
simulated hour (host_tests/stack_sim.py). Targets are printed next to the
measured values; nothing here is asserted (host_tests/test_paths_e2e.py
asserts bounds that hold on a noisy machine).
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "lib"))
sys.path.insert(0, str(HERE.parent / "host_tests"))
import path_scenarios as sc  # noqa: E402
from microtun_host import scratch  # noqa: E402


def idle_bytes_per_hour():
    from stack_sim import StackSim
    s = StackSim()
    s.connect()
    s.run(120000)
    up, down = s.bytes_up, s.bytes_down
    s.run(3600000)
    return {"total": (s.bytes_up - up) + (s.bytes_down - down), "up": s.bytes_up - up,
            "down": s.bytes_down - down, "paths": 2, "established": s.core.established}


def main():
    tmp = scratch.mkdtemp("microtun-bench-paths-")   # keys: removed on exit
    res = {"targets": {
        "loss10_critical.delivered_ratio": ">= 0.985, duplicates_delivered 0",
        "blackhole/pop_kill": "critical_lost 0, best_effort_gap_ms <= 1000, handshakes 1",
        "rebind": "replies resume within one round trip, handshakes 1",
        "resplice": "up_lost 0 and replies_lost 0 while route a's middle PoP is replaced",
        "adaptive": "delivered_ratio >= 0.98, extra_bytes_ratio < 0.20",
        "idle_bytes_per_hour": "<= 8192 (WireGuard, 25 s keepalive: ~17.5 KB)"}}
    for name, fn in [("loss10_critical", sc.scenario_loss10_critical), ("blackhole", sc.scenario_blackhole),
                     ("pop_kill", sc.scenario_pop_kill), ("rebind", sc.scenario_rebind),
                     ("resplice", sc.scenario_resplice),
                     ("adaptive", sc.adaptive_pair)]:
        d = Path(tmp) / name
        d.mkdir()
        res[name] = fn(d)
        print("%s: %s" % (name, json.dumps(res[name])), file=sys.stderr)
    res["idle_bytes_per_hour"] = idle_bytes_per_hour()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
