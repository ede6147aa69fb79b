"""A cryptolib-compatible AES shim: `aes(key, mode, iv=None)`, ECB and CBC.

The objects behave like MicroPython's `cryptolib.aes`: 16- or 32-byte keys;
`encrypt(in[, out])` / `decrypt(in[, out])` on whole 16-byte blocks; `out`
may be longer than `in` (len(in) bytes are written) and may be `in` itself;
an object is one-direction (its first call fixes the direction, the other
then raises ValueError) and stateful (CBC chains across calls). Code written
against the shim behaves on CPython exactly as on a board.

Backends, the first importable one is the default:

  "cryptolib"     MicroPython's C module (esp32, rp2, unix, ...): `aes()`
                  returns the native object itself, zero overhead.
  "cryptography"  CPython with the `cryptography` package.
  "pure"          microtun.aes_pure, for ports without cryptolib (stm32
                  PYBV11): slow, table-based, allocation-free.

`aes(..., backend=name)` picks one explicitly; get_backend(name) gives a
backend's bare constructor. Bad key, IV and mode raise
ValueError naming the argument and the allowed values, where cryptolib says
just ValueError('key'), ('IV') or ('mode').
"""
if __import__("sys").implementation.name != "micropython":
    def const(x):   # CPython; MicroPython's compiler folds const() with no name bound (a global costs a board heap)
        return x

MODE_ECB = const(1)
MODE_CBC = const(2)
BACKENDS = ("cryptolib", "cryptography", "pure")

_default = None  # the default backend's name, found on first use


def get_backend(name):
    """Backend `name`'s bare `aes(key, mode[, iv])` constructor (no shim
    argument checks); ImportError where it is missing."""
    if name == "cryptolib":
        try:
            from cryptolib import aes as make
        except ImportError:
            from ucryptolib import aes as make  # MicroPython before v1.21
        return make
    if name == "pure":
        from microtun.aes_pure import aes as make
        return make
    if name == "cryptography":
        import cryptography.hazmat.primitives.ciphers  # noqa: F401
        from microtun.aes_pure import CryptographyAES as make
        return make
    raise ValueError("aes backend must be one of %s" % (BACKENDS,))


def default_backend():
    """The first of BACKENDS that imports here; found once."""
    global _default
    if _default is None:
        for name in BACKENDS:
            try:
                get_backend(name)
            except ImportError:
                continue
            _default = name
            break
    return _default


def check_args(key, mode, iv):
    """ValueError unless cryptolib.aes would take (key, mode, iv)."""
    if len(key) not in (16, 32):
        raise ValueError("aes key must be 16 or 32 bytes")
    if mode != MODE_ECB and mode != MODE_CBC:
        raise ValueError("aes mode must be MODE_ECB (1) or MODE_CBC (2)")
    if (iv is None and mode == MODE_CBC) or (iv is not None and len(iv) != 16):
        # cryptolib checks a given IV's length in ECB mode too (and ignores it).
        raise ValueError("aes iv must be 16 bytes (MODE_CBC needs one)")


def aes(key, mode, iv=None, backend=None):
    """A new one-direction AES object, like cryptolib.aes(key, mode, iv)."""
    check_args(key, mode, iv)
    make = get_backend(backend or _default or default_backend())
    if iv is None:
        return make(key, mode)
    return make(key, mode, iv)
