"""Per-peer session state shared by both ends: the current / previous / next
keypairs, the outstanding handshake, the timer marks, and counters.

Keypair rotation (as WireGuard, whitepaper §6.3):
- the initiator installs a new keypair as `current` as soon as it reads the
  RESPONSE; the old current becomes `previous`, so in-flight packets under it
  are still accepted;
- the responder puts the new keypair in `next` and promotes it only when the
  first TRANSPORT message under it authenticates (the initiator always sends
  one at once, a keepalive if it has no data), so it never encrypts under a
  key the initiator may not have. That half is the responder's
  (microtun.responder.Peer.install / confirm): a device never loads it.
"""
from microtun.keypair import ROOM
from microtun.ticks import ticks_add
import microtun.timers as timers   # (not `from microtun import`: endpoint.py says why)


_BOARD = __import__("sys").implementation.name == "micropython"


def _empty(o):
    """Set on o the fields that start empty. On CPython o is the class: the
    gateway keeps thousands of sessions, mostly idle, and a field stays a
    class attribute until first set (10,000 idle sessions: 3,464 B each,
    4,579 B with every field set in __init__; tools/bench_gateway.py
    session_memory). On a board o is the session: a device keeps one and
    sets nearly every field, so a class table of them would be ~230 B held
    for good beside the session's own (docs/MEMORY.md, "Session fields")."""
    o.ss = None                     # cached DH(s, rs)
    o.current = o.previous = o.next = None   # keypairs
    o.hs = None                     # the handshake in flight (initiator)
    o.hs_index = o.hs_retry_at = o.hs_attempts = 0
    o.last_sent = o.last_received = o.keepalive_due = None
    o.data_sent_unanswered = o.established_at = None
    o.addr = None                   # where the peer was last authenticated (opaque)
    o.room = False                  # transport packets after keypair.ROOM zero bytes (microtun.tunnel)
    o.handshakes = o.tx_packets = o.tx_bytes = o.rx_packets = o.rx_bytes = 0


class Session:
    """The state both ends keep per peer (the gateway's own fields are in
    microtun.responder.Peer); the fields that start empty are in _empty."""

    def __init__(self, public_key, psk=None):
        self.public_key = public_key
        self.psk = psk
        if _BOARD:
            _empty(self)

    def install(self, keypair, now):
        """Install a fresh keypair as `current` at once (the initiator, on
        reading the RESPONSE); returns the keypairs that were dropped."""
        dropped = []
        if self.previous is not None:
            dropped.append(self.previous)
        if self.next is not None:
            dropped.append(self.next)
            self.next = None
        self.previous = self.current
        self.current = keypair
        self.handshakes += 1
        self.established_at = now
        return dropped

    def sealed(self, plaintext, now, channel=-1):
        """Encrypt channel || plaintext (no channel: a keepalive) under the
        current keypair and note the send; None if there is no usable
        keypair."""
        kp = self.current
        if kp is None:
            return None
        room = self.room
        pkt = kp.seal(plaintext, channel, room)
        if pkt is None:
            return None
        self.last_sent = now
        self.keepalive_due = None
        if channel >= 0 and self.data_sent_unanswered is None:
            self.data_sent_unanswered = now
        self.tx_packets += 1
        self.tx_bytes += len(pkt) - ROOM if room else len(pkt)
        return pkt

    def received(self, n, data, now, params):
        """An n-byte packet authenticated; data: it was not a keepalive."""
        self.last_received = now
        self.data_sent_unanswered = None
        self.rx_packets += 1
        self.rx_bytes += n
        if data and self.keepalive_due is None:
            self.keepalive_due = ticks_add(now, params.keepalive_ms)

    def expire(self, now, params):
        """Forget keypairs past reject-after-time; returns those dropped."""
        dropped = []
        for name in ("previous", "current", "next"):
            kp = getattr(self, name)
            if kp is not None and timers.is_expired(kp, now, params):
                setattr(self, name, None)
                dropped.append(kp)
        if self.current is None:
            self.keepalive_due = None
        return dropped


if not _BOARD:
    _empty(Session)
