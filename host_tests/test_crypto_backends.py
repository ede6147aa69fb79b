"""The crypto backends agree byte for byte (issue 15, item 1): the portable
pure-Python one (microtun.crypto.PURE, what boards run) and the host one
(microtun_host.hostcrypto.HOST: `cryptography` and OpenSSL's HMAC) on
random and edge inputs, and a gateway on either backend serves the same
device. The RFC and Noise vectors themselves run on every backend in
test_x25519.py, test_hmac_hkdf.py and test_noise.py."""
import json
import os
import subprocess

import pytest

from microtun.aead import AEAD
from microtun.crypto import PURE
from microtun.endpoint import Device, DATA
from microtun.responder import Gateway
from microtun.x25519 import BASE_POINT
from microtun_host import hostcrypto
from microtun_host.hostcrypto import HOST, HOST_SUITE
from mtest import Rng

P = 2 ** 255 - 19
_rng = Rng(15)


def test_x25519_agrees_on_random_and_non_canonical_inputs():
    for i in range(40):
        k, u = _rng.bytes(32), _rng.bytes(32)
        assert HOST.x25519(k, u) == PURE.x25519(k, u), i
        assert HOST.public_key(k) == PURE.public_key(k) == PURE.x25519(k, BASE_POINT)
    # RFC 7748 §5: u-coordinates >= p (and the ignored top bit) are taken mod p
    for v in (P, P + 1, P + 9, 2 ** 255 - 1, 2 ** 256 - 1 - 18):
        u = v.to_bytes(32, "little")
        k = _rng.bytes(32)
        try:
            want = PURE.x25519(k, u)
        except ValueError:
            with pytest.raises(ValueError):
                HOST.x25519(k, u)
            continue
        assert HOST.x25519(k, u) == want, hex(v)
    # bytearray in, same answer
    k, u = _rng.bytes(32), _rng.bytes(32)
    assert HOST.x25519(bytearray(k), bytearray(u)) == PURE.x25519(k, u)


# Points of small order on curve25519 and their non-canonical forms (as
# listed for X25519 implementations, e.g. libsodium's blacklist): every one
# gives an all-zero shared secret, which both backends must refuse.
LOW_ORDER = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
]


def test_both_refuse_low_order_points():
    for h in LOW_ORDER:
        for c in (PURE, HOST):
            with pytest.raises(ValueError, match="zero"):
                c.x25519(_rng.bytes(32), bytes.fromhex(h))


def test_hmac_and_noise_hkdf_agree():
    for n in (0, 1, 31, 32, 63, 64, 65, 200):
        key, data, more = _rng.bytes(n), _rng.bytes(n * 3 + 1), _rng.bytes(n + 5)
        assert HOST.hmac_sha256(key, data) == PURE.hmac_sha256(key, data), n
        assert HOST.hmac_sha256(key, data, more) == PURE.hmac_sha256(key, data, more), n
        assert HOST.hmac_sha256(key, bytearray(data), memoryview(more)) == PURE.hmac_sha256(key, data + more)
        ck, ikm = _rng.bytes(32), _rng.bytes(n)
        for outs in (2, 3):
            assert HOST.noise_hkdf(ck, ikm, outs) == PURE.noise_hkdf(ck, ikm, outs), (n, outs)


def test_aead_agrees_both_ways():
    for n in (0, 1, 15, 16, 17, 200, 1400):
        key, nonce, pt, aad = _rng.bytes(32), _rng.bytes(12), _rng.bytes(n), _rng.bytes(n % 40)
        a, b = HOST.aead(key), PURE.aead(key)
        portable = AEAD(key, "cryptography")    # microtun.aead's own CCM over AES blocks
        ct = a.seal(nonce, pt, aad)
        assert ct == b.seal(nonce, pt, aad) == portable.seal(nonce, pt, aad), n
        assert b.open(nonce, ct, aad) == portable.open(nonce, ct, aad) == a.open(nonce, ct, aad) == pt
        bad = bytearray(ct)
        bad[-1] ^= 1
        assert a.open(nonce, bytes(bad), aad) is None and portable.open(nonce, bytes(bad), aad) is None
    assert HOST.aead(bytes(32)).backend == "aesccm"


def test_suites_interoperate_through_the_gateway():
    """A device (microtun.handshake, pure) against a gateway on each
    backend: same handshake, same transport; the backend shows."""
    for backend in ("pure", "cryptography"):
        crypto, suite = hostcrypto.choose(backend)
        gw = Gateway(_rng.bytes(32), suite=suite)
        assert gw.suite.crypto.name == backend
        dev = Device(_rng.bytes(32), gw.public_key, boot_counter=1)
        gw.add_peer(dev.public_key, name="d")
        now = 1000
        dev.send(1, b"hello", now)
        for _ in range(3):
            for pkt, _a in dev.datagrams_to_send():
                gw.receive_datagram(pkt, "link", now)
            for pkt, _a in gw.datagrams_to_send():
                dev.receive_datagram(pkt, "link", now)
        assert dev.established, (backend, dev.stats, gw.stats)
        got = []
        while True:
            e = gw.next_event()
            if e is None:
                break
            if e.kind == DATA:
                got.append(e.data)
        assert got == [b"hello"], (backend, got, gw.stats)
        assert gw.stats.get("handshake_ok") == 1


def test_host_key_cache_is_bounded():
    c = hostcrypto.HostCrypto()
    for i in range(20):
        c.public_key(_rng.bytes(32))
    assert len(c._keys) == hostcrypto._KEYS


def test_choose_names_the_choices(tmp_path):
    assert hostcrypto.choose() == (HOST, HOST_SUITE)
    with pytest.raises(ValueError, match="cryptography"):
        hostcrypto.choose("openssl")
    # in gateway.json: a bad value is one line naming the field and the choices
    from harness import Net, PY, ROOT, py_env
    n = Net(tmp_path, routes={"a": ["a1"]})
    path = n.out / "gateway.json"
    cfg = json.loads(path.read_text())
    cfg["crypto"] = "openssl"
    path.write_text(json.dumps(cfg))
    r = subprocess.run([PY, "-m", "microtun_host.cli", "gateway", "--config", str(path), "--check"],
                       capture_output=True, text=True, env=py_env(), cwd=str(ROOT), timeout=30)
    assert r.returncode == 2 and "crypto" in r.stderr and "pure" in r.stderr, r.stderr
    cfg["crypto"] = "pure"
    path.write_text(json.dumps(cfg))
    r = subprocess.run([PY, "-m", "microtun_host.cli", "gateway", "--config", str(path), "--check"],
                       capture_output=True, text=True, env=py_env(), cwd=str(ROOT), timeout=30)
    assert r.returncode == 0, r.stderr
