"""Cost of the outer hop MAC, excerpt vs whole payload; prints one JSON object.

    .venv/bin/micropython -X heapsize=64K tools/bench_outer.py
    .venv/bin/python tools/bench_outer.py

mac_excerpt is what microtun does (docs/OUTER.md): HMAC-SHA256 over
header[0:4] || len || first 16 || last 16 payload bytes (4 SHA-256
compressions; 2 where hashlib has copy()). mac_whole_payload is the
alternative we did not take: the same HMAC over header[0:4] || len || the
whole payload (22 compressions at 1200 bytes). seal_in_place / verify /
relay are the full API calls (MAC input assembly, compare, output).
Microseconds per operation, best of 5 runs; "_alloc" is heap bytes
allocated per call (MicroPython only). Run it on a quiet machine: on a
shared VM the figures move by up to 2x between runs.
"""
import sys
import json
import gc

sys.path.insert(0, "lib")
from microtun import outer  # noqa: E402

MP = sys.implementation.name == "micropython"
if MP:
    from time import ticks_us, ticks_diff
else:
    from time import perf_counter

    def ticks_us():
        return perf_counter() * 1e6

    def ticks_diff(a, b):
        return a - b

N = 2000 if MP else 50000


def best(fn, n=N, runs=5):
    out = None
    for _ in range(runs):
        gc.collect()
        t0 = ticks_us()
        for _ in range(n):
            fn()
        dt = ticks_diff(ticks_us(), t0) / n
        out = dt if out is None else min(out, dt)
    return round(out, 2)


def alloc(fn):
    if not MP:
        return None
    gc.collect()
    gc.disable()
    a = gc.mem_alloc()
    fn()
    b = gc.mem_alloc()
    gc.enable()
    return b - a


def main():
    hk = outer.HopKey(bytes(range(32)))
    hk2 = outer.HopKey(bytes(range(32, 64)))
    res = {"interpreter": sys.implementation.name,
           "mac_backend": "hashlib state copy" if outer._COPY else "portable (rehash ipad/opad)"}
    for size in (64, 1200):
        p = bytes(size)
        pkt = outer.seal(outer.TYPE_DATA, 7, hk, p)
        whole = pkt[0:4] + bytes((size >> 8, size & 0xFF)) + p
        buf = bytearray(size + outer.HEADER_LEN)
        buf[outer.HEADER_LEN:] = p

        def seal_ip():
            outer.seal_in_place(buf, 1, 7, hk, size)

        def ver():
            outer.verify(hk, pkt)

        excerpt = whole[:6] + p[:16] + p[-16:]

        def mac_excerpt():
            outer._hmac(hk, excerpt)

        def mac_whole():
            outer._hmac(hk, whole)

        def rel():
            outer.relay(pkt, hk, 9, hk2)

        for name, fn in (("mac_excerpt", mac_excerpt), ("mac_whole_payload", mac_whole),
                         ("seal_in_place", seal_ip), ("verify", ver), ("relay", rel)):
            res["%s_%d_us" % (name, size)] = best(fn)
            if MP:
                res["%s_%d_alloc" % (name, size)] = alloc(fn)
        if not MP:
            res["portable_mac_excerpt_%d_us" % size] = best(lambda: outer._hmac_portable(hk, excerpt))
            res["portable_mac_whole_%d_us" % size] = best(lambda: outer._hmac_portable(hk, whole))
            import hmac as std_hmac
            res["stdlib_hmac_digest_excerpt_%d_us" % size] = best(
                lambda: std_hmac.digest(hk.key, excerpt, "sha256"))
    print(json.dumps(res))


main()
