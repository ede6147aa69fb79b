"""LOOPS: local recovery on the segment between two consecutive PoPs
(draft-li-tsvwg-loops-problem-opportunities; docs/LOOPS.md).

    snd = Sender(cfg, label, hopkey)       # the segment's ingress PoP, per route
    pkts = snd.data(inner, ce, now)        # SEG_DATA (+ SEG_REPAIR parities) to the next PoP
    pkts = snd.feedback(packet, now)       # a SEG_NACK or SEG_PONG from the egress -> retransmissions
    pkts = snd.tick(now)                   # pings, FEC groups closed by time

    rcv = Receiver(cfg, label, hopkey)     # the egress PoP, per route
    fwd, replies = rcv.receive(packet, src, now)   # SEG_DATA / SEG_REPAIR / SEG_PING
    replies = rcv.tick(now)                # NACKs due, expired gaps
    # fwd: [(inner packet, ce)] to forward as DATA / DATA_CE; replies go to rcv.peer

Sans-I/O: bytes and `now` (seconds, any monotonic float) in, bytes out.
Everything here rides in the outer layer between the two PoPs only, under
the link's hop key: the inner packets are carried opaque (a PoP cannot read
them), the device and the gateway never see a segment type. Input from the
network never raises: it is dropped and counted under a named reason.

Wire (docs/OUTER.md §1, "LOOPS segment types"); label = the egress PoP's
in_label for the route, key = that link's hop key, in both directions:

    SEG_DATA    ce(1 bit) | seq(15 bits) || inner packet
    SEG_REPAIR  first seq(2) || n(1) || m(1) || j(1) || parity j of the group's symbols
                symbol i = len(inner_i) (2 bytes) || inner_i, zero padded to the longest
    SEG_NACK    1..NACK_MAX missing seqs, 2 bytes each
    SEG_PING    ticks ms(4) || next seq(2) || srtt ms(2) || min rtt ms(2) || 0(2)
    SEG_PONG    echoed ticks(4) || gaps seen(4) || packets received(4)
"""
from microtun import outer
from microtun_host import fec

# --- wire constants -----------------------------------------------------------------
TYPE_SEG_DATA = outer.TYPE_SEG_DATA
TYPE_SEG_REPAIR = outer.TYPE_SEG_REPAIR
TYPE_SEG_NACK = outer.TYPE_SEG_NACK
TYPE_SEG_PING = outer.TYPE_SEG_PING
TYPE_SEG_PONG = outer.TYPE_SEG_PONG
SEQ_BITS = 15
SEQ_MOD = 1 << SEQ_BITS
SEQ_HALF = SEQ_MOD >> 1
CE_BIT = 0x8000
DATA_HDR = 2
REPAIR_HDR = 5
REPAIR_SAMPLES = 4096
PING_LEN = 12
PONG_LEN = 12
NACK_MAX = 32                 # seqs per SEG_NACK (a NACK is at most 12 + 64 bytes)

# --- implementation limits ------------------------------------------------------------
BUFFER_MAX = 4096             # packets an ingress keeps for retransmission
MISSING_MAX = 512             # gaps an egress tracks (beyond: counted lost at once)
RECENT_MAX = 8192             # seqs an egress remembers (dedup, FEC symbols)
GROUPS_MAX = 64               # FEC groups an egress keeps parities for
JUMP_MAX = 1024               # a seq further ahead than this is not a gap but a resync candidate
RESYNC_AFTER = 8              # consecutive far seqs (authentic) before the egress follows them
NACK_PACKETS_PER_TICK = 4     # SEG_NACKs one egress route sends per tick at most
RETX_BURST = 256 * 1024       # retransmission budget's burst, bytes
MIN_NACK_GAP_S = 0.010        # a missing seq is NACKed again after max(this, 1.25 srtt)
PING_IDLE_S = 1.0             # no pings once nothing was sent this long

MODES = ("off", "nack", "fec", "nack+fec")
DROP_REASONS = (
    "seg_bad_mac",            # segment packet whose hop MAC does not verify
    "seg_malformed",          # wrong length or impossible fields
    "seg_duplicate",          # SEG_DATA whose seq was already received (or a retransmission that lost the race)
    "seg_late",               # SEG_DATA for a seq given up (hold budget over) or older than remembered
    "seg_stale_ping",         # SEG_PING not newer than the last one answered (replay)
    "nack_gone",              # NACK for a seq no longer (or never) in the buffer
    "nack_limit",             # NACK for a seq already retransmitted max_retx times, or too soon again
    "nack_budget",            # retransmission byte budget spent
    "repair_useless",         # parity for a group that is complete, given up, or beyond recovery
)


class SegConfig:
    """Per-segment settings (docs/CONFIG.md, "LOOPS segments"): both PoPs of a
    segment get the same ones from the provisioner."""

    FIELDS = ("mode", "hold_ms", "fec_k", "fec_m", "fec_window_ms", "nack_delay_ms", "max_retx",
              "max_nacks", "retx_ratio", "ping_ms", "ce_rise_ms")

    def __init__(self, mode="nack", hold_ms=250, fec_k=24, fec_m=3, fec_window_ms=150, nack_delay_ms=None,
                 max_retx=2, max_nacks=3, retx_ratio=0.5, ping_ms=200, ce_rise_ms=10):
        if mode not in MODES:
            raise ValueError("segment mode must be one of %s, got %r" % (", ".join(MODES), mode))
        self.mode = mode
        self.nack = "nack" in mode
        self.fec = "fec" in mode
        self.hold_ms = hold_ms
        self.fec_k = fec_k
        self.fec_m = fec_m
        self.fec_window_ms = fec_window_ms
        if nack_delay_ms is None:           # with FEC, give the parities their chance first
            nack_delay_ms = fec_window_ms + 10 if self.fec else 0
        self.nack_delay_ms = nack_delay_ms
        self.max_retx = max_retx
        self.max_nacks = max_nacks
        self.retx_ratio = retx_ratio
        self.ping_ms = ping_ms
        self.ce_rise_ms = ce_rise_ms

    @classmethod
    def from_node(cls, node):
        """From a config.Node (the pop config's routes[i].seg_in/seg_out);
        ConfigError names the field."""
        node.only(*cls.FIELDS)
        kw = {"mode": node.text("mode", choices=MODES)}
        for f, lo, hi in (("hold_ms", 1, 10000), ("fec_k", 1, fec.K_MAX), ("fec_m", 1, fec.M_MAX),
                          ("fec_window_ms", 1, 10000), ("nack_delay_ms", 0, 10000), ("max_retx", 0, 10),
                          ("max_nacks", 0, 10), ("ping_ms", 10, 60000), ("ce_rise_ms", 1, 10000)):
            if node.has(f):
                kw[f] = node.integer(f, lo, hi)
        if node.has("retx_ratio"):
            kw["retx_ratio"] = node.number("retx_ratio", 0, 10)
        cfg = cls(**kw)
        if cfg.fec and cfg.fec_window_ms >= cfg.hold_ms:
            raise node.error("fec_window_ms", "%d ms is not below hold_ms (%d ms): a packet rebuilt from a "
                             "group's parities would arrive after its hold budget" % (cfg.fec_window_ms, cfg.hold_ms))
        return cfg

    def as_dict(self):
        return {f: getattr(self, f) for f in self.FIELDS}

    def __eq__(self, other):
        return isinstance(other, SegConfig) and self.as_dict() == other.as_dict()


def seal(ptype, label, hopkey, payload):
    """outer.seal for bytes payloads, through outer's CPython hash-state
    copies where it has them (same bytes; test_segment checks)."""
    if outer._FAST and type(payload) is bytes:
        hdr = bytes((0x10 | ptype, label >> 16, (label >> 8) & 0xFF, label & 0xFF))
        n = len(payload)
        tail = n.to_bytes(2, "big") + (payload if n <= outer.EXCERPT_WHOLE else
                                       payload[:outer.EXCERPT_HALF] + payload[-outer.EXCERPT_HALF:])
        return hdr + outer._copy_mac(hopkey, hdr, tail) + payload
    return outer.seal(ptype, label, hopkey, payload)


def seq_diff(a, b):
    """a - b in the 15-bit sequence space, in -SEQ_HALF..SEQ_HALF-1."""
    d = (a - b) & (SEQ_MOD - 1)
    return d - SEQ_MOD if d >= SEQ_HALF else d


def _quantiles(xs):
    """{"p50", "p90", "p99", "max"} of a list of ms, or None if empty."""
    if not xs:
        return None
    xs = sorted(xs)
    q = lambda f: round(xs[min(len(xs) - 1, int(len(xs) * f))], 1)     # noqa: E731
    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": round(xs[-1], 1)}


def _u16(b, o):
    return (b[o] << 8) | b[o + 1]


def _u32(b, o):
    return int.from_bytes(b[o:o + 4], "big")


def _ms(now):
    return int(now * 1000) & 0xFFFFFFFF


class _Stats:
    def __init__(self):
        self.drops = dict.fromkeys(DROP_REASONS, 0)
        self.total = 0
        self.last = None

    def drop(self, reason):
        self.drops[reason] += 1
        self.total += 1
        self.last = reason
        return reason


# --- ingress ---------------------------------------------------------------------------

class Sender:
    """The segment's ingress: numbers the route's DATA, keeps each packet
    hold_ms for retransmission (NACK modes), adds parities (FEC modes),
    pings the egress for RTT, and answers NACKs within its bounds."""

    def __init__(self, cfg, label, hopkey, seq0=0):
        self.cfg = cfg
        self.label = label
        self.key = hopkey
        self.seq = seq0 & (SEQ_MOD - 1)
        self.buf = {}                 # seq -> [packet, last send time, retransmissions]
        self.order = []               # seqs in send order (pruned from the front)
        self._head = 0
        self.group = []               # FEC symbols of the open group
        self.group_first = 0
        self.group_t = 0.0
        self.tokens = float(RETX_BURST)
        self.last_data = None
        self.next_ping = 0.0
        self.srtt = None              # seconds
        self.min_rtt = None
        self.rtt = None               # last sample
        self.peer_gaps = 0            # from the last SEG_PONG (the egress's counters)
        self.peer_received = 0
        self.st = _Stats()
        self.sent = self.sent_bytes = 0
        self.retx = self.retx_bytes = 0
        self.parities = self.parity_bytes = 0
        self.pings = self.pongs = self.nacks = 0

    def data(self, inner, ce, now):
        """SEG_DATA for one inner packet, then any parities it completes."""
        cfg = self.cfg
        seq = self.seq
        self.seq = (seq + 1) & (SEQ_MOD - 1)
        hdr = seq | (CE_BIT if ce else 0)
        pkt = seal(TYPE_SEG_DATA, self.label, self.key, bytes((hdr >> 8, hdr & 0xFF)) + inner)
        out = [pkt]
        self.sent += 1
        self.sent_bytes += len(pkt)
        self.tokens = min(RETX_BURST, self.tokens + cfg.retx_ratio * len(pkt))
        self.last_data = now
        if cfg.nack:
            self._expire(now)
            if len(self.buf) >= BUFFER_MAX:
                old = self.order[self._head]
                self._head += 1
                self.buf.pop(old, None)
            self.buf[seq] = [pkt, now, 0]
            self.order.append(seq)
        if cfg.fec:
            if not self.group:
                self.group_first = seq
                self.group_t = now
            self.group.append(len(inner).to_bytes(2, "big") + inner)
            if len(self.group) >= cfg.fec_k:
                out += self._close_group()
        return out

    def _close_group(self):
        syms = self.group
        n = len(syms)
        cfg = self.cfg
        m = min(cfg.fec_m, max(1, int(cfg.fec_m * n / cfg.fec_k + 0.5)))
        hdr = bytes((self.group_first >> 8, self.group_first & 0xFF, n, m))
        out = []
        for j, par in enumerate(fec.encode(syms, m)):
            p = seal(TYPE_SEG_REPAIR, self.label, self.key, hdr + bytes((j,)) + par)
            out.append(p)
            self.parities += 1
            self.parity_bytes += len(p)
        self.group = []
        return out

    def _expire(self, now):
        horizon = now - self.cfg.hold_ms / 1000.0
        order, buf = self.order, self.buf
        h = self._head
        while h < len(order):
            e = buf.get(order[h])
            if e is not None and e[1] > horizon and len(buf) < BUFFER_MAX:
                break
            if e is not None and e[1] <= horizon:
                del buf[order[h]]
            elif e is not None:
                break
            h += 1
        if h > 1024:
            del order[:h]
            h = 0
        self._head = h

    def feedback(self, pkt, now):
        """A SEG_NACK or SEG_PONG from the egress (label and type parsed by
        the caller). Returns the packets to send to the egress: for a NACK
        of n seqs at most n retransmissions, each an earlier SEG_DATA
        unchanged, each packet at most max_retx times in all, within a byte
        budget of retx_ratio times the bytes sent (plus RETX_BURST)."""
        if not outer.verify(self.key, pkt):
            self.st.drop("seg_bad_mac")
            return []
        ptype = pkt[0] & 0x0F
        body = pkt[outer.HEADER_LEN:]
        if ptype == TYPE_SEG_PONG:
            if len(body) != PONG_LEN:
                self.st.drop("seg_malformed")
                return []
            sent = _u32(body, 0)
            rtt = ((_ms(now) - sent) & 0xFFFFFFFF) / 1000.0
            if rtt > 60.0:                  # not an echo of ours: a replay or garbage
                self.st.drop("seg_malformed")
                return []
            self.pongs += 1
            self.rtt = rtt
            self.srtt = rtt if self.srtt is None else 0.875 * self.srtt + 0.125 * rtt     # RFC 6298 §2
            self.min_rtt = rtt if self.min_rtt is None else min(self.min_rtt, rtt)
            self.peer_gaps, self.peer_received = _u32(body, 4), _u32(body, 8)
            return []
        n = len(body)
        if n == 0 or n % 2 or n > 2 * NACK_MAX or not self.cfg.nack:
            self.st.drop("seg_malformed")
            return []
        self.nacks += 1
        self._expire(now)
        out = []
        gap = max(MIN_NACK_GAP_S, 0.5 * (self.srtt or 0.0))
        for o in range(0, n, 2):
            e = self.buf.get(_u16(body, o))
            if e is None:
                self.st.drop("nack_gone")
                continue
            if e[2] >= self.cfg.max_retx or now - e[1] < gap:
                self.st.drop("nack_limit")
                continue
            size = len(e[0])
            if self.tokens < size:
                self.st.drop("nack_budget")
                continue
            self.tokens -= size
            e[1] = now
            e[2] += 1
            self.retx += 1
            self.retx_bytes += size
            out.append(e[0])
        return out

    def tick(self, now):
        out = []
        cfg = self.cfg
        if cfg.fec and self.group and now - self.group_t >= cfg.fec_window_ms / 1000.0:
            out += self._close_group()
        if self.last_data is not None and now - self.last_data < PING_IDLE_S and now >= self.next_ping:
            self.next_ping = now + cfg.ping_ms / 1000.0
            srtt = min(0xFFFF, int((self.srtt or 0) * 1000))
            mn = min(0xFFFF, int((self.min_rtt or 0) * 1000))
            body = _ms(now).to_bytes(4, "big") + bytes((self.seq >> 8, self.seq & 0xFF, srtt >> 8, srtt & 0xFF,
                                                        mn >> 8, mn & 0xFF, 0, 0))
            out.append(seal(TYPE_SEG_PING, self.label, self.key, body))
            self.pings += 1
        return out

    def stats(self):
        return {"role": "ingress", "mode": self.cfg.mode, "sent": self.sent, "sent_bytes": self.sent_bytes,
                "retransmitted": self.retx, "retransmitted_bytes": self.retx_bytes, "parities": self.parities,
                "parity_bytes": self.parity_bytes, "nacks_rx": self.nacks, "pings": self.pings,
                "pongs": self.pongs, "buffered": len(self.buf),
                "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 1),
                "srtt_ms": None if self.srtt is None else round(self.srtt * 1000, 1),
                "min_rtt_ms": None if self.min_rtt is None else round(self.min_rtt * 1000, 1),
                "peer_gaps": self.peer_gaps, "peer_received": self.peer_received,
                "drops": {k: v for k, v in self.st.drops.items() if v}}


# --- egress ------------------------------------------------------------------------------

class Receiver:
    """The segment's egress: forwards every SEG_DATA at once (no reordering
    buffer: the inner window takes packets in any order), notices gaps,
    NACKs them (NACK modes) and rebuilds them from parities (FEC modes). A
    gap is waited for at most hold_ms: a repair arriving later is dropped
    (seg_late), so no packet leaves later than hold_ms after its gap was
    seen. Marks CE on what it forwards when a loss coincides with a
    rising segment RTT (LOOPS §6.2, docs/LOOPS.md)."""

    def __init__(self, cfg, label, hopkey):
        self.cfg = cfg
        self.label = label
        self.key = hopkey
        self.peer = None              # where NACKs go: source of the last fresh authentic SEG_DATA / SEG_PING
        self.top = None               # highest seq received
        self.recent = {}              # seq -> (arrival time, inner or None)
        self.recent_order = []
        self._rhead = 0
        self.missing = {}             # seq -> [noticed at, NACKs sent, next NACK time]
        self.groups = {}              # first seq -> [n, m, {j: parity}, arrival, done]
        self.far = 0                  # consecutive authentic seqs beyond JUMP_MAX
        self.last_ping = None
        self.srtt_ms = 0
        self.min_rtt_ms = 0
        self.ce_pending = 0
        self.st = _Stats()
        self.received = 0             # SEG_DATA packets accepted (first copy)
        self.gaps = 0                 # seqs noticed missing
        self.reordered = 0            # arrived after a later seq, without being NACKed/repaired (late original)
        self.recovered_nack = 0
        self.recovered_fec = 0
        self.unrecovered = 0
        self.ce_marked = 0
        self.nacks_sent = 0
        self.pongs = 0
        self.repair_ms = []           # gap seen -> repaired, ms, the last REPAIR_SAMPLES

    # -- input ---------------------------------------------------------------------------
    def receive(self, pkt, src, now):
        """(to forward [(inner, ce)], replies [packet] to self.peer) for one
        SEG_DATA, SEG_REPAIR or SEG_PING on this route's label."""
        ptype = pkt[0] & 0x0F
        if ptype == TYPE_SEG_DATA:
            if len(pkt) < outer.HEADER_LEN + DATA_HDR + 1:
                return self._bad("seg_malformed")
            if not outer.verify(self.key, pkt):
                return self._bad("seg_bad_mac")
            return self._data(pkt, src, now)
        if ptype == TYPE_SEG_REPAIR:
            if len(pkt) < outer.HEADER_LEN + REPAIR_HDR + 3:
                return self._bad("seg_malformed")
            if not outer.verify(self.key, pkt):
                return self._bad("seg_bad_mac")
            return self._repair(pkt, now), self._nacks(now)
        if len(pkt) != outer.HEADER_LEN + PING_LEN:
            return self._bad("seg_malformed")
        if not outer.verify(self.key, pkt):
            return self._bad("seg_bad_mac")
        return [], self._ping(pkt, src, now)

    def _bad(self, reason):
        self.st.drop(reason)
        return [], []

    def _data(self, pkt, src, now):
        h = _u16(pkt, outer.HEADER_LEN)
        seq = h & (SEQ_MOD - 1)
        ce = bool(h & CE_BIT)
        inner = pkt[outer.HEADER_LEN + DATA_HDR:]
        if self.top is None:
            self.top = (seq - 1) & (SEQ_MOD - 1)
        d = seq_diff(seq, self.top)
        if d > JUMP_MAX or d < -JUMP_MAX:
            # the ingress restarted (its seq starts anew), or an old capture:
            # follow only after RESYNC_AFTER such packets in a row
            self.far += 1
            if self.far < RESYNC_AFTER:
                return self._bad("seg_late")
            self._reset()
            self.top = (seq - 1) & (SEQ_MOD - 1)
            d = 1
        self.far = 0
        if d <= 0:
            if seq in self.recent:
                return self._bad("seg_duplicate")
            m = self.missing.pop(seq, None)
            if m is None:
                return self._bad("seg_late")
            if now - m[0] > self.cfg.hold_ms / 1000.0:
                self.unrecovered += 1
                return self._bad("seg_late")
            if m[1]:
                self.recovered_nack += 1
                self._repaired(now - m[0])
            else:
                self.reordered += 1
        else:
            if d > 1:
                self._gaps(seq, d, now)
            self.top = seq
        self.peer = src
        self._remember(seq, now, inner)
        self.received += 1
        fwd = [(inner, self._ce(ce))]
        return fwd, self._nacks(now) if d > 1 else []

    def _gaps(self, seq, d, now):
        due = now + self.cfg.nack_delay_ms / 1000.0
        for k in range(d - 1, 0, -1):
            s = (seq - k) & (SEQ_MOD - 1)
            self.gaps += 1
            if len(self.missing) >= MISSING_MAX:
                self.unrecovered += 1
                continue
            self.missing[s] = [now, 0, due]
        if self._congested():
            self.ce_pending += d - 1

    def _repaired(self, dt):
        r = self.repair_ms
        if len(r) >= REPAIR_SAMPLES:
            del r[:REPAIR_SAMPLES // 2]
        r.append(dt * 1000.0)

    def _congested(self):
        """LOOPS §6.2: a loss counts as a congestion signal when the
        segment's smoothed RTT (measured by the ingress, sent in its pings)
        has risen more than ce_rise_ms, and a quarter, above its minimum."""
        if not self.min_rtt_ms:
            return False
        return self.srtt_ms - self.min_rtt_ms > max(self.cfg.ce_rise_ms, self.min_rtt_ms / 4)

    def _ce(self, ce):
        if self.ce_pending:
            self.ce_pending -= 1
            self.ce_marked += 1
            return True
        return ce

    def _remember(self, seq, now, inner):
        keep = inner if self.cfg.fec else None
        self.recent[seq] = (now, keep)
        self.recent_order.append(seq)
        self._prune(now)

    def _prune(self, now):
        horizon = now - 2 * self.cfg.hold_ms / 1000.0
        order, rec = self.recent_order, self.recent
        h = self._rhead
        while h < len(order):
            e = rec.get(order[h])
            if e is not None and e[0] > horizon and len(rec) <= RECENT_MAX:
                break
            if e is not None:
                del rec[order[h]]
            h += 1
        if h > 1024:
            del order[:h]
            h = 0
        self._rhead = h

    def _reset(self):
        self.recent.clear()
        self.recent_order = []
        self._rhead = 0
        self.unrecovered += len(self.missing)
        self.missing.clear()
        self.groups.clear()

    def _repair(self, pkt, now):
        b = pkt[outer.HEADER_LEN:]
        first, n, m, j = _u16(b, 0), b[2], b[3], b[4]
        par = b[REPAIR_HDR:]
        if not self.cfg.fec or not 1 <= n <= fec.K_MAX or not 1 <= m <= fec.M_MAX or j >= m or first >= SEQ_MOD:
            self.st.drop("seg_malformed")
            return []
        last = (first + n - 1) & (SEQ_MOD - 1)
        d = JUMP_MAX + 1 if self.top is None else seq_diff(last, self.top)
        if not -JUMP_MAX <= d <= JUMP_MAX or seq_diff(first, self.top) > JUMP_MAX:
            self.st.drop("repair_useless")       # its group is not ours
            return []
        if d > 0:                                # the group's last packets were lost: gaps now
            self._gaps((last + 1) & (SEQ_MOD - 1), d + 1, now)
            self.top = last
        g = self.groups.get(first)
        if g is None:
            if len(self.groups) >= GROUPS_MAX:
                horizon = now - self.cfg.hold_ms / 1000.0
                for k in [k for k, v in self.groups.items() if v[3] <= horizon or v[4]] or [next(iter(self.groups))]:
                    del self.groups[k]
            g = self.groups[first] = [n, m, {}, now, False]
        if g[4] or g[0] != n or g[1] != m or j in g[2] or (g[2] and len(par) != len(next(iter(g[2].values())))):
            self.st.drop("repair_useless")
            return []
        g[2][j] = par
        seqs = [(first + i) & (SEQ_MOD - 1) for i in range(n)]
        miss = [i for i, s in enumerate(seqs) if s in self.missing]
        if not miss:
            if all(s in self.recent for s in seqs):
                g[4] = True
            return []
        have = {}
        for i, s in enumerate(seqs):
            e = self.recent.get(s)
            if e is not None and e[1] is not None:
                if len(e[1]) + 2 > len(par):     # parity shorter than a symbol: not made from this group
                    g[4] = True
                    self.st.drop("seg_malformed")
                    return []
                have[i] = (len(e[1]).to_bytes(2, "big") + e[1]).ljust(len(par), b"\0")
        if len(have) + len(miss) < n:        # a symbol neither here nor missing: forgotten, give up on the group
            g[4] = True
            self.st.drop("repair_useless")
            return []
        if len(miss) > len(g[2]):
            if len(g[2]) == m:               # every parity is in and it is not enough: NACK now (nack+fec)
                for i in miss:
                    self.missing[seqs[i]][2] = now
            return []                        # else wait for more parities
        got = fec.decode(have, g[2], n, len(par))
        g[4] = True
        out = []
        for i, sym in got.items():
            s = seqs[i]
            ln = _u16(sym, 0)
            if ln + 2 > len(sym) or s not in self.missing:
                self.st.drop("seg_malformed")
                continue
            mrec = self.missing.pop(s)
            if now - mrec[0] > self.cfg.hold_ms / 1000.0:
                self.unrecovered += 1
                self.st.drop("seg_late")
                continue
            inner = bytes(sym[2:2 + ln])
            self._remember(s, now, inner)
            self.recovered_fec += 1
            self._repaired(now - mrec[0])
            out.append((inner, self._ce(False)))
        return out

    def _ping(self, pkt, src, now):
        b = pkt[outer.HEADER_LEN:]
        ts = _u32(b, 0)
        if self.last_ping is not None and not 0 < ((ts - self.last_ping) & 0xFFFFFFFF) < 0x80000000:
            self.st.drop("seg_stale_ping")
            return []
        self.last_ping = ts
        self.peer = src
        self.srtt_ms, self.min_rtt_ms = _u16(b, 6), _u16(b, 8)
        nxt = _u16(b, 4) & (SEQ_MOD - 1)
        if self.top is not None:
            d = seq_diff(nxt, self.top)
            if 1 < d <= JUMP_MAX:            # tail loss: the ingress sent seqs we never saw
                self._gaps(nxt, d, now)
                self.top = (nxt - 1) & (SEQ_MOD - 1)
        self.pongs += 1
        body = b[0:4] + (self.gaps & 0xFFFFFFFF).to_bytes(4, "big") + (self.received & 0xFFFFFFFF).to_bytes(4, "big")
        return [seal(TYPE_SEG_PONG, self.label, self.key, body)] + self._nacks(now)

    # -- timers ----------------------------------------------------------------------------
    def tick(self, now):
        return self._nacks(now)

    def _nacks(self, now):
        """Expire gaps over their hold budget; NACK those due (NACK modes)."""
        if not self.missing:
            return []
        cfg = self.cfg
        hold = cfg.hold_ms / 1000.0
        due = []
        for s, m in list(self.missing.items()):
            if now - m[0] > hold:
                del self.missing[s]
                self.unrecovered += 1
            elif cfg.nack and m[2] <= now and m[1] < cfg.max_nacks:
                due.append(s)
        if not due or self.peer is None:
            return []
        again = max(MIN_NACK_GAP_S, 1.25 * self.srtt_ms / 1000.0)
        out = []
        for o in range(0, min(len(due), NACK_MAX * NACK_PACKETS_PER_TICK), NACK_MAX):
            part = due[o:o + NACK_MAX]
            body = b"".join(bytes((s >> 8, s & 0xFF)) for s in part)
            out.append(seal(TYPE_SEG_NACK, self.label, self.key, body))
            for s in part:
                m = self.missing[s]
                m[1] += 1
                m[2] = now + again
        self.nacks_sent += len(out)
        return out

    def stats(self):
        lost = self.gaps - self.reordered                 # lost on the link (before any repair)
        total = self.received - self.recovered_nack + lost
        return {"role": "egress", "mode": self.cfg.mode, "received": self.received, "gaps": self.gaps,
                "loss": round(lost / total, 4) if total > 0 else 0.0, "reordered": self.reordered,
                "recovered_nack": self.recovered_nack, "recovered_fec": self.recovered_fec,
                "unrecovered": self.unrecovered, "waiting": len(self.missing), "nacks_sent": self.nacks_sent,
                "pongs": self.pongs, "ce_marked": self.ce_marked, "srtt_ms": self.srtt_ms,
                "min_rtt_ms": self.min_rtt_ms, "congested": self._congested(),
                "repair_ms": _quantiles(self.repair_ms),
                "drops": {k: v for k, v in self.st.drops.items() if v}}
