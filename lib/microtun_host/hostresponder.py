"""The gateway's half of the handshake written out straight over C
primitives, for the host backend (microtun_host.hostcrypto): reading an
INIT, answering it with a RESPONSE (or a STALE) and the session keys.

    r = HostResponder()                                  # HOST_SUITE.responder
    hs, sender, fresh = r.read_initiation(init, static, ss_lookup)   # NoiseError if not authentic
    hs.rs, hs.ss                                         # who it is; DH(s, rs), looked up or computed
    resp, send_key, recv_key = r.respond(hs, psk, idx, sender, mac1k)
    stale = r.stale(hs, sender, last_freshness)          # instead of respond()

The same calls and the same bytes as microtun.responder.NoiseResponder,
which runs microtun.noise's general HandshakeState: IKpsk2 is one fixed
sequence of MixHash / MixKey / DH / AEAD steps (Noise rev 34 §5.2, §7.5,
§9), so it is written here once as that sequence, as microtun.handshake
writes the initiator's. A first contact costs five X25519 scalar
multiplications in OpenSSL (the ephemeral key, es, ss, ee, se; ss is
cached per device afterwards) and 21 HMAC-SHA256 (Noise's 25, less the
four whose output is overwritten unused); the rest is what this module
keeps small:

- X25519 key objects are made once per key (the gateway's static key
  once per gateway; the device's e and s each once for their two DHs);
- HMAC-SHA256 is two SHA-256 calls over the key XOR the pads (a
  bytes.translate), and HKDF's two or three HMACs under one key share
  the pads; OpenSSL's one-shot HMAC sets up a MAC context per call,
  which costs more than the hashing here;
- one AESCCM object per key, each key used once (nonce 0, §5.1).

host_tests/test_hostresponder.py checks every byte against the Noise
path (a fixed ephemeral key, same INIT), and the gateway tests run on both.
"""
from hashlib import sha256

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from microtun import messages as m
from microtun.noise import NoiseError
from microtun.rand import random_bytes
from microtun.stale import seal_stale
from microtun_host.hostkeypair import HostKeypair

_NAME = b"Noise_IKpsk2_25519_AESCCM_SHA256"   # 32 bytes: h and ck start as the name (§5.2)
_NONCE0 = bytes(12)                 # every key here encrypts once: n = 0 (§12.4 layout)
_NO_PSK = bytes(32)
_IPAD = bytes(b ^ 0x36 for b in range(256))   # RFC 2104: key XOR ipad, byte by byte
_OPAD = bytes(b ^ 0x5C for b in range(256))
_IFILL = b"\x36" * 32               # a 32-byte key's zero padding to SHA-256's block, XORed
_OFILL = b"\x5c" * 32
_S_LEN = 48                         # encrypted static key: 32 + tag
_INIT_E = m.INIT_NOISE              # offsets in INIT: e, enc_s, enc_payload, mac1
_INIT_S = _INIT_E + 32
_INIT_P = _INIT_S + _S_LEN


def _hkdf(ck, ikm, three=False):
    """Noise rev 34 §4.3 HKDF(ck, ikm) with HMAC-SHA256 (RFC 2104) for a
    32-byte ck: 2 outputs (3 with three). Same bytes as
    microtun.hmac.noise_hkdf."""
    t = sha256(ck.translate(_OPAD) + _OFILL + sha256(ck.translate(_IPAD) + _IFILL + ikm).digest()).digest()
    ti = t.translate(_IPAD) + _IFILL
    to = t.translate(_OPAD) + _OFILL
    o1 = sha256(to + sha256(ti + b"\x01").digest()).digest()
    o2 = sha256(to + sha256(ti + o1 + b"\x02").digest()).digest()
    if three:
        return o1, o2, sha256(to + sha256(ti + o2 + b"\x03").digest()).digest()
    return o1, o2


def _ck(ck, ikm):
    """The first output of _hkdf(ck, ikm) only: the new chaining key of a
    MixKey whose cipher key the next MixKey replaces unused (the e tokens
    in psk mode, ee, se), so its second HMAC is never computed."""
    t = sha256(ck.translate(_OPAD) + _OFILL + sha256(ck.translate(_IPAD) + _IFILL + ikm).digest()).digest()
    return sha256(t.translate(_OPAD) + _OFILL + sha256(t.translate(_IPAD) + _IFILL + b"\x01").digest()).digest()


def _mac(key, data):
    """HMAC-SHA256 for a 32-byte key (mac1's)."""
    return sha256(key.translate(_OPAD) + _OFILL + sha256(key.translate(_IPAD) + _IFILL + data).digest()).digest()


def _dh(priv, pub):
    try:
        return priv.exchange(pub)
    except ValueError:                  # OpenSSL refuses an all-zero result (RFC 7748 §6.1)
        raise NoiseError("low_order")


def _open(k, h, ct):
    try:
        return AESCCM(k, 16).decrypt(_NONCE0, ct, h)
    except InvalidTag:
        raise NoiseError("bad_tag")


class Handshake:
    """What the responder holds between reading an INIT and answering it:
    the peer's keys (rs, re and their OpenSSL objects), h, ck, and ss."""
    __slots__ = ("rs", "ss", "h", "ck", "_re", "_rs")

    def __init__(self, rs, ss, h, ck, re_obj, rs_obj):
        self.rs = rs
        self.ss = ss
        self.h = h
        self.ck = ck
        self._re = re_obj
        self._rs = rs_obj


class HostResponder:
    """The responder's three calls (see the module docstring). Keeps the
    gateway's static key loaded (one per static key it was given, at most a
    few: a gateway has one) and the first hash of the handshake, which
    depends only on that key. Sessions get HostKeypair (the same bytes as
    microtun.keypair.Keypair, fewer layers around AESCCM)."""
    keypair = HostKeypair

    def __init__(self):
        self._statics = {}          # private key bytes -> (X25519PrivateKey, initial h)

    def _static(self, static):
        v = self._statics.get(static[0])
        if v is None:
            if len(self._statics) >= 4:
                self._statics.clear()
            # Initialize(): h = HASH(HASH(name || prologue) || s) (§5.3: prologue, pre-message s)
            h = sha256(sha256(_NAME + m.PROLOGUE).digest() + static[1]).digest()
            v = self._statics[bytes(static[0])] = (X25519PrivateKey.from_private_bytes(bytes(static[0])), h)
        return v

    def read_initiation(self, data, static, ss_lookup, e=None):
        """(Handshake, sender_index, freshness) from an INIT whose mac1 was
        checked; raises NoiseError (too_short, low_order, bad_tag, or what
        ss_lookup raised) if it is not authentic. ss_lookup(rs): the
        cached DH(s, rs) or None (see microtun.noise)."""
        if len(data) != m.INIT_LEN:
            raise NoiseError("too_short" if len(data) < m.INIT_LEN else "too_long")
        s, h = self._static(static)
        re = bytes(data[_INIT_E:_INIT_S])
        h = sha256(h + re).digest()                                 # e
        ck = _ck(_NAME, re)                                         # e, psk mode (§9.2)
        try:
            re_obj = X25519PublicKey.from_public_bytes(re)
        except ValueError:
            raise NoiseError("bad_key")
        ck, k = _hkdf(ck, _dh(s, re_obj))                           # es: DH(s, re)
        enc_s = bytes(data[_INIT_S:_INIT_P])
        rs = _open(k, h, enc_s)                                     # s
        h = sha256(h + enc_s).digest()
        ss = ss_lookup(rs)
        rs_obj = X25519PublicKey.from_public_bytes(rs)
        if ss is None:
            ss = _dh(s, rs_obj)
        elif len(ss) != 32:
            raise ValueError("ss_lookup must return 32 bytes or None")
        ck, k = _hkdf(ck, ss)                                       # ss
        enc_p = bytes(data[_INIT_P:m.INIT_MAC1])
        fresh = _open(k, h, enc_p)                                  # payload
        h = sha256(h + enc_p).digest()
        if len(fresh) != m.FRESHNESS_LEN:
            raise NoiseError("initiation payload is not a freshness value")
        return Handshake(rs, ss, h, ck, re_obj, rs_obj), int.from_bytes(data[4:8], "big"), fresh

    @staticmethod
    def stale(hs, receiver_index, value):
        """The STALE answer (microtun.responder.create_stale)."""
        return seal_stale(hs.ck, hs.h, receiver_index, value, random_bytes(12))

    @staticmethod
    def respond(hs, psk, sender_index, receiver_index, mac1k, e=None):
        """(RESPONSE, send key, receive key): message 2 <- e, ee, se, psk
        with an empty payload, framed with the indexes and mac1 (no
        cookie: mac2 zero), then Split(). psk None: 32 zero bytes. e: our
        ephemeral private key (tests); random when None."""
        e = X25519PrivateKey.generate() if e is None else X25519PrivateKey.from_private_bytes(e)
        epub = e.public_key().public_bytes_raw()
        h = sha256(hs.h + epub).digest()                            # e
        ck = _ck(hs.ck, epub)                                       # e, psk mode
        ck = _ck(ck, _dh(e, hs._re))                                # ee
        ck = _ck(ck, _dh(e, hs._rs))                                # se: DH(e, rs) on the responder
        ck, t, k = _hkdf(ck, _NO_PSK if psk is None else bytes(psk), True)  # psk
        h = sha256(h + t).digest()
        tag = AESCCM(k, 16).encrypt(_NONCE0, b"", h)                # empty payload
        body = b"".join((m.header(m.TYPE_RESPONSE), sender_index.to_bytes(4, "big"),
                         receiver_index.to_bytes(4, "big"), epub, tag))
        recv, send = _hkdf(ck, b"")                                 # Split(): initiator -> responder first
        hs.ck = hs.h = None                                         # the handshake secrets go
        return body + _mac(mac1k, body)[:m.MAC_LEN] + bytes(m.MAC_LEN), send, recv
