"""HMAC-SHA256 for the hop MAC (microtun/hop.py) in native code (viper),
with nothing allocated per MAC.

MicroPython's hashlib.sha256 has no copy() and a digest() ends the object,
so hop.py's portable HMAC makes two SHA-256 objects and two digests per MAC
(~384 bytes on a 32-bit board, plus the excerpt's slices: ~500 bytes per
packet sent or received; docs/MEMORY.md). Here a hop key's HMAC state is
its two midstates (SHA-256 after the key ^ ipad and the key ^ opad blocks,
RFC 2104), computed once by `keyed`; a MAC is then two compressions (the
portable HMAC does four): the <= 38-byte MAC input padded into one block
from the inner midstate, the inner digest padded into one block from the
outer midstate (FIPS 180-4). The MAC input is read straight from the packet
(header bytes 0..3, the payload's length, the excerpt) and the 8-byte MAC
written into it or compared with it, so the algorithm and the wire format
are hop.py's exactly (host_tests/test_hopmac.py checks them against
hashlib/hmac and the portable path).

All work happens in one module-level 96-byte buffer `_w` (the block, which
becomes the message schedule in place, and the working state): like the AEAD's buffers, not re-entrant (one
thread). Words are uint, masked to 32 bits where a right shift or rotation
follows, so the same code is right on 32- and 64-bit ports.

`@micropython.viper` needs the native emitter (frozen with the board's
-march, or compiled on the board from source). Where it is missing
(CPython, a port without native emitters, a .mpy of another -march or
none shipped) or the port is big-endian, importing this module fails and
hop.py keeps its hashlib HMAC: the same MACs, more heap per packet.
"""
__import__("micropython")   # on CPython an ImportError here; not bound: the decorators are the compiler's

if __import__("sys").byteorder != "little":
    raise ImportError("microtun.hopmac reads its constants as little-endian words")

# SHA-256's round constants K[0..63], then the initial hash value H(0)[0..7]
# (FIPS 180-4, 4.2.2 and 5.3.3), as 32-bit little-endian words
_K = (b"\x98\x2f\x8a\x42\x91\x44\x37\x71\xcf\xfb\xc0\xb5\xa5\xdb\xb5\xe9\x5b\xc2\x56\x39\xf1\x11\xf1\x59"
      b"\xa4\x82\x3f\x92\xd5\x5e\x1c\xab\x98\xaa\x07\xd8\x01\x5b\x83\x12\xbe\x85\x31\x24\xc3\x7d\x0c\x55"
      b"\x74\x5d\xbe\x72\xfe\xb1\xde\x80\xa7\x06\xdc\x9b\x74\xf1\x9b\xc1\xc1\x69\x9b\xe4\x86\x47\xbe\xef"
      b"\xc6\x9d\xc1\x0f\xcc\xa1\x0c\x24\x6f\x2c\xe9\x2d\xaa\x84\x74\x4a\xdc\xa9\xb0\x5c\xda\x88\xf9\x76"
      b"\x52\x51\x3e\x98\x6d\xc6\x31\xa8\xc8\x27\x03\xb0\xc7\x7f\x59\xbf\xf3\x0b\xe0\xc6\x47\x91\xa7\xd5"
      b"\x51\x63\xca\x06\x67\x29\x29\x14\x85\x0a\xb7\x27\x38\x21\x1b\x2e\xfc\x6d\x2c\x4d\x13\x0d\x38\x53"
      b"\x54\x73\x0a\x65\xbb\x0a\x6a\x76\x2e\xc9\xc2\x81\x85\x2c\x72\x92\xa1\xe8\xbf\xa2\x4b\x66\x1a\xa8"
      b"\x70\x8b\x4b\xc2\xa3\x51\x6c\xc7\x19\xe8\x92\xd1\x24\x06\x99\xd6\x85\x35\x0e\xf4\x70\xa0\x6a\x10"
      b"\x16\xc1\xa4\x19\x08\x6c\x37\x1e\x4c\x77\x48\x27\xb5\xbc\xb0\x34\xb3\x0c\x1c\x39\x4a\xaa\xd8\x4e"
      b"\x4f\xca\x9c\x5b\xf3\x6f\x2e\x68\xee\x82\x8f\x74\x6f\x63\xa5\x78\x14\x78\xc8\x84\x08\x02\xc7\x8c"
      b"\xfa\xff\xbe\x90\xeb\x6c\x50\xa4\xf7\xa3\xf9\xbe\xf2\x78\x71\xc6\x67\xe6\x09\x6a\x85\xae\x67\xbb"
      b"\x72\xf3\x6e\x3c\x3a\xf5\x4f\xa5\x7f\x52\x0e\x51\x8c\x68\x05\x9b\xab\xd9\x83\x1f\x19\xcd\xe0\x5b")

_w = bytearray(96)      # bytes 0..63 the block, then its words (the schedule, 16 at a time); words 16..23 state


@micropython.viper
def _compress(e: uint, a: uint, st, so: int, w):
    # one SHA-256 compression of the block at w[0:64] (big-endian bytes,
    # turned into the message schedule in place) into the 8 state words
    # st[so:so + 8] (ptr32 words). e and a come in as 0: the first two
    # locals, the arguments, are the ones viper keeps in registers in frozen
    # code, and these two are the most used (~5 % fewer instructions)
    s = ptr32(st)
    W = ptr32(w)
    b = ptr8(w)
    K = ptr32(_K)
    M = uint(0xFFFF) << 16 | uint(0xFFFF)
    i = 0
    while i < 16:
        o = 4 * i
        W[i] = (uint(b[o]) << 24) | (uint(b[o + 1]) << 16) | (uint(b[o + 2]) << 8) | uint(b[o + 3])
        i += 1
    # ptr32 loads are 32-bit clean; a and e are masked where sums make them,
    # the other words are copies of them
    a = uint(s[so])
    bb = uint(s[so + 1])
    c = uint(s[so + 2])
    d = uint(s[so + 3])
    e = uint(s[so + 4])
    f = uint(s[so + 5])
    g = uint(s[so + 6])
    h = uint(s[so + 7])
    i = 0
    while i < 64:
        j = i & 15
        if i >= 16:     # W[i] over W[i - 16]: the schedule as a ring of 16 words
            x = uint(W[(i + 1) & 15])       # W[i - 15]
            y = uint(W[(i + 14) & 15])      # W[i - 2]
            W[j] = uint(W[j]) + (((x >> 7) | (x << 25)) ^ ((x >> 18) | (x << 14)) ^ (x >> 3)) + \
                uint(W[(i + 9) & 15]) + (((y >> 17) | (y << 15)) ^ ((y >> 19) | (y << 13)) ^ (y >> 10))
        t1 = h + (((e >> 6) | (e << 26)) ^ ((e >> 11) | (e << 21)) ^ ((e >> 25) | (e << 7))) + \
            (g ^ (e & (f ^ g))) + uint(K[i]) + uint(W[j])
        h = g
        g = f
        f = e
        e = (d + t1) & M
        d = c
        c = bb
        bb = a
        a = (t1 + (((a >> 2) | (a << 30)) ^ ((a >> 13) | (a << 19)) ^ ((a >> 22) | (a << 10))) +
             ((a & c) | (d & (a | c)))) & M
        i += 1
    s[so] = uint(s[so]) + a
    s[so + 1] = uint(s[so + 1]) + bb
    s[so + 2] = uint(s[so + 2]) + c
    s[so + 3] = uint(s[so + 3]) + d
    s[so + 4] = uint(s[so + 4]) + e
    s[so + 5] = uint(s[so + 5]) + f
    s[so + 6] = uint(s[so + 6]) + g
    s[so + 7] = uint(s[so + 7]) + h


@micropython.viper
def _keyed(st, key, w):
    # st[0:32], st[32:64]: SHA-256's state after the block key ^ ipad, key ^ opad
    s = ptr32(st)
    k = ptr8(key)
    b = ptr8(w)
    K = ptr32(_K)
    so = 0
    pad = 0x36
    while so < 16:
        i = 0
        while i < 8:
            s[so + i] = K[64 + i]
            i += 1
        i = 0
        while i < 64:
            b[i] = (k[i] if i < 32 else 0) ^ pad
            i += 1
        _compress(0, 0, st, so, w)
        so += 8
        pad = 0x5C


def keyed(key):
    """The HMAC state of a 32-byte key: 64 bytes, both midstates."""
    st = bytearray(64)
    _keyed(st, key, _w)
    return st


@micropython.viper
def _mac(st, pkt, n: int, check: int, w) -> int:
    s = ptr32(st)
    p = ptr8(pkt)
    b = ptr8(w)
    x = ptr32(w)
    # the MAC input (hop.py): header[0:4] || len(payload) as 2 bytes BE ||
    # the excerpt (the payload if <= 32 bytes, else its first and last 16),
    # padded into one block (its length in bits counts the 64-byte key block)
    b[0] = p[0]
    b[1] = p[1]
    b[2] = p[2]
    b[3] = p[3]
    b[4] = n >> 8
    b[5] = n & 0xFF
    i = 0
    if n <= 32:
        while i < n:
            b[6 + i] = p[12 + i]
            i += 1
        ln = 6 + n
    else:
        while i < 16:
            b[6 + i] = p[12 + i]
            b[22 + i] = p[n - 4 + i]
            i += 1
        ln = 38
    b[ln] = 0x80
    i = ln + 1
    while i < 62:
        b[i] = 0
        i += 1
    bits = (64 + ln) * 8
    b[62] = bits >> 8
    b[63] = bits & 0xFF
    i = 0
    while i < 8:
        x[16 + i] = s[i]
        i += 1
    _compress(0, 0, w, 16, w)
    # outer: H(key ^ opad || inner digest)
    i = 0
    while i < 8:
        v = uint(x[16 + i])
        b[4 * i] = v >> 24
        b[1 + 4 * i] = (v >> 16) & 0xFF
        b[2 + 4 * i] = (v >> 8) & 0xFF
        b[3 + 4 * i] = v & 0xFF
        x[16 + i] = s[8 + i]
        i += 1
    b[32] = 0x80
    i = 33
    while i < 62:
        b[i] = 0
        i += 1
    b[62] = 3      # (64 + 32) * 8 = 768 bits
    b[63] = 0
    _compress(0, 0, w, 16, w)
    # the MAC: the first 8 bytes of the digest, into packet[4:12] or compared with them
    r = 0
    i = 0
    while i < 8:
        v = uint(x[16 + (i >> 2)])
        m = int((v >> (24 - 8 * (i & 3))) & 0xFF)
        if check:
            r = r | (m ^ p[4 + i])
        else:
            p[4 + i] = m
        i += 1
    return r


def seal(st, pkt, n):
    """Write the hop MAC of pkt (its header bytes 0..3 set, n bytes of
    payload from byte 12) into pkt[4:12]."""
    _mac(st, pkt, n, 0, _w)


def verify(st, pkt, n):
    """True when pkt[4:12] is the hop MAC of pkt (n bytes of payload);
    constant time in the MAC's bytes."""
    return _mac(st, pkt, n, 1, _w) == 0
