"""Paths: health, probing and send policies (docs/PATHS.md). Sans-I/O.

A path is one road to the gateway: a first PoP, the label we send with, the
label it answers with and the hop key of that first link. The device keeps
N >= 1 of them and measures each one end to end with PATH_PROBEs carried
inside the encrypted tunnel on channel 0 (so a PoP can neither read nor fake
them); the gateway answers each probe on the path it arrived on.

States, and what moves a path between them (printable: `print_table()`):
"""
from microtun.ticks import ticks_add, ticks_diff

try:
    from micropython import const
except ImportError:
    def const(x):
        return x

NEW = "new"
UP = "up"
SUSPECT = "suspect"
DOWN = "down"

# (state, event) -> new state.  Events: "reply" (a probe answered), "miss" (a
# probe not answered within RTO), "misses" (DOWN_AFTER misses in a row).
TRANSITIONS = {
    (NEW, "reply"): UP,
    (NEW, "misses"): DOWN,
    (UP, "miss"): SUSPECT,
    (SUSPECT, "reply"): UP,
    (SUSPECT, "misses"): DOWN,
    (DOWN, "reply"): UP,          # validated by an end-to-end reply: make-before-break
}
# How often each state probes (ms), when the app is active / idle.
PROBE_ACTIVE_MS = {NEW: 250, UP: 200, SUSPECT: 100, DOWN: 1000}
PROBE_IDLE_MS = {NEW: 1000, UP: 300000, SUSPECT: 500, DOWN: 30000}
DOWN_AFTER = const(3)            # misses in a row
ACTIVE_MS = const(3000)          # "active" for this long after the app sent
RTO_MIN_MS = const(100)
RTO_MAX_MS = const(3000)
RTO_INIT_MS = const(1000)
NAT_KEEPALIVE_MS = const(25000)  # some NATs drop UDP mappings after 30 s

# Policies (docs/PATHS.md, "Choosing a policy")
BEST = "best"
CRITICAL = "critical"
ADAPTIVE = "adaptive"
POLICIES = (BEST, CRITICAL, ADAPTIVE)
ADAPTIVE_LOSS_ON = 0.05          # duplicate while the best path loses > 5 % ...
ADAPTIVE_LOSS_OFF = 0.02         # ... and stop once it is back under 2 %
ADAPTIVE_RTT_MS = const(1000)    # or while its srtt exceeds this
LOSS_PENALTY_MS = const(1000)    # path score = srtt + loss x this (5 % loss "costs" 50 ms)
SWITCH_MARGIN_MS = const(10)     # a path must score this much better to take over

# Control messages on channel 0 (inside the tunnel)
CTL_PATH_PROBE = const(1)
CTL_PATH_REPLY = const(2)
PROBE_LEN = const(12)            # type, path, seq (4), ticks (4), srtt ms (2)


def print_table():
    lines = ["state    event   -> state"]
    for (s, e), t in sorted(TRANSITIONS.items()):
        lines.append("%-8s %-7s -> %s" % (s, e, t))
    lines.append("")
    lines.append("probe every (ms): " + ", ".join(
        "%s %d active / %d idle" % (s, PROBE_ACTIVE_MS[s], PROBE_IDLE_MS[s]) for s in (NEW, UP, SUSPECT, DOWN)))
    return "\n".join(lines)


def probe_message(kind, path_index, seq, ticks, srtt=None):
    """A channel-0 path probe. The device reports its smoothed RTT for the
    path (0xFFFF: unknown) so the gateway can show it without probing."""
    r = 0xFFFF if srtt is None else min(int(srtt), 0xFFFE)
    return (bytes((kind, path_index)) + (seq & 0xFFFFFFFF).to_bytes(4, "big") +
            (ticks & 0xFFFFFFFF).to_bytes(4, "big") + r.to_bytes(2, "big"))


def parse_probe(data):
    """(kind, path_index, seq, ticks, srtt or None) of a channel-0 probe
    message, or None."""
    if len(data) != PROBE_LEN or data[0] not in (CTL_PATH_PROBE, CTL_PATH_REPLY):
        return None
    r = int.from_bytes(data[10:12], "big")
    return (data[0], data[1], int.from_bytes(data[2:6], "big"), int.from_bytes(data[6:10], "big"),
            None if r == 0xFFFF else r)


class Path:
    def __init__(self, index, name, label, rx_label, key):
        self.index = index
        self.name = name
        self.label = label
        self.rx_label = rx_label
        self.key = key                 # hop.HopKey
        self.state = NEW
        self.srtt = None               # RFC 6298 estimators, ms
        self.rttvar = None
        self.loss = 0.0                # EWMA of probe outcomes
        self.misses = 0                # in a row
        self.seq = 0
        self.outstanding = {}          # seq -> sent ticks
        self.next_probe = None
        self.last_tx = None
        self.last_rx = None
        self.public_addr = None        # as the first PoP sees us
        self.hop_probe_at = None       # when we last asked for it
        self.switches = 0              # state changes
        self.tx_packets = 0
        self.tx_bytes = 0
        self.rx_packets = 0
        self.rx_bytes = 0
        self.probes_sent = 0
        self.probes_lost = 0
        self.duplicates = 0            # copies dropped because the other path was faster

    @property
    def live(self):
        return self.state in (UP, SUSPECT)

    def rto(self):
        if self.srtt is None:
            return RTO_INIT_MS
        r = int(self.srtt + max(4 * self.rttvar, 20))
        return RTO_MIN_MS if r < RTO_MIN_MS else RTO_MAX_MS if r > RTO_MAX_MS else r

    def _move(self, event):
        new = TRANSITIONS.get((self.state, event))
        if new is not None and new != self.state:
            self.state = new
            self.switches += 1
            return True
        return False

    def on_reply(self, seq, sent, now):
        """A PATH_REPLY came back on this path. Returns True on a state change."""
        if self.outstanding.pop(seq, None) is None:
            return False                # late (already counted lost) or duplicate
        rtt = ticks_diff(now, sent)
        if rtt < 0:
            return False
        if self.srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:                           # RFC 6298 §2.3, alpha 1/8, beta 1/4
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.loss *= 0.9375             # EWMA weight 1/16
        self.misses = 0
        return self._move("reply")

    def check_timeouts(self, now):
        """Count probes not answered within RTO as lost. True on a state change."""
        changed = False
        rto = self.rto()
        for seq in list(self.outstanding):
            if ticks_diff(now, self.outstanding[seq]) >= rto:
                del self.outstanding[seq]
                self.probes_lost += 1
                self.loss = self.loss * 0.9375 + 0.0625
                self.misses += 1
                changed |= self._move("miss")
                if self.misses >= DOWN_AFTER:
                    changed |= self._move("misses")
        return changed

    def info(self):
        return {
            "name": self.name, "state": self.state,
            "srtt_ms": None if self.srtt is None else round(self.srtt, 1),
            "rttvar_ms": None if self.rttvar is None else round(self.rttvar, 1),
            "loss": round(self.loss, 3), "switches": self.switches,
            "tx_packets": self.tx_packets, "tx_bytes": self.tx_bytes,
            "rx_packets": self.rx_packets, "rx_bytes": self.rx_bytes,
            "probes_sent": self.probes_sent, "probes_lost": self.probes_lost,
            "duplicates": self.duplicates,
            "public_addr": self.public_addr,
        }


class PathSet:
    """The device's paths and the decisions over them. The driver asks it
    which paths a datagram goes on (`select`), which probes are due
    (`due_probes`) and which paths need a NAT keepalive (`due_keepalives`)."""

    def __init__(self, paths, default_policy=BEST, nat_keepalive_ms=NAT_KEEPALIVE_MS):
        if not paths:
            raise ValueError("a device needs at least one path")
        if default_policy not in POLICIES:
            raise ValueError("policy must be one of %s" % (POLICIES,))
        self.paths = paths
        self.default_policy = default_policy
        self.nat_keepalive_ms = nat_keepalive_ms
        self._active_until = None
        self._dup = False              # adaptive: currently duplicating
        self._best = None
        self.best_switches = 0         # how often traffic moved to another path
        self.by_rx_label = {p.rx_label: p for p in paths}

    # -- choosing paths ------------------------------------------------------
    def best(self):
        """The live path with the lowest score (srtt + loss penalty), kept
        until another one is better by SWITCH_MARGIN_MS. If it is SUSPECT,
        select() sends on every live path until it is decided."""
        cand = None
        for p in self.paths:
            if p.live and (cand is None or _better(p, cand)):
                cand = p
        cur = self._best
        if cur is None or not cur.live:
            if cand is not cur and cur is not None:
                self.best_switches += 1
            self._best = cand
        elif cand is not cur and _score(cand) + SWITCH_MARGIN_MS < _score(cur):
            self._best = cand
            self.best_switches += 1
        return self._best

    def select(self, route, now):
        """Paths to send one datagram on. route: None (the default policy),
        a policy name, or a path index (probes)."""
        if isinstance(route, int):
            return [self.paths[route]] if 0 <= route < len(self.paths) else []
        policy = route or self.default_policy
        live = [p for p in self.paths if p.live]
        if not live:
            # nothing validated: every path that is not known dead, else all
            cand = [p for p in self.paths if p.state != DOWN]
            return cand or list(self.paths)
        if policy == CRITICAL:
            return live
        best = self.best()
        if best.state == SUSPECT:      # in doubt: use every live path
            return live
        if policy == ADAPTIVE and self._adaptive_dup(best):
            return live
        return [best]

    def _adaptive_dup(self, best):
        srtt = best.srtt or 0
        if self._dup:
            if best.loss < ADAPTIVE_LOSS_OFF and srtt < ADAPTIVE_RTT_MS:
                self._dup = False
        elif best.loss > ADAPTIVE_LOSS_ON or srtt > ADAPTIVE_RTT_MS:
            self._dup = True
        return self._dup

    # -- timers ----------------------------------------------------------------
    def note_app_send(self, now):
        """The app sent something: probe at the active pace for ACTIVE_MS."""
        if not self.active(now):
            for p in self.paths:
                due = ticks_add(now, PROBE_ACTIVE_MS[p.state])
                if p.next_probe is not None and ticks_diff(p.next_probe, due) > 0:
                    p.next_probe = due
        self._active_until = ticks_add(now, ACTIVE_MS)

    def active(self, now):
        return self._active_until is not None and ticks_diff(self._active_until, now) > 0

    def due_probes(self, now):
        """Paths whose probe is due; marks them probed. The caller sends
        probe_message(CTL_PATH_PROBE, p.index, seq, now) for each (p, seq)."""
        out = []
        table = PROBE_ACTIVE_MS if self.active(now) else PROBE_IDLE_MS
        for p in self.paths:
            p.check_timeouts(now)
            interval = table[p.state]
            if p.next_probe is None or ticks_diff(now, p.next_probe) >= 0 or \
                    ticks_diff(p.next_probe, ticks_add(now, interval)) > 0:
                p.seq = (p.seq + 1) & 0xFFFFFFFF
                p.outstanding[p.seq] = now
                p.probes_sent += 1
                p.next_probe = ticks_add(now, interval)
                out.append((p, p.seq))
        return out

    def due_keepalives(self, now):
        """Paths that sent nothing for nat_keepalive_ms (to keep NAT mappings)."""
        out = []
        for p in self.paths:
            if p.last_tx is None or ticks_diff(now, p.last_tx) >= self.nat_keepalive_ms:
                out.append(p)
        return out

    def get_timer(self):
        best = None
        for p in self.paths:
            cands = [p.next_probe]
            if p.outstanding:
                rto = p.rto()
                for t in p.outstanding.values():
                    cands.append(ticks_add(t, rto))
            if p.last_tx is not None:
                cands.append(ticks_add(p.last_tx, self.nat_keepalive_ms))
            for c in cands:
                if c is not None and (best is None or ticks_diff(c, best) < 0):
                    best = c
        return best

    def on_probe_reply(self, data, now):
        """Handle a channel-0 PATH_REPLY from the gateway."""
        f = parse_probe(data)
        if f is None or f[0] != CTL_PATH_REPLY or f[1] >= len(self.paths):
            return False
        p = self.paths[f[1]]
        sent = p.outstanding.get(f[2])
        if sent is None:
            return False
        changed = p.on_reply(f[2], sent, now)
        if changed:       # probe at the new state's pace from now on
            table = PROBE_ACTIVE_MS if self.active(now) else PROBE_IDLE_MS
            p.next_probe = ticks_add(now, table[p.state])
        return changed

    def health(self):
        return [p.info() for p in self.paths]


def _score(p):
    return (p.srtt if p.srtt is not None else 1e6) + p.loss * LOSS_PENALTY_MS


def _better(a, b):
    sa = _score(a)
    sb = _score(b)
    if sa != sb:
        return sa < sb
    return a.state == UP and b.state != UP
