"""The Python requirement is true (issue 11, item 7): pyproject.toml's
requires-python is what the README says, `make setup` refuses an older
Python in one line, nothing in the host code needs a newer one (syntax, and
tomllib only with the tomli fallback of 3.10)."""
import ast
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import check_python  # noqa: E402

NEED = check_python.required(str(ROOT / "pyproject.toml"))


def test_requires_python_is_310_and_the_readme_says_so():
    assert NEED == (3, 10)                    # the pinned unix-port wheel and pytest 9.2 start at 3.10
    readme = (ROOT / "README.md").read_text()
    assert "Python %d.%d+" % NEED in readme
    assert not re.search(r"Python 3\.[0-9]\+", readme.replace("Python %d.%d+" % NEED, ""))
    assert sys.version_info[:2] >= NEED


def test_host_code_is_valid_syntax_for_the_oldest_python():
    files = [f for pat in ("lib/**/*.py", "tools/*.py", "host_tests/*.py", "firmware/*.py", "boards/**/*.py")
             for f in glob.glob(str(ROOT / pat), recursive=True)]
    assert len(files) > 50
    for f in files:
        ast.parse(Path(f).read_text(), f, feature_version=NEED)


TOML_WITHOUT_TOMLLIB = r'''
import sys
sys.modules["tomllib"] = None             # as on 3.10
%s
sys.path.insert(0, %r)
from microtun_host import provision
try:
    provision.provision(%r, %r)
    print("ok")
except provision.ConfigError as e:
    print("error:", e)
'''
def test_provision_reads_toml_with_tomli_where_there_is_no_tomllib(tmp_path):
    # the stub: the parser this interpreter has (tomllib, or tomli on 3.10) loaded afresh as tomli
    try:
        import tomllib as parser
    except ImportError:
        import tomli as parser
    src = os.path.dirname(parser.__file__)
    stub = ("import sys, importlib.util\nsys.modules['tomllib'] = None\n"
            "spec = importlib.util.spec_from_file_location('tomli', %r, submodule_search_locations=[%r])\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['tomli'] = m; spec.loader.exec_module(m)\n"
            % (os.path.join(src, "__init__.py"), src))
    ex = str(ROOT / "examples" / "topology.toml")
    code = TOML_WITHOUT_TOMLLIB % (stub, str(ROOT / "lib"), ex, str(tmp_path / "a"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "ok", r
    code = TOML_WITHOUT_TOMLLIB % ("sys.modules['tomli'] = None", str(ROOT / "lib"), ex, str(tmp_path / "b"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "needs Python 3.11 or newer, or the tomli package on 3.10 (pip install tomli)" in r.stdout, r


def test_pyproject_and_requirements_install_tomli_on_310_only():
    py = (ROOT / "pyproject.toml").read_text()
    assert "\"tomli>=1.1; python_version < '3.11'\"" in py
    assert re.search(r'^tomli==[\d.]+; python_version < "3.11"$', (ROOT / "requirements-dev.txt").read_text(), re.M)


def test_check_python_refuses_an_older_python_in_one_line(tmp_path, capsys):
    assert check_python.main(["x", str(ROOT / "pyproject.toml")]) == 0
    p = tmp_path / "pyproject.toml"
    p.write_text('[project]\nrequires-python = ">=3.99"\n')
    assert check_python.main(["x", str(p)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("microtun needs Python 3.99 or newer") and "make setup PYTHON=" in out[0]


def _interpreter(version):
    for cand in [shutil.which("python" + version)] + glob.glob(os.path.expanduser(
            "~/.pyenv/versions/%s.*/bin/python%s" % (version, version))):
        if cand and subprocess.run([cand, "-c", "pass"], capture_output=True).returncode == 0:
            return cand
    return None


@pytest.mark.parametrize("version, status", [("3.9", 1), ("3.10", 0)])
def test_check_python_with_a_real_interpreter(version, status):
    exe = _interpreter(version)
    if exe is None:
        pytest.skip("no python%s on this machine" % version)
    r = subprocess.run([exe, str(ROOT / "tools" / "check_python.py")], capture_output=True, text=True, timeout=60)
    assert r.returncode == status, r
    assert len(r.stdout.strip().splitlines()) == status
