"""A transport keypair for the host: microtun.keypair.Keypair with its
two AEADs as `cryptography`'s AESCCM objects, called directly.

    kp = HostKeypair(send_key, recv_key, local_index, remote_index, initiator, created, window)
    kp.seal(plaintext, channel)        # the same bytes as Keypair.seal
    kp.open(data, lead)                # the same results as Keypair.open

The portable Keypair goes through microtun.aead's CCM object (written for
a board: shared work buffers, head/lead assembly) and, on CPython, through
a wrapper that turns InvalidTag into None: three Python layers around one
C call per packet. A gateway opens every packet of every device, so here
the AESCCM call is the whole AEAD step: the header and the nonce are
packed by struct, the ciphertext is read through a memoryview (no copy of
the packet), and the channel byte is split off the plaintext.

Same semantics as Keypair (the replay window checked before decrypting and
marked after; the counter limit; the reasons returned):
host_tests/test_hostresponder.py runs both on the same packets.
"""
from struct import Struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from microtun.keypair import Keypair, ROOM
from microtun.replay import ReplayWindow, REJECT_AFTER_MESSAGES

_HEAD = Struct(">BxxxIQ")       # TRANSPORT header: type 4 | 0 0 0 | receiver | counter
_NONCE = Struct(">IQ")          # 4 zero bytes || counter (noise.nonce96)
_ROOMED = Struct(">%dxBxxxIQ" % ROOM)
_TRANSPORT = 4
_TAG = 16


class HostKeypair(Keypair):
    __slots__ = ()

    def __init__(self, send_key, recv_key, local_index, remote_index, initiator, created, window_size):
        self.send_aead = AESCCM(send_key, _TAG)
        self.recv_aead = AESCCM(recv_key, _TAG)
        self.local_index = local_index
        self.remote_index = remote_index
        self.send_counter = 0
        self.window = ReplayWindow(window_size)
        self.created = created
        self.initiator = initiator

    def seal(self, plaintext, channel=-1, room=False):
        n = self.send_counter
        if n >= REJECT_AFTER_MESSAGES:
            return None
        self.send_counter = n + 1
        ct = self.send_aead.encrypt(_NONCE.pack(0, n), plaintext if channel < 0 else
                                    bytes((channel,)) + plaintext, None)
        if room:
            out = bytearray(_ROOMED.pack(_TRANSPORT, self.remote_index, n))
            out += ct
            return out
        return _HEAD.pack(_TRANSPORT, self.remote_index, n) + ct

    def open(self, data, lead=None):
        n = int.from_bytes(data[8:16], "big")
        w = self.window
        if not w.will_accept(n):
            return "duplicate" if 0 <= w.last - n < w.window else "replay"
        try:
            pt = self.recv_aead.decrypt(_NONCE.pack(0, n), memoryview(data)[16:], None)
        except InvalidTag:
            return "decrypt_failed"
        if lead is not None:
            if len(pt) < len(lead):
                return "decrypt_failed"     # as microtun.aead: fewer bytes than the lead is no packet
            lead[:] = pt[:len(lead)]
            pt = pt[len(lead):]
        if not w.mark(n):
            return "duplicate"
        return pt
