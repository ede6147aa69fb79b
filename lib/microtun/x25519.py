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


def _inverse(x):
    # x**(p-2) mod p by the classic curve25519 addition chain: 254 squarings
    # and 11 multiplications (each run of squarings one pow(x, 2**n, p), a
    # loop in C). On MicroPython's MPZ this is ~2.5x faster than the
    # 3-argument pow() over the whole exponent.
    p = _P
    x2 = x * x % p
    x9 = pow(x2, 4, p) * x % p
    x11 = x9 * x2 % p
    x_5 = x11 * x11 % p * x9 % p
    x_10 = pow(x_5, 1 << 5, p) * x_5 % p
    x_20 = pow(x_10, 1 << 10, p) * x_10 % p
    x_40 = pow(x_20, 1 << 20, p) * x_20 % p
    x_50 = pow(x_40, 1 << 10, p) * x_10 % p
    x_100 = pow(x_50, 1 << 50, p) * x_50 % p
    x_200 = pow(x_100, 1 << 100, p) * x_100 % p
    x_250 = pow(x_200, 1 << 50, p) * x_50 % p
    return pow(x_250, 1 << 5, p) * x11 % p


def x25519(scalar, u):
    """Scalar multiplication: 32-byte scalar, 32-byte u-coordinate -> 32 bytes.
    Raises ValueError for an all-zero result (a low-order point), which must
    never be used as a shared secret (RFC 7748 §6.1)."""
    for name, v in (("scalar", scalar), ("u", u)):
        if not isinstance(v, (bytes, bytearray)) or len(v) != 32:
            raise ValueError("x25519 %s must be 32 bytes" % name)
    k = bytearray(scalar)  # clamped (RFC 7748 §5, decodeScalar25519)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    # RFC 7748 §5: the Montgomery ladder over bits 254..0 of k. da and cb
    # are left unreduced: their sum and difference are reduced once.
    p = _P
    x1 = int.from_bytes(u, "little") & _U_MASK
    x2, z2, x3, z3 = 1, 0, x1, 1
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
    r = x2 * _inverse(z2) % p
    if r == 0:
        raise ValueError("x25519 result is all zero: the peer sent a low-order point")
    return r.to_bytes(32, "little")


def public_key(key):
    """The public key (u-coordinate) of a 32-byte private key."""
    return x25519(key, BASE_POINT)
