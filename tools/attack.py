"""Attack tools for the issue 11 benchmark (tools/bench_attack.py): what an
attacker on the path, or a compromised host holding one device's or one
PoP's keys, can send. Loopback only; every loop is bounded in time.

    pool = fresh_inits(2000, gw_public, label, hop_key)   # valid mac1 + hop MAC
    write_pool(path, pool)
    python tools/attack.py flood --target 127.0.0.1:7101 --pool FILE --seconds 20
        -> one JSON line: packets sent, rate reached, replies received

    tap = Tap("127.0.0.1:7101")         # a counting UDP relay: device <-> tap <-> PoP
    tap.captured                        # the device's first outer packets
    tap.down                            # what came back, by kind ("cookie", "transport", ...)

    f = Fuzzer(captures, insider=(label, hop_key), seed=1)
    f.next()                            # random | mutated capture | re-sealed mutation

Plus rss_kb(pid) (from /proc/PID/status) and udp_drops(port) (the kernel's
per-socket drop count from /proc/net/udp).
"""
import json
import os
import random
import select
import socket
import struct
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))
from microtun import outer  # noqa: E402
from microtun import messages as m  # noqa: E402

INIT_OUTER_LEN = outer.HEADER_LEN + m.INIT_LEN
LOOPBACK_SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.0.7")


def hostport(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


# --- packets ------------------------------------------------------------------

def random_packets(n, rnd, size=INIT_OUTER_LEN):
    """n datagrams of random bytes (INIT-sized by default)."""
    return [rnd.randbytes(size) for _ in range(n)]


def fresh_inits(n, gw_public, label, hop_key, rnd):
    """n distinct INITs that pass every check before the DH: a valid mac1
    (the gateway's public key is no secret) and a valid hop MAC on `label`
    (the insider's own hop key). Their Noise part is random, so a gateway
    that reaches the DH fails it: what a compromised host can send."""
    k1 = m.mac1_key(gw_public)
    hk = outer.HopKey(hop_key)
    out = []
    for _ in range(n):
        body = m.header(m.TYPE_INIT) + rnd.randbytes(m.INIT_MAC1 - 4)
        msg = m.finish(body, k1, None)[0]
        out.append(outer.seal(outer.TYPE_DATA, label, hk, msg))
    return out


def inner_type(pkt):
    """What an outer packet carries: "cookie", "response", "init",
    "transport", "probe_reply", "probe", "keepalive" or "other"."""
    if len(pkt) < outer.HEADER_LEN:
        return "other"
    t = pkt[0] & 0x0F
    if t == outer.TYPE_HOP_PROBE_REPLY:
        return "probe_reply"
    if t == outer.TYPE_HOP_PROBE:
        return "probe"
    if t == outer.TYPE_HOP_KEEPALIVE:
        return "keepalive"
    if t != outer.TYPE_DATA:
        return "other"
    return {m.TYPE_INIT: "init", m.TYPE_RESPONSE: "response", m.TYPE_COOKIE: "cookie",
            m.TYPE_TRANSPORT: "transport"}.get(m.message_type(pkt[outer.HEADER_LEN:]), "other")


def write_pool(path, packets):
    with open(path, "wb") as f:
        for p in packets:
            f.write(struct.pack(">H", len(p)) + p)


def read_pool(path):
    data = Path(path).read_bytes()
    out, i = [], 0
    while i + 2 <= len(data):
        n = struct.unpack_from(">H", data, i)[0]
        out.append(data[i + 2:i + 2 + n])
        i += 2 + n
    return out


class Fuzzer:
    """Mixed fuzz input, one third each: random bytes of random length;
    a captured packet with 1-3 bytes changed (or cut, or extended) and its
    MAC left alone; a captured packet's payload changed the same way and
    re-sealed under the insider's (label, hop key), so it passes the hop
    MAC and reaches the next layer."""

    def __init__(self, captures, insider, seed=1, kinds=(0, 1, 2)):
        self.caps = [bytes(c) for c in captures if len(c) >= outer.HEADER_LEN]
        if not self.caps:
            raise ValueError("the fuzzer needs at least one captured outer packet")
        self.label, key = insider
        self.key = outer.HopKey(key)
        self.rnd = random.Random(seed)
        self.kinds = tuple(kinds)      # 0 random, 1 mutated capture, 2 re-sealed mutation
        self.i = 0

    def _mutate(self, b):
        r = self.rnd
        b = bytearray(b)
        for _ in range(r.randrange(1, 4)):
            op = r.randrange(8)
            if op == 0 and b:
                del b[r.randrange(len(b)):]               # cut
            elif op == 1:
                b += r.randbytes(r.randrange(1, 40))       # extend
            elif b:
                b[r.randrange(len(b))] = r.randrange(256)  # change a byte
        return bytes(b)

    def next(self):
        r = self.rnd
        k = self.kinds[self.i % len(self.kinds)]
        self.i += 1
        if k == 0:
            return r.randbytes(r.randrange(0, 200))
        c = r.choice(self.caps)
        if k == 1:
            return self._mutate(c)
        ptype = c[0] & 0x0F
        if ptype not in (outer.TYPE_DATA, outer.TYPE_HOP_PROBE, outer.TYPE_HOP_KEEPALIVE):
            ptype = outer.TYPE_DATA
        payload = self._mutate(c[outer.HEADER_LEN:])[:outer.PAYLOAD_MAX]
        if ptype != outer.TYPE_DATA and r.randrange(2):
            payload = payload[:outer.PROBE_MAX if ptype == outer.TYPE_HOP_PROBE else 0]
        return outer.seal(ptype, self.label, self.key, payload)


# --- a counting relay ------------------------------------------------------------

class Tap:
    """A transparent UDP relay in a thread between a device and its first
    PoP: the device's config points at tap.addr. Keeps the device's first
    `keep` outer packets (captures for replay) and counts both directions
    by kind. The PoP sees the tap's address, as it would see a NAT's."""

    def __init__(self, upstream, keep=200):
        self.up = hostport(upstream)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.addr = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.out.bind(("127.0.0.1", 0))
        for s in (self.sock, self.out):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.setblocking(False)
        self.keep = keep
        self.captured = []
        self.upward = {}
        self.down = {}
        self.client = None
        self._stop = False
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def counts(self):
        with self._lock:
            return {"up": dict(self.upward), "down": dict(self.down)}

    def _run(self):
        socks = [self.sock, self.out]
        while not self._stop:
            r, _, _ = select.select(socks, [], [], 0.1)
            for s in r:
                for _ in range(256):
                    try:
                        d, a = s.recvfrom(65535)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    kind = inner_type(d)
                    with self._lock:
                        if s is self.sock:
                            self.client = a
                            self.upward[kind] = self.upward.get(kind, 0) + 1
                            if len(self.captured) < self.keep:
                                self.captured.append(d)
                        else:
                            self.down[kind] = self.down.get(kind, 0) + 1
                    try:
                        if s is self.sock:
                            self.out.sendto(d, self.up)
                        elif self.client is not None:
                            self.sock.sendto(d, self.client)
                    except OSError:
                        pass

    def stop(self):
        self._stop = True
        self.thread.join(2)
        self.sock.close()
        self.out.close()


# --- process figures ---------------------------------------------------------------

def rss_kb(pid):
    """Resident set size of a process in KB (VmRSS), None if it is gone."""
    try:
        for line in Path("/proc/%d/status" % pid).read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def udp_drops(port):
    """The kernel's drop counter of the UDP socket bound to `port` (its
    receive buffer overflowed), from /proc/net/udp; None if not found."""
    try:
        lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        f = line.split()
        if len(f) >= 13 and int(f[1].split(":")[1], 16) == port:
            return int(f[-1])
    return None


# --- the flood (a subprocess) ------------------------------------------------------

def flood(target, packets, seconds, sources=2, rate=0):
    """Send `packets` round-robin to target for `seconds` from one socket per
    source address, as fast as possible (rate 0) or paced to `rate` packets/s;
    reads every reply that comes back to those sockets meanwhile. Returns
    {"sent", "seconds", "rate", "replies", "reply_kinds"}."""
    dest = hostport(target)
    socks = []
    for i in range(sources):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((LOOPBACK_SOURCES[i % len(LOOPBACK_SOURCES)], 0))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.setblocking(False)
        socks.append(s)
    replies = {}

    def drain():
        for s in socks:
            while True:
                try:
                    d = s.recv(65535)
                except OSError:
                    break
                k = inner_type(d)
                replies[k] = replies.get(k, 0) + 1

    sent = 0
    batch = 256
    t0 = time.monotonic()
    end = t0 + seconds
    senders = [s.sendto for s in socks]
    n = len(packets)
    j = 0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        if rate and sent > (now - t0) * rate:
            time.sleep(0.001)
            drain()
            continue
        for send in senders:
            for _ in range(batch):
                try:
                    send(packets[j], dest)
                    sent += 1
                except OSError:
                    pass
                j += 1
                if j == n:
                    j = 0
        drain()
    dt = time.monotonic() - t0
    quiet = time.monotonic() + 0.5            # late replies
    while time.monotonic() < quiet:
        time.sleep(0.05)
        drain()
    for s in socks:
        s.close()
    return {"sent": sent, "seconds": round(dt, 3), "rate": round(sent / dt), "sources": sources,
            "replies": sum(replies.values()), "reply_kinds": replies}


def main(argv):
    import argparse
    ap = argparse.ArgumentParser(prog="tools/attack.py")
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("flood", help="send a pool of datagrams at a target; print one JSON line")
    f.add_argument("--target", required=True, help="host:port on loopback")
    f.add_argument("--pool", required=True, help="file written by write_pool()")
    f.add_argument("--seconds", type=float, default=5.0)
    f.add_argument("--sources", type=int, default=2, help="sockets, each on its own 127.0.0.x address")
    f.add_argument("--rate", type=int, default=0, help="packets/s, 0 = as fast as possible")
    f.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    a = ap.parse_args(argv)
    host = hostport(a.target)[0]
    if not host.startswith("127."):
        print("attack.py: only loopback targets (127.0.0.0/8), got %s" % a.target, file=sys.stderr)
        return 2
    if not 0 < a.seconds <= 600:
        print("attack.py: --seconds must be in (0, 600]", file=sys.stderr)
        return 2
    if a.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {a.cpu})
    print(json.dumps(flood(a.target, read_pool(a.pool), a.seconds, a.sources, a.rate)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
