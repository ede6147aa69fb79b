"""Cookies for DoS resistance under load (WireGuard whitepaper §5.4.7).

The responder, when under load, answers an initiation with a valid mac1 but
no valid mac2 by a COOKIE message instead of doing DH. The cookie is a MAC of
the sender's address under a secret that changes every COOKIE_SECRET_MS, and
travels encrypted under a key derived from the responder's public key with
mac1 as associated data, so only the initiator that sent that message can
use it. The initiator then puts mac2 = MAC(cookie, message) in its retries.

A device imports this module only when a COOKIE message arrives (rare: the
gateway is under load), so it costs a board no heap until then.
"""
import hashlib

from microtun.aead import AEAD
from microtun.hmac import hmac_sha256
from microtun.rand import random_bytes
from microtun.ticks import ticks_diff
from microtun import messages as m

if __import__("sys").implementation.name != "micropython":
    def const(x):   # CPython; MicroPython's compiler folds const() with no name bound (a global costs a board heap)
        return x

COOKIE_SECRET_MS = const(120000)   # responder secret lifetime (WireGuard: 120 s)
COOKIE_VALID_MS = const(110000)    # initiator stops using a cookie a bit earlier
_CACHED = const(512)               # responder: cookies kept per secret (one per link)
_NO_MAC = bytes(16)


def cookie_key(key):
    """The key a COOKIE message is sealed under, from the responder's static
    public key (here, not in microtun.messages: a device needs it only once
    a COOKIE comes, and then loads this module)."""
    return hashlib.sha256(b"cookie--" + key).digest()


def addr_bytes(addr):
    """A stable byte form of an opaque address object."""
    if isinstance(addr, (bytes, bytearray)):
        return bytes(addr)
    return repr(addr).encode()


class CookieChecker:
    """Responder side."""

    def __init__(self, public_key):
        self._aead = AEAD(cookie_key(public_key))
        self._secret = None
        self._born = 0
        self._cache = {}          # addr -> its cookie under the current secret

    def _current_secret(self, now):
        if self._secret is None or ticks_diff(now, self._born) >= COOKIE_SECRET_MS:
            self._secret = random_bytes(32)
            self._born = now
            self._cache = {}
        return self._secret

    def cookie_for(self, addr, now):
        secret = self._current_secret(now)
        c = self._cache.get(addr)
        if c is None:
            if len(self._cache) >= _CACHED:
                self._cache = {}
            c = self._cache[addr] = hmac_sha256(secret, addr_bytes(addr))[:m.MAC_LEN]
        return c

    def check_mac2(self, data, mac2_off, addr, now):
        # No cookie (16 zero bytes, what an initiator without one sends): no HMAC.
        if data[mac2_off:mac2_off + m.MAC_LEN] == _NO_MAC:
            return False
        return m.check_mac(self.cookie_for(addr, now), data, mac2_off)

    def reply(self, receiver_index, mac1, addr, now):
        """A COOKIE message answering an initiation whose mac1 was given."""
        nonce = random_bytes(m.COOKIE_NONCE_LEN)
        enc = self._aead.seal(nonce, self.cookie_for(addr, now), mac1)
        return m.header(m.TYPE_COOKIE) + receiver_index.to_bytes(4, "big") + nonce + enc


class CookieJar:
    """Initiator side: remembers the last cookie. A device makes one when
    the first COOKIE message arrives (this module is loaded only then)."""

    def __init__(self, responder_public):
        self._aead = AEAD(cookie_key(responder_public))
        self.cookie = None
        self._got = 0

    def consume(self, data, mac1, now):
        """Process a COOKIE message answering the INIT whose mac1 is given;
        True if it held a valid cookie."""
        if mac1 is None:
            return False
        cookie = self._aead.open(data[8:20], data[20:52], mac1)
        if cookie is None:
            return False
        self.cookie = cookie
        self._got = now
        return True

    def current(self, now):
        if self.cookie is not None and ticks_diff(now, self._got) >= COOKIE_VALID_MS:
            self.cookie = None
        return self.cookie


def device_in(dev, data, addr, now):
    """A COOKIE for the INIT a microtun.endpoint.Device has in flight (it
    checked the index): kept for mac2 on the retry. The device's rare path,
    here so that its code stays out of the device's heap until a COOKIE
    comes; the jar is made then too."""
    if dev._cookies is None:
        dev._cookies = CookieJar(dev.session.public_key)
    dev._count("cookie_rx" if dev._cookies.consume(data, dev._mac1, now) else "bad_cookie")
