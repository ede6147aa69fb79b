"""Erasure code for LOOPS segments: systematic Reed-Solomon over GF(2^8)
with a Cauchy matrix (any m of the k + m symbols that arrive rebuild the
rest, up to m missing data symbols).

    coder = Cauchy(k, m)
    parities = coder.encode([sym0, sym1, ...])          # m byte strings
    data = coder.decode({0: sym0, 2: sym2, ...}, {0: par0, ...}, n, length)

Symbols may differ in length; they are zero-padded to the longest (the
caller carries each symbol's real length inside it). Multiplying a symbol by
a field constant is one bytes.translate() with a 256-byte table, and adding
two symbols is one XOR of little-endian big ints (zero padding on the high
end does not change the value), so the per-byte work happens in C.

Field: GF(2^8) with the polynomial x^8 + x^4 + x^3 + x^2 + 1 (0x11D, as in
RFC 5510 §8.1 and most RS codes). Cauchy matrix C[j][i] = 1 / (x_j + y_i)
with x_j = 128 + j and y_i = i (RFC 5510 uses Vandermonde; a Cauchy matrix
keeps every square submatrix invertible, so every pattern of up to m
erasures decodes; Blomer et al., "An XOR-based erasure-resilient coding
scheme", 1995).
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
    """Cauchy matrix entry for parity j and data symbol i."""
    return inv((128 + j) ^ i)


def _invert(mat):
    """Inverse of a square matrix over GF(256) (Gauss-Jordan); the Cauchy
    submatrices passed here are always invertible."""
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


_ROWS = {}           # j -> [translate table for C[j][i], i = 0 .. K_MAX - 1]


def _row(j):
    r = _ROWS.get(j)
    if r is None:
        r = _ROWS[j] = [_table(coef(j, i)) for i in range(K_MAX)]
    return r


def encode(symbols, m):
    """m parity symbols (bytes, each as long as the longest symbol) for the
    data symbols (at most K_MAX, m at most M_MAX). Parity j is the XOR of
    C[j][i] * symbol i: one translate, one int.from_bytes and one XOR per
    symbol, the tables of row j made once (a PoP encodes a group every few
    tens of milliseconds per segment)."""
    n = len(symbols)
    if not 1 <= n <= K_MAX or not 1 <= m <= M_MAX:
        raise ValueError("FEC group of %d symbols with %d parities: expected 1..%d and 1..%d"
                         % (n, m, K_MAX, M_MAX))
    length = max(len(s) for s in symbols)
    frm = int.from_bytes
    out = []
    for j in range(m):
        acc = 0
        for s, t in zip(symbols, _row(j)):
            acc ^= frm(s.translate(t), "little")
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
    # P'_j = P_j + sum over known i of C[j][i] D_i  =  sum over missing i of C[j][i] D_i
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
