"""Portable test runner for the MicroPython unix port.

    micropython host_tests/mprun.py host_tests/test_x.py [test_name ...]

Imports the module, runs each test_* function (sorted by name; MicroPython
dicts keep no insertion order) and prints one line per test:

    @@MPTEST {"name": "test_x", "ok": true, "ms": 3, "err": ""}

host_tests/conftest.py reads these lines and reports each one as its own
pytest item, `test_x[micropython]`. The runner also works by hand.

    micropython mprun.py --frozen LIBDIR host_tests/test_x.py

is for an interpreter with microtun frozen in (tools/mpbuild.py
unix32-frozen): the frozen modules are the ones imported (the run fails if
microtun is not frozen), and only the modules the image leaves out (the
gateway's side: responder, noise, outer) come from LIBDIR/microtun. On a
board with the tests frozen in (tools/mpbuild.py qemu-test) the runner is
called as `import mprun; mprun.main(["test_x"])`.
"""
import sys
import gc
import json
import time
import io


def _load(path):
    d, _, f = path.rpartition("/")
    if d and d not in sys.path:
        sys.path.insert(0, d)
    name = f[:-3] if f.endswith(".py") else f
    return __import__(name)


def _format(e):
    buf = io.StringIO()
    sys.print_exception(e, buf)
    return buf.getvalue()


def use_frozen(pkg, libdir):
    """Import every module of the frozen package `pkg`, then point its
    __path__ at libdir/pkg so that modules the image leaves out load from
    there; already imported (frozen) ones stay in sys.modules. Returns the
    names not frozen."""
    import os
    p = __import__(pkg)
    if not p.__path__.startswith(".frozen"):
        raise ImportError("%s is not frozen into this interpreter (found at %s)" % (pkg, p.__path__))
    missing = []
    for f in sorted(os.listdir(libdir + "/" + pkg)):
        if not f.endswith(".py") or f == "__init__.py":
            continue
        name = pkg + "." + f[:-3]
        try:
            __import__(name)
        except ImportError as e:
            if name not in str(e):
                raise
            missing.append(f[:-3])
    p.__path__ = libdir + "/" + pkg
    return missing


def main(argv):
    if argv[:1] == ["--frozen"]:
        print("@@MPFROZEN " + json.dumps(use_frozen("microtun", argv[1])))
        argv = argv[2:]
    if not argv:
        print("usage: micropython mprun.py [--frozen LIBDIR] TEST_FILE [TEST_NAME ...]")
        return 2
    mod = _load(argv[0])
    wanted = argv[1:]
    names = sorted(n for n in dir(mod) if n.startswith("test_") and callable(getattr(mod, n)))
    if wanted:
        names = [n for n in names if n in wanted]
    failed = 0
    for n in names:
        gc.collect()
        t0 = time.ticks_ms()
        try:
            getattr(mod, n)()
            ok, err = True, ""
        except Exception as e:
            ok, err = False, _format(e)
            failed += 1
        ms = time.ticks_diff(time.ticks_ms(), t0)
        print("@@MPTEST " + json.dumps({"name": n, "ok": ok, "ms": ms, "err": err}))
    print("%d passed, %d failed" % (len(names) - failed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
