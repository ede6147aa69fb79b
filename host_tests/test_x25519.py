"""X25519, RFC 7748 §5.2 and §6.1 vectors, on every crypto backend
(mtest.crypto_backends: the pure-Python one everywhere, cryptography's on
CPython)."""
from microtun.x25519 import BASE_POINT
from mtest import unhex, raises, crypto_backends

PORTABLE = True
QEMU = True      # also runs on the qemu Cortex-M board (host_tests/qemu_manifest.py)

# RFC 7748 §5.2: (scalar, u, result)
SCALAR_MULT = [
    ("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
     "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
     "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552"),
    ("4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
     "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
     "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957"),
]


def test_rfc7748_scalar_mult():
    for c in crypto_backends():
        for k, u, r in SCALAR_MULT:
            assert c.x25519(unhex(k), unhex(u)) == unhex(r), c.name


def _iterate(c, n):
    k = u = BASE_POINT
    for _ in range(n):
        k, u = c.x25519(k, u), k
    return k


def test_rfc7748_iterated_once():
    for c in crypto_backends():
        assert _iterate(c, 1) == unhex("422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079"), c.name


def test_rfc7748_iterated_1000():
    for c in crypto_backends():
        assert _iterate(c, 1000) == unhex("684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"), c.name


def test_rfc7748_diffie_hellman():
    # RFC 7748 §6.1
    a = unhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    b = unhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    a_pub = unhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    b_pub = unhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    k = unhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    for c in crypto_backends():
        assert c.public_key(a) == a_pub, c.name
        assert c.public_key(b) == b_pub, c.name
        assert c.x25519(a, b_pub) == k, c.name
        assert c.x25519(b, a_pub) == k, c.name


def test_high_bit_of_u_is_masked():
    k, u, r = SCALAR_MULT[0]
    u = bytearray(unhex(u))
    u[31] |= 0x80
    for c in crypto_backends():
        assert c.x25519(unhex(k), bytes(u)) == unhex(r), c.name


def test_rejects_all_zero_shared_secret():
    # Low-order points (RFC 7748 §6.1, "check for all-zero value"): 0, 1 and
    # the order-8 point give an all-zero result for every scalar.
    low_order = [bytes(32), b"\x01" + bytes(31),
                 unhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")]
    for c in crypto_backends():
        for u in low_order:
            e = raises(ValueError, c.x25519, b"\x11" * 32, u)
            assert "zero" in str(e), c.name


def test_bad_lengths_name_the_argument():
    for c in crypto_backends():
        assert "scalar" in str(raises(ValueError, c.x25519, bytes(31), BASE_POINT))
        assert "u " in str(raises(ValueError, c.x25519, bytes(32), bytes(33)))
        raises(ValueError, c.x25519, "x" * 32, BASE_POINT)
        raises(ValueError, c.public_key, None)
