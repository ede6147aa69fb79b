"""The cryptolib-compatible AES shim (microtun.aes): every backend available
on this interpreter against FIPS-197 and SP 800-38A, and cryptolib's
semantics (one direction, CBC chaining across calls, output buffers, errors).
Runs on CPython (cryptography + pure) and on the unix port (cryptolib + pure)."""
from mtest import MICROPYTHON, raises, unhex
from microtun import aes

PORTABLE = True
QEMU = True      # also runs on the qemu Cortex-M board (host_tests/qemu_manifest.py)

# SP 800-38A appendix F: the same four plaintext blocks throughout.
P4 = """6bc1bee22e409f96e93d7e117393172a ae2d8a571e03ac9c9eb76fac45af8e51
        30c81c46a35ce411e5fbc1191a0a52ef f69f2445df4f9b17ad2b417be66c3710"""
K128 = "2b7e151628aed2a6abf7158809cf4f3c"
K256 = "603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4"
IV = "000102030405060708090a0b0c0d0e0f"

# (name, key, mode, iv, plaintext, ciphertext)
VECTORS = [
    ("FIPS-197 C.1 AES-128", "000102030405060708090a0b0c0d0e0f", aes.MODE_ECB, None,
     "00112233445566778899aabbccddeeff", "69c4e0d86a7b0430d8cdb78070b4c55a"),
    ("FIPS-197 C.3 AES-256", "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f", aes.MODE_ECB, None,
     "00112233445566778899aabbccddeeff", "8ea2b7ca516745bfeafc49904b496089"),
    ("SP 800-38A F.1.1 ECB-AES128", K128, aes.MODE_ECB, None, P4,
     """3ad77bb40d7a3660a89ecaf32466ef97 f5d3d58503b9699de785895a96fdbaaf
        43b1cd7f598ece23881b00e3ed030688 7b0c785e27e8ad3f8223207104725dd4"""),
    ("SP 800-38A F.1.5 ECB-AES256", K256, aes.MODE_ECB, None, P4,
     """f3eed1bdb5d2a03c064b5a7e3db181f8 591ccb10d410ed26dc5ba74a31362870
        b6ed21b99ca6f4f9f153e7b1beafed1d 23304b7a39f9f3ff067d8d8f9e24ecc7"""),
    ("SP 800-38A F.2.1 CBC-AES128", K128, aes.MODE_CBC, IV, P4,
     """7649abac8119b246cee98e9b12e9197d 5086cb9b507219ee95db113a917678b2
        73bed6b8e3c1743b7116e69e22229516 3ff1caa1681fac09120eca307586e1a7"""),
    ("SP 800-38A F.2.5 CBC-AES256", K256, aes.MODE_CBC, IV, P4,
     """f58c4c04d6e5f1ba779eabfb5f7bfbd6 9cfc4e967edb808d679f777bc6702c7d
        39f23369a9d9bacfa530e26304231461 b2eb05e2c39be9fcda6c19078c6a9d1b"""),
]


def backends():
    out = []
    for name in aes.BACKENDS:
        try:
            aes.get_backend(name)
        except ImportError:
            continue
        out.append(name)
    return out


def cases():
    for be in backends():
        for name, key, mode, iv, pt, ct in VECTORS:
            yield be, name, unhex(key), mode, unhex(iv) if iv else None, unhex(pt), unhex(ct)


def test_expected_backends_are_here():
    want = ["cryptolib", "pure"] if MICROPYTHON else ["cryptography", "pure"]
    assert backends() == want, backends()
    assert aes.default_backend() == want[0]


def test_vectors_encrypt_in_one_call():
    for be, name, key, mode, iv, pt, ct in cases():
        got = aes.aes(key, mode, iv, be).encrypt(pt)
        assert got == ct, (be, name)
        assert isinstance(got, bytes), (be, name)


def test_vectors_decrypt_in_one_call():
    for be, name, key, mode, iv, pt, ct in cases():
        assert aes.aes(key, mode, iv, be).decrypt(ct) == pt, (be, name)


def test_vectors_block_by_block_chain_across_calls():
    # A cryptolib object is stateful: CBC continues from the previous call.
    for be, name, key, mode, iv, pt, ct in cases():
        e = aes.aes(key, mode, iv, be)
        d = aes.aes(key, mode, iv, be)
        enc = b"".join(e.encrypt(pt[i:i + 16]) for i in range(0, len(pt), 16))
        dec = b"".join(d.decrypt(ct[i:i + 16]) for i in range(0, len(ct), 16))
        assert enc == ct and dec == pt, (be, name)


def test_vectors_in_place_and_into_a_longer_buffer():
    for be, name, key, mode, iv, pt, ct in cases():
        buf = bytearray(pt)
        assert aes.aes(key, mode, iv, be).encrypt(buf, buf) is buf
        assert buf == ct, (be, name)
        mv = memoryview(buf)
        aes.aes(key, mode, iv, be).decrypt(mv, mv)
        assert buf == pt, (be, name)
        out = bytearray(len(pt) + 7)
        for i in range(len(out)):
            out[i] = 0xEE
        assert aes.aes(key, mode, iv, be).encrypt(pt, out) is out
        assert out[:len(pt)] == ct and out[len(pt):] == b"\xee" * 7, (be, name)


def test_empty_input():
    for be in backends():
        for mode, iv in ((aes.MODE_ECB, None), (aes.MODE_CBC, bytes(16))):
            assert aes.aes(bytes(16), mode, iv, be).encrypt(b"") == b""


def test_one_direction_per_object():
    for be in backends():
        for first, second in (("encrypt", "decrypt"), ("decrypt", "encrypt")):
            for mode, iv in ((aes.MODE_ECB, None), (aes.MODE_CBC, bytes(16))):
                a = aes.aes(bytes(32), mode, iv, be)
                getattr(a, first)(bytes(16))
                raises(ValueError, getattr(a, second), bytes(16))
                getattr(a, first)(bytes(16))  # the first direction still works


# (case, key length, mode, iv, words the shim's message must contain)
BAD_ARGS = [
    (1, 0, aes.MODE_ECB, None, "16 or 32"),
    (2, 15, aes.MODE_ECB, None, "16 or 32"),
    (3, 24, aes.MODE_ECB, None, "16 or 32"),  # cryptolib has no AES-192
    (4, 33, aes.MODE_CBC, bytes(16), "16 or 32"),
    (5, 16, 0, None, "MODE_ECB"),
    (6, 16, 3, None, "MODE_CBC"),
    (7, 16, 6, None, "MODE_CBC"),  # CTR: only the unix coverage build has it
    (8, 16, aes.MODE_CBC, None, "iv"),
    (9, 16, aes.MODE_CBC, bytes(15), "16 bytes"),
    (10, 32, aes.MODE_CBC, bytes(17), "16 bytes"),
    (11, 16, aes.MODE_ECB, bytes(8), "16 bytes"),  # cryptolib checks it in ECB too
]


def test_bad_key_mode_iv_raise_value_error_naming_the_argument():
    for case, klen, mode, iv, words in BAD_ARGS:
        for be in backends():
            e = raises(ValueError, aes.aes, bytes(klen), mode, iv, be)
            assert words in str(e), (case, be, str(e))
        # Each backend's bare constructor refuses them too (cryptolib: terse).
        for be in backends():
            raises(ValueError, aes.get_backend(be), *((bytes(klen), mode) if iv is None else (bytes(klen), mode, iv)))


def test_ecb_ignores_a_good_iv():
    for be in backends():
        a = aes.aes(unhex(K128), aes.MODE_ECB, bytes(16), be)
        assert a.encrypt(unhex(P4)[:16]) == unhex("3ad77bb40d7a3660a89ecaf32466ef97")


# (case, input length, output length or None)
BAD_LENGTHS = [
    (1, 15, None),
    (2, 17, None),
    (3, 33, 48),
    (4, 32, 31),
    (5, 16, 0),
]


def test_bad_block_lengths_raise_value_error():
    for case, n, out in BAD_LENGTHS:
        for be in backends():
            for way in ("encrypt", "decrypt"):
                a = aes.aes(bytes(16), aes.MODE_CBC, bytes(16), be)
                args = (bytes(n),) if out is None else (bytes(n), bytearray(out))
                raises(ValueError, getattr(a, way), *args)


def test_unknown_backend():
    e = raises(ValueError, aes.aes, bytes(16), aes.MODE_ECB, None, "openssl")
    assert "cryptolib" in str(e)
