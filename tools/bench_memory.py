"""Memory benchmark (issues 2, 3, 5/6): prints one JSON object.

    python tools/bench_memory.py            # everything, ~1 minute
    python tools/bench_memory.py --quick    # no bisection
    python tools/bench_memory.py --lib DIR  # the device side from DIR/microtun
                                            # (e.g. an older checkout's lib)
    python tools/bench_memory.py --romfs    # the device's code in a ROMFS image
                                            # (measure_romfs(): how, and what not)
    python tools/bench_memory.py --lines    # the package with line numbers
                                            # (`microtun flash --lines`)

Runs on CPython and measures the MicroPython unix port (64-bit: objects are
about twice their size on a 32-bit board). The portable package is
precompiled with mpy-cross into a temporary directory first, exactly as
`microtun flash` builds it for a board (the same function,
microtun_host.flash.compile_mpy: bytecode, the interpreter's -march,
-O3 and `-s microtun.X`, or `-s microtun/X.py` with --lines): compiling .py files on the device
needs far more heap than running them. The measuring scripts (the scenario
script, the import and crypto scripts) are compiled with line numbers and
asserts: they are the harness, not the device's code.

- import: heap each device module costs when imported in dependency order
  (module by module, after gc.collect(); new qstrs and their string bytes
  too: the qstr pools grow in steps, so a module that happens to trigger a
  new pool looks expensive), and the total of the device import set (what
  microtun.driver and microtun.config import);
- endpoint: a microtun.endpoint.Device with an established session and a
  1024-packet window, driven over a pipe by a CPython gateway
  (host_tests/heap_device.py, compiled per scenario: the heap minimums load
  neither the core's code nor the counting commands): heap in use, bytes
  allocated per packet sent and received (64 and 1200 bytes of app data);
- core: the same for the whole device stack, microtun.tunnel.TunnelCore
  with two paths (outer framing, path probes) behind a simulated first PoP;
- min_heapsize: the smallest `-X heapsize` (bytes, found by bisection to
  256 bytes, each candidate a fresh process, three runs each) in which each
  scenario completes: "crypto" (import aead and x25519, seal, open, one
  X25519), "endpoint" and "core"; min_heapsize_startup_gc the same with
  gc.threshold(STARTUP_GC) while the modules load, as a firmware should
  start (docs/MEMORY.md).

tests use the same functions: host_tests/test_crypto_heap.py and
host_tests/test_device_heap.py.
"""
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT / "lib"
PKG = LIB / "microtun"
DEVICE_SCRIPT = ROOT / "host_tests" / "heap_device.py"
sys.path.insert(0, str(LIB))

from microtun import outer  # noqa: E402
from microtun.responder import Gateway  # noqa: E402
from microtun.x25519 import public_key  # noqa: E402
from microtun_host.flash import FROZEN_ONLY, NATIVE_MODULES, compile_mpy  # noqa: E402

ENTRY = ("config", "driver")   # what the firmware imports from the package
SETS = {"device": ENTRY, "endpoint": ("endpoint",), "crypto": ("aead", "x25519")}
DEV_KEY = bytes(range(1, 33))
GW_KEY = bytes(range(101, 133))
PSK = b"\x42" * 32
GRAIN = 256                    # bisection resolution, bytes
TIMEOUT = 120

# gc.threshold while the modules load (heap_device.py, the crypto script):
# collecting every 2K allocated lets what a module loads fill the holes the
# loading of the one before left, instead of piling up behind them; a
# firmware should do the same (docs/MEMORY.md). The figures are taken both
# ways.
STARTUP_GC = 2048
DEVICE_MODULE = "heap_device"  # what DeviceProcess runs (romrun with --romfs), + _core / _count
# heap_device.py compiled once per script (build()): the core scenario's code
# and the counting commands only where they are used (docs/MEMORY.md)
DEVICE_SCRIPTS = {"heap_device": (0, 0), "heap_device_core": (1, 0),
                  "heap_device_count": (0, 1), "heap_device_core_count": (1, 1)}
# sys.path of the interpreter measured: "lib" (the .mpy files build() makes);
# ".frozen:lib" on a build with microtun frozen in (tools/bench_board.py),
# where build(out, package=False) leaves the package out of lib.
MICROPYPATH = "lib"
# The package compiled with line numbers (`microtun flash --lines`), not
# with -O3 as `microtun flash` ships it by default (--lines).
LINES = False

# Budgets (bytes of -X heapsize on the 64-bit unix port).
TARGETS = {"crypto": 16 * 1024, "endpoint": 32 * 1024, "core": 48 * 1024}
REQUIRED = {"core": 64 * 1024}

CRYPTO_SCRIPT = """
import gc


def main():
    def used():
        gc.collect()
        return gc.mem_alloc()
    steps = [("start", used())]
    #BEFORE
    from microtun.aead import AEAD
    steps.append(("import_aead", used()))
    from microtun.x25519 import x25519, public_key
    steps.append(("import_x25519", used()))
    #AFTER
    a = AEAD(bytes(range(32)))
    msg = b"sensor reading 42, all fine" * 4
    sealed = a.seal(bytes(12), msg, b"header")
    steps.append(("AEAD+seal", used()))
    assert a.open(bytes(12), sealed, b"header") == msg
    assert a.open(bytes(12), sealed, b"tampered") is None
    steps.append(("open", used()))
    shared = x25519(bytes(range(32)), public_key(bytes(range(1, 33))))
    assert len(shared) == 32
    steps.append(("x25519", used()))
    print("HEAP", " ".join("%s=%d" % s for s in steps))
    print("COMPLETED")


main()
"""

IMPORT_HEAD = """
import gc
import micropython
def used():
    gc.collect()
    return gc.mem_alloc()
print("START %d" % used())
micropython.qstr_info()
"""
# One literal import statement per module, as the firmware imports them. (No
# long command-line arguments: the unix port interns each one as a qstr, and
# one over 255 characters kills it with "FATAL: uncaught NLR".)
IMPORT_STEP = """
b = used()
import %s
print("M %s %%d" %% (used() - b))
micropython.qstr_info()
"""


# -- tools ------------------------------------------------------------------------
def _exe(name, env):
    exe = os.environ.get(env)
    if exe:
        return exe
    cand = Path(sys.executable).with_name(name)
    if cand.exists():
        return str(cand)
    cand = ROOT / ".venv" / "bin" / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise SystemExit("%s not found: run `make setup`" % name)
    return found


def micropython_exe():
    return _exe("micropython", "MICROPYTHON")


def mpy_cross_exe():
    return _exe("mpy-cross", "MPY_CROSS")


_ARCH = {}


def native_arch(exe=None):
    """The interpreter's .mpy arch (mpy-cross -march), from sys.implementation._mpy."""
    exe = exe or micropython_exe()
    if exe not in _ARCH:
        from microtun_host.flash import ARCHS
        r = subprocess.run([exe, "-c", "import sys; print(sys.implementation._mpy)"],
                           capture_output=True, text=True, timeout=60)
        _ARCH[exe] = ARCHS[(int(r.stdout) >> 10) & 0x3F]
    return _ARCH[exe]


def _mpy(src, dst, name):
    """One module of the package as `microtun flash` compiles it for a board
    whose -march is the interpreter's (the viper module, microtun/xorbuf.py,
    needs it; the rest is bytecode either way); anything else (the
    measuring scripts) with line numbers and asserts."""
    if name.startswith("microtun/"):
        compile_mpy(Path(src), Path(dst), name, native_arch(), mpy_cross_exe(), LINES)
    else:
        compile_mpy(Path(src), Path(dst), name, None, mpy_cross_exe(), lines=True)


def build(out, package=True):
    """Compile the package (unless package=False: a build with it frozen
    in), the device script and the crypto script into out/lib; returns out.
    The unix port runs in out with MICROPYPATH=lib, so a module's __file__
    (a qstr) is "lib/microtun/x.mpy" whatever out is, about as long as on a
    board."""
    out = Path(out)
    lib = out / "lib"
    (lib / "microtun").mkdir(parents=True, exist_ok=True)
    jobs = []
    for src in sorted(PKG.glob("*.py")) if package else ():
        if src.stem in FROZEN_ONLY:
            continue        # as `microtun flash` does: frozen builds only (x25519 uses big ints)
        jobs.append((src, lib / "microtun" / (src.stem + ".mpy"), "microtun/" + src.name))
    device = DEVICE_SCRIPT.read_text()
    for name, (core, count) in DEVICE_SCRIPTS.items():
        text = device.replace("\n_CORE = const(0)", "\n_CORE = const(%d)" % core, 1)
        text = text.replace("\n_COUNT = const(0)", "\n_COUNT = const(%d)" % count, 1)
        (lib / (name + ".py")).write_text(text)
        # one source name for all four: the same qstr, the same length
        jobs.append((lib / (name + ".py"), lib / (name + ".mpy"), "heap_device.py"))
    scripts = [("crypto_heap", CRYPTO_SCRIPT.replace("#BEFORE", "").replace("#AFTER", "")),
               ("crypto_heap_gc", CRYPTO_SCRIPT.replace("#BEFORE", "gc.threshold(%d)" % STARTUP_GC)
                .replace("#AFTER", "gc.threshold(-1)"))]
    for name, entry in SETS.items():
        names = _import_names([m for m in device_modules(entry) if not (package and m in FROZEN_ONLY)])
        scripts.append(("import_" + name, IMPORT_HEAD + "".join(IMPORT_STEP % (m, m) for m in names)))
    for name, text in scripts:
        (lib / (name + ".py")).write_text(text)
        jobs.append((lib / (name + ".py"), lib / (name + ".mpy"), name + ".py"))
    native_arch()       # once, before the threads
    # one mpy-cross process per file, as many at a time as there are CPUs
    # (the heap tests build this once or twice per run)
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        for f in [pool.submit(_mpy, *job) for job in jobs]:
            f.result()
    for name in [n for n, _ in scripts] + list(DEVICE_SCRIPTS):
        (lib / (name + ".py")).unlink()
    return out


def _top_level(nodes):
    """The statements that run when a module is imported: everything but
    function bodies."""
    for node in nodes:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            yield from _top_level(getattr(node, field, ()))


def _imports(name):
    """The microtun modules importing `name` loads (imports inside functions
    run later, if ever: a device loads microtun.cookie only when a cookie
    arrives; `microtun flash` still ships such modules)."""
    mods = set()
    for node in _top_level(ast.parse((PKG / (name + ".py")).read_text()).body):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "microtun":
                mods.update(a.name for a in node.names)
            elif node.module.startswith("microtun."):
                mods.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            mods.update(a.name.split(".")[1] for a in node.names if a.name.startswith("microtun."))
    return sorted(m for m in mods if (PKG / (m + ".py")).is_file() and m != name)


def device_modules(entry=ENTRY):
    """The modules importing the entry modules loads, in dependency order
    (dependencies first)."""
    order = []
    seen = set()

    def visit(m):
        if m in seen:
            return
        seen.add(m)
        for d in _imports(m):
            visit(d)
        order.append(m)

    for m in entry:
        visit(m)
    return order


def run_mp(out, args, heapsize=None, stdin=None, timeout=TIMEOUT):
    cmd = [micropython_exe()]
    if heapsize:
        cmd += ["-X", "heapsize=%d" % heapsize]
    return subprocess.run(cmd + args, input=stdin, capture_output=True, text=True, timeout=timeout,
                          env={"MICROPYPATH": MICROPYPATH}, cwd=str(out))


def heap_k(n):
    return None if n is None else round(n / 1024, 2)


# -- scenarios --------------------------------------------------------------------
def _import_names(modules):
    return ["microtun"] + ["microtun." + m for m in modules if m != "__init__"]


def import_costs(out, which="device"):
    """[(module, heap bytes, new qstrs, new qstr string bytes, .mpy bytes)]
    for the modules of SETS[which] imported one after the other (the package
    first); the qstr pool figures before and after."""
    p = run_mp(out, ["-m", "import_" + which])
    if p.returncode:
        raise RuntimeError(p.stderr or p.stdout)
    rows = []
    pools = []
    for line in p.stdout.splitlines():
        q = re.match(r"qstr pool: n_pool=(\d+), n_qstr=(\d+), n_str_data_bytes=(\d+), n_total_bytes=(\d+)", line)
        if q:
            pools.append(tuple(int(x) for x in q.groups()))
        elif line.startswith("M "):
            _, m, n = line.split()
            rows.append([m[len("microtun."):] or "__init__", int(n)])
    res = []
    for i, (m, n) in enumerate(rows):
        before, after = pools[i], pools[i + 1]
        mpy = out / "lib" / "microtun" / (m + ".mpy")
        res.append((m, n, after[1] - before[1], after[2] - before[2], mpy.stat().st_size if mpy.exists() else 0))
    return res, pools[0], pools[-1]


def run_crypto(out, heapsize, gc=False):
    """(completed, {step: heap in use}) for the crypto script (gc: with
    STARTUP_GC); RuntimeError if it failed for another reason than a
    MemoryError."""
    p = run_mp(out, ["-m", "crypto_heap_gc" if gc else "crypto_heap"], heapsize)
    steps = {}
    m = re.search(r"^HEAP (.*)$", p.stdout, re.M)
    if m:
        steps = {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}
    ok = "COMPLETED" in p.stdout
    if not ok and "MemoryError" not in p.stdout + p.stderr:
        raise RuntimeError("crypto script failed: " + (p.stdout + p.stderr)[-400:])
    return ok, steps


class DeviceProcess:
    """A heap_device.py process and the CPython side of its pipe."""

    def __init__(self, out, mode, args, heapsize=None, gc=0, first=None, count=False):
        cmd = [micropython_exe()]
        if heapsize:
            cmd += ["-X", "heapsize=%d" % heapsize]
        self.mode = mode
        module = DEVICE_MODULE + ("_core" if mode == "core" else "") + ("_count" if count else "")
        self.proc = subprocess.Popen(cmd + ["-m", module, str(gc)] + list(args),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={"MICROPYPATH": MICROPYPATH}, cwd=str(out))
        self.received = 0           # app messages the device delivered
        if first:                   # the endpoint's keys (heap_device.py)
            try:
                self.proc.stdin.write(first + "\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass                # died at start (a heap far too small): start() reads why

    def _lines(self):
        got = []
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise EOFError(self.proc.stderr.read()[-400:])
            if line.startswith("K"):
                return got
            if line.startswith("D "):
                _, i, h = line.split()
                got.append((int(i), bytes.fromhex(h)))
            elif line.startswith("E"):
                self.received += 1

    def start(self):
        return self._lines()

    def command(self, line, extra=()):
        self.proc.stdin.write(line + "\n")
        for x in extra:
            self.proc.stdin.write(x + "\n")
        self.proc.stdin.flush()
        return self._lines()

    def finish(self):
        self.proc.stdin.write("Q\n")
        self.proc.stdin.flush()
        out, err = self.proc.communicate(timeout=TIMEOUT)
        qstrs = None
        for line in out.splitlines():
            q = re.match(r"qstr pool: n_pool=(\d+), n_qstr=(\d+), n_str_data_bytes=(\d+), n_total_bytes=(\d+)", line)
            if q:
                qstrs = {"pools": int(q.group(1)), "qstrs": int(q.group(2)), "bytes": int(q.group(4))}
            if line.startswith("R "):
                r = dict(zip(("established", "steady_heap", "over_start", "heap_total", "per_send", "per_receive"),
                             (int(x) for x in line.split()[1:])))
                r["established"] = bool(r["established"])
                r["qstr"] = qstrs
                return r
        raise EOFError(err[-400:])

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def core_config(n_paths=2):
    paths = [{"name": "p%d" % i, "pop": "127.0.0.1:%d" % (7000 + i), "label": 100 + i,
              "rx_label": 200 + i, "hop_key": (bytes([i + 1]) * 32).hex()} for i in range(n_paths)]
    return {"name": "dev", "private_key": DEV_KEY.hex(), "gateway_public_key": public_key(GW_KEY).hex(),
            "psk": PSK.hex(), "paths": paths, "policy": "best"}


class Far:
    """The far side: the gateway, and for "core" the first PoP of each path."""

    def __init__(self, cfg=None):
        self.gw = Gateway(GW_KEY)
        self.peer = self.gw.add_peer(public_key(DEV_KEY), psk=PSK)
        self.now = 1000
        self.cfg = cfg
        self.keys = [outer.HopKey(bytes.fromhex(p["hop_key"])) for p in cfg["paths"]] if cfg else []
        self.delivered = 0

    def take(self, datagrams):
        """Datagrams from the device in; returns the D lines for the device."""
        lines = []
        for i, data in datagrams:
            if i < 0:
                self.gw.receive_datagram(data, "dev", self.now)
                continue
            parsed = outer.parse(data)
            if parsed is None or not outer.verify(self.keys[i], data):
                raise AssertionError("the device sent a packet its PoP would drop")
            ptype, label = parsed
            if ptype == outer.TYPE_DATA:
                self.gw.receive_datagram(data[outer.HEADER_LEN:], i, self.now)
            elif ptype == outer.TYPE_HOP_PROBE:
                reply = outer.probe_reply_payload(data[outer.HEADER_LEN:], 4, 40000 + i, bytes((10, 0, 0, 1)))
                lines.append("D %d %s" % (i, outer.seal(outer.TYPE_HOP_PROBE_REPLY, label, self.keys[i], reply).hex()))
        for data, addr in self.gw.datagrams_to_send(self.now):
            if self.keys:
                data = outer.seal(outer.TYPE_DATA, self.cfg["paths"][addr]["rx_label"], self.keys[addr], data)
                lines.append("D %d %s" % (addr, data.hex()))
            else:
                lines.append("D -1 %s" % data.hex())
        while True:
            e = self.gw.next_event()
            if e is None:
                break
            self.delivered += e.kind == "data" and e.channel == 1
        return lines


def exchange(dev, far, datagrams):
    """Carry datagrams both ways until neither side has anything to send."""
    while datagrams:
        lines = far.take(datagrams)
        datagrams = []
        for line in lines:
            datagrams += dev.command(line)


# The episode a scenario ends with when rekeys=True: REKEYS handshakes, 20 s
# apart, each started with the session up (the "H" command: Device.rekey,
# as the driver calls it when every path went dark; a rekey after
# rekey_after_ms and a re-handshake on unanswered data hold the same
# objects), and a packet each way on the new keys after each. So the
# figures hold the states a device lives in after its first session: the
# current keypair through a handshake, then current and previous. The first
# session alone left them out: the frozen endpoint needed 13.75K heap with
# them, not the 11.75K of its first handshake (docs/MEMORY.md, "Keypairs
# through a handshake").
REKEYS = 3
# Three do not show what a device that rekeys for days needs: at the frozen
# endpoint's 12.0K each handshake failed ~5 % of the time for want of a
# 19-block hole, so three passed most runs where twenty failed half of them
# (docs/MEMORY.md, "How many handshakes a figure should hold"). The bench
# also reports the minimum through REKEYS_LONG (rekeys=REKEYS_LONG).
REKEYS_LONG = 20


def handshakes_under_session(dev, far, size, n=REKEYS):
    """The episode above, n handshakes; RuntimeError if a handshake did not
    complete or a packet did not get through."""
    for i in range(n):
        far.now += 20000
        exchange(dev, far, dev.command("T 20000"))
        hs0, sent, got = far.gw.stats.get("handshake_ok", 0), far.delivered, dev.received
        exchange(dev, far, dev.command("H"))
        exchange(dev, far, dev.command("s 1 %d" % size))
        far.gw.send(far.peer, 1, bytes(size), far.now)
        for line in far.take([]):
            exchange(dev, far, dev.command(line))
        if far.gw.stats.get("handshake_ok", 0) != hs0 + 1 or far.delivered != sent + 1 or dev.received != got + 1:
            raise RuntimeError("handshake %d under a live session: %d completed, a packet each way: %d to the "
                               "gateway, %d to the device" % (i + 1, far.gw.stats.get("handshake_ok", 0) - hs0,
                                                              far.delivered - sent, dev.received - got))


def scenario(out, mode, heapsize=None, packets=20, size=64, count=True, gc=0, rekeys=False):
    """Run one device scenario; the device's report (established, heap in use,
    and with count=True bytes allocated per packet, counted with the GC off,
    which needs more heap), or None if the device ran out of memory.
    RuntimeError if it failed in any other way. rekeys: end with
    handshakes_under_session, REKEYS of them (True) or that many (an int;
    the heap minimums need it; the counts of bytes per packet are taken
    before it)."""
    if rekeys is True:
        rekeys = REKEYS
    if mode == "core":
        cfg = core_config()
        far = Far(cfg)
        (Path(out) / "core.json").write_text(json.dumps(cfg))
        args = ["core.json"]
    else:
        far = Far()
        args = []
    keys = None if mode == "core" else " ".join((DEV_KEY.hex(), public_key(GW_KEY).hex(), PSK.hex()))
    dev = DeviceProcess(out, mode, args, heapsize, gc, keys, count)
    try:
        exchange(dev, far, dev.start())            # handshake
        if mode == "core":
            for _ in range(6):                       # path probes: both paths come up
                far.now += 300
                exchange(dev, far, dev.command("T 300"))
        if count:
            # One packet each way first, uncounted: the AEAD's shared buffers
            # grow once to the largest message and stay (docs/MEMORY.md);
            # counted over 20 packets that one-time growth read as ~260 bytes
            # more per 1200-byte packet than any later packet allocates.
            exchange(dev, far, dev.command("s 1 %d" % size))
            far.gw.send(far.peer, 1, bytes(size), far.now)
            for line in far.take([]):
                exchange(dev, far, dev.command(line))
        before = dev.received
        sent_before = far.delivered
        if count:       # all at once with the GC off, counting the bytes allocated
            exchange(dev, far, dev.command("S %d %d" % (packets, size)))
            for _ in range(packets):
                far.gw.send(far.peer, 1, bytes(size), far.now)
            lines = far.take([])
            exchange(dev, far, dev.command("B %d" % len(lines), lines))
        else:           # one by one, each passed on at once, as a driver does
            for _ in range(packets):
                exchange(dev, far, dev.command("s 1 %d" % size))
            for _ in range(packets):
                far.gw.send(far.peer, 1, bytes(size), far.now)
                for line in far.take([]):
                    exchange(dev, far, dev.command(line))
        got_gw, got_dev = far.delivered - sent_before, dev.received - before
        if rekeys:
            handshakes_under_session(dev, far, size, rekeys)
        report = dev.finish()
    except (EOFError, BrokenPipeError, OSError) as e:
        dev.kill()
        err = str(e) + dev.proc.stderr.read()
        if "MemoryError" in err:
            return None
        raise RuntimeError("%s device failed: %s" % (mode, err[-600:]))
    finally:
        dev.kill()
    report["delivered_to_gateway"] = got_gw
    report["delivered_to_device"] = got_dev
    ok = report["established"] and got_gw == packets and got_dev == packets
    if rekeys:
        report["handshakes_under_session"] = rekeys
    if not ok:
        raise RuntimeError("%s device: %r, gateway %r" % (mode, report, far.gw.stats))
    return report


def min_heapsize(ok, lo=4096, hi=256 * 1024, repeat=3):
    """The smallest heap size (multiple of GRAIN) in which ok(size) holds
    `repeat` times in a row, found by bisection (assuming every larger size
    works too); None if not even hi works. Repeated because the outcome near
    the limit varies from run to run: random keys and indexes, and the
    conservative scan of a C stack whose addresses change with ASLR."""
    def always(h):
        for _ in range(repeat):
            if not ok(h):
                return False
        return True

    if not always(hi):
        return None
    while hi - lo > GRAIN:
        mid = (lo + hi) // 2 // GRAIN * GRAIN
        if always(mid):
            hi = mid
        else:
            lo = mid
    return hi


def measure(out, bisect=True):
    rows, start, end = import_costs(out)
    res = {
        "interpreter": "micropython unix port, 64-bit",
        "mpy_bytes": sum(r[4] for r in rows),
        "import": {
            "per_module": {m: {"heap": n, "qstrs": q, "qstr_chars": c, "mpy": s} for m, n, q, c, s in rows},
            "device_total": sum(r[1] for r in rows),
            "modules": len(rows),
            "qstrs": end[1] - start[1],
            "qstr_pool_bytes": end[3] - start[3],
        },
    }
    for which in ("endpoint", "crypto"):
        rows, start, end = import_costs(out, which)
        res["import"][which + "_total"] = sum(r[1] for r in rows)
        res["import"][which + "_modules"] = [r[0] for r in rows]
        res["import"][which + "_qstrs"] = end[1] - start[1]
    crypto_ok, steps = run_crypto(out, None)
    res["crypto_steps"] = steps if crypto_ok else None
    for mode in ("endpoint", "core"):
        r64 = scenario(out, mode)
        r1200 = scenario(out, mode, size=1200)
        res[mode] = {
            "steady_heap": r64 and r64["steady_heap"],
            "qstrs": r64 and r64["qstr"],
            "alloc_per_send_64": r64 and r64["per_send"],
            "alloc_per_receive_64": r64 and r64["per_receive"],
            "alloc_per_send_1200": r1200 and r1200["per_send"],
            "alloc_per_receive_1200": r1200 and r1200["per_receive"],
        }
    if bisect:
        for key, g in (("min_heapsize", 0), ("min_heapsize_startup_gc", STARTUP_GC)):
            mins = minimum_heaps(out, g)
            res[key] = mins
            res[key + "_k"] = {k: heap_k(v) for k, v in mins.items()}
        res["targets_k"] = {k: heap_k(v) for k, v in TARGETS.items()}
        res["meets_target"] = {k: v is not None and v <= TARGETS[k] for k, v in mins.items()}
        res["meets_required"] = {k: mins[k] is not None and mins[k] <= v for k, v in REQUIRED.items()}
    return res


def minimum_heaps(out, gc=0):
    """{scenario: smallest -X heapsize} for crypto, endpoint and core."""
    return {
        "crypto": min_heapsize(lambda h: run_crypto(out, h, gc)[0]),
        "endpoint": min_heapsize(lambda h: scenario(out, "endpoint", h, count=False, gc=gc) is not None),
        "core": min_heapsize(lambda h: scenario(out, "core", h, count=False, gc=gc) is not None),
    }


# -- code in a ROM filesystem (--romfs) ---------------------------------------------
# MicroPython 1.25+ can run .mpy files from a ROMFS image (vfs.VfsRom):
# bytecode and strings are used where they lie instead of being copied into
# the heap; on a board with a ROM partition (`mpremote romfs deploy`) the
# image is in flash. The unix port here has VfsRom but no ROM partition
# (no vfs.rom_ioctl), so the image can only be mounted from a bytes object,
# which sits in the heap as one block. The figures below are measured that
# way, and "without_image" subtracts the image's size: what the same run
# needs besides the code bytes, i.e. what the heap would hold if the image
# were in flash. A derived figure, not a run.
ROMFS_MOUNT = """import gc, vfs, sys
f = open('rom.img', 'rb')
img = f.read()
f.close()
vfs.mount(vfs.VfsRom(img), '/rom')
sys.path.insert(0, '/rom')
del f
"""
ROMFS_RUN = ROMFS_MOUNT + "import %s\n"


def build_romfs(out):
    """Move the device's modules from out/lib into out/rom.img; returns the
    image size. heap_device then runs through romrun.py (heap_device_core
    through romrun_core.py)."""
    src = Path(out) / "romsrc" / "microtun"
    src.mkdir(parents=True)
    for m in device_modules() + ["__init__"]:
        # `mpremote romfs build` compiles without -march, which the viper
        # modules refuse ("invalid arch"): the image holds the rest, and
        # aead.py and x25519.py use their big-int fallbacks there.
        if m not in NATIVE_MODULES:
            shutil.copyfile(PKG / (m + ".py"), src / (m + ".py"))
    env = dict(os.environ, PATH=str(Path(mpy_cross_exe()).parent) + os.pathsep + os.environ.get("PATH", ""))
    subprocess.run([sys.executable, "-m", "mpremote", "romfs", "-o", str(Path(out) / "rom.img"),
                    "build", str(src.parent)], check=True, capture_output=True, env=env, timeout=TIMEOUT)
    shutil.rmtree(Path(out) / "lib" / "microtun")
    for suffix in ("", "_core"):
        (Path(out) / "lib" / ("romrun%s.py" % suffix)).write_text(ROMFS_RUN % ("heap_device" + suffix))
    return (Path(out) / "rom.img").stat().st_size


ROMFS_IMPORT = ROMFS_MOUNT + """gc.collect()
a = gc.mem_alloc()
import microtun.config, microtun.driver
gc.collect()
print('CODE', gc.mem_alloc() - a)
"""


def romfs_scenario(out, mode, heapsize, gc=STARTUP_GC):
    """One scenario run from the ROMFS image (build_romfs(out) first) in
    heapsize bytes, image included: its report, or None on a MemoryError."""
    global DEVICE_MODULE
    DEVICE_MODULE = "romrun"
    try:
        return scenario(out, mode, heapsize, count=False, gc=gc)
    finally:
        DEVICE_MODULE = "heap_device"


def measure_romfs(out, bisect=True):
    """The ROMFS figures; bisect=False: the image and the import cost only
    (host_tests check the scenarios with one romfs_scenario run each)."""
    size = build_romfs(out)
    global DEVICE_MODULE
    DEVICE_MODULE = "romrun"
    try:
        res = {"image_bytes": size}
        # the device's whole import set from the image: what loading costs
        # besides the bytecode and strings (code structures, dicts, qstr
        # entries), to set against import.device_total from .mpy files
        (Path(out) / "lib" / "romimport.py").write_text(ROMFS_IMPORT)
        p = run_mp(out, ["-m", "romimport"])
        m = re.search(r"CODE (\d+)", p.stdout)
        res["device_import_besides_image"] = int(m.group(1)) if m else None
        for mode in ("endpoint", "core") if bisect else ():
            r = scenario(out, mode, count=False)
            m = min_heapsize(lambda h: scenario(out, mode, h, count=False, gc=STARTUP_GC) is not None)
            res[mode] = {"steady_heap_with_image": r["steady_heap"],
                         "min_heapsize_startup_gc_with_image_k": heap_k(m),
                         "min_heapsize_startup_gc_without_image_k": heap_k(m - size)}
    finally:
        DEVICE_MODULE = "heap_device"
    return res


def main(argv):
    global PKG, LINES
    LINES = "--lines" in argv
    if "--lib" in argv:     # measure another tree's package (the device side only)
        PKG = Path(argv[argv.index("--lib") + 1]) / "microtun"
    with tempfile.TemporaryDirectory(prefix="microtun-mpy-") as d:
        out = build(d)
        if "--romfs" in argv:
            res = {"romfs": measure_romfs(out)}
        else:
            res = measure(out, bisect="--quick" not in argv)
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1:])
