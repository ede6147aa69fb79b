"""Host crypto: the `cryptography` package and CPython's OpenSSL-backed
hmac behind the portable backend interface (microtun.crypto), so the
gateway's handshakes run in C while the protocol code stays the one the
boards run.

    from microtun_host import hostcrypto
    crypto, suite = hostcrypto.choose()          # ("cryptography" if installed, else "pure")
    gw = Gateway(private_key, suite=suite)       # microtun.responder
    crypto.name                                  # shown in `microtun status`, logs, benchmarks

    HOST         X25519 and AES-256-CCM from `cryptography` (OpenSSL), HMAC
                 and HKDF from the stdlib's hmac.digest (OpenSSL, one C call)
    HOST_SUITE   Noise_IKpsk2_25519_AESCCM_SHA256 computed by HOST; the
                 gateway's half of its handshake by microtun_host.hostresponder

Same bytes as microtun.crypto.PURE: host_tests/test_crypto_backends.py
checks them against each other and the RFC vectors run on both.
"""
import hmac as _stdlib_hmac

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESCCM

from microtun import noise
from microtun.aead import AEAD
from microtun.crypto import PURE
from microtun_host.hostresponder import HostResponder

try:
    # hmac.digest's own C call, without the Python wrapper around it (a
    # handshake makes 26 of them); the wrapper where OpenSSL's is missing
    from _hashlib import hmac_digest as _digest
except ImportError:
    _digest = _stdlib_hmac.digest
_BYTES = (bytes, bytearray)
_KEYS = 4       # X25519 private keys kept loaded (HostCrypto)


class HostCrypto:
    """The portable backend's calls (microtun.crypto) in C.

    Loading a private key into OpenSSL costs about as much as a DH (it
    derives the public key), and a responder uses each key more than once:
    the gateway's static key in every handshake (es, and ss on first
    contact), its ephemeral three times (public key, ee, se). So the last
    _KEYS loaded keys are kept. They are secrets held a little longer
    than the handshake that used them: an ephemeral stays at most until
    _KEYS more keys were loaded (a few handshakes later)."""
    name = "cryptography"

    def __init__(self):
        self._keys = {}     # 32-byte scalar -> X25519PrivateKey

    def _load(self, scalar):
        scalar = bytes(scalar)
        k = self._keys.get(scalar)
        if k is None:
            k = X25519PrivateKey.from_private_bytes(scalar)
            keys = self._keys
            if len(keys) >= _KEYS:
                del keys[next(iter(keys))]      # the oldest (dicts keep insertion order)
            keys[scalar] = k
        return k

    def x25519(self, scalar, u):
        """RFC 7748 §5 in OpenSSL: the same contract as microtun.x25519."""
        for name, v in (("scalar", scalar), ("u", u)):
            if not isinstance(v, _BYTES) or len(v) != 32:
                raise ValueError("x25519 %s must be 32 bytes" % name)
        try:
            return self._load(scalar).exchange(
                X25519PublicKey.from_public_bytes(bytes(u)))
        except ValueError:
            # OpenSSL refuses an all-zero shared secret (RFC 7748 §6.1).
            raise ValueError("x25519 result is all zero: the peer sent a low-order point")

    def public_key(self, key):
        if not isinstance(key, _BYTES) or len(key) != 32:
            raise ValueError("x25519 scalar must be 32 bytes")
        return self._load(key).public_key().public_bytes_raw()

    @staticmethod
    def hmac_sha256(key, data, more=None):
        return _digest(key, data if more is None else bytes(data) + bytes(more), "sha256")

    @staticmethod
    def noise_hkdf(key, ikm, n):
        # Noise rev 34 §4.3, as microtun.hmac.noise_hkdf.
        t = _digest(key, ikm, "sha256")
        o1 = _digest(t, b"\x01", "sha256")
        o2 = _digest(t, o1 + b"\x02", "sha256")
        if n == 2:
            return o1, o2
        return o1, o2, _digest(t, o2 + b"\x03", "sha256")

    aead = staticmethod(lambda key: AEAD(key, "aesccm"))


HOST = HostCrypto()


def _nonce(n):
    return b"\x00\x00\x00\x00" + n.to_bytes(8, "big")     # noise.nonce96


def _encrypt(k, n, ad, plaintext):
    return AESCCM(k, 16).encrypt(_nonce(n), bytes(plaintext), ad)


def _decrypt(k, n, ad, ciphertext):
    try:
        return AESCCM(k, 16).decrypt(_nonce(n), bytes(ciphertext), ad)
    except InvalidTag:
        return None


HOST_SUITE = noise.Suite("IKpsk2", "AESCCM", _encrypt, _decrypt, crypto=HOST, responder=HostResponder())
BACKENDS = {"pure": (PURE, noise.NOISE_IKPSK2_25519_AESCCM_SHA256), "cryptography": (HOST, HOST_SUITE)}


def choose(name=None):
    """(crypto, suite) for backend `name` ("pure", "cryptography"; None:
    the fastest, which is "cryptography": this module needs it)."""
    if name is None:
        name = "cryptography"
    if name not in BACKENDS:
        raise ValueError("crypto backend must be one of %s, got %r" % (sorted(BACKENDS), name))
    return BACKENDS[name]
