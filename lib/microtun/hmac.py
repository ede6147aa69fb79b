"""HMAC-SHA256 (RFC 2104), HKDF (RFC 5869) and a constant-time compare,
written for MicroPython's hashlib: no copy(), one digest() per object."""
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


def hkdf_extract(salt, ikm):
    """RFC 5869 §2.2. An empty salt means HashLen zero bytes."""
    return hmac_sha256(salt if salt else bytes(32), ikm)


def hkdf_expand(prk, info, n):
    """RFC 5869 §2.3: n bytes of output keying material."""
    if n > 255 * 32:
        raise ValueError("hkdf length must be at most 8160 bytes, got %d" % n)
    out = b""
    t = b""
    i = 1
    while len(out) < n:
        t = hmac_sha256(prk, t + info + bytes((i,)))
        out += t
        i += 1
    return out[:n]


def hkdf(salt, ikm, info, n):
    """RFC 5869 extract-then-expand."""
    return hkdf_expand(hkdf_extract(salt, ikm), info, n)


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
