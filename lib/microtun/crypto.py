"""Crypto backends: the primitives a Noise handshake spends its time in,
behind one small object, so a host can swap in C implementations without a
second copy of the protocol code.

    from microtun.crypto import PURE
    c = PURE                              # or microtun_host.hostcrypto.HOST on CPython
    c.name                                # "pure" (shown in status, logs, benchmarks)
    c.public_key(priv)                    # X25519 (RFC 7748 §5), 32 bytes
    c.x25519(priv, pub)                   # ValueError for an all-zero result (§6.1)
    c.hmac_sha256(key, data, more=None)   # RFC 2104
    c.noise_hkdf(ck, ikm, n)              # Noise rev 34 §4.3: n (2 or 3) outputs
    c.aead(key)                           # seal(nonce, pt, aad) / open(nonce, ct, aad)

A backend is any object with these attributes; it reaches the protocol code
through the Noise `Suite` (microtun.noise: Suite(..., crypto=c)), and the
gateway takes that suite as an argument (microtun.responder.Gateway(...,
suite=...)). Nothing picks a backend behind the caller's back: PURE is the
default, and the host server passes its own in one place
(microtun_host.gateway, from microtun_host.hostcrypto.choose()).

PURE is this package's own code (microtun.x25519, microtun.hmac,
microtun.aead): what every board runs. A device never loads this module
(its initiator is microtun.handshake); the gateway and the tests do.
"""
from microtun.aead import AEAD
from microtun.hmac import hmac_sha256, noise_hkdf
from microtun.x25519 import x25519, public_key


class PureCrypto:
    """The portable backend: pure-Python X25519, HMAC/HKDF over hashlib,
    AES-CCM over the port's AES (microtun.aead picks cryptolib on a board,
    cryptography's AESCCM on CPython: the same bytes)."""
    name = "pure"
    x25519 = staticmethod(x25519)
    public_key = staticmethod(public_key)
    hmac_sha256 = staticmethod(hmac_sha256)
    noise_hkdf = staticmethod(noise_hkdf)
    aead = staticmethod(AEAD)


PURE = PureCrypto()
