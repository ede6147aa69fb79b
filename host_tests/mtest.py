"""Helpers for portable tests: the same file runs under pytest (CPython) and
under host_tests/mprun.py (MicroPython unix port). Nothing here may import
pytest or anything CPython-only."""
import sys

MICROPYTHON = sys.implementation.name == "micropython"


def raises(exc_type, fn, *args, **kwargs):
    """Call fn and return the exception it raised; fail if it raised nothing
    or something other than exc_type."""
    try:
        fn(*args, **kwargs)
    except exc_type as e:
        return e
    raise AssertionError("%s did not raise %s" % (getattr(fn, "__name__", fn), exc_type.__name__))


def unhex(s):
    """Hex string (spaces and newlines allowed) to bytes."""
    return bytes.fromhex("".join(s.split()))


def hexs(b):
    return "".join("%02x" % x for x in b)


class Rng:
    """Deterministic xorshift64* generator, identical on both interpreters,
    so randomized tests see the same inputs everywhere."""

    def __init__(self, seed=1):
        self.s = (seed or 1) & 0xFFFFFFFFFFFFFFFF

    def u64(self):
        s = self.s
        s ^= s >> 12
        s ^= (s << 25) & 0xFFFFFFFFFFFFFFFF
        s ^= s >> 27
        self.s = s
        return (s * 0x2545F4914F6CDD1D) & 0xFFFFFFFFFFFFFFFF

    def below(self, n):
        return self.u64() % n

    def bytes(self, n):
        out = bytearray(n)
        for i in range(n):
            out[i] = self.u64() >> 56
        return bytes(out)


def crypto_backends():
    """Every crypto backend (microtun.crypto) this interpreter has: the
    portable PURE everywhere; on CPython also microtun_host.hostcrypto.HOST
    (the `cryptography` package). Vector tests loop over all of them."""
    from microtun.crypto import PURE
    if MICROPYTHON:
        return [PURE]
    from microtun_host.hostcrypto import HOST
    return [PURE, HOST]


def noise_suites():
    """The production Noise suite computed by each of crypto_backends()."""
    from microtun import noise
    if MICROPYTHON:
        return [noise.NOISE_IKPSK2_25519_AESCCM_SHA256]
    from microtun_host.hostcrypto import HOST_SUITE
    return [noise.NOISE_IKPSK2_25519_AESCCM_SHA256, HOST_SUITE]
