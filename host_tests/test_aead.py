"""AES-CCM (microtun.aead) on every backend available here: RFC 3610 and
NIST SP 800-38C vectors through the general CCM class, AES-256-CCM known
answers for the tunnel's AEAD, tampering, misuse, and the CBC object reused
across messages. Runs on CPython (AESCCM, shim over cryptography and pure)
and on the unix port (shim over cryptolib and pure)."""
from mtest import MICROPYTHON, Rng, raises, unhex
from microtun import aes
from microtun.aead import AEAD, CCM
from microtun.ccm_backends import BACKENDS

PORTABLE = True
QEMU = True      # also runs on the qemu Cortex-M board (host_tests/qemu_manifest.py)

K3610_1 = "c0c1c2c3c4c5c6c7c8c9cacbcccdcecf"
K3610_2 = "d7828d13b2b0bdc325a76236df93cc6b"
K38C = "404142434445464748494a4b4c4d4e4f"
A38C_4 = bytes(range(256)) * 256  # SP 800-38C C.4: 65536 bytes of aad

# (name, key, nonce, aad, plaintext, ciphertext || tag, tag size)
# RFC 3610 §8 packet vectors: the first 8 bytes of "total packet" are the aad.
VECTORS = [
    ("RFC 3610 #1", K3610_1, "00000003020100a0a1a2a3a4a5", "0001020304050607",
     "08090a0b0c0d0e0f101112131415161718191a1b1c1d1e",
     "588c979a61c663d2f066d0c2c0f989806d5f6b61dac38417e8d12cfdf926e0", 8),
    ("RFC 3610 #2", K3610_1, "00000004030201a0a1a2a3a4a5", "0001020304050607",
     "08090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
     "72c91a36e135f8cf291ca894085c87e3cc15c439c9e43a3ba091d56e10400916", 8),
    ("RFC 3610 #3", K3610_1, "00000005040302a0a1a2a3a4a5", "0001020304050607",
     "08090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20",
     "51b1e5f44a197d1da46b0f8e2d282ae871e838bb64da8596574adaa76fbd9fb0c5", 8),
    ("RFC 3610 #13", K3610_2, "00412b4ea9cdbe3c9696766cfa", "0be1a88bace018b1",
     "08e8cf97d820ea258460e96ad9cf5289054d895ceac47c",
     "4cb97f86a2a4689a877947ab8091ef5386a6ffbdd080f8e78cf7cb0cddd7b3", 8),
    ("RFC 3610 #14", K3610_2, "0033568ef7b2633c9696766cfa", "63018f76dc8a1bcb",
     "9020ea6f91bdd85afa0039ba4baff9bfb79c7028949cd0ec",
     "4ccb1e7ca981befaa0726c55d378061298c85c92814abc33c52ee81d7d77c08a", 8),
    ("RFC 3610 #15", K3610_2, "00103fe41336713c9696766cfa", "aa6cfa36cae86b40",
     "b916e0eacc1c00d7dcec68ec0b3bbb1a02de8a2d1aa346132e",
     "b1d23a2220ddc0ac900d9aa03c61fcf4a559a4417767089708a776796edb723506", 8),
    ("SP 800-38C C.1", K38C, "10111213141516", "0001020304050607", "20212223",
     "7162015b4dac255d", 4),
    ("SP 800-38C C.2", K38C, "1011121314151617", "000102030405060708090a0b0c0d0e0f",
     "202122232425262728292a2b2c2d2e2f", "d2a1f0e051ea5f62081a7792073d593d1fc64fbfaccd", 6),
    ("SP 800-38C C.3", K38C, "101112131415161718191a1b", "000102030405060708090a0b0c0d0e0f10111213",
     "202122232425262728292a2b2c2d2e2f3031323334353637",
     "e3b201a9f5b71a7a9b1ceaeccd97e70b6176aad9a4428aa5484392fbc1b09951", 8),
    ("SP 800-38C C.4", K38C, "101112131415161718191a1b1c", A38C_4,
     "202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f",
     "69915dad1e84c6376a68c2967e4dab615ae0fd1faec44cc484828529463ccf72b4ac6bec93e8598e7f0dadbcea5b", 14),
]

# AES-256-CCM, 12-byte nonce, 16-byte tag (the tunnel's AEAD). No standard
# publishes these parameters: the answers come from an independent
# implementation, cryptography 50.0.2's AESCCM. (key, nonce, aad, pt, ct || tag)
K256 = "808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f"
AEAD_KATS = [
    (K256, "000102030405060708090a0b", "", "", "705822f02dfb918a2122240c7b7dcdec"),
    (K256, "000102030405060708090a0b", "686472", "78", "e525b94952e7eec7720bfe32d9d6e22506"),
    (K256, "0102030405060708090a0b0c", "0001020304050607", "000102030405060708090a0b0c0d0e0f",
     "6d44304c596b9c65e34018f336000a62cf1e53bbc38b57dcb17ee2acfd2ba6c0"),
    (K256, "ffffffffffffffffffffffff", "000102030405060708090a0b0c0d0e0f10111213", bytes(range(100)),
     "ed6a5930386fbc365aa16d552b0e6c529c101f2aa85c1ff742f1b48fd8bfa74512d3ac8161139ce37c6a9262faec3512"
     "e2473f8f69170fa306dd1f9d3bca1875c8dba14130e09ef03f9609e47cde5fe2ba7a8ed5de298f4a5ce5f4e17a4860f3"
     "97f1ca857ccebf5152521b0a350a86cc8390b377"),
]


def _b(v):
    return v if isinstance(v, bytes) else unhex(v)


def backends():
    out = []
    for name in BACKENDS:
        try:
            if name == "aesccm":
                AEAD(bytes(32), backend=name)
            else:
                aes.get_backend(name)
        except (ImportError, ValueError):
            continue
        out.append(name)
    return out


def test_expected_backends_are_here():
    want = ["cryptolib", "pure"] if MICROPYTHON else ["aesccm", "cryptography", "pure"]
    assert backends() == want, backends()


def test_rfc3610_and_sp800_38c_vectors():
    for be in backends():
        for name, key, nonce, aad, pt, ct, tag in VECTORS:
            key, nonce, aad, pt, ct = _b(key), _b(nonce), _b(aad), _b(pt), _b(ct)
            c = CCM(key, len(nonce), tag, backend=be)
            assert c.seal(nonce, pt, aad) == ct, (be, name)
            assert c.open(nonce, ct, aad) == pt, (be, name)


def test_aes256_ccm_known_answers():
    for be in backends():
        for key, nonce, aad, pt, ct in AEAD_KATS:
            key, nonce, aad, pt, ct = _b(key), _b(nonce), _b(aad), _b(pt), _b(ct)
            a = AEAD(key, backend=be)
            assert a.seal(nonce, pt, aad) == ct, (be, len(pt))
            assert a.open(nonce, ct, aad) == pt, (be, len(pt))


def test_one_object_many_messages_matches_fresh_objects():
    # The CBC object is kept across messages (its chaining value is folded
    # into the next B0): a long-lived AEAD must give what fresh ones give.
    rng = Rng(7)
    key = rng.bytes(32)
    for be in backends():
        long_lived = AEAD(key, backend=be)
        for i in range(12):
            nonce = rng.bytes(12)
            pt = rng.bytes(rng.below(70) if be == "pure" else rng.below(300))
            aad = rng.bytes(rng.below(3) * 11)
            ct = long_lived.seal(nonce, pt, aad)
            assert ct == AEAD(key, backend=be).seal(nonce, pt, aad), (be, i)
            if i % 3 == 0:  # interleave opens, including failed ones
                assert long_lived.open(nonce, ct, aad) == pt, (be, i)
                assert long_lived.open(nonce, ct[:-1], aad) is None, (be, i)


def test_a_failed_call_does_not_break_the_object():
    # A MemoryError in the middle of a seal (the heap is locked) leaves the
    # CBC chaining value unknown; the next call must start afresh.
    if not MICROPYTHON:
        return
    import micropython
    a = AEAD(bytes(32))
    a.seal(bytes(12), b"warm up the buffers", b"")
    micropython.heap_lock()
    try:
        a.seal(b"\x01" * 12, b"x" * 16, b"")
    except MemoryError:
        pass
    finally:
        micropython.heap_unlock()
    assert a.seal(b"\x02" * 12, b"after", b"ad") == AEAD(bytes(32)).seal(b"\x02" * 12, b"after", b"ad")


def flip(b, i):
    b = bytearray(b)
    b[i] ^= 1
    return bytes(b)


# (case, what to change) -> open must return None
TAMPER = [
    (1, lambda n, c, a: (n, flip(c, 0), a)),  # first ciphertext byte
    (2, lambda n, c, a: (n, flip(c, 29), a)),  # last ciphertext byte
    (3, lambda n, c, a: (n, flip(c, 30), a)),  # first tag byte
    (4, lambda n, c, a: (n, flip(c, len(c) - 1), a)),  # last tag byte
    (5, lambda n, c, a: (n, c, flip(a, 0))),  # aad
    (6, lambda n, c, a: (n, c, a + b"\x00")),  # aad extended
    (7, lambda n, c, a: (n, c, b"")),  # aad dropped
    (8, lambda n, c, a: (flip(n, 11), c, a)),  # nonce
    (9, lambda n, c, a: (n, c[:-1], a)),  # truncated tag
    (10, lambda n, c, a: (n, c[1:], a)),  # truncated front
    (11, lambda n, c, a: (n, c + b"\x00", a)),  # one byte appended
    (12, lambda n, c, a: (n, c[30:], a)),  # tag alone
    (13, lambda n, c, a: (n, c[:15], a)),  # shorter than a tag
    (14, lambda n, c, a: (n, b"", a)),  # empty
    (15, lambda n, c, a: (n, bytes(len(c)), a)),  # zeros
]


def test_tampering_is_rejected_with_none():
    nonce, pt, aad = bytes(range(12)), bytes(range(30)), b"header"
    for be in backends():
        a = AEAD(bytes(range(32)), backend=be)
        ct = a.seal(nonce, pt, aad)
        assert len(ct) == 46
        for case, change in TAMPER:
            n, c, d = change(nonce, ct, aad)
            assert a.open(n, c, d) is None, (be, case)
        assert a.open(nonce, ct, aad) == pt, be  # still fine afterwards


def test_buffer_types():
    for be in backends():
        a = AEAD(bytearray(32), backend=be)
        ct = a.seal(bytearray(12), memoryview(b"payload"), bytearray(b"ad"))
        assert isinstance(ct, bytes)
        assert a.open(memoryview(bytes(12)), bytearray(ct), memoryview(b"ad")) == b"payload"
        assert a.open(bytes(12), memoryview(ct), b"ad") == b"payload"


def test_aes128_key_works_too():
    for be in backends():
        a = AEAD(bytes(16), backend=be)
        assert a.open(bytes(12), a.seal(bytes(12), b"hi", b""), b"") == b"hi"


# (case, call, words the message must contain)
MISUSE = [
    (1, lambda be: AEAD(bytes(24), backend=be), "16 or 32"),
    (2, lambda be: AEAD(bytes(31), backend=be), "16 or 32"),
    (3, lambda be: AEAD("k" * 32, backend=be), "16 or 32"),
    (4, lambda be: AEAD(bytes(32), backend=be).seal(bytes(13), b"", b""), "12 bytes"),
    (5, lambda be: AEAD(bytes(32), backend=be).seal(bytes(11), b"", b""), "12 bytes"),
    (6, lambda be: AEAD(bytes(32), backend=be).open(bytes(8), bytes(20), b""), "12 bytes"),
    (7, lambda be: AEAD(bytes(32), backend=be).seal("n" * 12, b"", b""), "nonce"),
    (8, lambda be: AEAD(bytes(32), backend=be).seal(bytes(12), "text", b""), "plaintext"),
    (9, lambda be: AEAD(bytes(32), backend=be).seal(bytes(12), b"", "aad"), "aad"),
    (10, lambda be: AEAD(bytes(32), backend=be).open(bytes(12), None, b""), "data"),
    (11, lambda be: AEAD(bytes(32), backend=be).open(bytes(12), bytes(20), 5), "aad"),
    (12, lambda be: CCM(bytes(16), 6, 16, backend=be), "7..13"),
    (13, lambda be: CCM(bytes(16), 14, 16, backend=be), "7..13"),
    (14, lambda be: CCM(bytes(16), 12, 5, backend=be), "tag"),
    (15, lambda be: CCM(bytes(16), 12, 18, backend=be), "tag"),
    (16, lambda be: CCM(bytes(16), 13, 8, backend=be).seal(bytes(13), bytes(65536), b""), "65535"),
]


def test_api_misuse_raises_value_error():
    for be in backends():
        for case, call, words in MISUSE:
            e = raises(ValueError, call, be)
            assert words in str(e), (be, case, str(e))
    e = raises(ValueError, AEAD, bytes(32), "gcm")
    assert "aesccm" in str(e)
