"""Host-only: the device in a small MicroPython heap (issue 3; issue 5/6).

A device runs in a unix-port process with `-X heapsize=...`, driven over a
pipe by a CPython gateway (host_tests/heap_device.py, tools/bench_memory.py):
the handshake, 20 app packets each way, a 1024-packet replay window. The
package is precompiled with mpy-cross, as `microtun flash` deploys it.

  endpoint  microtun.endpoint.Device alone (issue 3: target 32K);
  core      the whole device stack, microtun.tunnel.TunnelCore with two
            paths and everything microtun.driver imports (issue 5/6:
            required 64K, target 48K).

Two ways to start: as is, and with gc.threshold(2K) while the modules load
(bench_memory.STARTUP_GC), as a firmware should (docs/MEMORY.md).

Neither target is reached on the 64-bit unix port. The TODAY figures are the
measured minimum (`python tools/bench_memory.py`, three runs per size) plus
about 2K, because the outcome near the limit varies from run to run (random
keys and indexes, the conservative scan of the C stack): a regression fails
here. The targets stay strict expected failures, checked in the better way
to start, so reaching one fails loudly too. docs/MEMORY.md says where the
heap goes and what the same code needs on a 32-bit board.
"""
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import bench_memory as bm  # noqa: E402

K = 1024
GC = bm.STARTUP_GC
# measured minimum: endpoint 53.75K (48.75K with GC), core 80.25K (74.5K with GC)
ENDPOINT_TODAY = 56 * K
ENDPOINT_TODAY_GC = 51 * K
CORE_TODAY = 83 * K
CORE_TODAY_GC = 77 * K
TOO_SMALL = 16 * K
SEND_BYTES = 1800            # allocated per 64-byte packet sent (measured ~1.6K)
RECEIVE_BYTES = 1800         # ... and received (measured ~1.6K)


@pytest.fixture(scope="module")
def mpy(tmp_path_factory):
    return bm.build(tmp_path_factory.mktemp("mpy"))


def fits(mpy, mode, heapsize, gc=0):
    return bm.scenario(mpy, mode, heapsize, count=False, gc=gc) is not None


def test_endpoint_session_fits_todays_heap(mpy):
    assert fits(mpy, "endpoint", ENDPOINT_TODAY)
    assert fits(mpy, "endpoint", ENDPOINT_TODAY_GC, GC)


@pytest.mark.xfail(strict=True, reason="issue 3 target not reached on the 64-bit port (docs/MEMORY.md)")
def test_endpoint_session_fits_32k(mpy):
    assert fits(mpy, "endpoint", 32 * K, GC)


def test_core_two_paths_fits_todays_heap(mpy):
    assert fits(mpy, "core", CORE_TODAY)
    assert fits(mpy, "core", CORE_TODAY_GC, GC)


@pytest.mark.xfail(strict=True, reason="issue 5/6 requirement not reached on the 64-bit port (docs/MEMORY.md)")
def test_core_two_paths_fits_64k(mpy):
    assert fits(mpy, "core", 64 * K, GC)


@pytest.mark.xfail(strict=True, reason="issue 5/6 target not reached on the 64-bit port (docs/MEMORY.md)")
def test_core_two_paths_fits_48k(mpy):
    assert fits(mpy, "core", 48 * K, GC)


def test_heap_limit_is_real(mpy):
    # The same run in a heap far too small must fail (scenario() raises
    # unless the device died of a MemoryError): -X heapsize bites.
    assert not fits(mpy, "endpoint", TOO_SMALL)


def test_bytes_allocated_per_packet(mpy):
    r = bm.scenario(mpy, "endpoint")
    print("device heap figures:", r)
    assert r["per_send"] <= SEND_BYTES and r["per_receive"] <= RECEIVE_BYTES, r


def test_romfs_image_keeps_the_code_bytes_out_of_the_heap(tmp_path):
    # bench_memory --romfs (docs/MEMORY.md, "Out of reach"): from a ROMFS
    # image the device's modules are used in place, so loading them costs
    # the code structures only, far less than from .mpy files; the derived
    # core figure (minimum heap minus the image) is what the heap would hold
    # with the image in flash.
    out = bm.build(tmp_path)
    from_mpy = sum(r[1] for r in bm.import_costs(out)[0])
    r = bm.measure_romfs(out)
    print("romfs figures:", r, "import from .mpy:", from_mpy)
    assert r["device_import_besides_image"] < from_mpy - r["image_bytes"] // 2, (r, from_mpy)
    assert r["core"]["min_heapsize_startup_gc_without_image_k"] * K < CORE_TODAY_GC - 16 * K, r
