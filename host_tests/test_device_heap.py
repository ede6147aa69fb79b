"""Host-only: the device in a small MicroPython heap (issues 3, 5/6, 10).

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

The budgets are held on the 32-bit builds (issue 10, tools/bench_board.py,
docs/MEMORY.md): with microtun frozen in and with .mpy files, each as the
firmware starts. Where a target is not reached yet it is a strict expected
failure, checked at the target, at least 2K under today's minimum so noise
cannot flip it (1.25K for the frozen endpoint: below) and reaching it fails
loudly; today's figures are pinned with a margin of
about 2K (the outcome near the limit varies from run to run: random keys
and indexes, the conservative scan of the C stack), and so is the whole
firmware against two real PoPs. A 32-bit build that cannot be found or
made skips those tests with the reason (host_tests/board_heap.py).

On the 64-bit wheel the figures stay reported for reference
(`python tools/bench_memory.py`), pinned the same way, and are not targets:
objects there are about twice their board size.
"""
import shutil
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import bench_memory as bm  # noqa: E402
import bench_board as bb  # noqa: E402
import board_heap  # noqa: E402

K = 1024
GC = bm.STARTUP_GC
# measured minimum (after issue 11's device changes and the viper XOR):
# endpoint 54.75K (48.0K with GC), core 83.5-83.75K (74.75-75.25K with GC).
# On 2026-12-07 (loaded VM) the core passed at 85-86K without issue 13's ops
# hook and at 86-87K (77-78K with GC) with it: the hook is ~220 B of
# tunnel.mpy bytecode on armv7m, about twice that on this 64-bit wheel, and
# the pins had no margin left (docs/OPS.md, "What it costs a device").
ENDPOINT_TODAY = 57 * K
ENDPOINT_TODAY_GC = 51 * K
CORE_TODAY = 88 * K
CORE_TODAY_GC = 79 * K
TOO_SMALL = 16 * K
# allocated per 64-byte packet sent / received (measured 1.9K each; ~1.6K
# before the AEAD made its ECB object per message too: docs/MEMORY.md)
SEND_BYTES = 2200
RECEIVE_BYTES = 2200


@pytest.fixture(scope="module")
def mpy(tmp_path_factory):
    return bm.build(tmp_path_factory.mktemp("mpy"))


def fits(mpy, mode, heapsize, gc=0, rekeys=False):
    return bm.scenario(mpy, mode, heapsize, count=False, gc=gc, rekeys=rekeys) is not None


def test_endpoint_session_fits_todays_heap(mpy):
    assert fits(mpy, "endpoint", ENDPOINT_TODAY)
    assert fits(mpy, "endpoint", ENDPOINT_TODAY_GC, GC)


def test_core_two_paths_fits_todays_heap(mpy):
    assert fits(mpy, "core", CORE_TODAY)
    assert fits(mpy, "core", CORE_TODAY_GC, GC)


def test_heap_limit_is_real(mpy):
    # The same run in a heap far too small must fail (scenario() raises
    # unless the device died of a MemoryError): -X heapsize bites.
    assert not fits(mpy, "endpoint", TOO_SMALL)


def test_bytes_allocated_per_packet(mpy):
    r = bm.scenario(mpy, "endpoint")
    print("device heap figures:", r)
    assert r["per_send"] <= SEND_BYTES and r["per_receive"] <= RECEIVE_BYTES, r


def test_romfs_image_keeps_the_code_bytes_out_of_the_heap(mpy, tmp_path):
    # bench_memory --romfs (docs/MEMORY.md, "Out of reach"): from a ROMFS
    # image the device's modules are used in place, so loading them costs
    # the code structures only, far less than from .mpy files; the derived
    # core figure (minimum heap minus the image) is what the heap would hold
    # with the image in flash.
    # One run at that bound instead of bench_memory's bisections (which
    # took ~30 s): the core from the image fits in 16K under today's .mpy
    # pin besides the image, and -X heapsize bites there too.
    out = tmp_path / "romfs"
    shutil.copytree(mpy, out)           # build_romfs moves the package out of lib
    from_mpy = sum(r[1] for r in bm.import_costs(out)[0])
    r = bm.measure_romfs(out, bisect=False)
    print("romfs figures:", r, "import from .mpy:", from_mpy)
    assert r["device_import_besides_image"] < from_mpy - r["image_bytes"] // 2, (r, from_mpy)
    assert bm.romfs_scenario(out, "core", CORE_TODAY_GC - 16 * K + r["image_bytes"]) is not None
    assert bm.romfs_scenario(out, "core", r["image_bytes"] + TOO_SMALL) is None


# -- the 32-bit builds (issue 10) ------------------------------------------------------------
# measured minimum with the start-up GC (tools/bench_board.py, several runs,
# 2026-12-07 after issue 10's fifth round: the harness no longer holds the
# last datagram it sent and the hex lines it read): frozen: endpoint
# 12.75-13.0K, core 19.75K, firmware 29K; .mpy: endpoint 33.75K, core 55.5K,
# firmware 76K. Sixth round (a collect after the device's X25519 at
# construction, the replay ring without a temporary): frozen endpoint 12.75K
# in every bisection (12.5-13.25K before), the rest unchanged. Seventh round
# (fewer globals, qstrs and function objects on the device path): frozen
# endpoint 11.75-12.0K, core 17.75-18.0K. After the
# fourth round: frozen 13.25-13.75K, 20.0-20.5K, 28-29K; .mpy 34.25-34.5K, 56.0K, 75-76K.
# The .mpy package compiled with -O3, as `microtun flash` now ships it (no
# line tables), and the firmware built for the interpreter's -march (the
# native XOR loads): .mpy endpoint 32.75K, core 53.5K, firmware 73K (two
# full runs, 2026-12-07 15:00 UTC; 33.75K, 55.5K, 76K before). Both merged,
# and the -O3 .mpy files named by their dotted module names: .mpy endpoint
# 32.0K, core 52.0-52.25K (three runs, 15:46-15:50 UTC).
TODAY_32 = {"frozen": {"endpoint": 14.25 * K, "core": 20.25 * K, "firmware": 32},
            "mpy": {"endpoint": 34 * K, "core": 54.25 * K, "firmware": 68}}
# (the .mpy firmware at 68K, 5K above its figure, 63K since 2026-12-08; it
# was 77K when the figure was 73-76K: at 78K one run in a helper's targeted
# runs failed on a loaded machine; its minimum moves by a few K. The 64K
# target has its own test below.)
# bytes allocated per 1200-byte packet, the endpoint: the target itself, 2 KB
# (measured 1,957 / 1,952 B on both builds, the same on every run: the counts
# do not depend on timing; 2,296 / 2,288 before the AEAD kept X and S_0 in a
# scratch buffer, the device's indexes became small ints and the bench
# stopped counting the buffers' one-time growth; 6.25K / 6.1K with the CCM's
# big-int XOR)
PACKET_TODAY_32_CORE = 3000  # the two-path stack with .mpy files, best effort (measured 2,517 / 2,528 B:
                             # the hop MAC through hashlib there, two SHA-256 objects and digests per
                             # MAC; 2,709 / 2,560 before the path choice and the receive path stopped
                             # allocating; 5,512 / 4,144 while the outer layer copied every packet)
UNMET = "issue 10 target not reached on the 32-bit %s build (docs/MEMORY.md)"


@pytest.fixture(scope="module")
def build32(tmp_path_factory):
    made = {}

    def get(kind):
        if kind not in made:
            made[kind] = board_heap.build(kind, tmp_path_factory.mktemp("b32" + kind))
        return made[kind]
    return get


@pytest.mark.parametrize("kind", ["frozen", "mpy"])
@pytest.mark.parametrize("mode", ["endpoint", "core"])
def test_device_fits_todays_heap_on_32bit(build32, kind, mode):
    # through handshakes under a live session too (bench_memory.REKEYS): the
    # pins hold what a device needs after its first session (2026-12-07,
    # 18:36 UTC: frozen endpoint 12.5K, core 18.5K; .mpy 32.75K, 52.75K;
    # at night frozen 12.0-12.25K and 18.0K, .mpy endpoint 32.0-32.25K)
    out = build32(kind)
    with board_heap.use(kind):
        assert fits(out, mode, int(TODAY_32[kind][mode]), GC, rekeys=True)
        assert not fits(out, mode, int(TODAY_32[kind][mode]) // 2, GC)    # -X heapsize bites there too


# The frozen targets (12K, 18K) are met since issue 10's seventh round
# (2026-12-07): minimum 11.75-12.0K and 17.75-18.0K by bisection; one run
# at the target worked in 80 of 80 (endpoint; 199 of 200 in a longer
# count) and 40 of 40 (core; 100 of 100), at 0.25K under it in 64-71 of 80
# and 38-40 of 40 (docs/MEMORY.md, "Seventh round").
# The margin is small: a change that costs the device ~100 bytes held for
# good, or a frame more on the transport path, can make these fail.
# The .mpy endpoint's first session is under its target (32K) since the
# night's rounds (docs/MEMORY.md, "Native frames, the session's fields, the
# .mpy endpoint"): 31.5-31.75K by bisection, one run at 32K working in 30 of
# 30 (it sat at the target before: 28 of 30, 2026-12-07 15:46-15:50 UTC).
# Through handshakes under a live session (rekeys: the current keypair
# through a handshake, then two; bench_memory.REKEYS) the frozen endpoint
# needed 12.5K and the core 18.5K (2026-12-07, 18:36 UTC; 13.0K and 18.75K
# when first measured). Since the session's fields are its own on a board
# and the handshake's modules are frozen as native code (docs/MEMORY.md,
# "Native frames"): endpoint 12.0K in 3 of 6 bisections, 12.25K in the
# others, one run at 12.0K working in 30 of 40; core 18.0K in 6 of 6, one
# run at 18.0K working in 37 of 40. Neither is sure enough at the target
# for a test there (it would fail now and then whichever way it is marked);
# the pins above (TODAY_32, ~2K over) hold them, tools/bench_board.py
# reports their minimum.
@pytest.mark.parametrize("kind,mode,rekeys", [
    ("frozen", "endpoint", False),
    ("frozen", "core", False),
    ("mpy", "endpoint", False),
    # since the .mpy build folds the wire constants (microtun_host.fold):
    # 29.0K through twenty handshakes by bisection, against 32.0-32.25K
    ("mpy", "endpoint", True),
    pytest.param("mpy", "core", False, marks=pytest.mark.xfail(strict=True, reason=UNMET % ".mpy")),
])
def test_device_fits_the_32bit_target(build32, kind, mode, rekeys):
    out = build32(kind)
    with board_heap.use(kind):
        assert fits(out, mode, bb.TARGETS[kind][mode], GC, rekeys=rekeys)


@pytest.mark.parametrize("kind", ["frozen", "mpy"])
def test_bytes_allocated_per_1200_byte_packet_on_32bit(build32, kind):
    out = build32(kind)
    with board_heap.use(kind):
        r = bm.scenario(out, "endpoint", size=1200)
        c = bm.scenario(out, "core", size=1200)
    print("%s: per 1200-byte packet sent %d, received %d; two-path stack %d, %d" % (
        kind, r["per_send"], r["per_receive"], c["per_send"], c["per_receive"]))
    # issue 10's target (2 KB each way) for the endpoint: the packet, the two
    # cryptolib objects made per message and ~70 bytes of views and tuples
    assert r["per_send"] <= bb.PACKET_TARGET and r["per_receive"] <= bb.PACKET_TARGET, r
    # the outer header is written in place before the inner packet and read
    # through a view: the stack adds the hop MAC's hash objects, not copies
    assert c["per_send"] <= PACKET_TODAY_32_CORE and c["per_receive"] <= PACKET_TODAY_32_CORE, c


@pytest.mark.parametrize("kind", [
    # frozen: 2,021 / 2,016 B (the hop MAC in native code, microtun/hopmac.py: nothing
    # allocated; 2,709 / 2,560 with hashlib's two SHA-256 objects and digests per MAC)
    "frozen",
    pytest.param("mpy", marks=pytest.mark.xfail(strict=True, reason=(
        "issue 10 target (2 KB per 1200-byte packet) not reached through the two-path stack with .mpy "
        "files: 2.5K measured, the hop MAC through hashlib (two SHA-256 objects and digests per MAC); "
        "the native hop MAC is for frozen builds (its ~4 KB of native code would sit in RAM; "
        "docs/MEMORY.md)"))),
])
def test_bytes_allocated_per_1200_byte_packet_target_two_paths(build32, kind):
    out = build32(kind)
    with board_heap.use(kind):
        c = bm.scenario(out, "core", size=1200)
    print("%s two-path stack, per 1200-byte packet: sent %d, received %d" % (kind, c["per_send"], c["per_receive"]))
    assert max(c["per_send"], c["per_receive"]) <= bb.PACKET_TARGET, c


def firmware_runs(kind, k):
    """The whole firmware against two real PoPs and a gateway, one 6-s run
    in a k-K heap (tools/bench_board.py's FirmwareRig)."""
    fr = bb.FirmwareRig(board_heap.interpreter(kind), kind)
    try:
        ok = fr.trial(k)
        print(fr.trials)
        return ok
    finally:
        fr.close()


@pytest.mark.parametrize("kind", ["frozen", "mpy"])
def test_firmware_runs_in_todays_heap_on_32bit(kind):
    # frozen: that is the target itself (32K; measured 28-29K)
    assert firmware_runs(kind, TODAY_32[kind]["firmware"])


def test_firmware_runs_in_64k_with_mpy_files():
    # the target: 63K by bisection since the .mpy firmware stays under 620
    # qstrs (the wire constants folded, the app and board.py compiled by
    # `microtun flash`; docs/MEMORY.md, "The qstr pools"); 8 of 8 runs at
    # 64K and 8 of 8 at 63K (2026-12-08). 67-69K before: its sixth qstr
    # pool, 4.5K in one block, came with the 621st qstr.
    assert firmware_runs("mpy", bb.TARGETS["mpy"]["firmware"] // K)
