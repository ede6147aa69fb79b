"""HMAC-SHA256 (RFC 2104), Noise's HKDF (rev 34 §4.3, RFC 5869 with the
chaining key as salt and empty info) and a constant-time compare, written
for MicroPython's hashlib: no copy(), one digest() per object. (RFC 5869's
general extract and expand, which nothing here uses, are in
host_tests/test_hmac_hkdf.py as the reference noise_hkdf is checked against:
every function is heap on a board.)"""
import hashlib


def _pad(key, v):
    # The key XOR v, zero-padded to SHA-256's 64-byte block (RFC 2104 §2).
    return bytes(k ^ v for k in key) + bytes(v for _ in range(64 - len(key)))


def hmac_sha256(key, data, more=None):
    """HMAC-SHA256(key, data [+ more]). `more` lets callers MAC two buffers
    without concatenating them."""
    if len(key) > 64:
        key = hashlib.sha256(key).digest()
    h = hashlib.sha256(_pad(key, 0x36))
    h.update(data)
    if more is not None:
        h.update(more)
    o = hashlib.sha256(_pad(key, 0x5C))
    o.update(h.digest())
    return o.digest()


def noise_hkdf(key, ikm, n):
    """Noise rev 34 §4.3 HKDF(chaining_key, input_key_material): n (2 or 3)
    32-byte outputs."""
    t = hmac_sha256(key, ikm)
    o1 = hmac_sha256(t, b"\x01")
    o2 = hmac_sha256(t, o1, b"\x02")
    if n == 2:
        return o1, o2
    return o1, o2, hmac_sha256(t, o2, b"\x03")


def ct_equal(a, b):
    """Constant-time comparison of two byte strings (time depends only on
    their lengths)."""
    if len(a) != len(b):
        return False
    r = 0
    for i in range(len(a)):
        r |= a[i] ^ b[i]
    return r == 0
