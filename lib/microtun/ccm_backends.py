"""The AEAD's backends other than a board's cryptolib, imported only where
cryptolib is missing (CPython, a port built without it) or a backend is
asked for by name, so a board never loads this module or microtun.aes:

  "aesccm"        cryptography's AESCCM: CPython's default, same bytes at
                  C speed (the host tests check every path against it).
  "cryptolib", "cryptography", "pure"
                  the blocks from microtun.aes's backend of that name, under
                  microtun.aead's own CCM.
"""
from microtun import aes as _aes

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


def choose(ccm, backend):
    """Set up the microtun.aead.CCM object `ccm` for `backend` (None: the
    fastest here): its .backend, and ._lib and ._invalid (AESCCM) or ._make
    (a bare cryptolib-style aes constructor)."""
    from microtun.aead import BACKENDS
    if backend is not None and backend not in BACKENDS:
        raise ValueError("AEAD backend must be one of %s" % (BACKENDS,))
    if backend is None or backend == "aesccm":
        lib = _cpython_aesccm()
        if lib is not None:
            ccm.backend = "aesccm"
            ccm._lib = lib[0](ccm._key, tag_length=ccm.tag_size)
            ccm._invalid = lib[1]
            return
        if backend:
            raise ValueError("AEAD backend 'aesccm' needs the cryptography package")
        backend = _aes.default_backend()
    ccm.backend = backend
    ccm._make = _aes.get_backend(backend)
