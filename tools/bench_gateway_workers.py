"""The gateway's data plane on every core (issue 15): `microtun gateway`
as one process and with `--workers 2`, side by side in one run, real
processes on loopback. bench_gateway.py calls gateway_workers(); alone:

    .venv/bin/python tools/bench_gateway_workers.py [--devices 32] [--burst 4000] [--rounds 5]

Both gateways serve the same registry: DEVICES devices, one link each
(labels in a row, so the steering puts half of them on each worker), all
delivering channel 1 to one local UDP service, the sink here. This
process plays the devices (sans-I/O microtun.endpoint.Device objects) and
their last PoP: it handshakes every device with each gateway, then in each
round stops the gateway's processes (SIGSTOP), queues BURST sealed 200-byte
inner packets spread over the devices, continues them and reads the sink,
which stamps each delivered packet as it arrives (SO_TIMESTAMPNS). A
worker's rate is its packets between its first and last delivery over
that time, the gateway's rate the sum over its workers (as bench_pop.py
does for the PoP); per CPU second: delivered packets / CPU time the
gateway's processes used (/proc/PID/schedstat). "scaling" = 2-worker /
1-worker packets per wall second, medians over rounds. With real-time
priority for the gateways' processes where allowed (root), as in
bench_pop.py, so neighbours on a shared machine disturb both alike.

Handshakes are not measured here: a gateway process answers at most
GATEWAY_DH_PER_S (200) INITs per second by design (the flood budget,
docs/PROTOCOL.md §10), so through real processes the rate is that budget
times the workers; what one core can do is bench_gateway.py's
`handshakes_per_second`.
"""
import argparse
import json
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "lib"))
from microtun import outer  # noqa: E402
from microtun.endpoint import Device  # noqa: E402
from microtun.x25519 import public_key  # noqa: E402
from microtun_host import control, scratch  # noqa: E402
from microtun_host.workers import link_groups, steering_groups, worker_of  # noqa: E402

SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
GW_KEY = bytes(range(101, 133))
LABEL0 = 1000               # device i: in_label LABEL0 + i, reply_label REPLY0 + i
REPLY0 = 5000
SIZE = 200                  # inner payload bytes


def _cpu_ns(pid):
    with open("/proc/%d/schedstat" % pid) as f:
        return int(f.read().split()[0])


def _udp(rcvbuf=8 << 20, stamp=False):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    if stamp:
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.bind(("127.0.0.1", 0))
    return s


class _Gateway:
    """One `microtun gateway` (workers N) and this process's devices for it."""

    def __init__(self, tmp, workers, keys, hops, peer_port, sink_port, env):
        self.workers = workers
        self.port = _udp().getsockname()[1]     # a free port (closed again: the socket object goes)
        self.ctl = os.path.join(tmp, "gw%d.sock" % workers)
        reg = os.path.join(tmp, "registry-w%d.json" % workers)    # one each: the second write raced the first gateway reading it
        with open(reg, "w") as f:
            json.dump({"devices": [{"name": "d%d" % i, "public_key": public_key(k).hex(), "channels": [1]}
                                   for i, k in enumerate(keys)]}, f)
        self.links = [{"name": "d%d/a" % i, "in_label": LABEL0 + i, "reply_label": REPLY0 + i,
                       "key": h.key.hex(), "next": "127.0.0.1:%d" % peer_port} for i, h in enumerate(hops)]
        path = os.path.join(tmp, "gateway-w%d.json" % workers)
        with open(path, "w") as f:
            json.dump({"name": "bench-w%d" % workers, "listen": "127.0.0.1:%d" % self.port, "control": self.ctl,
                       "private_key": GW_KEY.hex(), "registry": reg, "log_level": "warning",
                       "services": {"1": "127.0.0.1:%d" % sink_port}, "links": self.links}, f)
        self.proc = subprocess.Popen([sys.executable, "-m", "microtun_host.cli", "gateway", "--config", path,
                                      "--workers", str(workers)], env=env, stdout=subprocess.DEVNULL)
        self.devs = [Device(k, public_key(GW_KEY), boot_counter=1) for k in keys]
        self.hops = hops

    def pids(self, timeout=20.0):
        end = time.monotonic() + timeout
        while True:
            try:
                st = control.query(self.ctl, {"cmd": "stats"}, timeout=2.0)
                if self.workers == 1:
                    return [self.proc.pid]
                if st.get("workers_answering") == self.workers:
                    return [w["pid"] for w in st["workers"]]
            except control.ControlError:
                pass
            if self.proc.poll() is not None or time.monotonic() > end:
                raise SystemExit("the %d-worker gateway did not start" % self.workers)
            time.sleep(0.1)

    def seal(self, i, pkt):
        return bytes(outer.seal(outer.TYPE_DATA, LABEL0 + i, self.hops[i], pkt))

    def connect(self, peer, timeout=10.0):
        """Handshake every device (INIT -> RESPONSE -> keepalive), retrying
        the ones not answered (a worker's DH budget is 200 per second)."""
        dst = ("127.0.0.1", self.port)
        now = 1000
        end = time.monotonic() + timeout
        while not all(d.established for d in self.devs):
            if time.monotonic() > end:
                raise SystemExit("%d-worker gateway: %d of %d devices connected" % (
                    self.workers, sum(d.established for d in self.devs), len(self.devs)))
            now += 2000
            for i, d in enumerate(self.devs):
                if not d.established:
                    d.session.hs = None
                    d.connect(now)
                    for pkt, _r in d.datagrams_to_send():
                        peer.sendto(self.seal(i, pkt), dst)
            t = time.monotonic() + 1.0
            peer.settimeout(0.2)
            while time.monotonic() < t and not all(d.established for d in self.devs):
                try:
                    data = peer.recv(4096)
                except socket.timeout:
                    continue
                i = outer.label_of(data) - REPLY0
                if 0 <= i < len(self.devs):
                    self.devs[i].receive_datagram(data[outer.HEADER_LEN:], None, now)
                    for pkt, _r in self.devs[i].datagrams_to_send():     # the keepalive that confirms
                        peer.sendto(self.seal(i, pkt), dst)

    def burst(self, n, payload):
        """n sealed packets, round robin over the devices; each carries its
        device index in its first 2 bytes."""
        out = []
        devs = self.devs
        for j in range(n):
            i = j % len(devs)
            devs[i].send(1, i.to_bytes(2, "big") + payload, 2000)
            out.append(self.seal(i, devs[i].datagrams_to_send()[0][0]))
        return out


def _round(gw, pids, pkts, peer, sink, worker):
    """One burst into gw (its processes pids); (packets per wall second
    summed over workers, delivered, CPU seconds)."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    dst = ("127.0.0.1", gw.port)
    for p in pkts:
        peer.sendto(p, dst)
    c0 = sum(_cpu_ns(p) for p in pids)
    for pid in pids:
        os.kill(pid, signal.SIGCONT)
    span = {}                           # worker -> [first stamp, last stamp, count]
    n = 0
    give_up = time.monotonic() + 3.0
    while n < len(pkts) and time.monotonic() < give_up:
        time.sleep(0.004)
        while True:
            try:
                data, anc, _, _ = sink.recvmsg(4096, 64)
            except BlockingIOError:
                break
            ts = 0
            for level, kind, raw in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("ll", raw[:16])
                    ts = sec * 1_000_000_000 + nsec
            w = worker(int.from_bytes(data[0:2], "big"))
            e = span.get(w)
            if e is None:
                span[w] = [ts, ts, 1]
            else:
                e[1] = ts
                e[2] += 1
            n += 1
    cpu = (sum(_cpu_ns(p) for p in pids) - c0) / 1e9
    rate = sum((e[2] - 1) * 1e9 / (e[1] - e[0]) for e in span.values() if e[2] > 1 and e[1] > e[0])
    return rate, n, cpu


def gateway_workers(devices=32, burst=4000, rounds=5):
    tmp = scratch.mkdtemp("microtun-bench-gwworkers-")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "lib"))
    peer, sink = _udp(), _udp(stamp=True)
    sink.setblocking(False)
    keys = [os.urandom(32) for _ in range(devices)]
    hops = [outer.HopKey(os.urandom(32)) for _ in range(devices)]
    gws = []
    try:
        for w in (1, 2):
            gws.append(_Gateway(tmp, w, keys, hops, peer.getsockname()[1], sink.getsockname()[1], env))
        pids = {gw.workers: gw.pids() for gw in gws}
        for gw in gws:
            gw.connect(peer)
        exceptions = steering_groups(link_groups([_LinkName(l) for l in gws[1].links]), 2)
        workers = {1: lambda i: 0, 2: lambda i: worker_of(LABEL0 + i, 2, exceptions)}
        realtime = False
        try:
            for p in pids[1] + pids[2]:
                os.sched_setscheduler(p, os.SCHED_FIFO, os.sched_param(10))
            realtime = True
        except (OSError, AttributeError):
            pass
        payload = os.urandom(SIZE - 2)
        load = [round(x, 2) for x in os.getloadavg()]
        for gw in gws:          # warm-up: the first packet of each device opens its service socket
            _round(gw, pids[gw.workers], gw.burst(devices * 4, payload), peer, sink, workers[gw.workers])
        wall = {1: [], 2: []}
        cpu = {1: [], 2: []}
        lost = {1: 0, 2: 0}
        for _ in range(rounds):
            for gw in gws:
                pkts = gw.burst(burst, payload)
                rate, n, c = _round(gw, pids[gw.workers], pkts, peer, sink, workers[gw.workers])
                wall[gw.workers].append(rate)
                cpu[gw.workers].append(n / c if c > 0 else 0)
                lost[gw.workers] += len(pkts) - n
        med = {k: statistics.median(v) for k, v in wall.items()}
        st2 = control.query(gws[1].ctl, {"cmd": "stats"}, timeout=3.0)
        return {
            "devices": devices, "burst": burst, "rounds": rounds, "payload_bytes": SIZE,
            "one_worker_wall_pps": round(med[1]), "two_workers_wall_pps": round(med[2]),
            "scaling": round(med[2] / med[1], 3) if med[1] else None,
            "rounds_wall_pps": {"one": [round(x) for x in wall[1]], "two": [round(x) for x in wall[2]]},
            "per_cpu_s": {"one": round(statistics.median(cpu[1])), "two": round(statistics.median(cpu[2]))},
            "lost": {"one": lost[1], "two": lost[2]},
            "two_workers_data_rx": st2["counters"].get("data_rx"), "workers_answering": st2.get("workers_answering"),
            "realtime_priority": realtime, "load_average_before": load,
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        }
    finally:
        for gw in gws:
            gw.proc.terminate()
        for gw in gws:
            try:
                gw.proc.wait(10)
            except subprocess.TimeoutExpired:
                gw.proc.kill()
                gw.proc.wait()
        peer.close()
        sink.close()
        scratch.remove(tmp)


class _LinkName:
    """What workers.link_groups reads of a gateway link."""

    def __init__(self, d):
        self.name = d["name"]
        self.in_label = d["in_label"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=32)
    ap.add_argument("--burst", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    print(json.dumps(gateway_workers(a.devices, a.burst, a.rounds)))


if __name__ == "__main__":
    main()
