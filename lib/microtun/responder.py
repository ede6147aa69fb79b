"""The responder: `Gateway`, the tunnel endpoint for many devices, indexed
by receiver index, and its half of the handshake (reading INIT, writing
RESPONSE). Same sans-I/O interface as microtun.endpoint.Device:

    gw.receive_datagram(data, addr, now)     feed one datagram
    gw.datagrams_to_send(now)                -> [(bytes, addr), ...]
    gw.next_event()                          -> Event or None
    gw.get_timer() / gw.handle_timer(now)
    gw.add_peer(public, psk, name, channels) / gw.remove_peer(public)
    gw.send(peer, channel, payload, now, route=None)

Host-only in practice (microtun_host.gateway runs it on CPython), but it
stays portable: the tests run it on the unix port too. A device never
imports this module (docs/MEMORY.md).

An INIT goes through, cheapest first (docs/PROTOCOL.md §10): the replay
filter (an exact copy of a recent INIT is dropped, no MAC, no reply), mac1,
the per-link budget (a flood on one link costs the others nothing), the
cookie (under load on that link; COOKIE replies are limited per link), and
only then DH. What it answers is never larger than the INIT and at most one
message per INIT: a RESPONSE (92 bytes) to a fresh authentic one, a STALE
(48 bytes, at most one per device per retry interval) to an authentic one
whose freshness is behind, a COOKIE (52 bytes, limited per link).

A session counts as established (`handshake_ok`, a HANDSHAKE event) only
when the first TRANSPORT under its keys authenticates; an answered
handshake that is never confirmed (a wrong psk: the device cannot open the
RESPONSE) is counted `handshake_failed` and reported as a FAILED event.
"""
from microtun import messages as m
from microtun import timers
from microtun.cookie import CookieChecker
from microtun.hop import HopKey, _hmac as _hop_hmac
from microtun.endpoint import _Endpoint, _key32, _check_send, Event, CONTROL_CHANNEL, DATA, HANDSHAKE, STALE
from microtun.keypair import Keypair
from microtun.rand import random_bytes
from microtun.noise import HandshakeState, NoiseError, NOISE_IKPSK2_25519_AESCCM_SHA256 as SUITE
from microtun.replay import GATEWAY_WINDOW
from microtun.session import Session
from microtun.stale import seal_stale
from microtun.ticks import ticks_add, ticks_diff

if __import__("sys").implementation.name != "micropython":
    def const(x):   # CPython; MicroPython's compiler folds const() with no name bound (a global costs a board heap)
        return x

PATH_PROBE = const(1)        # channel 0: [1, path, seq(4), ticks(4), srtt(2)] -> answered with [2, ...]
PATH_REPLY = const(2)
PATH_PROBE_LEN = const(12)   # after the channel byte (microtun.paths._PROBE_LEN)
PATH_FRESH_MS = const(900000)
# The largest app message a device takes: its driver reads datagrams of at
# most 2048 bytes (microtun.driver._RECV_MAX: one buffer of that size per
# datagram, in a board's heap), and a message to it is 45 bytes more (the
# outer header 12, the transport header 16, the channel byte, the tag 16).
# A longer one would be cut by the device's socket and dropped there as a
# forgery, so send() refuses it here, where the sender can be told.
DEVICE_PAYLOAD_MAX = 2003
MAX_PATHS_PER_PEER = const(8)  # a device path seen this recently gets "critical" copies
SWEEP_MS = const(1000)       # how often sessions are checked for expiry
# Flood limits (implementation, not specification). A "link" is the addr the
# driver passes with a datagram: the gateway server passes the name of the
# last-hop link it came in on, one per device path.
LINK_DH_PER_S = const(50)    # INITs per link per second that may cost a DH
GATEWAY_DH_PER_S = const(200)  # ... and over all links together
LINK_COOKIES_PER_S = const(5)  # COOKIE replies per link per second
MAX_LINKS = const(512)      # links tracked for the budgets; beyond, they share one
_RECENT_INITS = const(2048)  # replay filter: INITs remembered per generation
_RECENT_MS = const(5000)     # ... and a generation's age (two generations kept)

_PROBE_GAIN = 0.0625          # weight of one probe in a path's loss estimate (1/16)


def probe_loss(state, seq):
    """A device path's probe loss, device to gateway, from the sequence
    numbers of its path probes (the device numbers them per path): state
    [last seq, loss EWMA] or None, and the seq just received; returns the
    new state. A gap of m counts m losses, then the arrival one success.
    A probe older than the last (reordered, a duplicate) teaches nothing;
    one far behind or far ahead is a new count (the device restarted)."""
    if state is None:
        return [seq, 0.0]
    gap = (seq - state[0]) & 0xFFFFFFFF
    if gap == 0 or 0xFFFFFFFF - 64 <= gap:
        return state
    if gap > 1024:
        return [seq, state[1]]
    return [seq, (1.0 - (1.0 - state[1]) * (1.0 - _PROBE_GAIN) ** (gap - 1)) * (1.0 - _PROBE_GAIN)]


EXPIRED = "expired"          # event: a peer's keys were wiped after a long silence: peer
FAILED = "handshake_failed"  # event: a handshake was answered and never confirmed: peer
DENIED = "denied"            # event: app data on a channel the device may not use: peer, channel
_NO_PSK = bytes(32)

try:
    from hmac import compare_digest as _equal     # CPython's stdlib (absolute import), in C
except ImportError:
    from microtun.hmac import ct_equal as _equal
_REPLY = bytes((PATH_REPLY,))


class Peer(Session):
    """A device as the gateway sees it: its session, the channels it may
    use, the paths it was heard on, the last handshake's freshness."""
    last_freshness = None         # the highest freshness value accepted (replay guard)
    last_init_at = None           # when its last initiation was accepted (flood guard)
    stale = None                  # (ticks, its value, ours) of the last stale INIT
    stale_answered_at = None      # when a STALE answer was last sent (rate limit)
    path_probe = None             # addr -> [last probe seq, loss EWMA]: made by the first path probe

    def __init__(self, public_key, psk, name, channels):
        Session.__init__(self, public_key, psk)
        self.name = name
        self.channels = channels  # None = every channel allowed
        self.paths = {}           # addr -> last authenticated arrival (ticks)
        self.path_rtt = {}        # addr -> srtt the device reported (ms)
        self.counts = {}          # reason -> count, this device's share of Gateway.stats

    def keypairs(self):
        return [kp for kp in (self.current, self.previous, self.next) if kp is not None]

    def install(self, kp, now, as_next):
        """Install a fresh keypair: as `next` (the responder's way, see
        microtun.session), or at once as `current` (Session.install).
        Returns the keypairs that were dropped."""
        if not as_next:
            return Session.install(self, kp, now)
        dropped = []
        if self.next is not None:
            dropped.append(self.next)
        self.next = kp
        return dropped

    def confirm(self, kp, now):
        """A packet authenticated under `next`: the handshake is complete;
        promote it. Returns the keypairs that were dropped."""
        dropped = self.previous
        self.previous = self.current
        self.current = kp
        self.next = None
        self.handshakes += 1
        self.established_at = now
        return () if dropped is None else (dropped,)

    def info(self, now):
        """A plain dict for status displays."""
        kp = self.current
        return {
            "name": self.name,
            "established": kp is not None,
            "handshakes": self.handshakes,
            "last_handshake_ms_ago": None if self.established_at is None else ticks_diff(now, self.established_at),
            "last_received_ms_ago": None if self.last_received is None else ticks_diff(now, self.last_received),
            "tx_packets": self.tx_packets, "tx_bytes": self.tx_bytes,
            "rx_packets": self.rx_packets, "rx_bytes": self.rx_bytes,
            "index": None if kp is None else kp.local_index,
            "handshake_pending": self.next is not None,
            "counters": dict(self.counts),
            "stale": None if self.stale is None else {
                "last_ms_ago": ticks_diff(now, self.stale[0]),
                "counter": _boot(self.stale[1]), "gateway_counter": _boot(self.stale[2])},
        }


class Registry:
    """The gateway's devices. Every registered device is one small entry
    (public key -> (psk, name, channels)); its Peer, with the session and
    the freshness it needs, is built on first use: an authentic INIT, or a
    lookup by key (`registry[key]`, `get`). A registry of 100,000 devices
    of which few are awake costs the entries, not 100,000 Peers.

        key in registry, len(registry), iter(registry)   # every registered key
        registry[key] / registry.get(key)                # its Peer (built now if need be)
        registry.active                                  # {key: Peer} of those built
    """

    def __init__(self):
        self._entries = {}        # public key -> (psk, name, channels)
        self.active = {}          # public key -> Peer, built on first use
        self._shared = {}         # one frozenset per distinct channel set

    def __len__(self):
        return len(self._entries)

    def __contains__(self, public):
        return public in self._entries

    def __iter__(self):
        return iter(self._entries)

    def __getitem__(self, public):
        s = self.get(public)
        if s is None:
            raise KeyError(public)
        return s

    def get(self, public, default=None):
        s = self.active.get(public)
        if s is None:
            e = self._entries.get(public)
            if e is None:
                return default
            s = self.active[public] = Peer(public, e[0], e[1], e[2])
        return s

    def peek(self, public):
        """The Peer if built, else a blank one for display (not kept)."""
        s = self.active.get(public)
        if s is None:
            e = self._entries[public]
            s = Peer(public, e[0], e[1], e[2])
        return s

    def set(self, public, psk, name, channels):
        """Add or update an entry; returns its Peer if one is built."""
        if channels is not None:
            channels = self._shared.setdefault(channels, channels)
        self._entries[public] = (psk, name, channels)
        return self.active.get(public)

    def remove(self, public):
        """(was registered, its Peer or None)."""
        return self._entries.pop(public, None) is not None, self.active.pop(public, None)


def _boot(fresh):
    return int.from_bytes(fresh[:4], "big")


def _mac_checker(key):
    """check(data, end): messages.check_mac under a fixed 32-byte key, for
    the check every INIT of a flood pays (mac1). The key's HMAC pads are
    precomputed the way a hop key's are (microtun.hop: hashed once where
    hashlib objects copy)."""
    hk = HopKey(key, any_message=True)
    return lambda data, end: _equal(_hop_hmac(hk, data[:end])[:m.MAC_LEN], data[end:end + m.MAC_LEN])


def read_initiation(data, static, ss_lookup, suite=SUITE):
    """Decrypt an INIT whose mac1 was already checked. Returns
    (HandshakeState, sender_index, freshness); raises NoiseError."""
    hs = HandshakeState(suite, False, static, prologue=m.PROLOGUE, ss_lookup=ss_lookup)
    fresh = hs.read_message(data[m.INIT_NOISE:m.INIT_MAC1])
    if len(fresh) != m.FRESHNESS_LEN:
        raise NoiseError("initiation payload is not a freshness value")
    return hs, m.u32(data, 4), fresh


def create_stale(hs, receiver_index, value):
    """STALE answering the INIT hs read (receiver_index: its sender index):
    `value`, the last freshness accepted from that device, sealed under
    microtun.stale.stale_key(ck, h) with a random nonce; 48 bytes."""
    sym = hs._sym
    return seal_stale(sym.ck, sym.h, receiver_index, value, random_bytes(12))


def create_response(hs, psk, sender_index, receiver_index, mac1k, cookie):
    """Responder: returns the RESPONSE message (hs must have read INIT).
    psk None means no pre-shared key (32 zero bytes, as on the initiator)."""
    hs.set_psk(psk if psk is not None else _NO_PSK)
    body = (m.header(m.TYPE_RESPONSE) + sender_index.to_bytes(4, "big") +
            receiver_index.to_bytes(4, "big") + hs.write_message(b""))
    return m.finish(body, mac1k, cookie, hs._crypto.hmac_sha256)[0]


class NoiseResponder:
    """The responder's half of the handshake as Gateway runs it, on
    microtun.noise's HandshakeState (any suite): read an INIT, then answer
    it with a STALE or with a RESPONSE and the session keys. A crypto
    backend may bring its own with the same three calls and the same bytes
    (Suite.responder: microtun_host.hostresponder, straight-line code over
    C primitives); the returned handshake has .rs and .ss either way.
    `keypair`: the class the sessions' transport keys go into."""
    keypair = Keypair

    def __init__(self, suite):
        self.suite = suite

    def read_initiation(self, data, static, ss_lookup):
        return read_initiation(data, static, ss_lookup, self.suite)

    stale = staticmethod(create_stale)

    @staticmethod
    def respond(hs, psk, sender_index, receiver_index, mac1k):
        """(RESPONSE, send key, receive key)."""
        resp = create_response(hs, psk, sender_index, receiver_index, mac1k, None)
        recv_cs, send_cs = hs.split()
        return resp, send_cs.k, recv_cs.k


class Gateway(_Endpoint):
    """The responder for many devices. `add_peer` registers a device's static
    public key with its optional psk, name and allowed channels. `suite`:
    the Noise suite, whose crypto backend computes the handshakes
    (microtun.crypto; a host passes microtun_host.hostcrypto's)."""

    def __init__(self, private_key, params=None, window=GATEWAY_WINDOW, suite=SUITE):
        _Endpoint.__init__(self, private_key, params, window)
        self.suite = suite                   # its .crypto computes the handshakes (microtun.crypto)
        self._hs = suite.responder or NoiseResponder(suite)   # reads INITs, writes RESPONSEs
        self.peers = Registry()              # public key -> Peer (built on first use)
        self._mac1 = _mac_checker(m.mac1_key(self.public_key))
        self._cookies = CookieChecker(self.public_key)
        self.under_load = False              # the driver may force it (every link)
        self.link_dh_per_s = LINK_DH_PER_S   # flood limits (see the constants)
        self.dh_per_s = GATEWAY_DH_PER_S
        self.link_cookies_per_s = LINK_COOKIES_PER_S
        self._budgets = {}                   # link -> [window start, INITs, COOKIEs, DHs] in this second
        self._total = [None, 0]              # [window start, DHs] over all links
        self._recent = set()                 # mac1 of INITs that went to DH (replay filter)
        self._recent_old = set()
        self._recent_at = None
        self._ka = {}                        # sessions owing a passive keepalive
        self._sweep_at = None

    # -- registry ----------------------------------------------------------
    def add_peer(self, public, psk=None, name=None, channels=None):
        """Register (or update) a device and return its Peer. channels:
        iterable of allowed channel numbers, or None for all."""
        self.register(public, psk, name, channels)
        return self.peers[bytes(public)]

    def register(self, public, psk=None, name=None, channels=None):
        """add_peer without building the Peer (a large registry: it is
        built when the device first handshakes)."""
        public = _key32("public", public)
        if psk is not None:
            _key32("psk", psk)
        chans = None if channels is None else frozenset(channels)
        if chans is not None:
            for c in chans:
                if not isinstance(c, int) or not 0 <= c <= 255:
                    raise ValueError("channels must be ints from 0 to 255")
        s = self.peers.set(public, psk, name, chans)
        if s is not None:
            if psk != s.psk:
                self._drop_keys(s)           # a new psk invalidates the session
            s.psk, s.name, s.channels = psk, name, self.peers._entries[public][2]

    def remove_peer(self, public):
        """Revoke a device: its sessions end at once."""
        known, s = self.peers.remove(bytes(public))
        if s is not None:
            self._drop_keys(s)
        return known

    def _drop_keys(self, s):
        self._forget(s.keypairs())
        s.current = s.previous = s.next = None
        s.keepalive_due = None

    def send(self, peer_public, channel, payload, now, route=None):
        """Send app data to a device over its session. route: None (the path
        the device was last heard on), "critical" (a copy on every path the
        device used within PATH_FRESH_MS; the device keeps the first), or an
        address. Returns False (and counts `no_session`) if the device has
        no usable session. ValueError for a payload longer than a device
        takes (DEVICE_PAYLOAD_MAX bytes)."""
        _check_send(channel, payload)
        if len(payload) > DEVICE_PAYLOAD_MAX:
            raise ValueError("a device takes messages of at most %d bytes (its driver reads datagrams of 2048 "
                             "bytes), got %d: split it" % (DEVICE_PAYLOAD_MAX, len(payload)))
        s = peer_public if isinstance(peer_public, Session) else self.peers.get(bytes(peer_public))
        if s is None:
            raise ValueError("unknown peer")
        pkt = None
        if s.current is not None and not timers.is_expired(s.current, now, self.params):
            pkt = s.sealed(payload, now, channel)
        if pkt is None:
            self._count("no_session", s)
            return False
        self._count("data_tx")
        if route is None:
            self._out.append((pkt, s.addr))
        else:
            for addr in self._routes(s, route, now):
                self._out.append((pkt, addr))
        return True

    def _routes(self, s, route, now):
        if route != "critical":
            return (route,)
        fresh = [a for a, seen in s.paths.items() if ticks_diff(now, seen) < PATH_FRESH_MS]
        if s.addr is not None and s.addr not in fresh:
            fresh.append(s.addr)
        return fresh or (s.addr,)

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

    def _transport_in(self, data, addr, now):
        s = _Endpoint._transport_in(self, data, addr, now)
        if s is None:
            return None
        # The paths a device is heard on, for "critical" copies.
        paths = s.paths
        if addr not in paths and len(paths) >= MAX_PATHS_PER_PEER:
            oldest = None
            for a in paths:
                if oldest is None or ticks_diff(paths[a], paths[oldest]) < 0:
                    oldest = a
            del paths[oldest]
            s.path_rtt.pop(oldest, None)
            if s.path_probe is not None:
                s.path_probe.pop(oldest, None)
        paths[addr] = now
        return s

    def _data(self, s, channel, payload, addr, now):
        if channel == CONTROL_CHANNEL:
            if self._control(s, payload, addr, now):
                self._on_authenticated(s)
                return
        elif s.channels is not None and channel not in s.channels:
            self._count("channel_denied", s)
            self._events.append(Event(DENIED, s, channel, None, addr))
            return
        self._count("data_rx")
        self._events.append(Event(DATA, s, channel, payload, addr))
        if s.keepalive_due is not None:     # _on_authenticated
            self._ka[s] = True

    def _control(self, s, payload, addr, now):
        """Channel-0 messages the gateway answers itself; True if consumed."""
        if len(payload) == PATH_PROBE_LEN and payload[0] == PATH_PROBE:
            self._count("path_probe_rx")
            r = (payload[10] << 8) | payload[11]
            s.path_rtt[addr] = None if r == 0xFFFF else r   # the device's own measurement
            pp = s.path_probe
            if pp is None:
                pp = s.path_probe = {}
            pp[addr] = probe_loss(pp.get(addr), (payload[2] << 24) | (payload[3] << 16) | (payload[4] << 8) | payload[5])
            pkt = s.sealed(_REPLY + payload[1:], now, CONTROL_CHANNEL)
            if pkt is not None:
                self._out.append((pkt, addr))   # answered on the path it came by
            return True
        return False

    def _count(self, reason, s=None):
        st = self.stats
        st[reason] = st.get(reason, 0) + 1
        if s is not None:
            c = s.counts
            c[reason] = c.get(reason, 0) + 1

    def _confirmed(self, s, kp, now):
        # The first TRANSPORT under `next` authenticated: the device has the
        # keys, so the handshake is complete (docs/PROTOCOL.md §4).
        self._forget(s.confirm(kp, now))
        self._count("handshake_ok", s)
        self._events.append(Event(HANDSHAKE, s, None, None, None))

    def _unconfirmed(self, s):
        # A RESPONSE was sent and its keys never used: the device could not
        # open it (a wrong psk) or it was lost.
        self._forget((s.next,))
        s.next = None
        self._count("handshake_failed", s)
        self._events.append(Event(FAILED, s, None, None, None))

    def _budget(self, addr, now):
        """This second's counters for a link: [start, INITs, COOKIEs, DHs]."""
        t = self._budgets
        b = t.get(addr)
        if b is None:
            if len(t) >= MAX_LINKS:
                for a in [a for a, v in t.items() if ticks_diff(now, v[0]) >= 1000]:
                    del t[a]
                if len(t) >= MAX_LINKS:
                    addr = None              # beyond the bound, new links share one budget
                    b = t.get(None)
            if b is None:
                b = t[addr] = [now, 0, 0, 0]
        if ticks_diff(now, b[0]) >= 1000:
            b[0] = now
            b[1] = b[2] = b[3] = 0
        return b

    def _seen(self, mac1, now):
        """True if an INIT with this mac1 went to DH in the current or the
        previous generation (_RECENT_MS each): an exact replay, or the copy
        of a two-path send that came second."""
        at = self._recent_at
        if at is not None and ticks_diff(now, at) >= _RECENT_MS:
            self._recent_old = self._recent if ticks_diff(now, at) < 2 * _RECENT_MS else set()
            self._recent = set()
            self._recent_at = now
        return mac1 in self._recent or mac1 in self._recent_old

    def _remember(self, mac1, now):
        if self._recent_at is None or len(self._recent) >= _RECENT_INITS:
            self._recent_old = self._recent
            self._recent = set()
            self._recent_at = now
        self._recent.add(mac1)

    def _ss_lookup(self, rs):
        # rs is not authenticated yet: look, build nothing (the Peer comes after the payload's tag)
        rs = bytes(rs)
        if rs not in self.peers:
            raise NoiseError("unknown_peer")
        s = self.peers.active.get(rs)
        return None if s is None else s.ss

    def _init_in(self, data, addr, now):
        # Cheap checks first: the replay filter (a set lookup), mac1 (one
        # HMAC), the link's budget, mac2 when that link is under load; DH last.
        mac1 = bytes(data[m.INIT_MAC1:m.INIT_MAC2])
        if self._seen(mac1, now):
            self._count("init_replay")
            return
        if not self._mac1(data, m.INIT_MAC1):
            self._count("bad_mac1")
            return
        b = self._budget(addr, now)
        b[1] += 1
        if (self.under_load or b[1] > self.params.under_load_per_s) and \
                not self._cookies.check_mac2(data, m.INIT_MAC2, addr, now):
            if b[2] >= self.link_cookies_per_s:
                self._count("cookie_limited")
                return
            b[2] += 1
            self._count("cookie_sent")
            self._out.append((self._cookies.reply(m.u32(data, 4), mac1, addr, now), addr))
            return
        tot = self._total
        if tot[0] is None or ticks_diff(now, tot[0]) >= 1000:
            tot[0] = now
            tot[1] = 0
        if b[3] >= self.link_dh_per_s or tot[1] >= self.dh_per_s:
            self._count("init_budget")
            return
        b[3] += 1
        tot[1] += 1
        self._remember(mac1, now)
        try:
            hs, sender, fresh = self._hs.read_initiation(data, self._static, self._ss_lookup)
        except NoiseError as e:
            self._count("unknown_peer" if str(e) == "unknown_peer" else "bad_init")
            return
        s = self.peers.get(hs.rs)
        if s is None:       # revoked between lookup and here: impossible, but never trust it
            self._count("unknown_peer")
            return
        if s.ss is None:
            s.ss = hs.ss
        p = self.params
        if s.last_freshness is not None and fresh <= s.last_freshness:
            # Authentic but behind: a replay, or a device whose boot counter
            # went backwards. Tell it (at most once per retry interval) the
            # value to pass, sealed so only that INIT's sender can read it.
            self._count("stale_handshake", s)
            s.stale = (now, fresh, s.last_freshness)
            if s.stale_answered_at is None or ticks_diff(now, s.stale_answered_at) >= p.rekey_timeout_ms:
                s.stale_answered_at = now
                self._count("stale_answer_tx", s)
                self._out.append((self._hs.stale(hs, sender, s.last_freshness), addr))
            self._events.append(Event(STALE, s, None, fresh, addr))
            return
        if s.last_init_at is not None and ticks_diff(now, s.last_init_at) < p.init_min_interval_ms:
            self._count("handshake_flood", s)
            return
        if s.next is not None:
            self._unconfirmed(s)             # the device moved on without using it
        idx = self._new_index(s, None)
        resp, send_key, recv_key = self._hs.respond(hs, s.psk, idx, sender, m.mac1_key(s.public_key))
        kp = self._hs.keypair(send_key, recv_key, idx, sender, False, now, self._window)
        self._by_index[idx] = (s, kp)
        s.last_freshness = fresh
        s.last_init_at = now
        self._forget(s.install(kp, now, as_next=True))
        s.addr = addr
        self._count("response_tx", s)
        self._out.append((resp, addr))
        if self._sweep_at is None:
            self._sweep_at = ticks_add(now, SWEEP_MS)   # the sweep fails it if never confirmed

    # -- timers ----------------------------------------------------------------
    # A gateway holds many sessions, so it never scans them all per datagram:
    # sessions owing a passive keepalive sit in a small dict, and expiry is a
    # sweep once per SWEEP_MS.
    def _on_authenticated(self, s):
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
            for s in list(self.peers.active.values()):
                if s.paths:
                    for a in [a for a, seen in s.paths.items() if ticks_diff(now, seen) >= PATH_FRESH_MS]:
                        del s.paths[a]
                        s.path_rtt.pop(a, None)
                        if s.path_probe is not None:
                            s.path_probe.pop(a, None)
                if s.next is not None and ticks_diff(now, s.next.created) >= 2 * p.rekey_timeout_ms:
                    self._unconfirmed(s)
                had = s.current is not None or s.next is not None
                if had:
                    self._session_timers(s, now, s.addr)
                    if s.current is None and s.next is None:
                        self._events.append(Event(EXPIRED, s, None, None, None))
