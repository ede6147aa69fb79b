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
from array import array
from hmac import compare_digest

from microtun import outer
from microtun_host import fec, hoprelay

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
BUFFER_MAX = 4096             # packets an ingress keeps for retransmission (a power of 2: a ring)
_RING_MASK = BUFFER_MAX - 1
MISSING_MAX = 512             # gaps an egress tracks (beyond: counted lost at once)
RECENT_MAX = 8192             # seqs an egress remembers (dedup, FEC symbols; a power of 2: a ring)
_RECENT_MASK = RECENT_MAX - 1
_FORGET_MASK = 15             # an FEC egress lets go of symbols 2 hold_ms old every 16 packets (Receiver.forget) ...
_FORGET_STEPS = 64            # ... walking at most this many ring slots each time
GROUPS_MAX = 64               # FEC groups an egress keeps parities for
JUMP_MAX = 1024               # a seq further ahead than this is not a gap but a resync candidate
RESYNC_AFTER = 8              # consecutive far seqs (authentic) before the egress follows them
NACK_PACKETS_PER_TICK = 4     # SEG_NACKs one egress route sends per tick at most
RETX_BURST = 256 * 1024       # retransmission budget's burst, bytes
MIN_NACK_GAP_S = 0.010        # a missing seq is NACKed again after max(this, 1.25 srtt) ...
NACK_REPEAT_S = 0.005         # ... and its first NACK once more this soon (a lost NACK costs 5 ms, not a round)
PING_IDLE_S = 1.0             # no pings once nothing was sent this long
LOSS_DECAY = 0.125            # adaptive FEC: weight of the newest pong's counts in the loss estimate (~8 pongs of memory)
_EXCERPT_WHOLE = outer.EXCERPT_WHOLE
_EXCERPT_HALF = outer.EXCERPT_HALF

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
    "repair_useless",         # parity for no group of ours, or that does not fit its group (n, m, j, length),
                              # or whose group is beyond recovery (a parity for a complete group is not a
                              # drop: Receiver.parities_unused)
)


class SegConfig:
    """Per-segment settings (docs/CONFIG.md, "LOOPS segments"): both PoPs of a
    segment get the same ones from the provisioner."""

    FIELDS = ("mode", "hold_ms", "fec_k", "fec_m", "fec_m_min", "fec_target", "fec_window_ms", "nack_delay_ms",
              "max_retx", "max_nacks", "retx_ratio", "ping_ms", "ce_rise_ms")

    def __init__(self, mode="nack", hold_ms=250, fec_k=24, fec_m=3, fec_window_ms=150, nack_delay_ms=None,
                 max_retx=2, max_nacks=4, retx_ratio=0.5, ping_ms=200, ce_rise_ms=10, fec_m_min=None,
                 fec_target=0.01):
        if mode not in MODES:
            raise ValueError("segment mode must be one of %s, got %r" % (", ".join(MODES), mode))
        self.mode = mode
        self.nack = "nack" in mode
        self.fec = "fec" in mode
        self.hold_ms = hold_ms
        self.fec_k = fec_k
        self.fec_m = fec_m
        # adaptive FEC when fec_m_min < fec_m: parities per group move between the
        # two to keep the residual loss (after decoding) at the egress's measured
        # link loss below fec_target (docs/LOOPS.md)
        self.fec_m_min = fec_m if fec_m_min is None else fec_m_min
        if not 0 <= self.fec_m_min <= fec_m:
            raise ValueError("fec_m_min must be within 0..fec_m (%d), got %r" % (fec_m, fec_m_min))
        self.fec_target = fec_target
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
                          ("fec_m_min", 0, fec.M_MAX),
                          ("fec_window_ms", 1, 10000), ("nack_delay_ms", 0, 10000), ("max_retx", 0, 10),
                          ("max_nacks", 0, 10), ("ping_ms", 10, 60000), ("ce_rise_ms", 1, 10000)):
            if node.has(f):
                kw[f] = node.integer(f, lo, hi)
        if node.has("retx_ratio"):
            kw["retx_ratio"] = node.number("retx_ratio", 0, 10)
        if node.has("fec_target"):
            kw["fec_target"] = node.number("fec_target", 0.0001, 0.5)
        if kw.get("fec_m_min", 0) > kw.get("fec_m", 3):
            raise node.error("fec_m_min", "%d is above fec_m (%d): adaptive FEC moves between fec_m_min and fec_m "
                             "parities per group" % (kw["fec_m_min"], kw.get("fec_m", 3)))
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

class Sealer:
    """seal() for one (type, label, hop key): the header bytes and the HMAC
    state after them are prepared once, so a packet costs two hash-state
    copies, one digest each and one join (the bytes are outer.seal's;
    test_segment checks). `seal2(prefix, payload)` seals prefix + payload
    without building that concatenation first."""

    __slots__ = ("ptype", "label", "key", "hdr", "ih", "oh")

    def __init__(self, ptype, label, hopkey):
        self.ptype = ptype
        self.label = label
        self.key = hopkey
        self.hdr = bytes((0x10 | ptype, label >> 16, (label >> 8) & 0xFF, label & 0xFF))
        self.ih = self.oh = None
        if outer._FAST:
            self.ih = hopkey._ih.copy()
            self.ih.update(self.hdr)
            self.oh = hopkey._oh

    def seal(self, payload):
        if self.ih is None:
            return outer.seal(self.ptype, self.label, self.key, payload)
        n = len(payload)
        h = self.ih.copy()
        h.update(n.to_bytes(2, "big"))
        if n <= _EXCERPT_WHOLE:
            h.update(payload)
        else:
            h.update(payload[:_EXCERPT_HALF])
            h.update(payload[-_EXCERPT_HALF:])
        o = self.oh.copy()
        o.update(h.digest())
        return b"".join((self.hdr, o.digest()[:outer.MAC_LEN], payload))

    def seal2(self, prefix, payload):
        """seal(prefix + payload) for a prefix of at most _EXCERPT_HALF bytes
        (a SEG_DATA's seq, a SEG_REPAIR's header)."""
        if self.ih is None:
            return outer.seal(self.ptype, self.label, self.key, prefix + payload)
        k = len(prefix)
        n = len(payload) + k
        h = self.ih.copy()
        h.update(n.to_bytes(2, "big"))
        h.update(prefix)
        if n <= _EXCERPT_WHOLE:
            h.update(payload)
        else:
            h.update(payload[:_EXCERPT_HALF - k])
            h.update(payload[-_EXCERPT_HALF:])
        o = self.oh.copy()
        o.update(h.digest())
        return b"".join((self.hdr, o.digest()[:outer.MAC_LEN], prefix, payload))




def residual_loss(p, k, m):
    """Expected fraction of a group's k data packets still missing after
    decoding, when each of its k + m symbols is lost independently with
    probability p: more than m losses leave the data among them lost
    (k / (k + m) of them on average)."""
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    n = k + m
    lost = 0.0
    c = 1.0                                   # C(n, x)
    for x in range(n + 1):
        if x > m:
            lost += c * p ** x * (1 - p) ** (n - x) * x
        c = c * (n - x) / (x + 1)
    return lost / n


def adapt_m(p, k, m_min, m_max, target):
    """The fewest parities per k data packets, within [m_min, m_max], that
    bring the residual loss at link loss p down to target (m_max if none
    does)."""
    for m in range(m_min, m_max + 1):
        if residual_loss(p, k, m) <= target:
            return m
    return m_max


class Sender:
    """The segment's ingress: numbers the route's DATA, keeps each packet
    hold_ms for retransmission (NACK modes), adds parities (FEC modes;
    adaptive between fec_m_min and fec_m from the egress's reported loss),
    pings the egress for RTT, and answers NACKs within its bounds.

    Hot path: send() writes the packet into a ring slot (seq mod
    BUFFER_MAX; the slot's packet carries its own seq), no dict, no
    expiry walk per packet; the retransmission budget is refilled when a
    NACK is answered, from the bytes sent since."""

    def __init__(self, cfg, label, hopkey, seq0=0):
        self.cfg = cfg
        self.label = label
        self.key = hopkey
        self.seq = seq0 & (SEQ_MOD - 1)
        self.sealer = Sealer(TYPE_SEG_DATA, label, hopkey)
        self._verify = verifier_for(hopkey)     # NACKs and pongs from the egress
        self.repair_sealer = Sealer(TYPE_SEG_REPAIR, label, hopkey) if cfg.fec else None
        self.extra = []               # parities send() made, for the caller to send after its packet
        self.trace = None             # [(seq, first send time)] while a benchmark traces (docs/LOOPS.md)
        if cfg.nack:
            self._pkt = [None] * BUFFER_MAX       # ring: slot seq & _RING_MASK
            self._t = array("d", bytes(8 * BUFFER_MAX))   # last send time of the slot
            self._retx = bytearray(BUFFER_MAX)
        else:
            self._pkt = None
        self._clean = self.seq        # ring slots before this seq are empty
        self.group = []               # the open FEC group's inner packets (symbols when it closes)
        self.group_first = 0
        self.group_t = 0.0
        self.fec_m = cfg.fec_m        # parities per full group now (adaptive: moves within the bounds)
        self.loss = None              # the egress's loss before repair, smoothed over its pongs
        self._g = self._r = 0.0       # decayed gaps / received deltas behind self.loss
        self.tokens = float(RETX_BURST)
        self._tok_bytes = 0           # sent_bytes when the budget was last refilled
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
        self.kick = False             # a deadline earlier than the caller's timer appeared (see timer())

    def send(self, inner, ce, now):
        """SEG_DATA for one inner packet (bytes); parities it completes are
        left in self.extra."""
        seq = self.seq
        self.seq = (seq + 1) & (SEQ_MOD - 1)
        pkt = self.sealer.seal2((seq | CE_BIT if ce else seq).to_bytes(2, "big"), inner)
        self.keep(seq, pkt, inner, now)
        return pkt

    def keep(self, seq, pkt, inner, now):
        """What sending SEG_DATA seq (pkt, made from inner) changes: counters,
        the ring, the FEC group (send() and ingress_for()'s function)."""
        self.sent += 1
        self.sent_bytes += len(pkt)
        last = self.last_data
        self.last_data = now
        if last is None or now - last >= PING_IDLE_S:
            self.kick = True          # pings resume
        if self._pkt is not None:
            i = seq & _RING_MASK
            self._pkt[i] = pkt
            self._t[i] = now
            self._retx[i] = 0
        if self.trace is not None or self.cfg.fec:
            self.keep_more(seq, inner, now)

    def keep_more(self, seq, inner, now):
        """keep()'s rarer part: the trace and the FEC group (none opens while
        adaptive FEC sends no parities: it would close with nothing to send)."""
        if self.trace is not None:
            self.trace.append((seq, now))
        if self.cfg.fec and (self.group or self.fec_m):
            if not self.group:
                self.group_first = seq
                self.group_t = now
                self.kick = True      # the group closes by time
            self.group.append(inner)      # made a symbol (length || inner) when the group closes
            if len(self.group) >= self.cfg.fec_k:
                self.extra += self._close_group()

    def data(self, inner, ce, now):
        """[SEG_DATA, parities...] for one inner packet (send() as a list)."""
        out = [self.send(bytes(inner), ce, now)]
        if self.extra:
            out += self.extra
            self.extra = []
        return out

    def _close_group(self):
        group = self.group
        self.group = []
        n = len(group)
        cfg = self.cfg
        full = self.fec_m
        if full == 0:
            return []
        syms = [(_LEN[len(x)] if len(x) < 2048 else len(x).to_bytes(2, "big")) + x for x in group]
        m = min(full, max(1, int(full * n / cfg.fec_k + 0.5)))
        f0, f1 = self.group_first >> 8, self.group_first & 0xFF
        out = []
        seal2 = self.repair_sealer.seal2
        for j, par in enumerate(fec.encode(syms, m)):
            p = seal2(bytes((f0, f1, n, m, j)), par)
            out.append(p)
            self.parities += 1
            self.parity_bytes += len(p)
        return out

    def _slot(self, seq, now):
        """Ring index of seq if its packet is still kept (sent within
        hold_ms), else None."""
        if self._pkt is None:
            return None
        i = seq & _RING_MASK
        p = self._pkt[i]
        if p is None or ((p[outer.HEADER_LEN] << 8) | p[outer.HEADER_LEN + 1]) & (SEQ_MOD - 1) != seq:
            return None
        if now - self._t[i] > self.cfg.hold_ms / 1000.0:
            return None
        return i

    def _release(self, now):
        """Drop the ring's references to packets older than hold_ms (from
        the timer, not per packet): memory goes back while the route idles."""
        if self._pkt is None:
            return
        horizon = now - self.cfg.hold_ms / 1000.0
        s = self._clean
        if (self.seq - s) & (SEQ_MOD - 1) > BUFFER_MAX:
            s = (self.seq - BUFFER_MAX) & (SEQ_MOD - 1)
        for _ in range((self.seq - s) & (SEQ_MOD - 1)):
            i = s & _RING_MASK
            if self._pkt[i] is not None:
                if self._t[i] > horizon:
                    break
                self._pkt[i] = None
            s = (s + 1) & (SEQ_MOD - 1)
        self._clean = s

    def feedback(self, pkt, now):
        """A SEG_NACK or SEG_PONG from the egress (label and type parsed by
        the caller). Returns the packets to send to the egress: for a NACK
        of n seqs at most n retransmissions, each an earlier SEG_DATA
        unchanged, each packet at most max_retx times in all, within a byte
        budget of retx_ratio times the bytes sent (plus RETX_BURST)."""
        if not self._verify(pkt):
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
            self._measured(_u32(body, 4), _u32(body, 8))
            return []
        n = len(body)
        if n == 0 or n % 2 or n > 2 * NACK_MAX or not self.cfg.nack:
            self.st.drop("seg_malformed")
            return []
        self.nacks += 1
        self.tokens = min(RETX_BURST, self.tokens + self.cfg.retx_ratio * (self.sent_bytes - self._tok_bytes))
        self._tok_bytes = self.sent_bytes
        out = []
        gap = max(MIN_NACK_GAP_S, 0.5 * (self.srtt or 0.0))
        for o in range(0, n, 2):
            i = self._slot(_u16(body, o), now)
            if i is None:
                self.st.drop("nack_gone")
                continue
            if self._retx[i] >= self.cfg.max_retx or now - self._t[i] < gap:
                self.st.drop("nack_limit")
                continue
            p = self._pkt[i]
            size = len(p)
            if self.tokens < size:
                self.st.drop("nack_budget")
                continue
            self.tokens -= size
            self._t[i] = now
            self._retx[i] += 1
            self.retx += 1
            self.retx_bytes += size
            out.append(p)
        return out

    def _measured(self, gaps, received):
        """The egress's cumulative counters from a pong: the link's loss
        before repair, decayed over the last few pongs (a lost pong only
        makes the next delta longer); adaptive FEC follows it."""
        dg = (gaps - self.peer_gaps) & 0xFFFFFFFF
        dr = (received - self.peer_received) & 0xFFFFFFFF
        self.peer_gaps, self.peer_received = gaps, received
        if dg + dr == 0 or dg > 0x7FFFFFFF or dr > 0x7FFFFFFF:
            return                          # nothing new, or counters that went back (the egress restarted)
        self._g = self._g * (1 - LOSS_DECAY) + dg
        self._r = self._r * (1 - LOSS_DECAY) + dr
        self.loss = self._g / (self._g + self._r)
        cfg = self.cfg
        if cfg.fec and cfg.fec_m_min < cfg.fec_m:
            self.fec_m = adapt_m(self.loss, cfg.fec_k, cfg.fec_m_min, cfg.fec_m, cfg.fec_target)

    def timer(self, now):
        """When tick() has something to do next (a monotonic time), or None."""
        cfg = self.cfg
        t = None
        if self.last_data is not None and now - self.last_data < PING_IDLE_S:
            t = self.next_ping
        if self.group:
            g = self.group_t + cfg.fec_window_ms / 1000.0
            t = g if t is None or g < t else t
        if self._pkt is not None and self._clean != self.seq:
            i = self._clean & _RING_MASK              # the oldest packet kept: let go of it once expired
            r = max(self._t[i] if self._pkt[i] is not None else now, self.last_data) + cfg.hold_ms / 1000.0 + 0.001
            t = r if t is None or r < t else t
        return t

    def tick(self, now):
        out = []
        cfg = self.cfg
        self.kick = False
        if cfg.fec and self.group and now >= self.group_t + cfg.fec_window_ms / 1000.0:   # as timer() says
            out += self._close_group()
        if self.last_data is not None and now - self.last_data < PING_IDLE_S and now >= self.next_ping:
            self.next_ping = now + cfg.ping_ms / 1000.0
            srtt = min(0xFFFF, int((self.srtt or 0) * 1000))
            mn = min(0xFFFF, int((self.min_rtt or 0) * 1000))
            body = _ms(now).to_bytes(4, "big") + bytes((self.seq >> 8, self.seq & 0xFF, srtt >> 8, srtt & 0xFF,
                                                        mn >> 8, mn & 0xFF, 0, 0))
            out.append(seal(TYPE_SEG_PING, self.label, self.key, body))
            self.pings += 1
        self._release(now)
        return out

    def stats(self):
        buffered = 0
        if self._pkt is not None:
            horizon = self.cfg.hold_ms / 1000.0
            buffered = sum(1 for i, p in enumerate(self._pkt) if p is not None and self.last_data is not None
                           and self.last_data - self._t[i] <= horizon)
        return {"role": "ingress", "mode": self.cfg.mode, "sent": self.sent, "sent_bytes": self.sent_bytes,
                "retransmitted": self.retx, "retransmitted_bytes": self.retx_bytes, "parities": self.parities,
                "parity_bytes": self.parity_bytes, "fec_m": self.fec_m if self.cfg.fec else None,
                "loss": None if self.loss is None else round(self.loss, 4),
                "nacks_rx": self.nacks, "pings": self.pings,
                "pongs": self.pongs, "buffered": buffered,
                "rtt_ms": None if self.rtt is None else round(self.rtt * 1000, 1),
                "srtt_ms": None if self.srtt is None else round(self.srtt * 1000, 1),
                "min_rtt_ms": None if self.min_rtt is None else round(self.min_rtt * 1000, 1),
                "peer_gaps": self.peer_gaps, "peer_received": self.peer_received,
                "drops": {k: v for k, v in self.st.drops.items() if v}}


# --- egress ------------------------------------------------------------------------------

class Receiver:
    """The segment's egress: forwards every SEG_DATA at once (no reordering
    buffer: the inner window takes packets in any order), notices gaps,
    NACKs them (NACK modes) at once, on the packet that shows the gap, and
    rebuilds them from parities (FEC modes). A gap is waited for at most
    hold_ms: a repair arriving later is dropped (seg_late), so no packet
    leaves later than hold_ms after its gap was seen. Marks CE on what it
    forwards when a loss coincides with a rising segment RTT (LOOPS §6.2,
    docs/LOOPS.md).

    Hot path: data() takes an in-order SEG_DATA with a ring write (seq
    mod RECENT_MAX, tagged with the seq) and a few integer operations;
    dicts are touched only for gaps and FEC groups."""

    def __init__(self, cfg, label, hopkey):
        self.cfg = cfg
        self.label = label
        self.key = hopkey
        self._verify = verifier_for(hopkey)
        self.peer = None              # where NACKs go: source of the last fresh authentic SEG_DATA / SEG_PING
        self.top = None               # highest seq received
        self._rseq = array("l", [-1]) * RECENT_MAX     # ring of received seqs: slot seq & _RECENT_MASK
        self._rt = array("d", bytes(8 * RECENT_MAX))   # their arrival times
        self._rin = [None] * RECENT_MAX if cfg.fec else None   # their inner packets (FEC symbols)
        self.missing = {}             # seq -> [noticed at, NACKs sent, next NACK time]
        self.groups = {}              # first seq -> [n, m, {j: parity}, arrival, done]
        self.clean = None             # every seq from this one to top was received, none seen missing (FEC:
                                      # a parity of a group within is unused, with no lookup; Receiver.complete)
        self._fseq = None             # FEC: the oldest seq whose ring slot may still hold a symbol (forget)
        self.far = 0                  # consecutive authentic seqs beyond JUMP_MAX
        self.last_ping = None
        self.srtt_ms = 0
        self.min_rtt_ms = 0
        self.ce_pending = 0
        self.ce = False               # data()'s packet leaves marked (DATA_CE)
        self.replies = []             # NACKs / pongs for self.peer, left by data() and ping for the caller
        self.rebuilt = []             # [(inner, ce)] rebuilt by FEC, left by repair for the caller
        self.trace = None             # [(seq, release time, how)] while a benchmark traces (docs/LOOPS.md)
        self.st = _Stats()
        self.received = 0             # SEG_DATA packets accepted (first copy)
        self.gaps = 0                 # seqs noticed missing
        self.reordered = 0            # arrived after a later seq, without being NACKed/repaired (late original)
        self.recovered_nack = 0
        self.recovered_fec = 0
        self.parities_unused = 0      # parities whose group was complete, rebuilt or given up (no loss: all of them)
        self.unrecovered = 0
        self.ce_marked = 0
        self.nacks_sent = 0
        self.pongs = 0
        self.repair_ms = []           # gap seen -> repaired, ms, the last REPAIR_SAMPLES
        self.kick = False             # a deadline earlier than the caller's timer appeared (see timer())

    # -- input ---------------------------------------------------------------------------
    def receive(self, pkt, src, now):
        """(to forward [(inner, ce)], replies [packet] to self.peer) for one
        SEG_DATA, SEG_REPAIR or SEG_PING on this route's label: the list
        form of data() / repair() / ping()."""
        ptype = pkt[0] & 0x0F
        if ptype == TYPE_SEG_DATA:
            inner = self.data(pkt, src, now)
            fwd = [] if inner is None else [(inner, self.ce)]
        elif ptype == TYPE_SEG_REPAIR:
            self.repair(pkt, now)
            fwd = self.rebuilt
            self.rebuilt = []
        else:
            self.ping(pkt, src, now)
            fwd = []
        rep = self.replies
        self.replies = []
        return fwd, rep

    def data(self, pkt, src, now):
        """The inner packet of a SEG_DATA to forward now (self.ce: marked),
        or None (dropped, counted); NACKs for a gap it shows are left in
        self.replies."""
        if len(pkt) < outer.HEADER_LEN + DATA_HDR + 1:
            self.st.drop("seg_malformed")
            return None
        if not self._verify(pkt):
            self.st.drop("seg_bad_mac")
            return None
        return self.take(pkt, src, now)

    def take(self, pkt, src, now):
        """data() for a SEG_DATA whose length and hop MAC were checked
        (egress_for()'s function checks them itself)."""
        h = (pkt[outer.HEADER_LEN] << 8) | pkt[outer.HEADER_LEN + 1]
        seq = h & (SEQ_MOD - 1)
        top = self.top
        if top is None:
            top = self.top = (seq - 1) & (SEQ_MOD - 1)
            self.clean = seq
        d = (seq - top) & (SEQ_MOD - 1)
        if d == 1:                                    # the usual case: the next one
            self.top = seq
        else:
            if d >= SEQ_HALF:
                d -= SEQ_MOD
            if d > JUMP_MAX or d < -JUMP_MAX:
                # the ingress restarted (its seq starts anew), or an old capture:
                # follow only after RESYNC_AFTER such packets in a row
                self.far += 1
                if self.far < RESYNC_AFTER:
                    self.st.drop("seg_late")
                    return None
                self._reset()
                self.top = (seq - 1) & (SEQ_MOD - 1)
                self.clean = seq
                return self.take(pkt, src, now)
            if d <= 0:
                how = self._late(seq, now)
                if how is None:
                    return None
                if self.trace is not None:
                    self.trace.append((seq, now, how))
            else:
                self._gaps(seq, d, now)
                self.top = seq
                if self.cfg.nack:
                    self.replies += self._nacks(now)
        self.far = 0
        self.peer = src
        i = seq & _RECENT_MASK
        self._rseq[i] = seq
        self._rt[i] = now
        inner = pkt[outer.HEADER_LEN + DATA_HDR:]
        if self._rin is not None:
            self._rin[i] = inner
            if not i & _FORGET_MASK:
                self.forget(i, now)
        self.received += 1
        if self.ce_pending:
            self.ce_pending -= 1
            self.ce_marked += 1
            self.ce = True
        else:
            self.ce = h >= CE_BIT
        if self.trace is not None and d > 0:
            self.trace.append((seq, now, "new"))
        return inner

    def _late(self, seq, now):
        """A seq at or below the top: "nack" (a repaired gap), "reordered"
        (a gap filled by its late original), or None (dropped, counted)."""
        if self._has(seq, now):
            self.st.drop("seg_duplicate")
            return None
        m = self.missing.pop(seq, None)
        if m is None:
            self.st.drop("seg_late")
            return None
        if now - m[0] > self.cfg.hold_ms / 1000.0:
            self.unrecovered += 1
            self.st.drop("seg_late")
            return None
        if m[1]:
            self.recovered_nack += 1
            self._repaired(now - m[0])
            return "nack"
        self.reordered += 1
        return "reordered"

    def _has(self, seq, now):
        """seq was received (within 2 hold_ms and the last RECENT_MAX seqs)."""
        i = seq & _RECENT_MASK
        return self._rseq[i] == seq and now - self._rt[i] <= 2 * self.cfg.hold_ms / 1000.0

    def forget(self, i, now):
        """Let go of the FEC symbols past their use (2 hold_ms old: _has()
        no longer takes them): from the oldest slot that may hold one
        (self._fseq) towards the top, up to the first younger symbol, at most
        _FORGET_STEPS slots. Called every _FORGET_MASK + 1 packets (slot i is
        the packet's): the ring then holds 2 hold_ms of packets and at most
        16 more (at 200 packets/s about 110, not 8192: 2 MB less per route at
        250 bytes, 10 MB at 1200), so the allocator reuses the few blocks it
        freed instead of handing out cold ones. Also keeps self.clean within
        JUMP_MAX of the top (its seq distance must not wrap)."""
        rin, rt = self._rin, self._rt
        top = self.top
        mask = SEQ_MOD - 1
        c = self.clean
        if c is not None and seq_diff(top, c) > JUMP_MAX:     # (not when c is top + 1: nothing clean yet)
            self.clean = (top - JUMP_MAX) & mask
        s = self._fseq
        d = -1 if s is None else (top - s) & mask
        if not 0 <= d < RECENT_MAX:                  # new, or behind by more than the ring: the whole ring
            s = (top - RECENT_MAX + 1) & mask
            d = RECENT_MAX - 1
        horizon = now - 2 * self.cfg.hold_ms / 1000.0
        for _ in range(min(d, _FORGET_STEPS)):
            j = s & _RECENT_MASK
            if rin[j] is not None:
                if rt[j] >= horizon:
                    break
                rin[j] = None
            s = (s + 1) & mask
        self._fseq = s

    def complete(self, first, n):
        """Every seq of the group (first, n) was received, none ever seen
        missing: its parities have nothing to repair (one comparison, no
        lookup per seq: with no loss every parity ends here)."""
        c = self.clean
        if c is None:
            return False
        a = (first - c) & (SEQ_MOD - 1)
        return a < SEQ_HALF and a + n - 1 <= seq_diff(self.top, c)

    def _inner(self, seq, now):
        """The inner packet of a received seq (FEC modes), or None."""
        if self._rin is None or not self._has(seq, now):
            return None
        return self._rin[seq & _RECENT_MASK]

    def _gaps(self, seq, d, now):
        """seq arrived (or is next, from a ping or a parity) and the d - 1
        seqs before it are missing."""
        self.clean = seq
        due = now + self.cfg.nack_delay_ms / 1000.0
        for k in range(d - 1, 0, -1):
            s = (seq - k) & (SEQ_MOD - 1)
            self.gaps += 1
            if len(self.missing) >= MISSING_MAX:
                self.unrecovered += 1
                continue
            self.missing[s] = [now, 0, due]
        self.kick = True
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

    def _reset(self):
        self._rseq = array("l", [-1]) * RECENT_MAX
        if self._rin is not None:
            self._rin = [None] * RECENT_MAX
        self.unrecovered += len(self.missing)
        self.missing.clear()
        self.groups.clear()
        self.far = 0
        self.clean = self._fseq = None

    def repair(self, pkt, now, verified=False):
        """A SEG_REPAIR: packets it rebuilds go to self.rebuilt, NACKs now
        due to self.replies. verified: its length and hop MAC were checked
        (parity_for()'s function)."""
        if not verified:
            if len(pkt) < outer.HEADER_LEN + REPAIR_HDR + 3:
                self.st.drop("seg_malformed")
                return
            if not self._verify(pkt):
                self.st.drop("seg_bad_mac")
                return
        self.rebuilt += self._repair(pkt, now)
        self.replies += self._nacks(now)

    def _repair(self, pkt, now):
        b = pkt[outer.HEADER_LEN:]
        first, n, m, j = _u16(b, 0), b[2], b[3], b[4]
        par = b[REPAIR_HDR:]
        if not self.cfg.fec or not 1 <= n <= fec.K_MAX or not 1 <= m <= fec.M_MAX or j >= m or first >= SEQ_MOD:
            self.st.drop("seg_malformed")
            return []
        if self.complete(first, n):              # no loss: the usual case
            self.parities_unused += 1
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
        if g[4]:                                 # complete (no loss: the usual case), rebuilt or given up
            self.parities_unused += 1
            return []
        if g[0] != n or g[1] != m or j in g[2] or (g[2] and len(par) != len(next(iter(g[2].values())))):
            self.st.drop("repair_useless")       # not made for this group as it stands
            return []
        g[2][j] = par
        seqs = [(first + i) & (SEQ_MOD - 1) for i in range(n)]
        missing = self.missing
        miss = [i for i, s in enumerate(seqs) if s in missing] if missing else None
        if not miss:
            if all(self._has(s, now) for s in seqs):      # complete: every seq received
                g[4] = True
                self.parities_unused += 1
            return []
        have = {}
        for i, s in enumerate(seqs):
            e = self._inner(s, now)
            if e is not None:
                if len(e) + 2 > len(par):        # parity shorter than a symbol: not made from this group
                    g[4] = True
                    self.st.drop("seg_malformed")
                    return []
                have[i] = (len(e).to_bytes(2, "big") + e).ljust(len(par), b"\0")
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
            k = s & _RECENT_MASK
            self._rseq[k] = s
            self._rt[k] = now
            self._rin[k] = inner
            if self.trace is not None:
                self.trace.append((s, now, "fec"))
            self.recovered_fec += 1
            self._repaired(now - mrec[0])
            out.append((inner, self._ce(False)))
        return out

    def ping(self, pkt, src, now):
        """A SEG_PING: its pong (and NACKs now due) go to self.replies."""
        if len(pkt) != outer.HEADER_LEN + PING_LEN:
            self.st.drop("seg_malformed")
            return
        if not self._verify(pkt):
            self.st.drop("seg_bad_mac")
            return
        self.replies += self._ping(pkt, src, now)

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
        self.kick = False
        return self._nacks(now)

    def timer(self, now):
        """When tick() has something to do next (a NACK due, a gap's hold
        budget over), or None."""
        if not self.missing:
            return None
        cfg = self.cfg
        hold = cfg.hold_ms / 1000.0
        t = None
        for m in self.missing.values():
            d = m[0] + hold + 0.001          # expired once strictly past its budget
            if cfg.nack and m[1] < cfg.max_nacks and m[2] < d:
                d = m[2]
            if t is None or d < t:
                t = d
        return t

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
                # the first NACK is sent twice, NACK_REPEAT_S apart: a lost NACK then
                # costs that, not a whole round (the ingress answers the copy of one
                # that arrived with nothing: nack_limit)
                m[2] = now + (NACK_REPEAT_S if m[1] == 1 else again - NACK_REPEAT_S if m[1] == 2 else again)
        self.nacks_sent += len(out)
        return out

    def stats(self):
        lost = self.gaps - self.reordered                 # lost on the link (before any repair)
        total = self.received - self.recovered_nack + lost
        return {"role": "egress", "mode": self.cfg.mode, "received": self.received, "gaps": self.gaps,
                "loss": round(lost / total, 4) if total > 0 else 0.0, "reordered": self.reordered,
                "recovered_nack": self.recovered_nack, "recovered_fec": self.recovered_fec,
                "parities_unused": self.parities_unused,
                "unrecovered": self.unrecovered, "waiting": len(self.missing), "nacks_sent": self.nacks_sent,
                "pongs": self.pongs, "ce_marked": self.ce_marked, "srtt_ms": self.srtt_ms,
                "min_rtt_ms": self.min_rtt_ms, "congested": self._congested(),
                "repair_ms": _quantiles(self.repair_ms),
                "drops": {k: v for k, v in self.st.drops.items() if v}}


# --- the PoP's hot path (CPython) ---------------------------------------------------------
# One function per route for the usual packet into and out of a segment, as
# hoprelay.relay_for is for a plain relay: the hash states of both keys
# prepared once (two compressions per MAC, CPython's built-in SHA-256), the
# excerpt read once, no generic verify or sealer call between. The bytes
# and every change of state are Sender.send's and Receiver.data's
# (Sender.keep, Receiver.take; host_tests/test_segment.py compares them);
# docs/LOOPS.md "CPU" says why it matters at a PoP's packet rates.

_HDR = outer.HEADER_LEN
_LEN = hoprelay._LEN      # length fields of payloads up to 2047 bytes (the relay's table)
_PMAX = outer.PAYLOAD_MAX


def verifier_for(key):
    """verify(packet) -> True when its hop MAC checks out under key (outer.verify's
    answer), with the key's hash states prepared once: for the segment
    packets that are not the hot path's (parities, pings, NACKs, pongs, and
    SEG_DATA out of order)."""
    ih, oh = hoprelay.states(key)
    half, whole, mac_len = _EXCERPT_HALF, _EXCERPT_WHOLE, outer.MAC_LEN

    def verify(packet):
        n = len(packet) - _HDR
        if n < 0 or n > _PMAX:
            return False
        h = ih.copy()
        h.update(packet[0:4])
        if n > whole:
            h.update(_LEN[n] if n < 2048 else n.to_bytes(2, "big"))
            h.update(packet[_HDR:_HDR + half])
            h.update(packet[-half:])
        else:
            h.update(_LEN[n])
            h.update(packet[_HDR:])
        o = oh.copy()
        o.update(h.digest())
        return compare_digest(o.digest()[:mac_len], packet[4:_HDR])

    return verify


def ingress_for(snd, in_key):
    """ingress(packet, now) -> the SEG_DATA (bytes) that carries a DATA or
    DATA_CE packet received under in_key into snd's segment, or None when
    its hop MAC does not verify (nothing changes then); parities it
    completes are in snd.extra, as after Sender.send."""
    ih1, oh1 = hoprelay.states(in_key)
    ih2, oh2 = hoprelay.states(snd.key)
    hdr = snd.sealer.hdr
    ih2.update(hdr)
    keep_more = snd.keep_more
    fec_on = snd.cfg.fec
    fec_k = snd.cfg.fec_k
    ring = snd._pkt
    times, retx = (snd._t, snd._retx) if ring is not None else (None, None)
    ce_byte = outer.BYTE0_DATA_CE
    half, whole, mac_len, mask = _EXCERPT_HALF, _EXCERPT_WHOLE, outer.MAC_LEN, SEQ_MOD - 1

    def ingress(packet, now):
        n = len(packet) - _HDR
        if n > whole:
            if n > _PMAX - DATA_HDR:
                return None
            h = ih1.copy()
            h.update(packet[0:4])
            h.update(_LEN[n] if n < 2048 else n.to_bytes(2, "big"))
            h.update(packet[_HDR:_HDR + half])
            h.update(packet[-half:])
        elif n >= 0:
            h = ih1.copy()
            h.update(packet[0:4])
            h.update(_LEN[n])
            h.update(packet[_HDR:])
        else:
            return None
        o = oh1.copy()
        o.update(h.digest())
        if not compare_digest(o.digest()[:mac_len], packet[4:_HDR]):
            return None
        seq = snd.seq
        snd.seq = (seq + 1) & mask
        sb = (seq | CE_BIT if packet[0] == ce_byte else seq).to_bytes(2, "big")
        inner = packet[_HDR:]
        m = n + DATA_HDR
        h = ih2.copy()
        h.update(_LEN[m] if m < 2048 else m.to_bytes(2, "big"))
        h.update(sb)
        if m <= whole:
            h.update(inner)
        else:
            h.update(inner[:half - DATA_HDR])
            h.update(inner[-half:])
        o = oh2.copy()
        o.update(h.digest())
        pkt = b"".join((hdr, o.digest()[:mac_len], sb, inner))
        # Sender.keep, inline (the ring is the Sender's for its whole life): a
        # call costs ~1-2 us more per packet with the caches cold
        snd.sent += 1
        snd.sent_bytes += len(pkt)
        last = snd.last_data
        snd.last_data = now
        if last is None or now - last >= PING_IDLE_S:
            snd.kick = True
        if ring is not None:
            i = seq & _RING_MASK
            ring[i] = pkt
            times[i] = now
            retx[i] = 0
        if fec_on:
            # Sender.keep_more for a packet into an open group, inline (a call
            # per packet costs as much as the append)
            group = snd.group
            if group and snd.trace is None:
                group.append(inner)
                if len(group) >= fec_k:
                    snd.extra += snd._close_group()
            elif group or snd.fec_m or snd.trace is not None:
                keep_more(seq, inner, now)
        elif snd.trace is not None:
            keep_more(seq, inner, now)
        return pkt

    return ingress


def parity_for(rcv):
    """parity(packet) -> True when a SEG_REPAIR of rcv's segment is authentic
    and its group complete (no loss: every parity): counted in
    rcv.parities_unused and nothing else runs for it. False: a parity that
    may repair (authentic: Receiver.repair(packet, now, verified=True) goes
    on with it) or None: too short or long ("seg_malformed") or not
    authentic ("seg_bad_mac"), counted in rcv as Receiver.repair counts
    them, so that a forged parity costs one hop MAC, not two."""
    verify = verifier_for(rcv.key)      # a parity is one packet in 8: the call is not worth an inline copy
    mask = SEQ_MOD - 1
    complete = rcv.complete
    drop = rcv.st.drop
    least = REPAIR_HDR + 3

    def parity(packet):
        n = len(packet) - _HDR
        if n < least or n > _PMAX:
            drop("seg_malformed")
            return None
        if not verify(packet):
            drop("seg_bad_mac")
            return None
        first = (packet[_HDR] << 8) | packet[_HDR + 1]
        k = packet[_HDR + 2]
        # the fields as Receiver._repair checks them: anything odd goes that way
        if first > mask or not 1 <= k <= fec.K_MAX or not packet[_HDR + 4] < packet[_HDR + 3] <= fec.M_MAX \
                or not rcv.cfg.fec or not complete(first, k):
            return False
        rcv.parities_unused += 1
        return True

    return parity


def egress_for(rcv, out_label, out_key):
    """egress(packet, src, now) -> the DATA (or DATA_CE, when rcv marks it)
    under out_label and out_key that a SEG_DATA of rcv's segment leaves as,
    or None: dropped and counted in rcv (too short, hop MAC, late,
    duplicate...), as Receiver.data does."""
    ih1, oh1 = hoprelay.states(rcv.key)
    lbl = bytes((out_label >> 16, (out_label >> 8) & 0xFF, out_label & 0xFF))
    hdr_data = bytes((outer.BYTE0_DATA,)) + lbl
    hdr_ce = bytes((outer.BYTE0_DATA_CE,)) + lbl
    ih2, oh2 = hoprelay.states(out_key)
    ih_ce = ih2.copy()
    ih_ce.update(hdr_ce)
    ih2.update(hdr_data)
    take = rcv.take
    drop = rcv.st.drop
    half, whole, mac_len, mask = _EXCERPT_HALF, _EXCERPT_WHOLE, outer.MAC_LEN, SEQ_MOD - 1
    least = DATA_HDR + 1

    def egress(packet, src, now):
        n = len(packet) - _HDR
        if n < least:
            drop("seg_malformed")
            return None
        # verifier_for's check, inline: calling it costs ~2 us more per packet
        # with the caches cold (measured 2026-12-07), a PoP's usual state
        h = ih1.copy()
        h.update(packet[0:4])
        if n > whole:
            h.update(_LEN[n] if n < 2048 else n.to_bytes(2, "big"))
            h.update(packet[_HDR:_HDR + half])
            h.update(packet[-half:])
        else:
            h.update(_LEN[n])
            h.update(packet[_HDR:])
        o = oh1.copy()
        o.update(h.digest())
        if not compare_digest(o.digest()[:mac_len], packet[4:_HDR]):
            drop("seg_bad_mac")
            return None
        h = (packet[_HDR] << 8) | packet[_HDR + 1]
        seq = h & mask
        top = rcv.top
        if top is not None and (seq - top) & mask == 1 and not rcv.ce_pending and rcv.trace is None:
            # Receiver.take for the next seq in order, inline: calling it costs
            # ~2-3 us more per packet with the caches cold (measured 2026-12-07)
            rcv.top = seq
            rcv.far = 0
            rcv.peer = src
            i = seq & _RECENT_MASK
            rcv._rseq[i] = seq
            rcv._rt[i] = now
            inner = packet[_HDR + DATA_HDR:]
            rin = rcv._rin
            if rin is not None:
                rin[i] = inner
                if not i & _FORGET_MASK:
                    rcv.forget(i, now)
            rcv.received += 1
            ce = rcv.ce = h >= CE_BIT
        else:
            inner = take(packet, src, now)
            if inner is None:
                return None
            ce = rcv.ce
        m = n - DATA_HDR
        if ce:
            h, hdr = ih_ce.copy(), hdr_ce
        else:
            h, hdr = ih2.copy(), hdr_data
        if m > whole:
            h.update(_LEN[m] if m < 2048 else m.to_bytes(2, "big"))
            h.update(inner[:half])
            h.update(inner[-half:])
        else:
            h.update(_LEN[m])
            h.update(inner)
        o = oh2.copy()
        o.update(h.digest())
        return b"".join((hdr, o.digest()[:mac_len], inner))

    return egress
