#!/usr/bin/env python3
"""netem.py — a user-space lossy-link emulator: a UDP relay that impairs traffic.

This machine's kernel has no netem, so tests put this relay between a sender
and a receiver instead. Clients send to `listen`; each client gets its own
upstream socket (like a NAT mapping, with an idle timeout), so the upstream sees
one source port per client and replies find their way back. The two directions,
"up" (client -> upstream) and "down" (upstream -> client), are impaired
independently: random loss, Gilbert-Elliott burst loss, delay, jitter,
duplication, reordering, a token-bucket rate limit with a bounded queue, and a
blackhole switch. See docs/NETEM.md.

Determinism: every direction owns `random.Random(f"{seed}/{direction}")` and
draws exactly _DRAWS numbers per received datagram, whatever is configured, so
the decisions for the n-th datagram of a direction (lost? duplicated?
reordered? how much jitter?) depend only on the seed and n. Wall-clock timing,
and so rate-limit queue drops and the interleaving of directions, do not.

Three ways to use it:
  library   relay = await LinkEmulator.start(listen=..., upstream=..., up=Impairment(...))
  CLI       python tools/netem.py --listen 127.0.0.1:7000 --upstream 127.0.0.1:7001 --loss 0.1
  control   one JSON object per UDP datagram to the loopback control port, e.g.
            {"blackhole": true} {"set": {"up": {"loss": 0.15}}} {"stats": true};
            the CLI also toggles the blackhole (both directions) on SIGUSR1.

Needs an asyncio selector event loop (the default on Linux and macOS).
"""
import argparse
import asyncio
import dataclasses
import heapq
import ipaddress
import json
import math
import random
import signal
import socket
import sys
from collections import deque
from statistics import NormalDist

_DRAWS = 7          # random numbers drawn per datagram, in this order:
#                     loss, GE loss, GE transition, duplicate, reorder, jitter, jitter of the copy
_MAX_DATAGRAM = 65535
_DRAIN_BATCH = 256  # datagrams read per readiness callback, so one busy socket cannot starve the rest
_DROP_REASONS = ("loss", "burst_loss", "blackhole", "queue_full", "send_error")
_DIRECTIONS = ("up", "down")
_COMMANDS = ("set", "blackhole", "direction", "rebind", "get", "stats")   # control channel keys
_STD_NORMAL = NormalDist()


def _f(default, help):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class Impairment:
    """What one direction of the link does to datagrams. The default is a perfect link."""
    loss: float = _f(0.0, "independent loss probability")
    p_good_to_bad: float = _f(0.0, "Gilbert-Elliott: P(good -> bad) per datagram")
    p_bad_to_good: float = _f(1.0, "Gilbert-Elliott: P(bad -> good) per datagram")
    loss_good: float = _f(0.0, "Gilbert-Elliott: loss probability in the good state")
    loss_bad: float = _f(1.0, "Gilbert-Elliott: loss probability in the bad state")
    delay_ms: float = _f(0.0, "fixed one-way delay")
    jitter_ms: float = _f(0.0, "jitter: uniform half-width or normal std dev")
    jitter_dist: str = _f("uniform", "uniform | normal")
    duplicate: float = _f(0.0, "probability a datagram is sent twice")
    reorder: float = _f(0.0, "probability a datagram is held back by reorder_ms")
    reorder_ms: float = _f(10.0, "extra delay of a reordered datagram")
    rate: float = _f(0.0, "rate limit in bytes/s (0 = unlimited)")
    burst_bytes: int = _f(1500, "token bucket depth in bytes")
    queue: int = _f(64, "datagrams that may wait for tokens")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type is str:
                if v not in ("uniform", "normal"):
                    raise ValueError("jitter_dist must be 'uniform' or 'normal', got %r" % (v,))
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError("%s must be a finite number, got %r" % (f.name, v))
            if v < 0:
                raise ValueError("%s must be >= 0, got %r" % (f.name, v))
            if f.name in ("loss", "p_good_to_bad", "p_bad_to_good", "loss_good", "loss_bad",
                          "duplicate", "reorder") and v > 1:
                raise ValueError("%s is a probability and must be in [0, 1], got %r" % (f.name, v))
        if self.queue < 1 or self.queue != int(self.queue):
            raise ValueError("queue must be a whole number >= 1, got %r" % (self.queue,))

    def updated(self, changes):
        """A copy with the fields in the dict `changes` replaced (ValueError on unknown names)."""
        if not isinstance(changes, dict):
            raise ValueError("impairment changes must be an object, got %r" % (changes,))
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError("unknown impairment field(s) %s; known: %s" % (", ".join(unknown), ", ".join(sorted(names))))
        return dataclasses.replace(self, **changes)

    def as_dict(self):
        return dataclasses.asdict(self)


class GilbertElliott:
    """Two-state burst-loss model. Datagram n is lost with probability
    loss_good or loss_bad depending on the current state; then the state moves
    good -> bad with p_good_to_bad or bad -> good with p_bad_to_good.
    Long-run loss = (r*loss_good + p*loss_bad) / (p + r); with loss_bad = 1 and
    loss_good = 0 the mean burst length is 1 / p_bad_to_good."""

    def __init__(self):
        self.bad = False

    def step(self, imp, u_loss, u_move):
        lost = u_loss < (imp.loss_bad if self.bad else imp.loss_good)
        if self.bad:
            self.bad = not (u_move < imp.p_bad_to_good)
        else:
            self.bad = u_move < imp.p_good_to_bad
        return lost

    @staticmethod
    def average_loss(imp):
        p, r = imp.p_good_to_bad, imp.p_bad_to_good
        if p + r == 0:
            return imp.loss_good        # never leaves the good state it starts in
        return (r * imp.loss_good + p * imp.loss_bad) / (p + r)


def _new_stats():
    return {"received": 0, "bytes_received": 0, "forwarded": 0, "bytes_forwarded": 0,
            "dropped": {r: 0 for r in _DROP_REASONS}, "duplicated": 0, "reordered": 0}


class Direction:
    """Sans-I/O impairment of one direction: admit(size, now) decides the fate
    of a datagram and returns the times (seconds, same clock as `now`) at which
    its copies leave: [] if dropped, two times if duplicated."""

    def __init__(self, name, imp, seed):
        self.name = name
        self.imp = imp
        self.rng = random.Random("%s/%s" % (seed, name))
        self.ge = GilbertElliott()
        self.blackholed = False
        self.stats = _new_stats()
        self._tb_time = None        # token bucket: time of the last departure
        self._tokens = 0.0          # ... and tokens left at that time
        self._waiting = deque()     # departure times of datagrams still queued

    def admit(self, size, now):
        imp = self.imp
        u = [self.rng.random() for _ in range(_DRAWS)]
        self.stats["received"] += 1
        self.stats["bytes_received"] += size
        ge_lost = self.ge.step(imp, u[1], u[2])
        reason = ("blackhole" if self.blackholed else "loss" if u[0] < imp.loss
                  else "burst_loss" if ge_lost else None)
        if reason:
            return self._drop(reason)
        copies = 2 if u[3] < imp.duplicate else 1
        if copies == 2:
            self.stats["duplicated"] += 1
        times = []
        for i in range(copies):
            depart = self._shape(size, now)
            if depart is None:
                self._drop("queue_full")
                continue
            extra = imp.delay_ms + self._jitter(u[5 + i])
            if i == 0 and u[4] < imp.reorder:
                extra += imp.reorder_ms
                self.stats["reordered"] += 1
            times.append(depart + max(0.0, extra) / 1000.0)
        return times

    def sent(self, size):
        self.stats["forwarded"] += 1
        self.stats["bytes_forwarded"] += size

    def _drop(self, reason):
        self.stats["dropped"][reason] += 1
        return []

    def _jitter(self, u):
        j = self.imp.jitter_ms
        if not j:
            return 0.0
        if self.imp.jitter_dist == "normal":
            return j * _STD_NORMAL.inv_cdf(min(max(u, 1e-12), 1 - 1e-12))
        return j * (2.0 * u - 1.0)

    def _shape(self, size, now):
        """Token bucket (rate bytes/s, depth burst_bytes) in front of a FIFO of
        `queue` datagrams. Returns the departure time, or None if the queue is full."""
        rate = self.imp.rate
        if not rate:
            self._tb_time = None
            return now
        while self._waiting and self._waiting[0] <= now:
            self._waiting.popleft()
        if len(self._waiting) >= self.imp.queue:
            return None
        depth = max(self.imp.burst_bytes, size)
        if self._tb_time is None:
            self._tb_time, self._tokens = now, depth
        t = max(now, self._tb_time)
        tokens = min(depth, self._tokens + (t - self._tb_time) * rate)
        if tokens < size:
            t += (size - tokens) / rate
            tokens = size
        self._tb_time, self._tokens = t, tokens - size
        if t > now:
            self._waiting.append(t)
        return t


def _resolve(addr):
    host, port = addr
    info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    return info[0][0], info[0][4]


def _udp_socket(family, bind=None):
    s = socket.socket(family, socket.SOCK_DGRAM)
    try:
        s.setblocking(False)
        if bind is not None:
            s.bind(bind)
    except BaseException:
        s.close()
        raise
    return s


def _impairment(name, val, base):
    """val as an Impairment: None keeps base, a dict changes some of base's fields."""
    if val is None:
        return base
    if isinstance(val, dict):
        return base.updated(val)
    if not isinstance(val, Impairment):
        raise ValueError("%s must be an Impairment or a dict, got %r" % (name, val))
    return val


class _Flow:
    """One client's NAT mapping: its own upstream socket."""
    __slots__ = ("client", "sock", "last")

    def __init__(self, client, sock, now):
        self.client, self.sock, self.last = client, sock, now


class LinkEmulator:
    """The relay. Build it with `await LinkEmulator.start(...)`, stop it with `await close()`."""

    def __init__(self):
        raise TypeError("use: relay = await LinkEmulator.start(listen=..., upstream=...)")

    @classmethod
    async def start(cls, listen, upstream, up=None, down=None, seed=None,
                    control=None, idle_timeout=30.0):
        """listen, upstream, control: (host, port); control must be loopback.
        up, down: Impairment (default: perfect). seed: int; None picks one
        (see .seed). idle_timeout: seconds before an unused client mapping is
        forgotten (None: never)."""
        if idle_timeout is not None and not idle_timeout > 0:
            raise ValueError("idle_timeout must be > 0 seconds or None, got %r" % (idle_timeout,))
        self = object.__new__(cls)
        self._loop = asyncio.get_running_loop()
        self.seed = random.SystemRandom().randrange(1 << 32) if seed is None else seed
        self.idle_timeout = idle_timeout
        self._dirs = {d: Direction(d, _impairment(d, imp, Impairment()), self.seed)
                      for d, imp in (("up", up), ("down", down))}
        self._up_family, self._upstream = _resolve(upstream)
        self._flows = {}
        self._flows_opened = 0
        self._heap = []             # (when, seq, direction, data, client)
        self._seq = 0
        self._timer = None
        self._sweeper = None
        self._closed = False
        family, laddr = _resolve(listen)
        self._sock = _udp_socket(family, laddr)
        self._ctl = None
        try:
            if control is not None:
                cfam, caddr = _resolve(control)
                if not ipaddress.ip_address(caddr[0]).is_loopback:
                    raise ValueError("the control channel listens on loopback only, got %r" % (control,))
                self._ctl = _udp_socket(cfam, caddr)
                self._loop.add_reader(self._ctl.fileno(), self._on_control)
        except BaseException:
            self._sock.close()
            raise
        self._loop.add_reader(self._sock.fileno(), self._on_client)
        if idle_timeout is not None:
            self._sweeper = self._loop.call_later(min(1.0, idle_timeout / 4), self._sweep)
        return self

    # --- public API -------------------------------------------------------

    @property
    def address(self):
        return self._sock.getsockname()[:2]

    @property
    def control_address(self):
        return self._ctl.getsockname()[:2] if self._ctl else None

    @property
    def stats(self):
        """A JSON-ready snapshot: per direction received, forwarded, bytes_forwarded,
        dropped by reason, duplicated, reordered; plus open and total flows."""
        out = {}
        for d in _DIRECTIONS:
            st = self._dirs[d].stats
            out[d] = dict(st, dropped=dict(st["dropped"]))
        out.update(seed=self.seed, flows=len(self._flows), flows_opened=self._flows_opened,
                   in_flight=len(self._heap))
        return out

    @property
    def impairments(self):
        return {d: self._dirs[d].imp for d in _DIRECTIONS}

    def set(self, up=None, down=None):
        """Change impairments at run time. An Impairment replaces the direction's
        settings; a dict changes only the fields it names. Validates both before
        applying either. Queued datagrams keep the fate already decided."""
        new = {d: _impairment(d, imp, self._dirs[d].imp)
               for d, imp in (("up", up), ("down", down)) if imp is not None}
        for name, val in new.items():
            self._dirs[name].imp = val

    def blackhole(self, on=True, direction="both"):
        """Drop everything in `direction` ("up", "down" or "both") while on."""
        if not isinstance(on, bool):
            raise ValueError("blackhole takes true or false, got %r" % (on,))
        for d in self._directions(direction):
            self._dirs[d].blackholed = on

    def blackholed(self, direction):
        return self._dirs[direction].blackholed

    def rebind(self, client=None):
        """Forget the mapping of `client` (all clients if None): its next datagram
        reaches the upstream from a new source port, as after a NAT rebinding."""
        victims = list(self._flows) if client is None else [tuple(client)]
        closed = 0
        for c in victims:
            flow = self._flows.pop(c, None)
            if flow:
                self._close_flow(flow)
                closed += 1
        return closed

    async def close(self):
        """Stop: close every socket, drop datagrams still in flight, cancel timers."""
        if self._closed:
            return
        self._closed = True
        for h in (self._timer, self._sweeper):
            if h:
                h.cancel()
        self._heap.clear()
        self.rebind()
        for s in (self._sock, self._ctl):
            if s:
                self._loop.remove_reader(s.fileno())
                s.close()
        await asyncio.sleep(0)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    # --- data path --------------------------------------------------------

    @staticmethod
    def _directions(direction):
        if direction == "both":
            return _DIRECTIONS
        if direction in _DIRECTIONS:
            return (direction,)
        raise ValueError("direction must be 'up', 'down' or 'both', got %r" % (direction,))

    def _recv_all(self, sock):
        for _ in range(_DRAIN_BATCH):
            try:
                yield sock.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:     # e.g. ICMP port unreachable reported on a connected socket
                continue

    def _on_client(self):
        now = self._loop.time()
        for data, client in self._recv_all(self._sock):
            client = client[:2]
            try:
                self._flow(client, now).last = now     # outbound traffic keeps a mapping alive
            except OSError:                            # no socket for it (e.g. out of descriptors)
                self._dirs["up"].stats["dropped"]["send_error"] += 1
                continue
            self._admit("up", data, client, now)

    def _on_upstream(self, flow):
        now = self._loop.time()
        for data, _ in self._recv_all(flow.sock):
            self._admit("down", data, flow.client, now)

    def _admit(self, direction, data, client, now):
        for when in self._dirs[direction].admit(len(data), now):
            self._seq += 1
            heapq.heappush(self._heap, (when, self._seq, direction, data, client))
        self._flush()

    def _on_timer(self):
        self._timer = None
        self._flush()

    def _flush(self):
        """Send every datagram whose time has come, in (time, arrival) order, then
        keep one timer armed for the new head (call_at may fire a hair early: re-arm)."""
        now = self._loop.time()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, direction, data, client = heapq.heappop(heap)
            try:
                if direction == "up":
                    self._flow(client, now).sock.send(data)
                else:
                    self._sock.sendto(data, client)
            except OSError:
                self._dirs[direction].stats["dropped"]["send_error"] += 1
            else:
                self._dirs[direction].sent(len(data))
        if heap and not (self._timer and self._timer.when() == heap[0][0]):
            if self._timer:
                self._timer.cancel()
            self._timer = self._loop.call_at(heap[0][0], self._on_timer)

    def _flow(self, client, now):
        flow = self._flows.get(client)
        if flow is None:
            sock = _udp_socket(self._up_family)
            sock.connect(self._upstream)
            flow = self._flows[client] = _Flow(client, sock, now)
            self._flows_opened += 1
            self._loop.add_reader(sock.fileno(), self._on_upstream, flow)
        return flow

    def _close_flow(self, flow):
        self._loop.remove_reader(flow.sock.fileno())
        flow.sock.close()

    def _sweep(self):
        now = self._loop.time()
        for c in [c for c, f in self._flows.items() if now - f.last > self.idle_timeout]:
            self._close_flow(self._flows.pop(c))
        self._sweeper = self._loop.call_later(min(1.0, self.idle_timeout / 4), self._sweep)

    # --- control channel --------------------------------------------------

    def _on_control(self):
        for data, peer in self._recv_all(self._ctl):
            try:
                reply = self.command(data)
            except Exception as e:     # a bug here must not take the relay down
                reply = {"ok": False, "error": "internal error: %r" % (e,)}
            reply = json.dumps(reply, sort_keys=True) + "\n"
            try:
                self._ctl.sendto(reply.encode(), peer)
            except OSError:
                pass

    def command(self, data):
        """Run one control command (bytes or str holding a JSON object) and return
        the reply dict: {"ok": true, ...} or {"ok": false, "error": "..."}. Never raises
        on bad input. Keys, applied in this order:
          "set": {"up"|"down"|"both": {field: value, ...}}   change some fields
          "blackhole": true|false, with optional "direction": "up"|"down"|"both"
          "rebind": true                                     forget every client mapping
          "get": true                                        reply with "impairments"
          "stats": true                                      reply with "stats"
        """
        try:
            msg = json.loads(bytes(data).decode() if isinstance(data, (bytes, bytearray)) else data)
            if not isinstance(msg, dict) or not msg:
                raise ValueError("expected a non-empty JSON object")
            unknown = sorted(set(msg) - set(_COMMANDS))
            if unknown:
                raise ValueError("unknown key(s) %s; known: %s" % (", ".join(unknown), ", ".join(_COMMANDS)))
            for key in ("blackhole", "rebind", "get", "stats"):
                if not isinstance(msg.get(key, False), bool):
                    raise ValueError("%s takes true or false" % key)
            if "direction" in msg and "blackhole" not in msg:
                raise ValueError("direction goes with blackhole")
            self._directions(msg.get("direction", "both"))
            if "set" in msg:
                spec = msg["set"]
                if not isinstance(spec, dict) or not spec or set(spec) - {"up", "down", "both"}:
                    raise ValueError('set takes {"up"|"down"|"both": {field: value, ...}}')
                changes = {d: {} for d in _DIRECTIONS}
                for key, fields in spec.items():
                    if not isinstance(fields, dict):
                        raise ValueError("set.%s must be an object of fields" % key)
                    for d in self._directions(key):
                        changes[d].update(fields)
                self.set(**{d: c for d, c in changes.items() if c})
            if "blackhole" in msg:
                self.blackhole(msg["blackhole"], msg.get("direction", "both"))
            reply = {"ok": True}
            if msg.get("rebind"):
                reply["rebound"] = self.rebind()
            if msg.get("get"):
                reply["impairments"] = {d: i.as_dict() for d, i in self.impairments.items()}
            if msg.get("stats"):
                reply["stats"] = self.stats
            return reply
        except (ValueError, TypeError, RecursionError) as e:   # UnicodeDecodeError is a ValueError
            return {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}


# --- command line ----------------------------------------------------------

def _hostport(text):
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError("expected HOST:PORT, got %r" % text)
    return host.strip("[]"), int(port)


def _fmt(addr):
    host, port = addr[:2]
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def _kv(text):
    """'loss=0.1,delay_ms=20' -> {'loss': 0.1, 'delay_ms': 20.0}"""
    types, out = {f.name: f.type for f in dataclasses.fields(Impairment)}, {}
    for item in filter(None, text.split(",")):
        key, sep, val = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in types:
            raise argparse.ArgumentTypeError("expected FIELD=VALUE with FIELD in %s, got %r" % (", ".join(types), item))
        try:
            out[key] = types[key](val.strip())
        except ValueError:
            raise argparse.ArgumentTypeError("bad value for %s: %r" % (key, val))
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="UDP relay that emulates a lossy link (see docs/NETEM.md).")
    p.add_argument("--listen", type=_hostport, required=True, help="HOST:PORT clients send to")
    p.add_argument("--upstream", type=_hostport, required=True, help="HOST:PORT datagrams are relayed to")
    p.add_argument("--control", type=_hostport, help="loopback HOST:PORT for JSON control commands")
    p.add_argument("--seed", type=int, help="random seed (default: random, reported in the stats)")
    p.add_argument("--idle-timeout", type=float, default=30.0,
                   help="seconds before an idle client mapping is dropped (0 = never; default 30)")
    g = p.add_argument_group("impairments (both directions; --up/--down override per direction)")
    for f in dataclasses.fields(Impairment):
        g.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=f.type, default=None,
                       choices=("uniform", "normal") if f.type is str else None,
                       help="%s (default %s)" % (f.metadata["help"], f.default))
    g.add_argument("--up", type=_kv, default={}, metavar="FIELD=V,...", help="client -> upstream only")
    g.add_argument("--down", type=_kv, default={}, metavar="FIELD=V,...", help="upstream -> client only")
    return p.parse_args(argv)


async def _main(args):
    both = {f.name: getattr(args, f.name) for f in dataclasses.fields(Impairment)
            if getattr(args, f.name) is not None}
    relay = await LinkEmulator.start(
        listen=args.listen, upstream=args.upstream, control=args.control, seed=args.seed,
        idle_timeout=args.idle_timeout or None,
        up=Impairment().updated({**both, **args.up}), down=Impairment().updated({**both, **args.down}))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def toggle():
        relay.blackhole(not relay.blackholed("up"))
        print(json.dumps({"blackhole": relay.blackholed("up")}), file=sys.stderr, flush=True)
    loop.add_signal_handler(signal.SIGUSR1, toggle)
    ready = {"listen": _fmt(relay.address), "upstream": _fmt(args.upstream), "seed": relay.seed}
    if relay.control_address:
        ready["control"] = _fmt(relay.control_address)
    print(json.dumps(ready), file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        stats = relay.stats
        await relay.close()
        print(json.dumps(stats, sort_keys=True), flush=True)


def main(argv=None):
    args = parse_args(argv)
    try:
        asyncio.run(_main(args))
    except (ValueError, OSError) as e:
        print("netem: %s" % e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
