"""Host-only: microtun_host.pathtable prints microtun.paths' tables as
docs/PATHS.md shows them."""
import re
import subprocess
import sys

from conftest import ROOT
from microtun import paths
from microtun_host.pathtable import print_table


def test_every_transition_and_state_is_printed():
    text = print_table()
    rows = re.findall(r"^(\w+) +(\w+) +-> (\w+)$", text, re.M)[1:]   # after the heading
    assert sorted(((s, e), t) for s, e, t in rows) == sorted(paths.TRANSITIONS.items())
    for s in ("new", "up", "suspect", "down"):
        assert "%s %d active / %d idle" % (s, paths.PROBE_ACTIVE_MS[s], paths.PROBE_IDLE_MS[s]) in text


def test_docs_show_the_table_the_code_has():
    doc = (ROOT / "docs" / "PATHS.md").read_text()
    assert "python -m microtun_host.pathtable" in doc
    for line in print_table().splitlines()[:len(paths.TRANSITIONS) + 1]:
        assert line in doc


def test_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "microtun_host.pathtable"], capture_output=True, text=True,
                         cwd=ROOT / "lib", timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == print_table()
