"""A primary and a standby next hop for a PoP's routes, chosen by liveness.

A route may name a standby beside its next hop (docs/OUTER.md §10):

    {"in_label": 200, ..., "next": "10.0.0.5:7000", "standby": "10.0.0.6:7000", "out_label": 300, ...}

The two are one gateway identity (same static key, same link labels and hop
keys: `microtun provision` writes both configs), so a packet sealed for one
is valid at the other. The Monitor probes them from its own UDP socket with
the outer plane's HOP_PROBE, which a gateway (and a PoP) already answers,
authenticated under the link's hop key:

  - the active one every PROBE_S (0.2 s), the other every IDLE_PROBE_S (1 s);
  - the active one is dead when nothing authentic came back for DEAD_S
    (0.6 s: three probes); if the other answered within OTHER_FRESH_S, every
    route with that pair switches to it at once (`on_switch`), logged as a
    warning; if neither answers, nothing moves (one error line per 10 s);
  - sticky: the PoP stays on the standby when the primary comes back (a
    restarted primary has no sessions; moving back would cost every device
    one more handshake). A reload or restart of the PoP starts on the
    primary again, after checking that it answers.

A reply counts only if it comes from the probed address, verifies under the
link's key, carries the probed label and echoes an outstanding probe id:
nothing a third party can send moves traffic. Per link and gateway the
probes are at most 5 + 1 per second, under the gateway's 10 replies per
link per second.
"""
import asyncio
import os
import socket
import time

from microtun import outer
from microtun_host.config import format_sockaddr

PROBE_S = 0.2
IDLE_PROBE_S = 1.0
DEAD_S = 0.6
OTHER_FRESH_S = 2.5
OUTSTANDING_MAX = 64            # probe ids remembered per pair
LOG_EVERY_S = 10.0


class Pair:
    __slots__ = ("addrs", "label", "key", "active", "heard", "sent_idle", "outstanding", "logged")

    def __init__(self, primary, standby, label, key, now):
        self.addrs = (primary, standby)     # sockaddrs
        self.label = label                  # the gateway's in_label of one link, and its key
        self.key = key
        self.active = 0
        self.heard = [now, None]            # last authentic reply (the primary gets DEAD_S grace at start)
        self.sent_idle = 0.0
        self.outstanding = {}               # probe id -> member index
        self.logged = 0.0


def pairs_of(specs):
    """{(primary sockaddr, standby sockaddr): (out_label, out_key)} from RouteSpecs with a standby."""
    out = {}
    for s in specs:
        if getattr(s, "standby", None) is not None:
            out.setdefault((s.next_addr.sockaddr, s.standby.sockaddr), (s.out_label, s.out_key))
    return out


class Monitor:
    """Probes each (primary, standby) pair; on_switch(primary, dest) is
    called when a pair's active member changes (dest a sockaddr)."""

    def __init__(self, listen, specs, log, on_switch, clock=time.monotonic):
        self.listen = listen
        self.log = log
        self.on_switch = on_switch
        self.clock = clock
        self.pairs = {}
        self.switches = 0
        self.probes_sent = 0
        self.replies = 0
        self.rejected = 0                   # replies that failed a check (counted, never acted on)
        self._sock = None
        self._timer = None
        self._next_id = int.from_bytes(os.urandom(4), "big")
        self.update(specs)

    def update(self, specs):
        """A new table (reload): keep the state of pairs that remain."""
        now = self.clock()
        new = {}
        for key, (label, k) in pairs_of(specs).items():
            p = self.pairs.get(key)
            if p is None:
                p = Pair(key[0], key[1], label, outer.HopKey(k), now)
            else:
                p.label, p.key = label, outer.HopKey(k)
            new[key] = p
        self.pairs = new

    def choices(self):
        """{primary sockaddr: active sockaddr} for the pairs not on their primary."""
        return {p.addrs[0]: p.addrs[1] for p in self.pairs.values() if p.active == 1}

    def start(self, loop):
        fam = socket.AF_INET6 if self.listen.family == 6 else socket.AF_INET
        self._sock = socket.socket(fam, socket.SOCK_DGRAM)
        self._sock.bind((self.listen.host, 0) if fam == socket.AF_INET else (self.listen.host, 0, 0, 0))
        self._sock.setblocking(False)
        loop.add_reader(self._sock.fileno(), self._readable)
        self._timer = loop.call_soon(self._tick)

    def close(self):
        if self._timer is not None:
            self._timer.cancel()
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _probe(self, p, member):
        pid = self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        if len(p.outstanding) >= OUTSTANDING_MAX:
            p.outstanding.pop(next(iter(p.outstanding)))
        p.outstanding[pid] = member
        pkt = outer.seal(outer.TYPE_HOP_PROBE, p.label, p.key, outer.probe_body(pid, 0))
        try:
            self._sock.sendto(pkt, p.addrs[member])
            self.probes_sent += 1
        except OSError:
            pass                            # unreachable: the missing replies say so

    def _tick(self):
        now = self.clock()
        for p in self.pairs.values():
            self._probe(p, p.active)
            if now - p.sent_idle >= IDLE_PROBE_S:
                p.sent_idle = now
                self._probe(p, 1 - p.active)
            self._judge(p, now)
        self._timer = asyncio.get_running_loop().call_later(PROBE_S, self._tick)

    def _judge(self, p, now):
        a = p.active
        if p.heard[a] is not None and now - p.heard[a] < DEAD_S:
            return
        o = 1 - a
        if p.heard[o] is not None and now - p.heard[o] < OTHER_FRESH_S:
            p.active = o
            # the new one gets DEAD_S to answer its first fast probes; the old
            # one counts as alive again only once it answers one
            heard_a = p.heard[a]
            p.heard[o], p.heard[a] = now, None
            self.switches += 1
            self.log.warning("next hop %s does not answer probes (%s): routes switch to its %s %s",
                             format_sockaddr(p.addrs[a]),
                             "never answered" if heard_a is None else "%.1f s" % (now - heard_a),
                             "standby" if o == 1 else "primary", format_sockaddr(p.addrs[o]))
            self.on_switch(p.addrs[0], p.addrs[o])
        elif now - p.logged >= LOG_EVERY_S:
            p.logged = now
            self.log.error("next hop %s and its %s %s both fail to answer probes; routes stay on %s",
                           format_sockaddr(p.addrs[a]), "standby" if o == 1 else "primary",
                           format_sockaddr(p.addrs[o]), format_sockaddr(p.addrs[a]))

    def _readable(self):
        for _ in range(64):
            try:
                pkt, src = self._sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            self._reply(pkt, src)

    def _reply(self, pkt, src):
        for p in self.pairs.values():
            if src in p.addrs:
                break
        else:
            self.rejected += 1
            return
        member = p.addrs.index(src)
        parsed = outer.parse(pkt)
        if parsed != (outer.TYPE_HOP_PROBE_REPLY, p.label) or not outer.verify(p.key, pkt):
            self.rejected += 1
            return
        r = outer.parse_probe_reply(pkt[outer.HEADER_LEN:])
        f = outer.probe_fields(r[0]) if r is not None else None
        if f is None or p.outstanding.get(f[0]) != member:
            self.rejected += 1
            return
        del p.outstanding[f[0]]
        p.heard[member] = self.clock()
        self.replies += 1

    def stats(self):
        now = self.clock()
        return {"switches": self.switches, "probes_sent": self.probes_sent, "replies": self.replies,
                "rejected": self.rejected,
                "pairs": [{"primary": format_sockaddr(p.addrs[0]), "standby": format_sockaddr(p.addrs[1]),
                           "active": format_sockaddr(p.addrs[p.active]),
                           "heard_s_ago": [None if h is None else round(now - h, 2) for h in p.heard]}
                          for p in self.pairs.values()]}
