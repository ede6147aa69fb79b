"""The device's IKpsk2 initiator (microtun.handshake, written out for the one
pattern) against the general Noise state machine (microtun.noise, itself
checked against the noiseprotocol package): same bytes, same keys, and every
bad RESPONSE refused without raising. Both interpreters."""
from mtest import Rng
from microtun import messages as m
from microtun import noise
from microtun.handshake import create_initiation, read_response
from microtun.responder import create_response, read_initiation
from microtun.x25519 import public_key, x25519

PORTABLE = True
QEMU = True      # also runs on the qemu Cortex-M board (host_tests/qemu_manifest.py)

_rng = Rng(7748)


def _pair():
    k = _rng.bytes(32)
    return k, public_key(k)


S_I, S_R, E_I, E_R = _pair(), _pair(), _pair(), _pair()
PSK = _rng.bytes(32)
FRESH = bytes(range(12))
SUITE = noise.NOISE_IKPSK2_25519_AESCCM_SHA256


def _init(psk=PSK, ss=None, cookie=None):
    return create_initiation(S_I, S_R[1], psk, 0x01020304, FRESH, m.mac1_key(S_R[1]), cookie, ss=ss, e=E_I[0])


def _respond(msg, psk=PSK, e=E_R):
    res = noise.HandshakeState(SUITE, False, S_R, prologue=m.PROLOGUE, e=e)
    assert res.read_message(msg[m.INIT_NOISE:m.INIT_MAC1]) == FRESH
    res.set_psk(psk if psk is not None else bytes(32))
    body = m.header(m.TYPE_RESPONSE) + (0x0A0B0C0D).to_bytes(4, "big") + (0x01020304).to_bytes(4, "big")
    resp, _ = m.finish(body + res.write_message(b""), m.mac1_key(S_I[1]), None)
    return res, resp


def test_init_is_byte_for_byte_the_general_state_machines():
    for psk in (PSK, None):
        for ss in (None, x25519(S_I[0], S_R[1])):
            hs, msg, mac1 = _init(psk, ss)
            ini = noise.HandshakeState(SUITE, True, S_I, rs=S_R[1], psk=psk, prologue=m.PROLOGUE, e=E_I)
            assert msg[m.INIT_NOISE:m.INIT_MAC1] == ini.write_message(FRESH)
            assert hs.h == ini.handshake_hash
            assert len(msg) == m.INIT_LEN and mac1 == msg[m.INIT_MAC1:m.INIT_MAC2]
            assert hs.dh_count == (2 if ss is not None else 3)
            # mac1's key None: made from the responder's public key inside
            # (the device's way: not held through the X25519s), same message
            hs2, msg2, mac1b = create_initiation(S_I, S_R[1], psk, 0x01020304, FRESH, None, None, ss=ss, e=E_I[0])
            assert (msg2, mac1b, hs2.h, hs2.ck) == (msg, mac1, hs.h, hs.ck)


def test_response_gives_the_split_keys():
    for psk in (PSK, None):
        hs, msg, _ = _init(psk)
        res, resp = _respond(msg, psk)
        keys = read_response(hs, resp)
        assert keys is not None, psk
        recv_cs, send_cs = res.split()    # c1 is initiator -> responder
        assert keys == (0x0A0B0C0D, recv_cs.k, send_cs.k)
        assert hs.dh_count == 5


def test_the_gateways_own_reader_accepts_the_init():
    hs, msg, _ = _init()
    res, sender, fresh = read_initiation(msg, S_R, lambda rs: None)
    assert (sender, fresh, res.rs) == (0x01020304, FRESH, S_I[1])
    resp = create_response(res, PSK, 0x55, sender, m.mac1_key(S_I[1]), None)
    keys = read_response(hs, resp)
    recv_cs, send_cs = res.split()
    assert keys == (0x55, recv_cs.k, send_cs.k)


def _flip(b, i):
    b = bytearray(b)
    b[i] ^= 1
    return bytes(b)


def test_bad_responses_are_refused_without_raising():
    hs, msg, _ = _init()
    good = _respond(msg)[1]
    bad = [_flip(good, i) for i in range(m.RESP_NOISE, m.RESP_MAC1)]     # every byte of e and the tag
    bad.append(_respond(msg, psk=bytes(32))[1])                          # another psk
    low = bytearray(good)
    low[m.RESP_NOISE:m.RESP_NOISE + 32] = bytes(32)                       # a low-order point: all-zero DH
    bad.append(bytes(low))
    for i, resp in enumerate(bad):
        assert read_response(_init()[0], resp) is None, i
    assert read_response(hs, good) is not None


def test_a_response_with_a_payload_is_refused():
    hs, msg, _ = _init()
    res = noise.HandshakeState(SUITE, False, S_R, prologue=m.PROLOGUE, e=E_R)
    res.read_message(msg[m.INIT_NOISE:m.INIT_MAC1])
    res.set_psk(PSK)
    noise_msg = res.write_message(b"x")          # 49 bytes: does not fit RESPONSE's 48
    body = m.header(m.TYPE_RESPONSE) + bytes(8) + noise_msg[:48]
    resp, _ = m.finish(body, m.mac1_key(S_I[1]), None)
    assert read_response(hs, resp) is None
