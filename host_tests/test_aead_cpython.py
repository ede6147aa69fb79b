"""Host-only: microtun.aead against cryptography's AESCCM.

The MicroPython unix port seals a few hundred random cases (the shim over
cryptolib) and CPython checks every byte against AESCCM(key, tag_length=16);
the cases come from mtest.Rng, so both interpreters draw the same ones from
the same seed. On CPython, the AESCCM path and the shim paths must agree."""
import subprocess

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from conftest import HERE, ROOT, micropython_binary, micropython_env
from microtun.aead import AEAD

SEED = 20240611
COUNT = 300
KEEP_KEY = 10  # cases per key: one long-lived AEAD object seals them in turn

# Runs on both interpreters: CPython execs it, the unix port gets it as a script.
CASES_SRC = '''
def cases(seed, count):
    """(key, nonce, aad, plaintext) tuples: plaintexts of 0..1300 bytes
    (a quarter of them on block boundaries), aad of 0..40 bytes, now and
    then 300; every KEEP_KEY cases a new key, one in five AES-128."""
    rng = Rng(seed)
    key = None
    for i in range(count):
        if i % KEEP_KEY == 0:
            key = rng.bytes(16 if rng.below(5) == 0 else 32)
        n = rng.below(1301)
        if rng.below(4) == 0:
            n -= n % 16
        la = 300 if rng.below(20) == 0 else rng.below(41)
        yield key, rng.bytes(12), rng.bytes(la), rng.bytes(n)
'''

MP_SCRIPT = '''
import sys
from mtest import Rng
from microtun.aead import AEAD
KEEP_KEY = %d
%s
aead = None
key = None
for k, nonce, aad, pt in cases(int(sys.argv[1]), int(sys.argv[2])):
    if k is not key:
        key, aead = k, AEAD(k)
    ct = aead.seal(nonce, pt, aad)
    print(ct.hex(), "ok" if aead.open(nonce, ct, aad) == pt else "OPEN-FAILED")
''' % (KEEP_KEY, CASES_SRC)


def cpython_cases(seed, count):
    from mtest import Rng
    ns = {"Rng": Rng, "KEEP_KEY": KEEP_KEY}
    exec(CASES_SRC, ns)
    return list(ns["cases"](seed, count))


def test_unix_port_seals_like_cryptography_aesccm(tmp_path):
    script = tmp_path / "seal_cases.py"
    script.write_text(MP_SCRIPT)
    proc = subprocess.run(
        [micropython_binary(), str(script), str(SEED), str(COUNT)],
        capture_output=True, text=True, timeout=600, env=micropython_env(), cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    cases = cpython_cases(SEED, COUNT)
    assert len(lines) == len(cases) == COUNT
    sizes = set()
    for i, ((key, nonce, aad, pt), line) in enumerate(zip(cases, lines)):
        hexct, status = line.split()
        assert status == "ok", i
        assert bytes.fromhex(hexct) == AESCCM(key, tag_length=16).encrypt(nonce, pt, aad), i
        sizes.add(len(pt) % 16)
    assert sizes == set(range(16))  # every partial-block length was exercised


@pytest.mark.parametrize("backend,limit", [("cryptography", COUNT), ("pure", 40)])
def test_cpython_paths_agree(backend, limit):
    aesccm = shim = None
    for i, (key, nonce, aad, pt) in enumerate(cpython_cases(SEED + 1, limit)):
        if i % KEEP_KEY == 0:
            aesccm, shim = AEAD(key, backend="aesccm"), AEAD(key, backend=backend)
            assert (aesccm.backend, shim.backend) == ("aesccm", backend)
        ct = aesccm.seal(nonce, pt, aad)
        assert shim.seal(nonce, pt, aad) == ct, i
        assert shim.open(nonce, ct, aad) == pt, i
        assert aesccm.open(nonce, ct, aad) == pt, i
        bad = ct[:-1] + bytes([ct[-1] ^ 0x80])
        assert shim.open(nonce, bad, aad) is None and aesccm.open(nonce, bad, aad) is None, i


def test_default_path_on_cpython_is_aesccm():
    assert AEAD(bytes(32)).backend == "aesccm"


# Messages of up to 32 bytes are sealed with one cryptolib object, their key
# stream chained through the CBC object of their MAC (microtun.aead._SHORT):
# every length on both sides of that edge, with the heads and leads the
# tunnel seals with (a head over 16 bytes moves the key stream 16 bytes in),
# sealed on the unix port and checked byte for byte against AESCCM.
SHORT_SCRIPT = '''
import hashlib
from microtun.aead import AEAD
for n in range(50):
    key = hashlib.sha256(b"k%d" % n).digest()
    nonce = key[:12]
    pt = (hashlib.sha256(b"p%d" % n).digest() * 2)[:n]
    for hl in (0, 16, 28):
        head = bytes(range(hl))
        for ll in (0, 1):
            if ll > n:
                continue
            a = AEAD(key)
            ct = a.seal(nonce, pt[ll:], pt[:5], head, pt[:ll])
            print(n, hl, ll, bytes(ct).hex(), "ok" if a.open(nonce, ct[hl:], pt[:5]) == pt else "OPEN-FAILED")
'''


def test_short_messages_on_the_unix_port_seal_like_aesccm(tmp_path):
    import hashlib
    script = tmp_path / "seal_short.py"
    script.write_text(SHORT_SCRIPT)
    proc = subprocess.run([micropython_binary(), str(script)], capture_output=True, text=True, timeout=300,
                          env=micropython_env(), cwd=str(ROOT))
    assert proc.returncode == 0, proc.stderr
    seen = 0
    for line in proc.stdout.splitlines():
        n, hl, ll, hexct, status = line.split()
        n, hl = int(n), int(hl)
        assert status == "ok", line
        key = hashlib.sha256(b"k%d" % n).digest()
        pt = (hashlib.sha256(b"p%d" % n).digest() * 2)[:n]
        want = bytes(range(hl)) + AESCCM(key, tag_length=16).encrypt(key[:12], pt, pt[:5])
        assert bytes.fromhex(hexct) == want, line
        seen += 1
    assert seen == 50 * 3 * 2 - 3
