"""cryptolib.aes written in Python, for interpreters without cryptolib:
pure-Python AES (FIPS-197) for ports built without it (stm32 PYBV11), and on
CPython the same object over the `cryptography` package. Both are reached
through microtun.aes (backends "pure" and "cryptography"); `aes` here is a
drop-in for cryptolib.aes.

The pure AES is written for MicroPython: byte-wide tables in bytearrays (every value stays a
small int even on 32-bit ports, where 32-bit T-table words would be
heap-allocated big ints), the state in 16 local variables, each round fully
unrolled, no allocation per block. The encryption tables (S, 2*S, 3*S:
768 bytes) are built at import; the five decryption tables (1280 bytes) only
when something first decrypts (CCM never does).

Not constant time: table lookups indexed by secret bytes leak through the
cache on CPUs that have one (see docs/CRYPTO.md). About 50 us per block on
the x86 unix port, some 100 times cryptolib: only where there is no cryptolib.
"""
from microtun.aes import MODE_CBC, check_args

_ZERO = bytes(16)


def _xtime(a):
    # Multiplication by x (i.e. 2) in GF(2^8) mod x^8+x^4+x^3+x+1 (FIPS-197 §4.2.1).
    a <<= 1
    return (a ^ 0x11B) if a & 0x100 else a


def _build_sbox():
    # Log/antilog tables over the generator 3, then the S-box (FIPS-197 §5.1.1):
    # multiplicative inverse followed by the affine map.
    exp = bytearray(256)
    log = bytearray(256)
    x = 1
    for i in range(255):
        exp[i] = x
        log[x] = i
        x ^= _xtime(x)
    s = bytearray(256)
    for a in range(256):
        b = exp[(255 - log[a]) % 255] if a else 0
        r = b
        for _ in range(4):
            b = ((b << 1) | (b >> 7)) & 0xFF
            r ^= b
        s[a] = r ^ 0x63
    return s, exp, log


_S, _exp, _log = _build_sbox()
_S2 = bytearray(_xtime(v) for v in _S)
_S3 = bytearray(_xtime(v) ^ v for v in _S)
_SI = _I9 = _I11 = _I13 = _I14 = None


def _mul(a, b):
    if a == 0 or b == 0:
        return 0
    return _exp[(_log[a] + _log[b]) % 255]


def _build_inverse_tables():
    # Inverse S-box, and InvMixColumns' factors 9, 11, 13, 14 applied to it.
    global _SI, _I9, _I11, _I13, _I14
    si = bytearray(256)
    for a in range(256):
        si[_S[a]] = a
    _I9 = bytearray(_mul(9, v) for v in si)
    _I11 = bytearray(_mul(11, v) for v in si)
    _I13 = bytearray(_mul(13, v) for v in si)
    _I14 = bytearray(_mul(14, v) for v in si)
    _SI = si


def _expand_key(key):
    """FIPS-197 §5.2: the Nr+1 round keys, each a 16-byte bytes object."""
    nk = len(key) // 4
    nr = nk + 6
    w = bytearray(16 * (nr + 1))
    w[0:len(key)] = key
    rcon = 1
    for i in range(nk, 4 * (nr + 1)):
        p = 4 * i - 4
        t0, t1, t2, t3 = w[p], w[p + 1], w[p + 2], w[p + 3]
        if i % nk == 0:
            t0, t1, t2, t3 = _S[t1] ^ rcon, _S[t2], _S[t3], _S[t0]
            rcon = _xtime(rcon)
        elif nk > 6 and i % nk == 4:
            t0, t1, t2, t3 = _S[t0], _S[t1], _S[t2], _S[t3]
        q = 4 * (i - nk)
        w[4 * i] = w[q] ^ t0
        w[4 * i + 1] = w[q + 1] ^ t1
        w[4 * i + 2] = w[q + 2] ^ t2
        w[4 * i + 3] = w[q + 3] ^ t3
    return [bytes(w[16 * r:16 * r + 16]) for r in range(nr + 1)], nr


def _decryption_keys(rks, nr):
    """FIPS-197 §5.3.5: round keys in reverse order, InvMixColumns applied to
    all but the first and last. mul(k, b) is _Ik[S[b]] since Si[S[b]] = b."""
    if _SI is None:
        _build_inverse_tables()
    S, I9, I11, I13, I14 = _S, _I9, _I11, _I13, _I14
    out = [rks[nr]]
    for r in range(nr - 1, 0, -1):
        k = rks[r]
        d = bytearray(16)
        for c in range(0, 16, 4):
            a0, a1, a2, a3 = S[k[c]], S[k[c + 1]], S[k[c + 2]], S[k[c + 3]]
            d[c] = I14[a0] ^ I11[a1] ^ I13[a2] ^ I9[a3]
            d[c + 1] = I9[a0] ^ I14[a1] ^ I11[a2] ^ I13[a3]
            d[c + 2] = I13[a0] ^ I9[a1] ^ I14[a2] ^ I11[a3]
            d[c + 3] = I11[a0] ^ I13[a1] ^ I9[a2] ^ I14[a3]
        out.append(bytes(d))
    out.append(rks[0])
    return out


class aes:
    """A one-direction AES object with cryptolib.aes semantics (see
    microtun.aes): the first call fixes the direction, CBC chains across
    calls, `out` may be longer than the input or the input itself."""

    def __init__(self, key, mode, iv=None):
        check_args(key, mode, iv)
        self._cbc = mode == MODE_CBC
        self._iv = bytearray(iv) if self._cbc else _ZERO  # the CBC chain
        self._dir = 0  # 1 encrypting, 2 decrypting
        self._setup(bytes(key))

    def _setup(self, key):
        self._rks, self._nr = _expand_key(key)

    def _run(self, d, data, out):
        if self._dir != d:
            if self._dir:
                raise ValueError("an aes object can't encrypt & decrypt: make one per direction")
            self._dir = d
            self._start(d)
        n = len(data)
        if n % 16:
            raise ValueError("aes input must be a multiple of 16 bytes")
        if out is None:
            buf = bytearray(n)
        elif len(out) < n:
            raise ValueError("aes output buffer must be at least as long as the input")
        else:
            buf = out
        self._blocks(d, data, buf, n)
        return bytes(buf) if out is None else out

    def encrypt(self, data, out=None):
        return self._run(1, data, out)

    def decrypt(self, data, out=None):
        return self._run(2, data, out)

    def _start(self, d):
        if d == 2:
            self._rks = _decryption_keys(self._rks, self._nr)

    def _blocks(self, d, data, buf, n):
        rks, nr, x = self._rks, self._nr, self._iv
        if d == 2:
            for o in range(0, n, 16):
                _decrypt_block(data, o, x, buf, o, rks, nr)
        elif self._cbc:
            xo = 0
            for o in range(0, n, 16):
                _encrypt_block(data, o, x, xo, buf, o, rks, nr)
                x, xo = buf, o
            if n:
                self._iv[0:16] = buf[n - 16:n]
        else:
            for o in range(0, n, 16):
                _encrypt_block(data, o, x, 0, buf, o, rks, nr)


class CryptographyAES(aes):
    """The same object with the blocks done by the `cryptography` package
    (CPython): microtun.aes's "cryptography" backend. It lives here to
    share the semantics above and to keep CPython-only code out of the
    modules every board loads."""

    def _setup(self, key):
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        m = modes.CBC(bytes(self._iv)) if self._cbc else modes.ECB()
        self._cipher = Cipher(algorithms.AES(key), m)

    def _start(self, d):
        c = self._cipher
        self._ctx = c.encryptor() if d == 1 else c.decryptor()

    def _blocks(self, d, data, buf, n):
        buf[:n] = self._ctx.update(data)


# The block functions below are generated: round r turns the 16 state bytes
# s0..s15 (column-major, byte j = row j%4 of column j//4) into t0..t15 and the
# next round turns them back, so no state is ever copied. Output byte
# (row r, column c) of an encryption round is
#   MixColumns row r applied to S[s(q, c+q)] for q = 0..3  ^ round key byte,
# coefficients (2, 3, 1, 1) rotated by r, read from S2, S3 and S. Decryption
# uses InvShiftRows (column c-q) and (14, 11, 13, 9) from the I tables.


def _encrypt_block(src, so, x, xo, dst, do, rks, nr):
    """dst[do:do+16] = E(src[so:so+16] ^ x[xo:xo+16]); FIPS-197 §5.1 with
    SubBytes, ShiftRows and MixColumns folded into the tables S, S2, S3.
    Reads the whole input before writing, so dst may be src."""
    S = _S
    S2 = _S2
    S3 = _S3
    k = rks[0]
    s0 = src[so] ^ x[xo] ^ k[0]
    s1 = src[so + 1] ^ x[xo + 1] ^ k[1]
    s2 = src[so + 2] ^ x[xo + 2] ^ k[2]
    s3 = src[so + 3] ^ x[xo + 3] ^ k[3]
    s4 = src[so + 4] ^ x[xo + 4] ^ k[4]
    s5 = src[so + 5] ^ x[xo + 5] ^ k[5]
    s6 = src[so + 6] ^ x[xo + 6] ^ k[6]
    s7 = src[so + 7] ^ x[xo + 7] ^ k[7]
    s8 = src[so + 8] ^ x[xo + 8] ^ k[8]
    s9 = src[so + 9] ^ x[xo + 9] ^ k[9]
    s10 = src[so + 10] ^ x[xo + 10] ^ k[10]
    s11 = src[so + 11] ^ x[xo + 11] ^ k[11]
    s12 = src[so + 12] ^ x[xo + 12] ^ k[12]
    s13 = src[so + 13] ^ x[xo + 13] ^ k[13]
    s14 = src[so + 14] ^ x[xo + 14] ^ k[14]
    s15 = src[so + 15] ^ x[xo + 15] ^ k[15]
    k = rks[1]
    t0 = S2[s0] ^ S3[s5] ^ S[s10] ^ S[s15] ^ k[0]
    t1 = S[s0] ^ S2[s5] ^ S3[s10] ^ S[s15] ^ k[1]
    t2 = S[s0] ^ S[s5] ^ S2[s10] ^ S3[s15] ^ k[2]
    t3 = S3[s0] ^ S[s5] ^ S[s10] ^ S2[s15] ^ k[3]
    t4 = S2[s4] ^ S3[s9] ^ S[s14] ^ S[s3] ^ k[4]
    t5 = S[s4] ^ S2[s9] ^ S3[s14] ^ S[s3] ^ k[5]
    t6 = S[s4] ^ S[s9] ^ S2[s14] ^ S3[s3] ^ k[6]
    t7 = S3[s4] ^ S[s9] ^ S[s14] ^ S2[s3] ^ k[7]
    t8 = S2[s8] ^ S3[s13] ^ S[s2] ^ S[s7] ^ k[8]
    t9 = S[s8] ^ S2[s13] ^ S3[s2] ^ S[s7] ^ k[9]
    t10 = S[s8] ^ S[s13] ^ S2[s2] ^ S3[s7] ^ k[10]
    t11 = S3[s8] ^ S[s13] ^ S[s2] ^ S2[s7] ^ k[11]
    t12 = S2[s12] ^ S3[s1] ^ S[s6] ^ S[s11] ^ k[12]
    t13 = S[s12] ^ S2[s1] ^ S3[s6] ^ S[s11] ^ k[13]
    t14 = S[s12] ^ S[s1] ^ S2[s6] ^ S3[s11] ^ k[14]
    t15 = S3[s12] ^ S[s1] ^ S[s6] ^ S2[s11] ^ k[15]
    i = 2
    while i < nr:
        k = rks[i]
        s0 = S2[t0] ^ S3[t5] ^ S[t10] ^ S[t15] ^ k[0]
        s1 = S[t0] ^ S2[t5] ^ S3[t10] ^ S[t15] ^ k[1]
        s2 = S[t0] ^ S[t5] ^ S2[t10] ^ S3[t15] ^ k[2]
        s3 = S3[t0] ^ S[t5] ^ S[t10] ^ S2[t15] ^ k[3]
        s4 = S2[t4] ^ S3[t9] ^ S[t14] ^ S[t3] ^ k[4]
        s5 = S[t4] ^ S2[t9] ^ S3[t14] ^ S[t3] ^ k[5]
        s6 = S[t4] ^ S[t9] ^ S2[t14] ^ S3[t3] ^ k[6]
        s7 = S3[t4] ^ S[t9] ^ S[t14] ^ S2[t3] ^ k[7]
        s8 = S2[t8] ^ S3[t13] ^ S[t2] ^ S[t7] ^ k[8]
        s9 = S[t8] ^ S2[t13] ^ S3[t2] ^ S[t7] ^ k[9]
        s10 = S[t8] ^ S[t13] ^ S2[t2] ^ S3[t7] ^ k[10]
        s11 = S3[t8] ^ S[t13] ^ S[t2] ^ S2[t7] ^ k[11]
        s12 = S2[t12] ^ S3[t1] ^ S[t6] ^ S[t11] ^ k[12]
        s13 = S[t12] ^ S2[t1] ^ S3[t6] ^ S[t11] ^ k[13]
        s14 = S[t12] ^ S[t1] ^ S2[t6] ^ S3[t11] ^ k[14]
        s15 = S3[t12] ^ S[t1] ^ S[t6] ^ S2[t11] ^ k[15]
        k = rks[i + 1]
        t0 = S2[s0] ^ S3[s5] ^ S[s10] ^ S[s15] ^ k[0]
        t1 = S[s0] ^ S2[s5] ^ S3[s10] ^ S[s15] ^ k[1]
        t2 = S[s0] ^ S[s5] ^ S2[s10] ^ S3[s15] ^ k[2]
        t3 = S3[s0] ^ S[s5] ^ S[s10] ^ S2[s15] ^ k[3]
        t4 = S2[s4] ^ S3[s9] ^ S[s14] ^ S[s3] ^ k[4]
        t5 = S[s4] ^ S2[s9] ^ S3[s14] ^ S[s3] ^ k[5]
        t6 = S[s4] ^ S[s9] ^ S2[s14] ^ S3[s3] ^ k[6]
        t7 = S3[s4] ^ S[s9] ^ S[s14] ^ S2[s3] ^ k[7]
        t8 = S2[s8] ^ S3[s13] ^ S[s2] ^ S[s7] ^ k[8]
        t9 = S[s8] ^ S2[s13] ^ S3[s2] ^ S[s7] ^ k[9]
        t10 = S[s8] ^ S[s13] ^ S2[s2] ^ S3[s7] ^ k[10]
        t11 = S3[s8] ^ S[s13] ^ S[s2] ^ S2[s7] ^ k[11]
        t12 = S2[s12] ^ S3[s1] ^ S[s6] ^ S[s11] ^ k[12]
        t13 = S[s12] ^ S2[s1] ^ S3[s6] ^ S[s11] ^ k[13]
        t14 = S[s12] ^ S[s1] ^ S2[s6] ^ S3[s11] ^ k[14]
        t15 = S3[s12] ^ S[s1] ^ S[s6] ^ S2[s11] ^ k[15]
        i += 2
    k = rks[nr]
    dst[do] = S[t0] ^ k[0]
    dst[do + 1] = S[t5] ^ k[1]
    dst[do + 2] = S[t10] ^ k[2]
    dst[do + 3] = S[t15] ^ k[3]
    dst[do + 4] = S[t4] ^ k[4]
    dst[do + 5] = S[t9] ^ k[5]
    dst[do + 6] = S[t14] ^ k[6]
    dst[do + 7] = S[t3] ^ k[7]
    dst[do + 8] = S[t8] ^ k[8]
    dst[do + 9] = S[t13] ^ k[9]
    dst[do + 10] = S[t2] ^ k[10]
    dst[do + 11] = S[t7] ^ k[11]
    dst[do + 12] = S[t12] ^ k[12]
    dst[do + 13] = S[t1] ^ k[13]
    dst[do + 14] = S[t6] ^ k[14]
    dst[do + 15] = S[t11] ^ k[15]


def _decrypt_block(src, so, x, dst, do, dks, nr):
    """dst[do:do+16] = D(src[so:so+16]) ^ x[0:16], then x[0:16] = the input
    block when x is a CBC chain (x is not _ZERO). FIPS-197 §5.3.5, the
    equivalent inverse cipher. dst may be src."""
    SI = _SI
    I9 = _I9
    I11 = _I11
    I13 = _I13
    I14 = _I14
    c0 = src[so]
    c1 = src[so + 1]
    c2 = src[so + 2]
    c3 = src[so + 3]
    c4 = src[so + 4]
    c5 = src[so + 5]
    c6 = src[so + 6]
    c7 = src[so + 7]
    c8 = src[so + 8]
    c9 = src[so + 9]
    c10 = src[so + 10]
    c11 = src[so + 11]
    c12 = src[so + 12]
    c13 = src[so + 13]
    c14 = src[so + 14]
    c15 = src[so + 15]
    k = dks[0]
    s0 = c0 ^ k[0]
    s1 = c1 ^ k[1]
    s2 = c2 ^ k[2]
    s3 = c3 ^ k[3]
    s4 = c4 ^ k[4]
    s5 = c5 ^ k[5]
    s6 = c6 ^ k[6]
    s7 = c7 ^ k[7]
    s8 = c8 ^ k[8]
    s9 = c9 ^ k[9]
    s10 = c10 ^ k[10]
    s11 = c11 ^ k[11]
    s12 = c12 ^ k[12]
    s13 = c13 ^ k[13]
    s14 = c14 ^ k[14]
    s15 = c15 ^ k[15]
    k = dks[1]
    t0 = I14[s0] ^ I11[s13] ^ I13[s10] ^ I9[s7] ^ k[0]
    t1 = I9[s0] ^ I14[s13] ^ I11[s10] ^ I13[s7] ^ k[1]
    t2 = I13[s0] ^ I9[s13] ^ I14[s10] ^ I11[s7] ^ k[2]
    t3 = I11[s0] ^ I13[s13] ^ I9[s10] ^ I14[s7] ^ k[3]
    t4 = I14[s4] ^ I11[s1] ^ I13[s14] ^ I9[s11] ^ k[4]
    t5 = I9[s4] ^ I14[s1] ^ I11[s14] ^ I13[s11] ^ k[5]
    t6 = I13[s4] ^ I9[s1] ^ I14[s14] ^ I11[s11] ^ k[6]
    t7 = I11[s4] ^ I13[s1] ^ I9[s14] ^ I14[s11] ^ k[7]
    t8 = I14[s8] ^ I11[s5] ^ I13[s2] ^ I9[s15] ^ k[8]
    t9 = I9[s8] ^ I14[s5] ^ I11[s2] ^ I13[s15] ^ k[9]
    t10 = I13[s8] ^ I9[s5] ^ I14[s2] ^ I11[s15] ^ k[10]
    t11 = I11[s8] ^ I13[s5] ^ I9[s2] ^ I14[s15] ^ k[11]
    t12 = I14[s12] ^ I11[s9] ^ I13[s6] ^ I9[s3] ^ k[12]
    t13 = I9[s12] ^ I14[s9] ^ I11[s6] ^ I13[s3] ^ k[13]
    t14 = I13[s12] ^ I9[s9] ^ I14[s6] ^ I11[s3] ^ k[14]
    t15 = I11[s12] ^ I13[s9] ^ I9[s6] ^ I14[s3] ^ k[15]
    i = 2
    while i < nr:
        k = dks[i]
        s0 = I14[t0] ^ I11[t13] ^ I13[t10] ^ I9[t7] ^ k[0]
        s1 = I9[t0] ^ I14[t13] ^ I11[t10] ^ I13[t7] ^ k[1]
        s2 = I13[t0] ^ I9[t13] ^ I14[t10] ^ I11[t7] ^ k[2]
        s3 = I11[t0] ^ I13[t13] ^ I9[t10] ^ I14[t7] ^ k[3]
        s4 = I14[t4] ^ I11[t1] ^ I13[t14] ^ I9[t11] ^ k[4]
        s5 = I9[t4] ^ I14[t1] ^ I11[t14] ^ I13[t11] ^ k[5]
        s6 = I13[t4] ^ I9[t1] ^ I14[t14] ^ I11[t11] ^ k[6]
        s7 = I11[t4] ^ I13[t1] ^ I9[t14] ^ I14[t11] ^ k[7]
        s8 = I14[t8] ^ I11[t5] ^ I13[t2] ^ I9[t15] ^ k[8]
        s9 = I9[t8] ^ I14[t5] ^ I11[t2] ^ I13[t15] ^ k[9]
        s10 = I13[t8] ^ I9[t5] ^ I14[t2] ^ I11[t15] ^ k[10]
        s11 = I11[t8] ^ I13[t5] ^ I9[t2] ^ I14[t15] ^ k[11]
        s12 = I14[t12] ^ I11[t9] ^ I13[t6] ^ I9[t3] ^ k[12]
        s13 = I9[t12] ^ I14[t9] ^ I11[t6] ^ I13[t3] ^ k[13]
        s14 = I13[t12] ^ I9[t9] ^ I14[t6] ^ I11[t3] ^ k[14]
        s15 = I11[t12] ^ I13[t9] ^ I9[t6] ^ I14[t3] ^ k[15]
        k = dks[i + 1]
        t0 = I14[s0] ^ I11[s13] ^ I13[s10] ^ I9[s7] ^ k[0]
        t1 = I9[s0] ^ I14[s13] ^ I11[s10] ^ I13[s7] ^ k[1]
        t2 = I13[s0] ^ I9[s13] ^ I14[s10] ^ I11[s7] ^ k[2]
        t3 = I11[s0] ^ I13[s13] ^ I9[s10] ^ I14[s7] ^ k[3]
        t4 = I14[s4] ^ I11[s1] ^ I13[s14] ^ I9[s11] ^ k[4]
        t5 = I9[s4] ^ I14[s1] ^ I11[s14] ^ I13[s11] ^ k[5]
        t6 = I13[s4] ^ I9[s1] ^ I14[s14] ^ I11[s11] ^ k[6]
        t7 = I11[s4] ^ I13[s1] ^ I9[s14] ^ I14[s11] ^ k[7]
        t8 = I14[s8] ^ I11[s5] ^ I13[s2] ^ I9[s15] ^ k[8]
        t9 = I9[s8] ^ I14[s5] ^ I11[s2] ^ I13[s15] ^ k[9]
        t10 = I13[s8] ^ I9[s5] ^ I14[s2] ^ I11[s15] ^ k[10]
        t11 = I11[s8] ^ I13[s5] ^ I9[s2] ^ I14[s15] ^ k[11]
        t12 = I14[s12] ^ I11[s9] ^ I13[s6] ^ I9[s3] ^ k[12]
        t13 = I9[s12] ^ I14[s9] ^ I11[s6] ^ I13[s3] ^ k[13]
        t14 = I13[s12] ^ I9[s9] ^ I14[s6] ^ I11[s3] ^ k[14]
        t15 = I11[s12] ^ I13[s9] ^ I9[s6] ^ I14[s3] ^ k[15]
        i += 2
    k = dks[nr]
    dst[do] = SI[t0] ^ k[0] ^ x[0]
    dst[do + 1] = SI[t13] ^ k[1] ^ x[1]
    dst[do + 2] = SI[t10] ^ k[2] ^ x[2]
    dst[do + 3] = SI[t7] ^ k[3] ^ x[3]
    dst[do + 4] = SI[t4] ^ k[4] ^ x[4]
    dst[do + 5] = SI[t1] ^ k[5] ^ x[5]
    dst[do + 6] = SI[t14] ^ k[6] ^ x[6]
    dst[do + 7] = SI[t11] ^ k[7] ^ x[7]
    dst[do + 8] = SI[t8] ^ k[8] ^ x[8]
    dst[do + 9] = SI[t5] ^ k[9] ^ x[9]
    dst[do + 10] = SI[t2] ^ k[10] ^ x[10]
    dst[do + 11] = SI[t15] ^ k[11] ^ x[11]
    dst[do + 12] = SI[t12] ^ k[12] ^ x[12]
    dst[do + 13] = SI[t9] ^ k[13] ^ x[13]
    dst[do + 14] = SI[t6] ^ k[14] ^ x[14]
    dst[do + 15] = SI[t3] ^ k[15] ^ x[15]
    if x is not _ZERO:
        x[0] = c0
        x[1] = c1
        x[2] = c2
        x[3] = c3
        x[4] = c4
        x[5] = c5
        x[6] = c6
        x[7] = c7
        x[8] = c8
        x[9] = c9
        x[10] = c10
        x[11] = c11
        x[12] = c12
        x[13] = c13
        x[14] = c14
        x[15] = c15
