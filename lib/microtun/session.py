"""Per-peer session state shared by both ends: the current / previous / next
keypairs, the outstanding handshake, the timer marks, and counters.

Keypair rotation (as WireGuard, whitepaper §6.3):
- the initiator installs a new keypair as `current` as soon as it reads the
  RESPONSE; the old current becomes `previous`, so in-flight packets under it
  are still accepted;
- the responder puts the new keypair in `next` and promotes it only when the
  first TRANSPORT message under it authenticates (the initiator always sends
  one at once, a keepalive if it has no data), so it never encrypts under a
  key the initiator may not have.
"""
from microtun.ticks import ticks_add, ticks_diff
from microtun import timers

_ABSENT = object()


class Session:
    def __init__(self, public_key, psk=None, name=None, channels=None, initiator=False):
        self.public_key = public_key
        self.initiator = initiator    # only the initiator starts handshakes
        self.psk = psk
        self.name = name
        self.channels = channels      # None = every channel allowed
        self.ss = None                # cached DH(s, rs)
        self.current = None
        self.previous = None
        self.next = None
        # outstanding initiation (initiator side)
        self.hs = None
        self.hs_index = 0
        self.hs_retry_at = 0
        self.hs_attempts = 0
        # responder-side handshake guards
        self.last_freshness = None
        self.last_init_at = None
        # timer marks (ticks) or None
        self.last_sent = None
        self.last_received = None
        self.keepalive_due = None
        self.data_sent_unanswered = None
        self.established_at = None
        self.addr = None              # where the peer was last authenticated (opaque)
        self.paths = None             # gateway: addr -> last authenticated arrival (ticks)
        self.path_rtt = None          # gateway: addr -> srtt the device reported (ms)
        # counters
        self.handshakes = 0
        self.tx_packets = 0
        self.tx_bytes = 0
        self.rx_packets = 0
        self.rx_bytes = 0

    def keypairs(self):
        return [kp for kp in (self.current, self.previous, self.next) if kp is not None]

    def install(self, kp, now, as_next):
        """Install a fresh keypair; returns the keypairs that were dropped."""
        dropped = []
        if as_next:
            if self.next is not None:
                dropped.append(self.next)
            self.next = kp
        else:
            if self.previous is not None:
                dropped.append(self.previous)
            if self.next is not None:
                dropped.append(self.next)
                self.next = None
            self.previous = self.current
            self.current = kp
        self.handshakes += 1
        self.established_at = now
        return dropped

    def confirm(self, kp):
        """Responder: a packet authenticated under `next`; promote it.
        Returns the keypair that was dropped, or None."""
        dropped = self.previous
        self.previous = self.current
        self.current = kp
        self.next = None
        return dropped

    def sealed(self, plaintext, now, lead=b""):
        """Encrypt lead || plaintext under the current keypair and note the
        send; None if there is no usable keypair."""
        kp = self.current
        if kp is None:
            return None
        pkt = kp.seal(plaintext, lead)
        if pkt is None:
            return None
        self.last_sent = now
        self.keepalive_due = None
        if plaintext and self.data_sent_unanswered is None:
            self.data_sent_unanswered = now
        self.tx_packets += 1
        self.tx_bytes += len(pkt)
        return pkt

    def received(self, nbytes, is_data, now, p):
        self.last_received = now
        self.data_sent_unanswered = None
        self.rx_packets += 1
        self.rx_bytes += nbytes
        if is_data and self.keepalive_due is None:
            self.keepalive_due = ticks_add(now, p.keepalive_ms)

    def expire(self, now, p):
        """Forget keypairs past reject-after-time; returns those dropped."""
        dropped = []
        for name in ("previous", "current", "next"):
            kp = getattr(self, name)
            if kp is not None and timers.is_expired(kp, now, p):
                setattr(self, name, None)
                dropped.append(kp)
        if self.current is None:
            self.keepalive_due = None
        return dropped

    def deadline(self, p):
        """The earliest time this session needs attention, or None."""
        best = None
        cands = [self.keepalive_due]
        if self.hs is not None:
            cands.append(self.hs_retry_at)
        if self.initiator and self.data_sent_unanswered is not None:
            cands.append(ticks_add(self.data_sent_unanswered, p.keepalive_ms + p.rekey_timeout_ms))
        for kp in self.keypairs():
            cands.append(ticks_add(kp.created, p.reject_after_ms))
            if kp is self.current and self.initiator and p.keep_session and self.hs is None:
                cands.append(ticks_add(kp.created, p.rekey_after_ms))
        if p.persistent_keepalive_ms and self.current is not None and self.last_sent is not None:
            cands.append(ticks_add(self.last_sent, p.persistent_keepalive_ms))
        for c in cands:
            if c is not None and (best is None or ticks_diff(c, best) < 0):
                best = c
        return best

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
        }
