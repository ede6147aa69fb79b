"""Mixed fuzzing of a real gateway process (issue 11, defect 5): prints ONE
JSON object.

    .venv/bin/python tools/bench_fuzz_gateway.py [--count N] [--lib DIR]

A gateway (and one PoP, unused) from the real provisioner; the fuzzer first
runs a real handshake and some data with an in-process device core over the
gateway's last-hop link (it holds that hop key, as a compromised PoP
would), capturing what crossed. Then it sends N datagrams (default
1,000,000), a mix of:
  random      random bytes, random length
  mutated     a captured datagram with 1..4 bytes changed (hop MAC now wrong)
  validmac    a captured inner packet with 1..4 bytes changed, resealed with
              the hop key (reaches the inner layer: bad mac1, bad tags...)
  replay      a captured datagram as it was (INITs, TRANSPORTs)
  hoptypes    HOP_PROBE / HOP_KEEPALIVE / unknown types with a valid hop MAC
from many source ports, and reads the gateway's RSS (/proc) after a
warm-up (the first 20 %) and at the end. Then the unix-port device runs
real traffic through the PoP: it must all arrive. --lib runs another copy
of lib/ (e.g. an older commit's) for comparison.
"""
import argparse
import json
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=1000000)
    ap.add_argument("--lib", default=None, help="run the gateway from this lib/ directory")
    a = ap.parse_args()
    lib = Path(a.lib).resolve() if a.lib else ROOT / "lib"
    sys.path.insert(0, str(ROOT / "lib"))
    from microtun_host import localnet
    from microtun import outer
    from microtun.endpoint import Device
    from microtun.config import load as load_device
    from microtun_host.gateway import load_gateway_config

    tmp = tempfile.mkdtemp(prefix="mt-fuzz-")
    net = localnet.Net(tmp, routes={"a": ["a1"]}, devices={"d1": {}, "d2": {}})
    if a.lib:
        os.environ["PYTHONPATH"] = str(lib)
        localnet.LIB = lib
    # d2's last hop answers whoever sends authentic packets on it: the fuzzer
    gj = net.out / "gateway.json"
    g = json.loads(gj.read_text())
    for l in g["links"]:
        if l["name"].startswith("d2/"):
            l["next"] = "learn"
    gj.write_text(json.dumps(g))
    try:
        net.start()
        gw_pid = net.procs["gw"].pid
        cfg = load_gateway_config(str(net.out / "gateway.json"))
        link = [l for l in cfg.links if l.name.startswith("d2/")][0]     # d2's last hop: the fuzzer's
        host, port = net.gw["listen"].rsplit(":", 1)
        gw_addr = (host, int(port))
        dc = load_device(net.device_config("d2"))
        dev = Device(dc.private_key, dc.gateway_public, psk=dc.psk, boot_counter=1)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(0.5)
        caps = []

        def now():
            return int(time.monotonic() * 1000) & 0x3FFFFFFF

        def pump():
            for d, _ in dev.datagrams_to_send():
                pkt = outer.seal(outer.TYPE_DATA, link.in_label, link.key, d)
                caps.append(pkt)
                s.sendto(pkt, gw_addr)
            try:
                while True:
                    r, _ = s.recvfrom(4096)
                    caps.append(r)
                    p = outer.parse(r)
                    if p and p[0] == outer.TYPE_DATA:
                        dev.receive_datagram(r[outer.HEADER_LEN:], 0, now())
                    s.settimeout(0.05)
            except socket.timeout:
                s.settimeout(0.5)
        dev.connect(now())
        pump()
        pump()
        for i in range(30):
            dev.send(1, b"%d:capture" % i, now())
            pump()
        established = dev.established
        rng = random.Random(11)
        inner = [c[outer.HEADER_LEN:] for c in caps if outer.parse(c)]

        def fuzz(kind):
            if kind == 0:
                return rng.randbytes(rng.randrange(1, 300))
            if kind == 1:
                c = bytearray(rng.choice(caps))
                for _ in range(rng.randrange(1, 5)):
                    c[rng.randrange(len(c))] = rng.getrandbits(8)
                return bytes(c)
            if kind == 2:
                c = bytearray(rng.choice(inner))
                for _ in range(rng.randrange(1, 5)):
                    c[rng.randrange(len(c))] = rng.getrandbits(8)
                return outer.seal(outer.TYPE_DATA, link.in_label, link.key, bytes(c))
            if kind == 3:
                return rng.choice(caps)
            t = rng.choice((outer.TYPE_HOP_PROBE, outer.TYPE_HOP_KEEPALIVE, outer.TYPE_HOP_PROBE_REPLY))
            return outer.seal(t, link.in_label, link.key, rng.randbytes(rng.randrange(0, 40)))
        pool = [fuzz(i % 5) for i in range(40000)]
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(16)]
        for x in socks:
            x.setblocking(False)
        r0 = rss_kb(gw_pid)
        warm = a.count // 5
        r_warm = None
        t0 = time.monotonic()
        sent = 0
        for i in range(a.count):
            if i % 8 == 0:
                pool[rng.randrange(len(pool))] = fuzz(rng.randrange(5))
            try:
                socks[i & 15].sendto(pool[i % len(pool)], gw_addr)
                sent += 1
            except OSError:
                pass
            if i == warm:
                time.sleep(0.5)
                r_warm = rss_kb(gw_pid)
            if i % 5000 == 4999:
                time.sleep(0.02)          # let the gateway's socket drain a little
        dt = time.monotonic() - t0
        time.sleep(1.0)
        r_end = rss_kb(gw_pid)
        alive = net.procs["gw"].poll() is None
        res = net.device("d1", "--count", "50", "--interval", "10") if alive else {"error": "gateway died"}
        from microtun_host import control
        counters = control.query(net.gw["control"], {"cmd": "stats"}, timeout=2)["counters"] if alive else {}
        print(json.dumps({
            "bench": "fuzz_gateway", "lib": str(lib), "datagrams": a.count, "sent": sent,
            "rate_per_s": round(sent / dt), "handshake_with_fuzzer_key": established,
            "rss_kb": {"start": r0, "after_warmup": r_warm, "end": r_end},
            "rss_growth_after_warmup_kb": None if r_warm is None or r_end is None else r_end - r_warm,
            "gateway_processed": sum(v for k, v in counters.items() if k not in (
                "data_tx", "response_tx", "stale_answer_tx", "keepalive_tx", "cookie_sent")),
            "gateway_alive": alive, "internal_errors": counters.get("internal_error", 0),
            "legit_after": {"sent": res.get("sent"), "delivered": res.get("delivered")},
            "gateway_counters": counters}))
    finally:
        net.stop()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
