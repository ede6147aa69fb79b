"""A handshake flood straight at the gateway (issue 11, defects 1 and 2):
prints ONE JSON object.

    .venv/bin/python tools/bench_gateway_flood.py [--rate N] [--seconds S] [--kind replay|fresh|mixed] [--lib DIR]

Real processes over loopback: one PoP, the gateway, the echo service and a
unix-port device d1 (fresh: it handshakes during the flood, then sends
--count echoes). The flooder plays a compromised PoP: it holds the hop key
of d2's last-hop link and sends the gateway, at --rate per second, either
replays of one captured INIT of d2 ("replay"), fresh INITs with a valid mac1
and a random body ("fresh": what anyone knowing the gateway's public key
can make), or both. Reported: what the gateway processed and sent back
towards d2's link per flood packet, d1's connect time and its echo loss.

This measures the gateway's own defences, with no PoP filtering in front;
the flood rate is what one Python sender reaches here, and whatever the
gateway's socket cannot take in is dropped by the kernel before it sees it,
legitimate packets included.
"""
import argparse
import json
import multiprocessing
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def flooder(pkts, addr, rate, seconds, out):
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(8)]
    for s in socks:
        s.setblocking(False)
    sent = 0
    t0 = time.monotonic()
    n = len(pkts)
    while True:
        el = time.monotonic() - t0
        if el >= seconds:
            break
        due = int(el * rate)
        while sent < due:
            try:
                socks[sent & 7].sendto(pkts[sent % n], addr)
            except OSError:
                pass
            sent += 1
        time.sleep(0.0005)
    out.put((sent, time.monotonic() - t0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=int, default=30000)
    ap.add_argument("--seconds", type=float, default=12)
    ap.add_argument("--kind", default="mixed", choices=("replay", "fresh", "mixed"))
    ap.add_argument("--count", type=int, default=400)
    ap.add_argument("--lib", default=None)
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "lib"))
    from microtun_host import localnet, control
    from microtun import outer, messages as m
    from microtun.endpoint import Device
    from microtun.config import load as load_device
    from microtun_host.gateway import load_gateway_config

    tmp = tempfile.mkdtemp(prefix="mt-flood-")
    net = localnet.Net(tmp, routes={"a": ["a1"]}, devices={"d1": {}, "d2": {}})
    if a.lib:
        localnet.LIB = Path(a.lib).resolve()
    try:
        net.start()
        cfg = load_gateway_config(str(net.out / "gateway.json"))
        link = [l for l in cfg.links if l.name.startswith("d2/")][0]
        host, port = net.gw["listen"].rsplit(":", 1)
        dc = load_device(net.device_config("d2"))
        dev = Device(dc.private_key, dc.gateway_public, psk=dc.psk, boot_counter=1)
        dev.connect(1000)
        init = dev.datagrams_to_send()[0][0]
        rng = random.Random(5)
        mk = m.mac1_key(cfg_gw_public(cfg))
        replay = [outer.seal(outer.TYPE_DATA, link.in_label, link.key, init)]
        fresh = [outer.seal(outer.TYPE_DATA, link.in_label, link.key,
                            m.finish(m.header(m.TYPE_INIT) + rng.randbytes(m.INIT_MAC1 - 4), mk, None)[0])
                 for _ in range(20000)]
        pkts = replay if a.kind == "replay" else fresh if a.kind == "fresh" else \
            [p for pair in zip(fresh, replay * len(fresh)) for p in pair]
        before = control.query(net.gw["control"], {"cmd": "status"}, timeout=2)["status"]
        q = multiprocessing.Queue()
        fp = multiprocessing.Process(target=flooder, args=(pkts, (host, int(port)), a.rate, a.seconds, q))
        fp.start()
        time.sleep(1.0)                       # the flood is on before d1 starts
        res = net.device("d1", "--count", str(a.count), "--interval", "20", "--connect-ms", "10000")
        fp.join(a.seconds + 30)
        sent, dur = q.get(timeout=5)
        time.sleep(0.5)
        after = control.query(net.gw["control"], {"cmd": "status"}, timeout=2)["status"]

        c0, c1 = before["counters"], after["counters"]
        delta = {k: c1.get(k, 0) - c0.get(k, 0) for k in c1 if c1.get(k, 0) != c0.get(k, 0)}
        replies = sum(delta.get(k, 0) for k in ("cookie_sent", "stale_answer_tx", "response_tx")) - \
            (1 if res.get("delivered") else 0)          # d1's own RESPONSE
        processed = sum(v for k, v in delta.items() if k in (
            "init_replay", "bad_mac1", "init_budget", "cookie_limited", "cookie_sent", "bad_init",
            "stale_handshake", "handshake_flood", "outer_bad_mac", "unknown_peer"))
        print(json.dumps({
            "bench": "gateway_flood", "kind": a.kind, "rate_target": a.rate,
            "flood_sent": sent, "flood_rate": round(sent / dur), "gateway_processed": processed,
            "gateway_replies_to_flood": replies,
            "replies_per_flood_packet": round(replies / max(1, sent), 6),
            "device_connect_ms": res.get("connect_ms"),
            "device_sent": res.get("sent"), "device_delivered": res.get("delivered"),
            "device_loss_pct": None if not res.get("sent") else round(100.0 * (res["sent"] - res["delivered"]) / res["sent"], 2),
            "device_error": res.get("error"), "gateway_counter_delta": delta}))
    finally:
        net.stop()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


def cfg_gw_public(cfg):
    from microtun.x25519 import public_key
    return public_key(cfg.private_key)


if __name__ == "__main__":
    main()
