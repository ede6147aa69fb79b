"""A transport keypair: the two directions' AEAD keys after a handshake, the
send counter and the receive window (docs/PROTOCOL.md, "Transport").

The 64-bit counter is the AEAD nonce (4 zero bytes || counter, big-endian,
exactly the counter bytes of the header) and the dedup/anti-replay sequence
number: the window is checked before decrypting and marked after.
"""
from microtun.aead import AEAD
from microtun.replay import ReplayWindow, REJECT_AFTER_MESSAGES

# open() results besides the plaintext
DUPLICATE = "duplicate"
REPLAY = "replay"
DECRYPT_FAILED = "decrypt_failed"

# Scratch for the packet being sealed or opened, shared by every keypair
# (one thread): the header type|0|0|0|receiver|counter and the nonce
# 0000|counter. The AEAD copies them, so nothing per packet is allocated
# for either.
_HEAD = bytearray(b"\x04\x00\x00\x00" + bytes(12))
_NONCE = bytearray(12)


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

    def seal(self, plaintext, lead=b""):
        """A TRANSPORT message carrying lead || plaintext (lead: the channel
        byte, sealed without concatenating it to the payload), or None when
        the counter space is used up (the caller must rekey)."""
        n = self.send_counter
        if n >= REJECT_AFTER_MESSAGES:
            return None
        self.send_counter = n + 1
        ctr = n.to_bytes(8, "big")
        _HEAD[4:8] = self._remote_b
        _HEAD[8:16] = ctr
        _NONCE[4:12] = ctr
        return self.send_aead.seal(_NONCE, plaintext, b"", _HEAD, lead)

    def open(self, data, lead=None):
        """Decrypt a TRANSPORT message addressed to this keypair. Returns the
        plaintext (bytes, empty for a keepalive) or one of the reason strings
        DUPLICATE, REPLAY, DECRYPT_FAILED. With a lead buffer (the channel
        byte), the plaintext's first bytes go there and the rest is returned."""
        ctr = data[8:16]
        n = int.from_bytes(ctr, "big")
        w = self.window
        if not w.will_accept(n):
            return DUPLICATE if 0 <= w.last - n < w.window else REPLAY
        _NONCE[4:12] = ctr
        pt = self.recv_aead.open(_NONCE, data, b"", 16, lead)  # after the 16-byte header
        if pt is None:
            return DECRYPT_FAILED
        if not w.mark(n):
            return DUPLICATE
        self.received_any = True
        return pt
