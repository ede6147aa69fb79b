"""The device driver: UDP sockets, select.poll and the clock around the
sans-I/O core, plus the small API an application uses. Runs unchanged on
MicroPython (unix port and boards) and CPython.

    from microtun.driver import Tunnel
    t = Tunnel.from_file("microtun.json")
    t.connect()
    t.send(1, b"temp=21.5")                   # default policy (config)
    t.send(1, b"ALARM", policy="critical")    # a copy on every live path
    msg = t.recv(timeout_ms=1000)             # (channel, bytes) or None
    print(t.health())

One socket per path, so each path has its own NAT mapping and can be
rebound on its own. Everything is non-blocking; `poll()` waits at most
until the next protocol deadline.
"""
import os
import select
import socket

from microtun.freshness import next_boot_counter
import microtun.ticks as ticks   # (one global, not three: each is a dict slot in a board's heap)
from microtun.tunnel import TunnelCore

if __import__("sys").implementation.name != "micropython":
    def const(x):   # CPython; MicroPython's compiler folds const() with no name bound (a global costs a board heap)
        return x

try:
    from time import ticks_ms

    def now_ms():
        return ticks_ms() & ticks.TICKS_MASK
except ImportError:             # CPython
    import time

    def now_ms():
        return int(time.monotonic() * 1000) & ticks.TICKS_MASK

_EAGAIN = const((11, 35))    # EAGAIN on Linux / lwIP, macOS
_RECV_MAX = const(2048)


class FileStorage:
    """Small persistent values as files in a directory (the boot counter)."""

    def __init__(self, directory):
        self.dir = directory

    def _path(self, name):
        return "%s/microtun_%s.bin" % (self.dir, name)

    def read(self, name):
        try:
            with open(self._path(name), "rb") as f:
                return f.read()
        except OSError:
            return None

    def write(self, name, data):
        path = self._path(name)
        # a new file, then a rename: a power cut leaves the old value or the new one
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.rename(path + ".tmp", path)


class Tunnel:
    """A device's tunnel: connect, send, recv, health. Sockets and polling
    around microtun.tunnel.TunnelCore."""

    def __init__(self, cfg, storage=None, log=lambda level, msg: print("microtun %s: %s" % (level, msg)),
                 params=None):
        self.cfg = cfg
        self.log = log
        self.storage = storage if storage is not None else FileStorage(cfg.state_dir)
        try:
            boot = next_boot_counter(self.storage)
        except ValueError as e:
            self.log("warn", "%s; starting the boot counter again" % e)
            self.storage.write("boot", (1).to_bytes(4, "big"))
            boot = 1
        self.boot_counter = boot
        self.core = TunnelCore(cfg, boot, params=params, log=log)
        self.log = self.core.log             # the log ring too, when the config allows ops
        self.core.storage = self.storage     # a boot counter jump (gateway's STALE answer) is saved here
        if cfg.ops:
            self.core.ops_io = (now_ms, self._send_out)   # ops pushes go out mid-exec (microtun.ops, docs/OPS.md)
        self.device = self.core.device
        self.paths = self.core.paths
        self.stats = self.core.stats         # the driver's counts too (self.core._count)
        self.on_data = None          # optional callback(channel, data)
        self._poller = select.poll()
        self._socks = [None] * len(cfg.paths)
        self._addrs = [None] * len(cfg.paths)
        self._by_sock = {}
        for i in range(len(cfg.paths)):
            self._open(i)

    @classmethod
    def from_file(cls, path, **kw):
        """Load and validate a config file (microtun.config.ConfigError on a
        problem) and make a Tunnel from it."""
        from microtun.config import load
        return cls(load(path), **kw)

    # -- sockets ---------------------------------------------------------------
    def _open(self, i):
        host, port = self.cfg.paths[i].pop
        try:
            ai = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0]
        except OSError as e:
            self.core._count("resolve_failed")
            self.log("warn", "path %s: cannot resolve %s:%d (%s); will retry" % (self.cfg.paths[i].name, host, port, e))
            return False
        s = socket.socket(ai[0], socket.SOCK_DGRAM)
        s.setblocking(False)
        self._socks[i] = s
        self._addrs[i] = ai[-1]
        self._poller.register(s, select.POLLIN)
        self._by_sock[id(s)] = i
        try:
            self._by_sock[s.fileno()] = i
        except (AttributeError, OSError):
            pass
        return True

    def _close(self, i):
        s = self._socks[i]
        if s is None:
            return
        try:
            self._poller.unregister(s)
        except (KeyError, ValueError, OSError):
            pass
        self._by_sock.pop(id(s), None)
        try:
            self._by_sock.pop(s.fileno(), None)
        except (AttributeError, OSError):
            pass
        s.close()
        self._socks[i] = None

    def rebind(self, index=None):
        """Open new sockets (new source ports), as after a network change.
        The session continues: the PoPs and the gateway follow authenticated
        packets."""
        for i in (range(len(self._socks)) if index is None else (index,)):
            self._close(i)
            self._open(i)
        self.core._count("rebind")

    def _send_out(self):
        for i, pkt in self.core.datagrams_to_send():
            s = self._socks[i]
            if s is None and not self._open(i):
                self.core._count("send_error")
                continue
            try:
                self._socks[i].sendto(pkt, self._addrs[i])
            except OSError:
                self.core._count("send_error")

    # -- app API ---------------------------------------------------------------
    @property
    def established(self):
        return self.core.established

    def connect(self, timeout_ms=0):
        """Start the session; with timeout_ms, wait for it. True once up."""
        self.core.connect(now_ms())
        self._send_out()
        if timeout_ms:
            end = ticks.ticks_add(now_ms(), timeout_ms)
            while not self.core.established and ticks.ticks_diff(end, now_ms()) > 0:
                self.poll(ticks.ticks_diff(end, now_ms()))
        return self.core.established

    def send(self, channel, data, policy=None):
        """Send data on an app channel (1..255). policy: None (config default),
        "best", "critical" or "adaptive" (anything else: ValueError). False if
        it could not be queued, or the config's "channels" does not list
        the channel (counted as `channel_denied` and logged)."""
        ok = self.core.send(channel, data, now_ms(), policy)
        self._send_out()
        return ok

    def recv(self, timeout_ms=0):
        """The next (channel, data) from the gateway, or None after timeout_ms."""
        m = self.core.next_message()
        if m is not None:
            return m
        end = ticks.ticks_add(now_ms(), timeout_ms)
        while True:
            self.poll(max(0, ticks.ticks_diff(end, now_ms())))
            m = self.core.next_message()
            if m is not None or ticks.ticks_diff(end, now_ms()) <= 0:
                return m

    def health(self):
        """Link health for the app: session state, per-path state, counters."""
        h = self.core.health()
        h["boot"] = self.device._fresh.boot   # may have jumped since boot (a STALE answer)
        return h

    @property
    def reboot_requested(self):
        """True once an operator asked for a restart over the ops channel
        (docs/OPS.md): the firmware resets the board; an app of its own
        should do the same (its reply went out in the same poll)."""
        return self.core.reboot_requested

    def close(self):
        for i in range(len(self._socks)):
            self._close(i)

    # -- the loop --------------------------------------------------------------
    def poll(self, timeout_ms=1000):
        """Wait for datagrams or the next deadline (at most timeout_ms) and
        process everything that is due."""
        now = now_ms()
        wait = timeout_ms
        d = self.core.get_timer()
        if d is not None:
            wait = min(wait, max(0, ticks.ticks_diff(d, now)))
        for obj, ev in self._poller.poll(wait):
            i = self._by_sock.get(id(obj))
            if i is None:
                i = self._by_sock.get(obj)
            if i is None:
                continue
            s = self._socks[i]
            while s is not None:        # everything queued on path i's socket
                try:
                    # recvfrom, not readinto into a kept buffer: MicroPython's
                    # stream readinto reads until the buffer is full, which on
                    # a UDP socket glues queued datagrams together.
                    data, src = s.recvfrom(_RECV_MAX)
                except OSError as e:
                    if e.args and e.args[0] not in _EAGAIN:
                        self.core._count("recv_error")
                    break
                self.core.receive(i, data, now_ms())
        now = now_ms()
        d = self.core.get_timer()
        if d is not None and ticks.ticks_diff(d, now) <= 0:
            self.core.handle_timer(now)
        o = self.core.ops
        if o is not None:
            o.tick()                # a held ops `logs --follow` request (microtun.ops)
        self._send_out()
        if self.on_data is not None:
            m = self.core.next_message()
            while m is not None:
                self.on_data(m[0], m[1])
                m = self.core.next_message()

    def run(self, duration_ms):
        end = ticks.ticks_add(now_ms(), duration_ms)
        while ticks.ticks_diff(end, now_ms()) > 0:
            self.poll(ticks.ticks_diff(end, now_ms()))
