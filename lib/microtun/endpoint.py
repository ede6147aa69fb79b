"""Sans-I/O tunnel endpoints, in the shape of aioquic's connection:

    ep.receive_datagram(data, addr, now)     feed one datagram
    ep.datagrams_to_send(now)                -> [(bytes, addr), ...]
    ep.next_event()                          -> Event or None
    ep.get_timer()                           -> next deadline (ticks) or None
    ep.handle_timer(now)                     run what is due

`Device` (here) is the initiator, with one gateway; `Gateway`
(microtun.responder) the responder for many devices. They share the
transport plumbing below. A device never imports the responder: its code
would only cost the board heap (docs/MEMORY.md).

Neither touches sockets or clocks: `now` is a ms tick value (microtun.ticks)
and `addr` is opaque; a datagram to send carries the addr it should go to
(Gateway: where the peer was last authenticated; Device: the `route` the app
passed to send(), else None, which the driver reads as "any/every path").

Peer input never raises: every bad datagram is dropped and counted under a
named reason in `ep.stats` (docs/PROTOCOL.md lists them). API misuse raises
ValueError.
"""
from collections import namedtuple

# `import microtun.x as y` names both microtun.x and x in the code, so a
# frozen build has them as qstrs in flash; `from microtun import x` and
# `from microtun.x import y` make the import system intern the missing one
# in RAM. A module import is also one global for its functions: each global
# is a dict slot in a board's heap (docs/MEMORY.md).
import microtun.aead as aead
import microtun.handshake as handshake
import microtun.messages as m
import microtun.ticks as ticks
import microtun.timers as timers
import microtun.x25519 as ecdh
from microtun.freshness import Freshness
from microtun.keypair import Keypair
from microtun.rand import random_u32
from microtun.replay import DEVICE_WINDOW
from microtun.session import Session

if __import__("sys").implementation.name == "micropython":
    from gc import collect as _collect
else:
    _collect = None     # CPython: its allocator has no free pointer to steer

    def const(x):   # CPython; MicroPython's compiler folds const() with no name bound (a global costs a board heap)
        return x

CONTROL_CHANNEL = const(0)   # path probes; never subject to channel access control
_MAX_CHANNEL = const(255)
_MAX_PAYLOAD = const(65000)

# Event kinds
HANDSHAKE = const("handshake")   # a session was (re)established: peer
DATA = const("data")             # app data: peer, channel, data
# (EXPIRED, a gateway's, is in microtun.responder: a device never emits it)
STALE = const("stale")           # device: the gateway named a freshness value to pass (data); gateway: see responder


# What next_event() returns: kind (above), peer (the Session), and for DATA
# the channel, the data and the addr it came from (else None). A namedtuple:
# made in C with no per-object dict, which matters once per packet.
Event = namedtuple("Event", ("kind", "peer", "channel", "data", "addr"))
del namedtuple   # (its dict slot is taken by the next global: a board's heap)


def _key32(name, v):
    if not isinstance(v, (bytes, bytearray)) or len(v) != 32:
        raise ValueError("%s must be 32 bytes" % name)
    return bytes(v)


def _check_send(channel, payload):
    if not isinstance(channel, int) or not 0 <= channel <= _MAX_CHANNEL:
        raise ValueError("channel must be an int from 0 to 255")
    if not isinstance(payload, aead.BYTES):   # a tuple built per call would be 32 bytes per packet
        raise ValueError("payload must be bytes")
    if len(payload) > _MAX_PAYLOAD:
        raise ValueError("payload must be at most %d bytes" % _MAX_PAYLOAD)


class _Endpoint:
    def __init__(self, private_key, params, window):
        private_key = _key32("private_key", private_key)
        self.public_key = ecdh.public_key(private_key)
        if _collect:
            # the X25519's garbage goes before the objects kept for good are
            # made, so they land low in the heap, not above it
            _collect()
        self._static = (private_key, self.public_key)
        self.params = params if params is not None else timers.Params()
        self._window = window
        self._out = []
        self._events = []
        self._by_index = {}       # local index -> (Session, Keypair or None for a pending hs)
        self._ch = bytearray(1)   # the channel byte of the packet being opened
        self.stats = {}

    # -- shared plumbing ---------------------------------------------------
    def _count(self, reason, s=None):
        # s: the session it concerns, where known (the gateway counts per device too)
        self.stats[reason] = self.stats.get(reason, 0) + 1

    def _new_index(self, session, kp, shift=0):
        """A fresh local index (random, non-zero, unused), registered. A
        device's are under 2**30 (shift 2): small ints on a 32-bit board, so
        finding each packet's keypair allocates nothing (a big int per
        lookup was ~130 bytes per packet received)."""
        while True:
            i = random_u32() >> shift
            if i and i not in self._by_index:
                self._by_index[i] = (session, kp)
                return i

    def _forget(self, keypairs):
        for kp in keypairs:
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
        """A TRANSPORT message: its session if it authenticated, else None
        (dropped and counted)."""
        entry = self._by_index.get((data[4] << 24) | (data[5] << 16) | (data[6] << 8) | data[7])   # no slice
        if entry is None or entry[1] is None:
            self._count("unknown_index")
            return
        s, kp = entry
        if ticks.ticks_diff(now, kp.created) >= self.params.reject_after_ms:   # timers.is_expired
            self._count("expired_key", s)
            return
        # An empty plaintext is a keepalive; anything else starts with the
        # channel byte, which open() puts into self._ch (no copy of the rest).
        keepalive = len(data) == m.TRANSPORT_MIN_LEN
        pt = kp.open(data, None if keepalive else self._ch)
        if isinstance(pt, str):
            self._count(pt, s)
            return
        if kp is s.next:          # only a gateway's Peer has a `next` (microtun.responder)
            self._confirmed(s, kp, now)
        s.addr = addr
        s.received(len(data), not keepalive, now, self.params)
        if keepalive:
            self._count("keepalive_rx")
        else:
            self._data(s, self._ch[0], pt, addr, now)
        return s

    def _data(self, s, channel, payload, addr, now):
        self._count("data_rx")
        self._events.append(Event(DATA, s, channel, payload, addr))

    def _keepalive(self, s, now, addr):
        s.keepalive_due = None
        pkt = s.sealed(b"", now)
        if pkt is not None:
            self._count("keepalive_tx")
            self._out.append((pkt, addr))

    def _session_timers(self, s, now, addr):
        """Forget expired keypairs; send a keepalive if one is owed."""
        p = self.params
        self._forget(s.expire(now, p))
        if timers.should_send_keepalive(s, now, p):
            self._keepalive(s, now, addr)


class Device(_Endpoint):
    """The initiator. One gateway, identified by its static public key."""

    def __init__(self, private_key, gateway_public, psk=None, boot_counter=0, params=None, window=DEVICE_WINDOW,
                 room=False):
        """room: transport packets come after keypair.ROOM zero bytes, in a
        bytearray, for an outer header written in place (microtun.tunnel);
        handshake messages never have it, and start with their type (never 0)."""
        _Endpoint.__init__(self, private_key, params, window)
        gw = _key32("gateway_public", gateway_public)
        if psk is not None:
            _key32("psk", psk)
        self.session = Session(gw, psk)
        if room:
            self.session.room = True
        self._fresh = Freshness(boot_counter)
        self._cookies = None      # a cookie.CookieJar once the gateway sent a cookie (rare: made then)
        self._mac1 = None         # the mac1 of our last INIT, which a cookie answers
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
        self._wanted = True
        s = self.session
        p = self.params
        kp = s.current
        if kp is not None and ticks.ticks_diff(now, kp.created) < p.reject_after_ms:   # not timers.is_expired
            if timers.should_rekey_on_send(s, now, p):
                self._initiate(now)
            pkt = s.sealed(payload, now, channel)
            if pkt is not None:
                self._out.append((pkt, route))
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
        kp = s.previous
        if kp is not None:
            # At most the current keypair lives through a handshake: a
            # previous one only catches packets in flight when the keys
            # turned, and a new handshake starts 15 s after that at the
            # soonest (data unanswered; else rekey_after_ms). Kept, it sat
            # beside the current one and the handshake's peak: on the 32-bit
            # frozen build the endpoint needed 13.75K heap through repeated
            # handshakes, 13.0K without it (docs/MEMORY.md, "Keypairs
            # through a handshake").
            s.previous = None
            self._forget((kp,))
            kp = None
        if s.ss is None:
            s.ss = ecdh.x25519(self._static[0], s.public_key)
            self.dh_count += 1
        idx = self._new_index(s, None, 2)
        cookie = None if self._cookies is None else self._cookies.current(now)
        # (mac1's key None: made there after the X25519s, not held through them)
        hs, msg, self._mac1 = handshake.create_initiation(self._static, s.public_key, s.psk, idx,
                                                          self._fresh.next(now), None, cookie,
                                                          ss=s.ss)
        self.dh_count += hs.dh_count
        s.hs = hs
        s.hs_index = idx
        s.hs_attempts += 1
        s.hs_retry_at = ticks.ticks_add(now, timers.retry_interval(self.params, s.hs_attempts, random_u32()))
        self._count("handshake_init_tx")
        self._out.append((msg, None))

    def receive_datagram(self, data, addr, now):
        # Small on purpose: a call's frame with more than 11 words of
        # locals and stack is taken from the heap, and on a board the
        # transport path's frames compete with its cryptolib objects for
        # room (docs/MEMORY.md); the handshake messages' names live in
        # _handshake_in's frame.
        t = m.message_type(data)
        if t == m.TYPE_TRANSPORT:
            self._transport_in(data, addr, now)
        else:
            self._handshake_in(t, data, addr, now)

    def _handshake_in(self, t, data, addr, now):
        """A handshake message (or a malformed datagram); a RESPONSE's code
        is below, in this function (one function object, not two)."""
        self._fresh.observe(now)
        if t == m.TYPE_COOKIE or t == m.TYPE_STALE:
            # For our INIT in flight: the gateway is under load and wants
            # mac2 on our retry (COOKIE), or it accepted a higher freshness
            # from us already (STALE: our boot counter went backwards). Rare:
            # their code is loaded only now, not held in a board's heap
            # with this module (microtun.cookie, microtun.stale).
            s = self.session
            if s.hs is None or m.u32(data, 4) != s.hs_index:
                self._count("unknown_index")
                return
            # (`from microtun import x`, not `import microtun.x`: on a
            # .mpy board the name microtun.x would be interned at load,
            # for a path that may never run; endpoint.py's head says why
            # the module-level imports are the other way)
            if t == m.TYPE_COOKIE:
                from microtun import cookie as rare
            else:
                from microtun import stale as rare
            rare.device_in(self, data, addr, now)
            return
        if t != m.TYPE_RESPONSE:
            self._count("unexpected_init" if t == m.TYPE_INIT else "malformed")
            return
        # A RESPONSE. mac1 keys are made when needed (a hash each): a device
        # handshakes rarely, and keeping them costs a board heap for its whole life.
        if not m.check_mac(m.mac1_key(self.public_key), data, m.RESP_MAC1):
            self._count("bad_mac1")
            return
        s = self.session
        if s.hs is None or m.u32(data, 8) != s.hs_index:
            self._count("unknown_index")
            return
        hs = s.hs
        before = hs.dh_count
        keys = handshake.read_response(hs, data)
        self.dh_count += hs.dh_count - before
        if keys is None:
            self._count("handshake_failed")
            return
        # The handshake's state and keys die here, not when this returns:
        # what is sent below needs room in a board's heap. One collection
        # (a board, once a handshake) before the keypair's long-lived
        # objects are made puts them low in the heap, not among the
        # handshake's garbage where they would split the free space.
        hs = s.hs = None
        self._mac1 = None         # a cookie answers only an INIT still outstanding
        if _collect:
            _collect()
            # The keys and the gateway's index (a big int 3 times in 4)
            # were made during the handshake, high among its garbage; kept
            # as they are, they stayed there for the session's life and
            # split the free space the next handshake needs. Copies made now
            # land low with the keypair (a bytes slice is a copy here).
            keys = (m.u32(data, 4), keys[1][:], keys[2][:])
        kp = Keypair(keys[1], keys[2], s.hs_index, keys[0], True, now, self._window)
        keys = None
        self._by_index[s.hs_index] = (s, kp)
        s.hs_attempts = 0
        self._forget(s.install(kp, now))
        if s.previous is not None:
            s.previous.send_aead = None     # it only opens what was in flight: its send key goes
        s.addr = addr
        s.received(len(data), False, now, self.params)
        self._count("handshake_ok")
        self._events.append(Event(HANDSHAKE, s, None, None, None))
        # What the app sent meanwhile goes now; with nothing, a keepalive
        # confirms the new keys to the responder.
        q = self._queue
        self._queue = []
        sent = False
        for ch, payload, route in q:
            pkt = s.sealed(payload, now, ch)
            if pkt is not None:
                self._out.append((pkt, route))
                self._count("data_tx")
                sent = True
        if not sent:
            self._keepalive(s, now, None)

    def get_timer(self):
        """The earliest time the session needs attention, or None."""
        s = self.session
        p = self.params
        cands = [s.keepalive_due]
        if s.hs is not None:
            cands.append(s.hs_retry_at)
        elif s.data_sent_unanswered is not None:    # timers.should_rekey_on_timer: unresponsive
            cands.append(ticks.ticks_add(s.data_sent_unanswered, timers.unresponsive_after(p)))
        for kp in (s.current, s.previous, s.next):
            if kp is not None:
                cands.append(ticks.ticks_add(kp.created, p.reject_after_ms))
        kp = s.current
        if kp is not None and p.keep_session and s.hs is None:
            cands.append(ticks.ticks_add(kp.created, p.rekey_after_ms))
        if p.persistent_keepalive_ms and kp is not None and s.last_sent is not None:
            cands.append(ticks.ticks_add(s.last_sent, p.persistent_keepalive_ms))
        best = None
        for c in cands:
            best = ticks.ticks_min(best, c)
        return best

    def handle_timer(self, now):
        self._fresh.observe(now)
        s = self.session
        p = self.params
        if s.hs is not None and timers.should_retry_handshake(s, now):
            self._count("handshake_retry")
            self._initiate(now)
        self._session_timers(s, now, None)
        if s.hs is None and self._wanted:
            if s.current is None or timers.should_rekey_on_timer(s, now, p):
                s.data_sent_unanswered = None
                self._initiate(now)
        elif s.hs is None and s.current is None and self._queue:
            self._initiate(now)

