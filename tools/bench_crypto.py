"""Crypto benchmark for both interpreters; prints ONE JSON object.

    MICROPYPATH=lib:.frozen .venv/bin/micropython tools/bench_crypto.py
    .venv/bin/python tools/bench_crypto.py
    (`make bench` runs both)

For 64, 256 and 1200-byte messages (8 bytes of aad): microseconds per
AEAD.seal and AEAD.open, and the *floor* measured in the same run: the bare
backend calls AES-CCM cannot avoid (one ECB call over the counter blocks, one
CBC call over the MAC input, the big-int XOR of message and key stream), with
the ratios seal/floor and open/floor. Then milliseconds per X25519 and heap
figures. Rounds are interleaved (every measurement once per round) and the
median over rounds is reported, so a noisy neighbour on a shared machine
hurts one round, not one figure. On CPython the default AEAD path is
cryptography's AESCCM; "aead_shim" is the portable path over the same shim
the board uses, which is what the floor describes.
"""
import gc
import json
import sys

MICROPYTHON = sys.implementation.name == "micropython"

if MICROPYTHON:
    import time

    def _now_us():
        return time.ticks_us()

    def _elapsed_us(t0):
        return time.ticks_diff(time.ticks_us(), t0)
else:
    import os
    import time
    import tracemalloc

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))

    def _now_us():
        return time.perf_counter_ns() // 1000

    def _elapsed_us(t0):
        return time.perf_counter_ns() // 1000 - t0

SIZES = (64, 256, 1200)
AAD = bytes(range(8))
ROUNDS = 25
# Work per measurement. Short on purpose: MicroPython's allocator scans past
# all garbage made since the last collection for every multi-block
# allocation, so long batches measure the heap's fill level, not the code.
BATCH_US = 3000


def _heap():
    gc.collect()
    return gc.mem_alloc() if MICROPYTHON else 0


_m0 = _heap()
from microtun import aes  # noqa: E402
from microtun.aead import AEAD  # noqa: E402
from microtun.x25519 import x25519, public_key  # noqa: E402
_import_bytes = _heap() - _m0


def _floor(n):
    """The bare calls CCM must make for an n-byte message."""
    blocks = (n + 15) // 16
    ecb = aes.aes(bytes(32), aes.MODE_ECB)
    cbc = aes.aes(bytes(32), aes.MODE_CBC, bytes(16))
    ctr = bytearray(16 * (blocks + 1))
    ks = bytearray(len(ctr))
    ksv = memoryview(ks)
    mac = bytearray(16 + 16 + 16 * blocks)  # B0, 8 bytes of aad + length, message
    msg = _message(n)

    def run():
        ecb.encrypt(ctr, ks)
        cbc.encrypt(mac, mac)
        return (int.from_bytes(msg, "big") ^ int.from_bytes(ksv[16:16 + n], "big")).to_bytes(n, "big")
    return run


def _message(n):
    # Not zeros: a zero big int makes the XOR look free.
    return bytes((i * 167 + 13) & 0xFF for i in range(n))


def _cases(aead, tag):
    nonce = bytes(range(12))
    out = []
    for n in SIZES:
        msg = _message(n)
        sealed = aead.seal(nonce, msg, AAD)
        if aead.open(nonce, sealed, AAD) != msg:
            raise RuntimeError("AEAD round trip failed")
        out.append(("%s_seal_%d" % (tag, n), lambda m=msg: aead.seal(nonce, m, AAD)))
        out.append(("%s_open_%d" % (tag, n), lambda s=sealed: aead.open(nonce, s, AAD)))
    return out


def _calibrate(fn):
    """Iterations that take about BATCH_US."""
    t0 = _now_us()
    fn()
    one = max(1, _elapsed_us(t0))
    return max(1, min(2000, BATCH_US // one))


def _measure(cases):
    iters = {}
    for name, fn in cases:
        fn()
        iters[name] = _calibrate(fn)
    samples = {}
    for _ in range(ROUNDS):
        for name, fn in cases:
            k = iters[name]
            gc.collect()
            t0 = _now_us()
            for _ in range(k):
                fn()
            samples.setdefault(name, []).append(_elapsed_us(t0) / k)
    med = {}
    for name, v in samples.items():
        v.sort()
        med[name] = v[len(v) // 2]
    return med


def _alloc_bytes(fn):
    """Heap bytes one call allocates (MicroPython: gc.mem_alloc with the
    collector off; CPython: tracemalloc's peak)."""
    fn()
    if MICROPYTHON:
        gc.collect()
        gc.disable()
        m0 = gc.mem_alloc()
        fn()
        used = gc.mem_alloc() - m0
        gc.enable()
        return used
    tracemalloc.start()
    fn()
    used = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return used


def _dumps(v):
    """JSON with keys in the order given: objects are lists of (key, value)
    pairs (MicroPython's dicts do not keep insertion order)."""
    if isinstance(v, list):
        return "{" + ", ".join("%s: %s" % (json.dumps(k), _dumps(x)) for k, x in v) + "}"
    if isinstance(v, float):
        return ("%.2f" % v).rstrip("0").rstrip(".")  # MicroPython prints 65.09999999999999
    return json.dumps(v)


def _table(med, tag, path):
    out = [("path", path)]
    for n in SIZES:
        fl = med["floor_%d" % n]
        s = med["%s_seal_%d" % (tag, n)]
        o = med["%s_open_%d" % (tag, n)]
        out.append((str(n), [
            ("seal_us", s), ("open_us", o), ("floor_us", fl),
            ("seal_ratio", s / fl), ("open_ratio", o / fl),
        ]))
    return out


def main():
    key = bytes(range(32))
    default = AEAD(key)
    paths = [("aead", default)]
    if default.backend == "aesccm":
        # CPython: also the portable path, which is what the floor describes.
        paths.append(("aead_shim", AEAD(key, backend=aes.default_backend())))
    priv = bytes((i * 7 + 1) & 0xFF for i in range(32))
    peer = public_key(bytes((i * 13 + 5) & 0xFF for i in range(32)))

    cases = [("floor_%d" % n, _floor(n)) for n in SIZES]
    for tag, aead in paths:
        cases += _cases(aead, tag)
    cases.append(("x25519", lambda: x25519(priv, peer)))
    med = _measure(cases)

    res = [
        ("interpreter", "%s %s" % (sys.implementation.name, ".".join(str(v) for v in sys.implementation.version[:3]))),
        ("platform", sys.platform),
        ("aes_backend", aes.default_backend()),
        ("aad_bytes", len(AAD)),
        ("rounds", ROUNDS),
    ]
    for tag, aead in paths:
        path = "aesccm" if aead.backend == "aesccm" else "shim/" + aead.backend
        res.append((tag, _table(med, tag, path)))
    res.append(("x25519_ms", med["x25519"] / 1000))

    nonce = bytes(12)
    msg = _message(1200)
    sealed = default.seal(nonce, msg, AAD)
    heap = [
        ("alloc_per_seal_1200", _alloc_bytes(lambda: default.seal(nonce, msg, AAD))),
        ("alloc_per_open_1200", _alloc_bytes(lambda: default.open(nonce, sealed, AAD))),
        ("alloc_per_seal_64", _alloc_bytes(lambda: default.seal(nonce, msg[:64], AAD))),
        ("alloc_per_floor_1200", _alloc_bytes(_floor(1200))),
        ("alloc_per_x25519", _alloc_bytes(lambda: x25519(priv, peer))),
    ]
    if MICROPYTHON:
        heap.append(("import_aead_x25519", _import_bytes))
        m0 = _heap()
        a = AEAD(key)
        a.seal(nonce, msg, AAD)
        heap.append(("aead_object_after_1200_byte_seal", _heap() - m0))
        del a
        heap.append(("in_use_at_end", _heap()))
        # micropython.mem_peak() is left out on purpose: it counts m_malloc
        # calls, and the collector's frees never reach it, so on a GC heap
        # it only grows (hundreds of MB here).
    res.append(("heap_bytes", heap))
    print(_dumps(res))


main()
