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
import sys
import select
import socket

from microtun import outer
from microtun import config as _config
from microtun.endpoint import Device, DATA, HANDSHAKE, CONTROL_CHANNEL
from microtun.freshness import next_boot_counter
from microtun.paths import Path, PathSet, probe_message, CTL_PATH_PROBE, CTL_PATH_REPLY, PROBE_LEN
from microtun.ticks import ticks_add, ticks_diff, ticks_min, TICKS_MASK
from microtun import timers

try:
    from time import ticks_ms as _ticks_ms

    def now_ms():
        return _ticks_ms() & TICKS_MASK
except ImportError:
    import time as _time

    def now_ms():
        return int(_time.monotonic() * 1000) & TICKS_MASK

try:
    from time import sleep_ms as _sleep_ms
except ImportError:
    import time as _time

    def _sleep_ms(ms):
        _time.sleep(ms / 1000)

_EAGAIN = (11, 35)           # EAGAIN on Linux / lwIP, macOS
_RECV_MAX = 2048
_PROBE_ECHO_LEN = 8
ALL_DOWN_MS = 2000           # every path down this long: handshake again


def _log_print(level, msg):
    print("microtun %s: %s" % (level, msg))


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
        tmp = self._path(name) + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, self._path(name))


class Tunnel:
    """A device's tunnel: connect, send, recv, health."""

    def __init__(self, cfg, storage=None, log=_log_print, params=None):
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
        self.device = Device(cfg.private_key, cfg.gateway_public, psk=cfg.psk, boot_counter=boot,
                             params=params or timers.Params(), window=cfg.window)
        self.paths = PathSet([Path(i, pc.name, pc.label, pc.rx_label, outer.HopKey(pc.hop_key))
                              for i, pc in enumerate(cfg.paths)], cfg.policy, cfg.nat_keepalive_ms)
        self.stats = {}
        self.on_data = None          # optional callback(channel, data)
        self._inbox = []
        self._buf = bytearray(_RECV_MAX + outer.HEADER_LEN)
        self._poller = select.poll()
        self._socks = [None] * len(cfg.paths)
        self._addrs = [None] * len(cfg.paths)
        self._by_sock = {}
        self._all_down_since = None
        for i in range(len(cfg.paths)):
            self._open(i)

    @classmethod
    def from_file(cls, path, **kw):
        return cls(_config.load(path), **kw)

    # -- sockets ---------------------------------------------------------------
    def _count(self, reason):
        self.stats[reason] = self.stats.get(reason, 0) + 1

    def _resolve(self, i):
        host, port = self.cfg.paths[i].pop
        try:
            ai = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0]
        except OSError as e:
            self._count("resolve_failed")
            self.log("warn", "path %s: cannot resolve %s:%d (%s); will retry" % (self.cfg.paths[i].name, host, port, e))
            return None
        return ai

    def _open(self, i):
        ai = self._resolve(i)
        if ai is None:
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
        The session continues: the gateway follows authenticated packets."""
        for i in (range(len(self._socks)) if index is None else (index,)):
            self._close(i)
            self._open(i)
        self._count("rebind")

    def _sendto(self, i, n):
        s = self._socks[i]
        if s is None and not self._open(i):
            return False
        try:
            self._socks[i].sendto(memoryview(self._buf)[:n], self._addrs[i])
        except OSError:
            self._count("send_error")
            return False
        return True

    # -- app API ---------------------------------------------------------------
    @property
    def established(self):
        return self.device.established

    def connect(self, timeout_ms=0):
        """Start the session; with timeout_ms, wait for it. True once up."""
        self.device.connect(now_ms())
        self._flush(now_ms())
        if timeout_ms:
            end = ticks_add(now_ms(), timeout_ms)
            while not self.device.established and ticks_diff(end, now_ms()) > 0:
                self.poll(ticks_diff(end, now_ms()))
        return self.device.established

    def send(self, channel, data, policy=None):
        """Send data on an app channel (1..255). policy: None (config default),
        "best", "critical" or "adaptive". False if it could not be queued."""
        if channel == CONTROL_CHANNEL:
            raise ValueError("channel 0 is reserved for path control; use 1..255")
        now = now_ms()
        ok = self.device.send(channel, data, now, route=policy)
        self.paths.note_app_send(now)
        self._flush(now)
        return ok

    def recv(self, timeout_ms=0):
        """The next (channel, data) from the gateway, or None after timeout_ms."""
        if not self._inbox:
            end = ticks_add(now_ms(), timeout_ms)
            while True:
                self.poll(max(0, ticks_diff(end, now_ms())))
                if self._inbox or ticks_diff(end, now_ms()) <= 0:
                    break
        return self._inbox.pop(0) if self._inbox else None

    def health(self):
        """Link health for the app: session state, per-path state, counters."""
        return {"established": self.device.established, "boot": self.boot_counter,
                "paths": self.paths.health(), "tunnel": dict(self.device.stats),
                "driver": dict(self.stats)}

    def close(self):
        for i in range(len(self._socks)):
            self._close(i)

    # -- the loop --------------------------------------------------------------
    def next_deadline(self):
        return ticks_min(self.device.get_timer(), self.paths.get_timer())

    def poll(self, timeout_ms=1000):
        """Wait for datagrams or the next deadline (at most timeout_ms) and
        process everything that is due."""
        now = now_ms()
        wait = timeout_ms
        d = self.next_deadline()
        if d is not None:
            wait = min(wait, max(0, ticks_diff(d, now)))
        for obj, ev in self._poller.poll(wait):
            i = self._by_sock.get(id(obj))
            if i is None:
                i = self._by_sock.get(obj)
            if i is not None:
                self._drain(i)
        self._timers(now_ms())

    def run(self, duration_ms):
        end = ticks_add(now_ms(), duration_ms)
        while ticks_diff(end, now_ms()) > 0:
            self.poll(ticks_diff(end, now_ms()))

    def _drain(self, i):
        s = self._socks[i]
        while s is not None:
            try:
                data, src = s.recvfrom(_RECV_MAX)
            except OSError as e:
                if e.args and e.args[0] not in _EAGAIN:
                    self._count("recv_error")
                return
            self._incoming(i, data, now_ms())

    def _incoming(self, i, pkt, now):
        p = self.paths.paths[i]
        parsed = outer.parse(pkt)
        if parsed is None:
            self._count("outer_" + (outer.reject_reason(pkt) or "malformed"))
            return
        ptype, label = parsed
        if label != p.rx_label and not (ptype == outer.TYPE_HOP_PROBE_REPLY and label == p.label):
            self._count("outer_unknown_label")
            return
        if not outer.verify(p.key, pkt):
            self._count("outer_bad_mac")
            return
        p.last_rx = now
        p.rx_packets += 1
        p.rx_bytes += len(pkt)
        if ptype == outer.TYPE_DATA:
            self.device.receive_datagram(pkt[outer.HEADER_LEN:], i, now)
            self._events(now)
            self._flush(now)
        elif ptype == outer.TYPE_HOP_PROBE_REPLY:
            r = outer.parse_probe_reply(pkt[outer.HEADER_LEN:], _PROBE_ECHO_LEN)
            if r is not None:
                addr = outer.format_addr(r[1], r[2], r[3])
                if addr != p.public_addr:
                    self.log("info", "path %s: the PoP sees us at %s" % (p.name, addr))
                p.public_addr = addr
        else:
            self._count("outer_unexpected_type")

    def _events(self, now):
        while True:
            e = self.device.next_event()
            if e is None:
                break
            if e.kind == DATA:
                if e.channel == CONTROL_CHANNEL:
                    p = self.paths.paths[e.addr] if isinstance(e.addr, int) and e.addr < len(self.paths.paths) else None
                    d = e.data
                    if p is not None and len(d) == PROBE_LEN and d[0] == CTL_PATH_REPLY and d[1] == p.index:
                        if self.paths.on_probe_reply(d, now):
                            self.log("info", "path %s is %s (srtt %s ms)" % (p.name, p.state, p.srtt))
                    continue
                if self.on_data is not None:
                    self.on_data(e.channel, e.data)
                else:
                    self._inbox.append((e.channel, e.data))
            elif e.kind == HANDSHAKE:
                self.log("info", "session established (handshake %d)" % self.device.session.handshakes)

    def _timers(self, now):
        d = self.device.get_timer()
        if d is not None and ticks_diff(d, now) <= 0:
            self.device.handle_timer(now)
        if self.device.established:
            for p, seq in self.paths.due_probes(now):
                self.device.send(CONTROL_CHANNEL, probe_message(CTL_PATH_PROBE, p.index, seq, now, p.srtt), now, route=p.index)
        for p in self.paths.due_keepalives(now):
            self._hop_probe(p, now)
        self._check_all_down(now)
        self._events(now)
        self._flush(now)

    def _check_all_down(self, now):
        """Every path dead while we think we have a session: the far end may
        have restarted. Handshake again (on every path) after ALL_DOWN_MS,
        then at most every ALL_DOWN_MS while it lasts."""
        if not self.device.established or any(p.live for p in self.paths.paths):
            self._all_down_since = None
            return
        if self._all_down_since is None:
            self._all_down_since = now
        elif ticks_diff(now, self._all_down_since) >= ALL_DOWN_MS:
            self._all_down_since = now
            self._count("rehandshake_all_paths_down")
            self.log("warn", "every path is down; handshaking again")
            self.device.rekey(now)

    def _hop_probe(self, p, now):
        n = outer.seal_into(self._buf, outer.TYPE_HOP_PROBE, p.label, p.key, outer.probe_body(p.seq, now))
        if self._sendto(p.index, n):
            p.last_tx = now
            p.tx_packets += 1
            p.tx_bytes += n
            self._count("hop_probe_tx")

    def _flush(self, now):
        for data, route in self.device.datagrams_to_send(now):
            for p in self.paths.select(route, now):
                n = outer.seal_into(self._buf, outer.TYPE_DATA, p.label, p.key, data)
                if self._sendto(p.index, n):
                    p.last_tx = now
                    p.tx_packets += 1
                    p.tx_bytes += n
