"""X25519, RFC 7748 §5.2 and §6.1 vectors, on every crypto backend
(mtest.crypto_backends: the pure-Python one everywhere, cryptography's on
CPython)."""
from microtun.x25519 import BASE_POINT
from mtest import unhex, raises, crypto_backends, MICROPYTHON

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


# -- the two ladders (microtun.fe25519 in native code, big ints) ------------------------------
from microtun import x25519 as _x

_P = 2 ** 255 - 19


def test_backend_is_native_on_micropython():
    # every MicroPython this suite runs on has a native emitter and the
    # module (source on the wheel, frozen on the 32-bit and qemu builds)
    assert _x.BACKEND == ("native" if MICROPYTHON else "big-int")


def _clamp(k):
    k = bytearray(k)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return k


def test_ladders_agree_on_edge_inputs():
    if _x._fe is None:
        return
    us = [0, 1, 9, _P - 1, _P, _P + 1, 2 ** 255 - 1, 2 ** 254, 0x123456789 * 2 ** 200]
    ks = [bytes(32), b"\xff" * 32, bytes(range(32)), unhex(SCALAR_MULT[0][0])]
    for k in ks:
        kc = _clamp(k)
        for u in us:
            a = _x._fe.ladder(kc, u)
            b = _x._ladder_big(kc, u)
            assert a == b, (k, u)
            assert 0 <= a < _P


def _limb(w, s, i):
    return w[40 * s + 2 * i] | w[40 * s + 2 * i + 1] << 8


def _slots(w, values):
    for s, limbs in enumerate(values):
        for i, v in enumerate(limbs):
            w[40 * s + 2 * i] = v & 255
            w[40 * s + 2 * i + 1] = v >> 8


def _value(w, s):
    return sum(_limb(w, s, i) << (13 * i) for i in range(20))


def test_largest_limbs_do_not_overflow_a_32_bit_word():
    # fe25519's bound: operands whose limbs are below 2**13 + 2 keep every
    # column below 2**31 (checked here on the 32-bit builds and the
    # Cortex-M3, where an overflow would wrap).
    fe = _x._fe
    if fe is None:
        return
    for top in (8191, 8193):
        a = [top] * 20
        b = [top - 1 - (i & 1) for i in range(20)]
        w = bytearray(400)
        _slots(w, [a, b])
        va, vb = _value(w, 0), _value(w, 1)
        fe.mul(w, 2 | 0 << 4 | 1 << 8)
        assert _value(w, 2) % _P == va * vb % _P
        fe.sq(w, 3 | 0 << 4)
        assert _value(w, 3) % _P == va * va % _P
        fe.addsub(w, 4 | 5 << 4 | 0 << 8 | 1 << 12)
        assert _value(w, 4) % _P == (va + vb) % _P
        assert _value(w, 5) % _P == (va - vb) % _P
        for s in (2, 3, 4, 5):      # results are normalized: limbs below 2**13 + 2
            assert max(_limb(w, s, i) for i in range(20)) < 8194
        fe.sub_a24(w, 6 | 0 << 4 | 1 << 8)     # slot 1 = a - b, slot 6 = a + 121665 (a - b)
        assert _value(w, 1) % _P == (va - vb) % _P
        assert _value(w, 6) % _P == (va + 121665 * (va - vb)) % _P
