"""The PoP as a real process on 127.0.0.1: forwarding in both directions
through a 2-PoP chain, learned next hops, probes, drops by reason, SIGHUP
reload under traffic, fuzzing, clean shutdown; plus the sans-I/O Forwarder
and the rule that a PoP imports nothing able to decrypt the inner layer.

Topology (labels are local to the node that receives them):

    device --100--> A --200--> B --300--> gateway        (keys K_DA, K_AB, K_BG)
    device <--101-- A <--201-- B <--301-- gateway
                    A's route 201 goes to learn:100 (the device's address)
"""
import ast
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from microtun import outer
from microtun_host import control, pop
from microtun_host.localnet import free_port   # below the ephemeral range, not bind(0)'s: localnet.free_ports says why
from microtun_host.config import Address, parse_address

ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT / "lib"

K_DA = bytes(range(0, 32))       # device <-> A
K_AB = bytes(range(32, 64))      # A <-> B
K_BG = bytes(range(64, 96))      # B <-> gateway
HK = {k: outer.HopKey(k) for k in (K_DA, K_AB, K_BG)}
START_TIMEOUT = 10.0


# --- helpers -------------------------------------------------------------------

def udp(timeout=2.0):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("127.0.0.1", 0))
    s.settimeout(timeout)
    return s


def route(in_label, in_key, nxt, out_label, out_key):
    return {"in_label": in_label, "in_key": in_key.hex(), "next": nxt,
            "out_label": out_label, "out_key": out_key.hex()}


class PopProc:
    """A `python -m microtun_host.cli pop` subprocess with its config file."""

    def __init__(self, tmp_path, name, routes, port=None, **extra):
        self.port = port or free_port()
        self.ctl = ("127.0.0.1", free_port())
        self.addr = ("127.0.0.1", self.port)
        self.path = tmp_path / ("%s.json" % name)
        self.cfg = {"name": name, "listen": "127.0.0.1:%d" % self.port,
                    "control": "127.0.0.1:%d" % self.ctl[1], "log_level": "info",
                    "stats_interval": 0.5, "routes": routes}
        self.cfg.update(extra)
        self.ctl = parse_address(self.cfg["control"]).sockaddr
        self.addr = parse_address(self.cfg["listen"]).sockaddr
        self.write(self.cfg)
        self.log_path = tmp_path / ("%s.log" % name)
        self.log_file = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONPATH=str(LIB))
        self.proc = subprocess.Popen([sys.executable, "-m", "microtun_host.cli", "pop", "--config", str(self.path)],
                                     stdout=self.log_file, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                control.query(self.ctl, {"cmd": "ping"}, timeout=0.2)
                break
            except control.ControlError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("PoP %s did not start:\n%s" % (name, self.log()))

    def write(self, cfg):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cfg))
        os.replace(tmp, self.path)          # atomic: a reload never reads half a file

    def stats(self):
        return control.query(self.ctl, {"cmd": "stats"}, timeout=2.0)

    def wait_stats(self, pred, timeout=5.0):
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if pred(s):
                return s
            if time.monotonic() > deadline:
                raise AssertionError("condition not met, last stats: %s" % json.dumps(s))
            time.sleep(0.005)

    def log(self):
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig=signal.SIGTERM):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(5)
        self.log_file.close()
        return rc


@pytest.fixture
def pops(tmp_path):
    """Start PoPs with start(name, routes); all are stopped at teardown,
    and each must exit 0 with a final stats line."""
    started = []

    def start(name, routes, port=None, **extra):
        p = PopProc(tmp_path, name, routes, port, **extra)
        started.append(p)
        return p

    yield start
    for p in started:
        rc = p.stop()
        text = p.log()
        assert rc == 0, text
        assert "final stats:" in text, text
        assert "Traceback" not in text, text


def chain(pops, gw, extra_b=()):
    """PoPs A and B between a device and the gateway socket gw."""
    b_port = free_port()                 # A's table names B's address before B starts
    a = pops("pop-a", [route(100, K_DA, "127.0.0.1:%d" % b_port, 200, K_AB),
                       route(201, K_AB, "learn:100", 101, K_DA)])
    gw_addr = "127.0.0.1:%d" % gw.getsockname()[1]
    b = pops("pop-b", [route(200, K_AB, gw_addr, 300, K_BG),
                       route(301, K_BG, "127.0.0.1:%d" % a.port, 201, K_AB)] + list(extra_b), port=b_port)
    return a, b


def recv_packets(sock, n, timeout=3.0):
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        try:
            out.append(sock.recvfrom(65536))
        except socket.timeout:
            break
    return out


def accounted(s):
    """rx == forwarded + probes + keepalives + path responses + every drop,
    the per-label packets are exactly the authenticated ones, and the
    per-label drops add up to at most the global ones."""
    assert s["rx"] == (s["forwarded"] + s["probes"] + s["keepalives"] + s["path_responses"]
                       + sum(s["drops"].values())), s
    assert s["dropped"] == sum(s["drops"].values()), s
    auth = sum(v["packets"] for v in s["labels"].values())
    assert auth == (s["forwarded"] + s["probes"] + s["keepalives"] + s["path_responses"]
                    + sum(s["drops"][k] for k in pop.AUTHENTIC_DROPS)), s
    for reason in s["drops"]:
        assert sum(v.get("drops", {}).get(reason, 0) for v in s["labels"].values()) <= s["drops"][reason], s


def answer_challenge(sock, label, key, timeout=2.0):
    """Receive a PATH_CHALLENGE on sock and answer it from there, as a device does."""
    sock.settimeout(timeout)
    while True:
        pkt, src = sock.recvfrom(65536)
        if outer.parse(pkt) == (outer.TYPE_PATH_CHALLENGE, label):
            break
    assert len(pkt) == outer.HEADER_LEN
    sock.sendto(outer.path_response(label, key, pkt), src)
    return pkt


# --- integration -----------------------------------------------------------------

def test_chain_forwards_both_ways_payload_untouched_and_learns_device(pops):
    gw, dev = udp(), udp()
    a, b = chain(pops, gw)
    # before the device has spoken, A has no address for learn:100
    gw.sendto(outer.seal(outer.TYPE_DATA, 301, HK[K_BG], b"too early"), b.addr)
    a.wait_stats(lambda s: s["drops"]["no_route"] == 1)

    payloads = [os.urandom(n) for n in (0, 1, 16, 32, 33, 100, 148, 1200, 1400)]
    for p in payloads:
        dev.sendto(outer.seal(outer.TYPE_DATA, 100, HK[K_DA], p), a.addr)
    got = recv_packets(gw, len(payloads))
    assert len(got) == len(payloads)
    for (pkt, src), p in zip(got, payloads):
        assert src == b.addr
        assert outer.parse(pkt) == (outer.TYPE_DATA, 300)
        assert outer.verify(HK[K_BG], pkt)
        assert pkt[outer.HEADER_LEN:] == p            # the PoPs never change the payload

    for p in payloads:
        gw.sendto(outer.seal(outer.TYPE_DATA, 301, HK[K_BG], p), b.addr)
    got = recv_packets(dev, len(payloads))
    assert [pkt[outer.HEADER_LEN:] for pkt, _ in got] == payloads
    for pkt, src in got:
        assert src == a.addr and outer.parse(pkt) == (outer.TYPE_DATA, 101) and outer.verify(HK[K_DA], pkt)

    sa = a.stats()
    assert sa["learned"] == {"100": "127.0.0.1:%d" % dev.getsockname()[1]}
    assert sa["labels"]["100"]["packets"] == len(payloads)
    assert sa["labels"]["100"]["bytes"] == sum(len(p) + 12 for p in payloads)
    assert sa["forwarded"] == 2 * len(payloads)
    accounted(sa)
    accounted(b.stats())

    # roaming (a NAT rebinding): the device appears at a new address. Its
    # packets are forwarded at once, replies keep going to the validated
    # address until the new one answers the PoP's path challenge, then follow it.
    dev2 = udp()
    dev2.sendto(outer.seal(outer.TYPE_DATA, 100, HK[K_DA], b"moved"), a.addr)
    assert recv_packets(gw, 1)[0][0][12:] == b"moved"
    chal = answer_challenge(dev2, 100, HK[K_DA])
    assert chal[0] == outer.BYTE0_PATH_CHALLENGE
    a.wait_stats(lambda s: s["path_responses"] == 1)
    gw.sendto(outer.seal(outer.TYPE_DATA, 301, HK[K_BG], b"follow"), b.addr)
    assert recv_packets(dev2, 1)[0][0][12:] == b"follow"
    # an unauthenticated packet from elsewhere never moves the learned address
    dev.sendto(outer.seal(outer.TYPE_DATA, 100, HK[K_AB], b"forged"), a.addr)
    a.wait_stats(lambda s: s["drops"]["bad_mac"] == 1)
    gw.sendto(outer.seal(outer.TYPE_DATA, 301, HK[K_BG], b"still"), b.addr)
    assert recv_packets(dev2, 1)[0][0][12:] == b"still"
    assert "next hop learned" in a.log()


def test_replayed_packets_from_another_address_never_cut_the_return_direction(pops):
    # issue 11, defect 4: captured packets of every kind replayed at the first
    # PoP from another address, every 10 ms, while the gateway streams down
    gw, dev, evil = udp(), udp(), udp()
    a, b = chain(pops, gw)
    captured = [outer.seal(outer.TYPE_DATA, 100, HK[K_DA], os.urandom(60)),
                outer.seal(outer.TYPE_DATA, 100, HK[K_DA], bytes((1, 0, 0, 0)) + os.urandom(144)),  # an INIT
                outer.seal(outer.TYPE_HOP_KEEPALIVE, 100, HK[K_DA], b""),
                outer.seal(outer.TYPE_HOP_PROBE, 100, HK[K_DA], outer.probe_body(1, 2))]
    for c in captured:
        dev.sendto(c, a.addr)
    a.wait_stats(lambda s: s["rx"] == len(captured))
    dev.settimeout(0.0)
    while True:                         # the probe's reply
        try:
            dev.recv(2048)
        except BlockingIOError:
            break
    n = 150
    for i in range(n):
        evil.sendto(captured[i % len(captured)], a.addr)
        gw.sendto(outer.seal(outer.TYPE_DATA, 301, HK[K_BG], i.to_bytes(4, "big")), b.addr)
        time.sleep(0.01)
    dev.settimeout(2.0)
    got = sorted(int.from_bytes(p[12:16], "big") for p, _ in recv_packets(dev, n))
    assert got == list(range(n)), "lost %d of %d return-direction packets" % (n - len(got), n)
    s = a.stats()
    assert s["learned"] == {"100": "127.0.0.1:%d" % dev.getsockname()[1]} and s["moves"] == 1
    # what reached the replaying address: challenges and probe replies, each
    # no larger than its trigger, at most one per replayed packet
    evil.settimeout(0.2)
    back = [p for p, _ in recv_packets(evil, n, timeout=0.5)]
    assert len(back) <= s["challenges"] + s["probes"] - 1
    assert all(len(p) == 12 for p in back if p[0] == outer.BYTE0_PATH_CHALLENGE)
    assert s["challenges"] <= 1.5 / pop.CHALLENGE_TIMEOUT_S + 2       # one outstanding per label at a time
    assert s["labels"]["100"]["drops"]["init_replay"] == len(range(1, n, len(captured)))
    accounted(s)
    assert "init_replay" in a.log() and "path challenge" in a.log()


def test_init_floods_replayed_and_fresh_reach_nobody(pops):
    # issue 11, defect 2, at the first PoP: replayed INITs from many sources,
    # and fresh ones on a label whose hop key the attacker holds, next to a
    # device handshaking on its own label
    K_X = bytes(range(128, 160))
    nxt, dev, evil = udp(), udp(), udp()
    n_addr = "127.0.0.1:%d" % nxt.getsockname()[1]
    a = pops("pop-a", [route(100, K_DA, n_addr, 200, K_AB), route(201, K_AB, "learn:100", 101, K_DA),
                       route(110, K_X, n_addr, 210, K_AB), route(211, K_AB, "learn:110", 111, K_X)])
    hx = outer.HopKey(K_X)

    def init(label, key):
        return outer.seal(outer.TYPE_DATA, label, key, bytes((1, 0, 0, 0)) + os.urandom(144))

    captured = init(100, HK[K_DA])
    dev.sendto(captured, a.addr)
    assert recv_packets(nxt, 1)[0][0][12:] == captured[12:]
    evil.sendto(init(110, hx), a.addr)              # the attacker's own label learns its address
    n, t0 = 4000, time.monotonic()
    for i in range(0, n, 200):
        for j in range(200):
            evil.sendto(captured if j % 2 else init(110, hx), a.addr)
        a.wait_stats(lambda s: s["rx"] >= 2 + i + 200, timeout=10)
        if i % 1000 == 0:
            dev.sendto(init(100, HK[K_DA]), a.addr)
    s = a.wait_stats(lambda s: s["rx"] == 2 + n + 4)
    elapsed = time.monotonic() - t0
    assert s["labels"]["100"]["drops"] == {"init_replay": n // 2}
    fwd_x = s["labels"]["110"]["packets"]         # over-budget INITs are dropped before their MAC
    assert fwd_x + s["labels"]["110"]["drops"]["init_rate"] == 1 + n // 2
    assert fwd_x <= pop.INIT_BURST + elapsed * pop.INIT_RATE + 1, (fwd_x, elapsed)
    got = recv_packets(nxt, 4 + fwd_x, timeout=2.0)
    labels = [outer.parse(p)[1] for p, _ in got]
    assert len(got) == 4 + fwd_x
    assert labels.count(200) == 4                   # every one of the device's INITs got through
    assert labels.count(210) == fwd_x
    evil.settimeout(0.3)
    with pytest.raises(socket.timeout):             # nothing came back to the flood's source
        evil.recvfrom(2048)
    accounted(s)


def test_probe_reply_echoes_and_reports_observed_address(pops):
    gw, dev = udp(), udp()
    a = pops("pop-a", [route(100, K_DA, "127.0.0.1:%d" % gw.getsockname()[1], 300, K_BG)])
    for body in (bytes(range(19)), outer.probe_body(7, 0x3FFFFFFF), bytes(range(32))):
        probe = outer.seal(outer.TYPE_HOP_PROBE, 100, HK[K_DA], body)
        dev.sendto(probe, a.addr)
        pkt, src = dev.recvfrom(2048)
        assert src == a.addr
        assert outer.parse(pkt) == (outer.TYPE_HOP_PROBE_REPLY, 100)
        assert outer.verify(HK[K_DA], pkt)                      # same label, same key
        assert len(pkt) <= len(probe)                           # never larger than the probe
        echo, fam, port, ip = outer.parse_probe_reply(pkt[12:])
        assert echo == body[:len(body) - 7]
        assert (fam, port, ip) == (4, dev.getsockname()[1], bytes((127, 0, 0, 1)))
    # bad MAC, too short or oversized probes and reply types get no answer
    dev.sendto(outer.seal(outer.TYPE_HOP_PROBE, 100, HK[K_AB], bytes(20)), a.addr)
    dev.sendto(outer.seal(outer.TYPE_HOP_PROBE, 100, HK[K_DA], bytes(33)), a.addr)
    dev.sendto(outer.seal(outer.TYPE_HOP_PROBE, 100, HK[K_DA], bytes(18)), a.addr)
    dev.sendto(outer.seal(outer.TYPE_HOP_PROBE_REPLY, 100, HK[K_DA], bytes(7)), a.addr)
    dev.sendto(outer.seal(outer.TYPE_PATH_CHALLENGE, 100, HK[K_DA], b"")[:4] + bytes(8), a.addr)
    s = a.wait_stats(lambda s: s["rx"] == 8)
    assert s["probes"] == 3
    assert (s["drops"]["bad_mac"], s["drops"]["bad_probe"], s["drops"]["unexpected_type"]) == (1, 2, 2)
    assert s["labels"]["100"]["drops"] == {"bad_mac": 1, "bad_probe": 2, "unexpected_type": 2}
    dev.settimeout(0.2)
    with pytest.raises(socket.timeout):
        dev.recvfrom(2048)
    accounted(s)


# (name, datagram, reason)
def _bad_datagrams():
    good = outer.seal(outer.TYPE_DATA, 100, HK[K_DA], b"x" * 40)
    return [
        ("wrong key", outer.seal(outer.TYPE_DATA, 100, HK[K_AB], b"x" * 40), "bad_mac"),
        ("flipped payload tail", good[:-1] + bytes((good[-1] ^ 1,)), "bad_mac"),
        ("flipped mac", good[:4] + bytes((good[4] ^ 0x80,)) + good[5:], "bad_mac"),
        ("truncated payload", good[:-3], "bad_mac"),
        ("unknown label", outer.seal(outer.TYPE_DATA, 555, HK[K_DA], b"x"), "unknown_label"),
        ("empty", b"", "short"),
        ("truncated header", good[:5], "short"),
        ("eleven bytes", good[:11], "short"),
        ("version 2", bytes((0x21,)) + good[1:], "bad_version"),
        ("type 13", bytes((0x1D,)) + good[1:], "unknown_type"),
        ("label 0", good[:1] + bytes(3) + good[4:], "bad_label"),
    ]


def test_bad_datagrams_dropped_by_reason_while_forwarding_continues(pops):
    gw, dev = udp(), udp()
    a = pops("pop-a", [route(100, K_DA, "127.0.0.1:%d" % gw.getsockname()[1], 300, K_BG)])
    bad = _bad_datagrams()
    want = {}
    for i, (_, d, reason) in enumerate(bad):
        dev.sendto(d, a.addr)
        dev.sendto(outer.seal(outer.TYPE_DATA, 100, HK[K_DA], b"ok%d" % i), a.addr)
        want[reason] = want.get(reason, 0) + 1
    got = recv_packets(gw, len(bad))
    assert [p[12:] for p, _ in got] == [b"ok%d" % i for i in range(len(bad))]
    s = a.wait_stats(lambda s: s["rx"] == 2 * len(bad))
    assert {k: v for k, v in s["drops"].items() if v} == want, s["drops"]
    assert s["forwarded"] == len(bad)
    accounted(s)


def test_sighup_resplice_under_traffic_loses_nothing(pops):
    gw, dev = udp(), udp()
    gw_addr = "127.0.0.1:%d" % gw.getsockname()[1]
    # B has the old path (200 -> 300) and the new one (210 -> 310) ready:
    # make before break; A is re-spliced from 200 to 210 mid-stream.
    a, b = chain(pops, gw, extra_b=[route(210, K_AB, gw_addr, 310, K_BG)])
    n = 1500
    seen = {}
    done = threading.Event()

    def receiver():
        gw.settimeout(0.1)
        while not done.is_set() or len(seen) < n:
            try:
                pkt, _ = gw.recvfrom(2048)
            except socket.timeout:
                if done.is_set():
                    return
                continue
            label = outer.parse(pkt)[1]
            key = HK[K_BG]
            assert outer.verify(key, pkt)
            seq = int.from_bytes(pkt[12:16], "big")
            seen.setdefault(seq, []).append(label)

    t = threading.Thread(target=receiver, daemon=True)
    t.start()
    new_cfg = dict(a.cfg)
    new_cfg["routes"] = [route(100, K_DA, "127.0.0.1:%d" % b.port, 210, K_AB),
                         route(201, K_AB, "learn:100", 101, K_DA)]
    t0 = time.monotonic()
    for i in range(n):
        dev.sendto(outer.seal(outer.TYPE_DATA, 100, HK[K_DA], i.to_bytes(4, "big") + bytes(60)), a.addr)
        if i == n // 3:
            a.write(new_cfg)
            a.proc.send_signal(signal.SIGHUP)
        # pace at ~3000 packets/s
        lag = t0 + (i + 1) / 3000 - time.monotonic()
        if lag > 0:
            time.sleep(lag)
    deadline = time.monotonic() + 5
    while len(seen) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    done.set()
    t.join(2)
    assert len(seen) == n, "lost %d packets" % (n - len(seen))
    assert all(len(v) == 1 for v in seen.values())
    labels = [seen[i][0] for i in range(n)]
    switch = labels.index(310)
    assert 0 < switch and labels[:switch] == [300] * switch and labels[switch:] == [310] * (n - switch)
    sa = a.stats()
    assert sa["reloads"] == 1 and sa["forwarded"] == n and sa["labels"]["100"]["packets"] == n
    assert sa["learned"]                        # learned address kept across the reload
    assert "SIGHUP: reloaded" in a.log()


def test_invalid_reload_keeps_the_old_table(pops):
    gw, dev = udp(), udp()
    a = pops("pop-a", [route(100, K_DA, "127.0.0.1:%d" % gw.getsockname()[1], 300, K_BG)])
    broken = dict(a.cfg)
    broken["routes"] = [dict(a.cfg["routes"][0], in_key="abc")]
    a.write(broken)
    a.proc.send_signal(signal.SIGHUP)
    a.wait_stats(lambda s: s["reload_failures"] == 1)
    reply = control.query(a.ctl, {"cmd": "reload"})
    assert reply["ok"] is False and "routes[0].in_key" in reply["error"]
    dev.sendto(outer.seal(outer.TYPE_DATA, 100, HK[K_DA], b"still here"), a.addr)
    pkt, _ = gw.recvfrom(2048)
    assert pkt[12:] == b"still here" and outer.parse(pkt) == (1, 300)
    lines = [l for l in a.log().splitlines() if "config not reloaded" in l]
    assert len(lines) == 2
    assert str(a.path) in lines[0] and "routes[0].in_key: expected 64 hex characters" in lines[0]
    assert a.stats()["reloads"] == 0


def _fuzz_datagrams(seed, count):
    """Random, truncated, mutated and valid datagrams for a PoP with routes
    100 (K_DA, learn source) and 201 (K_AB, next hop learn:100)."""
    rnd = random.Random(seed)
    keys = [HK[K_DA], HK[K_AB], HK[K_BG]]

    def valid():
        label, key = rnd.choice(((100, HK[K_DA]), (201, HK[K_AB])))
        t = rnd.choice((1, 1, 1, 2))
        n = rnd.randrange(0, 33) if t == 2 else rnd.choice((0, 5, 32, 33, 100, rnd.randrange(0, 1400)))
        if n in (outer.INNER_INIT_LEN, outer.INNER_RESPONSE_LEN, outer.INNER_COOKIE_LEN):
            n += 1                      # handshake messages have their own (time-dependent) budgets: tested apart
        return outer.seal(t, label, key, rnd.randbytes(n))

    # first, before any packet on label 100: reverse traffic has no route yet
    out = [outer.seal(1, 201, HK[K_AB], b"early"), bytes((0x11, 0, 0, 0)) + rnd.randbytes(20)]
    for _ in range(count - len(out)):
        k = rnd.randrange(10)
        if k == 0:
            d = rnd.randbytes(rnd.randrange(0, 64))
        elif k == 1:
            d = rnd.randbytes(rnd.randrange(0, 1500))
        elif k == 2:
            d = valid()[:rnd.randrange(0, 40)]
        elif k in (3, 4):
            b = bytearray(valid())
            for _ in range(rnd.randrange(1, 4)):
                i = rnd.randrange(len(b))
                b[i] ^= 1 << rnd.randrange(8)
            d = bytes(b)
        elif k == 5:
            v = valid()
            d = v + rnd.randbytes(rnd.randrange(1, 20))
        elif k == 6:    # plausible header, random (sometimes zero) label, random MAC
            label = bytes(3) if rnd.randrange(8) == 0 else rnd.randbytes(3)
            d = bytes((0x10 | rnd.randrange(16),)) + label + rnd.randbytes(rnd.randrange(0, 200))
        elif k == 7:    # right label, wrong key
            d = outer.seal(rnd.choice((1, 2, 3)), rnd.choice((100, 201)), rnd.choice(keys[1:]),
                           rnd.randbytes(rnd.randrange(0, 300)))
        else:
            d = valid()
        out.append(d)
    return out


def _predict(datagrams):
    """Expected counters from outer's own checks, in arrival order."""
    keys = {100: HK[K_DA], 201: HK[K_AB]}
    drops, fwd, probes, learned = {}, 0, 0, False
    for d in datagrams:
        p = outer.parse(d)
        if p is None:
            reason = outer.reject_reason(d)
        elif p[1] not in keys or p[0] in (outer.TYPE_SEG_NACK, outer.TYPE_SEG_PONG):
            reason = "unknown_label"        # NACK/PONG labels name a LOOPS out_label: none here
        elif p[0] in (outer.TYPE_HOP_PROBE_REPLY, outer.TYPE_PATH_CHALLENGE, outer.TYPE_SEG_DATA,
                      outer.TYPE_SEG_REPAIR, outer.TYPE_SEG_PING):
            reason = "unexpected_type"
        elif p[0] == outer.TYPE_PATH_RESPONSE:
            reason = "bad_response" if len(d) != 12 else "unsolicited_response"
        elif p[0] == outer.TYPE_HOP_PROBE and not outer.PROBE_MIN <= len(d) - 12 <= outer.PROBE_MAX:
            reason = "bad_probe"
        elif p[0] == outer.TYPE_HOP_KEEPALIVE and len(d) != 12:
            reason = "bad_probe"
        elif not outer.verify(keys[p[1]], d):
            reason = "bad_mac"
        else:
            if p[1] == 100:
                learned = True
            if p[0] == outer.TYPE_HOP_PROBE:
                probes += 1
                continue
            if p[0] == outer.TYPE_HOP_KEEPALIVE:
                continue
            if p[1] == 201 and not learned:
                reason = "no_route"
            else:
                fwd += 1
                continue
        drops[reason] = drops.get(reason, 0) + 1
    return drops, fwd, probes


def test_fuzz_never_breaks_the_pop_and_counters_add_up(pops):
    nxt, dev = udp(), udp()
    a = pops("pop-a", [route(100, K_DA, "127.0.0.1:%d" % nxt.getsockname()[1], 200, K_AB),
                       route(201, K_AB, "learn:100", 101, K_DA)])
    datagrams = _fuzz_datagrams(seed=20240601, count=30000)
    want_drops, want_fwd, want_probes = _predict(datagrams)
    assert want_fwd > 1000 and want_probes > 100 and len(want_drops) >= 9    # the mix is rich
    forwarded_out = []
    burst = 250
    for i in range(0, len(datagrams), burst):
        for d in datagrams[i:i + burst]:
            dev.sendto(d, a.addr)
        a.wait_stats(lambda s: s["rx"] >= i + len(datagrams[i:i + burst]), timeout=10)
        # the stats reply came after the PoP sent everything for this burst:
        # drain what it sent without waiting
        for s in (nxt, dev):
            s.settimeout(0.0)
            while True:
                try:
                    forwarded_out.append(s.recv(65536))
                except BlockingIOError:
                    break
            s.settimeout(2.0)
    s = a.stats()
    assert s["rx"] == len(datagrams)
    # answered probes are bounded per label (PROBE_RATE): the rest are probe_rate drops
    got_drops = {k: v for k, v in s["drops"].items() if v}
    assert got_drops.pop("probe_rate", 0) + s["probes"] == want_probes
    assert got_drops == want_drops
    assert s["forwarded"] == want_fwd and s["probes"] >= pop.PROBE_BURST
    assert s["drops"]["internal_error"] == 0
    accounted(s)
    # everything the PoP sent arrived, and is a well-formed outer packet under its key
    assert len(forwarded_out) == want_fwd + s["probes"]
    out_keys = {200: HK[K_AB], 101: HK[K_DA], 100: HK[K_DA], 201: HK[K_AB]}
    for pkt in forwarded_out:
        t, label = outer.parse(pkt)
        assert outer.verify(out_keys[label], pkt)
    # and it still forwards correctly
    dev.sendto(outer.seal(outer.TYPE_DATA, 100, HK[K_DA], b"after the storm"), a.addr)
    while True:
        pkt = nxt.recv(65536)
        if pkt[12:] == b"after the storm":
            break
    assert outer.verify(HK[K_AB], pkt) and outer.parse(pkt) == (1, 200)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_clean_shutdown_prints_final_stats(tmp_path, sig):
    gw, dev = udp(), udp()
    p = PopProc(tmp_path, "pop-x", [route(100, K_DA, "127.0.0.1:%d" % gw.getsockname()[1], 300, K_BG)])
    dev.sendto(outer.seal(outer.TYPE_DATA, 100, HK[K_DA], b"one"), p.addr)
    dev.sendto(b"junk", p.addr)
    gw.recvfrom(2048)
    p.wait_stats(lambda s: s["rx"] == 2)
    rc = p.stop(sig)
    text = p.log()
    assert rc == 0, text
    final = [l for l in text.splitlines() if "final stats:" in l]
    assert len(final) == 1, text
    assert "rx 2, forwarded 1, probes 0, keepalives 0, dropped 1 (short 1)" in final[0]
    assert "Traceback" not in text


def test_control_channel_errors_are_replies():
    # the server side of control.py, in process: every request gets one reply
    proto = control.ControlProtocol({"echo": lambda req: {"got": req.get("x")},
                                     "boom": lambda req: 1 / 0})
    assert proto.handle(b'{"cmd": "echo", "x": 5, "id": 9}') == {"ok": True, "got": 5, "id": 9}
    assert proto.handle(b'{"cmd": "ping"}') == {"ok": True}
    for bad in (b"", b"\xff", b"[1]", b'{"cmd": 3}', b"{"):
        r = proto.handle(bad)
        assert r["ok"] is False and "cmd" in r["error"]
    r = proto.handle(b'{"cmd": "nope"}')
    assert r["ok"] is False and "known: boom, echo, ping" in r["error"]
    r = proto.handle(b'{"cmd": "boom"}')
    assert r["ok"] is False and "internal error" in r["error"]
    with pytest.raises(control.ControlError):
        control.query(("127.0.0.1", free_port()), {"cmd": "ping"}, timeout=0.2)


# --- the sans-I/O Forwarder --------------------------------------------------------

def _forwarder():
    specs = [pop.RouteSpec(100, K_DA, Address(4, "127.0.0.1", 9001), 0, 200, K_AB),
             pop.RouteSpec(201, K_AB, None, 100, 101, K_DA)]
    return pop.Forwarder(pop.build_table(specs), logging.getLogger("test"))


def test_forwarder_swap_keeps_counters_and_learned_addresses():
    f = _forwarder()
    dev = ("127.0.0.1", 5555)
    out, dest = f.receive(outer.seal(1, 100, HK[K_DA], b"hi"), dev)
    assert dest == ("127.0.0.1", 9001) and outer.verify(HK[K_AB], out)
    out, dest = f.receive(outer.seal(1, 201, HK[K_AB], b"back"), ("127.0.0.1", 9001))
    assert dest == dev and outer.parse(out) == (1, 101)
    # same labels, a new next hop for 100; label 201 removed then re-added
    specs = [pop.RouteSpec(100, K_DA, Address(4, "127.0.0.1", 9002), 0, 210, K_AB),
             pop.RouteSpec(201, K_AB, None, 100, 101, K_DA)]
    assert f.swap(pop.build_table(specs)) == (0, 0, 1)
    assert f.learned == {100: dev}
    assert f.routes[100].packets == 1
    out, dest = f.receive(outer.seal(1, 100, HK[K_DA], b"again"), dev)
    assert dest == ("127.0.0.1", 9002) and outer.parse(out) == (1, 210)
    assert f.swap(pop.build_table(specs[1:])) == (0, 1, 0)
    # label 100 is draining: packets in flight on it still go through, and
    # its learned address still serves route 201
    assert f.learned == {100: dev}
    out, dest = f.receive(outer.seal(1, 100, HK[K_DA], b"in flight"), dev)
    assert dest == ("127.0.0.1", 9002)
    out, dest = f.receive(outer.seal(1, 201, HK[K_AB], b"reply"), ("127.0.0.1", 9001))
    assert dest == dev
    # once the drain time is over, label 100 and what it learned are gone
    f.draining[100] = (f.draining[100][0], 0.0)
    assert f.receive(outer.seal(1, 100, HK[K_DA], b"late"), dev) is None
    assert f.drops["unknown_label"] == 1
    assert f.learned == {}
    assert f.receive(outer.seal(1, 201, HK[K_AB], b"x"), ("127.0.0.1", 9001)) is None
    assert f.drops["no_route"] == 1


def test_forwarder_never_raises_on_random_input():
    f = _forwarder()
    rnd = random.Random(5)
    for i in range(20000):
        f.receive(rnd.randbytes(rnd.randrange(0, 80)), ("127.0.0.1", 1 + i % 60000))
    s = f.stats()
    assert s["rx"] == 20000 and s["drops"]["internal_error"] == 0
    accounted(s)


# --- the PoP cannot decrypt ------------------------------------------------------

FORBIDDEN_TOP = {"cryptography", "Crypto", "Cryptodome", "nacl", "noise"}
# microtun.hopmac: the hop MAC's SHA-256 in native code (a MAC, no cipher), which
# microtun.hop imports on MicroPython only (CPython keeps hashlib's state copies)
ALLOWED_MICROTUN = {"microtun", "microtun.outer", "microtun.hop", "microtun.hopmac", "microtun.hmac"}


def _imports(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update("%s.%s" % (node.module, a.name) for a in node.names)
    return names


def test_pop_imports_nothing_that_could_decrypt():
    # AST walk over pop.py and every microtun/microtun_host module it reaches
    todo, seen = ["microtun_host.pop"], set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = LIB / (mod.replace(".", "/") + ".py")
        if not path.exists():
            path = LIB / mod.replace(".", "/") / "__init__.py"
        if not path.exists():
            continue                    # "from pkg import name" where name is not a module
        for name in _imports(path):
            assert name.split(".")[0] not in FORBIDDEN_TOP, "%s imports %s" % (mod, name)
            if name.startswith("microtun.") or name == "microtun":
                real = name if (LIB / (name.replace(".", "/") + ".py")).exists() or name == "microtun" \
                    else name.rsplit(".", 1)[0]
                assert real in ALLOWED_MICROTUN, "%s imports %s" % (mod, name)
                todo.append(real)
            elif name.startswith("microtun_host."):
                todo.append(name if (LIB / (name.replace(".", "/") + ".py")).exists() else name.rsplit(".", 1)[0])
    assert "microtun.outer" in seen and "microtun_host.config" in seen
    # and at run time, importing the PoP (through the CLI) loads none of them
    code = ("import sys, microtun_host.cli, microtun_host.pop; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('microtun', 'crypto', 'Crypto', 'nacl', 'noise'))))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         env=dict(os.environ, PYTHONPATH=str(LIB))).stdout.split()
    bad = [m for m in out if m.split(".")[0] in FORBIDDEN_TOP or
           (m.startswith("microtun.") and m not in ALLOWED_MICROTUN)]
    assert not bad, bad


def _has_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_ipv6_pop_forwards_and_reports_v6_source(tmp_path):
    gw = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    dev = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    for s in (gw, dev):
        s.bind(("::1", 0))
        s.settimeout(2)
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    p = PopProc(tmp_path, "pop-v6", [route(100, K_DA, "[::1]:%d" % gw.getsockname()[1], 300, K_BG)], port=port,
                listen="[::1]:%d" % port, control="[::1]:%d" % free_port())
    try:
        dev.sendto(outer.seal(outer.TYPE_DATA, 100, HK[K_DA], b"six"), ("::1", port))
        pkt, _ = gw.recvfrom(2048)
        assert pkt[12:] == b"six" and outer.verify(HK[K_BG], pkt)
        probe = outer.probe_body(3, 4)
        dev.sendto(outer.seal(outer.TYPE_HOP_PROBE, 100, HK[K_DA], probe), ("::1", port))
        pkt, _ = dev.recvfrom(2048)
        assert len(pkt) == 12 + len(probe)      # a 19-byte address and the 8 meaningful probe bytes
        echo, fam, sport, ip = outer.parse_probe_reply(pkt[12:])
        assert (echo, fam, sport, ip) == (probe[:8], 6, dev.getsockname()[1], bytes(15) + b"\x01")
        assert outer.probe_fields(echo) == (3, 4)
    finally:
        assert p.stop() == 0, p.log()


def test_hop_keepalive_is_never_answered_and_a_new_address_is_validated_first():
    f = _forwarder()
    dev1, dev2 = ("127.0.0.1", 5555), ("127.0.0.1", 6666)
    f.receive(outer.seal(1, 100, HK[K_DA], b"hi"), dev1)
    assert f.learned == {100: dev1}
    assert f.receive(outer.seal(outer.TYPE_HOP_KEEPALIVE, 100, HK[K_DA], b""), dev1) is None
    assert f.extra == [] and f.keepalives == 1
    # the device's NAT mapping changed: its 12-byte keepalive provokes one
    # 12-byte challenge to the new address, and the address moves once the
    # device answers from there
    assert f.receive(outer.seal(outer.TYPE_HOP_KEEPALIVE, 100, HK[K_DA], b""), dev2) is None
    assert f.learned == {100: dev1} and f.keepalives == 2
    [(chal, dest)] = f.extra
    f.extra.clear()
    assert dest == dev2 and len(chal) == 12 and outer.parse(chal) == (outer.TYPE_PATH_CHALLENGE, 100)
    assert f.receive(outer.path_response(100, HK[K_DA], chal), dev2) is None
    assert f.learned == {100: dev2} and f.path_responses == 1
    out, dest = f.receive(outer.seal(1, 201, HK[K_AB], b"back"), ("127.0.0.1", 9001))
    assert dest == dev2
    # forged or oversized keepalives change nothing
    assert f.receive(outer.seal(outer.TYPE_HOP_KEEPALIVE, 100, HK[K_AB], b""), dev1) is None
    assert f.receive(outer.seal(outer.TYPE_HOP_KEEPALIVE, 100, HK[K_DA], b"x"), dev1) is None
    assert f.learned == {100: dev2} and f.extra == []
    assert f.drops["bad_mac"] == 1 and f.drops["bad_probe"] == 1
    accounted(f.stats())
