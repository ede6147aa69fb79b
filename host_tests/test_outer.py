"""Outer plane framing (lib/microtun/outer.py): seal / parse / verify / relay,
probe payloads and the observed-address encoding. Runs on CPython and on
the MicroPython unix port."""
from microtun import outer
from microtun.hmac import hmac_sha256
from mtest import raises, unhex, Rng, MICROPYTHON

PORTABLE = True

KEY = bytes(range(32))
HK = outer.HopKey(KEY)
HK2 = outer.HopKey(bytes(range(100, 132)))

# Payload lengths around the excerpt boundaries (32 whole, 33+ split).
LENGTHS = (0, 1, 15, 16, 17, 31, 32, 33, 34, 47, 48, 49, 64, 148, 1200)
LABELS = (1, 2, 0x123456, 0xFFFFFE, 0xFFFFFF)
TYPES = (outer.TYPE_DATA, outer.TYPE_HOP_PROBE, outer.TYPE_HOP_PROBE_REPLY, outer.TYPE_HOP_KEEPALIVE,
         outer.TYPE_PATH_CHALLENGE, outer.TYPE_PATH_RESPONSE)


def payload(n, seed=7):
    return Rng(seed + n).bytes(n)


def flip(packet, bit):
    b = bytearray(packet)
    b[bit >> 3] ^= 0x80 >> (bit & 7)
    return bytes(b)


def excerpt_positions(n):
    """Packet byte offsets the hop MAC covers in a payload of n bytes."""
    h = outer.HEADER_LEN
    if n <= 32:
        return list(range(h, h + n))
    return list(range(h, h + 16)) + list(range(h + n - 16, h + n))


# --- known answers ---------------------------------------------------------
# Computed with CPython's stdlib, independent of outer.py:
#   hmac.digest(bytes(range(32)),
#       bytes([0x11,1,2,3]) + (64).to_bytes(2,'big') + p[:16] + p[-16:], 'sha256')
#   with p = bytes(range(64))
#   = 49e79831cd4c2d3b 813a64ff1bb8927159b737bb9a0be95d164330584a0d5ab2
#   hmac.digest(bytes(range(32)),
#       bytes([0x12,0xff,0xff,0xfe]) + (20).to_bytes(2,'big') + q, 'sha256')
#   with q = bytes(range(0xa0, 0xb4))
#   = 46aea5d0a0974341 0a571fe3ef5ac5867cd60da8d07ba01517ffbe8080a08187
KAT = (
    # (type, label, payload, expected packet)
    (1, 0x010203, bytes(range(64)),
     "11010203 49e79831cd4c2d3b" + "".join("%02x" % i for i in range(64))),
    (2, 0xFFFFFE, bytes(range(0xA0, 0xB4)),
     "12fffffe 46aea5d0a0974341 a0a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3"),
)


def test_01_known_answer_vectors():
    for i, (t, label, p, want) in enumerate(KAT):
        got = outer.seal(t, label, HK, p)
        assert got == unhex(want), "KAT %d: %s" % (i, got)
        assert outer.verify(HK, got), i
        assert outer.parse(got) == (t, label), i


def test_02_mac_backends_agree():
    # The interpreter's backend (state copies on CPython), the portable one
    # and microtun.hmac agree on every message length the MAC can see.
    rng = Rng(2)
    for n in range(0, 40):
        key = rng.bytes(32)
        hk = outer.HopKey(key, any_message=True)     # the pads, also where the native MAC is used
        msg = rng.bytes(n)
        want = hmac_sha256(key, msg)
        assert outer._hmac_portable(hk, msg) == want, n
        assert outer._hmac(hk, msg) == want, n
        if outer._COPY:
            assert outer._hmac_copy(hk, msg) == want, n
            assert outer._hmac_copy(hk, msg) == want, n   # states not consumed


def test_03_roundtrip_all_types_labels_lengths():
    for t in TYPES:
        for label in LABELS:
            for n in LENGTHS:
                p = payload(n)
                pkt = outer.seal(t, label, HK, p)
                case = (t, label, n)
                assert len(pkt) == outer.HEADER_LEN + n, case
                assert outer.parse(pkt) == (t, label), case
                assert outer.reject_reason(pkt) is None, case
                assert outer.verify(HK, pkt), case
                assert not outer.verify(HK2, pkt), case
                assert pkt[outer.HEADER_LEN:] == p, case
                assert outer.label_of(pkt) == label, case


def test_04_seal_into_and_in_place_match_seal():
    buf = bytearray(1300)
    for n in LENGTHS:
        p = payload(n)
        want = outer.seal(outer.TYPE_DATA, 77, HK, p)
        k = outer.seal_into(buf, outer.TYPE_DATA, 77, HK, p)
        assert k == len(want) and bytes(buf[:k]) == want, n
        # in place: payload already at offset 12; resealing for a second
        # path only rewrites the header
        buf2 = bytearray(1300)
        buf2[12:12 + n] = p
        k = outer.seal_in_place(buf2, outer.TYPE_DATA, 77, HK, n)
        assert bytes(buf2[:k]) == want, n
        k = outer.seal_in_place(buf2, outer.TYPE_DATA, 99, HK2, n)
        assert bytes(buf2[:k]) == outer.seal(outer.TYPE_DATA, 99, HK2, p), n
        # a memoryview packet verifies too (drivers may hand us one)
        assert outer.verify(HK2, memoryview(buf2)[:k]), n


def test_05_every_header_bit_flip_rejected():
    for n in (0, 20, 32, 33, 100):
        pkt = outer.seal(outer.TYPE_DATA, 0x0A0B0C, HK, payload(n))
        for bit in range(outer.HEADER_LEN * 8):
            bad = flip(pkt, bit)
            assert outer.parse(bad) is None or not outer.verify(HK, bad), (n, bit)


def test_06_every_excerpt_bit_flip_rejected():
    for n in (1, 16, 31, 32, 33, 48, 100, 1200):
        pkt = outer.seal(outer.TYPE_DATA, 5, HK, payload(n))
        for pos in excerpt_positions(n):
            for b in range(8):
                assert not outer.verify(HK, flip(pkt, pos * 8 + b)), (n, pos, b)


def test_07_middle_of_long_payload_is_not_covered():
    # By design (docs/OUTER.md): bytes between the two 16-byte excerpt halves
    # are protected end to end by the inner AEAD, not by the hop MAC.
    pkt = outer.seal(outer.TYPE_DATA, 5, HK, payload(100))
    for pos in (12 + 16, 12 + 50, 12 + 100 - 17):
        assert outer.verify(HK, flip(pkt, pos * 8))


def test_08_length_is_covered():
    for n in (0, 1, 31, 32, 33, 64, 200):
        pkt = outer.seal(outer.TYPE_DATA, 9, HK, payload(n))
        assert not outer.verify(HK, pkt + b"\x00"), n
        if n:
            assert not outer.verify(HK, pkt[:-1]), n
        # a longer payload with the same first and last 16 bytes
        if n >= 33:
            p = payload(n)
            longer = p[:16] + b"\x00" + p[16:]
            forged = pkt[:12] + longer
            assert not outer.verify(HK, forged), n


def test_09_truncated_packets():
    pkt = outer.seal(outer.TYPE_DATA, 9, HK, payload(60))
    for k in range(len(pkt)):
        short = pkt[:k]
        if k < outer.HEADER_LEN:
            assert outer.parse(short) is None, k
            assert outer.reject_reason(short) == outer.DROP_SHORT, k
        assert not outer.verify(HK, short), k
        assert outer.relay(short, HK, 3, HK2) is None, k


# (first byte, label bytes, expected reason)
BAD_HEADERS = (
    (0x01, b"\x00\x00\x01", outer.DROP_BAD_VERSION),   # version 0
    (0x21, b"\x00\x00\x01", outer.DROP_BAD_VERSION),   # version 2
    (0xF1, b"\x00\x00\x01", outer.DROP_BAD_VERSION),   # version 15
    (0x10, b"\x00\x00\x01", outer.DROP_UNKNOWN_TYPE),  # type 0 reserved
    (0x1D, b"\x00\x00\x01", outer.DROP_UNKNOWN_TYPE),  # 13..15 reserved (7..12: DATA_CE, LOOPS)
    (0x1E, b"\x00\x00\x01", outer.DROP_UNKNOWN_TYPE),
    (0x1F, b"\x00\x00\x01", outer.DROP_UNKNOWN_TYPE),
    (0x11, b"\x00\x00\x00", outer.DROP_BAD_LABEL),     # label 0
    (0x12, b"\x00\x00\x00", outer.DROP_BAD_LABEL),
)


def test_10_bad_headers_named():
    for i, (b0, lab, reason) in enumerate(BAD_HEADERS):
        pkt = bytes((b0,)) + lab + bytes(8) + b"payload"
        assert outer.parse(pkt) is None, i
        assert outer.reject_reason(pkt) == reason, (i, outer.reject_reason(pkt))


def test_11_relay_reseals_and_keeps_payload():
    for t in TYPES:
        for n in (0, 20, 33, 1200):
            p = payload(n)
            pkt = outer.seal(t, 1000, HK, p)
            out = outer.relay(pkt, HK, 0xABCDEF, HK2)
            assert out == outer.seal(t, 0xABCDEF, HK2, p), (t, n)
            assert outer.relay(pkt, HK2, 3, HK2) is None, (t, n)
            assert outer.relay(flip(pkt, 40), HK, 3, HK2) is None, (t, n)


def test_12_api_misuse_raises_value_error():
    cases = (
        (outer.HopKey, (bytes(31),)),
        (outer.HopKey, (bytes(33),)),
        (outer.HopKey, ("k" * 32,)),
        (outer.seal, (outer.TYPE_DATA, 0, HK, b"")),
        (outer.seal, (outer.TYPE_DATA, 1 << 24, HK, b"")),
        (outer.seal, (0, 1, HK, b"")),
        (outer.seal, (13, 1, HK, b"")),
        (outer.seal, (outer.TYPE_DATA, 1, HK, bytes(65536))),
        (outer.seal_into, (bytearray(20), outer.TYPE_DATA, 1, HK, bytes(9))),
        (outer.seal_in_place, (bytearray(20), outer.TYPE_DATA, 1, HK, 9)),
        (outer.encode_addr, (5, 1, bytes(4))),
        (outer.encode_addr, (4, 1, bytes(16))),
        (outer.encode_addr, (6, 1, bytes(4))),
        (outer.encode_addr, (4, 65536, bytes(4))),
        (outer.probe_reply_payload, (bytes(33), 4, 1, bytes(4))),
        (outer.probe_reply_payload, (bytes(6), 4, 1, bytes(4))),       # reply would outgrow the probe
        (outer.probe_reply_payload, (bytes(18), 6, 1, bytes(16))),
    )
    for i, (fn, args) in enumerate(cases):
        raises(ValueError, fn, *args)


# (family, port, address bytes, encoded hex, formatted)
ADDRS = (
    (4, 7000, bytes((127, 0, 0, 1)), "04 1b58 7f000001", "127.0.0.1:7000"),
    (4, 0, bytes(4), "04 0000 00000000", "0.0.0.0:0"),
    (4, 65535, bytes((203, 0, 113, 9)), "04 ffff cb007109", "203.0.113.9:65535"),
    (6, 443, unhex("20010db8000000000000000000000001"),
     "06 01bb 20010db8000000000000000000000001", "[2001:db8:0:0:0:0:0:1]:443"),
    (6, 1, bytes(15) + b"\x01", "06 0001 00000000000000000000000000000001", "[0:0:0:0:0:0:0:1]:1"),
)


def test_13_address_encoding():
    for i, (fam, port, addr, enc, text) in enumerate(ADDRS):
        e = outer.encode_addr(fam, port, addr)
        assert e == unhex(enc), i
        assert outer.decode_addr(e) == (fam, port, addr), i
        assert outer.format_addr(fam, port, addr) == text, i
        assert outer.decode_addr(e[:-1]) is None, i
        assert outer.decode_addr(e + b"\x00") is None, i
    for bad in (b"", b"\x04", unhex("05 0001 00000000"), unhex("06 0001 00000000"),
                unhex("04 0001") + bytes(16)):
        assert outer.decode_addr(bad) is None, bad


def test_14_probe_payloads():
    body = outer.probe_body(0x01020304, 0x3FFFFFFF)
    assert body == unhex("01020304 3fffffff") + bytes(19)        # padded for an IPv6 reply
    assert outer.PROBE_MIN <= len(body) <= outer.PROBE_MAX
    assert outer.probe_fields(body) == (0x01020304, 0x3FFFFFFF)
    assert outer.probe_fields(body[:7]) is None
    for fam, port, addr, enc, _ in ADDRS:
        a = unhex(enc)
        for probe in (bytes(range(19)), body, bytes(range(32))):
            pl = outer.probe_reply_payload(probe, fam, port, addr)
            # the address first, then what fits of the probe: never longer than the probe
            assert pl == a + probe[:len(probe) - len(a)]
            assert len(pl) == len(probe)
            assert outer.parse_probe_reply(pl) == (probe[:len(probe) - len(a)], fam, port, addr)
            assert outer.parse_probe_reply(pl[:len(a) - 1]) is None
        assert outer.probe_fields(outer.parse_probe_reply(outer.probe_reply_payload(body, fam, port, addr))[0]) \
            == (0x01020304, 0x3FFFFFFF)
    assert outer.parse_probe_reply(b"") is None
    assert outer.parse_probe_reply(unhex("05 0001 00000000")) is None


def test_14b_path_challenge_and_response():
    # a challenge is 12 bytes: header with an 8-byte nonce in the MAC field;
    # the response is the header of seal(PATH_RESPONSE, label, key, nonce)
    chal = bytes((0x15, 0x01, 0x02, 0x03)) + unhex("0001020304050607")
    assert outer.parse(chal) == (outer.TYPE_PATH_CHALLENGE, 0x010203)
    resp = outer.path_response(0x010203, HK, chal)
    assert len(resp) == 12 and outer.parse(resp) == (outer.TYPE_PATH_RESPONSE, 0x010203)
    assert resp == outer.seal(outer.TYPE_PATH_RESPONSE, 0x010203, HK, chal[4:])[:12]
    assert outer.verify(HK, resp + chal[4:])                    # the MAC covers the nonce
    assert resp != outer.path_response(0x010203, HK, chal[:11] + b"\x08")
    assert resp != outer.path_response(0x010203, HK2, chal)
    assert resp != outer.path_response(0x010204, HK, chal)
    assert resp.hex() == PATH_RESPONSE_KAT


# key 00..1f, label 0x010203, nonce 00..07 (computed with CPython's hmac.digest)
PATH_RESPONSE_KAT = "16010203412c83f91edbb518"


def test_15_random_datagrams_never_raise():
    rng = Rng(15)
    count = 300 if MICROPYTHON else 3000
    for i in range(count):
        n = rng.below(80)
        d = rng.bytes(n)
        if n >= 4 and rng.below(2):
            # a plausible header so the MAC check runs
            d = bytes((0x10 | (1 + rng.below(3)),)) + d[1:]
        p = outer.parse(d)
        assert (p is None) == (outer.reject_reason(d) is not None), i
        assert not outer.verify(HK, d), i
        assert outer.relay(d, HK, 1, HK2) is None, i


def test_16_fast_and_portable_paths_agree():
    # CPython takes _verify_copy/_relay_copy for bytes packets; they must
    # give exactly what the portable code (the one MicroPython runs) gives.
    rng = Rng(16)
    for n in LENGTHS:
        p = payload(n)
        pkt = outer.seal(outer.TYPE_DATA, 1 + rng.below(outer.LABEL_MAX), HK, p)
        bad = flip(pkt, 8 * (outer.HEADER_LEN + n - 1)) if n else flip(pkt, 40)
        for packet in (pkt, bad, pkt[:5]):
            want_v = outer._verify_portable(HK, packet)
            want_r = outer._relay_portable(packet, HK, 0x345678, HK2)
            assert outer.verify(HK, packet) == want_v, n
            assert outer.relay(packet, HK, 0x345678, HK2) == want_r, n
            if outer._FAST:
                assert outer._verify_copy(HK, packet) == want_v, n
                assert outer._relay_copy(packet, HK, 0x345678, HK2) == want_r, n
        assert outer._verify_portable(HK, pkt) and not outer._verify_portable(HK, bad), n


def test_hop_keeps_the_same_wire_constants_as_outer():
    # microtun.hop keeps these private (folded into a board's code: no
    # global, no qstr) and microtun.outer public for the relays and the
    # gateway: one wire format, so the same numbers. CPython keeps hop's as
    # globals (const is the identity there), so that is where it is checked.
    if MICROPYTHON:
        return
    from microtun import hop
    for name in ("VERSION", "MAC_LEN", "KEY_LEN", "LABEL_MIN", "LABEL_MAX", "PAYLOAD_MAX"):
        assert getattr(hop, "_" + name) == getattr(outer, name), name
    assert hop._TYPE_MAX == outer._TYPE_MAX == outer.TYPE_SEG_PONG    # both keep the last type
