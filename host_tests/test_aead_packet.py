"""AEAD.seal(..., head, lead) and AEAD.open(..., start, lead): packets
sealed and opened without concatenating or slicing them, on every backend.
They must give exactly the bytes of the plain calls around them."""
from mtest import Rng
from microtun.aead import AEAD, CCM
from test_aead import backends

PORTABLE = True
QEMU = True      # also runs on the qemu Cortex-M board: the viper XOR in ARMv7-M code

HEADER = bytes(range(0x40, 0x50))

# (case, head length, lead length, plaintext length, aad length)
CASES = [
    (1, 16, 1, 0, 0),      # a channel byte alone
    (2, 16, 1, 63, 0),     # a small transport packet
    (3, 16, 1, 1199, 0),   # MTU-sized
    (4, 16, 0, 0, 0),      # a keepalive: no lead, no plaintext
    (5, 0, 0, 40, 0),      # plain seal through the new path
    (6, 5, 2, 30, 7),      # odd head, two lead bytes, aad
    (7, 40, 1, 15, 0),     # head longer than a block
    (8, 16, 1, 14, 20),    # lead + plaintext exactly one block, aad
    (9, 3, 0, 17, 300),    # long aad
]


def test_seal_with_head_and_lead_is_head_plus_plain_seal():
    rng = Rng(3)
    for be in backends():
        a = AEAD(rng.bytes(32), backend=be)
        for case, hl, ll, n, la in CASES:
            nonce, head, lead, pt, aad = rng.bytes(12), rng.bytes(hl), rng.bytes(ll), rng.bytes(n), rng.bytes(la)
            got = a.seal(nonce, pt, aad, head, lead)
            assert got == head + a.seal(nonce, lead + pt, aad), (be, case)
            assert a.open(nonce, got[hl:], aad) == lead + pt, (be, case)


def test_open_at_an_offset_with_a_lead_buffer():
    rng = Rng(4)
    for be in backends():
        a = AEAD(rng.bytes(32), backend=be)
        for case, hl, ll, n, la in CASES:
            nonce, head, lead, pt, aad = rng.bytes(12), rng.bytes(hl), rng.bytes(ll), rng.bytes(n), rng.bytes(la)
            packet = a.seal(nonce, pt, aad, head, lead)
            got = bytearray(ll)
            assert a.open(nonce, packet, aad, hl, got) == pt, (be, case)
            assert got == lead, (be, case)
            assert a.open(nonce, packet, aad, hl) == lead + pt, (be, case)
            assert a.open(nonce, memoryview(packet), aad, hl, bytearray(ll)) == pt, (be, case)


def test_open_at_an_offset_rejects_tampering_anywhere_after_it():
    rng = Rng(5)
    nonce = rng.bytes(12)
    for be in backends():
        a = AEAD(rng.bytes(32), backend=be)
        packet = a.seal(nonce, rng.bytes(20), b"", HEADER, b"\x07")
        assert a.open(nonce, packet, b"", 16, bytearray(1)) is not None
        for i in range(16, len(packet)):
            bad = bytearray(packet)
            bad[i] ^= 0x20
            assert a.open(nonce, bytes(bad), b"", 16, bytearray(1)) is None, (be, i)
        # the header before `start` is not the AEAD's business
        bad = bytearray(packet)
        bad[3] ^= 1
        assert a.open(nonce, bytes(bad), b"", 16, bytearray(1)) is not None, be


def test_too_short_for_the_lead_is_none():
    for be in backends():
        a = AEAD(bytes(32), backend=be)
        keepalive = a.seal(bytes(12), b"", b"", HEADER)
        assert a.open(bytes(12), keepalive, b"", 16) == b""
        assert a.open(bytes(12), keepalive, b"", 16, bytearray(1)) is None, be
        assert a.open(bytes(12), keepalive, b"", 17) is None, be
        assert a.open(bytes(12), keepalive[:20], b"", 16) is None, be


def test_general_ccm_with_head_and_lead():
    rng = Rng(6)
    for be in backends():
        for nonce_size, tag in ((7, 4), (13, 8), (11, 16)):
            c = CCM(rng.bytes(16), nonce_size, tag, backend=be)
            nonce, pt = rng.bytes(nonce_size), rng.bytes(33)
            packet = c.seal(nonce, pt, b"ad", b"HDR", b"LD")
            assert packet == b"HDR" + c.seal(nonce, b"LD" + pt, b"ad"), (be, nonce_size)
            lead = bytearray(2)
            assert c.open(nonce, packet, b"ad", 3, lead) == pt and lead == b"LD", (be, nonce_size)


# -- the XOR: native (microtun.xorbuf, viper) or big ints, the same bytes --------------------
def test_native_xor_is_used_on_micropython():
    # Every MicroPython interpreter the suite runs (the 64-bit wheel, the
    # 32-bit frozen build, the qemu Cortex-M3 board) has the native emitter
    # and the viper module: a silent fall back to the big-int XOR (4x the
    # packet in heap per seal or open) fails here. CPython has no viper.
    from microtun import aead
    from mtest import MICROPYTHON
    assert aead.XOR == ("viper" if MICROPYTHON else "big-int"), aead.XOR
    try:
        from microtun import xorbuf
    except ImportError:
        assert not MICROPYTHON
    else:
        assert aead._xor is xorbuf.xor and aead._ctr is xorbuf.ctr


def _py_xor(dst, doff, src, soff, n):
    for i in range(n):
        dst[doff + i] ^= src[soff + i]


def _py_ctr(dst, off, nonce, k, end):
    # RFC 3610 §2.3's A_i = flags || nonce || i, written as the RFC says it.
    for i in range((end + 15) // 16):
        dst[off + 16 * i:off + 16 * i + 16] = bytes([14 - k]) + bytes(nonce) + i.to_bytes(15 - k, "big")


def test_xor_and_ctr_against_python():
    # xor: every alignment of both ends (the native word loop only runs when
    # both are 4-byte aligned) and lengths around a word, into a memoryview
    # too; ctr: nonce sizes, message lengths and offsets, nothing written
    # outside the blocks.
    from microtun import aead, xorbig
    rng = Rng(8)
    src = rng.bytes(64)
    for xor, ctr in ((aead._xor, aead._ctr), (xorbig.xor, xorbig.ctr)):
        for n in (0, 1, 3, 4, 5, 8, 31, 33):
            for doff in range(5):
                for soff in range(5):
                    want = bytearray(rng.bytes(48))
                    got = bytearray(want)
                    _py_xor(want, doff, src, soff, n)
                    xor(memoryview(got) if n & 1 else got, doff, src, soff, n)
                    assert got == want, (n, doff, soff)
        for k, off, end in ((12, 0, 16), (12, 16, 1232), (7, 0, 4112), (13, 3, 32), (8, 16, 80)):
            nonce = rng.bytes(k)
            want = bytearray(rng.bytes(off + end + 16))
            got = bytearray(want)
            _py_ctr(want, off, nonce, k, end)
            ctr(memoryview(got), off, memoryview(nonce) if k & 1 else nonce, k, end)
            assert got == want, (k, off, end)


def test_xor_in_use_and_python_loops_give_the_same_packets():
    # seal/open with the XOR and counter blocks in use (native on MicroPython, big
    # ints on CPython), with plain Python loops and with the big-int
    # fallback in their place: the same packets, each opened, and the same
    # as the plain seal.
    from microtun import aead, xorbig
    rng = Rng(9)
    saved = aead._xor, aead._ctr
    be = "cryptolib" if "cryptolib" in backends() else "pure"
    try:
        for case, hl, ll, n, la in CASES + [(10, 16, 1, 1200, 0), (11, 17, 3, 97, 5), (12, 1, 0, 4, 0)]:
            nonce, head, lead, pt, aad = rng.bytes(12), rng.bytes(hl), rng.bytes(ll), rng.bytes(n), rng.bytes(la)
            key = rng.bytes(32)
            out = []
            for fns in (saved, (_py_xor, _py_ctr), (xorbig.xor, xorbig.ctr)):
                aead._xor, aead._ctr = fns
                a = AEAD(key, backend=be)
                packet = a.seal(nonce, pt, aad, head, lead)
                out.append(packet)
                got = bytearray(ll)
                assert a.open(nonce, packet, aad, hl, got) == pt and got == lead, (case, fns)
                assert a.open(nonce, packet[:-1] + bytes([packet[-1] ^ 1]), aad, hl, got) is None, (case, fns)
            assert out[0] == out[1] == out[2], case
            aead._xor, aead._ctr = saved
            assert out[0] == head + AEAD(key).seal(nonce, lead + pt, aad), case
    finally:
        aead._xor, aead._ctr = saved
