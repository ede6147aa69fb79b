"""Ed25519 signature verification (RFC 8032 §5.1.7) with big ints, and the
SHA-512 it needs (FIPS 180-4 §6.4) for ports whose hashlib has none.

    from microtun.ed25519 import verify
    ok = verify(public_key_32, message, signature_64)     # True / False, never raises on bad input

Used once per code update to check the operator's signature on a release
manifest (microtun.update, docs/UPDATE.md); nothing here runs while the
tunnel runs, and the module is imported only by an update. Verification
only: a device never signs. MicroPython's hashlib has md5, sha1 and sha256
but no sha512 (checked on the unix port v1.29), so SHA-512 is written out
here; the messages are short (the manifest's SHA-256 digest with a prefix),
so it hashes two blocks.

Not constant time, and need not be: everything verified is public (key,
message, signature).

Cofactorless check [S]B == R + [k]A by encoding the left side minus [k]A
and comparing it with R's bytes, as RFC 8032 §5.1.7 allows ("sufficient,
but not required"); the group equation is then exactly the one the
`cryptography` package (OpenSSL) checks, so a signature it makes verifies
here and a test compares the two on many random keys and messages.
"""
if __import__("sys").implementation.name != "micropython":
    def const(x):   # CPython; MicroPython's compiler folds const() with no name bound (a global costs a board heap)
        return x

_P = const(2**255 - 19)
_L = const(2**252 + 27742317777372353535851937790883648493)   # group order, RFC 8032 §5.1
_M64 = const(0xFFFFFFFFFFFFFFFF)

# d = -121665 / 121666 mod p; sqrt(-1) = 2^((p-1)/4) mod p (RFC 8032 §5.1)
_D = -121665 * pow(121666, _P - 2, _P) % _P
_D2 = 2 * _D % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


# -- SHA-512 (FIPS 180-4) -----------------------------------------------------------
_K = None


def _k():
    global _K
    if _K is None:
        # the first 64 bits of the fractional parts of the cube roots of the first 80 primes
        _K = [int(h, 16) for h in (
            "428a2f98d728ae22 7137449123ef65cd b5c0fbcfec4d3b2f e9b5dba58189dbbc 3956c25bf348b538 "
            "59f111f1b605d019 923f82a4af194f9b ab1c5ed5da6d8118 d807aa98a3030242 12835b0145706fbe "
            "243185be4ee4b28c 550c7dc3d5ffb4e2 72be5d74f27b896f 80deb1fe3b1696b1 9bdc06a725c71235 "
            "c19bf174cf692694 e49b69c19ef14ad2 efbe4786384f25e3 0fc19dc68b8cd5b5 240ca1cc77ac9c65 "
            "2de92c6f592b0275 4a7484aa6ea6e483 5cb0a9dcbd41fbd4 76f988da831153b5 983e5152ee66dfab "
            "a831c66d2db43210 b00327c898fb213f bf597fc7beef0ee4 c6e00bf33da88fc2 d5a79147930aa725 "
            "06ca6351e003826f 142929670a0e6e70 27b70a8546d22ffc 2e1b21385c26c926 4d2c6dfc5ac42aed "
            "53380d139d95b3df 650a73548baf63de 766a0abb3c77b2a8 81c2c92e47edaee6 92722c851482353b "
            "a2bfe8a14cf10364 a81a664bbc423001 c24b8b70d0f89791 c76c51a30654be30 d192e819d6ef5218 "
            "d69906245565a910 f40e35855771202a 106aa07032bbd1b8 19a4c116b8d2d0c8 1e376c085141ab53 "
            "2748774cdf8eeb99 34b0bcb5e19b48a8 391c0cb3c5c95a63 4ed8aa4ae3418acb 5b9cca4f7763e373 "
            "682e6ff3d6b2b8a3 748f82ee5defb2fc 78a5636f43172f60 84c87814a1f0ab72 8cc702081a6439ec "
            "90befffa23631e28 a4506cebde82bde9 bef9a3f7b2c67915 c67178f2e372532b ca273eceea26619c "
            "d186b8c721c0c207 eada7dd6cde0eb1e f57d4f7fee6ed178 06f067aa72176fba 0a637dc5a2c898a6 "
            "113f9804bef90dae 1b710b35131c471b 28db77f523047d84 32caab7b40c72493 3c9ebe0a15c9bebc "
            "431d67c49c100d4c 4cc5d4becb3e42b6 597f299cfc657e2a 5fcb6fab3ad6faec 6c44198c4a475817"
        ).split()]
    return _K


def _rotr(x, n):
    return ((x >> n) | (x << (64 - n))) & _M64


def sha512(data):
    """SHA-512 of bytes: the 64-byte digest (hashlib's where the port has it)."""
    try:
        import hashlib
        return hashlib.sha512(data).digest()
    except (ImportError, AttributeError):
        pass
    k = _k()
    h = [0x6a09e667f3bcc908, 0xbb67ae8584caa73b, 0x3c6ef372fe94f82b, 0xa54ff53a5f1d36f1,
         0x510e527fade682d1, 0x9b05688c2b3e6c1f, 0x1f83d9abfb41bd6b, 0x5be0cd19137e2179]
    n = len(data)
    msg = bytes(data) + b"\x80" + bytes((111 - n) % 128) + (n * 8).to_bytes(16, "big")
    w = [0] * 80
    for off in range(0, len(msg), 128):
        for i in range(16):
            w[i] = int.from_bytes(msg[off + 8 * i:off + 8 * i + 8], "big")
        for i in range(16, 80):
            a, b = w[i - 15], w[i - 2]
            s0 = _rotr(a, 1) ^ _rotr(a, 8) ^ (a >> 7)
            s1 = _rotr(b, 19) ^ _rotr(b, 61) ^ (b >> 6)
            w[i] = (w[i - 16] + s0 + w[i - 7] + s1) & _M64
        a, b, c, d, e, f, g, hh = h
        for i in range(80):
            t1 = (hh + (_rotr(e, 14) ^ _rotr(e, 18) ^ _rotr(e, 41)) + ((e & f) ^ (~e & g & _M64))
                  + k[i] + w[i]) & _M64
            t2 = ((_rotr(a, 28) ^ _rotr(a, 34) ^ _rotr(a, 39)) + ((a & b) ^ (a & c) ^ (b & c))) & _M64
            hh, g, f, e, d, c, b, a = g, f, e, (d + t1) & _M64, c, b, a, (t1 + t2) & _M64
        h = [(x + y) & _M64 for x, y in zip(h, (a, b, c, d, e, f, g, hh))]
    return b"".join(x.to_bytes(8, "big") for x in h)


# -- the curve, extended coordinates (X, Y, Z, T), x = X/Z, y = Y/Z, xy = T/Z ----------------
def _add(p, q):
    """Point addition on -x^2 + y^2 = 1 + d x^2 y^2 ("add-2008-hwcd-3";
    complete, so it doubles too)."""
    x1, y1, z1, t1 = p
    x2, y2, z2, t2 = q
    a = (y1 - x1) * (y2 - x2) % _P
    b = (y1 + x1) * (y2 + x2) % _P
    c = t1 * _D2 * t2 % _P
    d = 2 * z1 * z2 % _P
    e, f, g, h = b - a, d - c, d + c, b + a
    return (e * f % _P, g * h % _P, f * g % _P, e * h % _P)


_ZERO = (0, 1, 1, 0)


def _decode(s):
    """A point from its 32-byte encoding (RFC 8032 §5.1.3), or None."""
    if len(s) != 32:
        return None
    y = int.from_bytes(s, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    if y >= _P:
        return None
    u = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P
    # x = u v^3 (u v^7)^((p-5)/8)
    x = u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P) % _P
    vxx = v * x * x % _P
    if vxx != u:
        if vxx != (-u) % _P:
            return None
        x = x * _SQRT_M1 % _P
    if x == 0 and sign:
        return None
    if x & 1 != sign:
        x = _P - x
    return (x, y, 1, x * y % _P)


def _encode(p):
    x, y, z, _ = p
    zi = pow(z, _P - 2, _P)
    x = x * zi % _P
    y = y * zi % _P
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


_B = None


def _base():
    global _B
    if _B is None:
        y = 4 * pow(5, _P - 2, _P) % _P
        _B = _decode(y.to_bytes(32, "little"))
    return _B


def verify(public, msg, sig):
    """True if sig (64 bytes) is public's (32 bytes) Ed25519 signature of
    msg; False for any bad input (wrong lengths, a key or R that is not a
    point, S out of range, a signature that does not match)."""
    if not isinstance(public, (bytes, bytearray)) or not isinstance(sig, (bytes, bytearray)):
        return False
    if len(public) != 32 or len(sig) != 64:
        return False
    a = _decode(bytes(public))
    if a is None or _decode(bytes(sig[:32])) is None:
        return False
    s = int.from_bytes(sig[32:], "little")
    if s >= _L:
        return False
    k = int.from_bytes(sha512(bytes(sig[:32]) + bytes(public) + bytes(msg)), "little") % _L
    # [s]B - [k]A by one double-and-add over both scalars (Straus)
    neg_a = ((_P - a[0]) % _P, a[1], a[2], (_P - a[3]) % _P)
    b = _base()
    both = _add(b, neg_a)
    acc = _ZERO
    for i in range(255, -1, -1):
        acc = _add(acc, acc)
        bit_s = (s >> i) & 1
        bit_k = (k >> i) & 1
        if bit_s and bit_k:
            acc = _add(acc, both)
        elif bit_s:
            acc = _add(acc, b)
        elif bit_k:
            acc = _add(acc, neg_a)
    return _encode(acc) == bytes(sig[:32])
