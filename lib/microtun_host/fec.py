"""Erasure code for LOOPS segments: systematic Reed-Solomon over GF(2^8)
with a Cauchy matrix (any m of the k + m symbols that arrive rebuild the
rest, up to m missing data symbols).

    parities = encode([sym0, sym1, ...], m)             # m byte strings
    rebuilt = decode({0: sym0, 2: sym2, ...}, {0: par0, ...}, n, length)   # {1: sym1}

Symbols may differ in length; they are zero-padded to the longest (the
caller carries each symbol's real length inside it). A symbol is handled as
one little-endian big int (zero padding on the high end does not change the
value), so the per-byte work happens in C: adding two symbols is one XOR.

Field: GF(2^8) with the polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11D, as in
RFC 5510 §8.1 and most RS codes).

Matrix. Parity j (j < M_MAX) of data symbols D_0 .. D_{n-1} (n <= K_MAX) is
P_j = sum over i of E[j][i] * D_i, with

    E[j][i] = C[j][i] * C[0][0] / (C[0][i] * C[j][0])
            = (128 + i)(128 + j) / ((128 + (i ^ j)) * 128)     (products in the field)

where C[j][i] = 1 / (x_j + y_i), x_j = 128 + j, y_i = i, is a Cauchy
matrix: every square submatrix of a Cauchy matrix is invertible, so every
pattern of up to m erasures decodes (Blomer et al., "An XOR-based
erasure-resilient coding scheme", 1995; RFC 5510 uses Vandermonde
instead). E is C with its rows and columns scaled by non-zero constants
(E = diag(1/C[j][0]) C diag(C[0][0]/C[0][i])), which keeps every square
submatrix invertible (its determinant is the Cauchy one times non-zero
factors), and makes row 0 and column 0 all ones: parity 0 is the plain XOR
of the symbols, and symbol 0 enters every parity as it is.

Encoding without tables: c * D for a field constant c is the XOR of
2^b * D over the bits b of c, and 2 * D for every byte of a big int at
once is a shift, two masks and a multiplication by 0x1D (xtime). So parity
j is computed by Horner's rule over the 8 bit positions: P = 2 * P + (XOR
of the symbols whose coefficient has bit b), b = 7 .. 0: about 4 XORs per
symbol and 7 xtimes per parity, on ints made once per symbol (parity 0
reuses them). Decoding (rare: only when something was lost) multiplies with
one bytes.translate() per term (a 256-byte table per constant).
"""

_POLY = 0x11D
K_MAX = 128          # data symbols per group (y_i = i < 128)
M_MAX = 16           # parity symbols per group (x_j = 128 + j)

_EXP = bytearray(512)
_LOG = bytearray(256)
_x = 1
for _i in range(255):
    _EXP[_i] = _x
    _LOG[_x] = _i
    _x <<= 1
    if _x & 0x100:
        _x ^= _POLY
for _i in range(255, 512):
    _EXP[_i] = _EXP[_i - 255]

_TABLES = {}         # c -> 256-byte translate table for "multiply by c"


def mul(a, b):
    if a == 0 or b == 0:
        return 0
    return _EXP[_LOG[a] + _LOG[b]]


def inv(a):
    if a == 0:
        raise ZeroDivisionError("0 has no inverse in GF(256)")
    return _EXP[255 - _LOG[a]]


def _table(c):
    t = _TABLES.get(c)
    if t is None:
        t = _TABLES[c] = bytes(mul(c, v) for v in range(256))
    return t


def scale(c, sym):
    """c * sym as a little-endian int (0 for c == 0)."""
    if c == 0:
        return 0
    if c == 1:
        return int.from_bytes(sym, "little")
    return int.from_bytes(sym.translate(_table(c)), "little")


def coef(j, i):
    """Matrix entry E[j][i] for parity j and data symbol i (the module doc:
    the Cauchy matrix scaled so row 0 and column 0 are all ones)."""
    return mul(mul(128 ^ i, 128 ^ j), inv(mul(128 ^ j ^ i, 128)))


def _invert(mat):
    """Inverse of a square matrix over GF(256) (Gauss-Jordan); the square
    submatrices of E passed here are always invertible."""
    n = len(mat)
    a = [list(row) + [1 if r == c else 0 for c in range(n)] for r, row in enumerate(mat)]
    for col in range(n):
        piv = next(r for r in range(col, n) if a[r][col])
        a[col], a[piv] = a[piv], a[col]
        f = inv(a[col][col])
        a[col] = [mul(f, v) for v in a[col]]
        for r in range(n):
            if r != col and a[r][col]:
                g = a[r][col]
                a[r] = [v ^ mul(g, w) for v, w in zip(a[r], a[col])]
    return [row[n:] for row in a]


_PLANES = {}         # j -> [[i whose E[j][i] has bit b, i = 0 .. K_MAX - 1] for b = 7 .. 0]
_MASKS = [0, 0, 0]   # [bytes covered, bit 0 of every byte, bits 1..7 of every byte] (xtime's masks)


def _masks(length):
    if length > _MASKS[0]:
        n = max(length, 2048)
        _MASKS[:] = [n, int.from_bytes(b"\x01" * n, "little"), int.from_bytes(b"\xfe" * n, "little")]
    return _MASKS[1], _MASKS[2]


def _planes(j):
    p = _PLANES.get(j)
    if p is None:
        row = [coef(j, i) for i in range(K_MAX)]
        p = _PLANES[j] = [[i for i in range(K_MAX) if row[i] >> b & 1] for b in range(7, -1, -1)]
    return p


def encode(symbols, m):
    """m parity symbols (bytes, each as long as the longest symbol) for the
    data symbols (at most K_MAX, m at most M_MAX).
    Parity 0 is the XOR of the symbols' ints; parity j > 0 Horner's rule
    over the bit positions of row j (the module doc). A PoP encodes a group
    every few tens of milliseconds per segment."""
    n = len(symbols)
    if not 1 <= n <= K_MAX or not 1 <= m <= M_MAX:
        raise ValueError("FEC group of %d symbols with %d parities: expected 1..%d and 1..%d"
                         % (n, m, K_MAX, M_MAX))
    length = max(len(s) for s in symbols)
    frm = int.from_bytes
    ints = [frm(s, "little") for s in symbols]
    acc = 0
    for x in ints:
        acc ^= x
    out = [acc.to_bytes(length, "little")]
    ones, high7 = _masks(length)
    for j in range(1, m):
        acc = 0
        for plane in _planes(j):
            if acc:
                acc = ((acc << 1) & high7) ^ (((acc >> 7) & ones) * 0x1D)     # 2 * acc, every byte
            for i in plane:
                if i >= n:
                    break
                acc ^= ints[i]
        out.append(acc.to_bytes(length, "little"))
    return out


def decode(data, parities, n, length):
    """The missing data symbols {i: bytes (length long)} of a group of n,
    from the data symbols that arrived {i: bytes} and the parities that
    arrived {j: bytes}; None if too many are missing (more than parities)."""
    missing = [i for i in range(n) if i not in data]
    if not missing:
        return {}
    if len(missing) > len(parities):
        return None
    rows = sorted(parities)[:len(missing)]
    # P'_j = P_j + sum over known i of E[j][i] D_i  =  sum over missing i of E[j][i] D_i
    rhs = []
    for j in rows:
        acc = int.from_bytes(parities[j], "little")
        for i, s in data.items():
            acc ^= scale(coef(j, i), s)
        rhs.append(acc.to_bytes(length, "little"))
    invm = _invert([[coef(j, i) for i in missing] for j in rows])
    out = {}
    for t, i in enumerate(missing):
        acc = 0
        for u in range(len(rows)):
            acc ^= scale(invm[t][u], rhs[u])
        out[i] = acc.to_bytes(length, "little")
    return out
