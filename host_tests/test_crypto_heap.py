"""Host-only: the crypto modules in a small MicroPython heap (issues 2, 10).

A script imports microtun.aead and microtun.x25519, seals, opens and runs
one X25519 while the AEAD object is still alive (a rekey during a session),
under `micropython -X heapsize=...` (tools/bench_memory.py, "crypto").

The modules are precompiled with mpy-cross, as they are when deployed:
compiling them from source on the device needs far more heap than running
them, so a from-source run would measure the compiler, not the code.

The issue's target is 16K on the 64-bit unix port (MicroPython 1.29, where
objects are about twice their size on a 32-bit board), and it is met: the
measured minimum is 15.75K, the same on every run (fixed keys and data).
What it takes and what is left is in docs/MEMORY.md. A regression past 16K
fails here.

Issue 10 moved the budget onto the 32-bit builds (tools/bench_board.py),
where it is a target: <= 6K with microtun frozen in, <= 12K with .mpy
files, started as the firmware starts (gc.threshold(STARTUP_GC) while the
modules load). Measured 5.75-6.0K and 10.75K since aead's XOR is native
code (microtun/xorbuf.py: its module objects on the frozen build, and its
code in RAM with .mpy files; 5.75K and 9.75-10.0K before), with fixed
keys and data. Skipped, with the reason, where the 32-bit build cannot be
found or made (host_tests/board_heap.py).
"""
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import bench_memory as bm  # noqa: E402
import board_heap  # noqa: E402

K = 1024
TARGET = 16 * K  # issue 2; measured minimum 15.75K
TOO_SMALL = 8 * K


@pytest.fixture(scope="module")
def mpy(tmp_path_factory):
    return bm.build(tmp_path_factory.mktemp("mpy"))


def run(mpy, heapsize):
    ok, steps = bm.run_crypto(mpy, heapsize)
    print("heapsize=%d completed=%s heap in use: %s" % (heapsize, ok, steps))
    return ok


def test_crypto_runs_in_16k_heap(mpy):
    assert run(mpy, TARGET)


def test_heap_limit_is_real(mpy):
    # run_crypto raises unless the failure is a MemoryError
    assert not run(mpy, TOO_SMALL)


# -- the 32-bit builds (issue 10: targets) -----------------------------------------
TARGET_32 = {"frozen": 6 * K, "mpy": 12 * K}


@pytest.mark.parametrize("kind", ["frozen", "mpy"])
def test_crypto_fits_the_32bit_target(tmp_path, kind):
    out = board_heap.build(kind, tmp_path)
    with board_heap.use(kind):
        ok, steps = bm.run_crypto(out, TARGET_32[kind], bm.STARTUP_GC)
        print("%s: heapsize=%d completed=%s heap in use: %s" % (kind, TARGET_32[kind], ok, steps))
        assert ok
        # and -X heapsize bites on that build too
        assert not bm.run_crypto(out, TARGET_32[kind] - 3 * K, bm.STARTUP_GC)[0]
