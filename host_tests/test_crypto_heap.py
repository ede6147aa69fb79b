"""Host-only: the crypto modules in a small MicroPython heap (issue 2).

A script imports microtun.aead and microtun.x25519, seals, opens and runs
one X25519 while the AEAD object is still alive (a rekey during a session),
under `micropython -X heapsize=...` (tools/bench_memory.py, "crypto").

The modules are precompiled with mpy-cross, as they are when deployed:
compiling them from source on the device needs far more heap than running
them, so a from-source run would measure the compiler, not the code.

The issue's target is 16K; the measured minimum is in TODAY (64-bit unix
port, MicroPython 1.29, where objects are about twice their size on a 32-bit
board; docs/MEMORY.md has the breakdown). The target stays a strict expected
failure, so reaching it fails loudly, and TODAY guards the figure from
growing.
"""
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import bench_memory as bm  # noqa: E402

K = 1024
TARGET = 16 * K  # issue 2
TODAY = 18 * K + 512  # measured minimum 17.5K, see docs/MEMORY.md
TOO_SMALL = 8 * K


@pytest.fixture(scope="module")
def mpy(tmp_path_factory):
    return bm.build(tmp_path_factory.mktemp("mpy"))


def run(mpy, heapsize):
    ok, steps = bm.run_crypto(mpy, heapsize)
    print("heapsize=%d completed=%s heap in use: %s" % (heapsize, ok, steps))
    return ok


def test_crypto_runs_in_todays_heap(mpy):
    assert run(mpy, TODAY)


@pytest.mark.xfail(strict=True, reason="issue 2 target not reached on the 64-bit port (docs/MEMORY.md)")
def test_crypto_runs_in_16k_heap(mpy):
    assert run(mpy, TARGET)


def test_heap_limit_is_real(mpy):
    assert not run(mpy, TOO_SMALL)
