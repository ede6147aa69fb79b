"""The initiator's half of the handshake, as a device runs it: building INIT
and reading RESPONSE. The responder's half (reading INIT, building
RESPONSE) is in microtun.responder, which a device never loads.

Noise_IKpsk2_25519_AESCCM_SHA256 (Noise rev 34 §7.5, §9), prologue
"microtun v1", framed with indexes and mac1/mac2 (microtun.messages):

    INIT      -> e, es, s, ss        payload: 12-byte freshness value
    RESPONSE  <- e, ee, se, psk      payload: empty
    STALE     <- (instead of RESPONSE) the gateway's last freshness value for
                 us, sealed under a key from that INIT's ck and h (microtun.stale)

This is that one pattern written out straight, for the initiator only: the
general Noise state machine (microtun.noise: CipherState, SymmetricState,
HandshakeState for any suite) costs a board several times the heap. The
responder uses microtun.noise, so every handshake the tests run checks this
code against it; host_tests/test_handshake.py compares the bytes directly.

The symmetric state of §5.2 is just (h, ck): MixHash(d) is h = HASH(h || d),
MixKey(ikm) is ck, k = HKDF(ck, ikm). Every key of this pattern encrypts
exactly once, so each ENCRYPT uses nonce 0 (§5.1: n starts at 0 after
every InitializeKey).
"""
from hashlib import sha256

import microtun.messages as m   # (the `import x.y as z` form: endpoint.py says why)
from microtun.aead import AEAD
from microtun.hmac import noise_hkdf
import microtun.rand as rand
import microtun.x25519 as ecdh   # (one global for its two functions: each costs a board heap)

if __import__("sys").implementation.name != "micropython":
    def const(x):   # CPython; MicroPython's compiler folds const() with no name bound (a global costs a board heap)
        return x

# The protocol name is exactly HASHLEN (32) bytes, so h starts as the name
# itself (§5.2 InitializeSymmetric), and so does ck. (const bytes: in flash
# on a frozen build, and no module global.)
_NAME = const(b"Noise_IKpsk2_25519_AESCCM_SHA256")
# the AEAD nonce for n = 0 (§12.4 layout: 4 zero bytes, 64-bit n)
_NONCE0 = const(b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")
_NO_PSK = const(b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
                b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")


def _mix_hash(h, data):
    x = sha256(h)
    x.update(data)
    return x.digest()


class Initiation:
    """What the initiator keeps from INIT until RESPONSE: its static and
    ephemeral private keys, h, ck and the psk. dh_count: X25519 operations
    done for this handshake so far (the ephemeral key's included)."""

    def __init__(self, s, e, h, ck, psk, dh_count):
        self.s = s
        self.e = e
        self.h = h
        self.ck = ck
        self.psk = psk
        self.dh_count = dh_count


def create_initiation(static, peer_public, psk, sender_index, freshness, mac1k, cookie, ss=None, e=None):
    """INIT for the responder whose static public key is peer_public.
    static: our (private, public) pair; psk: 32 bytes or None (32 zero
    bytes); mac1k: the key of mac1 (messages.mac1_key(peer_public)), made
    here, after the X25519s, when None; ss: the cached DH(s, rs), computed
    when None; e: our ephemeral private key, random when None (tests).
    Returns (Initiation, message, mac1)."""
    dh = 2
    if e is None:
        e = rand.random_bytes(32)
    epub = ecdh.public_key(e)
    h = _mix_hash(_mix_hash(_NAME, m.PROLOGUE), peer_public)    # prologue, pre-message s
    h = _mix_hash(h, epub)                                       # e
    ck, k = noise_hkdf(_NAME, epub, 2)                           # e, psk mode (§9.2)
    ck, k = noise_hkdf(ck, ecdh.x25519(e, peer_public), 2)       # es
    enc_s = AEAD(k).seal(_NONCE0, static[1], h)                  # s
    h = _mix_hash(h, enc_s)
    if ss is None:
        ss = ecdh.x25519(static[0], peer_public)
        dh += 1
    ck, k = noise_hkdf(ck, ss, 2)                                # ss
    enc_p = AEAD(k).seal(_NONCE0, freshness, h)                  # payload
    h = _mix_hash(h, enc_p)
    body = m.header(m.TYPE_INIT) + sender_index.to_bytes(4, "big") + epub + enc_s + enc_p
    # (mac1's key made only now: passed in, its 64 bytes were held through
    # the X25519s and seals above, where a board's heap is at its fullest)
    msg, mac1 = m.finish(body, m.mac1_key(peer_public) if mac1k is None else mac1k, cookie)
    return Initiation(static[0], e, h, ck, _NO_PSK if psk is None else psk, dh), msg, mac1


def read_response(hs, data):
    """(remote index, send key, receive key) from a RESPONSE whose mac1
    was checked, or None if it does not authenticate (a bad tag, a
    low-order ephemeral key, a payload that is not empty). Never raises."""
    re = bytes(data[m.RESP_NOISE:m.RESP_NOISE + 32])
    h = _mix_hash(hs.h, re)                                      # e
    ck = noise_hkdf(hs.ck, re, 2)[0]                             # e, psk mode
    try:
        hs.dh_count += 1
        ck = noise_hkdf(ck, ecdh.x25519(hs.e, re), 2)[0]         # ee
        hs.dh_count += 1
        ck = noise_hkdf(ck, ecdh.x25519(hs.s, re), 2)[0]         # se
    except ValueError:                                           # all-zero DH: a low-order point
        return None
    ck, t, k = noise_hkdf(ck, hs.psk, 3)                         # psk
    h = _mix_hash(h, t)
    re = t = None
    if AEAD(k).open(_NONCE0, data[m.RESP_NOISE + 32:m.RESP_MAC1], h) != b"":
        return None                                              # empty payload, or not authentic
    send, recv = noise_hkdf(ck, b"", 2)                          # Split()
    return m.u32(data, 4), send, recv

