"""HMAC-SHA256 (RFC 2104), HKDF (RFC 5869) and a constant-time compare,
written for MicroPython's hashlib: no copy(), one digest() per object."""
import hashlib

_BLOCK = 64


def _xor_pad(key, pad):
    return bytes(k ^ pad for k in key) + bytes(pad for _ in range(_BLOCK - len(key)))


def hmac_sha256(key, msg, msg2=None):
    """HMAC-SHA256(key, msg [+ msg2]). msg2 lets callers MAC two buffers
    without concatenating them."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    inner = hashlib.sha256(_xor_pad(key, 0x36))
    inner.update(msg)
    if msg2 is not None:
        inner.update(msg2)
    outer = hashlib.sha256(_xor_pad(key, 0x5C))
    outer.update(inner.digest())
    return outer.digest()


def hkdf_extract(salt, ikm):
    """RFC 5869 §2.2. An empty salt means HashLen zero bytes."""
    return hmac_sha256(salt if salt else bytes(32), ikm)


def hkdf_expand(prk, info, length):
    """RFC 5869 §2.3."""
    if length > 255 * 32:
        raise ValueError("hkdf length must be at most 8160 bytes, got %d" % length)
    out = b""
    t = b""
    i = 1
    while len(out) < length:
        t = hmac_sha256(prk, t + info + bytes((i,)))
        out += t
        i += 1
    return out[:length]


def hkdf(salt, ikm, info, length):
    """RFC 5869 extract-then-expand."""
    return hkdf_expand(hkdf_extract(salt, ikm), info, length)


def noise_hkdf(chaining_key, ikm, n):
    """Noise rev 34 §4.3 HKDF: returns n (2 or 3) 32-byte outputs."""
    temp = hmac_sha256(chaining_key, ikm)
    o1 = hmac_sha256(temp, b"\x01")
    o2 = hmac_sha256(temp, o1 + b"\x02")
    if n == 2:
        return o1, o2
    return o1, o2, hmac_sha256(temp, o2 + b"\x03")


def ct_equal(a, b):
    """Constant-time comparison of two byte strings (time depends only on
    their lengths)."""
    if len(a) != len(b):
        return False
    r = 0
    for i in range(len(a)):
        r |= a[i] ^ b[i]
    return r == 0
