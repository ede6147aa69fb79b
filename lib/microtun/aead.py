"""AES-CCM authenticated encryption (RFC 3610, NIST SP 800-38C) on
MicroPython's cryptolib.

The tunnel uses `AEAD`: AES-256-CCM, 12-byte nonce (so L = 3: messages up to
2**24 - 1 bytes), 16-byte tag. `CCM` is the general construction (nonces of
7..13 bytes, tags of 4..16) that AEAD specialises and the RFC 3610 / SP
800-38C vectors test. Both take 16-byte (AES-128) keys too.

cryptolib has ECB and CBC but no CTR on any board port, and GHASH is far too
slow in Python, so CCM it is, with exactly two AES calls per message
(docs/CRYPTO.md):

  CBC-MAC  ONE CBC call over B0 || encoded aad || message, each zero-padded
           to whole blocks; the tag T comes from the last block (§2.2).
  CTR      the counter blocks A_0 .. A_n (§2.3) written into the work
           buffer, then ONE ECB call encrypting them in place; then
           (P || T) ^ (S_1 .. || S_0) gives ciphertext || tag, XORed into
           the key stream in place. Both by microtun.xorbuf (viper: native
           code) where the port has it, else by microtun.xorbig in Python
           (the XOR as big ints: about 4x the message in heap per call;
           the same bytes).

Both cryptolib objects are made per message (a CBC one chains across
calls): two key expansions in C per message instead of about 300 bytes of
heap per AEAD for as long as it lives (a device keeps up to six: on the
32-bit frozen build the endpoint's minimum heap is 1K smaller for it,
docs/MEMORY.md).

Packets without copies: `seal(..., head=h, lead=l)` returns
h || ciphertext || tag for the plaintext l || plaintext, and
`open(..., start=s, lead=buf)` decrypts data[s:] and writes the first
len(buf) plaintext bytes into buf. A transport packet's header and channel
byte so never cost a concatenation or a slice of the whole packet: the
XOR that makes the ciphertext makes the packet in the work buffer, and the
bytes returned are the one allocation of its size (docs/MEMORY.md).

Work happens in one buffer shared by every CCM object, grown to the
largest message seen (the CBC-MAC input, then the counter blocks and the
key stream over it: both AES calls work in place), and a 16-byte one that
keeps X (seal) or S_0 ^ the tag received (open) while the other is
overwritten, so that no message allocates more than its result, its two
cryptolib objects and a few views: seal and open are not re-entrant (one
thread).

Only the board's cryptolib is imported here. Where it is missing (CPython, a
port built without it) or a backend is named, microtun.ccm_backends supplies
one: on CPython by default cryptography's AESCCM (same bytes, C speed; the
object then belongs to a subclass whose seal and open call it, so that
this module's code is only what a board runs), which is how the host tests
prove every path agrees byte for byte.
"""
if __import__("sys").implementation.name != "micropython":
    def const(x):   # CPython; MicroPython's compiler folds const() with no name bound (a global costs a board heap)
        return x

from struct import pack_into

try:
    from microtun.xorbuf import xor as _xor, ctr as _ctr  # native code
    XOR = "viper"
except (ImportError, SyntaxError, ValueError):
    # CPython; a port without native emitters (SyntaxError compiling the
    # viper source); a .mpy of another -march (ValueError) or none shipped:
    # the same two operations in Python (its own module: no heap for that
    # code where the native one is used), the same bytes.
    from microtun.xorbig import xor as _xor, ctr as _ctr
    XOR = "big-int"


BYTES = (bytes, bytearray, memoryview)   # what the API takes (endpoint.py checks payloads with it)
_ZERO16 = const(b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")  # (frozen: in flash)
_GROW = const(64)  # buffers grow in steps of this many bytes
_SHORT = const(32)  # a message of up to this many bytes is sealed with one cryptolib object (_stream)
# memoryview: CBC-MAC input, then the counter blocks, encrypted in place
# into the key stream, XORed into head || C || T. Made at import, big enough
# for an INIT's seals and a 64-byte packet (128 bytes; it grows for larger
# messages): where the module's objects are, low in a board's heap. Made at
# the first seal, it was made during the first handshake, among that
# handshake's garbage, and stayed there for good, splitting the free space
# the handshakes after it need (docs/MEMORY.md, "Handshakes under a session").
_work = memoryview(bytearray(2 * _GROW))
_t = bytearray(16)  # seal: X while the key stream is made; open: S_0 ^ the tag received


# Slices through two small functions that stay bytecode on every build
# (`# bytecode`: microtun_host.flash.native_source leaves them): a frozen
# build compiles this module to native code, whose frames are on the C
# stack, not in the heap a handshake's cryptolib objects need; but native
# code makes a heap slice object (16 B) for each a[i:j], where bytecode
# makes it on the C stack (docs/MEMORY.md).
def _put(data, start, end, value):  # bytecode
    data[start:end] = value


def _view(data, start, end):  # bytecode
    return data[start:end]


class CCM:
    """CCM with `nonce_size`-byte nonces (7..13) and `tag_size`-byte tags
    (4, 6, .., 16). backend: None takes the fastest available (cryptolib on
    a board, AESCCM on CPython), or one of microtun.ccm_backends.BACKENDS."""
    backend = "cryptolib"  # the path in use (tests and benchmarks read it)
    # _make: a cryptolib-style aes(key, mode[, iv]) constructor, the board's
    # (imported into the class, not the module: a global costs a board heap)
    try:
        from cryptolib import aes as _make
    except ImportError:
        try:
            from ucryptolib import aes as _make  # MicroPython before v1.21
        except ImportError:
            _make = None  # CPython, or a port without cryptolib: ccm_backends
    # nonce_size, tag_size and _b0 (B0's flags byte, RFC 3610 §2.2; 64 is
    # added when there is aad): per object, unless the class fixes them
    # (AEAD's are class attributes: ~100 bytes less per object on a board;
    # CCM's own class has none, so its table stays under 12 entries)

    def __init__(self, key, nonce_size, tag_size, backend=None):
        if not isinstance(key, BYTES) or len(key) not in (16, 32):
            raise ValueError("AES-CCM key must be 16 or 32 bytes")
        if not 7 <= nonce_size <= 13 or tag_size not in (4, 6, 8, 10, 12, 14, 16):
            raise ValueError("CCM needs a 7..13-byte nonce and a 4, 6, .., 16-byte tag")
        if nonce_size != getattr(self, "nonce_size", 0) or tag_size != getattr(self, "tag_size", 0):
            self.nonce_size = nonce_size
            self.tag_size = tag_size
            self._b0 = 8 * ((tag_size - 2) // 2) + 14 - nonce_size
        key = bytes(key)
        if backend is not None or CCM._make is None:
            from microtun.ccm_backends import choose
            if choose(self, backend, key):
                return
        self._key = key

    def _check(self, nonce, data, aad):
        # API misuse is a loud ValueError; bad peer data never raises.
        if not isinstance(nonce, BYTES) or len(nonce) != self.nonce_size:
            raise ValueError("nonce must be %d bytes" % self.nonce_size)
        if not isinstance(data, BYTES) or not isinstance(aad, BYTES):
            raise ValueError("plaintext, data and aad must be bytes, bytearray or memoryview")

    def _stream(self, nonce, aad, n, ecb, off):
        """Grow the shared buffer (never shrunk) for an n-byte message: work
        to hold the CBC-MAC input (B0, aad and its length, message), or the
        key stream with X after it, off bytes in (ecb False: only that).
        Then work[off:off+16*b+16] = E(A_0) || E(A_1) .. || E(A_b), b the
        message's blocks: the counter blocks made there and encrypted in
        place, by ONE ECB call (ecb True), or for a short message by ecb, the
        CBC object that made its MAC, whose chain's value X is in _t.
        Returns work (from off: a view)."""
        global _work
        end = (n + 15) // 16 * 16 + 16
        la = len(aad)
        size = off + end + ((la + 25) // 16 * 16 if la else 16)
        if len(_work) < size:
            _work = memoryview(bytearray((size + _GROW - 1) // _GROW * _GROW))
        if not ecb:
            return _work
        # A_i = flags || nonce || i (RFC 3610 §2.3) for every block, over
        # what the CBC-MAC left there.
        _ctr(_work, off, nonce, self.nonce_size, end)
        w = _view(_work, off, len(_work)) if off else _work
        if ecb is True:
            # A new ECB object per message (304 bytes of garbage on a 32-bit
            # board): keeping one per key would keep 304 bytes per AEAD, four
            # per session, and the endpoint's heap budget is the tighter one
            # (docs/MEMORY.md).
            self._make(self._key, 1).encrypt(_view(w, 0, end), w)  # MODE_ECB
            return w
        # A short message (seal, n <= _SHORT: the handshake's seals,
        # keepalives): through the CBC object, a block at a time. CBC
        # encrypts A_i ^ (the block before it: X, then S_0, S_1 ..), which is
        # E(A_i). Its second cryptolib object (304 bytes, the largest
        # allocation of a handshake after the X25519 ladder's workspace) is
        # not made, nor can the first, garbage by then but still named by a
        # stale word on the C stack, keep its room from it (docs/MEMORY.md,
        # "One cryptolib object for a short message"). (la, size, e: the
        # chain's value, the offset, the block; names reused, as a local
        # more would make this frame a heap block bigger.)
        la = _t
        for size in range(0, end, 16):
            e = _view(w, size, size + 16)
            _xor(e, 0, la, 0, 16)
            ecb.encrypt(e, e)
            la = e
        return w

    def _cbc_mac(self, nonce, aad, lead, data, n):
        """RFC 3610 §2.2's X (16 bytes) from ONE CBC call over
        B0 || encoded aad || lead || data, each zero-padded to whole blocks,
        XORed into _t. Returns the CBC object: its chain's value is X."""
        w = _work
        la = len(aad)
        # B0 = flags || nonce || n (n in the last L bytes; the nonce over the
        # top bytes of the word, zero as n < 2**(8L)): no big ints.
        pack_into(">B11xI", w, 0, self._b0 | 64 if la else self._b0, n)
        _put(w, 1, 1 + self.nonce_size, nonce)
        o = 16
        if la:
            # The aad's length in 2 or 6 bytes (RFC 3610 §2.2), written in
            # place. (The 10-byte form, for 4 GB of aad and more, is left to
            # pack_into's error: no board, nor a gateway's packet, has such.)
            h = 2 if la < 0xFF00 else 6
            o = 16 + (h + la + 15) // 16 * 16
            _put(w, o - 16, o, _ZERO16)  # the padding (the part in use is overwritten)
            if h == 2:
                pack_into(">H", w, 16, la)
            else:
                pack_into(">HI", w, 16, 0xFFFE, la)
            _put(w, 16 + h, 16 + h + la, aad)
        if n:
            end = o + (n + 15) // 16 * 16
            if n & 15:
                _put(w, end - 16, end, _ZERO16)
            ll = len(lead)
            _put(w, o, o + ll, lead)
            _put(w, o + ll, o + n, data)
            o = end
        c = self._make(self._key, 2, _ZERO16)  # MODE_CBC, IV 0
        c.encrypt(_view(w, 0, o), w)
        _xor(_t, 0, w, o - 16, 16)             # X is the last block
        return c

    def seal(self, nonce, plaintext, aad=b"", head=b"", lead=b""):
        """ciphertext || tag (len(plaintext) + tag_size bytes). With head
        and lead: head || ciphertext || tag, sealing lead || plaintext;
        head is copied as it is (put it in aad to authenticate it). A head
        longer than 16 bytes gives a bytearray (the tunnel writes its outer
        header into it), built in place up to 32 bytes of head."""
        self._check(nonce, plaintext, aad)
        ll = len(lead)
        n = ll + len(plaintext)
        if n >> (120 - 8 * self.nonce_size):  # the length field has L bytes (RFC 3610 §2)
            raise ValueError("plaintext must be at most %d bytes" % ((1 << (120 - 8 * self.nonce_size)) - 1))
        hl = len(head)
        m = self.tag_size
        # X first (the CBC-MAC input fills the work buffer), then the key
        # stream S_0 || S_1 .. into it, and X and the message XORed into that
        # in place: the packet's one allocation of its size is the bytes returned.
        # A head of 17..32 bytes: the key stream starts 16 bytes in, so the
        # head fits before the message too.
        off = 16 if hl > 16 else 0
        self._stream(nonce, aad, n + off, False, 0)
        t = _t
        _put(t, 0, 16, _ZERO16)
        x = self._cbc_mac(nonce, aad, lead, plaintext, n)     # X into t
        if n > _SHORT:
            x = True       # the key stream by ECB: the CBC object let go before that one is made
        w = self._stream(nonce, aad, n, x, off)
        x = None
        _xor(t, 0, w, 0, m)                # T = X ^ S_0, after the message
        _put(w, 16 + n, 32 + n, t)
        _xor(w, 16, lead, 0, ll)
        _xor(w, 16 + ll, plaintext, 0, n - ll)
        if off:
            w = _work
            s = off + 16 - hl
            if s < 0:    # over 32 bytes of head: not the tunnel's
                return bytearray(head) + w[off + 16:off + 16 + n + m]
            _put(w, s, off + 16, head)     # over S_0 and the bytes before it, unused
            return bytearray(_view(w, s, off + 16 + n + m))
        _put(w, 16 - hl, 16, head)         # over S_0, used
        return bytes(_view(w, 16 - hl, 16 + n + m))

    def open(self, nonce, data, aad=b"", start=0, lead=None):
        """The plaintext of ciphertext || tag (from data[start:]), or None
        when the tag does not verify or data is too short. With a lead
        buffer, its len(lead) first plaintext bytes go there and the rest is
        returned (None if there are fewer). Never raises on bad data."""
        self._check(nonce, data, aad)
        m = self.tag_size
        ll = 0 if lead is None else len(lead)
        n = len(data) - start - m
        if n < ll or n >> (120 - 8 * self.nonce_size):
            return None
        w = self._stream(nonce, aad, n, True, 0)
        t = _t
        _put(t, 0, 16, _view(w, 0, 16))    # S_0 ^ the tag received: the CBC-MAC
        _xor(t, 0, data, start + n, m)     # input goes over S_0 in _work
        for i in range(ll):
            lead[i] = data[start + i] ^ w[16 + i]
        _xor(w, 16 + ll, data, start + ll, n - ll)   # the key stream becomes P
        p = bytes(_view(w, 16 + ll, 16 + n))
        self._cbc_mac(nonce, aad, lead or b"", p, n)   # X XORed into t
        # T = X ^ S_0, so X ^ (S_0 ^ tag) is zero for a good tag.
        # Constant time: every tag byte is looked at.
        r = 0
        for i in range(m):
            r |= t[i]
        return p if r == 0 else None


class AEAD(CCM):
    """AES-256-CCM (AES-128 with a 16-byte key), 12-byte nonce, 16-byte tag:
    the tunnel's cipher. backend: see CCM."""

    nonce_size = 12
    tag_size = 16
    _b0 = 8 * ((16 - 2) // 2) + 14 - 12   # as CCM.__init__ computes it

    def __init__(self, key, backend=None):
        CCM.__init__(self, key, 12, 16, backend)
