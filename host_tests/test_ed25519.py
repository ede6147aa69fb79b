"""Ed25519 verification and SHA-512 (lib/microtun/ed25519.py, what a device
runs to check a release's signature; docs/UPDATE.md) against RFC 8032 §7.1
and FIPS 180-4 vectors, on every interpreter: MicroPython's hashlib has no
sha512, so there the pure-Python one runs, with 64-bit words in MPZ on the
32-bit builds. host_tests/test_update.py compares with `cryptography` on
random keys."""
from microtun import ed25519
from mtest import unhex

PORTABLE = True

# RFC 8032 §7.1 TEST 1-3: (public key, message, signature)
RFC8032 = [
    ("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"),
]


def test_sha512_fips_vectors():
    assert ed25519.sha512(b"abc") == unhex(
        "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
        "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f")
    assert ed25519.sha512(b"") == unhex(
        "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce"
        "47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e")
    # two blocks: the 112-byte FIPS 180-4 message
    assert ed25519.sha512(b"abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopq"
                          b"klmnopqrlmnopqrsmnopqrstnopqrstu") == unhex(
        "8e959b75dae313da8cf4f72814fc143f8f7779c6eb9f7fa17299aeadb6889018"
        "501d289e4900f7e4331b99dec4b5433ac7d329eeb6dd26545e96e55b874be909")


def test_rfc8032_vectors_verify():
    for i, (pub, msg, sig) in enumerate(RFC8032):
        assert ed25519.verify(unhex(pub), unhex(msg), unhex(sig)), "RFC 8032 TEST %d" % (i + 1)


def test_any_change_is_refused():
    pub, msg, sig = (unhex(x) for x in RFC8032[2])
    assert not ed25519.verify(pub, msg + b"\x00", sig)
    for i in (0, 31, 32, 63):
        bad = bytearray(sig)
        bad[i] ^= 0x01
        assert not ed25519.verify(pub, msg, bytes(bad)), i
    assert not ed25519.verify(unhex(RFC8032[0][0]), msg, sig)
    assert not ed25519.verify(pub[:31], msg, sig)
    assert not ed25519.verify(pub, msg, sig[:63])
