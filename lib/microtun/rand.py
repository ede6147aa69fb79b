"""The one source of randomness for microtun.

os.urandom on every port, conditioned through SHA-256 on ports whose
generator is a PRNG seeded from weak entropy. Per board (see docs/CRYPTO.md):

- unix / CPython: getrandom(): strong.
- esp32 / esp32s3: hardware RNG, truly random only while Wi-Fi or Bluetooth
  is on (or the bootloader's entropy source is enabled). microtun makes keys
  after the network is up, so in practice strong.
- rp2 (Pico W, Pico 2 W): a PRNG reseeded from the ring oscillator; we hash
  two draws plus a counter through SHA-256 for every 32 output bytes.
- stm32 (PYBV11): RNG peripheral: strong.
"""
import os
import sys
import hashlib

_conditioned = sys.platform == "rp2"   # the boards whose os.urandom is conditioned here
_counter = 0


def _conditioned_bytes(n):
    global _counter
    out = b""
    while len(out) < n:
        _counter += 1
        h = hashlib.sha256(os.urandom(32))
        h.update(os.urandom(32))
        h.update(_counter.to_bytes(8, "little"))
        out += h.digest()
    return out[:n]


def random_bytes(n):
    """n cryptographically strong random bytes (see the module note per board)."""
    if _conditioned:
        return _conditioned_bytes(n)
    return os.urandom(n)


def random_u32():
    return int.from_bytes(random_bytes(4), "little")
