"""Sans-I/O tunnel endpoints, in the shape of aioquic's connection:

    ep.receive_datagram(data, addr, now)     feed one datagram
    ep.datagrams_to_send(now)                -> [(bytes, addr), ...]
    ep.next_event()                          -> Event or None
    ep.get_timer()                           -> next deadline (ticks) or None
    ep.handle_timer(now)                     run what is due

`Device` is the initiator (one gateway); `Gateway` the responder for many
devices, indexed by receiver index. Neither touches sockets or clocks: `now`
is a ms tick value (microtun.ticks) and `addr` is opaque; a datagram to send
carries the addr it should go to (Gateway: where the peer was last
authenticated; Device: the `route` the app passed to send(), else None, which
the driver reads as "any/every path").

Peer input never raises: every bad datagram is dropped and counted under a
named reason in `ep.stats` (docs/PROTOCOL.md lists them). API misuse raises
ValueError.
"""
from microtun import messages as m
from microtun import timers
from microtun.cookie import CookieChecker, CookieJar
from microtun.freshness import Freshness
from microtun.handshake import create_initiation, read_initiation, create_response, read_response
from microtun.keypair import Keypair
from microtun.noise import NoiseError
from microtun.rand import random_u32
from microtun.replay import DEVICE_WINDOW, GATEWAY_WINDOW
from microtun.session import Session
from microtun.ticks import ticks_add, ticks_diff
from microtun.x25519 import public_key, x25519

try:
    from micropython import const
except ImportError:
    def const(x):
        return x

MAX_CHANNEL = const(255)
CONTROL_CHANNEL = const(0)   # path probes; never subject to channel access control
PATH_PROBE = const(1)        # channel 0: [1, path, seq(4), ticks(4), srtt(2)] -> answered with [2, ...]
PATH_REPLY = const(2)
PATH_PROBE_LEN = const(13)   # channel byte + 12 (microtun.paths.PROBE_LEN)
PATH_FRESH_MS = const(900000)
MAX_PATHS_PER_PEER = const(8)  # gateway: a device path seen this recently gets "critical" copies
MAX_PAYLOAD = const(65000)

# Event kinds
HANDSHAKE = "handshake"   # a session was (re)established: peer
DATA = "data"             # app data: peer, channel, data
EXPIRED = "expired"       # a peer's keys were wiped after a long silence: peer

SWEEP_MS = const(1000)    # gateway: how often sessions are checked for expiry


class Event:
    __slots__ = ("kind", "peer", "channel", "data", "addr")

    def __init__(self, kind, peer, channel=None, data=None, addr=None):
        self.kind = kind
        self.peer = peer
        self.channel = channel
        self.data = data
        self.addr = addr          # where the datagram came from (opaque)

    def __repr__(self):
        return "Event(%s, ch=%s, %s)" % (self.kind, self.channel, self.data)


def _key32(name, v):
    if not isinstance(v, (bytes, bytearray)) or len(v) != 32:
        raise ValueError("%s must be 32 bytes" % name)
    return bytes(v)


def _check_send(channel, payload):
    if not isinstance(channel, int) or not 0 <= channel <= MAX_CHANNEL:
        raise ValueError("channel must be an int from 0 to 255")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ValueError("payload must be bytes")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("payload must be at most %d bytes" % MAX_PAYLOAD)


class _Endpoint:
    def __init__(self, private_key, params, window):
        self._static = (_key32("private_key", private_key), None)
        self._static = (self._static[0], public_key(self._static[0]))
        self.public_key = self._static[1]
        self.params = params if params is not None else timers.Params()
        self._window = window
        self._out = []
        self._events = []
        self._by_index = {}       # local index -> (Session, Keypair or None for a pending hs)
        self.stats = {}

    # -- shared plumbing ---------------------------------------------------
    def _count(self, reason, n=1):
        self.stats[reason] = self.stats.get(reason, 0) + n

    def _emit(self, data, addr):
        self._out.append((data, addr))

    def _new_index(self, session, kp):
        while True:
            i = random_u32()
            if i and i not in self._by_index:
                self._by_index[i] = (session, kp)
                return i

    def _forget(self, kps):
        for kp in kps:
            self._by_index.pop(kp.local_index, None)

    def datagrams_to_send(self, now=None):
        out = self._out
        self._out = []
        return out

    def next_event(self):
        if self._events:
            return self._events.pop(0)
        return None

    def _transport_in(self, data, addr, now):
        entry = self._by_index.get(m.u32(data, 4))
        if entry is None or entry[1] is None:
            self._count("unknown_index")
            return
        s, kp = entry
        if timers.is_expired(kp, now, self.params):
            self._count("expired_key")
            return
        pt = kp.open(data)
        if isinstance(pt, str):
            self._count(pt)
            return
        if kp is s.next:
            dropped = s.confirm(kp)
            if dropped is not None:
                self._forget((dropped,))
        s.addr = addr
        if s.paths is not None:
            if addr not in s.paths and len(s.paths) >= MAX_PATHS_PER_PEER:
                oldest = None
                for a in s.paths:
                    if oldest is None or ticks_diff(s.paths[a], s.paths[oldest]) < 0:
                        oldest = a
                del s.paths[oldest]
                s.path_rtt.pop(oldest, None)
            s.paths[addr] = now
        s.received(len(data), len(pt) > 0, now, self.params)
        if not pt:
            self._count("keepalive_rx")
            return
        ch = pt[0]
        if ch == CONTROL_CHANNEL:
            if self._control(s, pt, addr, now):
                self._on_authenticated(s, now)
                return
        elif s.channels is not None and ch not in s.channels:
            self._count("channel_denied")
            return
        self._count("data_rx")
        self._events.append(Event(DATA, s, ch, pt[1:], addr))
        self._on_authenticated(s, now)

    def _control(self, s, pt, addr, now):
        """Channel-0 messages the core handles itself; True if consumed."""
        return False

    def _on_authenticated(self, s, now):
        pass

    def _send_on(self, s, channel, payload, now, addr):
        pkt = s.sealed(bytes((channel,)) + payload, now)
        if pkt is None:
            return False
        self._emit(pkt, addr)
        return True

    def _keepalive(self, s, now, addr):
        s.keepalive_due = None
        pkt = s.sealed(b"", now)
        if pkt is not None:
            self._count("keepalive_tx")
            self._emit(pkt, addr)

    def _session_timers(self, s, now, addr):
        p = self.params
        self._forget(s.expire(now, p))
        if timers.should_send_keepalive(s, now, p):
            self._keepalive(s, now, addr)
        elif timers.should_send_persistent_keepalive(s, now, p):
            self._keepalive(s, now, addr)


class Device(_Endpoint):
    """The initiator. One gateway, identified by its static public key."""

    def __init__(self, private_key, gateway_public, psk=None, boot_counter=0, params=None, window=DEVICE_WINDOW):
        _Endpoint.__init__(self, private_key, params, window)
        gw = _key32("gateway_public", gateway_public)
        if psk is not None:
            _key32("psk", psk)
        self.session = Session(gw, psk=psk, name="gateway", initiator=True)
        self._fresh = Freshness(boot_counter)
        self._mac1k = m.mac1_key(gw)
        self._mac1k_resp = m.mac1_key(self.public_key)
        self._cookies = CookieJar(gw)
        self._queue = []
        self._wanted = False
        self.dh_count = 0

    @property
    def established(self):
        return self.session.current is not None

    def connect(self, now):
        """Start (or keep) the session up; retries until it succeeds."""
        self._wanted = True
        self._fresh.observe(now)
        if self.session.current is None and self.session.hs is None:
            self._initiate(now)

    def rekey(self, now):
        """Start a new handshake now (the driver calls this when every path
        went dark: the gateway may have restarted and lost our session).
        The current keys stay usable until the new ones arrive."""
        self._wanted = True
        if self.session.hs is None:
            self._initiate(now)

    def send(self, channel, payload, now, route=None):
        """Queue app data for the gateway. Returns True if sent now or held
        until the session is up; False if the hold queue is full (counted
        as `queue_full`)."""
        _check_send(channel, payload)
        self._fresh.observe(now)
        self._wanted = True
        s = self.session
        p = self.params
        if s.current is not None and not timers.is_expired(s.current, now, p):
            if timers.should_rekey_on_send(s, now, p):
                self._initiate(now)
            if self._send_on(s, channel, bytes(payload), now, route):
                self._count("data_tx")
                return True
        if len(self._queue) >= p.queue_len:
            self._count("queue_full")
            return False
        self._queue.append((channel, bytes(payload), route))
        if s.hs is None:
            self._initiate(now)
        return True

    def _initiate(self, now):
        s = self.session
        if s.hs is not None:
            self._by_index.pop(s.hs_index, None)
        if s.ss is None:
            s.ss = x25519(self._static[0], s.public_key)
            self.dh_count += 1
        idx = self._new_index(s, None)
        hs, msg, mac1 = create_initiation(self._static, s.public_key, s.psk, idx, self._fresh.next(now),
                                          self._mac1k, self._cookies.current(now), ss=s.ss)
        self.dh_count += hs.dh_count
        self._cookies.last_mac1 = mac1
        s.hs = hs
        s.hs_index = idx
        s.hs_attempts += 1
        s.hs_retry_at = ticks_add(now, timers.retry_interval(self.params, s.hs_attempts, random_u32()))
        self._count("handshake_init_tx")
        self._emit(msg, None)

    def receive_datagram(self, data, addr, now):
        self._fresh.observe(now)
        t = m.message_type(data)
        if t == m.TYPE_TRANSPORT:
            self._transport_in(data, addr, now)
        elif t == m.TYPE_RESPONSE:
            self._response_in(data, addr, now)
        elif t == m.TYPE_COOKIE:
            self._cookie_in(data, now)
        elif t == m.TYPE_INIT:
            self._count("unexpected_init")
        else:
            self._count("malformed")

    def _response_in(self, data, addr, now):
        if not m.check_mac(self._mac1k_resp, data, m.RESP_MAC1):
            self._count("bad_mac1")
            return
        s = self.session
        if s.hs is None or m.u32(data, 8) != s.hs_index:
            self._count("unknown_index")
            return
        hs = s.hs
        before = hs.dh_count
        try:
            remote = read_response(hs, data)
            send_cs, recv_cs = hs.split()
        except NoiseError:
            self.dh_count += hs.dh_count - before
            self._count("handshake_failed")
            return
        self.dh_count += hs.dh_count - before
        kp = Keypair(send_cs.k, recv_cs.k, s.hs_index, remote, True, now, self._window)
        self._by_index[s.hs_index] = (s, kp)
        s.hs = None
        s.hs_attempts = 0
        self._forget(s.install(kp, now, as_next=False))
        s.addr = addr
        s.received(len(data), False, now, self.params)
        self._count("handshake_ok")
        self._events.append(Event(HANDSHAKE, s))
        self._flush(now)

    def _flush(self, now):
        s = self.session
        q = self._queue
        self._queue = []
        sent = 0
        for ch, payload, route in q:
            if self._send_on(s, ch, payload, now, route):
                self._count("data_tx")
                sent += 1
        if not sent:
            self._keepalive(s, now, None)   # confirms the new keys to the responder

    def _cookie_in(self, data, now):
        s = self.session
        if s.hs is None or m.u32(data, 4) != s.hs_index:
            self._count("unknown_index")
        elif self._cookies.consume(data, now):
            self._count("cookie_rx")
        else:
            self._count("bad_cookie")

    def get_timer(self):
        t = self.session.deadline(self.params)
        return t

    def handle_timer(self, now):
        self._fresh.observe(now)
        s = self.session
        p = self.params
        if s.hs is not None and timers.should_retry_handshake(s, now):
            self._count("handshake_retry")
            self._initiate(now)
        self._session_timers(s, now, None)
        if s.hs is None and self._wanted:
            if (s.current is None or timers.should_rekey_idle(s, now, p) or
                    timers.should_rekey_on_receive(s, now, p) or
                    timers.should_handshake_unresponsive(s, now, p)):
                s.data_sent_unanswered = None
                self._initiate(now)
        elif s.hs is None and s.current is None and self._queue:
            self._initiate(now)


class Gateway(_Endpoint):
    """The responder for many devices. `add_peer` registers a device's static
    public key with its optional psk, name and allowed channels."""

    def __init__(self, private_key, params=None, window=GATEWAY_WINDOW):
        _Endpoint.__init__(self, private_key, params, window)
        self.peers = {}                      # public key -> Session
        self._mac1k = m.mac1_key(self.public_key)
        self._cookies = CookieChecker(self.public_key)
        self._load_window_start = None
        self._load_count = 0
        self.under_load = False              # the driver may force it
        self._ka = {}                        # sessions owing a passive keepalive
        self._sweep_at = None

    # -- registry ----------------------------------------------------------
    def add_peer(self, public, psk=None, name=None, channels=None):
        """Register (or update) a device. channels: iterable of allowed
        channel numbers, or None for all."""
        public = _key32("public", public)
        if psk is not None:
            _key32("psk", psk)
        chans = None if channels is None else frozenset(channels)
        if chans is not None:
            for c in chans:
                if not isinstance(c, int) or not 0 <= c <= MAX_CHANNEL:
                    raise ValueError("channels must be ints from 0 to 255")
        s = self.peers.get(public)
        if s is None:
            s = self.peers[public] = Session(public, psk, name, chans)
            s.paths = {}
            s.path_rtt = {}
        else:
            if psk != s.psk:
                self._drop_keys(s)           # a new psk invalidates the session
            s.psk, s.name, s.channels = psk, name, chans
        return s

    def remove_peer(self, public):
        """Revoke a device: its sessions end at once."""
        s = self.peers.pop(bytes(public), None)
        if s is not None:
            self._drop_keys(s)
        return s is not None

    def _drop_keys(self, s):
        self._forget(s.keypairs())
        s.current = s.previous = s.next = None
        s.keepalive_due = None

    def send(self, peer_public, channel, payload, now, route=None):
        """Send app data to a device over its session. route: None (the path
        the device was last heard on), "critical" (a copy on every path the
        device used within PATH_FRESH_MS; the device keeps the first), or an
        address. Returns False (and counts `no_session`) if the device has
        no usable session."""
        _check_send(channel, payload)
        s = peer_public if isinstance(peer_public, Session) else self.peers.get(bytes(peer_public))
        if s is None:
            raise ValueError("unknown peer")
        if s.current is None or timers.is_expired(s.current, now, self.params):
            self._count("no_session")
            return False
        pkt = s.sealed(bytes((channel,)) + bytes(payload), now)
        if pkt is None:
            self._count("no_session")
            return False
        self._count("data_tx")
        for addr in self._routes(s, route, now):
            self._emit(pkt, addr)
        return True

    def _routes(self, s, route, now):
        if route is None:
            return (s.addr,)
        if route != "critical":
            return (route,)
        fresh = [a for a, seen in s.paths.items() if ticks_diff(now, seen) < PATH_FRESH_MS]
        if s.addr is not None and s.addr not in fresh:
            fresh.append(s.addr)
        return fresh or (s.addr,)

    def _control(self, s, pt, addr, now):
        if len(pt) == PATH_PROBE_LEN and pt[1] == PATH_PROBE:
            self._count("path_probe_rx")
            r = (pt[11] << 8) | pt[12]
            s.path_rtt[addr] = None if r == 0xFFFF else r   # the device's own measurement
            pkt = s.sealed(bytes((CONTROL_CHANNEL, PATH_REPLY)) + pt[2:], now)
            if pkt is not None:
                self._emit(pkt, addr)       # answered on the path it came by
            return True
        return False

    # -- input ---------------------------------------------------------------
    def receive_datagram(self, data, addr, now):
        t = m.message_type(data)
        if t == m.TYPE_TRANSPORT:
            self._transport_in(data, addr, now)
        elif t == m.TYPE_INIT:
            self._init_in(data, addr, now)
        elif t in (m.TYPE_RESPONSE, m.TYPE_COOKIE):
            self._count("unexpected_message")
        else:
            self._count("malformed")

    def _is_under_load(self, now):
        if self._load_window_start is None or ticks_diff(now, self._load_window_start) >= 1000:
            self._load_window_start = now
            self._load_count = 0
        self._load_count += 1
        return self.under_load or self._load_count > self.params.under_load_per_s

    def _ss_lookup(self, rs):
        s = self.peers.get(bytes(rs))
        if s is None:
            raise NoiseError("unknown_peer")
        return s.ss

    def _init_in(self, data, addr, now):
        # Cheap checks first: mac1 (no DH), then mac2 when under load.
        if not m.check_mac(self._mac1k, data, m.INIT_MAC1):
            self._count("bad_mac1")
            return
        if self._is_under_load(now) and not self._cookies.check_mac2(data, m.INIT_MAC2, addr, now):
            self._count("cookie_sent")
            self._emit(self._cookies.reply(m.u32(data, 4), data[m.INIT_MAC1:m.INIT_MAC2], addr, now), addr)
            return
        try:
            hs, sender, fresh = read_initiation(data, self._static, self._ss_lookup)
        except NoiseError as e:
            self._count("unknown_peer" if str(e) == "unknown_peer" else "handshake_failed")
            return
        s = self.peers.get(hs.rs)
        if s is None:       # revoked between lookup and here: impossible, but never trust it
            self._count("unknown_peer")
            return
        if s.ss is None:
            s.ss = hs.ss
        if s.last_freshness is not None and fresh <= s.last_freshness:
            self._count("stale_handshake")
            return
        p = self.params
        if s.last_init_at is not None and ticks_diff(now, s.last_init_at) < p.init_min_interval_ms:
            self._count("handshake_flood")
            return
        idx = self._new_index(s, None)
        resp = create_response(hs, s.psk, idx, sender, m.mac1_key(s.public_key), None)
        recv_cs, send_cs = hs.split()
        kp = Keypair(send_cs.k, recv_cs.k, idx, sender, False, now, self._window)
        self._by_index[idx] = (s, kp)
        s.last_freshness = fresh
        s.last_init_at = now
        self._forget(s.install(kp, now, as_next=True))
        s.addr = addr
        self._count("handshake_ok")
        self._events.append(Event(HANDSHAKE, s))
        self._emit(resp, addr)

    # -- timers ----------------------------------------------------------------
    # A gateway holds many sessions, so it never scans them all per datagram:
    # sessions owing a passive keepalive sit in a small dict, and expiry is a
    # sweep once per SWEEP_MS.
    def _on_authenticated(self, s, now):
        if s.keepalive_due is not None:
            self._ka[s] = True

    def get_timer(self):
        best = self._sweep_at
        for s in self._ka:
            d = s.keepalive_due
            if d is not None and (best is None or ticks_diff(d, best) < 0):
                best = d
        return best

    def handle_timer(self, now):
        p = self.params
        for s in list(self._ka):
            if s.keepalive_due is None:
                del self._ka[s]
            elif timers.should_send_keepalive(s, now, p):
                self._keepalive(s, now, s.addr)
                del self._ka[s]
        if self._sweep_at is None or ticks_diff(now, self._sweep_at) >= 0:
            self._sweep_at = ticks_add(now, SWEEP_MS)
            for s in list(self.peers.values()):
                if s.paths:
                    for a in [a for a, seen in s.paths.items() if ticks_diff(now, seen) >= PATH_FRESH_MS]:
                        del s.paths[a]
                        s.path_rtt.pop(a, None)
                had = s.current is not None or s.next is not None
                if had:
                    self._session_timers(s, now, s.addr)
                    if s.current is None and s.next is None:
                        self._events.append(Event(EXPIRED, s))
