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
"ratio" = pop / relay (target >= 1.0, issue 15), per payload size.
"pop_socket_io" says how the PoP reads and sends (recvmmsg/sendmmsg on
Linux; MICROTUN_POP_MMSG=0 in the environment: recvfrom/sendto, for an A/B).
The bare relays stay plain asyncio: they are the yardstick.

Allocator: asyncio's datagram transport reads with recvfrom(256 KiB).
Above glibc's mmap threshold (128 KiB until a large free() raises it)
that buffer is a fresh mmap + mremap + munmap for every datagram (strace
shows it), so the bare relay runs at one of two speeds, ~4x apart,
depending on the process's malloc history: the "collapse under load" of
earlier runs. By default every relay and the PoP run with
MALLOC_MMAP_THRESHOLD_=4 MiB and MALLOC_TRIM_THRESHOLD_=16 MiB (the buffer
comes from the heap, and shrinking it does not hand the heap's top back
with brk each time either: no system call but the recvfrom, the bare
relay's fast mode and the harder yardstick); --malloc default leaves
glibc's defaults ("malloc" in the JSON says which).

Workers (issue 15): the same PoP as one process and as `--workers 2`
(supervisor + 2 processes on one SO_REUSEPORT port, steered by label),
driven with packets on two labels that the steering puts on different
workers. Here the figure is throughput, not CPU: all of the PoP's workers
are stopped, 2 x BURST packets queued, all continued, and the drain timed
by the wall clock. "workers.scaling" = 2-worker / 1-worker packets per
wall second (target >= 1.6 on 2 cores). The generator stays on CPU 0 and
the 2 workers may use both CPUs, so the generator's receive loop competes
with one of them. /proc/loadavg before and after says how busy the
machine was.
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


def measure_wall(dev, sink, dst, pids, pkts, seconds):
    """One round against a PoP whose worker processes are pids: all stopped,
    WALL_BURST packets queued (spread over the labels of pkts), all
    continued. The sink (SO_TIMESTAMPNS) stamps each forwarded packet as it
    arrives and is read every few ms in bulk, so this process neither wakes
    per packet nor competes much with the workers. Each out label (each
    worker, in the 2-worker PoP) drains at packets between its first and
    last arrival over that time; the PoP's rate is the sum over its labels
    (a worker woken a few ms after the other by SIGCONT does not count as
    slower: under steady load there is no such start). Returns (packets per
    wall second, packets per CPU second summed over the workers, lost)."""
    npk = len(pkts)
    send = dev.sendto
    recvmsg = sink.recvmsg
    total = WALL_BURST
    rate_sum = []
    got_all = lost = i = 0
    cpu = 0.0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        for _ in range(total):
            send(pkts[i % npk], dst)
            i += 1
        c0 = sum(cpu_ns(pid) for pid in pids)
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        span = {}                       # out label -> [first stamp, last stamp, count]
        n = 0
        give_up = time.monotonic() + 2.0
        while n < total and time.monotonic() < give_up:
            time.sleep(0.004)
            while True:
                try:
                    data, anc, _, _ = recvmsg(4096, 64)
                except BlockingIOError:
                    break
                ts = 0
                for level, kind, raw in anc:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                        sec, nsec = struct.unpack("ll", raw[:16])
                        ts = sec * 1_000_000_000 + nsec
                e = span.get(data[1:4])
                if e is None:
                    span[data[1:4]] = [ts, ts, 1]
                else:
                    e[1] = ts
                    e[2] += 1
                n += 1
        cpu += (sum(cpu_ns(pid) for pid in pids) - c0) / 1e9
        if n == total and all(e[2] > 1 and e[1] > e[0] for e in span.values()):
            rate_sum.append(sum((e[2] - 1) * 1e9 / (e[1] - e[0]) for e in span.values()))
        got_all += n
        lost += total - n
    return statistics.median(rate_sum) if rate_sum else 0.0, got_all / cpu, lost


WALL_BURST = 3000          # packets per round: all fit one socket buffer at 1200 B (rmem_max 4 MB, doubled)
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def worker_pids(ctl, n, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            st = control.query(ctl, {"cmd": "stats"}, timeout=2.0)
            if st.get("workers_answering") == n:
                return [w["pid"] for w in st["workers"]]
        except control.ControlError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("the %d-worker PoP did not start" % n)
        time.sleep(0.1)


def bench_workers(dev, gw, pop1, pid1, tmp, env, rounds, seconds, gw_port, sink_port, realtime_ok=True):
    """pop1 (one process, pid1) against the same table run with --workers 2;
    both forward labels 100 and 101 to the sink (a socket bound to sink_port)."""
    port2, ctl2 = free_port(), os.path.join(tmp, "w2.sock")
    cfg = {
        "name": "bench-w2", "listen": "127.0.0.1:%d" % port2, "control": ctl2,
        "log_level": "warning", "stats_interval": 0, "routes": WORKER_ROUTES(gw_port, sink_port),
    }
    path = os.path.join(tmp, "pop-w2.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    proc = subprocess.Popen([sys.executable, "-m", "microtun_host.cli", "pop", "--config", path, "--workers", "2"],
                            env=env)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)       # a second gateway socket, stamping arrivals
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sink.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    sink.bind(("127.0.0.1", sink_port))
    sink.setblocking(False)
    try:
        pids2 = worker_pids(ctl2, 2)
        # every process may run on any CPU here: a busy shared machine then
        # hurts both configurations alike instead of whichever was pinned
        if hasattr(os, "sched_setaffinity"):
            for pid in pids2 + [pid1, 0]:
                os.sched_setaffinity(pid, set(range(os.cpu_count() or 1)))
        # On a machine shared with other work, wall-clock throughput measures
        # the neighbours as much as the PoP; real-time priority (SCHED_FIFO,
        # when allowed: root or CAP_SYS_NICE) lets the PoP's processes have
        # the CPUs while they drain a burst (tens of ms), for both the one-
        # and the two-worker PoP alike. The kernel's RT throttling still
        # leaves the rest of the machine 5 % of every second.
        realtime = False
        if realtime_ok:
            try:
                for pid in pids2 + [pid1]:
                    os.sched_setscheduler(pid, os.SCHED_FIFO, os.sched_param(10))
                realtime = True
            except (OSError, AttributeError):
                pass
        out = {}
        for size in SIZES:
            pkts = [outer.seal(outer.TYPE_DATA, 102 - (j & 1), outer.HopKey(K_IN), os.urandom(size))
                    for j in range(256)]
            targets = {"one": (pop1, [pid1]), "two": (("127.0.0.1", port2), pids2)}
            wall = {k: [] for k in targets}
            cpu = {k: [] for k in targets}
            lost = 0
            for k, (dst, pids) in targets.items():
                wait_ready(dev, gw, dst, outer.seal(outer.TYPE_DATA, 100, outer.HopKey(K_IN), b"ready"))
                measure_wall(dev, sink, dst, pids, pkts, 0.2)            # warm-up
            for _ in range(rounds):
                for k, (dst, pids) in targets.items():
                    w, c, n_lost = measure_wall(dev, sink, dst, pids, pkts, seconds)
                    wall[k].append(w)
                    cpu[k].append(c)
                    lost += n_lost
            med = {k: statistics.median(v) for k, v in wall.items()}
            out[str(size)] = {
                "one_worker_wall_pps": round(med["one"]), "two_workers_wall_pps": round(med["two"]),
                "scaling": round(med["two"] / med["one"], 3),
                "rounds_wall_pps": {k: [round(x) for x in v] for k, v in wall.items()},
                "cpu_pps": {k: round(statistics.median(v)) for k, v in cpu.items()},
                "lost": lost,
            }
        st = control.query(ctl2, {"cmd": "stats"}, timeout=2.0)
        out["per_worker_forwarded"] = [w.get("forwarded") for w in st["workers"]]
        out["realtime_priority"] = realtime
        out["drops"] = {k: v for k, v in st["drops"].items() if v}
        return out
    finally:
        sink.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def WORKER_ROUTES(gw_port, sink_port):     # noqa: N802 - a table, like ROUTES in the tests
    """Label 100 goes up to the gateway socket (the single-process rounds);
    102 and 101 to the sink (the workers rounds): workers 0 and 1 under
    label % 2; 301 comes back to learn:100 (steered to worker 0)."""
    return [
        {"in_label": 102, "in_key": K_IN.hex(), "next": "127.0.0.1:%d" % sink_port, "out_label": 304,
         "out_key": K_OUT.hex()},
        {"in_label": 100, "in_key": K_IN.hex(), "next": "127.0.0.1:%d" % gw_port, "out_label": 300,
         "out_key": K_OUT.hex()},
        {"in_label": 101, "in_key": K_IN.hex(), "next": "127.0.0.1:%d" % sink_port, "out_label": 302,
         "out_key": K_OUT.hex()},
        {"in_label": 301, "in_key": K_OUT.hex(), "next": "learn:100", "out_label": 103, "out_key": K_IN.hex()},
    ]


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
    ap.add_argument("--no-workers", action="store_true", help="skip the 2-worker comparison")
    ap.add_argument("--malloc", choices=("heap", "default"), default="heap",
                    help="heap (default): MALLOC_MMAP_THRESHOLD_=4 MiB and MALLOC_TRIM_THRESHOLD_=16 MiB for every "
                         "relay process, so asyncio's 256 KiB receive buffer costs no mmap/brk per datagram; "
                         "default: glibc's own thresholds")
    ap.add_argument("--no-realtime", action="store_true",
                    help="workers comparison at normal priority (on a shared machine it then measures the neighbours)")
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
    sink_port = free_port()
    tmp = scratch.mkdtemp("bench_pop")   # keys: removed on exit
    cfg = {
        "name": "bench", "listen": "127.0.0.1:%d" % ports["pop"], "control": "127.0.0.1:%d" % ctl_port,
        "log_level": "warning", "stats_interval": 0,
        "routes": WORKER_ROUTES(gw_port, sink_port),
    }
    path = os.path.join(tmp, "pop.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    env = dict(os.environ, PYTHONPATH=os.environ.get("BENCH_LIB", os.path.join(ROOT, "lib")))
    if args.malloc == "heap":
        env.update(MALLOC_MMAP_THRESHOLD_=str(4 << 20), MALLOC_TRIM_THRESHOLD_=str(16 << 20))
    procs = [subprocess.Popen([sys.executable, "-m", "microtun_host.cli", "pop", "--config", path], env=env)]
    for name, mode in (("relay", "transport"), ("relay_raw", "raw")):
        procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "--bare-relay",
                                       str(ports[name]), str(gw_port), mode], env=env))
    pids = {"pop": procs[0].pid, "relay": procs[1].pid, "relay_raw": procs[2].pid}
    pinned = pin(pids.values())
    load_before = loadavg()
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
        wk = None if args.no_workers else bench_workers(dev, gw, ("127.0.0.1", ports["pop"]), pids["pop"], tmp, env,
                                                         args.rounds, args.seconds, gw_port, sink_port,
                                                         not args.no_realtime)
        st = control.query(("127.0.0.1", ctl_port), {"cmd": "stats"})
        first = results[str(SIZES[0])]
        out = {
            "bench": "pop_forwarding", "python": sys.version.split()[0], "loop": "asyncio",
            "burst": BURST, "rounds": args.rounds, "round_s": args.seconds, "cpus": os.cpu_count(), "pinned": pinned,
            "payload_bytes": SIZES[0], "pop_pps": first["pop_pps"], "relay_pps": first["relay_pps"],
            "ratio": first["ratio"], "target_ratio": 1.0, "by_payload_bytes": results,
            "pop_drops": {k: v for k, v in st["drops"].items() if v}, "pop_socket_io": st.get("socket_io"),
            "malloc": "MALLOC_MMAP_THRESHOLD_=%d MALLOC_TRIM_THRESHOLD_=%d" % (4 << 20, 16 << 20)
            if args.malloc == "heap" else "glibc default",
        }
        if wk is not None:
            out["workers"] = dict(wk, scaling=wk[str(SIZES[0])]["scaling"], target_scaling=1.6)
        out["loadavg_before_after"] = [load_before, loadavg()]
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
