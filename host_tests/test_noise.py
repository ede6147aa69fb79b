"""Noise IKpsk2 handshake (microtun.noise) with the production AES-CCM suite,
on CPython and on the MicroPython unix port. Interop with an independent
implementation is in test_noise_interop.py (host-only)."""
import hashlib

from mtest import Rng, raises, unhex, noise_suites
from microtun import noise
from microtun.noise import HandshakeState, NoiseError, CipherState, SymmetricState, Suite
from microtun.x25519 import x25519, public_key

PORTABLE = True
QEMU = True      # also runs on the qemu Cortex-M board (host_tests/qemu_manifest.py)

SUITE = noise.NOISE_IKPSK2_25519_AESCCM_SHA256
_rng = Rng(34)


def _keypair():
    priv = _rng.bytes(32)
    return priv, public_key(priv)


S_I, S_R, S_OTHER, E_I, E_R = _keypair(), _keypair(), _keypair(), _keypair(), _keypair()
PSK = _rng.bytes(32)
SS = x25519(S_I[0], S_R[1])
SS_WRONG = bytes(b ^ 1 for b in SS)


def initiator(**kw):
    args = dict(rs=S_R[1], psk=PSK, prologue=b"mt", e=E_I)
    args.update(kw)
    return HandshakeState(args.pop("suite", SUITE), True, args.pop("s", S_I), **args)


def responder(**kw):
    args = dict(psk=PSK, prologue=b"mt", e=E_R)
    args.update(kw)
    return HandshakeState(args.pop("suite", SUITE), False, args.pop("s", S_R), **args)


def handshake(ini, res, p1=b"", p2=b""):
    m1 = ini.write_message(p1)
    assert res.read_message(m1) == p1
    m2 = res.write_message(p2)
    assert ini.read_message(m2) == p2
    return m1, m2


def test_handshake_and_transport():
    for suite in noise_suites():     # every crypto backend, generated ephemerals
        _handshake_and_transport(suite)


def _handshake_and_transport(suite):
    ini, res = initiator(e=None, suite=suite), responder(e=None, suite=suite)
    m1, m2 = handshake(ini, res, b"t=1", b"ok")
    assert len(m1) == 32 + 48 + 3 + 16 and len(m2) == 32 + 2 + 16
    assert ini.complete and res.complete
    assert res.rs == S_I[1]
    assert ini.handshake_hash == res.handshake_hash
    i_send, i_recv = ini.split()
    r_recv, r_send = res.split()  # c1 is initiator -> responder
    for i, pt in enumerate((b"", b"a", b"x" * 100, bytes(range(256)))):
        ct = i_send.encrypt_with_ad(b"", pt)
        assert len(ct) == len(pt) + 16
        assert r_recv.decrypt_with_ad(b"", ct) == pt
        assert r_recv.n == i + 1
        back = r_send.encrypt_with_ad(b"ad", pt)
        assert i_recv.decrypt_with_ad(b"ad", back) == pt
    # A replay (nonce moved on) and a wrong ad fail and leave n alone.
    raises(NoiseError, r_recv.decrypt_with_ad, b"", ct)
    n = i_recv.n
    raises(NoiseError, i_recv.decrypt_with_ad, b"", r_send.encrypt_with_ad(b"ad", b"z"))
    assert i_recv.n == n


def test_empty_payload_message_sizes():
    m1, m2 = handshake(initiator(), responder())
    assert (len(m1), len(m2)) == (96, 48)


def test_known_answer():
    # Fixed keys and ephemerals. test_noise_interop.py checks these bytes on
    # CPython against cryptography's AESCCM; here both interpreters must
    # reproduce them with microtun.aead, every crypto backend, and every
    # pairing of backends (initiator on one, responder on another).
    for si in noise_suites():
        for sr in noise_suites():
            ini, res = initiator(suite=si), responder(suite=sr)
            m1, m2 = handshake(ini, res, b"p1", b"p2")
            what = "%s -> %s" % (si.crypto.name, sr.crypto.name)
            assert m1 == KAT_M1, what
            assert m2 == KAT_M2, what
            assert ini.split()[0].encrypt_with_ad(b"", b"data") == KAT_T1, what
            assert res.split()[1].encrypt_with_ad(b"", b"data") == ini.split()[1].encrypt_with_ad(b"", b"data")


KAT_M1 = unhex("""
    52c19ddaee9afbc7af7fed1f48a579a883b778446accac9a45434f1c1ff9f518
    c8ad846ea9b344615b1e9725ebc53db23d515bb689f51861c836575a363a479c
    0767f550307118222e44ba50945b96edc2110321c358d443aa0ef04a59ff15a4
    5d0b""")
KAT_M2 = unhex("""
    453b2b3809118dd9ee9f98c97ce5b5d76a3fde0a06cd523d1dcd503ef639866f
    12771940fba98df921bb6f8d26d81814f841""")
KAT_T1 = unhex("1e88f923ff7c5f3a6b3c98b727c4f0a8538d76e6")


# name, initiator kwargs, responder kwargs, message that must fail (1 or 2)
FAILURES = (
    ("wrong responder static key", {"rs": S_OTHER[1]}, {}, 1),
    ("responder has another static key", {}, {"s": S_OTHER}, 1),
    ("wrong psk", {"psk": bytes(32)}, {}, 2),
    ("psk missing on one side", {}, {"psk": None}, 2),
    ("prologue mismatch", {"prologue": b"x"}, {}, 1),
    ("wrong cached ss (initiator)", {"ss": SS_WRONG}, {}, 1),
    ("wrong cached ss (responder)", {}, {"ss_lookup": lambda rs: SS_WRONG}, 1),
)


def test_failures_table():
    for suite in noise_suites():
        for name, ikw, rkw, bad in FAILURES:
            _failure(suite, ikw, rkw, bad)


def _failure(suite, ikw, rkw, bad):
    ini, res = initiator(suite=suite, **ikw), responder(suite=suite, **rkw)
    m1 = ini.write_message(b"")
    if bad == 1:
        raises(NoiseError, res.read_message, m1)
        # A failed HandshakeState is dead: further use is API misuse.
        raises(ValueError, res.write_message, b"")
        return
    res.read_message(m1)
    raises(NoiseError, ini.read_message, res.write_message(b""))
    raises(ValueError, ini.split)


def _bad_messages(good):
    # (reason, message): truncations, an extra byte, and the peer's e (the
    # first 32 bytes) replaced by low-order points: 0 and 1 give an all-zero
    # X25519 result.
    yield "too_short", good[:0]
    yield "too_short", good[:31]
    yield "too_short", good[:-1]  # payload shorter than its tag
    yield "bad_tag", good + b"\x00"
    for u in (bytes(32), b"\x01" + bytes(31)):
        yield "low_order", u + good[32:]


def test_malformed_messages():
    for suite in noise_suites():
        _malformed(suite)


def _malformed(suite):
    m1 = initiator(suite=suite).write_message(b"")
    for reason, bad in _bad_messages(m1):
        e = raises(NoiseError, responder(suite=suite, ss_lookup=lambda rs: SS).read_message, bad)
        assert str(e) == reason, (reason, str(e), suite.crypto.name)
    res = responder(suite=suite)
    res.read_message(m1)
    m2 = res.write_message(b"")
    for reason, bad in _bad_messages(m2):
        ini = initiator(suite=suite, ss=SS)
        ini.write_message(b"")
        e = raises(NoiseError, ini.read_message, bad)
        assert str(e) == reason, (reason, str(e))


def _flip(msg, i):
    # One bit per byte, rotating through the bit positions, so byte 31 (the
    # top of the e public key) loses the bit that X25519 itself ignores.
    b = bytearray(msg)
    b[i] ^= 1 << (i % 8)
    return bytes(b)


def test_tampered_message1_every_byte():
    m1 = initiator(ss=SS).write_message(b"payload")
    for i in range(len(m1)):
        res = responder(ss_lookup=lambda rs: SS)
        raises(NoiseError, res.read_message, _flip(m1, i))
    responder(ss_lookup=lambda rs: SS).read_message(m1)  # untampered still fine


def test_tampered_message2_every_byte():
    ini = initiator(ss=SS)
    m1 = ini.write_message(b"")
    res = responder(ss_lookup=lambda rs: SS)
    res.read_message(m1)
    m2 = res.write_message(b"ok")
    for i in range(len(m2)):
        ini = initiator(ss=SS)
        ini.write_message(b"")
        raises(NoiseError, ini.read_message, _flip(m2, i))
    ini = initiator(ss=SS)
    ini.write_message(b"")
    assert ini.read_message(m2) == b"ok"


def test_responder_sets_psk_after_learning_rs():
    # The responder knows which device it talks to only after message 1.
    for psk, ok in ((PSK, True), (bytes(32), False)):
        ini, res = initiator(), responder(psk=None)
        res.read_message(ini.write_message(b""))
        assert res.rs == S_I[1]
        res.set_psk(psk)
        m2 = res.write_message(b"")
        if ok:
            ini.read_message(m2)
            assert ini.handshake_hash == res.handshake_hash
        else:
            raises(NoiseError, ini.read_message, m2)
    raises(ValueError, res.set_psk, PSK)  # already used by message 2


def test_ss_cache_same_result_as_computing():
    computed = (initiator(), responder())
    m_computed = handshake(*computed)
    seen = []

    def lookup(rs):
        seen.append(rs)
        return SS

    cached = (initiator(ss=SS), responder(ss_lookup=lookup))
    assert handshake(*cached) == m_computed
    assert seen == [S_I[1]]
    for c, k in zip(cached, computed):
        assert c.handshake_hash == k.handshake_hash
        assert c.ss == k.ss == SS  # what the caller stores in its cache
        assert c.dh_count == k.dh_count - 1
    assert [k.dh_count for k in computed] == [4, 4]  # ephemerals injected
    # A lookup that misses (None) falls back to computing.
    res = responder(ss_lookup=lambda rs: None)
    res.read_message(initiator().write_message(b""))
    assert res.ss == SS and res.dh_count == 2


def test_ss_lookup_can_reject_unknown_peer_early():
    def lookup(rs):
        raise NoiseError("unknown peer")

    res = responder(ss_lookup=lookup)
    raises(NoiseError, res.read_message, initiator().write_message(b""))
    assert res.dh_count == 1  # only es; the ss DH was spared


def test_dh_count_with_generated_ephemerals():
    ini, res = initiator(e=None), responder(e=None)
    handshake(ini, res)
    assert (ini.dh_count, res.dh_count) == (5, 5)


def test_protocol_name():
    name = SUITE.name
    assert name == b"Noise_IKpsk2_25519_AESCCM_SHA256" and len(name) == 32
    assert SymmetricState(SUITE).h == name  # exactly HASHLEN: used as is
    short = Suite("IKpsk2", "CCM", SUITE.encrypt, SUITE.decrypt)
    sym = SymmetricState(short)
    assert sym.h == b"Noise_IKpsk2_25519_CCM_SHA256\x00\x00\x00" and sym.ck == sym.h
    long = Suite("IKpsk2", "AESCCM16", SUITE.encrypt, SUITE.decrypt)
    assert len(long.name) == 34
    assert SymmetricState(long).h == hashlib.sha256(long.name).digest()
    # The name is bound into the handshake: a mismatch fails message 1.
    raises(NoiseError, responder(suite=short).read_message, initiator().write_message(b""))
    handshake(initiator(suite=long), responder(suite=long))


def test_api_misuse_raises_value_error():
    ini, res = initiator(), responder()
    raises(ValueError, res.write_message, b"")       # responder speaks second
    raises(ValueError, ini.read_message, b"")        # initiator speaks first
    raises(ValueError, ini.split)                    # not complete
    handshake(ini, res)
    raises(ValueError, ini.write_message, b"")       # complete: use split()
    cases = (
        lambda: initiator(psk=bytes(31)),
        lambda: responder().set_psk(bytes(33)),
        lambda: initiator(rs=None),                  # IK: the initiator knows rs
        lambda: responder(rs=S_I[1]),                # ... the responder learns it
        lambda: initiator(s=(S_I[0], S_I[1][:31])),
        lambda: initiator(ss=b"short"),
        lambda: Suite("XX", "AESCCM", None, None),
        lambda: HandshakeState(None, True, S_I, rs=S_R[1]),
    )
    for i, case in enumerate(cases):
        raises(ValueError, case)


def test_cipher_state_nonce_exhaustion_and_rekey():
    k = _rng.bytes(32)
    a, b = CipherState(SUITE, k), CipherState(SUITE, k)
    a.set_nonce(2**64 - 2)
    b.set_nonce(2**64 - 2)
    assert b.decrypt_with_ad(b"", a.encrypt_with_ad(b"", b"last")) == b"last"
    raises(ValueError, a.encrypt_with_ad, b"", b"one too many")  # §5.1
    raises(NoiseError, b.decrypt_with_ad, b"", bytes(20))
    for cs in (a, b):
        cs.rekey()
        cs.set_nonce(0)
    assert a.k != k and a.k == b.k and len(a.k) == 32
    assert b.decrypt_with_ad(b"", a.encrypt_with_ad(b"", b"after rekey")) == b"after rekey"
    empty = CipherState(SUITE)
    assert not empty.has_key() and empty.encrypt_with_ad(b"", b"pt") == b"pt"


def test_suite_errors():
    # A suite may report a bad tag by raising one of its declared `errors`;
    # anything else (a bug, a full heap) is never mistaken for a forgery.
    def raising(exc):
        def decrypt(k, n, ad, ct):
            raise exc("from the suite")
        return Suite("IKpsk2", "T", SUITE.encrypt, decrypt, errors=(KeyError,))

    k = bytes(32)
    raises(NoiseError, CipherState(raising(KeyError), k).decrypt_with_ad, b"", bytes(16))
    for exc in (MemoryError, AttributeError):
        raises(exc, CipherState(raising(exc), k).decrypt_with_ad, b"", bytes(16))
