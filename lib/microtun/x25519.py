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
try:
    from micropython import const
except ImportError:
    def const(x):
        return x

try:
    from microtun import fe25519 as _fe
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
BASE_POINT = b"\x09" + bytes(31)

# Workspace slots of the native ladder (80 bytes each) and the ops naming
# them: fe25519's functions take `dst | a << 4 | b << 8 | e << 12`.
_X2 = const(0)
_Z2 = const(1)
_X3 = const(2)
_Z3 = const(3)
_A = const(4)
_B = const(5)
_C = const(6)
_D = const(7)
_X1 = const(8)
_T = const(9)
_SLOT = const(80)
_OP_AB = const(_A | _B << 4 | _X2 << 8 | _Z2 << 12)     # A = x2 + z2, B = x2 - z2
_OP_CD = const(_C | _D << 4 | _X3 << 8 | _Z3 << 12)     # C = x3 + z3, D = x3 - z3
_OP_DA = const(_D | _D << 4 | _A << 8)                  # D = DA
_OP_CB = const(_C | _C << 4 | _B << 8)                  # C = CB
_OP_AA = const(_A | _A << 4)                            # A = AA
_OP_BB = const(_B | _B << 4)                            # B = BB
_OP_X3Z3 = const(_X3 | _Z3 << 4 | _D << 8 | _C << 12)   # x3 = DA + CB, z3 = DA - CB
_OP_X3SQ = const(_X3 | _X3 << 4)
_OP_Z3SQ = const(_Z3 | _Z3 << 4)
_OP_Z3X1 = const(_Z3 | _Z3 << 4 | _X1 << 8)             # z3 = x1 (DA - CB)^2
_OP_X2 = const(_X2 | _A << 4 | _B << 8)                 # x2 = AA BB
_OP_EF = const(_A | _A << 4 | _B << 8)                  # B = E = AA - BB, A = AA + a24 E
_OP_Z2 = const(_Z2 | _B << 4 | _A << 8)                 # z2 = E (AA + a24 E)


def _inverse(x):
    # x**(p-2) mod p by the classic curve25519 addition chain: 254 squarings
    # and 11 multiplications (each run of squarings one pow(x, 2**n, p), a
    # loop in C). On MicroPython's MPZ this is ~2.5x faster than the
    # 3-argument pow() over the whole exponent.
    # Names are reused as soon as a power is spent (x_n = x**(2**n - 1)).
    p = _P
    x2 = x * x % p
    b = pow(x2, 4, p) * x % p          # x**9
    x11 = b * x2 % p                   # x**11
    x2 = None
    b = x11 * x11 % p * b % p          # x_5
    x10 = b = pow(b, 1 << 5, p) * b % p  # x_10
    b = pow(b, 1 << 10, p) * b % p     # x_20
    b = pow(b, 1 << 20, p) * b % p     # x_40
    x50 = b = pow(b, 1 << 10, p) * x10 % p  # x_50
    x10 = None
    b = pow(b, 1 << 50, p) * b % p     # x_100
    b = pow(b, 1 << 100, p) * b % p    # x_200
    b = pow(b, 1 << 50, p) * x50 % p   # x_250
    return pow(b, 1 << 5, p) * x11 % p


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
        z3 = x1 * z3 * z3 % p
        a = x2 - z2                             # E = AA - BB
        x2 = x2 * z2 % p
        z2 = a * (z2 + _A24P1 * a) % p          # E * (AA + a24 E) = E * (BB + (a24 + 1) E)
    if swap:
        x2, z2 = x3, z3
    return x2 * _inverse(z2) % p


def _put(w, slot, x):
    # x (an int below 2**260) into a slot as 20 limbs of 13 bits
    o = slot * _SLOT
    for i in range(20):
        v = x & 8191
        x >>= 13
        w[o] = v & 255
        w[o + 1] = v >> 8
        o += 4


def _get(w, slot):
    x = 0
    o = slot * _SLOT + 76
    for i in range(20):
        x = (x << 13) | w[o] | w[o + 1] << 8
        o -= 4
    return x


def _sqn(w, dst, src, n):
    # slot dst = slot src ** (2 ** n)
    sq = _fe.sq
    sq(w, dst | src << 4)
    op = dst | dst << 4
    for _ in range(n - 1):
        sq(w, op)


def _ladder_native(k, x1):
    # The same ladder as _ladder_big on fe25519's slots (names above); every
    # step is a fixed sequence of calls whatever the key bits are.
    w = bytearray(10 * _SLOT)
    _put(w, _X2, 1)
    _put(w, _X3, x1)
    _put(w, _Z3, 1)
    _put(w, _X1, x1)
    fe = _fe
    mul, sq, addsub, sub_a24, cswap = fe.mul, fe.sq, fe.addsub, fe.sub_a24, fe.cswap
    swap = 0
    for t in range(254, -1, -1):
        kt = (k[t >> 3] >> (t & 7)) & 1
        cswap(w, swap ^ kt)
        swap = kt
        addsub(w, _OP_AB)
        addsub(w, _OP_CD)
        mul(w, _OP_DA)
        mul(w, _OP_CB)
        sq(w, _OP_AA)
        sq(w, _OP_BB)
        addsub(w, _OP_X3Z3)
        sq(w, _OP_X3SQ)
        sq(w, _OP_Z3SQ)
        mul(w, _OP_Z3X1)
        mul(w, _OP_X2)
        sub_a24(w, _OP_EF)
        mul(w, _OP_Z2)
    cswap(w, swap)
    # 1 / z2 = z2 ** (p - 2): _inverse's addition chain on slots
    # (z = _Z2; x2 = _A, b = _B, x11 = _C, x10 = _D, x50 = _X3, scratch _T)
    sq(w, _A | _Z2 << 4)                      # z**2
    _sqn(w, _B, _A, 2)
    mul(w, _B | _B << 4 | _Z2 << 8)           # z**9
    mul(w, _C | _B << 4 | _A << 8)            # z**11
    sq(w, _T | _C << 4)
    mul(w, _B | _T << 4 | _B << 8)            # z_5 = z**(2**5 - 1)
    _sqn(w, _T, _B, 5)
    mul(w, _D | _T << 4 | _B << 8)            # z_10
    _sqn(w, _T, _D, 10)
    mul(w, _B | _T << 4 | _D << 8)            # z_20
    _sqn(w, _T, _B, 20)
    mul(w, _B | _T << 4 | _B << 8)            # z_40
    _sqn(w, _T, _B, 10)
    mul(w, _X3 | _T << 4 | _D << 8)           # z_50
    _sqn(w, _T, _X3, 50)
    mul(w, _B | _T << 4 | _X3 << 8)           # z_100
    _sqn(w, _T, _B, 100)
    mul(w, _B | _T << 4 | _B << 8)            # z_200
    _sqn(w, _T, _B, 50)
    mul(w, _B | _T << 4 | _X3 << 8)           # z_250
    _sqn(w, _T, _B, 5)
    mul(w, _B | _T << 4 | _C << 8)            # z**(2**255 - 21) = 1 / z
    mul(w, _A | _X2 << 4 | _B << 8)           # x2 / z2
    return _get(w, _A) % _P


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
    x1 = int.from_bytes(u, "little") & _U_MASK
    r = _ladder_big(k, x1) if _fe is None else _ladder_native(k, x1)
    if r == 0:
        raise ValueError("x25519 result is all zero: the peer sent a low-order point")
    return r.to_bytes(32, "little")


def public_key(key):
    """The public key (u-coordinate) of a 32-byte private key."""
    return x25519(key, BASE_POINT)
