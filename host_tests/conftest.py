"""Runs every portable test on several interpreters: as a normal pytest item
on CPython, and through host_tests/mprun.py as

  name[micropython]  the MicroPython unix port from PyPI (64-bit, .venv)
  name[unix32]       the 32-bit unix port built from MicroPython's source with
                     microtun frozen in (tools/mpbuild.py unix32-frozen): the
                     frozen modules are the ones imported; only what the device
                     image leaves out (responder, noise, outer) comes from lib/
  name[qemu]         the qemu MPS2_AN385 board (Cortex-M3), for test modules
                     that also have the line `QEMU = True`: its test image
                     (tools/mpbuild.py qemu-test) has them frozen in, and each
                     module runs in a fresh qemu driven over the raw REPL

A test module is portable when it contains the line `PORTABLE = True`.
Its tests must then be plain functions (no fixtures, no pytest import); use
host_tests/mtest.py for helpers. Where an interpreter cannot be built (no
MicroPython source, no toolchain), its items are skipped with the one line
tools/mpbuild.py gives (what to install or set); a failed build fails them.
The end of the run shows the counts per interpreter.
"""
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LIB = ROOT / "lib"
sys.path.insert(0, str(LIB))
sys.path.insert(0, str(HERE))

MP_TIMEOUT = 600  # seconds for one module on the unix port
BUILD_TIMEOUT = 1200  # seconds for tools/mpbuild.py (a cold build is ~2 min on 2 cores)
QEMU_TIMEOUT = 600  # seconds for one module on the qemu board
# The 32-bit port's default heap is 1 MB; test_tunnel's replay test keeps
# every packet it sent and ran out there now and then. The tests check
# behaviour, the heap budgets are tools/ benchmarks: the 64-bit wheel's 2 MB.
UNIX32_HEAP = "2M"
INTERPS = ("micropython", "unix32", "qemu")
LABELS = {
    "cpython": "CPython",
    "micropython": "MicroPython unix port, 64-bit wheel",
    "unix32": "MicroPython 32-bit unix port, microtun frozen (build/unix32-frozen)",
    "qemu": "MicroPython qemu MPS2_AN385 Cortex-M3, microtun frozen (build/qemu-an385-test)",
}
# Tests left out on the qemu board, with the reason shown in the skip.
QEMU_SKIP = {
    ("test_x25519.py", "test_rfc7748_iterated_1000"):
        "1000 chained X25519 scalar multiplications take ~33 s under qemu (native ladder); the RFC 7748 vectors "
        "and test_rfc7748_iterated_once run there",
}
# The qemu MPS2 board has no random number generator and the port's os module
# no urandom. The test runs (never the device image) give `import os` a
# stand-in whose urandom is SHA-256 of a counter: deterministic, NOT random,
# enough for tests that need fresh-looking keys and indices.
QEMU_PRELUDE = """
import sys, os as _os, hashlib as _h
class _TestOnlyOs:
    _n = 0
    def urandom(self, n):
        out = b""
        while len(out) < n:
            _TestOnlyOs._n += 1
            out += _h.sha256(b"qemu-test-only" + _TestOnlyOs._n.to_bytes(4, "little")).digest()
        return out[:n]
    def __getattr__(self, name):
        return getattr(_os, name)
if not hasattr(_os, "urandom"):
    sys.modules["os"] = _TestOnlyOs()
"""


def micropython_binary():
    exe = os.environ.get("MICROPYTHON")
    if exe:
        return exe
    cand = Path(sys.executable).with_name("micropython")
    if cand.exists():
        return str(cand)
    return shutil.which("micropython")


def micropython_env():
    env = dict(os.environ)
    env["MICROPYPATH"] = "%s:%s:.frozen" % (LIB, HERE)
    return env


_builds = {}
_build_lock = threading.Lock()


try:
    import ctypes
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (ImportError, OSError, AttributeError):        # not Linux
    _prctl = None


def _die_with_parent():
    """Children of the suite (interpreters, qemu) get SIGKILL if it dies.
    Runs between fork and exec: no imports, no locks."""
    if _prctl is not None:
        _prctl(1, int(signal.SIGKILL))      # PR_SET_PDEATHSIG


def built(target):
    with _build_lock:
        return _built(target)


def _built(target):
    """(path, None) or (None, reason) from tools/mpbuild.py TARGET, once per run.
    reason starts with 'skip: ' when the source or a toolchain is missing."""
    if target not in _builds:
        try:
            proc = subprocess.run([sys.executable, str(ROOT / "tools" / "mpbuild.py"), target],
                                  capture_output=True, text=True, timeout=BUILD_TIMEOUT, cwd=str(ROOT))
        except subprocess.TimeoutExpired:
            _builds[target] = (None, "tools/mpbuild.py %s took over %d s" % (target, BUILD_TIMEOUT))
        else:
            lines = proc.stdout.strip().splitlines()
            if proc.returncode == 0 and lines:
                _builds[target] = (lines[-1], None)
            elif proc.returncode == 2:
                _builds[target] = (None, "skip: " + proc.stderr.strip().splitlines()[-1])
            else:
                _builds[target] = (None, "tools/mpbuild.py %s failed (exit %s):\n%s"
                                   % (target, proc.returncode, proc.stderr[-4000:]))
    return _builds[target]


def _is_qemu(path):
    return re.search(r"^QEMU = True\b", path.read_text(), re.M) is not None


def _is_portable(path):
    try:
        text = path.read_text()
    except OSError:
        return False
    return "\nPORTABLE = True\n" in text


def _test_names(path):
    tree = ast.parse(path.read_text())
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]


class MicroPythonFile(pytest.File):
    def collect(self):
        self._results = {}
        qemu = _is_qemu(self.path)
        for interp in INTERPS:
            if interp == "qemu" and not qemu:
                continue
            for name in _test_names(self.path):
                yield MicroPythonItem.from_parent(self, name="%s[%s]" % (name, interp), testname=name, interp=interp)

    def results(self, interp):
        fut = _futures.get((self.nodeid, interp))
        if fut is not None:
            return fut.result()
        if interp not in self._results:
            self._results[interp] = self.run_on(interp)
        return self._results[interp]

    def run_on(self, interp):
        if _stopping.is_set():
            return None, "the run was stopped"
        t0 = time.monotonic()
        try:
            return getattr(self, "_run_" + interp)()
        except Exception as e:          # a result for the items, never an exception in the worker
            return None, "%s run failed: %r" % (interp, e)
        finally:
            _busy[interp] = _busy.get(interp, 0.0) + time.monotonic() - t0
            _timeline["last_run_end"] = time.monotonic()

    @staticmethod
    def _parse(out):
        res = {}
        for line in out.splitlines():
            if line.startswith("@@MPTEST "):
                r = json.loads(line[9:])
                res[r["name"]] = r
        return res

    def _run_micropython(self):
        exe = micropython_binary()
        if not exe:
            return None, "micropython not found: run the suite through `make test`, which installs it"
        proc = subprocess.run(
            [exe, str(HERE / "mprun.py"), str(self.path)],
            capture_output=True, text=True, timeout=MP_TIMEOUT, env=micropython_env(), cwd=str(ROOT),
        )
        return self._parse(proc.stdout), "exit %s\nstdout tail:\n%s\nstderr:\n%s" % (
            proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])

    def _run_unix32(self):
        exe, why = built("unix32-frozen")
        if exe is None:
            return None, why
        env = dict(os.environ)
        env["MICROPYPATH"] = ".frozen:%s" % HERE      # not lib/: the frozen microtun must be the one imported
        proc = subprocess.run(
            [exe, "-X", "heapsize=" + UNIX32_HEAP, str(HERE / "mprun.py"), "--frozen", str(LIB), str(self.path)],
            capture_output=True, text=True, timeout=MP_TIMEOUT, env=env, cwd=str(ROOT),
            preexec_fn=_die_with_parent,
        )
        return self._parse(proc.stdout), "exit %s\nstdout tail:\n%s\nstderr:\n%s" % (
            proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])

    def _run_qemu(self):
        elf, why = built("qemu-test")
        if elf is None:
            return None, why
        sys.path.insert(0, str(ROOT / "tools"))
        try:
            from qemuboard import QemuBoard, BoardError
        finally:
            sys.path.pop(0)
        names = [n for n in _test_names(self.path) if (self.path.name, n) not in QEMU_SKIP]
        code = QEMU_PRELUDE + "import mprun\nmprun.main(%r)\n" % ([self.path.stem] + names)
        out = err = ""
        board = QemuBoard(elf, preexec_fn=_die_with_parent)
        _boards.add(board)
        try:
            with board:                            # qemu is killed when the block ends
                out, err = board.exec(code, timeout=QEMU_TIMEOUT)
        except BoardError as e:
            err = "%s\n%s" % (e, err)
        finally:
            _boards.discard(board)
        return self._parse(out), "stdout tail:\n%s\nerror:\n%s" % (out[-2000:], err[-4000:])


class MicroPythonFailure(Exception):
    pass


class MicroPythonItem(pytest.Item):
    def __init__(self, *, testname, interp, **kw):
        super().__init__(**kw)
        self.testname = testname
        self.interp = interp

    def runtest(self):
        if self.interp in BACKGROUND:
            _timeline.setdefault("first_background_item", time.monotonic())
        if self.interp == "qemu" and (self.path.name, self.testname) in QEMU_SKIP:
            pytest.skip("qemu: " + QEMU_SKIP[(self.path.name, self.testname)])
        res, detail = self.parent.results(self.interp)
        if res is None:
            if detail.startswith("skip: "):
                pytest.skip("%s: %s" % (self.interp, detail[6:]))
            raise MicroPythonFailure(detail)
        r = res.get(self.testname)
        if r is None:
            raise MicroPythonFailure("no result (%s)" % detail)
        if not r["ok"]:
            raise MicroPythonFailure(r["err"])

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, MicroPythonFailure):
            return LABELS[self.interp] + ":\n" + str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, "%s[%s]" % (self.testname, self.interp)


def pytest_collect_file(parent, file_path):
    if file_path.suffix == ".py" and file_path.name.startswith("test_") and _is_portable(file_path):
        return MicroPythonFile.from_parent(parent, path=file_path)


# -- the built interpreters run in the background -----------------------------------------
# Their items go to the end of the run; one worker thread builds them
# (tools/mpbuild.py, cached) and runs their modules while CPython and the
# 64-bit wheel go through theirs, so the ~2 min of qemu overlaps the rest.
BACKGROUND = ("unix32", "qemu")
_busy = {}          # interp -> seconds its module runs took (builds included)
_timeline = {}      # when the foreground reached the background items, when the last run ended
_futures = {}
_pool = None
_stopping = threading.Event()
_boards = set()


# -- long tests: `make test-long` ---------------------------------------------------------
# End-to-end scenarios that take tens of seconds each (adaptive paths under a
# degrading link, memory under a minute of fuzz, ...) carry
# @pytest.mark.long. `make test` (CI) leaves them out, visibly: each shows as
# skipped with the command that runs it; `make test-long` (pytest --long)
# runs only them, `pytest --long --all` everything.
def pytest_addoption(parser):
    g = parser.getgroup("microtun")
    g.addoption("--long", action="store_true", help="run the tests marked long (make test-long)")
    g.addoption("--all", action="store_true", help="with --long: run every test, long or not")


def pytest_configure(config):
    config.addinivalue_line("markers", "long: a long end-to-end test, run by `make test-long` (pytest --long)")


def _select_long(config, items):
    want_long = config.getoption("--long")
    if want_long and config.getoption("--all"):
        return
    skip = pytest.mark.skip(reason="long test: run it with `make test-long` (pytest --long)")
    keep, dropped = [], []
    for item in items:
        is_long = item.get_closest_marker("long") is not None
        if want_long and not is_long:
            dropped.append(item)        # --long alone: only the long tests
            continue
        if is_long and not want_long:
            item.add_marker(skip)
        keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    _select_long(config, items)

    def rank(item):
        interp = getattr(item, "interp", None)
        if interp in BACKGROUND:
            return BACKGROUND.index(interp) + 2
        mod = getattr(item, "module", None)           # test modules that build (RUN_LAST = True)
        return 1 if getattr(mod, "RUN_LAST", False) else 0
    items.sort(key=rank)        # stable: the order inside each group stays


def pytest_collection_finish(session):
    global _pool
    todo = []
    for item in session.items:
        if getattr(item, "interp", None) in BACKGROUND:
            key = (item.parent.nodeid, item.interp)
            if key not in [k for k, _ in todo]:
                todo.append((key, item.parent))
    if not todo:
        return
    _pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mp-interps")
    for key, f in todo:
        _futures[key] = _pool.submit(f.run_on, key[1])


def pytest_sessionfinish(session):
    _stopping.set()
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)
    for board in list(_boards):
        board.close()


# -- counts per interpreter, at the end of the run ----------------------------------------
_counts = {}


def _interp_of(nodeid):
    m = re.search(r"\[(%s)\]$" % "|".join(INTERPS), nodeid)
    return m.group(1) if m else "cpython"


def pytest_runtest_logreport(report):
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        c = _counts.setdefault(_interp_of(report.nodeid), {})
        outcome = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if outcome == "skipped" else "xpassed"
        c[outcome] = c.get(outcome, 0) + 1


def pytest_terminal_summary(terminalreporter):
    if not _counts:
        return
    terminalreporter.section("tests per interpreter")
    if _busy:
        waited = _timeline.get("last_run_end", 0) - _timeline.get("first_background_item", float("inf"))
        terminalreporter.write_line("module runs: %s; the foreground waited %.0f s for the background (%s)" % (
            ", ".join("%s %.0f s" % (k, _busy[k]) for k in INTERPS if k in _busy), max(0.0, waited),
            ", ".join(BACKGROUND)))
    for interp in ("cpython",) + INTERPS:
        c = _counts.get(interp)
        if c:
            terminalreporter.write_line("%-11s %s  (%s)" % (
                interp, ", ".join("%d %s" % (c[k], k) for k in ("passed", "failed", "skipped", "xfailed", "xpassed")
                          if c.get(k)),
                LABELS[interp]))
