"""AES-CCM authenticated encryption (RFC 3610, NIST SP 800-38C) over the
cryptolib-compatible shim in microtun.aes.

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

Work happens in buffers the object owns, grown to the largest message seen,
so a CCM object is not re-entrant: one per thread.

On CPython the default is cryptography's AESCCM (same bytes, C speed);
`backend=` chooses a shim backend instead, which is how the host tests prove
both paths agree byte for byte.
"""
try:
    from micropython import const
except ImportError:
    def const(x):
        return x

from microtun import aes as _aes
from microtun.hmac import ct_equal

NONCE_SIZE = const(12)
TAG_SIZE = const(16)
BACKENDS = ("aesccm",) + _aes.BACKENDS

_BYTES = (bytes, bytearray, memoryview)
_ZERO16 = bytes(16)
_GROW = const(64)  # buffers grow in steps of this many bytes
_aesccm = False  # cryptography's (AESCCM, InvalidTag), None where missing


def _cpython_aesccm():
    # Looked up once: a failed import searches the filesystem every time,
    # and on a board that is flash.
    global _aesccm
    if _aesccm is False:
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESCCM
            from cryptography.exceptions import InvalidTag
            _aesccm = (AESCCM, InvalidTag)
        except ImportError:
            _aesccm = None
    return _aesccm


class CCM:
    """CCM with `nonce_size`-byte nonces (7..13) and `tag_size`-byte tags
    (4, 6, .., 16). backend: None takes the fastest available (AESCCM on
    CPython, else the shim's default), or one of BACKENDS."""

    def __init__(self, key, nonce_size, tag_size, backend=None):
        if not isinstance(key, _BYTES) or len(key) not in (16, 32):
            raise ValueError("AES-CCM key must be 16 or 32 bytes")
        if not 7 <= nonce_size <= 13 or tag_size not in (4, 6, 8, 10, 12, 14, 16):
            raise ValueError("CCM needs a 7..13-byte nonce and a 4, 6, .., 16-byte tag")
        if backend is not None and backend not in BACKENDS:
            raise ValueError("AEAD backend must be one of %s" % (BACKENDS,))
        self.nonce_size = nonce_size
        self.tag_size = tag_size
        L = 15 - nonce_size  # RFC 3610 §2: bytes of length field and counter
        self._max = (1 << (8 * L)) - 1
        self._lib = None
        if backend is None or backend == "aesccm":
            lib = _cpython_aesccm()
            if lib is not None:
                self.backend = "aesccm"
                self._lib = lib[0](bytes(key), tag_length=tag_size)
                self._invalid = lib[1]
                return
            if backend:
                raise ValueError("AEAD backend 'aesccm' needs the cryptography package")
            backend = _aes.default_backend()
        self.backend = backend  # the path in use (tests and benchmarks read it)
        # B0's flags (RFC 3610 §2.2) shifted into place; 64 << 120 marks aad.
        self._b0 = (8 * ((tag_size - 2) // 2) + L - 1) << 120
        self._key = bytes(key)
        self._ecb = _aes.aes(key, _aes.MODE_ECB, None, backend)
        self._cbc = None  # made by _cbc_mac, which tracks its chaining value
        self._chain = None
        self._work = None  # memoryview: CBC-MAC input, then key stream
        self._ctr = None  # memoryview: counter blocks A_0, A_1, ..

    def _args(self, nonce, data, aad):
        # API misuse is a loud ValueError; bad peer data never raises.
        if not isinstance(nonce, _BYTES) or len(nonce) != self.nonce_size:
            raise ValueError("nonce must be %d bytes" % self.nonce_size)
        if not isinstance(data, _BYTES) or not isinstance(aad, _BYTES):
            raise ValueError("plaintext, data and aad must be bytes, bytearray or memoryview")

    def _room(self, aad, blocks):
        """Grow the buffers (never shrunk) for a message of `blocks` blocks:
        work to the CBC-MAC input (B0, aad and its length, message) or the
        key stream plus a moved S_0, whichever is longer; the counter blocks
        to A_0 .. A_blocks."""
        la = len(aad)
        size = 16 * blocks + 16 + ((la + 25) // 16 * 16 if la else 16)
        if self._work is None or len(self._work) < size:
            self._work = memoryview(bytearray((size + _GROW - 1) // _GROW * _GROW))
        size = 16 * blocks + 16
        if self._ctr is None or len(self._ctr) < size:
            ctr = memoryview(bytearray((size + _GROW - 1) // _GROW * _GROW))
            L = 15 - self.nonce_size
            for o in range(0, len(ctr), 16):
                # A_i = flags || nonce || i (RFC 3610 §2.3); the nonce comes later.
                ctr[o] = L - 1
                ctr[o + 16 - L:o + 16] = (o >> 4).to_bytes(L, "big")
            self._ctr = ctr
            self._nonce_at = ctr[1:]

    def _key_stream(self, nonce, blocks):
        """work[0:16*blocks] = E(A_0) || E(A_1) || .., in ONE ECB call."""
        end = 16 * blocks
        at = self._nonce_at
        n = self.nonce_size
        for o in range(0, end, 16):
            at[o:o + n] = nonce
        self._ecb.encrypt(self._ctr[:end], self._work)

    def _cbc_mac(self, nonce, aad, msg, n, blocks):
        """RFC 3610 §2.2's X (as an int) from ONE CBC call over
        B0 || encoded aad || msg, each zero-padded to whole blocks."""
        w = self._work
        la = len(aad)
        chain = self._chain
        self._chain = None  # unknown until this call completes
        if chain is None:  # first message, or an earlier one was interrupted
            self._cbc = _aes.aes(self._key, _aes.MODE_CBC, _ZERO16, self.backend)
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
            end = o + 16 * blocks
            if n & 15:
                w[end - 16:end] = _ZERO16
            w[o:o + n] = msg
            o = end
        self._cbc.encrypt(w[:o], w)
        x = int.from_bytes(w[o - 16:o], "big")
        self._chain = x
        return x

    def seal(self, nonce, plaintext, aad=b""):
        """ciphertext || tag (len(plaintext) + tag_size bytes)."""
        self._args(nonce, plaintext, aad)
        n = len(plaintext)
        if n > self._max:
            raise ValueError("plaintext must be at most %d bytes" % self._max)
        if self._lib is not None:
            return self._lib.encrypt(nonce, plaintext, aad)
        blocks = (n + 15) >> 4
        self._room(aad, blocks)
        x = self._cbc_mac(nonce, aad, plaintext, n, blocks)
        # (P || T) ^ (S_1 .. || S_0) as ONE big-int XOR: ciphertext || tag.
        m = self.tag_size
        w = self._work
        w[0:n] = plaintext
        w[n:n + 16] = x.to_bytes(16, "big")  # T is X's first m bytes
        pt = int.from_bytes(w[0:n + m], "big")
        self._key_stream(nonce, blocks + 1)  # S_0 || S_1 ..
        w[16 + n:32 + n] = w[0:16]  # S_0 moved after the message's key stream
        return (pt ^ int.from_bytes(w[16:16 + n + m], "big")).to_bytes(n + m, "big")

    def open(self, nonce, data, aad=b""):
        """The plaintext of ciphertext || tag, or None when the tag does not
        verify or data is too short. Never raises on bad data."""
        self._args(nonce, data, aad)
        m = self.tag_size
        n = len(data) - m
        if n < 0 or n > self._max:
            return None
        if self._lib is not None:
            try:
                return self._lib.decrypt(nonce, data, aad)
            except self._invalid:
                return None
        blocks = (n + 15) >> 4
        self._room(aad, blocks)
        self._key_stream(nonce, blocks + 1)
        v = self._work
        d = memoryview(data)
        s0 = int.from_bytes(v[0:16], "big")
        p = (int.from_bytes(d[:n], "big") ^ int.from_bytes(v[16:16 + n], "big")).to_bytes(n, "big")
        t = (self._cbc_mac(nonce, aad, p, n, blocks) ^ s0).to_bytes(16, "big")
        if ct_equal(memoryview(t)[:m], d[n:]):
            return p
        return None


class AEAD(CCM):
    """AES-256-CCM (AES-128 with a 16-byte key), 12-byte nonce, 16-byte tag:
    the tunnel's cipher. backend: see CCM."""

    def __init__(self, key, backend=None):
        CCM.__init__(self, key, NONCE_SIZE, TAG_SIZE, backend)
