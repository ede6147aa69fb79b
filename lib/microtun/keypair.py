"""A transport keypair: the two directions' AEAD keys after a handshake, the
send counter and the receive window (docs/PROTOCOL.md, "Transport").

The 64-bit counter is the AEAD nonce (4 zero bytes || counter, big-endian,
exactly the counter bytes of the header) and the dedup/anti-replay sequence
number: the window is checked before decrypting and marked after.
"""
from struct import pack_into

if __import__("sys").implementation.name != "micropython":
    def const(x):   # CPython; MicroPython's compiler folds const() with no name bound (a global costs a board heap)
        return x

from microtun.aead import AEAD
from microtun.replay import ReplayWindow, REJECT_AFTER_MESSAGES

# Scratch for the packet being sealed or opened, shared by every keypair
# (one thread): the header type|0|0|0|receiver|counter, the nonce
# 0000|counter and the channel byte. The AEAD copies them, so nothing per
# packet is allocated for any of them.
_HEAD = bytearray(b"\x04\x00\x00\x00" + bytes(12))
# The same header after ROOM zero bytes: room for the outer (hop) header,
# which microtun.tunnel then writes in place (no copy of the packet).
ROOM = const(12)
_HEAD_ROOM = bytearray(bytes(ROOM) + b"\x04\x00\x00\x00" + bytes(12))
_NONCE = bytearray(12)
_LEAD = bytearray(1)


class Keypair:
    __slots__ = ("send_aead", "recv_aead", "local_index", "remote_index",
                 "send_counter", "window", "created", "initiator")

    def __init__(self, send_key, recv_key, local_index, remote_index, initiator, created, window_size):
        self.send_aead = AEAD(send_key)
        self.recv_aead = AEAD(recv_key)
        self.local_index = local_index
        self.remote_index = remote_index
        self.send_counter = 0
        self.window = ReplayWindow(window_size)
        self.created = created
        self.initiator = initiator

    def seal(self, plaintext, channel=-1, room=False):
        """A TRANSPORT message carrying channel || plaintext (the channel
        byte sealed without concatenating it to the payload; none when
        channel is -1: a keepalive), or None when the counter space is used
        up (the caller must rekey). room: the message comes after ROOM zero
        bytes, in a bytearray."""
        n = self.send_counter
        if n >= REJECT_AFTER_MESSAGES:
            return None
        self.send_counter = n + 1
        if room:
            head = _HEAD_ROOM
            pack_into(">IQ", head, ROOM + 4, self.remote_index, n)  # no bytes object per packet
        else:
            head = _HEAD
            pack_into(">IQ", head, 4, self.remote_index, n)
        pack_into(">IQ", _NONCE, 0, 0, n)
        if channel < 0:
            return self.send_aead.seal(_NONCE, plaintext, b"", head)
        _LEAD[0] = channel
        return self.send_aead.seal(_NONCE, plaintext, b"", head, _LEAD)

    def open(self, data, lead=None):
        """Decrypt a TRANSPORT message addressed to this keypair. Returns the
        plaintext (bytes, empty for a keepalive) or the reason it was dropped,
        a str: "duplicate", "replay" (older than the window) or
        "decrypt_failed". With a lead buffer (the channel byte), the
        plaintext's first bytes go there and the rest is returned."""
        # the counter, big-endian at 8..15: no slice of the packet, and no
        # tuple (struct.unpack_from) nor big int while it is below 2**30
        n = (data[12] << 24) | (data[13] << 16) | (data[14] << 8) | data[15]
        hi = (data[8] << 24) | (data[9] << 16) | (data[10] << 8) | data[11]
        if hi:
            n |= hi << 32
        w = self.window
        if not w.will_accept(n):
            return "duplicate" if 0 <= w.last - n < w.window else "replay"
        pack_into(">IQ", _NONCE, 0, 0, n)
        pt = self.recv_aead.open(_NONCE, data, b"", 16, lead)  # after the 16-byte header
        if pt is None:
            return "decrypt_failed"
        if not w.mark(n):
            return "duplicate"
        return pt
