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
  CTR      ONE ECB call over the counter blocks A_0 .. A_n (§2.3); then
           (P || T) ^ (S_1 .. || S_0) as two big ints gives ciphertext || tag.

The CBC object lives as long as the CCM object: after a message its chaining
value is that message's last CBC-MAC block X, so the next message starts with
B0 ^ X, which is what a fresh all-zero IV would have given. That saves
building a cipher per message (a key expansion on the pure backend).

Packets without copies: `seal(..., head=h, lead=l)` returns
h || ciphertext || tag for the plaintext l || plaintext, and
`open(..., start=s, lead=buf)` decrypts data[s:] and writes the first
len(buf) plaintext bytes into buf. A transport packet's header and channel
byte so never cost a concatenation or a slice of the whole packet: the
big-int XOR that makes the ciphertext makes the packet (docs/MEMORY.md).

Work happens in two buffers shared by every CCM object, grown to the
largest message seen: seal and open are not re-entrant (one thread).

Only the board's cryptolib is imported here. Where it is missing (CPython, a
port built without it) or a backend is named, microtun.ccm_backends supplies
one: on CPython by default cryptography's AESCCM (same bytes, C speed),
which is how the host tests prove every path agrees byte for byte.
"""
try:
    from micropython import const
except ImportError:
    def const(x):
        return x

try:
    from cryptolib import aes as _native
except ImportError:
    try:
        from ucryptolib import aes as _native  # MicroPython before v1.21
    except ImportError:
        _native = None  # CPython, or a port without cryptolib: ccm_backends

BACKENDS = ("aesccm", "cryptolib", "cryptography", "pure")

_BYTES = (bytes, bytearray, memoryview)
_ZERO16 = bytes(16)
_GROW = const(64)  # buffers grow in steps of this many bytes
_work = None  # memoryview: CBC-MAC input, then the key stream, then P || T
_ctr = None  # memoryview: counter blocks A_0, A_1, .. (flags and i filled in)
_at = None  # _ctr[1:]: where each block's nonce goes
_ctr_l = 0  # the L those counter blocks were made for


def _room(size, blocks, L):
    """Grow the shared buffers (never shrunk): work to `size` bytes, the
    counter blocks to A_0 .. A_blocks for this L; returns work."""
    global _work, _ctr, _at, _ctr_l
    if _work is None or len(_work) < size:
        _work = memoryview(bytearray((size + _GROW - 1) // _GROW * _GROW))
    size = 16 * blocks + 16
    if _ctr is None or len(_ctr) < size or _ctr_l != L:
        ctr = memoryview(bytearray((size + _GROW - 1) // _GROW * _GROW))
        for o in range(0, len(ctr), 16):
            # A_i = flags || nonce || i (RFC 3610 §2.3); the nonce comes later.
            ctr[o] = L - 1
            ctr[o + 16 - L:o + 16] = (o >> 4).to_bytes(L, "big")
        _ctr = ctr
        _at = ctr[1:]
        _ctr_l = L
    return _work


class CCM:
    """CCM with `nonce_size`-byte nonces (7..13) and `tag_size`-byte tags
    (4, 6, .., 16). backend: None takes the fastest available (cryptolib on
    a board, AESCCM on CPython), or one of BACKENDS."""

    def __init__(self, key, nonce_size, tag_size, backend=None):
        if not isinstance(key, _BYTES) or len(key) not in (16, 32):
            raise ValueError("AES-CCM key must be 16 or 32 bytes")
        if not 7 <= nonce_size <= 13 or tag_size not in (4, 6, 8, 10, 12, 14, 16):
            raise ValueError("CCM needs a 7..13-byte nonce and a 4, 6, .., 16-byte tag")
        self.nonce_size = nonce_size
        self.tag_size = tag_size
        self._lbits = 120 - 8 * nonce_size  # 8 * L: the length field's bits (RFC 3610 §2)
        self._key = key = bytes(key)
        self._lib = None  # cryptography's AESCCM object: CPython's fast path
        if backend is None and _native is not None:
            self.backend = "cryptolib"  # the path in use (tests and benchmarks read it)
            self._make = _native
        else:
            from microtun.ccm_backends import choose
            choose(self, backend)
            if self._lib is not None:
                return
        # B0's flags (RFC 3610 §2.2) shifted into place; 64 << 120 marks aad.
        self._b0 = (8 * ((tag_size - 2) // 2) + 14 - nonce_size) << 120
        self._ecb = self._make(key, 1)  # MODE_ECB
        self._cbc = None  # made by _cbc_mac, which tracks its chaining value
        self._chain = None

    def _check(self, nonce, data, aad):
        # API misuse is a loud ValueError; bad peer data never raises.
        if not isinstance(nonce, _BYTES) or len(nonce) != self.nonce_size:
            raise ValueError("nonce must be %d bytes" % self.nonce_size)
        if not isinstance(data, _BYTES) or not isinstance(aad, _BYTES):
            raise ValueError("plaintext, data and aad must be bytes, bytearray or memoryview")

    def _grow(self, aad, n, extra):
        """Buffers for an n-byte message: the CBC-MAC input (B0, aad and its
        length, message), the key stream and a moved S_0, or `extra` bytes
        and P || T, whichever is longest."""
        blocks = (n + 15) >> 4
        la = len(aad)
        a = (la + 25) // 16 * 16 if la else 16
        return _room(16 * blocks + 16 + (a if a > extra else extra), blocks, 15 - self.nonce_size)

    def _key_stream(self, nonce, n):
        """work[0:16*b+16] = E(A_0) || E(A_1) .. || E(A_b), b = blocks of
        the message, in ONE ECB call."""
        end = (n + 15) // 16 * 16 + 16
        at = _at
        k = self.nonce_size
        for o in range(0, end, 16):
            at[o:o + k] = nonce
        self._ecb.encrypt(_ctr[:end], _work)

    def _cbc_mac(self, nonce, aad, lead, msg, n):
        """RFC 3610 §2.2's X (as an int) from ONE CBC call over
        B0 || encoded aad || lead || msg, each zero-padded to whole blocks."""
        w = _work
        la = len(aad)
        chain = self._chain
        self._chain = None  # unknown until this call completes
        if chain is None:  # first message, or an earlier one was interrupted
            self._cbc = self._make(self._key, 2, _ZERO16)  # MODE_CBC
            chain = 0
        b0 = self._b0 | (int.from_bytes(nonce, "big") << (120 - 8 * self.nonce_size)) | n
        if la:
            b0 |= 64 << 120
        w[0:16] = (b0 ^ chain).to_bytes(16, "big")
        o = 16
        if la:
            # The aad's length in 2, 6 or 10 bytes (RFC 3610 §2.2).
            if la < 0xFF00:
                h, enc = 2, la
            elif la < 0x100000000:
                h, enc = 6, 0xFFFE << 32 | la
            else:
                h, enc = 10, 0xFFFF << 64 | la
            o = 16 + (h + la + 15) // 16 * 16
            w[o - 16:o] = _ZERO16  # the padding (the part in use is overwritten)
            w[16:16 + h] = enc.to_bytes(h, "big")
            w[16 + h:16 + h + la] = aad
        if n:
            end = o + (n + 15) // 16 * 16
            if n & 15:
                w[end - 16:end] = _ZERO16
            ll = len(lead)
            w[o:o + ll] = lead
            w[o + ll:o + n] = msg
            o = end
        self._cbc.encrypt(w[:o], w)
        x = int.from_bytes(w[o - 16:o], "big")
        self._chain = x
        return x

    def seal(self, nonce, plaintext, aad=b"", head=b"", lead=b""):
        """ciphertext || tag (len(plaintext) + tag_size bytes). With head
        and lead: head || ciphertext || tag, sealing lead || plaintext;
        head is copied as it is (put it in aad to authenticate it)."""
        self._check(nonce, plaintext, aad)
        ll = len(lead)
        n = ll + len(plaintext)
        if n >> self._lbits:
            raise ValueError("plaintext must be at most %d bytes" % ((1 << self._lbits) - 1))
        if self._lib is not None:
            ct = self._lib.encrypt(nonce, lead + plaintext if ll else plaintext, aad)
            return b"".join((head, ct)) if head else ct
        m = self.tag_size
        hl = len(head)
        w = self._grow(aad, n, hl)
        x = self._cbc_mac(nonce, aad, lead, plaintext, n)
        self._key_stream(nonce, n)  # S_0 || S_1 ..
        w[16 + n:32 + n] = w[0:16]  # S_0 after the message's key stream, for T
        ks = int.from_bytes(w[16:16 + n + m], "big")
        w[0:hl] = head
        w[hl:hl + ll] = lead
        w[hl + ll:hl + n] = plaintext
        w[hl + n:hl + n + 16] = x.to_bytes(16, "big")  # T is X's first m bytes
        # (head || P || T) ^ (S_1 .. || S_0) as ONE big-int XOR: the key
        # stream is the shorter int, so head is XORed with nothing.
        return (int.from_bytes(w[0:hl + n + m], "big") ^ ks).to_bytes(hl + n + m, "big")

    def open(self, nonce, data, aad=b"", start=0, lead=None):
        """The plaintext of ciphertext || tag (from data[start:]), or None
        when the tag does not verify or data is too short. With a lead
        buffer, its len(lead) first plaintext bytes go there and the rest is
        returned (None if there are fewer). Never raises on bad data."""
        self._check(nonce, data, aad)
        m = self.tag_size
        ll = 0 if lead is None else len(lead)
        n = len(data) - start - m
        if n < ll or n >> self._lbits:
            return None
        d = memoryview(data)
        if self._lib is not None:
            try:
                p = self._lib.decrypt(nonce, d[start:], aad)
            except self._invalid:
                return None
            if ll:
                lead[:] = p[:ll]
                return p[ll:]
            return p
        w = self._grow(aad, n, 0)
        self._key_stream(nonce, n)
        s0 = int.from_bytes(w[0:16], "big")
        for i in range(ll):
            lead[i] = d[start + i] ^ w[16 + i]
        p = (int.from_bytes(d[start + ll:start + n], "big") ^
             int.from_bytes(w[16 + ll:16 + n], "big")).to_bytes(n - ll, "big")
        t = (self._cbc_mac(nonce, aad, lead or b"", p, n) ^ s0).to_bytes(16, "big")
        # Constant time: every tag byte is looked at.
        r = 0
        d = d[start + n:]
        for i in range(m):
            r |= t[i] ^ d[i]
        return p if r == 0 else None


class AEAD(CCM):
    """AES-256-CCM (AES-128 with a 16-byte key), 12-byte nonce, 16-byte tag:
    the tunnel's cipher. backend: see CCM."""

    def __init__(self, key, backend=None):
        CCM.__init__(self, key, 12, 16, backend)
