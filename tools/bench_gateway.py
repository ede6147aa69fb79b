"""Gateway benchmark (issue 4): prints ONE JSON object.

    .venv/bin/python tools/bench_gateway.py

- handshakes per second: the gateway endpoint (CPython, one core) answering
  INITs from distinct registered devices, first contact (static-static DH
  computed) and repeat (cached);
- memory per idle device session: 10,000 devices, each with an established
  session (a real handshake for the first ones; the rest built by the same
  code path the handshake ends in, Session.install of a Keypair, without
  the DH, so the run takes seconds), measured with tracemalloc;
- end-to-end round trip through 2 PoPs on loopback with a unix-port device
  (real processes): median and p99.
"""
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))
from microtun.endpoint import Device  # noqa: E402
from microtun.responder import Gateway  # noqa: E402
from microtun.keypair import Keypair  # noqa: E402
from microtun.x25519 import public_key  # noqa: E402
from microtun_host import scratch  # noqa: E402

GW_KEY = bytes(range(101, 133))


def handshakes_per_second(n=200):
    """Raw handshake processing: the under-load limit (cookie replies above
    50 INIT/s) is lifted so every INIT gets a full handshake; the cookie
    path is measured separately."""
    gw = Gateway(GW_KEY)
    gw.params.under_load_per_s = 10 ** 9
    devs = []
    for i in range(n):
        d = Device(os.urandom(32), gw.public_key, boot_counter=1)
        gw.add_peer(d.public_key)
        devs.append(d)
    out = {}
    now = 1000
    for label in ("first_contact", "repeat"):
        inits = []
        for d in devs:
            now += 25
            d.session.current = None
            d.session.hs = None
            d._initiate(now)
            inits.append(d.datagrams_to_send()[0][0])
        before = gw.stats.get("response_tx", 0)     # answered (all the DH done; confirmation needs the device)
        t0 = time.perf_counter()
        for pkt in inits:
            now += 25
            gw.receive_datagram(pkt, "link", now)
        dt = time.perf_counter() - t0
        done = gw.stats.get("response_tx", 0) - before
        if done != n:
            raise RuntimeError("only %d of %d handshakes completed: %r" % (done, n, gw.stats))
        out[label] = round(n / dt, 1)
        gw.datagrams_to_send()
        while gw.next_event():
            pass
    # under load: INITs without a valid mac2 get a cookie reply (at most
    # LINK_COOKIES_PER_S per link), no DH
    inits = []
    for d in devs:
        d.session.current = None
        d.session.hs = None
        d._initiate(now)
        inits.append(d.datagrams_to_send()[0][0])
    gw.under_load = True
    t0 = time.perf_counter()
    for pkt in inits:
        gw.receive_datagram(pkt, "link", now)
    out["inits_under_load_per_second"] = round(n / (time.perf_counter() - t0), 1)
    out["cookie_replies_for_%d_inits_in_one_second" % n] = len(gw.datagrams_to_send())
    out["devices"] = n
    out["x25519"] = "pure Python (microtun.x25519) on CPython"
    return out


def session_memory(n=10000, real=50):
    tracemalloc.start()
    gw = Gateway(GW_KEY)
    base = tracemalloc.get_traced_memory()[0]
    pubs = []
    for i in range(n):
        pub = public_key(os.urandom(32)) if i < real else os.urandom(32)
        s = gw.add_peer(pub, name="d%d" % i, channels=[1, 2])
        if i < real:
            continue      # the real handshakes below
        idx = gw._new_index(s, None)
        kp = Keypair(os.urandom(32), os.urandom(32), idx, i + 1, False, 1000, gw._window)
        gw._by_index[idx] = (s, kp)
        s.install(kp, 1000, as_next=False)
        s.last_freshness = bytes(12)
        s.last_init_at = 1000
        s.ss = os.urandom(32)
        s.paths["d%d/a" % i] = 1000
        s.path_rtt["d%d/a" % i] = 12
        pubs.append(pub)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return {"sessions": n, "bytes_per_session": round(used / n), "target_bytes": 4096,
            "window_packets": gw._window, "note": "tracemalloc, CPython %s" % sys.version.split()[0]}


def round_trip(count=500, interval=10):
    from microtun_host.localnet import Net
    tmp = scratch.mkdtemp("microtun-bench-gw-")   # keys: removed on exit
    net = Net(tmp, routes={"a": ["a1", "a2"]})
    try:
        net.start()
        res = net.device("d1", "--count", str(count), "--interval", str(interval))
        return {"messages": res["sent"], "delivered": res["delivered"], "rtt_ms_median": res["rtt_ms_median"],
                "rtt_ms_p99": res["rtt_ms_p99"], "path": "unix-port device -> a1 -> a2 -> gateway -> echo -> back",
                "note": "device_run measures with time.ticks_ms (1 ms resolution)"}
    finally:
        net.stop()


def main():
    res = {"handshakes_per_second": handshakes_per_second(),
           "idle_session_memory": session_memory(),
           "round_trip_2_pops": round_trip()}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
