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


def stamp(ctr, nonce, k, end):
    """The k-byte nonce into every CCM counter block (at 1, 17, .. < end):
    pack_into, not a slice per block (3x the instructions on a Cortex-M3)."""
    f = "%ds" % k
    if not isinstance(nonce, bytes):
        nonce = bytes(nonce)    # CPython's "s" takes bytes only
    for o in range(1, end, 16):
        pack_into(f, ctr, o, nonce)
