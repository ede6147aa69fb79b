"""X25519 Diffie-Hellman, RFC 7748 §5, in pure Python big-int arithmetic.

Security note: MicroPython's MPZ and CPython's long arithmetic are not
constant time, and the ladder's conditional swap below is a branch. Timing
may leak information about the scalar to an attacker who can measure many
operations precisely. See docs/CRYPTO.md ("Constant-time caveat").
"""
try:
    from micropython import const
except ImportError:
    def const(x):
        return x

_P = const(2**255 - 19)
_A24 = const(121665)
_U_MASK = const(2**255 - 1)
BASE_POINT = b"\x09" + bytes(31)


def _sqn(x, n, p):
    for _ in range(n):
        x = x * x % p
    return x


def _inverse(z):
    # z**(p-2) mod p by the classic curve25519 addition chain: 254 squarings
    # and 11 multiplications. On MicroPython's MPZ this is ~2.5x faster than
    # the 3-argument pow().
    p = _P
    z2 = z * z % p
    z9 = _sqn(z2, 2, p) * z % p
    z11 = z9 * z2 % p
    z_5 = z11 * z11 % p * z9 % p
    z_10 = _sqn(z_5, 5, p) * z_5 % p
    z_20 = _sqn(z_10, 10, p) * z_10 % p
    z_40 = _sqn(z_20, 20, p) * z_20 % p
    z_50 = _sqn(z_40, 10, p) * z_10 % p
    z_100 = _sqn(z_50, 50, p) * z_50 % p
    z_200 = _sqn(z_100, 100, p) * z_100 % p
    z_250 = _sqn(z_200, 50, p) * z_50 % p
    return _sqn(z_250, 5, p) * z11 % p


def _ladder(k, u):
    # RFC 7748 §5: Montgomery ladder over bits 254..0 of the clamped scalar.
    # da and cb are left unreduced: their sum and difference are reduced once.
    p = _P
    x1 = u
    x2, z2, x3, z3 = 1, 0, u, 1
    swap = 0
    for t in range(254, -1, -1):
        kt = (k[t >> 3] >> (t & 7)) & 1  # small-int ops, no MPZ shift
        if swap ^ kt:
            x2, x3 = x3, x2
            z2, z3 = z3, z2
        swap = kt
        a = x2 + z2
        b = x2 - z2
        aa = a * a % p
        bb = b * b % p
        da = (x3 - z3) * a
        cb = (x3 + z3) * b
        e = aa - bb
        t1 = (da + cb) % p
        t2 = (da - cb) % p
        x3 = t1 * t1 % p
        z3 = x1 * t2 * t2 % p
        x2 = aa * bb % p
        z2 = e * (aa + _A24 * e) % p
    if swap:
        x2, z2 = x3, z3
    return x2 * _inverse(z2) % p


def x25519(scalar, u):
    """Scalar multiplication: 32-byte scalar, 32-byte u-coordinate -> 32 bytes.
    Raises ValueError for an all-zero result (a low-order point), which must
    never be used as a shared secret (RFC 7748 §6.1)."""
    for name, v in (("scalar", scalar), ("u", u)):
        if not isinstance(v, (bytes, bytearray)) or len(v) != 32:
            raise ValueError("x25519 %s must be 32 bytes" % name)
    k = bytearray(scalar)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    r = _ladder(k, int.from_bytes(u, "little") & _U_MASK)
    out = r.to_bytes(32, "little")
    if r == 0:
        raise ValueError("x25519 result is all zero: the peer sent a low-order point")
    return out


def public_key(key):
    """The public key (u-coordinate) of a 32-byte private key."""
    return x25519(key, BASE_POINT)
