"""The host's straight-line responder and keypair (issue 15: the gateway's
first contacts and data plane in fewer Python layers) against the portable
code they stand in for: microtun_host.hostresponder.HostResponder against
microtun.responder.NoiseResponder (the general Noise state machine), and
HostKeypair against microtun.keypair.Keypair: same bytes, same keys, the
same refusals."""
import pytest

from microtun import messages as m
from microtun import noise
from microtun.endpoint import Device
from microtun.handshake import create_initiation, read_response
from microtun.keypair import Keypair
from microtun.noise import NoiseError
from microtun.responder import Gateway, NoiseResponder, create_response
from microtun.stale import open_stale
from microtun.x25519 import public_key, x25519
from microtun_host.hostcrypto import HOST_SUITE
from microtun_host.hostkeypair import HostKeypair
from microtun_host.hostresponder import HostResponder
from mtest import Rng

_rng = Rng(1515)


def _pair():
    k = _rng.bytes(32)
    return k, public_key(k)


S_I, S_R, E_I, E_R = _pair(), _pair(), _pair(), _pair()
PSK = _rng.bytes(32)
FRESH = bytes(range(12))
SUITE = noise.NOISE_IKPSK2_25519_AESCCM_SHA256


def _init(s_i=S_I, e=E_I[0]):
    return create_initiation(s_i, S_R[1], PSK, 0x01020304, FRESH, m.mac1_key(S_R[1]), None, e=e)


def _flip(b, i):
    b = bytearray(b)
    b[i] ^= 1
    return bytes(b)


def test_response_and_keys_are_the_noise_state_machines_byte_for_byte():
    host = HostResponder()
    ss = x25519(S_R[0], S_I[1])
    for psk in (PSK, None):
        for cached in (None, ss):
            ini, msg, _ = _init()
            hs, sender, fresh = host.read_initiation(msg, S_R, lambda rs: cached)
            assert (hs.rs, hs.ss, sender, fresh) == (S_I[1], ss, 0x01020304, FRESH)
            ref = noise.HandshakeState(SUITE, False, S_R, prologue=m.PROLOGUE, e=E_R, ss_lookup=lambda rs: cached)
            assert ref.read_message(msg[m.INIT_NOISE:m.INIT_MAC1]) == FRESH
            assert (hs.h, hs.ck) == (ref._sym.h, ref._sym.ck)           # what a STALE is sealed under
            mac1k = m.mac1_key(S_I[1])
            resp, send, recv = host.respond(hs, psk, 0x0A0B0C0D, sender, mac1k, e=E_R[0])
            assert resp == create_response(ref, psk, 0x0A0B0C0D, sender, mac1k, None)
            recv_cs, send_cs = ref.split()
            assert (send, recv) == (send_cs.k, recv_cs.k)
            if psk is PSK:      # and the device takes it
                assert read_response(ini, resp) == (0x0A0B0C0D, recv, send)


def test_stale_answer_opens_on_the_device():
    host = HostResponder()
    ini, msg, _ = _init()
    hs, sender, _f = host.read_initiation(msg, S_R, lambda rs: None)
    value = (7).to_bytes(4, "big") + bytes(8)
    st = host.stale(hs, sender, value)
    assert len(st) == m.STALE_LEN and open_stale(ini.ck, ini.h, st) == value


def test_bad_inits_raise_noise_errors_as_the_noise_path_does():
    host, ref = HostResponder(), NoiseResponder(SUITE)
    _ini, good, _ = _init()
    cases = [_flip(good, i) for i in range(m.INIT_NOISE, m.INIT_MAC1, 7)]     # e, enc_s, enc_payload
    low = bytearray(good)
    low[m.INIT_NOISE:m.INIT_NOISE + 32] = bytes(32)                     # low-order e: all-zero DH
    cases.append(bytes(low))
    for i, msg in enumerate(cases):
        for r in (host, ref):
            with pytest.raises(NoiseError):
                r.read_initiation(msg, S_R, lambda rs: None)
    with pytest.raises(NoiseError, match="low_order"):
        host.read_initiation(bytes(low), S_R, lambda rs: None)
    with pytest.raises(NoiseError):
        host.read_initiation(good[:-1], S_R, lambda rs: None)

    def unknown(rs):
        raise NoiseError("unknown_peer")
    with pytest.raises(NoiseError, match="unknown_peer"):
        host.read_initiation(good, S_R, unknown)


def test_gateway_on_the_host_suite_counts_the_same_drops():
    """One device, the same INITs (good, replayed, tampered, stale) into a
    gateway on each responder: the same counters."""
    results = []
    for suite in (SUITE, HOST_SUITE):
        gw = Gateway(S_R[0], suite=suite)
        dev = Device(S_I[0], gw.public_key, boot_counter=5)
        gw.add_peer(dev.public_key, name="d")
        dev.connect(1000)
        init = dev.datagrams_to_send()[0][0]
        gw.receive_datagram(init, "l", 1000)
        gw.receive_datagram(init, "l", 1001)                            # the same INIT again: init_replay
        gw.receive_datagram(_flip(init, 50), "l", 1002)                 # enc_s tampered: bad mac1 first
        old = Device(S_I[0], gw.public_key, boot_counter=4)             # a boot counter behind: STALE
        old.connect(7000)
        gw.receive_datagram(old.datagrams_to_send()[0][0], "l", 7000)
        out = gw.datagrams_to_send()
        results.append((sorted(gw.stats.items()), [len(p) for p, _a in out]))
    assert results[0] == results[1]
    assert results[0][1] == [92, 48]


def _kp(cls, window=32):
    return cls(bytes(range(32)), bytes(range(1, 33)), 11, 22, False, 0, window)


def test_host_keypair_seals_the_same_bytes():
    a, b = _kp(Keypair), _kp(HostKeypair)
    for i, (pt, ch, room) in enumerate([(b"hello", 3, False), (b"", -1, False), (b"x" * 300, 0, False),
                                        (b"roomy", 9, True), (b"", -1, True), (bytearray(b"ba"), 1, False),
                                        (memoryview(b"mv"), 2, False)]):
        pa, pb = a.seal(pt, ch, room), b.seal(pt, ch, room)
        assert pa == pb, i
        assert type(pa) is type(pb), i


def test_host_keypair_opens_as_the_portable_one():
    sender = _kp(Keypair)
    sender.send_aead, sender.recv_aead = sender.recv_aead, sender.send_aead      # the other end's view
    pkts = [bytes(sender.seal(b"data %d" % i, 5)) for i in range(120)]
    keepalive = bytes(sender.seal(b""))
    results = []
    for cls in (Keypair, HostKeypair):
        kp = _kp(cls)
        lead = bytearray(1)
        got = []
        order = [0, 1, 1, 99, 2, 0, 50, 98]       # fresh, duplicate, far ahead, then too old for the window
        for i in order:
            r = kp.open(pkts[i], lead)
            got.append((r, lead[0]) if not isinstance(r, str) else r)
        got.append(kp.open(_flip(pkts[110], 30), lead))               # tampered
        got.append(kp.open(pkts[111][:31] + b"\x00", lead))           # too short for its tag
        r = kp.open(memoryview(pkts[110]), lead)                      # a view, as the server passes
        got.append((r, lead[0]))
        got.append(kp.open(keepalive))                                 # no lead: a keepalive
        got.append(kp.open(keepalive, lead))                           # a keepalive has no channel byte
        results.append(got)
    assert results[0] == results[1]
    assert results[1][:4] == [(b"data 0", 5), (b"data 1", 5), "duplicate", (b"data 99", 5)]
    assert results[1][4:] == ["replay", "replay", "replay", (b"data 98", 5), "decrypt_failed", "decrypt_failed",
                             (b"data 110", 5), b"", "duplicate"]
