"""dst[doff:doff + n] ^= src[soff:soff + n] in place, in native code.

aead.py's CCM XORs the key stream into a packet with this instead of
building big ints of the whole packet (about 4 x its size in heap per seal
or open, and 40 K Cortex-M3 instructions; docs/MEMORY.md). Offsets instead
of slices: no memoryview object per call. A word at a time when both ends
are 4-byte aligned (ARMv6-M and Xtensa fault on unaligned words), else a
byte at a time.

`@micropython.viper` needs the native emitter: compiled on the board from
this source, or by mpy-cross/the freeze step with the board's -march.
Where that is missing (CPython, a port without native emitters, a .mpy
built without -march, so "invalid arch"), importing this module fails and
aead.py keeps its big-int XOR: the same bytes, more heap.
"""
import micropython


@micropython.viper
def xor(dst, doff: int, src, soff: int, n: int):
    d = ptr8(dst)
    s = ptr8(src)
    i = 0
    if ((int(d) + doff) | (int(s) + soff)) & 3 == 0:
        dw = ptr32(int(d) + doff)
        sw = ptr32(int(s) + soff)
        k = n >> 2
        while i < k:
            dw[i] = dw[i] ^ sw[i]
            i += 1
        i = k << 2
    while i < n:
        d[doff + i] = d[doff + i] ^ s[soff + i]
        i += 1


@micropython.viper
def stamp(dst, src, k: int, end: int):
    # dst[o:o + k] = src[0:k] for o = 1, 17, 33, .. < end: the nonce into
    # every CCM counter block (pack_into per block is ~1.3K instructions).
    d = ptr8(dst)
    s = ptr8(src)
    o = 1
    while o < end:
        i = 0
        while i < k:
            d[o + i] = s[i]
            i += 1
        o += 16
