"""Runs every portable test twice: as a normal pytest item on CPython, and as
`name[micropython]` under the MicroPython unix port via host_tests/mprun.py.

A test module is portable when it contains the line `PORTABLE = True`.
Its tests must then be plain functions (no fixtures, no pytest import); use
host_tests/mtest.py for helpers.
"""
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LIB = ROOT / "lib"
sys.path.insert(0, str(LIB))
sys.path.insert(0, str(HERE))

MP_TIMEOUT = 600  # seconds for one module on the unix port


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
        self._results = None
        for name in _test_names(self.path):
            yield MicroPythonItem.from_parent(self, name=name + "[micropython]", testname=name)

    def results(self):
        if self._results is None:
            exe = micropython_binary()
            if not exe:
                raise RuntimeError("micropython not found: run the suite through `make test`, which installs it")
            proc = subprocess.run(
                [exe, str(HERE / "mprun.py"), str(self.path)],
                capture_output=True, text=True, timeout=MP_TIMEOUT, env=micropython_env(), cwd=str(ROOT),
            )
            res = {}
            for line in proc.stdout.splitlines():
                if line.startswith("@@MPTEST "):
                    r = json.loads(line[9:])
                    res[r["name"]] = r
            self._results = (res, proc)
        return self._results


class MicroPythonFailure(Exception):
    pass


class MicroPythonItem(pytest.Item):
    def __init__(self, *, testname, **kw):
        super().__init__(**kw)
        self.testname = testname

    def runtest(self):
        res, proc = self.parent.results()
        r = res.get(self.testname)
        if r is None:
            raise MicroPythonFailure(
                "no result from the unix port (exit %s)\nstdout tail:\n%s\nstderr:\n%s"
                % (proc.returncode, proc.stdout[-2000:], proc.stderr[-4000:])
            )
        if not r["ok"]:
            raise MicroPythonFailure(r["err"])

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, MicroPythonFailure):
            return "MicroPython unix port:\n" + str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, "%s[micropython]" % self.testname


def pytest_collect_file(parent, file_path):
    if file_path.suffix == ".py" and file_path.name.startswith("test_") and _is_portable(file_path):
        return MicroPythonFile.from_parent(parent, path=file_path)
