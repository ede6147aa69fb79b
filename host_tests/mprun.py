"""Portable test runner for the MicroPython unix port.

    micropython host_tests/mprun.py host_tests/test_x.py [test_name ...]

Imports the module, runs each test_* function (sorted by name; MicroPython
dicts keep no insertion order) and prints one line per test:

    @@MPTEST {"name": "test_x", "ok": true, "ms": 3, "err": ""}

host_tests/conftest.py reads these lines and reports each one as its own
pytest item, `test_x[micropython]`. The runner also works by hand.
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


def main(argv):
    if not argv:
        print("usage: micropython mprun.py TEST_FILE [TEST_NAME ...]")
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


sys.exit(main(sys.argv[1:]))
