"""Timing and heap helpers shared by the benchmarks; runs on MicroPython and
CPython. Medians of interleaved rounds, so noise on a shared machine hurts
less."""
import sys
import gc

MICROPYTHON = sys.implementation.name == "micropython"

if MICROPYTHON:
    import time

    def now_us():
        return time.ticks_us()

    def elapsed_us(t0):
        return time.ticks_diff(time.ticks_us(), t0)
else:
    import os
    import time
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))

    def now_us():
        return time.perf_counter_ns() // 1000

    def elapsed_us(t0):
        return now_us() - t0


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def per_call_us(fn, n):
    t0 = now_us()
    for _ in range(n):
        fn()
    return elapsed_us(t0) / n


def interleaved(fns, n, rounds):
    """{name: median us per call} for fns = {name: callable}, measured in
    alternating rounds."""
    res = {k: [] for k in fns}
    for _ in range(rounds):
        for k in fns:
            res[k].append(per_call_us(fns[k], n))
    return {k: median(v) for k, v in res.items()}


def heap_used():
    """Bytes of heap in use after a collection (MicroPython), else None."""
    if not MICROPYTHON:
        return None
    gc.collect()
    return gc.mem_alloc()


def bytes_allocated_per_call(fn, n):
    """Average heap bytes allocated by fn, GC off (MicroPython), else None."""
    if not MICROPYTHON:
        return None
    gc.collect()
    gc.disable()
    try:
        a0 = gc.mem_alloc()
        for _ in range(n):
            fn()
        return (gc.mem_alloc() - a0) / n
    finally:
        gc.enable()
        gc.collect()


def peak_heap():
    if MICROPYTHON:
        try:
            import micropython
            return micropython.mem_peak()
        except (ImportError, AttributeError):
            return None
    return None
