"""No key material is left in temporary directories (issue 11, item 7):
the demo removes its provisioned network on failure, Ctrl-C and SIGTERM,
and stops every process it started; microtun_host.scratch does the same for
the benchmarks."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# the demo with net.start() failing as a PoP that exits at start would make it fail
FAILING_START = r'''
import runpy, sys
sys.path.insert(0, %r)
from microtun_host import localnet
def start(self):
    self.start_pop(sorted(self.pops)[0])
    raise RuntimeError("a2 exited at start: cannot listen on 127.0.0.1:9: address in use")
localnet.Net.start = start
sys.argv = ["demo.py"]
sys.exit(runpy.run_path(%r, run_name="__main__"))
''' % (str(ROOT / "lib"), str(ROOT / "tools" / "demo.py"))


def _env(tmp):
    tmp.mkdir()
    return dict(os.environ, TMPDIR=str(tmp), PYTHONPATH=str(ROOT / "lib"))


def _procs_mentioning(text):
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path("/proc/%s/cmdline" % pid).read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            found.append(cmd)
    return found


def _wait_for_keys(proc, tmp, timeout=60):
    """The demo's directory once provisioning has written keys into it."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for d in tmp.glob("microtun-demo-*"):
            if (d / "out" / "state.json").exists() and (d / "gw.log").exists():
                return d
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    raise AssertionError("the demo provisioned nothing within %d s" % timeout)


def test_failed_demo_leaves_no_keys_and_no_processes(tmp_path):
    tmp = tmp_path / "tmp"
    r = subprocess.run([sys.executable, "-c", FAILING_START], env=_env(tmp), capture_output=True, text=True,
                       timeout=120, cwd=str(ROOT))
    assert r.returncode == 1, r
    assert "microtun demo: a2 exited at start" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert list(tmp.iterdir()) == [], "left behind: %s" % list(tmp.iterdir())
    assert _procs_mentioning(str(tmp)) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_demo_leaves_no_keys_and_no_processes(tmp_path, sig):
    tmp = tmp_path / "tmp"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "demo.py")], env=_env(tmp),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(ROOT))
    try:
        d = _wait_for_keys(proc, tmp)
        assert any("private_key" in p.read_text() for p in (d / "out").rglob("*.json"))
        proc.send_signal(sig)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, out
    assert not d.exists() and list(tmp.iterdir()) == [], (out, list(tmp.iterdir()))
    assert _procs_mentioning(str(tmp)) == [], out


def test_scratch_dirs_go_on_sigterm(tmp_path):
    tmp = tmp_path / "tmp"
    code = ("import sys, time\nfrom microtun_host import scratch\nd = scratch.mkdtemp('x-')\n"
            "open(d + '/key', 'w').write('secret')\nprint(d, flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=_env(tmp), stdout=subprocess.PIPE, text=True)
    d = Path(proc.stdout.readline().strip())
    assert (d / "key").exists() and (d.stat().st_mode & 0o077) == 0
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    assert proc.returncode == 128 + signal.SIGTERM
    assert list(tmp.iterdir()) == []
