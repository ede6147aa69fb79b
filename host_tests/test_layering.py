"""The portable package stays portable: no I/O modules outside its drivers,
and never the host-only package."""
import ast
from pathlib import Path

LIB = Path(__file__).resolve().parent.parent / "lib"
PORTABLE = LIB / "microtun"
FORBIDDEN = {"socket", "select", "asyncio", "time", "machine", "network", "uasyncio", "usocket", "uselect", "utime"}
# Modules allowed to do I/O: the thin drivers around the sans-I/O core.
DRIVER_MODULES = {"driver", "device"}


def imported_modules(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                yield node.module, node.lineno


def portable_files():
    return sorted(PORTABLE.rglob("*.py"))


def test_core_does_no_io():
    bad = []
    for f in portable_files():
        rel = f.relative_to(PORTABLE).with_suffix("")
        if rel.parts[0] in DRIVER_MODULES:
            continue
        for mod, line in imported_modules(f):
            if mod.split(".")[0] in FORBIDDEN:
                bad.append("%s:%d imports %s" % (f.relative_to(LIB), line, mod))
    assert not bad, "I/O in the sans-I/O core (move it to a driver module):\n" + "\n".join(bad)


def test_portable_never_imports_host_package():
    bad = []
    for f in portable_files():
        for mod, line in imported_modules(f):
            if mod.split(".")[0] == "microtun_host":
                bad.append("%s:%d imports %s" % (f.relative_to(LIB), line, mod))
    assert not bad, "\n".join(bad)


def test_checker_sees_a_violation(tmp_path):
    # The scan must actually catch an import (guards against a vacuous test).
    f = tmp_path / "x.py"
    f.write_text("import os\nfrom time import sleep\nimport select as s\n")
    mods = {m for m, _ in imported_modules(f)}
    assert {"time", "select"} <= mods
