"""Issue 11 attack scenarios with real processes over loopback: unix-port
devices, CPython PoPs (route a: a1 -> a2) and gateway, attack traffic from
other loopback addresses (tools/attack.py). Used by tools/bench_attack.py
(figures, JSON) and host_tests/test_attack.py (short runs, behaviour).

Each scenario takes a temp dir (the caller removes it: it holds keys) and
returns a dict of measured values; none asserts anything.

    flood(tmp, "replay", seconds=20)   handshake flood at the first PoP
    replay(tmp, stream_s=22)           captured packets replayed from elsewhere
    fuzz(tmp, "gateway", n=1000000)    mixed fuzz; RSS, crashes, traffic after
    reset_counter(tmp)                 a device whose boot counter went back
"""
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "lib"))
import attack  # noqa: E402
from attack import Tap, Fuzzer, rss_kb, udp_drops, inner_type  # noqa: E402
from path_scenarios import Run  # noqa: E402
from microtun import outer  # noqa: E402
from microtun_host.localnet import Net, PY, py_env  # noqa: E402

KINDS = ("none", "random", "replay", "fresh", "replay_gw")


class AttackNet(Net):
    """A localnet.Net whose devices each keep their own state directory (a
    boot counter per device), and whose device configs can be pointed at a
    Tap in front of the first PoP."""

    def provision(self):
        out = Net.provision(self)
        for d in self.devices:
            p = Path(self.device_config(d))
            cfg = json.loads(p.read_text())
            state = self.tmp / ("state-" + d)
            state.mkdir(exist_ok=True)
            cfg["state_dir"] = str(state)
            p.write_text(json.dumps(cfg))
        return out

    def dev_cfg(self, name):
        return json.loads(Path(self.device_config(name)).read_text())

    def point(self, name, addr):
        """Send device `name`'s path a to `addr` (a Tap) instead of its first PoP."""
        cfg = self.dev_cfg(name)
        cfg["paths"][0]["pop"] = addr
        Path(self.device_config(name)).write_text(json.dumps(cfg))

    def gw_cfg(self):
        return json.loads((self.out / "gateway.json").read_text())

    def pid(self, name):
        return self.procs[name].pid

    def alive(self, name):
        return self.procs[name].poll() is None


def _port(addr):
    return int(addr.rsplit(":", 1)[1])


def _delta(after, before):
    """Changed numeric counters between two flat dicts."""
    out = {}
    for k, v in after.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and v != before.get(k, 0):
            out[k] = v - before.get(k, 0)
    return out


def _gw_counters(net):
    try:
        return dict(net.gw_status()["counters"])
    except Exception as e:           # a dead or unanswering gateway is a figure, not a crash
        return {"_error": str(e)}


def _pop_counters(net, name):
    try:
        s = net.pop_stats(name)
    except Exception as e:
        return {"_error": str(e)}
    flat = {k: s[k] for k in ("rx", "forwarded", "probes", "keepalives", "dropped") if k in s}
    flat.update(("drop_" + k, v) for k, v in s.get("drops", {}).items())
    return flat


def _tap_delta(after, before):
    return {d: _delta(after[d], before[d]) for d in ("up", "down")}


# --- 1. handshake flood at the first PoP ---------------------------------------------

def flood_pool(net, kind, tap, rnd, n=4096):
    """The packets a flood of `kind` cycles through."""
    if kind == "random":
        return attack.random_packets(n, rnd)
    if kind == "replay":
        inits = [p for p in tap.captured if inner_type(p) == "init"]
        if not inits:
            raise RuntimeError("the tap captured no INIT from the device")
        return inits
    if kind == "replay_gw":
        # the same INITs as the last hop (PoP a2 -> gateway) carries them:
        # the bytes an eavesdropper on that link captures
        link = [l for l in net.gw_cfg()["links"] if l["name"].startswith("d1/")][0]
        k = outer.HopKey(bytes.fromhex(link["key"]))
        return [outer.seal(outer.TYPE_DATA, link["in_label"], k, p[outer.HEADER_LEN:])
                for p in flood_pool(net, "replay", tap, rnd)]
    if kind == "fresh":
        d2 = net.dev_cfg("d2")
        p = d2["paths"][0]
        return attack.fresh_inits(n, bytes.fromhex(d2["gateway_public_key"]), p["label"],
                                  bytes.fromhex(p["hop_key"]), rnd)
    raise ValueError("unknown flood kind %r (expected one of %s)" % (kind, ", ".join(KINDS)))


def flood(tmp, kind, seconds=20.0, sources=2, workers=1, interval=20, fresh_after=2.0, rate=0, pin=False,
          linger=2000):
    """A flood of `kind` at PoP a1 (kind "replay_gw": at the gateway) for
    `seconds` while device d1 (behind a Tap) sends an echo every `interval`
    ms (and waits up to `linger` ms for the last replies); `fresh_after` s
    into the flood device d3 starts for the first time. d2's keys are the
    insider's."""
    net = AttackNet(tmp, routes={"a": ["a1", "a2"]}, devices={"d1": {}, "d2": {}, "d3": {}})
    tap = None
    d1 = None
    floods = []
    try:
        net.start()
        tap = Tap(net.pops["a1"]["listen"])
        net.point("d1", tap.addr)
        count = int((seconds + 1.0) * 1000 / interval)
        d1 = Run(net, "d1", "--count", str(count), "--interval", str(interval), "--linger", str(linger))
        d1.wait_connected()
        rnd = random.Random(11)
        pool = flood_pool(net, kind, tap, rnd) if kind != "none" else []
        gw0, pop0, tap0 = _gw_counters(net), _pop_counters(net, "a1"), tap.counts()
        kdrop0 = udp_drops(_port(net.pops["a1"]["listen"])) or 0
        gdrop0 = udp_drops(_port(net.gw["listen"])) or 0
        if pool:
            pool_file = Path(tmp) / "pool.bin"
            attack.write_pool(pool_file, pool)
            # pin: the attacker's processes on the last CPU only (by default
            # they share both CPUs with the network, as everything else here)
            ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
            cpu = ["--cpu", str(max(os.sched_getaffinity(0)))] if pin and ncpu >= 2 else []
            for _ in range(workers):
                floods.append(subprocess.Popen(
                    [PY, str(HERE / "attack.py"), "flood",
                     "--target", net.gw["listen"] if kind == "replay_gw" else net.pops["a1"]["listen"],
                     "--pool", str(pool_file), "--seconds", str(seconds), "--sources", str(sources),
                     "--rate", str(rate // workers if rate else 0)] + cpu,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=py_env()))
        t_flood = time.monotonic()
        time.sleep(fresh_after)
        limit_ms = int(max(1.0, seconds - fresh_after - 0.5) * 1000)
        d3 = net.device("d3", "--count", "3", "--interval", "20", "--linger", "500",
                        "--connect-ms", str(limit_ms), timeout=limit_ms / 1000 + 60)
        results = []
        for p in floods:
            out, err = p.communicate(timeout=seconds + 30)
            if p.returncode != 0:
                raise RuntimeError("flood worker failed: %s" % err[-2000:])
            results.append(json.loads(out.strip().splitlines()[-1]))
        flood_s = time.monotonic() - t_flood
        r1 = d1.result(timeout=seconds + 60)
        time.sleep(0.5)
        gw1, pop1, tap1 = _gw_counters(net), _pop_counters(net, "a1"), tap.counts()
        kdrop1 = udp_drops(_port(net.pops["a1"]["listen"])) or 0
        gdrop1 = udp_drops(_port(net.gw["listen"])) or 0
        sent = sum(r["sent"] for r in results)
        secs = max([r["seconds"] for r in results] or [0])
        attacker_replies = sum(r["replies"] for r in results)
        td = _tap_delta(tap1, tap0)
        own_inits = td["up"].get("init", 0)
        handshake_replies_to_device = td["down"].get("cookie", 0) + td["down"].get("response", 0)
        unsolicited = max(0, handshake_replies_to_device - own_inits)
        gwd = _delta(gw1, gw0)
        # each INIT a device sent may be answered once (a response or a cookie); the rest answered the flood
        legit_inits = own_inits + ((d3.get("health") or {}).get("tunnel") or {}).get("handshake_init_tx", 0)
        # responses: "response_tx" where the gateway counts them apart from confirmed sessions, else
        # "handshake_ok" (counted when the response was sent); plus cookies and stale-counter answers
        responses = gwd.get("response_tx", 0) if "response_tx" in gw1 else gwd.get("handshake_ok", 0)
        gw_replies = max(0, gwd.get("cookie_sent", 0) + gwd.get("stale_answer_tx", 0) + responses - legit_inits)
        return {
            "kind": kind, "target": "gateway" if kind == "replay_gw" else "a1",
            "flood_packets": sent, "flood_seconds": secs,
            "flood_rate": round(sent / secs) if secs else 0, "workers": workers, "sources": sources * workers,
            "fresh_device_connect_ms": d3.get("connect_ms") if "error" not in d3 else None,
            "fresh_device_error": d3.get("error"), "fresh_device_limit_ms": limit_ms,
            "connected_device": {"sent": r1["sent"], "lost": r1["lost"],
                                 "loss": round(r1["lost"] / r1["sent"], 4) if r1["sent"] else None,
                                 "handshakes": r1["handshakes"]},
            "replies_to_attacker": attacker_replies,
            "reply_kinds_to_attacker": _merge([r["reply_kinds"] for r in results]),
            "handshake_replies_to_device": handshake_replies_to_device, "device_inits": own_inits,
            "unsolicited_to_device": unsolicited,
            "replies_per_flood_packet": round((attacker_replies + unsolicited) / sent, 5) if sent else 0.0,
            "gateway_handshake_replies": gw_replies,
            "gateway_replies_per_flood_packet": round(gw_replies / sent, 5) if sent else 0.0,
            "gateway_counters_delta": gwd,
            "pop_a1_delta": _delta(pop1, pop0), "pop_a1_kernel_drops": kdrop1 - kdrop0,
            "pop_a1_read_pps": round((pop1.get("rx", 0) - pop0.get("rx", 0)) / flood_s) if flood_s else None,
            "gateway_kernel_drops": gdrop1 - gdrop0,
            "measured_s": round(flood_s, 1),
        }
    finally:
        if d1 is not None and d1.proc.poll() is None:
            d1.proc.kill()
            d1.proc.wait()
        for p in floods:
            if p.poll() is None:
                p.kill()
                p.wait()
        if tap is not None:
            tap.stop()
        net.stop()


def _merge(dicts):
    out = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


# --- 2. replayed outer packets vs the return direction ---------------------------------

class Streamer:
    """The gateway's channel-1 service for the replay scenario: when the
    device's first message arrives, it streams numbered datagrams back
    ("<id>:stream", ids from BASE) every `interval_ms` for `seconds`; it
    echoes nothing. The device counts what arrives (tools/device_run.py)."""
    BASE = 1000000

    def __init__(self, port, seconds, interval_ms=10):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(0.05)
        self.seconds = seconds
        self.interval = interval_ms / 1000
        self.sent = 0
        self.started = None           # monotonic time of the first stream packet
        self.count = 0
        self.seen = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        peer = None
        nxt = None
        while not self._stop:
            try:
                d, a = self.sock.recvfrom(65535)
                self.count += 1
                if peer is None:
                    peer = a
                    self.started = nxt = time.monotonic()
            except socket.timeout:
                pass
            except OSError:
                return
            while peer is not None and self.sent < self.seconds / self.interval and time.monotonic() >= nxt:
                try:
                    self.sock.sendto(b"%d:stream" % (self.BASE + self.sent), peer)
                except OSError:
                    pass
                self.sent += 1
                nxt = self.started + self.sent * self.interval
            if peer is not None:
                self.sock.settimeout(max(0.0005, min(0.05, nxt - time.monotonic())))

    def stop(self):
        self._stop = True
        self.thread.join(2)
        self.sock.close()


def replay(tmp, stream_s=22.0, every_ms=100, replay_s=20.0, once_at=None, modes=("baseline", "once", "every")):
    """Device d1 (behind a Tap, which captures its packets) sends one message
    a second; the service streams 100 packets/s back for stream_s. An
    attacker at another loopback address sends one captured outer packet to
    PoP a1: never (baseline), once (once_at s into the stream), or every
    every_ms for replay_s. Return-direction loss = streamed - received."""
    net = AttackNet(tmp, routes={"a": ["a1", "a2"]}, devices={"d1": {}})
    tap = None
    out = {"stream_s": stream_s, "stream_rate_pps": 100, "replay_every_ms": every_ms, "replay_for_s": replay_s}
    run = None
    try:
        net.start()
        net.echo.stop()
        tap = Tap(net.pops["a1"]["listen"])
        net.point("d1", tap.addr)
        atk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        atk.bind((attack.LOOPBACK_SOURCES[0], 0))
        atk.setblocking(False)
        a1 = attack.hostport(net.pops["a1"]["listen"])
        captured = None
        for mode in modes:
            net.echo = Streamer(net.echo_port, stream_s)
            count = int(stream_s) + 3
            run = Run(net, "d1", "--count", str(count), "--interval", "1000", "--linger", "1500")
            run.wait_connected()
            if captured is None and mode != "baseline":
                caps = [p for p in tap.captured if inner_type(p) == "transport"]
                captured = caps[-1] if caps else tap.captured[-1]
            end_replay = None
            replays = 0
            t0 = time.monotonic()
            deadline = t0 + count + 10
            while net.echo.started is None and time.monotonic() < deadline:
                time.sleep(0.01)
            start = net.echo.started or t0
            if mode == "once":
                _sleep_until(start + (once_at if once_at is not None else stream_s / 2))
                atk.sendto(captured, a1)
                replays = 1
            elif mode == "every":
                first = start + min(1.0, max(0.0, stream_s - replay_s) / 2)
                end_replay = first + replay_s
                k = 0
                while True:
                    due = first + k * every_ms / 1000
                    if due >= end_replay:
                        break
                    _sleep_until(due)
                    atk.sendto(captured, a1)
                    replays += 1
                    k += 1
            res = run.result(timeout=count + 60)
            streamed = net.echo.sent
            net.echo.stop()
            got = res["delivered"]     # distinct stream ids the device received
            out[mode] = {"replays": replays, "streamed": streamed, "received": got,
                         "return_lost": streamed - got,
                         "return_loss": round((streamed - got) / streamed, 4) if streamed else None,
                         "handshakes": res["handshakes"]}
        net.echo = None
        atk.close()
        log = net.log("a1")
        out["pop_a1_learn_log_lines"] = sum(1 for line in log.splitlines() if "learn" in line)
        return out
    finally:
        if run is not None and run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        if tap is not None:
            tap.stop()
        if net.echo is not None:
            net.echo.stop()
            net.echo = None
        net.stop()


def _sleep_until(t):
    d = t - time.monotonic()
    if d > 0:
        time.sleep(d)


# --- 3. mixed fuzzing into a PoP and into the gateway -------------------------------

def fuzz(tmp, target, n=1000000, warmup=100000, samples=10, max_queue=48 << 10, seed=5, on_sample=None,
         kinds=(0, 1, 2)):
    """n mixed fuzz datagrams (attack.Fuzzer) into PoP a1 or the gateway,
    paced so the target's socket queue stays under max_queue bytes (kernel
    drops are reported, not hidden). RSS from /proc/PID/status after the
    warm-up and at the end; the target must stay alive and answer; device
    d1 then sends 50 echoes through it."""
    if target not in ("pop", "gateway"):
        raise ValueError("fuzz target is 'pop' or 'gateway', got %r" % (target,))
    net = AttackNet(tmp, routes={"a": ["a1", "a2"]}, devices={"d1": {}, "d2": {}})
    tap = None
    sock = None
    try:
        net.start()
        tap = Tap(net.pops["a1"]["listen"])
        net.point("d1", tap.addr)
        before = net.device("d1", "--count", "30", "--interval", "10")
        caps = list(tap.captured)
        if target == "pop":
            name, addr = "a1", net.pops["a1"]["listen"]
            p = net.dev_cfg("d2")["paths"][0]
            insider = (p["label"], bytes.fromhex(p["hop_key"]))
        else:
            name, addr = "gw", net.gw["listen"]
            links = net.gw_cfg()["links"]
            d1link = [l for l in links if l["name"].startswith("d1/")][0]
            d2link = [l for l in links if l["name"].startswith("d2/")][0]
            k1 = outer.HopKey(bytes.fromhex(d1link["key"]))
            # what the last hop carried for d1: the captured payloads under the PoP->gateway label and key
            caps = [outer.seal(c[0] & 0x0F, d1link["in_label"], k1, c[outer.HEADER_LEN:])
                    for c in caps if (c[0] & 0x0F) in (outer.TYPE_DATA, outer.TYPE_HOP_PROBE, outer.TYPE_HOP_KEEPALIVE)]
            insider = (d2link["in_label"], bytes.fromhex(d2link["key"]))
        f = Fuzzer(caps, insider, seed, kinds)
        pid, port = net.pid(name), _port(addr)
        dest = attack.hostport(addr)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((attack.LOOPBACK_SOURCES[1], 0))
        sock.setblocking(False)
        kdrop0 = udp_drops(port) or 0
        rss = []
        rss_start = rss_kb(pid)
        t0 = time.monotonic()
        every = max(1, (n - warmup) // samples)
        sent = 0
        limit_s = 60 + n / 2000.0              # never below 2000 datagrams/s, or stop and say so
        stopped_early = None
        while sent < n:
            if time.monotonic() - t0 > limit_s:
                stopped_early = "time limit %.0f s reached" % limit_s
                break
            if not net.alive(name):
                stopped_early = "target exited"
                break
            if _rx_queue(port) > max_queue:
                time.sleep(0.002)
                continue
            for _ in range(16):
                try:
                    sock.sendto(f.next(), dest)
                except OSError:
                    pass
                sent += 1
                if sent == warmup or (sent > warmup and (sent - warmup) % every == 0):
                    _drain_queue(port)
                    rss.append((sent, rss_kb(pid)))
                    if on_sample is not None:
                        on_sample(pid, sent)
                if sent >= n:
                    break
        _drain_queue(port)
        time.sleep(0.5)
        elapsed = time.monotonic() - t0
        rss_end = rss_kb(pid)
        alive = net.alive(name)
        counters = _gw_counters(net) if name == "gw" else _pop_counters(net, name)
        answered = "_error" not in counters
        net.point("d1", net.pops["a1"]["listen"])
        after = net.device("d1", "--count", "50", "--interval", "10") if alive else {"error": "target dead"}
        warm = [v for s, v in rss if s == warmup]
        base = warm[0] if warm and warm[0] is not None else rss_start
        vals = [v for s, v in rss if s >= warmup and v is not None] + ([rss_end] if rss_end else [])
        return {
            "target": target, "datagrams": sent, "seconds": round(elapsed, 1),
            "rate": round(sent / elapsed) if elapsed else 0, "stopped_early": stopped_early,
            "kernel_drops": (udp_drops(port) or 0) - kdrop0,
            "rss_kb_start": rss_start, "rss_kb_after_warmup": base, "rss_kb_end": rss_end,
            "rss_growth_kb": (max(vals) - base) if vals and base else None,
            "rss_samples_kb": rss, "alive": alive, "answers_control": answered,
            "internal_errors": counters.get("internal_error", counters.get("drop_internal_error", 0)),
            "counters": counters,
            "legit_before": {"sent": before.get("sent"), "delivered": before.get("delivered")},
            "legit_after": {"sent": after.get("sent"), "delivered": after.get("delivered"),
                            "error": after.get("error")},
        }
    finally:
        if sock is not None:
            sock.close()
        if tap is not None:
            tap.stop()
        net.stop()


def _rx_queue(port):
    """Bytes waiting in the receive queue of the UDP socket on `port`."""
    try:
        lines = Path("/proc/net/udp").read_text().splitlines()[1:]
    except OSError:
        return 0
    for line in lines:
        f = line.split()
        if len(f) > 4 and int(f[1].split(":")[1], 16) == port:
            return int(f[4].split(":")[1], 16)
    return 0


def _drain_queue(port, timeout=10.0):
    end = time.monotonic() + timeout
    while _rx_queue(port) and time.monotonic() < end:
        time.sleep(0.005)


# --- 4. a device whose boot counter went backwards -----------------------------------------

def reset_counter(tmp, limit_ms=15000):
    """d1 connects twice (boot counter 1, then 2), then its stored counter is
    deleted (a re-flashed board): how long until its third boot is back?"""
    net = AttackNet(tmp, routes={"a": ["a1", "a2"]}, devices={"d1": {}})
    try:
        net.start()
        for _ in range(2):
            r = net.device("d1", "--count", "2", "--interval", "10")
            if "error" in r:
                raise RuntimeError("d1 did not connect before the reset: %s" % r["error"])
        gw0 = _gw_counters(net)
        state = Path(net.dev_cfg("d1")["state_dir"])
        for f in state.glob("microtun_boot*"):
            f.unlink()
        t0 = time.monotonic()
        r = net.device("d1", "--count", "2", "--interval", "10", "--connect-ms", str(limit_ms),
                       timeout=limit_ms / 1000 + 60)
        wall = time.monotonic() - t0
        gwd = _delta(_gw_counters(net), gw0)
        return {"connect_ms": r.get("connect_ms") if "error" not in r else None, "limit_ms": limit_ms,
                "error": r.get("error"), "boot_after_reset": (r.get("health") or {}).get("boot"),
                "delivered": r.get("delivered"), "wall_s": round(wall, 1), "gateway_counters_delta": gwd}
    finally:
        net.stop()
