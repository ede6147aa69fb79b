"""The hop MAC in native code (lib/microtun/hopmac.py, viper): the same
MACs as HMAC-SHA256 computed independently (microtun.hmac), for every
excerpt shape, and nothing allocated per MAC. CPython has no viper: there
the hop MAC is hashlib's (hop.HMAC == "copy") and only the agreement of
HopKey kinds is checked."""
import gc

from microtun import hop, outer
from microtun.hmac import hmac_sha256
from mtest import Rng, MICROPYTHON

PORTABLE = True
QEMU = True      # also runs on the qemu Cortex-M board: the SHA-256 in ARMv7-M code

# payload lengths around the excerpt's boundaries (32 whole, 33+ first and last 16)
LENGTHS = (0, 1, 3, 4, 15, 16, 17, 31, 32, 33, 34, 47, 48, 49, 55, 56, 64, 100, 1200)


def mac_input(pkt, n):
    ex = pkt[12:12 + n] if n <= 32 else pkt[12:28] + pkt[12 + n - 16:12 + n]
    return bytes(pkt[0:4]) + bytes((n >> 8, n & 0xFF)) + bytes(ex)


def test_native_mac_is_used_on_micropython():
    # every MicroPython interpreter the suite runs has the native emitter and
    # the module (the wheel compiles it from source, the 32-bit build and the
    # Cortex-M3 board have it frozen): a silent fall back to hashlib fails here
    assert hop.HMAC == ("native" if MICROPYTHON else "copy"), hop.HMAC


def test_macs_are_hmac_sha256_of_the_excerpt():
    rng = Rng(41)
    for n in LENGTHS:
        key = rng.bytes(32)
        hk = hop.HopKey(key)
        t = 1 + rng.below(7)
        label = 1 + rng.below(outer.LABEL_MAX)
        pkt = bytearray(12 + n)
        pkt[12:] = rng.bytes(n)
        assert hop.seal_in_place(pkt, t, label, hk, n) == 12 + n
        assert bytes(pkt[4:12]) == hmac_sha256(key, mac_input(pkt, n))[:8], n
        assert hop.verify(hk, pkt) and hop.verify(hk, bytes(pkt)) and hop.verify(hk, memoryview(pkt)), n
        # a key with the pads too (the responder's mac1 check) seals the same packet
        again = bytearray(pkt)
        hop.seal_in_place(again, t, label, hop.HopKey(key, any_message=True), n)
        assert again == pkt, n
        for i in [0, 3, 4, 11] + ([12, 11 + n] if n else []):
            bad = bytearray(pkt)
            bad[i] ^= 0x01
            assert not hop.verify(hk, bad), (n, i)


def test_portable_mac_on_every_interpreter():
    # hashlib's MAC, written into the header byte by byte: what a board runs
    # without the native module (a .mpy deployment: hopmac is frozen only),
    # forced here on every interpreter the suite has
    saved = hop._native, hop._COPY, hop._hmac
    hop._native, hop._COPY, hop._hmac = None, False, hop._hmac_portable
    try:
        rng = Rng(43)
        for n in LENGTHS:
            key = rng.bytes(32)
            hk = hop.HopKey(key)
            pkt = bytearray(12 + n)
            pkt[12:] = rng.bytes(n)
            hop.seal_in_place(pkt, hop.TYPE_DATA, 1 + rng.below(outer.LABEL_MAX), hk, n)
            assert bytes(pkt[4:12]) == hmac_sha256(key, mac_input(pkt, n))[:8], n
            assert hop.verify(hk, pkt), n
            pkt[4] ^= 0x80
            assert not hop.verify(hk, pkt), n
    finally:
        hop._native, hop._COPY, hop._hmac = saved


def test_nothing_allocated_per_mac():
    hk = hop.HopKey(bytes(range(32)))
    pkt = bytearray(12 + 1200)
    hop.seal_in_place(pkt, hop.TYPE_DATA, 5, hk, 1200)
    gc.collect()
    if not MICROPYTHON or hop.HMAC != "native":
        return
    gc.disable()
    try:
        a = gc.mem_alloc()
        for _ in range(5):
            hop.seal_in_place(pkt, hop.TYPE_DATA, 5, hk, 1200)
            assert hop.verify(hk, pkt)
        used = gc.mem_alloc() - a
    finally:
        gc.enable()
    assert used == 0, used
