"""microtun.xorbuf's two operations without native code, for aead.py
where the viper module cannot be used (CPython, a port without native
emitters, a .mpy of it built without the board's -march). The same bytes."""
from struct import pack_into


def xor(dst, doff, src, soff, n):
    """dst[doff:doff + n] ^= src[soff:soff + n] as big ints: C speed, but
    about 4n bytes of heap per call."""
    if n:
        dst[doff:doff + n] = (int.from_bytes(dst[doff:doff + n], "big") ^
                              int.from_bytes(memoryview(src)[soff:soff + n], "big")).to_bytes(n, "big")


def ctr(dst, off, nonce, k, end):
    """The CCM counter blocks A_0, A_1, .. (flags || nonce || i, RFC 3610
    §2.3) over dst[off:off + end]: pack_into for flags and nonce, not a
    slice per block (3x the instructions on a Cortex-M3), and the L-byte
    counter byte by byte (no bytes object per block)."""
    f = "B%ds" % k
    if not isinstance(nonce, bytes):
        nonce = bytes(nonce)    # CPython's "s" takes bytes only
    flags = 14 - k
    c = 0
    for o in range(off, off + end, 16):
        pack_into(f, dst, o, flags, nonce)
        v = c
        for j in range(o + 15, o + k, -1):
            dst[j] = v & 255
            v >>= 8
        c += 1
