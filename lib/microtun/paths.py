"""Paths: health, probing and send policies (docs/PATHS.md). Sans-I/O.

A path is one road to the gateway: a first PoP, the label we send with, the
label it answers with and the hop key of that first link. The device keeps
N >= 1 of them and measures each one end to end with PATH_PROBEs carried
inside the encrypted tunnel on channel 0 (so a PoP can neither read nor fake
them); the gateway answers each probe on the path it arrived on.

States, and what moves a path between them (printed by the host's
microtun_host.pathtable.print_table(), kept off the device: 400 B of a
board's heap as a .mpy):
"""
import microtun.ticks as ticks   # (one global, not three: each costs a board heap)

if __import__("sys").implementation.name != "micropython":
    def const(x):   # CPython; MicroPython's compiler folds const() with no name bound (a global costs a board heap)
        return x

# A path's state is one of four strings, "new", "up", "suspect", "down"
# (Path.state, info()["state"]), written out where they are used, as the
# policies are. Not names: a public NAME = const("up") is a global (a qstr
# and a slot in the module's dict on a board), and a private one leaves its
# folded str constants to be made as objects in the heap when the .mpy
# loads, where a literal is a qstr. Import cost of this module on the
# 32-bit .mpy build (after microtun.ticks, qstr pools alike): 5,648 B with
# public names, 6,160 B with private consts, 5,312 B with literals. The
# tables' tuples of literals are still constants (in flash, frozen).

# (state, event) -> new state.  Events: "reply" (a probe answered), "miss" (a
# probe not answered within RTO), "misses" (_DOWN_AFTER misses in a row).
TRANSITIONS = {
    ("new", "reply"): "up",
    ("new", "misses"): "down",
    ("up", "miss"): "suspect",
    ("suspect", "reply"): "up",
    ("suspect", "misses"): "down",
    ("down", "reply"): "up",          # validated by an end-to-end reply: make-before-break
}
# How often each state probes (ms), when the app is active / idle.
PROBE_ACTIVE_MS = {"new": 250, "up": 200, "suspect": 100, "down": 1000}
PROBE_IDLE_MS = {"new": 1000, "up": 300000, "suspect": 500, "down": 30000}
_DOWN_AFTER = const(3)            # misses in a row
_ACTIVE_MS = const(3000)          # "active" for this long after the app sent
_RTO_MIN_MS = const(100)
_RTO_MAX_MS = const(3000)
_RTO_INIT_MS = const(1000)
_NAT_KEEPALIVE_MS = const(25000)  # some NATs drop UDP mappings after 30 s

# Policies (docs/PATHS.md, "Choosing a policy"), strings as the states are;
# POLICIES is public (microtun.config and the provisioning tool check it)
POLICIES = ("best", "critical", "adaptive")
_ADAPTIVE_LOSS_ON = const(0.05)   # duplicate while the best path loses > 5 % ...
_ADAPTIVE_LOSS_OFF = const(0.02)  # ... and stop once it is back under 2 %
_ADAPTIVE_RTT_MS = const(1000)    # or while its srtt exceeds this
_LOSS_PENALTY_MS = const(1000)    # path score = srtt + loss x this (5 % loss "costs" 50 ms)
_SWITCH_MARGIN_MS = const(10)     # a path must score this much better to take over

# Control messages on channel 0 (inside the tunnel; the gateway's side is
# microtun.responder): private, so no global, no qstr on a board
_CTL_PATH_PROBE = const(1)
_CTL_PATH_REPLY = const(2)
_PROBE_LEN = const(12)            # type, path, seq (4), ticks (4), srtt ms (2)


def probe_message(index, seq, ticks, srtt=None, kind=_CTL_PATH_PROBE):
    """A channel-0 path probe for path `index` (kind=2: the gateway's
    PATH_REPLY to it). The device reports its smoothed RTT for the path
    (0xFFFF: unknown) so the gateway can show it without probing."""
    r = 0xFFFF if srtt is None else min(int(srtt), 0xFFFE)
    return (bytes((kind, index)) + (seq & 0xFFFFFFFF).to_bytes(4, "big") +
            (ticks & 0xFFFFFFFF).to_bytes(4, "big") + r.to_bytes(2, "big"))


class Path:
    # srtt + loss penalty, as best() compares them: made again only when srtt
    # or loss is another object than when it was last made (floats are heap
    # objects on a board, and best() runs for every packet sent); a path with
    # no RTT sample yet scores 1000 s
    _scored = (None, 0.0, 1000000)   # (srtt, loss, score): srtt and loss compared by identity
    # Counters that stay at zero while nothing is lost are class attributes
    # until first set (a path's attribute table is a board's heap; the reply
    # path leaves them alone while they are zero).
    loss = 0.0                  # EWMA of probe outcomes
    misses = 0                  # in a row
    probes_lost = 0
    duplicates = 0              # copies dropped because the other path was faster

    def __init__(self, index, name, label, rx_label, key):
        self.index = index
        self.name = name
        self.label = label
        self.rx_label = rx_label
        self.key = key                 # hop.HopKey
        self.state = "new"
        self.live = False              # state is up or suspect (set by _move)
        self.srtt = None               # RFC 6298 estimators, ms
        self.rttvar = None
        self.seq = 0
        self.outstanding = {}          # seq -> sent ticks
        self.next_probe = None
        self.last_tx = None
        self.public_addr = None        # as the first PoP sees us
        self.hop_probe_at = None       # when we last asked for it
        self.switches = 0              # state changes
        self.tx_packets = 0
        self.tx_bytes = 0
        self.rx_packets = 0
        self.rx_bytes = 0
        self.probes_sent = 0

    def rto(self):
        if self.srtt is None:
            return _RTO_INIT_MS
        r = int(self.srtt + max(4 * self.rttvar, 20))
        return _RTO_MIN_MS if r < _RTO_MIN_MS else _RTO_MAX_MS if r > _RTO_MAX_MS else r

    def _move(self, event):
        new = TRANSITIONS.get((self.state, event))
        if new is not None and new != self.state:
            self.state = new
            self.live = new in ("up", "suspect")
            self.switches += 1
            return True
        return False

    def check_timeouts(self, now):
        """Count probes not answered within RTO as lost. True on a state change."""
        changed = False
        rto = self.rto()
        for seq in list(self.outstanding):
            if ticks.ticks_diff(now, self.outstanding[seq]) >= rto:
                del self.outstanding[seq]
                self.probes_lost += 1
                self.loss = (self.loss * 15 + 1) / 16     # EWMA weight 1/16, a loss counts 1
                self.misses += 1
                changed |= self._move("miss")
                if self.misses >= _DOWN_AFTER:
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

    def __init__(self, paths, default_policy="best", nat_keepalive_ms=_NAT_KEEPALIVE_MS):
        if not paths:
            raise ValueError("a device needs at least one path")
        if default_policy not in POLICIES:
            raise ValueError("policy must be one of %s" % (POLICIES,))
        self.paths = paths
        self.default_policy = default_policy
        self.nat_keepalive_ms = nat_keepalive_ms
        self._active_until = None
        self._dup = False              # adaptive: currently duplicating
        self._one = [None]             # select()'s answer when it is one path
        self._best = None
        self.best_switches = 0         # how often traffic moved to another path

    # -- choosing paths ------------------------------------------------------
    def best(self):
        """The live path with the lowest score (srtt + loss penalty), kept
        until another one is better by _SWITCH_MARGIN_MS. If it is suspect,
        select() sends on every live path until it is decided."""
        cur = self._best
        cand = cand_score = cur_score = None
        for p in self.paths:
            if p.live:
                k = p._scored
                if k[0] is not p.srtt or k[1] is not p.loss:
                    k = p._scored = (p.srtt, p.loss,
                                     (p.srtt if p.srtt is not None else 1000000) + p.loss * _LOSS_PENALTY_MS)
                score = k[2]
                if p is cur:
                    cur_score = score
                # the lowest score; on a tie, an up path before a suspect one
                if cand is None or score < cand_score or \
                        score == cand_score and p.state == "up" and cand.state != "up":
                    cand = p
                    cand_score = score
        if cur is None or not cur.live:
            if cand is not cur and cur is not None:
                self.best_switches += 1
            self._best = cand
        elif cand is not cur and cand_score + _SWITCH_MARGIN_MS < cur_score:
            self._best = cand
            self.best_switches += 1
        return self._best

    def select(self, route, now):
        """Paths to send one datagram on. route: None (the default policy),
        a policy name, or a path index (probes). One path (the usual answer,
        for every packet sent) comes in a list this PathSet reuses: use it
        before the next call."""
        if isinstance(route, int):
            return [self.paths[route]] if 0 <= route < len(self.paths) else []
        policy = route or self.default_policy
        best = None if policy == "critical" else self.best()
        if best is not None and best.state != "suspect":   # (suspect: in doubt, every live path)
            if policy == "adaptive":      # duplicate while the best path is poor, with hysteresis
                srtt = best.srtt or 0
                if self._dup:
                    if best.loss < _ADAPTIVE_LOSS_OFF and srtt < _ADAPTIVE_RTT_MS:
                        self._dup = False
                elif best.loss > _ADAPTIVE_LOSS_ON or srtt > _ADAPTIVE_RTT_MS:
                    self._dup = True
            if policy != "adaptive" or not self._dup:
                one = self._one
                one[0] = best
                return one
        live = [p for p in self.paths if p.live]
        if live:
            return live                 # critical, suspect, adaptive duplicating
        # nothing validated: every path that is not known dead, else all
        cand = [p for p in self.paths if p.state != "down"]
        return cand or list(self.paths)

    # -- timers ----------------------------------------------------------------
    def note_app_send(self, now):
        """The app sent something: probe at the active pace for _ACTIVE_MS."""
        if not self.active(now):
            for p in self.paths:
                due = ticks.ticks_add(now, PROBE_ACTIVE_MS[p.state])
                if p.next_probe is not None and ticks.ticks_diff(p.next_probe, due) > 0:
                    p.next_probe = due
        self._active_until = ticks.ticks_add(now, _ACTIVE_MS)

    def active(self, now):
        return self._active_until is not None and ticks.ticks_diff(self._active_until, now) > 0

    def due_probes(self, now):
        """Paths whose probe is due; marks them probed. The caller sends
        probe_message(p.index, seq, now, p.srtt) for each (p, seq)."""
        out = []
        table = PROBE_ACTIVE_MS if self.active(now) else PROBE_IDLE_MS
        for p in self.paths:
            p.check_timeouts(now)
            interval = table[p.state]
            if p.next_probe is None or ticks.ticks_diff(now, p.next_probe) >= 0 or \
                    ticks.ticks_diff(p.next_probe, ticks.ticks_add(now, interval)) > 0:
                p.seq = (p.seq + 1) & 0xFFFFFFFF
                p.outstanding[p.seq] = now
                p.probes_sent += 1
                p.next_probe = ticks.ticks_add(now, interval)
                out.append((p, p.seq))
        return out

    def due_keepalives(self, now):
        """Paths that sent nothing for nat_keepalive_ms (to keep NAT mappings)."""
        out = []
        for p in self.paths:
            if p.last_tx is None or ticks.ticks_diff(now, p.last_tx) >= self.nat_keepalive_ms:
                out.append(p)
        return out

    def get_timer(self):
        t = None
        for p in self.paths:
            t = ticks.ticks_min(t, p.next_probe)
            if p.outstanding:
                rto = p.rto()
                for sent in p.outstanding.values():
                    t = ticks.ticks_min(t, ticks.ticks_add(sent, rto))
            if p.last_tx is not None:
                t = ticks.ticks_min(t, ticks.ticks_add(p.last_tx, self.nat_keepalive_ms))
        return t

    def on_probe_reply(self, data, now, index=None):
        """Handle a channel-0 message from the gateway: for a PATH_REPLY
        (type, path, seq, ticks, srtt: probe_message) naming one of our
        paths, and `index` when given (the path it came back on), an RTT
        sample for that path. True on a state change; False for anything
        else, a late, duplicate or unknown reply included."""
        if len(data) != _PROBE_LEN or data[0] != _CTL_PATH_REPLY or data[1] >= len(self.paths) or \
                index is not None and data[1] != index:
            return False
        p = self.paths[data[1]]
        sent = p.outstanding.pop(int.from_bytes(data[2:6], "big"), None)
        if sent is None:
            return False                # late (already counted lost), duplicate or never sent
        rtt = ticks.ticks_diff(now, sent)
        if rtt < 0:
            return False
        if p.srtt is None:
            p.srtt = rtt
            p.rttvar = rtt / 2
        else:                           # RFC 6298 §2.3, alpha 1/8, beta 1/4
            p.rttvar = (3 * p.rttvar + abs(p.srtt - rtt)) / 4
            p.srtt = (7 * p.srtt + rtt) / 8
        if p.loss:
            p.loss = p.loss * 15 / 16   # EWMA weight 1/16, a reply counts 0
        if p.misses:
            p.misses = 0
        if not p._move("reply"):
            return False
        # probe at the new state's pace from now on
        table = PROBE_ACTIVE_MS if self.active(now) else PROBE_IDLE_MS
        p.next_probe = ticks.ticks_add(now, table[p.state])
        return True

    def health(self):
        return list(map(Path.info, self.paths))
