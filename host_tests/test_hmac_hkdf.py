"""HMAC-SHA256 (RFC 4231), HKDF (RFC 5869) and constant-time compare; HMAC
and the Noise HKDF on every crypto backend (mtest.crypto_backends)."""
from microtun.hmac import hmac_sha256, ct_equal
from mtest import unhex, crypto_backends

PORTABLE = True
QEMU = True      # also runs on the qemu Cortex-M board (host_tests/qemu_manifest.py)

# RFC 4231 §4.2-4.8: (case, key, data, HMAC-SHA-256, truncate to bytes)
RFC4231 = [
    (1, "0b" * 20, b"Hi There".hex(),
     "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7", 32),
    (2, b"Jefe".hex(), b"what do ya want for nothing?".hex(),
     "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843", 32),
    (3, "aa" * 20, "dd" * 50,
     "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe", 32),
    (4, "0102030405060708090a0b0c0d0e0f10111213141516171819", "cd" * 50,
     "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b", 32),
    (5, "0c" * 20, b"Test With Truncation".hex(), "a3b6167473100ee06e0c796c2955552b", 16),
    (6, "aa" * 131, b"Test Using Larger Than Block-Size Key - Hash Key First".hex(),
     "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54", 32),
    (7, "aa" * 131,
     b"This is a test using a larger than block-size key and a larger than block-size data. "
     b"The key needs to be hashed before being used by the HMAC algorithm.".hex(),
     "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2", 32),
]


def test_hmac_rfc4231():
    for c in crypto_backends():
        for case, key, data, mac, n in RFC4231:
            got = c.hmac_sha256(unhex(key), unhex(data))[:n]
            assert got == unhex(mac), "RFC 4231 case %d, %s" % (case, c.name)


def test_hmac_two_part_message():
    key = b"k" * 40
    for c in crypto_backends():
        assert c.hmac_sha256(key, b"hello ", b"world") == hmac_sha256(key, b"hello world"), c.name


# RFC 5869 Appendix A.1-A.3 (SHA-256): (case, ikm, salt, info, L, prk, okm)
RFC5869 = [
    (1, "0b" * 22, "000102030405060708090a0b0c", "f0f1f2f3f4f5f6f7f8f9", 42,
     "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5",
     "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"),
    (2, "".join("%02x" % i for i in range(0x00, 0x50)),
     "".join("%02x" % i for i in range(0x60, 0xB0)),
     "".join("%02x" % i for i in range(0xB0, 0x100)), 82,
     "06a6b88c5853361a06104c9ceb35b45cef760014904671014a193f40c15fc244",
     "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c59045a99cac7827271cb41c65e590e09"
     "da3275600c2f09b8367793a9aca3db71cc30c58179ec3e87c14c01d5c1f3434f1d87"),
    (3, "0b" * 22, "", "", 42,
     "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04",
     "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8"),
]


# RFC 5869's HKDF, the reference microtun.hmac.noise_hkdf is checked against
# (the package has only Noise's form: a board holds no code it does not run)
def hkdf_extract(salt, ikm):
    """RFC 5869 §2.2. An empty salt means HashLen zero bytes."""
    return hmac_sha256(salt if salt else bytes(32), ikm)


def hkdf_expand(prk, info, n):
    """RFC 5869 §2.3: n bytes of output keying material."""
    assert n <= 255 * 32
    out = b""
    t = b""
    i = 1
    while len(out) < n:
        t = hmac_sha256(prk, t + info + bytes((i,)))
        out += t
        i += 1
    return out[:n]


def hkdf(salt, ikm, info, n):
    return hkdf_expand(hkdf_extract(salt, ikm), info, n)


def test_hkdf_rfc5869():
    for case, ikm, salt, info, n, prk, okm in RFC5869:
        assert hkdf_extract(unhex(salt), unhex(ikm)) == unhex(prk), "RFC 5869 A.%d PRK" % case
        assert hkdf_expand(unhex(prk), unhex(info), n) == unhex(okm), "RFC 5869 A.%d OKM" % case
        assert hkdf(unhex(salt), unhex(ikm), unhex(info), n) == unhex(okm)


def test_noise_hkdf_matches_rfc5869_expand():
    # Noise §4.3 HKDF is RFC 5869 with the chaining key as salt and empty info.
    ck, ikm = b"c" * 32, b"i" * 32
    for c in crypto_backends():
        for ikm_ in (ikm, b""):
            full = hkdf(ck, ikm_, b"", 96)
            two = c.noise_hkdf(ck, ikm_, 2)
            three = c.noise_hkdf(ck, ikm_, 3)
            assert two == (full[:32], full[32:64]), c.name
            assert three == (full[:32], full[32:64], full[64:]), c.name


def test_ct_equal():
    for a, b, expect in [
        (b"", b"", True), (b"abc", b"abc", True), (b"abc", b"abd", False),
        (b"abc", b"ab", False), (bytes(16), bytes(16), True), (b"\x80" + bytes(15), bytes(16), False),
        (bytearray(b"xy"), b"xy", True),
    ]:
        assert ct_equal(a, b) == expect, (a, b)
