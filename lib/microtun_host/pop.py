"""The PoP: a label-switching relay on the outer plane (docs/OUTER.md).

    in_label -> (in_key, next hop, out_label, out_key)

A DATA packet whose hop MAC verifies under its label's in_key leaves with
the same payload under out_label and out_key; a HOP_PROBE is answered by the
PoP itself with the address it came from. A learned return address moves
only after a path challenge; inner INITs are de-duplicated and rate-limited. Everything else is
dropped and counted under a named reason. A PoP holds hop keys only and
imports nothing that could decrypt the inner layer (a test checks this).

Layers, as everywhere in microtun:
    Forwarder      sans-I/O: datagram + source address in -> datagram + destination out
    PopReader      asyncio glue around it (one UDP socket, read in bursts)
    Pop            process: config, reload on SIGHUP, control channel, stats, shutdown
"""
import asyncio
import collections
import ipaddress
import os
import signal
import socket
import sys
import time

from hmac import compare_digest

from microtun import outer
from microtun_host import config, control, hoprelay, segment
from microtun_host import log as logs
from microtun_host.config import ConfigError, format_sockaddr

# --- drop reasons (counters; docs/OUTER.md "Drop reasons") -----------------
DROP_REASONS = (
    outer.DROP_SHORT,          # shorter than the 12-byte header
    outer.DROP_TOO_LONG,       # payload over 65535 bytes (not reachable over UDP)
    outer.DROP_BAD_VERSION,    # version nibble != 1
    outer.DROP_UNKNOWN_TYPE,   # reserved type
    outer.DROP_BAD_LABEL,      # label 0
    "unknown_label",           # no route for this label
    outer.DROP_BAD_MAC,        # hop MAC does not verify under the label's in_key
    "bad_probe",               # HOP_PROBE payload not 19..32 bytes, HOP_KEEPALIVE with a payload
    "unexpected_type",         # HOP_PROBE_REPLY or PATH_CHALLENGE: a PoP sends those, never receives them
    "no_route",                # next hop learn:<label> and nothing learned yet
    "init_replay",             # an inner INIT whose hop MAC this PoP already forwarded (replay or mutated replay)
    "init_rate",               # INIT over its label's budget (dropped before its MAC is checked)
    "init_source_rate",        # authentic INIT over its source address's budget
    "probe_rate",              # authentic HOP_PROBE over its label's budget (probe replies are bounded)
    "reply_replay",            # a handshake RESPONSE or COOKIE towards a device, already forwarded once
    "reply_rate",              # RESPONSE or COOKIE towards a device over its label's budget (before the MAC)
    "bad_response",            # PATH_RESPONSE that is not exactly 12 bytes
    "unsolicited_response",    # PATH_RESPONSE with no outstanding challenge for this label and source
    "send_error",              # the socket refused the datagram (buffer full, unreachable)
    "segment",                 # LOOPS packet consumed by the segment layer (control, duplicate, ...; docs/LOOPS.md)
    "internal_error",          # a bug: the datagram raised inside the PoP
)
# drops that happen after the hop MAC verified (the per-label "packets" count them)
AUTHENTIC_DROPS = ("no_route", "init_source_rate", "probe_rate", "send_error")

DRAIN_S = 10.0                 # a route removed by a reload still forwards this long
SOCKET_BUFFER = 4 << 20        # SO_RCVBUF / SO_SNDBUF asked for (the kernel may cap it)
READ_BURST = 256               # datagrams read per socket readiness event
RECV_MAX = 65535

# --- defences (docs/OUTER.md §3 and §5): implementation limits ---------------
CHALLENGE_TIMEOUT_S = 1.0      # a PATH_CHALLENGE waits this long for its response (one per label)
CHALLENGE_RATE = 1000.0        # PATH_CHALLENGEs per second, all labels together ...
CHALLENGE_BURST = 1000.0       # ... and their burst
UNANSWERED_S = 10.0            # a source that left a challenge unanswered yields its slot this long ...
UNANSWERED_MAX = 16            # ... remembering at most this many per label
INIT_RATE = 1.0                # forwarded INITs per second per label ...
INIT_BURST = 5.0               # ... and their burst (a device sends one per handshake attempt)
SOURCE_RATE = 5.0              # forwarded INITs per second per source address (device-facing labels) ...
SOURCE_BURST = 10.0
SOURCE_MAX = 4096              # source addresses tracked; beyond, new ones share one bucket
SOURCE_IDLE_S = 10.0           # a source idle this long is forgotten when the table is full
REPLY_RATE = 1.0               # handshake RESPONSEs and COOKIEs per second to one device (downlink label) ...
REPLY_BURST = 5.0
PROBE_RATE = 1.0               # answered HOP_PROBEs per second per label ...
PROBE_BURST = 4.0
INIT_FILTER_SLOTS = 1 << 16    # replay filter: direct-mapped hop MACs of forwarded INITs (512 KB)
LOG_EVERY_S = 10.0             # a log line per (label, event) at most this often ...
LOG_BURST = 3.0                # ... after a burst of this many (so a move and its move back both show)
LOG_LEVELS = ("debug", "info", "warning", "error")
LABEL_RANGE = (outer.LABEL_MIN, outer.LABEL_MAX)
ROUTE_FIELDS = ("in_label", "in_key", "next", "standby", "out_label", "out_key", "seg_in", "seg_out")
SEG_RETRY_S = 0.05             # LOOPS segment timers: next try after an internal error in them


def _seg_trace_len():
    """MICROTUN_SEG_TRACE=N: each LOOPS segment keeps its last N packets'
    send / release times for `control seg_trace` (tools/bench_loops.py
    measures a repair's added delay from them; docs/LOOPS.md). Off unless set."""
    v = os.environ.get("MICROTUN_SEG_TRACE", "")
    try:
        return max(0, min(1000000, int(v))) if v else 0
    except ValueError:
        return 0


SEG_TRACE = _seg_trace_len()
TOP_FIELDS = ("name", "listen", "control", "log_level", "stats_interval", "workers", "routes", "metrics")
WORKERS_MAX = 256              # worker processes (docs/DEPLOY.md "Many cores and failover")


# --- config ------------------------------------------------------------------

class RouteSpec:
    """One validated route from the config file."""

    __slots__ = ("in_label", "in_key", "next_addr", "learn_from", "out_label", "out_key", "where", "seg_in",
                 "seg_out", "standby")

    def __init__(self, in_label, in_key, next_addr, learn_from, out_label, out_key, where="", seg_in=None,
                 seg_out=None, standby=None):
        self.in_label = in_label
        self.standby = standby          # config.Address taking over when next_addr stops answering probes
        self.in_key = in_key            # 32 bytes
        self.next_addr = next_addr      # config.Address, or None with learn_from
        self.learn_from = learn_from    # in_label whose last authenticated source is the next hop, or 0
        self.out_label = out_label
        self.out_key = out_key
        self.where = where
        self.seg_in = seg_in            # segment.SegConfig: in_label is a LOOPS segment's egress (docs/LOOPS.md)
        self.seg_out = seg_out          # segment.SegConfig: out_label is a LOOPS segment's ingress

    def next_text(self):
        return "learn:%d" % self.learn_from if self.learn_from else str(self.next_addr)

    def same(self, other):
        return (self.in_key, self.next_addr, self.learn_from, self.out_label, self.out_key, self.seg_in,
                self.seg_out, self.standby) == (other.in_key, other.next_addr, other.learn_from, other.out_label,
                                                other.out_key, other.seg_in, other.seg_out, other.standby)


class PopConfig:
    metrics = None      # the Prometheus listen address (metrics.py), or None: off

    def __init__(self, path, name, listen, control_addr, log_level, stats_interval, routes, workers=1):
        self.path = path
        self.workers = workers          # processes sharing the port (microtun_host.workers); 1: this one
        self.file_workers = workers     # what the file says (--workers may override `workers`)
        self.name = name
        self.listen = listen
        self.control = control_addr
        self.log_level = log_level
        self.stats_interval = stats_interval
        self.routes = routes


def load_config(path, root=None):
    """PopConfig from a JSON file, or ConfigError (one line: file, field,
    expectation). root: the parsed object instead of the file (fleet.py
    builds one from the local file and the routes in etcd)."""
    root = config.load(path) if root is None else root
    root.only(*TOP_FIELDS)
    name = root.text("name")
    listen = root.address("listen")
    control_addr = control.from_config(root)
    log_level = root.text("log_level", default="info", choices=LOG_LEVELS)
    stats_interval = root.number("stats_interval", 0, 86400, default=60)
    workers = root.integer("workers", 1, WORKERS_MAX, default=1)
    lo, hi = LABEL_RANGE
    routes = []
    seen = {}
    for r in root.objects("routes"):
        r.only(*ROUTE_FIELDS)
        in_label = r.integer("in_label", lo, hi)
        if in_label in seen:
            raise r.error("in_label", "duplicate in_label %d (already %s)" % (in_label, seen[in_label]))
        seen[in_label] = r.where("in_label")
        in_key = r.key32("in_key")
        nxt = r.raw("next", "%s or \"learn:<in_label>\"" % config.ADDRESS_FORMS)
        learn_from, next_addr = 0, None
        if isinstance(nxt, str) and nxt.startswith("learn:"):
            tail = nxt[6:]
            if not tail.isdigit() or not lo <= int(tail) <= hi:
                raise r.error("next", "expected \"learn:<in_label>\" with a label in %d..%d, got %s"
                              % (lo, hi, config._short(nxt)))
            learn_from = int(tail)
        else:
            next_addr = r.address("next")
            if next_addr.family != listen.family:
                raise r.error("next", "IPv%d next hop %s but listen %s is IPv%d (one socket per PoP)"
                              % (next_addr.family, next_addr, listen, listen.family))
            if next_addr.port == 0:
                raise r.error("next", "expected a next hop with a port in 1..65535, got %s" % next_addr)
            if next_addr == listen:
                raise r.error("next", "next hop %s is this PoP's own listen address (a loop)" % next_addr)
        standby = None
        if r.has("standby"):
            if learn_from:
                raise r.error("standby", "a standby goes with a fixed next hop, not learn:%d" % learn_from)
            standby = r.address("standby")
            if standby.family != listen.family or standby.port == 0 or standby in (listen, next_addr):
                raise r.error("standby", "expected an address of the same family as listen, with a port, other "
                                         "than listen and next, got %s" % standby)
        out_label = r.integer("out_label", lo, hi)
        out_key = r.key32("out_key")
        segs = [segment.SegConfig.from_node(r.obj(f)) if r.has(f) else None for f in ("seg_in", "seg_out")]
        segs = [c if c is None or c.mode != "off" else None for c in segs]
        routes.append(RouteSpec(in_label, in_key, next_addr, learn_from, out_label, out_key, r.where(), *segs,
                                standby=standby))
    seg_out_labels = {}
    for spec in routes:
        if spec.seg_out is not None:
            if spec.out_label in seg_out_labels:
                raise ConfigError("%s: %s.seg_out: out_label %d already leaves on a LOOPS segment (%s); its NACKs "
                                  "could not be told apart" % (root.file, spec.where, spec.out_label,
                                                               seg_out_labels[spec.out_label]))
            seg_out_labels[spec.out_label] = spec.where
    for i, spec in enumerate(routes):
        if spec.learn_from and spec.learn_from not in seen:
            raise ConfigError("%s: %s.next: learn:%d names no route's in_label (learned addresses come "
                              "from authenticated packets arriving on an in_label of this PoP)"
                              % (root.file, spec.where, spec.learn_from))
        if spec.learn_from == spec.in_label:
            raise ConfigError("%s: %s.next: learn:%d is this route's own in_label (would send packets "
                              "back where they came from)" % (root.file, spec.where, spec.learn_from))
    cfg = PopConfig(str(path), name, listen, control_addr, log_level, stats_interval, routes, workers)
    cfg.metrics = root.address("metrics", default=None)    # Prometheus over HTTP (metrics.py); off by default
    return cfg


# --- forwarding table and forwarder (sans-I/O) -------------------------------

class Route:
    """A route ready for the hot path, with its per-label counters and budgets."""

    __slots__ = ("spec", "in_label", "in_key", "dest", "learn_from", "learns",
                 "out_label", "out_key", "packets", "bytes", "drops", "init_bucket", "probe_bucket",
                 "reply_bucket", "seg_in", "seg_out", "seal_data", "seal_ce", "relay", "plain",
                 "seg_ingress", "seg_egress", "seg_parity")

    def __init__(self, spec, learns):
        self.spec = spec
        self.in_label = spec.in_label
        self.in_key = outer.HopKey(spec.in_key)
        self.dest = spec.next_addr.sockaddr if spec.next_addr else None
        self.learn_from = spec.learn_from
        self.learns = learns            # packets on this label set a learned address
        self.out_label = spec.out_label
        self.out_key = outer.HopKey(spec.out_key)
        self.relay = hoprelay.relay_for(spec.in_key, spec.out_label, spec.out_key)   # verify + re-MAC
        self.packets = 0                # authenticated packets received on in_label
        self.bytes = 0
        self.drops = None               # {reason: n} for this label, made at its first drop
        self.init_bucket = [INIT_BURST, None]     # token bucket: [tokens, last refill]
        self.reply_bucket = [REPLY_BURST, None]   # RESPONSE/COOKIE to a device (next hop learned)
        self.probe_bucket = [PROBE_BURST, None]
        # LOOPS (docs/LOOPS.md): sans-I/O segment state, or None
        self.seg_in = segment.Receiver(spec.seg_in, spec.in_label, self.in_key) if spec.seg_in else None
        self.seg_out = segment.Sender(spec.seg_out, spec.out_label, self.out_key,
                                      int.from_bytes(os.urandom(2), "big")) if spec.seg_out else None
        # what leaves a segment's egress: DATA / DATA_CE on out_label, header hash state prepared
        self.seal_data = segment.Sealer(outer.TYPE_DATA, self.out_label, self.out_key) if spec.seg_in else None
        self.seal_ce = segment.Sealer(outer.TYPE_DATA_CE, self.out_label, self.out_key) if spec.seg_in else None
        self.plain = spec.seg_out is None   # DATA leaves as DATA (receive()'s inline path), not into a segment
        if SEG_TRACE:
            for seg in (self.seg_in, self.seg_out):
                if seg is not None:
                    seg.trace = collections.deque(maxlen=SEG_TRACE)
        self.arm()

    def arm(self):
        """The segment's per-packet functions for this route's Sender and
        Receiver (again when swap() hands them over from the old table)."""
        self.seg_ingress = segment.ingress_for(self.seg_out, self.in_key) if self.seg_out else None
        self.seg_egress = segment.egress_for(self.seg_in, self.out_label, self.out_key) if self.seg_in else None
        self.seg_parity = segment.parity_for(self.seg_in) if self.seg_in and self.seg_in.cfg.fec else None


def _more(n):
    return " (and %d more like it not logged)" % n if n else ""


def _empty(bucket, now, rate):
    """True if token bucket = [tokens, last] has no whole token at now
    (nothing changed)."""
    tokens, last = bucket
    if last is not None:
        tokens += (now - last) * rate
    return tokens < 1.0


def _take(bucket, now, rate, burst):
    """Token bucket: True (and one token spent) if bucket = [tokens, last]
    has a token at now."""
    tokens, last = bucket
    if last is not None:
        tokens = min(burst, tokens + (now - last) * rate)
    bucket[1] = now
    if tokens >= 1.0:
        bucket[0] = tokens - 1.0
        return True
    bucket[0] = tokens
    return False


_HDR = outer.HEADER_LEN
_B0_DATA = outer.BYTE0_DATA
_B0_SEG_DATA = 0x10 | outer.TYPE_SEG_DATA     # (version 1) a LOOPS segment's data
# ... and what else reaches a segment's egress: its parities and pings
_B0_SEG_REPAIR = 0x10 | outer.TYPE_SEG_REPAIR
_B0_SEG_IN = frozenset((_B0_SEG_DATA, _B0_SEG_REPAIR, 0x10 | outer.TYPE_SEG_PING))
_INIT_OUTER_LEN = outer.HEADER_LEN + outer.INNER_INIT_LEN
# outer lengths of DATA packets that may carry a handshake message (INIT, RESPONSE, COOKIE, STALE)
_HANDSHAKE_LENS = frozenset(outer.HEADER_LEN + n for n in
                            (outer.INNER_INIT_LEN, outer.INNER_RESPONSE_LEN, outer.INNER_COOKIE_LEN,
                             outer.INNER_STALE_LEN))
_REPLY_TYPES = (outer.INNER_TYPE_RESPONSE, outer.INNER_TYPE_COOKIE, outer.INNER_TYPE_STALE)


def build_table(specs):
    """{in_label: Route} from RouteSpecs."""
    learn_labels = {s.learn_from for s in specs if s.learn_from}
    return {s.in_label: Route(s, s.in_label in learn_labels) for s in specs}


def encode_source(addr):
    """A socket source address as outer's (family, port, address bytes)."""
    ip = ipaddress.ip_address(addr[0].split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (outer.ADDR_V4 if ip.version == 4 else outer.ADDR_V6), addr[1], ip.packed


class Forwarder:
    """The PoP's state machine: receive(datagram, source) -> (datagram,
    destination) or None, plus any PATH_CHALLENGE left in self.extra for the
    driver to send. Never raises on input; every datagram is counted exactly
    once: rx == forwarded + probes + keepalives + path_responses + sum(drops).

    Routes removed by a reload keep working for DRAIN_S ("draining"), so
    packets already in flight on a re-spliced chain still get through.

    Learned addresses (docs/OUTER.md §3): the first authenticated packet on
    a learn label sets it; after that an authenticated packet from another
    source only provokes a 12-byte PATH_CHALLENGE to that source (one
    outstanding per label, CHALLENGE_RATE in all), and the address moves when
    the matching PATH_RESPONSE comes back from there. A replayed packet
    therefore never moves it. Inner INITs (§5) are de-duplicated by hop MAC
    and rate-limited per label and per source before they are forwarded."""

    def __init__(self, routes, log, clock=time.monotonic):
        self.routes = routes            # {in_label: Route}; replaced whole by swap()
        self.learned = {}               # in_label -> validated (or first) source address
        self.next_hops = {}             # primary next hop -> its standby, while the standby is the one used
        self.log = log
        self.clock = clock
        self.rx = 0
        self.forwarded = 0
        self.probes = 0
        self.keepalives = 0
        self.path_responses = 0         # accepted PATH_RESPONSEs (each moved an address)
        self.challenges = 0             # PATH_CHALLENGEs sent
        self.moves = 0                  # learned-address changes
        self.extra = []                 # (datagram, destination) to send besides receive()'s result
        self.draining = {}              # in_label -> (Route, monotonic expiry) after a reload
        self.drops = dict.fromkeys(DROP_REASONS, 0)
        self._challenge = {}            # learn label -> (target address, expected response, expiry)
        self._challenge_bucket = [CHALLENGE_BURST, None]
        self._unanswered = {}           # learn label -> {source that left a challenge unanswered: until when}
        self._seen = bytearray(8 * INIT_FILTER_SLOTS)    # hop MACs of forwarded handshake messages
        self._sources = {}              # source address -> INIT token bucket (at most SOURCE_MAX)
        self._source_overflow = [SOURCE_BURST, None]
        self._log_gate = {}             # log key -> monotonic time before which its lines go to debug only
        self._log_state = {}            # log key -> [tokens, last line time, event count at the last line]
        self._events = {}               # (label, event) -> count, for "move" and "challenge" lines
        self._debug = log.isEnabledFor(10)
        self.seg_q = []                 # LOOPS packets (datagram, destination) for the driver to send
        self.seg_kick = False           # a LOOPS segment has a new, maybe earlier deadline: run seg_tick by seg_due
        self.seg_due = None             # ... that deadline (self.clock() time); None: now (recompute them all)

    # the hot path: DATA on a known label is handled before any other branch,
    # and plain DATA (no handshake message, no segment) inline: _data() is
    # the reference for what this does
    def receive(self, data, addr):
        self.rx += 1
        n = len(data)
        if n >= _HDR and data[0] == _B0_DATA:
            r = self.routes.get((data[1] << 16) | (data[2] << 8) | data[3])
            if r is not None:
                if not r.plain:
                    if n in _HANDSHAKE_LENS:
                        return self._data(r, data, addr)
                    # into a LOOPS segment: _data() and _seg_send() inline for the usual
                    # case (a known next hop, no source to learn), same steps; two calls
                    # fewer per packet (measured cold: ~2-3 us each, docs/LOOPS.md)
                    dest = r.dest
                    if dest is None or (r.learns and self.learned.get(r.in_label) != addr):
                        return self._seg_send(r, data, addr)
                    pkt = r.seg_ingress(data, self.clock())    # verified, numbered, kept (segment.ingress_for)
                    if pkt is None:
                        return self._drop(outer.DROP_BAD_MAC, addr, r)
                    r.packets += 1
                    r.bytes += n
                    snd = r.seg_out
                    if snd.extra or snd.kick:
                        self._seg_extra(snd, dest)
                    self.forwarded += 1
                    return pkt, dest
                if n in _HANDSHAKE_LENS:
                    return self._data(r, data, addr)
                # _data() and _forward() inline: the hot path (bench_pop_cost), same steps
                out = r.relay(data)
                if out is None:
                    return self._drop(outer.DROP_BAD_MAC, addr, r)
                r.packets += 1
                r.bytes += n
                if r.learns and self.learned.get(r.in_label) != addr:
                    self._new_source(r, addr, True)
                dest = r.dest
                if dest is None:
                    dest = self.learned.get(r.learn_from)
                    if dest is None:
                        return self._drop("no_route", addr, r)
                self.forwarded += 1
                return out, dest
        elif n >= _HDR and data[0] in _B0_SEG_IN:      # out of a LOOPS segment: the next hot path
            r = self.routes.get((data[1] << 16) | (data[2] << 8) | data[3])
            if r is not None and r.seg_in is not None:
                if data[0] == _B0_SEG_DATA:
                    # _seg_receive() inline for the usual SEG_DATA (accepted, nothing to
                    # reply, no new deadline), same steps; a refused one returns None
                    # from seg_egress, counted there (the rest in _seg_after)
                    seg = r.seg_in
                    total = seg.st.total
                    out = r.seg_egress(data, addr, self.clock())
                    dest = r.dest
                    if out is None or dest is None or seg.replies or seg.kick or seg.rebuilt:
                        return self._seg_after(r, seg, data, addr, out, total)
                    r.packets += 1
                    r.bytes += n
                    self.forwarded += 1
                    return out, dest
                if data[0] == _B0_SEG_REPAIR and r.seg_parity is not None:
                    seg = r.seg_in
                    total = seg.st.total
                    ok = r.seg_parity(data)     # segment.parity_for: authentic, and is its group complete?
                    if ok:                      # (no loss: every parity) counted as unused, nothing else
                        self.drops["segment"] += 1
                        return None
                    if ok is None:              # refused and counted there (one hop MAC, not a second in repair)
                        return self._seg_after(r, seg, data, addr, None, total)
                    return self._seg_receive(r, data, addr, True)
                return self._seg_receive(r, data, addr)
        return self._other(data, addr)

    def _data(self, r, data, addr):
        if len(data) in _HANDSHAKE_LENS:
            t = data[outer.HEADER_LEN]
            if t == outer.INNER_TYPE_INIT and len(data) == _INIT_OUTER_LEN:
                return self._init(r, data, addr)
            if r.dest is None and t in _REPLY_TYPES:
                return self._reply(r, data, addr)
        if r.seg_out is not None:
            return self._seg_send(r, data, addr)
        out = r.relay(data)
        if out is None:
            return self._drop(outer.DROP_BAD_MAC, addr, r)
        r.packets += 1
        r.bytes += len(data)
        if r.learns and self.learned.get(r.in_label) != addr:
            self._new_source(r, addr, True)
        return self._forward(r, out, addr)

    def _forward(self, r, out, addr):
        dest = r.dest
        if dest is None:
            dest = self.learned.get(r.learn_from)
            if dest is None:
                return self._drop("no_route", addr, r)
        self.forwarded += 1
        return out, dest

    def _handshake_checks(self, r, data, addr, bucket, rate, kind, now):
        """The checks an inner handshake message passes on its way, cheapest
        first; True if it may go on, else it was counted as a drop
        (`<kind>_replay`, `<kind>_rate`, `bad_mac`)."""
        # A replay, or one changed only between the excerpt halves, has the
        # hop MAC of one already forwarded: dropped before any HMAC.
        i = 8 * ((data[4] << 8) | data[5])
        if self._seen[i:i + 8] == data[4:outer.HEADER_LEN]:
            self._drop(kind + "_replay", addr, r)
            return False
        # An empty budget is looked at before any HMAC (a flood over budget
        # costs no MAC), and spent only after the MAC verified (a forgery
        # never spends it).
        if _empty(bucket, now, rate):
            self._drop(kind + "_rate", addr, r)
            return False
        if not outer.verify(r.in_key, data):   # one HMAC; the re-seal only for the few forwarded
            self._drop(outer.DROP_BAD_MAC, addr, r)
            return False
        r.packets += 1
        r.bytes += len(data)
        return True

    def _remember(self, data):
        """Only forwarded handshake messages go into the replay filter: a
        flood can't evict them faster than the budgets let it through."""
        i = 8 * ((data[4] << 8) | data[5])
        self._seen[i:i + 8] = data[4:outer.HEADER_LEN]

    def _init(self, r, data, addr):
        now = self.clock()
        if not self._handshake_checks(r, data, addr, r.init_bucket, INIT_RATE, "init", now):
            return None
        if r.learns and self.learned.get(r.in_label) is None:
            self._move(r.in_label, addr, None, "first authenticated packet")
        _take(r.init_bucket, now, INIT_RATE, INIT_BURST)
        if r.learns:
            # only on labels that face devices (a learned next hop): behind
            # this PoP a source is a neighbour relaying many devices' INITs
            b = self._sources.get(addr)
            if b is None:
                b = self._source_bucket(addr, now)
            if not _take(b, now, SOURCE_RATE, SOURCE_BURST):
                return self._drop("init_source_rate", addr, r)
        if r.learns and self.learned.get(r.in_label) != addr:
            # Authentic and fresh for this hop (the replay filter has never
            # seen it): a device that rebooted, or whose NAT rebound while it
            # was idle. Only the holder of the hop key can make one, so the
            # address moves now, as QUIC moves on a packet with a new packet
            # number (RFC 9000 §9.3); other packets from a new address only
            # get a path challenge (docs/OUTER.md §3).
            self._challenge.pop(r.in_label, None)
            self._move(r.in_label, addr, self.learned[r.in_label], "fresh handshake from there")
        self._remember(data)
        return self._forward(r, r.relay(data), addr)

    def _reply(self, r, data, addr):
        # A handshake RESPONSE, COOKIE or STALE on its way to a device (the next hop
        # is learned): whatever the gateway sends back, the device's link
        # carries at most REPLY_BURST, then REPLY_RATE per second, and never
        # a replay (issue 11, defect 1).
        now = self.clock()
        if not self._handshake_checks(r, data, addr, r.reply_bucket, REPLY_RATE, "reply", now):
            return None
        _take(r.reply_bucket, now, REPLY_RATE, REPLY_BURST)
        self._remember(data)
        return self._forward(r, r.relay(data), addr)

    def _source_bucket(self, addr, now):
        src = self._sources
        if len(src) >= SOURCE_MAX:
            for a in [a for a, b in src.items() if now - b[1] >= SOURCE_IDLE_S]:
                del src[a]
            if len(src) >= SOURCE_MAX:
                return self._source_overflow
        b = src[addr] = [SOURCE_BURST, now]
        return b

    def _other(self, data, addr):
        parsed = outer.parse(data)
        if parsed is None:
            return self._drop(outer.reject_reason(data), addr)
        ptype, label = parsed
        if ptype >= outer.TYPE_SEG_NACK and ptype != outer.TYPE_SEG_PING:
            return self._seg_feedback(data, label, addr)
        r = self.routes.get(label)
        if r is None:
            r = self._draining(label)
            if r is None:
                return self._drop("unknown_label", addr)
        if ptype >= outer.TYPE_SEG_DATA:
            return self._seg_receive(r, data, addr)
        if ptype == outer.TYPE_DATA_CE:
            return self._data(r, data, addr)
        if ptype == outer.TYPE_HOP_KEEPALIVE or ptype == outer.TYPE_HOP_PROBE:
            # answered (probe) or not (keepalive) by this node; both are
            # length-checked, authenticated and teach the sender's address
            plen = len(data) - outer.HEADER_LEN
            if (plen != 0) if ptype == outer.TYPE_HOP_KEEPALIVE else not outer.PROBE_MIN <= plen <= outer.PROBE_MAX:
                return self._drop("bad_probe", addr, r)
            if not outer.verify(r.in_key, data):
                return self._drop(outer.DROP_BAD_MAC, addr, r)
            r.packets += 1
            r.bytes += len(data)
            if ptype == outer.TYPE_HOP_KEEPALIVE:
                if r.learns and self.learned.get(label) != addr:
                    self._new_source(r, addr, True)
                self.keepalives += 1
                return None
            # a probe gets its reply and no challenge besides: one answer per packet
            if r.learns and self.learned.get(label) != addr:
                self._new_source(r, addr, False)
            if not _take(r.probe_bucket, self.clock(), PROBE_RATE, PROBE_BURST):
                return self._drop("probe_rate", addr, r)
            family, port, ip = encode_source(addr)
            payload = outer.probe_reply_payload(data[outer.HEADER_LEN:], family, port, ip)
            self.probes += 1
            # the same label and key, back to where the probe came from; never longer than the probe
            return outer.seal(outer.TYPE_HOP_PROBE_REPLY, label, r.in_key, payload), addr
        if ptype == outer.TYPE_PATH_RESPONSE:
            return self._response(r, data, addr)
        if ptype != outer.TYPE_DATA:
            return self._drop("unexpected_type", addr, r)
        return self._data(r, data, addr)              # DATA: receive() takes these first

    # -- LOOPS segments (docs/LOOPS.md; the logic is in segment.py) -------------------
    def _seg_send(self, r, data, addr):
        """DATA into a segment: verified, numbered (and buffered, FEC coded)
        by the route's ingress function (segment.ingress_for, the route's
        Sender's state); parities go out after it."""
        dest = r.dest if r.dest is not None else self.learned.get(r.learn_from)
        if dest is None or (r.learns and self.learned.get(r.in_label) != addr):
            # the rare case (a source to learn, no next hop yet): authentic first, then
            # learn, then numbered only if it can leave (no seq spent on a dropped packet)
            if not outer.verify(r.in_key, data):
                return self._drop(outer.DROP_BAD_MAC, addr, r)
            if r.learns and self.learned.get(r.in_label) != addr:
                self._new_source(r, addr, True)
            dest = r.dest if r.dest is not None else self.learned.get(r.learn_from)
            if dest is None:
                r.packets += 1
                r.bytes += len(data)
                return self._drop("no_route", addr, r)
        pkt = r.seg_ingress(data, self.clock())      # verified, numbered, kept (segment.ingress_for)
        if pkt is None:
            return self._drop(outer.DROP_BAD_MAC, addr, r)
        r.packets += 1
        r.bytes += len(data)
        snd = r.seg_out
        if snd.extra or snd.kick:
            self._seg_extra(snd, dest)
        self.forwarded += 1
        return pkt, dest

    def _seg_extra(self, snd, dest):
        """After a packet into a segment: the FEC parities it completed go
        out after it, a new deadline is noted."""
        if snd.extra:
            for p in snd.extra:
                self.seg_q.append((p, dest))
            snd.extra.clear()
        if snd.kick:
            self._kicked(snd)

    def _kicked(self, seg):
        """seg has a new deadline, maybe earlier than the timer set: note it
        (seg_due) for the reader to schedule seg_tick then, not at once (an
        FEC group's start kicks: its close is fec_window_ms away)."""
        seg.kick = False
        t = seg.timer(self.clock())
        if t is not None:
            if not self.seg_kick or (self.seg_due is not None and t < self.seg_due):
                self.seg_due = t
            self.seg_kick = True

    def _seg_receive(self, r, data, addr, verified=False):
        """SEG_DATA, SEG_REPAIR or SEG_PING at the segment's egress: what
        arrives or is rebuilt leaves as DATA (DATA_CE when marked).
        verified: a SEG_REPAIR whose hop MAC receive() checked already."""
        if r.seg_in is None:
            return self._drop("unexpected_type", addr, r)
        seg = r.seg_in
        n = seg.st.total
        ptype = data[0] & 0x0F
        out = None                          # the SEG_DATA's packet, already under out_label (DATA or DATA_CE)
        if ptype == outer.TYPE_SEG_DATA:
            out = r.seg_egress(data, addr, self.clock())
        elif ptype == outer.TYPE_SEG_REPAIR:
            seg.repair(data, self.clock(), verified)
        else:
            seg.ping(data, addr, self.clock())
        return self._seg_after(r, seg, data, addr, out, n)

    def _seg_after(self, r, seg, data, addr, out, n):
        """_seg_receive()'s rest, once the segment took the packet: out the
        SEG_DATA's packet to forward (or None), n the segment's drop count
        before it (receive()'s inline SEG_DATA path comes here for anything
        but the usual case)."""
        if seg.st.total != n:
            self._seg_dropped(r.in_label, seg, addr)
        if seg.replies:
            if seg.peer is not None:
                for p in seg.replies:
                    self.seg_q.append((p, seg.peer))
            seg.replies.clear()
        if seg.kick:
            self._kicked(seg)
        if out is None and not seg.rebuilt:
            self.drops["segment"] += 1      # consumed by the segment layer (see its own counters)
            return None
        r.packets += 1
        r.bytes += len(data)
        dest = r.dest if r.dest is not None else self.learned.get(r.learn_from)
        if dest is None:
            seg.rebuilt.clear()
            return self._drop("no_route", addr, r)
        if seg.rebuilt:                     # rebuilt by FEC: counted in the segment's recovered_fec
            for inner2, ce in seg.rebuilt:
                self.seg_q.append(((r.seal_ce if ce else r.seal_data).seal(inner2), dest))
                self.forwarded += 1
            seg.rebuilt.clear()
            if out is None:
                return None
        self.forwarded += 1
        return out, dest

    def _seg_feedback(self, data, label, addr):
        """SEG_NACK / SEG_PONG: label is our out_label on the segment.
        Retransmissions go to the route's next hop, never to addr."""
        r = self.seg_out_labels.get(label)
        if r is None:
            return self._drop("unknown_label", addr)
        n = r.seg_out.st.total
        out = r.seg_out.feedback(data, self.clock())
        self.drops["segment"] += 1          # consumed by the segment layer (see its own counters)
        if r.seg_out.st.total != n:
            self._seg_dropped(label, r.seg_out, addr)
        dest = r.dest if r.dest is not None else self.learned.get(r.learn_from)
        if dest is not None:
            for p in out:
                self.seg_q.append((p, dest))
        return None

    def _seg_dropped(self, label, seg, addr):
        self._note(label, "segment_drop", "label %d: segment dropped %s from %s (see stats: segments)", label,
                   seg.st.last, format_sockaddr(addr))

    @property
    def seg_out_labels(self):
        t = self.routes
        c = self.__dict__.get("_seg_cache")
        if c is None or c[0] is not t:
            c = self._seg_cache = (t, {r.out_label: r for r in t.values() if r.seg_out is not None})
        return c[1]

    def seg_tick(self):
        """Segment timers (NACKs due, pings, FEC groups closed by time);
        the packets go to seg_q. Returns when (self.clock() time) to call
        again: the earliest deadline of any segment, or None when none has
        one (the next packet that makes one sets seg_kick)."""
        now = self.clock()
        self.seg_kick = False
        self.seg_due = None
        nxt = None
        for r in self.routes.values():
            for seg in (r.seg_out, r.seg_in):
                if seg is None:
                    continue
                if seg is r.seg_out:
                    dest = r.dest if r.dest is not None else self.learned.get(r.learn_from)
                else:
                    dest = seg.peer
                t = seg.timer(now)
                if t is not None and t <= now:
                    for p in seg.tick(now):
                        if dest is not None:
                            self.seg_q.append((p, dest))
                    t = seg.timer(now)
                seg.kick = False
                if t is not None and (nxt is None or t < nxt):
                    nxt = t
        return nxt

    # -- learned addresses: validate before moving ---------------------------------
    def _new_source(self, r, addr, may_challenge):
        """An authenticated packet on learn label r from addr, which is not
        the learned address: learn it if nothing is, else challenge it."""
        label = r.in_label
        old = self.learned.get(label)
        if old is None:
            self._move(label, addr, None, "first authenticated packet")
            return
        if not may_challenge:
            return
        now = self.clock()
        c = self._challenge.get(label)
        if c is not None and now >= c[2]:
            self._unanswered_add(label, c[0], now)      # expired unanswered
            del self._challenge[label]
            c = None
        if c is not None:
            # One outstanding per label. Only a challenge to a source that
            # already left one unanswered gives way, and only to a source
            # that did not: one replaying address cannot hold the slot
            # against a device that really moved.
            f = self._unanswered.get(label)
            if not f or now >= f.get(c[0], 0.0) or now < f.get(addr, 0.0):
                return
        if not _take(self._challenge_bucket, now, CHALLENGE_RATE, CHALLENGE_BURST):
            return
        chal = bytes((outer.BYTE0_PATH_CHALLENGE, label >> 16, (label >> 8) & 0xFF, label & 0xFF)) + \
            os.urandom(outer.MAC_LEN)           # the nonce, where other types carry their MAC
        self._challenge[label] = (addr, outer.path_response(label, r.in_key, chal), now + CHALLENGE_TIMEOUT_S)
        self.challenges += 1
        self.extra.append((chal, addr))
        self._note(label, "challenge", "label %d: authenticated packet from %s, next hop stays %s until that "
                   "address answers a path challenge", label, format_sockaddr(addr), format_sockaddr(old))

    def _unanswered_add(self, label, addr, now):
        f = self._unanswered.get(label)
        if f is None:
            f = self._unanswered[label] = {}
        elif len(f) >= UNANSWERED_MAX and addr not in f:
            for a in [a for a, t in f.items() if now >= t] or [next(iter(f))]:
                del f[a]
        f[addr] = now + UNANSWERED_S

    def _response(self, r, data, addr):
        if len(data) != outer.HEADER_LEN:
            return self._drop("bad_response", addr, r)
        label = r.in_label
        c = self._challenge.get(label)
        if c is None or c[0] != addr or self.clock() >= c[2]:
            return self._drop("unsolicited_response", addr, r)
        if not compare_digest(c[1], data):
            return self._drop(outer.DROP_BAD_MAC, addr, r)
        del self._challenge[label]
        r.packets += 1
        r.bytes += len(data)
        self.path_responses += 1
        self._move(label, addr, self.learned.get(label), "path validated")
        return None

    def _move(self, label, addr, old, why):
        self.learned[label] = addr
        self.moves += 1
        self._note(label, "move", "label %d: next hop learned: %s (was %s; %s)", label, format_sockaddr(addr),
                   format_sockaddr(old) if old else "unknown", why)

    # -- counting and rate-limited logs ---------------------------------------------
    def _drop(self, reason, addr, r=None):
        self.drops[reason] += 1
        if r is None:
            key = reason
            n = self.drops[reason]
        else:
            d = r.drops
            if d is None:
                d = r.drops = {}
            n = d[reason] = d.get(reason, 0) + 1
            key = (r.in_label, reason)
        # one clock read and one dict lookup per drop; the rest once per line
        now = self.clock()
        if now >= self._log_gate.get(key, 0.0):
            held = self._gate(key, now, n)
            self.log.info("%sdropped %s from %s%s", "label %d: " % r.in_label if r is not None else "", reason,
                          format_sockaddr(addr), _more(held))
        elif self._debug:                   # never one line per packet at info
            self.log.debug("drop %s from %s", reason, format_sockaddr(addr))
        return None

    def _note(self, label, event, fmt, *args):
        key = (label, event)
        n = self._events[key] = self._events.get(key, 0) + 1
        now = self.clock()
        if now >= self._log_gate.get(key, 0.0):
            self.log.info(fmt + _more(self._gate(key, now, n)), *args)
        elif self._debug:
            self.log.debug(fmt, *args)

    def _gate(self, key, now, n):
        """A line for key (a drop reason, or (label, event)) goes out now:
        spend one of LOG_BURST tokens (one back per LOG_EVERY_S), set when
        the next may, and return how many of the n events so far were not
        logged since the last line. Keys are bounded: drop reasons and
        events times the labels of the table."""
        st = self._log_state.get(key)
        if st is None:
            st = self._log_state[key] = [LOG_BURST, now, 0]
        tokens = min(LOG_BURST, st[0] + (now - st[1]) / LOG_EVERY_S) - 1.0
        held = n - st[2] - 1
        st[0], st[1], st[2] = tokens, now, n
        self._log_gate[key] = now if tokens >= 1.0 else now + (1.0 - tokens) * LOG_EVERY_S
        return held

    def log_level_changed(self):
        self._debug = self.log.isEnabledFor(10)         # logging.DEBUG

    def _draining(self, label):
        v = self.draining.get(label)
        if v is None:
            return None
        if self.clock() >= v[1]:
            del self.draining[label]
            if label not in self.routes:
                self.learned.pop(label, None)
                self._challenge.pop(label, None)
                self._unanswered.pop(label, None)
            return None
        return v[0]

    def set_next_hop(self, primary, dest):
        """Routes whose next hop is primary (and that have a standby) send
        to dest from now on: the standby, or the primary again
        (microtun_host.nexthop decides, from probes)."""
        if dest == primary:
            self.next_hops.pop(primary, None)
        else:
            self.next_hops[primary] = dest
        for r in list(self.routes.values()) + [v[0] for v in self.draining.values()]:
            self._apply_next_hop(r)

    def _apply_next_hop(self, r):
        s = r.spec
        if s.standby is not None:
            d = self.next_hops.get(s.next_addr.sockaddr)
            r.dest = d if d == s.standby.sockaddr else s.next_addr.sockaddr

    def send_failed(self, out):
        """The driver could not send out (returned by receive): recount it."""
        if out[0] == outer.BYTE0_HOP_PROBE_REPLY:
            self.probes -= 1
        else:
            self.forwarded -= 1
        self.drops["send_error"] += 1

    def internal_error(self):
        self.drops["internal_error"] += 1

    def clear_challenge(self, dest):
        """A PATH_CHALLENGE to dest could not be sent: free its label's slot."""
        for label, c in list(self._challenge.items()):
            if c[0] == dest:
                del self._challenge[label]

    def swap(self, routes):
        """Install a new table in one assignment (atomic for the event loop:
        a packet sees the old table or the new one, never a mix). Counters
        and learned addresses stay for labels that still exist. Returns
        (added, removed, changed) label counts."""
        old = self.routes
        for label, r in routes.items():
            o = old.get(label)
            if o is not None:
                r.packets, r.bytes, r.drops = o.packets, o.bytes, o.drops
                r.init_bucket, r.probe_bucket, r.reply_bucket = o.init_bucket, o.probe_bucket, o.reply_bucket
                # a segment's state carries over only with the same settings and hop key
                # (the key is the Sender's / Receiver's; a new key gets a new one)
                handed = False
                if o.seg_in is not None and r.spec.seg_in == o.spec.seg_in and r.spec.in_key == o.spec.in_key:
                    r.seg_in, handed = o.seg_in, True
                if o.seg_out is not None and r.spec.seg_out == o.spec.seg_out and r.out_label == o.out_label and \
                        r.spec.out_key == o.spec.out_key:
                    r.seg_out, handed = o.seg_out, True
                if handed:
                    r.arm()             # the per-packet functions for the segment state kept
        expiry = self.clock() + DRAIN_S
        for label, r in old.items():
            if label not in routes:
                self.draining[label] = (r, expiry)
        for label in routes:
            self.draining.pop(label, None)
        for r in routes.values():
            self._apply_next_hop(r)
        self.seg_kick = True                # segments' timers: recomputed on the new table, now
        self.seg_due = None
        keep = lambda k: k in routes or k in self.draining     # noqa: E731
        self.learned = {k: v for k, v in self.learned.items() if keep(k)}
        self._challenge = {k: v for k, v in self._challenge.items() if keep(k)}
        self._unanswered = {k: v for k, v in self._unanswered.items() if keep(k)}
        for table in (self._log_gate, self._log_state, self._events):
            for k in [k for k in table if type(k) is tuple and not keep(k[0])]:
                del table[k]
        self.routes = routes
        added = sum(1 for k in routes if k not in old)
        removed = sum(1 for k in old if k not in routes)
        changed = sum(1 for k, r in routes.items() if k in old and not r.spec.same(old[k].spec))
        return added, removed, changed

    def stats(self):
        dropped = sum(self.drops.values())
        labels = {}
        for k, r in self.routes.items():
            e = labels[str(k)] = {"packets": r.packets, "bytes": r.bytes}
            if r.drops:
                e["drops"] = dict(r.drops)
        return {
            "rx": self.rx, "forwarded": self.forwarded, "probes": self.probes,
            "keepalives": self.keepalives, "path_responses": self.path_responses,
            "challenges": self.challenges, "moves": self.moves, "draining": len(self.draining),
            "dropped": dropped, "drops": dict(self.drops), "routes": len(self.routes),
            "labels": labels, "sources_tracked": len(self._sources),
            "learned": {str(k): format_sockaddr(v) for k, v in self.learned.items()},
            "segments": dict([("in:%d" % k, r.seg_in.stats()) for k, r in self.routes.items() if r.seg_in] +
                             [("out:%d" % r.out_label, r.seg_out.stats()) for r in self.routes.values()
                              if r.seg_out]),
        }

    def summary(self):
        """One short line for the logs."""
        drops = ", ".join("%s %d" % (k, v) for k, v in self.drops.items() if v)
        return "rx %d, forwarded %d, probes %d, keepalives %d, dropped %d%s, %d routes, %d learned" % (
            self.rx, self.forwarded, self.probes, self.keepalives, sum(self.drops.values()),
            " (%s)" % drops if drops else "", len(self.routes), len(self.learned)) + (
            ", %d challenges, %d path responses, %d moves" % (self.challenges, self.path_responses, self.moves)
            if self.challenges or self.moves > len(self.learned) else "")


# --- asyncio driver ------------------------------------------------------------

class PopReader:
    """Glue: on each readiness event, read up to READ_BURST datagrams from
    the socket (a flood then costs one event-loop iteration per burst, not
    per datagram), each through Forwarder.receive, the results straight to
    the socket. A full send buffer drops the packet (counted), as a router
    would, instead of queueing without bound.

    On Linux the datagrams come and go in batches (recvmmsg / sendmmsg,
    microtun_host.mmsg): what one receive call returned is forwarded, then
    sent with one call; anything the Forwarder queues besides (LOOPS
    packets, path challenges) goes after the datagrams before it, as with
    recvfrom / sendto, which is the fallback elsewhere and with batch=False
    (or MICROTUN_POP_MMSG=0 in the environment)."""

    def __init__(self, fwd, sock, log, loop=None, batch=None):
        self.fwd = fwd
        self.sock = sock
        self.log = log
        self.loop = loop                # for the LOOPS segment timer (seg_schedule); None: no timers
        self._errors_logged = 0
        self._seg_handle = None         # the one pending seg_tick call (asyncio TimerHandle)
        self._seg_at = None             # its time, in the Forwarder's clock
        if batch is None:
            batch = os.environ.get("MICROTUN_POP_MMSG", "1") != "0"
        self.mm = None                  # mmsg.MmsgSocket, or None: recvfrom / sendto
        if batch:
            from microtun_host import mmsg
            self.mm = mmsg.MmsgSocket.open(sock)

    def close(self):
        if self.mm is not None:
            self.mm.close()
            self.mm = None

    def _internal_error(self, data, addr):
        self.fwd.internal_error()
        if self._errors_logged < 10:
            self._errors_logged += 1
            self.log.exception("internal error on a %d-byte datagram from %s", len(data), addr)

    def readable(self):
        if self.mm is not None:
            return self._readable_batch()
        sock = self.sock
        fwd = self.fwd
        recv = sock.recvfrom
        for _ in range(READ_BURST):
            try:
                data, addr = recv(RECV_MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:            # e.g. a queued ICMP error; the next read goes on
                self.log.debug("socket error: %s", e)
                continue
            try:
                res = fwd.receive(data, addr)
            except Exception:
                res = None
                self._internal_error(data, addr)
            if res is not None:
                try:
                    sock.sendto(res[0], res[1])
                except OSError:
                    fwd.send_failed(res[0])
            if fwd.seg_q:
                self.send_seg()
            if fwd.seg_kick:
                self.seg_kicked()
            if fwd.extra:
                self.send_extra()

    def _readable_batch(self):
        mm = self.mm
        fwd = self.fwd
        receive = fwd.receive
        for _ in range(max(1, READ_BURST // mm.n)):
            try:
                got = mm.recv()
            except OSError as e:            # e.g. a queued ICMP error; the next read goes on
                self.log.debug("socket error: %s", e)
                continue
            if not got:
                return
            out = []
            seg = None                      # indexes in out of LOOPS packets (seg_q's: not receive() results)
            for data, addr in got:
                try:
                    res = receive(data, addr)
                except Exception:
                    res = None
                    self._internal_error(data, addr)
                if res is not None:
                    out.append(res)
                if fwd.seg_q:               # parities, pings, NACKs...: in the same batch, after what came before
                    if seg is None:
                        seg = set()
                    seg.update(range(len(out), len(out) + len(fwd.seg_q)))
                    out += fwd.seg_q
                    fwd.seg_q.clear()
                if fwd.extra:
                    if out:                 # what came before goes first
                        self._send_batch(out, seg)
                        out, seg = [], None
                    self.send_extra()
                if fwd.seg_kick:
                    self.seg_kicked()
            if out:
                self._send_batch(out, seg)
            if len(got) < mm.n:
                return

    def _send_batch(self, out, seg=None):
        """Send out [(datagram, address)]; seg: the indexes of LOOPS packets
        among them (a refused one is a send_error, as in send_seg)."""
        try:
            failed = self.mm.send(out)
        except Exception:                   # a bug: count the batch as send errors, say so, go on
            failed = range(len(out))
            if self._errors_logged < 10:
                self._errors_logged += 1
                self.log.exception("internal error sending a batch of %d datagrams", len(out))
        for i in failed:
            if seg is not None and i in seg:
                self.fwd.drops["send_error"] += 1
            else:
                self.fwd.send_failed(out[i][0])

    def send_extra(self):
        """PATH_CHALLENGEs the Forwarder left in extra; a refused one frees its slot."""
        fwd = self.fwd
        for pkt, dest in fwd.extra:
            try:
                self.sock.sendto(pkt, dest)
            except OSError:
                fwd.challenges -= 1     # not sent; the next packet from there retries
                fwd.clear_challenge(dest)
        fwd.extra.clear()

    def send_seg(self):
        """LOOPS packets the Forwarder queued (parities, NACKs, pings,
        retransmissions, rebuilt packets); a refused one is a send_error."""
        fwd = self.fwd
        for pkt, dest in fwd.seg_q:
            try:
                self.sock.sendto(pkt, dest)
            except OSError:
                fwd.drops["send_error"] += 1
        fwd.seg_q.clear()

    def seg_kicked(self):
        fwd = self.fwd
        fwd.seg_kick = False
        due, fwd.seg_due = fwd.seg_due, None
        self.seg_schedule(fwd.clock() if due is None else due)

    def seg_schedule(self, when):
        """Run seg_tick at `when` (the Forwarder's clock), unless a run at
        or before it is already pending. The segments' deadlines set the
        time (a NACK due, a ping, an FEC group closing), not a periodic
        tick: a PoP whose segments have nothing due sleeps."""
        if self.loop is None:
            return
        h = self._seg_handle
        if h is not None:
            if self._seg_at <= when:
                return
            h.cancel()
        self._seg_at = when
        self._seg_handle = self.loop.call_at(self.loop.time() + max(0.0, when - self.fwd.clock()), self.seg_tick)

    def seg_tick(self):
        self._seg_handle = None
        nxt = None
        try:
            nxt = self.fwd.seg_tick()
        except Exception:
            nxt = self.fwd.clock() + SEG_RETRY_S
            self.fwd.internal_error()
            if self._errors_logged < 10:
                self._errors_logged += 1
                self.log.exception("internal error in the segment timers")
        if self.fwd.seg_q:
            self.send_seg()
        if nxt is not None:
            self.seg_schedule(nxt)
        return nxt


def _open_socket(listen):
    fam = socket.AF_INET6 if listen.family == 6 else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_DGRAM)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass
    try:
        sock.bind(listen.sockaddr)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class Pop:
    """One PoP process: config file, Forwarder, sockets, signals, control.

    As a worker of microtun_host.workers it is handed its socket (one of a
    SO_REUSEPORT group the supervisor opened) and a private control socket;
    `worker` is then its index, else None."""

    def __init__(self, cfg, log, sock=None, control_addr=None, worker=None, next_hops=None):
        self.cfg = cfg
        self.log = log
        self.sock = sock
        self.worker = worker
        self.control_addr = cfg.control if worker is None else control_addr
        self.monitor = None             # nexthop.Monitor when routes have a standby (the supervisor's, for a worker)
        self.fwd = Forwarder(build_table(cfg.routes), log)
        self.reader = None              # PopReader while running
        for primary, dest in (next_hops or {}).items():
            self.fwd.set_next_hop(primary, dest)
        self.started = time.monotonic()
        self.reloads = 0
        self.reload_failures = 0
        self._stop = None
        self._timer = None
        self._last_summary = None

    async def run(self):
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        cfg = self.cfg
        sock = self.sock
        if sock is None:
            try:
                sock = _open_socket(cfg.listen)
            except OSError as e:
                self.log.error("cannot listen on %s: %s", cfg.listen, e.strerror or e)
                return 1
        reader = self.reader = PopReader(self.fwd, sock, self.log, loop)
        self.log.debug("socket I/O: %s", "recvmmsg / sendmmsg" if reader.mm is not None else "recvfrom / sendto")
        loop.add_reader(sock.fileno(), reader.readable)
        ctl = None
        if self.control_addr is not None:
            try:
                ctl = await control.serve(self.control_addr, {"stats": self._cmd_stats, "reload": self._cmd_reload,
                                                              "seg_trace": self._cmd_seg_trace,
                                                              "next_hops": self._cmd_next_hops}, self.log)
            except OSError as e:
                loop.remove_reader(sock.fileno())
                reader.close()
                sock.close()
                self.log.error("cannot open the control channel on %s: %s", self.control_addr, e.strerror or e)
                return 1
        mserver = None
        if cfg.metrics is not None:
            from microtun_host import metrics
            try:
                mserver = await metrics.serve(cfg.metrics, metrics.PopCollector(lambda: self._cmd_stats(None)),
                                              self.log)
            except OSError as e:
                loop.remove_reader(sock.fileno())
                reader.close()
                sock.close()
                if ctl:
                    ctl.close()
                self.log.error("cannot serve metrics on %s: %s", cfg.metrics, e.strerror or e)
                return 1
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self.reload, "SIGHUP")
        self._watch_next_hops(loop)
        self.log.info("listening on %s with %d routes%s (%s)", cfg.listen, len(self.fwd.routes),
                      ", control on %s" % self.control_addr if ctl else "", type(loop).__module__.split(".")[0])
        self._schedule_stats()
        try:
            await self._stop
        finally:
            if self._timer is not None:
                self._timer.cancel()
            if reader._seg_handle is not None:
                reader._seg_handle.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            loop.remove_reader(sock.fileno())
            reader.close()
            sock.close()
            if ctl:
                ctl.close()
            if mserver:
                mserver.close()
            if self.monitor is not None:
                self.monitor.close()
        self.log.info("final stats: %s; up %.0f s, %d reloads (%d failed)", self.fwd.summary(),
                      time.monotonic() - self.started, self.reloads, self.reload_failures)
        return 0

    def stop(self, why="stop"):
        if self._stop is not None and not self._stop.done():
            self.log.info("%s: shutting down", why)
            self._stop.set_result(None)

    def _tick(self):
        line = self.fwd.summary()
        if line != self._last_summary:
            self._last_summary = line
            self.log.info("stats: %s", line)
        self._timer = None
        self._schedule_stats()

    def _schedule_stats(self):
        if self._timer is None and self.cfg.stats_interval:
            self._timer = asyncio.get_running_loop().call_later(self.cfg.stats_interval, self._tick)

    def reload(self, why="reload"):
        """Re-read the config file; on any problem keep the running table."""
        old = self.cfg
        try:
            cfg = load_config(old.path)
        except ConfigError as e:
            self.reload_failures += 1
            self.log.error("%s: config not reloaded, keeping %d routes: %s", why, len(self.fwd.routes), e)
            return {"ok": False, "error": str(e)}
        # a worker's supervisor speaks for the fields it owns (control, workers)
        for field in ("listen", "control", "name", "metrics") if self.worker is None else ("listen", "name", "metrics"):
            if getattr(cfg, field) != getattr(old, field):
                self.log.warning("%s: %s changed to %s; it takes effect on restart only", why, field,
                                 getattr(cfg, field))
                setattr(cfg, field, getattr(old, field))
        added, removed, changed = self.fwd.swap(build_table(cfg.routes))
        if self.reader is not None:
            self.reader.seg_schedule(self.fwd.clock())
        self._watch_next_hops(asyncio.get_running_loop(), cfg.routes)
        if cfg.log_level != old.log_level:
            logs.set_level(self.log, cfg.log_level)
            self.fwd.log_level_changed()
        self.cfg = cfg
        self.reloads += 1
        self._schedule_stats()
        self.log.info("%s: reloaded %s: %d routes (%d added, %d removed, %d changed)", why, cfg.path,
                      len(cfg.routes), added, removed, changed)
        return {"ok": True, "routes": len(cfg.routes), "added": added, "removed": removed, "changed": changed}

    def _cmd_stats(self, req):
        s = self.fwd.stats()
        s.update(name=self.cfg.name, uptime_s=round(time.monotonic() - self.started, 3),
                 reloads=self.reloads, reload_failures=self.reload_failures)
        if self.reader is not None:
            s["socket_io"] = "recvmmsg/sendmmsg" if self.reader.mm is not None else "recvfrom/sendto"
        if self.worker is not None:
            s.update(worker=self.worker, pid=os.getpid())
        if self.monitor is not None:
            s["next_hop_monitor"] = self.monitor.stats()
        if self.fwd.next_hops:
            s["standby_in_use"] = {format_sockaddr(k): format_sockaddr(v) for k, v in self.fwd.next_hops.items()}
        return s

    def _watch_next_hops(self, loop, specs=None):
        """Routes with a standby: probe the pairs (microtun_host.nexthop).
        A worker's supervisor probes for it and sends `next_hops`."""
        specs = self.cfg.routes if specs is None else specs
        if self.worker is not None:
            return
        if self.monitor is not None:
            self.monitor.update(specs)
        elif any(s.standby is not None for s in specs):
            from microtun_host import nexthop
            self.monitor = nexthop.Monitor(self.cfg.listen, specs, self.log, self.fwd.set_next_hop)
            self.monitor.start(loop)

    def _cmd_next_hops(self, req):
        """{"cmd": "next_hops", "use": {"primary host:port": "host:port in use"}} from a supervisor:
        every pair not named goes back to its primary."""
        use = req.get("use")
        if not isinstance(use, dict):
            return {"ok": False, "error": "expected \"use\": {\"primary HOST:PORT\": \"HOST:PORT\"}"}
        want = {}
        for k, v in use.items():
            a, b = config.parse_address(k), config.parse_address(v) if isinstance(v, str) else None
            if a is None or b is None:
                return {"ok": False, "error": "not an address pair: %r: %r" % (k, v)}
            want[a.sockaddr] = b.sockaddr
        for primary in {s.next_addr.sockaddr for s in self.cfg.routes if s.standby is not None} | set(self.fwd.next_hops):
            self.fwd.set_next_hop(primary, want.get(primary, primary))
        return {"standby_in_use": len(self.fwd.next_hops)}

    def _cmd_reload(self, req):
        return self.reload("control reload")

    def _cmd_seg_trace(self, req):
        """{"in:<label>": [[seq, release time, how]...], "out:<label>": [[seq, send time]...]}
        since the last call (MICROTUN_SEG_TRACE; empty when it is not set)."""
        out = {}
        for k, r in self.fwd.routes.items():
            for key, seg in (("in:%d" % k, r.seg_in), ("out:%d" % r.out_label, r.seg_out)):
                if seg is not None and seg.trace is not None:
                    out[key] = list(seg.trace)
                    seg.trace.clear()
        return {"clock": "monotonic", "traces": out}


def _new_loop():
    try:
        import uvloop
        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def main(config_path, check=False, workers=None):
    """`microtun pop --config FILE [--workers N]`: 0 after a clean shutdown,
    2 for a bad config (one line on stderr), 1 when the sockets cannot be
    opened. More than one worker: microtun_host.workers supervises them."""
    try:
        cfg = load_config(config_path)
    except ConfigError as e:
        print("microtun pop: %s" % e, file=sys.stderr)
        return 2
    if workers is not None:
        cfg.workers = workers
    if cfg.workers > 1:
        from microtun_host import workers as wk
        return wk.pop_main(cfg, check)
    if check:
        print("%s: ok: PoP %s, %d routes" % (config_path, cfg.name, len(cfg.routes)))
        return 0
    log = logs.setup(cfg.name, cfg.log_level)
    loop = _new_loop()
    try:
        return loop.run_until_complete(Pop(cfg, log).run())
    finally:
        loop.close()
