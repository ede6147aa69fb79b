"""The 32-bit unix builds for the heap tests (test_device_heap.py,
test_crypto_heap.py): found as tools/bench_board.py finds them (options,
MICROPYTHON_32F / MICROPYTHON_32, build/unix32-frozen, build/unix32, or
tools/mpbuild.py), else the test skips with the one line saying why.

`use(kind)` points tools/bench_memory.py at one interpreter for the
duration of a test: the interpreter, and sys.path on it (".frozen:lib" on
the frozen build, whose package is not compiled into lib at all).
"""
import contextlib
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import bench_memory as bm  # noqa: E402
import bench_board as bb  # noqa: E402

_FOUND = {}


def interpreter(kind):
    """The path of the 32-bit build `kind` ("frozen" or "mpy"); skips the
    test with the reason when there is none."""
    if kind not in _FOUND:
        _FOUND[kind] = bb.find(kind, [])
    exe, why = _FOUND[kind]
    if exe is None:
        pytest.skip("32-bit %s build: %s" % (kind, why))
    return exe


@contextlib.contextmanager
def use(kind):
    exe = interpreter(kind)
    saved = os.environ.get("MICROPYTHON"), bm.MICROPYPATH
    os.environ["MICROPYTHON"] = exe
    bm.MICROPYPATH = ".frozen:lib" if kind == "frozen" else "lib"
    try:
        yield exe
    finally:
        if saved[0] is None:
            os.environ.pop("MICROPYTHON", None)
        else:
            os.environ["MICROPYTHON"] = saved[0]
        bm.MICROPYPATH = saved[1]


def build(kind, out):
    """The scripts (and for "mpy" the package) compiled into out."""
    with use(kind):
        return bm.build(out, package=kind != "frozen")
