"""The ops channel's figures (docs/OPS.md, docs/FIGURES.md), one JSON object:

    .venv/bin/python tools/bench_ops.py [--loss 0.05] [--delay-ms 10] [--rounds 30]     (make bench-ops)

Real processes over loopback: a unix-port device (tools/device_run.py), two
PoPs, the gateway, and the lossy-link emulator (tools/netem.py) in front of
the first PoP, both directions: --loss, --delay-ms and a --rate limit (token
bucket, 64-datagram queue), as a slow lossy radio link would. Measured in
the same run:

  tunnel_rtt_ms    median echo round trip device -> gateway -> echo service -> device (device_run)
  exec_ms          median OpsClient.exec("pass"): control socket -> gateway -> device -> back;
                   target <= 2 x tunnel_rtt_ms + 20
  exec_stream_ms   the same with the output streamed (OpsClient.exec_raw(..., on_output), as the CLI's
                   exec): median of "print(1)"; exec_first_line_ms: how soon the first line of
                   "print('first'); time.sleep(0.3)" reaches the host (target as exec_ms)
  goodput_floor    the path's goodput: 100 datagrams the size of an ops chunk sent back to back
                   through the tunnel by the device, bytes that arrived per second (lost ones not
                   counted) at a sink behind the gateway, first to last arrival
  put_100k         OpsClient.put of 100,000 random bytes (median of 3), byte-exact check of the
                   file the device wrote; target >= 0.5 x goodput_floor
  unused_heap      bytes of heap (MicroPython unix port, gc.mem_alloc after collect) of a TunnelCore
                   with ops off, with ops allowed but never used, and after the first ops request
  unused_airtime   outer bytes a device sent while idle for --idle-ms (connect included), ops off vs
                   allowed, two runs each, on the same path with its loss set to 0
"""
import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "lib"))

from microtun_host.localnet import Net, micropython, mp_env, parse_result     # noqa: E402
from microtun_host.changelog import OperatorKey                               # noqa: E402
from microtun_host.ops import OpsClient                                       # noqa: E402
from microtun import ops as wire                                              # noqa: E402
from benchutil import median                                                  # noqa: E402

HEAP_SCRIPT = r"""
import gc, sys
from microtun.config import from_dict
from microtun.x25519 import public_key
def cfg(ops):
    d = {"name": "dev", "private_key": bytes(range(1, 33)).hex(), "gateway_public_key": public_key(bytes(range(101, 133))).hex(),
         "paths": [{"name": "a", "pop": "127.0.0.1:7000", "label": 100, "rx_label": 200, "hop_key": "11" * 32}]}
    if ops:
        d["ops"] = True
    return from_dict(d, "bench")
from microtun.tunnel import TunnelCore
c0, c1, c2 = cfg(False), cfg(True), cfg(True)
gc.collect(); base = gc.mem_alloc()
a = TunnelCore(c0, 1); gc.collect(); off = gc.mem_alloc() - base
gc.collect(); base = gc.mem_alloc()
b = TunnelCore(c1, 1); gc.collect(); allowed = gc.mem_alloc() - base
for i in range(40):
    b.log("info", "a log line of ordinary length number %d" % i)
gc.collect(); ring_full = gc.mem_alloc() - base
mods = len(sys.modules)
from microtun.ops import serve                  # what TunnelCore does with a request when ops is allowed
serve(b, bytes((0x10, 9, 0, 0, 0, 1)), 0)      # a HEALTH request: the agent is made
gc.collect(); used = gc.mem_alloc() - base
print({"ops_off": off, "ops_allowed_unused": allowed, "ops_allowed_ring_full": ring_full,
       "ops_after_first_request": used, "agent_loaded_only_on_use": "microtun.ops" in sys.modules and mods < len(sys.modules)})
"""


def run_device(net, name, *args, timeout=120):
    r = subprocess.run([micropython(), os.path.join(ROOT, "tools", "device_run.py"), net.device_config(name)]
                       + list(args), capture_output=True, text=True, env=mp_env(), cwd=ROOT, timeout=timeout)
    return parse_result(r.stdout, r.stderr)


def heap_figures():
    r = subprocess.run([micropython(), "-c", HEAP_SCRIPT], capture_output=True, text=True, env=mp_env(), cwd=ROOT,
                       timeout=60)
    line = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    try:
        import ast
        return ast.literal_eval(line)
    except (ValueError, SyntaxError):
        return {"error": (r.stdout + r.stderr)[-500:]}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--loss", type=float, default=0.05)
    ap.add_argument("--delay-ms", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=125000, help="the path's rate limit, bytes/s each way "
                    "(1 Mbit/s: an LTE-M-class uplink)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--idle-ms", type=int, default=5000)
    a = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="microtun-bench-ops-")
    out = {"bench": "ops", "loss": a.loss, "delay_ms_each_way": a.delay_ms, "rate_Bps_each_way": a.rate,
           "machine": "2 shared cores; figures are rough under load"}
    dev = None
    net = None
    try:
        kp = os.path.join(tmp, "op.key")
        key = OperatorKey.generate(kp)
        net = Net(tmp, routes={"a": ["a1", "a2"]}, devices={"d1": {"ops": True}, "d0": {}},
                  operators=[key.public.hex()], lossy={"a": {"loss": a.loss, "delay_ms": a.delay_ms, "rate": a.rate,
                                         "seed": 7}})
        net.start()
        sink = net.echo                 # it records every arrival; .echo = False makes it a sink

        # 1. the path's goodput floor: the device's back-to-back stream of ops-chunk-sized datagrams
        sink.echo = False
        n0 = len(sink.seen)
        size = wire.PAGE + 10
        run_device(net, "d1", "--count", "100", "--size", str(size), "--interval", "0", "--linger", "300")
        got = list(zip(sink.stamps[n0:], (len(d) for d in sink.seen[n0:])))
        if len(got) >= 2:
            span = got[-1][0] - got[0][0]
            floor = sum(n for _, n in got[1:]) / span if span > 0 else None
        else:
            floor = None
        out["goodput_floor_Bps"] = round(floor) if floor else None
        out["goodput_floor_delivered"] = "%d/100" % len(got)

        # 2. tunnel RTT, same path
        sink.echo = True
        res = run_device(net, "d1", "--count", "40", "--interval", "50", "--size", "32", "--linger", "1500")
        rtt = res["rtt_ms_median"]
        out["tunnel_rtt_ms"] = rtt
        out["tunnel_rtt_ms_p99"] = res["rtt_ms_p99"]

        # 3. exec and put through the ops channel
        root = os.path.join(tmp, "root")
        os.mkdir(root)
        dev = subprocess.Popen([micropython(), os.path.join(ROOT, "tools", "device_run.py"), net.device_config("d1"),
                                "--count", "0", "--linger", "0", "--serve", "300000", "--connect-ms", "30000",
                                "--ops-root", root],
                               stdout=open(os.path.join(tmp, "ops-device.log"), "w"), stderr=subprocess.STDOUT,
                               env=mp_env(), cwd=ROOT)
        c = OpsClient.connect(net.gw["control"], "d1", operator_key=kp)
        c.device_timeout = 10
        if not c.wait_up(30):
            with open(os.path.join(tmp, "ops-device.log")) as f:
                raise RuntimeError("the ops device did not come up: %s" % f.read()[-2000:])
        c.exec("pass")
        times = []
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            c.exec("pass")
            times.append((time.perf_counter() - t0) * 1000)
        ex = median(times)
        out["exec_ms_median"] = round(ex, 1)
        out["exec_ms_p90"] = round(sorted(times)[int(len(times) * 0.9)], 1)
        out["exec_target_ms"] = None if rtt is None else 2 * rtt + 20
        out["exec_ok"] = rtt is not None and ex <= 2 * rtt + 20
        # streamed (what `microtun ops DEVICE exec` does): the round trip of a printing snippet, and how
        # soon the first line of a snippet that prints and then runs on (sleeps 300 ms) is at the host
        times, first = [], []
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            c.exec_raw("print(1)", on_output=lambda text: None)
            times.append((time.perf_counter() - t0) * 1000)
        for _ in range(max(3, a.rounds // 3)):
            seen = []
            t0 = time.perf_counter()
            o, _ = c.exec_raw("import time\nprint('first')\ntime.sleep(0.3)",
                              on_output=lambda text: seen.append((time.perf_counter() - t0) * 1000))
            first.append(seen[0] if seen else float("inf"))
        out["exec_stream_ms_median"] = round(median(times), 1)
        out["exec_stream_ms_p90"] = round(sorted(times)[int(len(times) * 0.9)], 1)
        out["exec_stream_ok"] = rtt is not None and median(times) <= 2 * rtt + 20
        out["exec_first_line_ms_median"] = round(median(first), 1)      # the snippet then runs 300 ms more
        out["exec_first_line_ok"] = rtt is not None and median(first) <= 2 * rtt + 20
        data = os.urandom(100000)
        pt = []
        exact = True
        for i in range(3):
            t0 = time.perf_counter()
            c.put("p%d.bin" % i, data)
            pt.append(time.perf_counter() - t0)
            with open(os.path.join(root, "p%d.bin" % i), "rb") as f:
                exact = exact and hashlib.sha256(f.read()).digest() == hashlib.sha256(data).digest()
        put_s = median(pt)
        out["put_100k_s_median"] = round(put_s, 3)
        out["put_100k_Bps"] = round(100000 / put_s)
        out["put_byte_exact"] = exact
        out["put_vs_floor"] = round(100000 / put_s / floor, 2) if floor else None
        out["put_ok"] = bool(floor) and exact and 100000 / put_s >= 0.5 * floor
        st = [d for d in net.gw_status()["devices"] if d["name"] == "d1"][0]["counters"]
        out["gateway_ops_counters"] = {k: v for k, v in sorted(st.items()) if k.startswith("ops_")}
        out["ops_retransmits_total"] = net.gw_status()["counters"].get("ops_retransmit", 0)
        dev.kill()
        dev.wait()
        dev = None

        # 4. cost when unused: heap (in process, sans-I/O) and idle airtime (real processes)
        out["unused_heap_bytes"] = heap_figures()
        # on the same path without loss: a lost INIT or probe would cost one device a retry the other not
        net.netem_cmd(net.netem["a"]["control"], {"set": {"up": {"loss": 0}, "down": {"loss": 0}}})
        idle = {"ops_off": [], "ops_allowed": []}
        for _ in range(2):
            for name in ("d0", "d1"):
                r = run_device(net, name, "--count", "0", "--idle", str(a.idle_ms), "--linger", "0")
                idle["ops_allowed" if name == "d1" else "ops_off"].append(r["health"]["tx_bytes"])
        out["unused_idle_tx_bytes"] = dict(idle, idle_ms=a.idle_ms)
    finally:
        if dev is not None:
            dev.kill()
            dev.wait()
        if net is not None:
            net.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
