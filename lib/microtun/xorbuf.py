"""dst[doff:doff + n] ^= src[soff:soff + n] in place, and the CCM counter
blocks, in native code.

aead.py's CCM XORs the key stream into a packet with this instead of
building big ints of the whole packet (about 4 x its size in heap per seal
or open, and 40 K Cortex-M3 instructions; docs/MEMORY.md), and writes the
counter blocks into the buffer the ECB call then encrypts in place (a
struct.pack_into per block is ~1.3K instructions). Offsets instead
of slices: no memoryview object per call. A word at a time when both ends
are 4-byte aligned (ARMv6-M and Xtensa fault on unaligned words), else a
byte at a time.

`@micropython.viper` needs the native emitter: compiled on the board from
this source, or by mpy-cross/the freeze step with the board's -march.
Where that is missing (CPython, a port without native emitters, a .mpy
built without -march, so "invalid arch"), importing this module fails and
aead.py keeps its big-int XOR: the same bytes, more heap.
"""
__import__("micropython")   # on CPython an ImportError here; not bound: the decorators are the compiler's


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
def ctr(dst, off: int, src, k: int, end: int):
    # The CCM counter blocks A_0, A_1, .. (RFC 3610 §2.3) over
    # dst[off:off + end]: block i = flags (14 - k) || src[0:k] (the k-byte
    # nonce) || i in 15 - k bytes, big-endian. Every message writes them
    # over the CBC-MAC input, and the ECB call encrypts them in place.
    # A_0 byte by byte, then, where the blocks are 4-byte aligned, each
    # next one as A_0's four words with i in the last one: i < 2**24 here,
    # and every native emitter's target is little-endian, so the word is
    # A_0's | i byte-swapped (i's bytes land where A_0 has zeros).
    d = ptr8(int(ptr8(dst)) + off)
    s = ptr8(src)
    d[0] = 14 - k
    i = 0
    while i < k:
        d[1 + i] = s[i]
        i += 1
    i += 1
    while i < 16:
        d[i] = 0
        i += 1
    c = 1
    if int(d) & 3 == 0:
        w = ptr32(d)
        a0 = w[0]
        a1 = w[1]
        a2 = w[2]
        a3 = w[3]
        o = 4
        e = end >> 2
        while o < e:
            w[o] = a0
            w[o + 1] = a1
            w[o + 2] = a2
            w[o + 3] = a3 | (c << 24) | ((c << 8) & 0xFF0000) | ((c >> 8) & 0xFF00)
            c += 1
            o += 4
        return
    o = 16
    while o < end:
        i = 0
        while i <= k:
            d[o + i] = d[i]
            i += 1
        v = c
        i = 15
        while i > k:
            d[o + i] = v
            v = v >> 8
            i -= 1
        c += 1
        o += 16
