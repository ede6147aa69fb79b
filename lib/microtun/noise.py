"""The Noise Protocol Framework, revision 34 (https://noiseprotocol.org/noise.html):
CipherState (§5.1), SymmetricState (§5.2) and HandshakeState (§5.3) for the
pattern IKpsk2 (§7.5, §9), with DH = X25519 and HASH = SHA-256 fixed and the
cipher passed in as a `Suite`.

    ini = HandshakeState(NOISE_IKPSK2_25519_AESCCM_SHA256, True, s, rs=peer_pub, psk=psk)
    msg1 = ini.write_message(payload)         # -> e, es, s, ss
    res = HandshakeState(NOISE_IKPSK2_25519_AESCCM_SHA256, False, s2)
    payload = res.read_message(msg1)          # res.rs: who is calling
    res.set_psk(psk_of(res.rs))
    msg2 = res.write_message(b"")             # <- e, ee, se, psk
    ini.read_message(msg2)
    c1, c2 = ini.split()                      # c1: initiator -> responder

Messages with empty payloads: 96 and 48 bytes.

Errors. Anything wrong with bytes that came from the peer (bad tag, wrong
length, low-order DH result) raises `NoiseError`, and nothing else. A
HandshakeState that raised is dead: every later call raises ValueError, as
does any other misuse of the API (wrong turn, bad key length, split() too
early, nonce space exhausted while encrypting).

Static-static DH cache. X25519 is the expensive part (~8 ms on the x86 unix
port, far more on an MCU), and DH(s, rs) is the same for every handshake with
one peer. The caller may hand it in:

  - `ss=bytes`: the precomputed DH(s, rs), used by the side that knows rs
    before the handshake (the initiator in IK).
  - `ss_lookup=callable`: called as `ss_lookup(rs)` when the `ss` token is
    processed, i.e. on the responder while it reads message 1, right after it
    decrypted the initiator's static key. It returns the cached 32 bytes, or
    None to have it computed. Careful: at that moment rs is NOT yet
    authenticated (any sender can choose it; only the payload tag that follows
    proves the sender holds it), so the lookup must be cheap and side-effect
    free. It may raise NoiseError to reject an unknown rs early, which spares
    one X25519 per bogus message 1.

After a successful handshake `hs.ss` holds the value that was used (looked up
or computed), and `hs.rs` the peer's static key, so the caller can fill its
cache keyed by rs. `hs.dh_count` counts X25519 operations done by this
object, key generation included.

Suites. NOISE_IKPSK2_25519_AESCCM_SHA256 (microtun.aead, AES-256-CCM) is
the production suite; its X25519, HKDF and HMAC come from the crypto
backend it carries (suite.crypto: microtun.crypto.PURE, the pure-Python
code; a host builds the same suite on microtun_host.hostcrypto.HOST). Its nonce is the AESGCM layout of §12.4: 4 zero bytes
|| 64-bit big-endian n. Any other cipher is a
`Suite(pattern, cipher_name, encrypt, decrypt, errors=())`; the AESGCM and
ChaChaPoly suites that check this module against the `noiseprotocol` package
live in host_tests/test_noise_interop.py, so their code costs no device RAM.
"""
import hashlib

from microtun.aead import AEAD
from microtun.crypto import PURE
from microtun.rand import random_bytes

if __import__("sys").implementation.name != "micropython":
    def const(x):   # CPython; MicroPython's compiler folds const() with no name bound (a global costs a board heap)
        return x

# Specification constants (§4.1, §4.2, §3).
DHLEN = const(32)
HASHLEN = const(32)
TAGLEN = const(16)
PSKLEN = const(32)
MAX_MESSAGE_LEN = const(65535)
_MAX_NONCE = const(0xFFFFFFFFFFFFFFFF)  # 2**64-1 is reserved (§5.1)
_ZEROS32 = bytes(32)

# Handshake patterns as token tables (§7.1, §7.5, §9.3):
# name -> (initiator pre-message, responder pre-message, messages).
# Messages alternate initiator -> responder, responder -> initiator, ...
# Only "s" is supported in pre-messages.
PATTERNS = {
    "IKpsk2": ((), ("s",), (("e", "es", "s", "ss"), ("e", "ee", "se", "psk"))),
}


class NoiseError(Exception):
    """A message from the peer failed to authenticate or parse: drop it.
    str(e) is a short reason to count: too_short, too_long, bad_tag,
    low_order, nonce_exhausted (or whatever an ss_lookup raised)."""


def generate_keypair(crypto=PURE):
    """GENERATE_KEYPAIR() (§4.1): a fresh X25519 (private, public) pair,
    computed by the crypto backend `crypto` (microtun.crypto)."""
    priv = random_bytes(DHLEN)
    return priv, crypto.public_key(priv)


def nonce96(n):
    """The 12-byte AEAD nonce for counter n, AESGCM layout (§12.4):
    32 bits of zeros followed by big-endian n."""
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "big")


class Suite:
    """A protocol: pattern + 25519 + cipher + SHA256, and the crypto backend
    that computes its X25519 and HKDF (microtun.crypto; PURE by default):
    the backend changes the speed, never a byte.
    encrypt(k, n, ad, plaintext) -> ciphertext || tag;
    decrypt(k, n, ad, ciphertext) -> plaintext, or None on failure, or it
    raises one of `errors` (e.g. cryptography's InvalidTag). Any other
    exception is a bug and propagates. `name` is the full protocol name
    (bytes), e.g. b"Noise_IKpsk2_25519_AESCCM_SHA256". `responder`: None,
    or the backend's own responder half of this suite's handshake, which
    microtun.responder.Gateway then runs instead of HandshakeState (the
    same calls and bytes as microtun.responder.NoiseResponder)."""

    def __init__(self, pattern, cipher_name, encrypt, decrypt, errors=(), crypto=PURE, responder=None):
        if pattern not in PATTERNS:
            raise ValueError("unknown pattern %r" % pattern)
        self.pattern = pattern
        self.cipher_name = cipher_name
        self.name = ("Noise_%s_25519_%s_SHA256" % (pattern, cipher_name)).encode()
        self.encrypt = encrypt
        self.decrypt = decrypt
        self.errors = errors
        self.crypto = crypto
        self.responder = responder


def _ccm_encrypt(k, n, ad, plaintext):
    return AEAD(k).seal(nonce96(n), plaintext, ad)


def _ccm_decrypt(k, n, ad, ciphertext):
    return AEAD(k).open(nonce96(n), ciphertext, ad)


NOISE_IKPSK2_25519_AESCCM_SHA256 = Suite("IKpsk2", "AESCCM", _ccm_encrypt, _ccm_decrypt)


class CipherState:
    """§5.1: a key k (None = empty) and a 64-bit nonce n."""

    def __init__(self, suite, k=None):
        self.suite = suite
        self.k = k
        self.n = 0

    def initialize_key(self, k):
        self.k = k
        self.n = 0

    def has_key(self):
        return self.k is not None

    def set_nonce(self, n):
        self.n = n

    def encrypt_with_ad(self, ad, plaintext):
        if self.k is None:
            return plaintext
        n = self.n
        if n >= _MAX_NONCE:
            raise ValueError("nonce exhausted: rekey or new handshake")
        ct = self.suite.encrypt(self.k, n, ad, plaintext)
        self.n = n + 1
        return ct

    def decrypt_with_ad(self, ad, ciphertext):
        """Plaintext, or NoiseError (n is then left unchanged)."""
        if self.k is None:
            return ciphertext
        n = self.n
        if n >= _MAX_NONCE:
            raise NoiseError("nonce_exhausted")
        if len(ciphertext) < TAGLEN:
            raise NoiseError("too_short")
        try:
            pt = self.suite.decrypt(self.k, n, ad, ciphertext)
        except self.suite.errors:  # only what the suite declared as "bad tag"
            pt = None
        if pt is None:
            raise NoiseError("bad_tag")
        self.n = n + 1
        return pt

    def rekey(self):
        """§4.2 default REKEY(k): the first 32 bytes of
        ENCRYPT(k, 2**64-1, zerolen, zeros)."""
        self.k = self.suite.encrypt(self.k, _MAX_NONCE, b"", _ZEROS32)[:32]


class SymmetricState:
    """§5.2: chaining key ck, handshake hash h and a CipherState."""

    def __init__(self, suite):
        self._hkdf = suite.crypto.noise_hkdf
        name = suite.name
        # InitializeSymmetric: a name of at most HASHLEN bytes is padded with
        # zeros, a longer one is hashed.
        if len(name) <= HASHLEN:
            self.h = name + bytes(HASHLEN - len(name))
        else:
            self.h = hashlib.sha256(name).digest()
        self.ck = self.h
        self.cs = CipherState(suite)

    def mix_key(self, ikm):
        self.ck, k = self._hkdf(self.ck, ikm, 2)
        self.cs.initialize_key(k)

    def mix_hash(self, data):
        h = hashlib.sha256(self.h)
        h.update(data)
        self.h = h.digest()

    def mix_key_and_hash(self, ikm):
        self.ck, temp_h, k = self._hkdf(self.ck, ikm, 3)
        self.mix_hash(temp_h)
        self.cs.initialize_key(k)

    def encrypt_and_hash(self, plaintext):
        ct = self.cs.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ct)
        return ct

    def decrypt_and_hash(self, ciphertext):
        pt = self.cs.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return pt

    def split(self):
        k1, k2 = self._hkdf(self.ck, b"", 2)
        suite = self.cs.suite
        return CipherState(suite, k1), CipherState(suite, k2)


def _check_key(what, v):
    if not isinstance(v, (bytes, bytearray)) or len(v) != DHLEN:
        raise ValueError("%s: need 32 bytes" % what)
    return bytes(v)


class HandshakeState:
    """§5.3. Arguments:
    suite      a Suite, e.g. NOISE_IKPSK2_25519_AESCCM_SHA256
    initiator  True for the initiator, False for the responder
    s          our static keypair (private, public), 32 bytes each
    rs         the peer's static public key, if known in advance (IK initiator)
    psk        32-byte pre-shared key; None means 32 zero bytes (or set_psk())
    prologue   bytes both sides must agree on (§6)
    e          inject our ephemeral keypair (tests, interop, precomputation)
    ss         precomputed DH(s, rs); ss_lookup(rs) -> bytes|None: see the
               module docstring ("Static-static DH cache")
    """

    def __init__(self, suite, initiator, s, rs=None, psk=None, prologue=b"",
                 e=None, ss=None, ss_lookup=None):
        if suite is None:
            raise ValueError("suite is None")
        pre_i, pre_r, self._messages = PATTERNS[suite.pattern]
        self._crypto = suite.crypto
        self.initiator = initiator
        self.s = (_check_key("s", s[0]), _check_key("s", s[1]))
        self.rs = None if rs is None else _check_key("rs", rs)
        self.e = None if e is None else (_check_key("e", e[0]), _check_key("e", e[1]))
        self.re = None
        self.ss = None if ss is None else _check_key("ss", ss)
        self._ss_lookup = ss_lookup
        self._psk = _ZEROS32
        if psk is not None:
            self.set_psk(psk)
        self._psk_mode = any("psk" in m for m in self._messages)  # §9.2
        self.dh_count = 0
        self._i = 0            # index of the next message
        self._dead = False
        self._split = None

        # Initialize() (§5.3).
        sym = self._sym = SymmetricState(suite)
        sym.mix_hash(prologue)
        their_pre = pre_r if initiator else pre_i
        if self.rs is None and "s" in their_pre:
            raise ValueError("rs required")
        if self.rs is not None and "s" not in their_pre:
            raise ValueError("rs unexpected: learnt in the handshake")
        for pre, mine in ((pre_i, initiator), (pre_r, not initiator)):
            for token in pre:
                if token != "s":
                    raise ValueError("pre-message token %r" % token)
                sym.mix_hash(self.s[1] if mine else self.rs)

    def set_psk(self, psk):
        """Set the 32-byte PSK any time before the psk token uses it: the
        responder learns which peer it talks to (rs) only from message 1,
        and in IKpsk2 the PSK enters at the end of message 2 (§9.3)."""
        if self._psk is None:
            raise ValueError("psk already used")
        if len(psk) != PSKLEN:
            raise ValueError("psk: need 32 bytes")
        self._psk = bytes(psk)

    @property
    def complete(self):
        """True once every handshake message was written or read."""
        return self._i == len(self._messages)

    @property
    def handshake_hash(self):
        """GetHandshakeHash() (§5.2), for channel binding (§11.2)."""
        return self._sym.h

    def _next(self, writing):
        if self._dead:
            raise ValueError("handshake failed: start a new one")
        if self.complete:
            raise ValueError("handshake complete: split()")
        if ((self._i & 1) == 0) != (self.initiator == writing):
            raise ValueError("not our turn")
        return self._messages[self._i]

    def _dh(self, priv, pub):
        self.dh_count += 1
        try:
            return self._crypto.x25519(priv, pub)
        except ValueError:
            raise NoiseError("low_order")

    def _mix_dh(self, token):
        # §7.1: "es" is DH(e, rs) on the initiator and DH(s, re) on the
        # responder; "se" the other way round.
        sym = self._sym
        if token == "ee":
            sym.mix_key(self._dh(self.e[0], self.re))
        elif token == "ss":
            if self.ss is None and self._ss_lookup is not None:
                v = self._ss_lookup(self.rs)
                self.ss = None if v is None else _check_key("ss_lookup", v)
            if self.ss is None:
                self.ss = self._dh(self.s[0], self.rs)
            sym.mix_key(self.ss)
        elif (token == "es") == self.initiator:
            sym.mix_key(self._dh(self.e[0], self.rs))
        else:
            sym.mix_key(self._dh(self.s[0], self.re))

    def write_message(self, payload=b""):
        """WriteMessage (§5.3): the next handshake message carrying payload."""
        tokens = self._next(True)
        try:
            sym = self._sym
            parts = []
            for token in tokens:
                if token == "e":
                    if self.e is None:
                        self.e = generate_keypair(self._crypto)
                        self.dh_count += 1
                    pub = self.e[1]
                    parts.append(pub)
                    sym.mix_hash(pub)
                    if self._psk_mode:
                        sym.mix_key(pub)  # §9.2
                elif token == "s":
                    parts.append(sym.encrypt_and_hash(self.s[1]))
                elif token == "psk":
                    sym.mix_key_and_hash(self._psk)
                    self._psk = None
                else:
                    self._mix_dh(token)
            parts.append(sym.encrypt_and_hash(payload))
            msg = b"".join(parts)
            if len(msg) > MAX_MESSAGE_LEN:
                raise ValueError("payload too long")
        except BaseException:
            self._dead = True
            raise
        self._i += 1
        return msg

    def read_message(self, message):
        """ReadMessage (§5.3): the payload of the peer's next handshake
        message. Raises NoiseError if it is malformed or does not verify."""
        tokens = self._next(False)
        try:
            if len(message) > MAX_MESSAGE_LEN:
                raise NoiseError("too_long")
            sym = self._sym
            mv = memoryview(message)
            off = 0
            for token in tokens:
                if token == "e" or token == "s":
                    n = DHLEN + TAGLEN if token == "s" and sym.cs.has_key() else DHLEN
                    if len(mv) - off < n:
                        raise NoiseError("too_short")
                    chunk = bytes(mv[off:off + n])
                    off += n
                    if token == "e":
                        self.re = chunk
                        sym.mix_hash(chunk)
                        if self._psk_mode:
                            sym.mix_key(chunk)  # §9.2
                    else:
                        self.rs = bytes(sym.decrypt_and_hash(chunk))
                elif token == "psk":
                    sym.mix_key_and_hash(self._psk)
                    self._psk = None
                else:
                    self._mix_dh(token)
            rest = bytes(mv[off:])
            payload = sym.decrypt_and_hash(rest)
        except BaseException:
            self._dead = True
            raise
        self._i += 1
        return payload

    def split(self):
        """Split() (§5.2) once the handshake is complete: (c1, c2), where c1
        encrypts initiator -> responder and c2 responder -> initiator.
        Forgets the handshake secrets; handshake_hash stays available."""
        if not self.complete or self._dead:
            raise ValueError("handshake not complete")
        if self._split is None:
            self._split = self._sym.split()
            self._sym.ck = None
            self.e = None
        return self._split
