"""X25519 Diffie-Hellman, RFC 7748 §5: a Montgomery ladder over
arithmetic modulo 2**255 - 19 done one of two ways, with the same results:

  native   microtun.fe25519 (viper): field elements as 13-bit limbs in one
           preallocated buffer; nothing allocated in the ladder, no branch
           on secret data. Where the board has a native emitter and the
           module is there (frozen into the firmware; compiled from source).
  big-int  Python integers (MicroPython's MPZ, CPython's long). Everywhere
           else: CPython, a .mpy deployment without fe25519, a port
           without viper.

`BACKEND` says which one this interpreter uses.

Security note: the big-int path is not constant time (MPZ and CPython's
long arithmetic take value-dependent time, and its conditional swap is a
branch); the native path has no secret-dependent branch or index, but
MicroPython makes no timing promises either. See docs/CRYPTO.md
("Constant-time caveat").
"""
if __import__("sys").implementation.name != "micropython":
    def const(x):   # CPython; MicroPython's compiler folds const() with no name bound (a global costs a board heap)
        return x

try:
    import microtun.fe25519 as _fe   # (not `from microtun import`: endpoint.py says why)
    BACKEND = "native"
except (ImportError, SyntaxError, ValueError, MemoryError):
    # ImportError: CPython (no micropython module) or no fe25519 shipped;
    # SyntaxError: a port without the native emitter compiling the viper
    # source; ValueError: a .mpy of another -march; MemoryError: no room to
    # compile it on a small board.
    _fe = None
    BACKEND = "big-int"

_P = const(2**255 - 19)
_A24P1 = const(121666)    # RFC 7748's a24 = 121665, plus one
_U_MASK = const(2**255 - 1)
BASE_POINT = const(b"\x09\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"
                   b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")  # u = 9

def _ladder_big(k, x1):
    # RFC 7748 §5: the Montgomery ladder over bits 254..0 of k, in big ints.
    # da and cb are left unreduced: their sum and difference are reduced once.
    p = _P
    x2, z2, x3, z3 = 1, 0, x1, 1
    swap = 0
    for t in range(254, -1, -1):
        kt = (k[t >> 3] >> (t & 7)) & 1  # small-int ops, no MPZ shift
        if swap ^ kt:
            x2, x3 = x3, x2
            z2, z3 = z3, z2
        swap = kt
        # Five names reused for RFC 7748's A, B, AA, BB, E, DA, CB: each
        # big int dies as soon as it is spent (less heap at the peak).
        a = x2 + z2
        b = x2 - z2
        x3, z3 = (x3 - z3) * a, (x3 + z3) * b  # DA, CB
        x2 = a * a % p                          # AA
        z2 = b * b % p                          # BB
        a = x3 + z3
        z3 = (x3 - z3) % p
        x3 = a % p
        x3 = x3 * x3 % p
        z3 = z3 * z3 % p * x1 % p               # (no 765-bit product: 510 at most)
        a = x2 - z2                             # E = AA - BB
        x2 = x2 * z2 % p
        z2 = a * (z2 + _A24P1 * a) % p          # E * (AA + a24 E) = E * (BB + (a24 + 1) E)
    if swap:
        x2, z2 = x3, z3
    # 1 / z2 = z2**(p-2) mod p by the classic curve25519 addition chain: 254
    # squarings and 11 multiplications (each run of squarings one
    # pow(x, 2**n, p), a loop in C). On MicroPython's MPZ this is ~2.5x
    # faster than the 3-argument pow() over the whole exponent. Written
    # here, not as a function: it has no other caller, and a function is
    # heap on a board. Names are reused as soon as a power is spent
    # (x_n = x**(2**n - 1)).
    x = z2
    z2 = x3 = z3 = a = None
    c = x * x % p
    b = pow(c, 4, p) * x % p           # x**9
    x11 = b * c % p                    # x**11
    c = None
    b = x11 * x11 % p * b % p          # x_5
    x10 = b = pow(b, 1 << 5, p) * b % p  # x_10
    b = pow(b, 1 << 10, p) * b % p     # x_20
    b = pow(b, 1 << 20, p) * b % p     # x_40
    x50 = b = pow(b, 1 << 10, p) * x10 % p  # x_50
    x10 = None
    b = pow(b, 1 << 50, p) * b % p     # x_100
    b = pow(b, 1 << 100, p) * b % p    # x_200
    b = pow(b, 1 << 50, p) * x50 % p   # x_250
    return x2 * (pow(b, 1 << 5, p) * x11 % p) % p


def x25519(scalar, u):
    """Scalar multiplication: 32-byte scalar, 32-byte u-coordinate -> 32 bytes.
    Raises ValueError for an all-zero result (a low-order point), which must
    never be used as a shared secret (RFC 7748 §6.1)."""
    # (checked one by one, not in a loop over (name, value) pairs: its
    # names and iterator made this frame 15 words, taken from the heap
    # while the ladder wants its workspace; 9 words go on the C stack)
    if not isinstance(scalar, (bytes, bytearray)) or len(scalar) != 32:
        raise ValueError("x25519 scalar must be 32 bytes")
    if not isinstance(u, (bytes, bytearray)) or len(u) != 32:
        raise ValueError("x25519 u must be 32 bytes")
    k = bytearray(scalar)  # clamped (RFC 7748 §5, decodeScalar25519)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    x1 = int.from_bytes(u, "little") & _U_MASK
    r = _ladder_big(k, x1) if _fe is None else _fe.ladder(k, x1)
    if r == 0:
        raise ValueError("x25519 result is all zero: the peer sent a low-order point")
    return r.to_bytes(32, "little")


def public_key(key):
    """The public key (u-coordinate) of a 32-byte private key."""
    return x25519(key, BASE_POINT)
