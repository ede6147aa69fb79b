"""The AEAD's backends other than a board's cryptolib, imported only where
cryptolib is missing (CPython, a port built without it) or a backend is
asked for by name, so a board never loads this module or microtun.aes:

  "aesccm"        cryptography's AESCCM: CPython's default, same bytes at
                  C speed (the host tests check every path against it).
                  Its bad-tag exception becomes None, as the AEAD returns.
  "cryptolib", "cryptography", "pure"
                  the blocks from microtun.aes's backend of that name, under
                  microtun.aead's own CCM.
"""
from microtun import aes as _aes

# what microtun.aead.CCM's backend argument takes (here, not in aead: a
# board never names one)
BACKENDS = ("aesccm", "cryptolib", "cryptography", "pure")

_aesccm = False  # cryptography's (AESCCM, InvalidTag), None where missing


def _cpython_aesccm():
    # Looked up once: a failed import searches the filesystem every time.
    global _aesccm
    if _aesccm is False:
        try:
            from cryptography.hazmat.primitives.ciphers.aead import AESCCM
            from cryptography.exceptions import InvalidTag
            _aesccm = (AESCCM, InvalidTag)
        except ImportError:
            _aesccm = None
    return _aesccm


class _AESCCM:
    """cryptography's AESCCM behind the calls microtun.aead makes: decrypt
    returns None for a bad tag instead of raising. Small: a gateway keeps two
    per session."""
    __slots__ = ("_ccm",)

    def __init__(self, key, tag_size):
        self._ccm = _aesccm[0](key, tag_length=tag_size)

    def encrypt(self, nonce, data, aad):
        return self._ccm.encrypt(bytes(nonce), data, aad)

    def decrypt(self, nonce, data, aad):
        try:
            return self._ccm.decrypt(bytes(nonce), data, aad)
        except _aesccm[1]:  # InvalidTag
            return None


def _seal(self, nonce, plaintext, aad=b"", head=b"", lead=b""):
    """CCM.seal through AESCCM (self._lib): the same API and bytes."""
    self._check(nonce, plaintext, aad)
    if (len(lead) + len(plaintext)) >> (120 - 8 * self.nonce_size):
        # too long for the nonce's length field: CCM.seal's ValueError
        # (AESCCM's own check misses some: OpenSSL then fails inside)
        return super(type(self), self).seal(nonce, plaintext, aad, head, lead)
    ct = self._lib.encrypt(nonce, lead + plaintext if lead else plaintext, aad)
    if len(head) > 16:
        return bytearray(head) + ct
    return b"".join((head, ct)) if head else ct


def _open(self, nonce, data, aad=b"", start=0, lead=None):
    """CCM.open through AESCCM (self._lib): the same API; None for what
    does not verify, or is shorter than the tag and lead, or longer than
    the nonce allows."""
    self._check(nonce, data, aad)
    ll = 0 if lead is None else len(lead)
    n = len(data) - start - self.tag_size
    if n < ll or n >> (120 - 8 * self.nonce_size):
        return None
    p = self._lib.decrypt(nonce, memoryview(data)[start:], aad)
    if p is not None and ll:
        lead[:] = p[:ll]
        return p[ll:]
    return p


_FAST = {}  # a CCM class -> its subclass that seals and opens through AESCCM


def _fast(cls):
    f = _FAST.get(cls)
    if f is None:
        f = _FAST[cls] = type(cls.__name__, (cls,), {"seal": _seal, "open": _open, "__doc__": cls.__doc__})
    return f


def choose(ccm, backend, key):
    """Set up the microtun.aead.CCM object `ccm` with `key` for `backend`
    (None: the fastest here): its .backend, and ._lib (AESCCM, with the
    object's class made a subclass whose seal and open call it; returns True)
    or ._make (a bare cryptolib-style aes constructor; returns False)."""
    if backend is not None and backend not in BACKENDS:
        raise ValueError("AEAD backend must be one of %s" % (BACKENDS,))
    if backend is None or backend == "aesccm":
        if _cpython_aesccm() is not None:
            ccm.__class__ = _fast(type(ccm))
            ccm.backend = "aesccm"
            ccm._lib = _AESCCM(key, ccm.tag_size)
            return True
        if backend:
            raise ValueError("AEAD backend 'aesccm' needs the cryptography package")
        backend = _aes.default_backend()
    ccm.backend = backend
    ccm._make = _aes.get_backend(backend)
    return False
