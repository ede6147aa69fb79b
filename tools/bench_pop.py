"""PoP forwarding rate vs a bare asyncio UDP relay, on loopback; prints one
JSON object.

    .venv/bin/python tools/bench_pop.py [--rounds 5] [--seconds 1.0]

Three relays run as separate processes for the whole run:
  pop          `microtun pop` (verify hop MAC, relabel, re-MAC, learn, count)
  relay        bare asyncio relay: datagram_received -> transport.sendto, nothing else
  relay_raw    the same with sock.sendto on the raw socket (what the PoP does)
One traffic generator drives them all, in interleaved rounds (pop, relay,
relay_raw, pop, ...). Each round is a series of bursts: the relay process
is paused (SIGSTOP), BURST packets fill its socket buffer, then it is
continued and drains the queue back to back (saturated, as under load,
and independent of how fast this Python generator can send). Rate =
packets forwarded / CPU time the relay process used (/proc/PID/schedstat),
which is what one core can forward; "wall_pps" is packets / wall time of
the drain. Generator and relays are pinned to different CPUs when there
are two. Each figure is the median over rounds, in packets/s.
"ratio" = pop / relay (target >= 0.6), per payload size.
"""
import argparse
import asyncio
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
from microtun_host import control  # noqa: E402
from microtun_host import scratch  # noqa: E402

BURST = 1000               # packets per burst (fits the relay's 4 MB receive buffer)
SIZES = (100, 1200)            # outer payload bytes: a small inner packet, a full one
K_IN = bytes(range(32))
K_OUT = bytes(range(32, 64))
K_REV = bytes(range(64, 96))


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- the bare relay (runs in a child process) -------------------------------

class BareRelay(asyncio.DatagramProtocol):
    def __init__(self, dest, raw):
        self.dest = dest
        self.raw = raw

    def connection_made(self, transport):
        self.transport = transport
        self.sock = transport.get_extra_info("socket")
        self.send = self.sock_send if self.raw else transport.sendto

    def sock_send(self, data, addr):
        try:
            self._sock.sendto(data, addr)
        except OSError:
            pass

    def datagram_received(self, data, addr):
        self.send(data, self.dest)


def run_bare(port, dest_port, raw):
    loop = asyncio.new_event_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
    sock.bind(("127.0.0.1", port))
    sock.setblocking(False)
    proto = BareRelay(("127.0.0.1", dest_port), raw)
    proto._sock = sock
    loop.run_until_complete(loop.create_datagram_endpoint(lambda: proto, sock=sock))
    loop.run_forever()


# --- traffic generator ------------------------------------------------------

def pin(relay_pids):
    """Generator on CPU 0, every relay on CPU 1: all relays see the same
    conditions (run-to-run variance on a shared VM is otherwise 2-3x)."""
    if not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2:
        return False
    os.sched_setaffinity(0, {0})
    for pid in relay_pids:
        os.sched_setaffinity(pid, {1})
    return True


def cpu_ns(pid):
    """CPU time (user + system) the process has used, from /proc/PID/schedstat."""
    with open("/proc/%d/schedstat" % pid) as f:
        return int(f.read().split()[0])


def measure(dev, gw, dst, pid, pkts, seconds):
    """One round against the relay at dst (process pid), saturated: the
    relay is stopped (SIGSTOP) while a burst of BURST packets fills its
    socket buffer, then continued and timed while it drains the queue.
    Returns (packets per CPU-second of the relay, packets per wall second
    of draining, packets lost)."""
    npk = len(pkts)
    send = dev.sendto
    recv = gw.recv
    got = lost = i = 0
    cpu = wall = 0.0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        os.kill(pid, signal.SIGSTOP)
        for _ in range(BURST):
            send(pkts[i % npk], dst)
            i += 1
        c0 = cpu_ns(pid)
        t0 = time.perf_counter()
        os.kill(pid, signal.SIGCONT)
        n = 0
        while n < BURST:
            try:
                recv(4096)
            except OSError:             # SO_RCVTIMEO expired: count the rest lost
                break
            n += 1
        wall += time.perf_counter() - t0
        cpu += (cpu_ns(pid) - c0) / 1e9
        got += n
        lost += BURST - n
    return got / cpu, got / wall, lost


def set_timeout(sock, seconds):
    """A kernel receive timeout (SO_RCVTIMEO): a blocking recv() with no
    extra poll() per call, unlike socket.settimeout()."""
    sec = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                    struct.pack("ll", sec, int((seconds - sec) * 1e6)))


def drain(gw):
    set_timeout(gw, 0.05)
    try:
        while True:
            gw.recv(4096)
    except OSError:
        pass
    set_timeout(gw, 0.2)


def wait_ready(dev, gw, dst, pkt):
    for _ in range(100):
        dev.sendto(pkt, dst)
        try:
            gw.recv(4096)
            drain(gw)
            return
        except OSError:
            pass
    raise SystemExit("relay at %s never forwarded" % (dst,))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.5)
    ap.add_argument("--bare-relay", nargs=3, metavar=("PORT", "DEST_PORT", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_relay:
        port, dest, mode = args.bare_relay
        return run_bare(int(port), int(dest), mode == "raw")

    gw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dev = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (gw, dev):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.bind(("127.0.0.1", 0))
    set_timeout(gw, 0.2)
    gw_port = gw.getsockname()[1]

    ports = {"pop": free_port(), "relay": free_port(), "relay_raw": free_port()}
    ctl_port = free_port()
    tmp = scratch.mkdtemp("bench_pop")   # keys: removed on exit
    cfg = {
        "name": "bench", "listen": "127.0.0.1:%d" % ports["pop"], "control": "127.0.0.1:%d" % ctl_port,
        "log_level": "warning", "stats_interval": 0,
        "routes": [
            {"in_label": 100, "in_key": K_IN.hex(), "next": "127.0.0.1:%d" % gw_port,
             "out_label": 300, "out_key": K_OUT.hex()},
            {"in_label": 301, "in_key": K_OUT.hex(), "next": "learn:100", "out_label": 101, "out_key": K_IN.hex()},
        ],
    }
    path = os.path.join(tmp, "pop.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    env = dict(os.environ, PYTHONPATH=os.environ.get("BENCH_LIB", os.path.join(ROOT, "lib")))
    procs = [subprocess.Popen([sys.executable, "-m", "microtun_host.cli", "pop", "--config", path], env=env)]
    for name, mode in (("relay", "transport"), ("relay_raw", "raw")):
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--bare-relay",
                                       str(ports[name]), str(gw_port), mode], env=env))
    pids = {"pop": procs[0].pid, "relay": procs[1].pid, "relay_raw": procs[2].pid}
    pinned = pin(pids.values())
    try:
        results = {}
        for size in SIZES:
            pkts = [outer.seal(outer.TYPE_DATA, 100, outer.HopKey(K_IN), os.urandom(size)) for _ in range(256)]
            rates = {k: [] for k in ports}
            walls = {k: [] for k in ports}
            lost = 0
            for k, p in ports.items():
                wait_ready(dev, gw, ("127.0.0.1", p), pkts[0])
                measure(dev, gw, ("127.0.0.1", p), pids[k], pkts, 0.2)     # warm-up
            for _ in range(args.rounds):
                for k, p in ports.items():
                    cpu_rate, wall_rate, n_lost = measure(dev, gw, ("127.0.0.1", p), pids[k], pkts, args.seconds)
                    rates[k].append(cpu_rate)
                    walls[k].append(wall_rate)
                    lost += n_lost
            med = {k: statistics.median(v) for k, v in rates.items()}
            results[str(size)] = {
                "pop_pps": round(med["pop"]), "relay_pps": round(med["relay"]),
                "relay_raw_pps": round(med["relay_raw"]),
                "ratio": round(med["pop"] / med["relay"], 3),
                "ratio_vs_raw": round(med["pop"] / med["relay_raw"], 3),
                "rounds_pps": {k: [round(x) for x in v] for k, v in rates.items()},
                "wall_pps": {k: round(statistics.median(v)) for k, v in walls.items()},
                "lost": lost,
            }
        st = control.query(("127.0.0.1", ctl_port), {"cmd": "stats"})
        first = results[str(SIZES[0])]
        out = {
            "bench": "pop_forwarding", "python": sys.version.split()[0], "loop": "asyncio",
            "burst": BURST, "rounds": args.rounds, "round_s": args.seconds, "cpus": os.cpu_count(), "pinned": pinned,
            "payload_bytes": SIZES[0], "pop_pps": first["pop_pps"], "relay_pps": first["relay_pps"],
            "ratio": first["ratio"], "target_ratio": 0.6, "by_payload_bytes": results,
            "pop_drops": {k: v for k, v in st["drops"].items() if v},
        }
        print(json.dumps(out))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()


if __name__ == "__main__":
    main()
