"""A transport keypair: the two directions' AEAD keys after a handshake, the
send counter and the receive window (docs/PROTOCOL.md, "Transport").

The 64-bit counter is the AEAD nonce (4 zero bytes || counter, big-endian,
exactly the counter bytes of the header) and the dedup/anti-replay sequence
number: the window is checked before decrypting and marked after.
"""
from microtun.aead import AEAD
from microtun.replay import ReplayWindow, REJECT_AFTER_MESSAGES
from microtun import messages as m

_ZERO4 = b"\x00\x00\x00\x00"
_HDR_TRANSPORT = b"\x04\x00\x00\x00"

# open() results besides the plaintext
DUPLICATE = "duplicate"
REPLAY = "replay"
DECRYPT_FAILED = "decrypt_failed"


class Keypair:
    __slots__ = ("send_aead", "recv_aead", "local_index", "remote_index", "_remote_b",
                 "send_counter", "window", "created", "initiator", "received_any")

    def __init__(self, send_key, recv_key, local_index, remote_index, initiator, created, window_size):
        self.send_aead = AEAD(send_key)
        self.recv_aead = AEAD(recv_key)
        self.local_index = local_index
        self.remote_index = remote_index
        self._remote_b = remote_index.to_bytes(4, "big")
        self.send_counter = 0
        self.window = ReplayWindow(window_size)
        self.created = created
        self.initiator = initiator
        self.received_any = False

    def seal(self, plaintext):
        """A TRANSPORT message carrying plaintext, or None when the counter
        space is used up (the caller must rekey)."""
        n = self.send_counter
        if n >= REJECT_AFTER_MESSAGES:
            return None
        self.send_counter = n + 1
        ctr = n.to_bytes(8, "big")
        return _HDR_TRANSPORT + self._remote_b + ctr + self.send_aead.seal(_ZERO4 + ctr, plaintext, b"")

    def open(self, data):
        """Decrypt a TRANSPORT message addressed to this keypair. Returns the
        plaintext (bytes, possibly empty for a keepalive) or one of the
        reason strings DUPLICATE, REPLAY, DECRYPT_FAILED."""
        ctr = data[8:16]
        n = int.from_bytes(ctr, "big")
        w = self.window
        if not w.will_accept(n):
            return DUPLICATE if 0 <= w.last - n < w.window else REPLAY
        pt = self.recv_aead.open(_ZERO4 + ctr, data[m.TRANSPORT_HEADER_LEN:], b"")
        if pt is None:
            return DECRYPT_FAILED
        if not w.mark(n):
            return DUPLICATE
        self.received_any = True
        return pt
