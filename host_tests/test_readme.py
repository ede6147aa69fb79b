"""The README's walk-through, run as written (issue 11, item 8): the
topology of step 1, the commands of steps 2 to 5 (only the ports are
changed to free ones). Step 4 gets its 20 messages back from the echo
service step 3 starts; without that service it says so and exits 1."""
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from microtun_host.localnet import free_ports

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
VENV = ROOT / ".venv"


def blocks(lang):
    return re.findall(r"```%s\n(.*?)```" % lang, README, re.S)


def commands():
    """The shell lines of the walk-through, by step: {2: [...], 3: [...], 4: [...]}."""
    steps = {}
    for m in re.finditer(r"^(\d)\. \*\*.*?(?=^\d\. \*\*|\Z)", README, re.S | re.M):
        for b in re.findall(r"```sh\n(.*?)```", m.group(0), re.S):
            steps.setdefault(int(m.group(1)), []).extend(
                ln.strip() for ln in b.splitlines() if ln.strip() and not ln.strip().startswith("#"))
    return steps


def test_readme_walkthrough(tmp_path):
    if not (VENV / "bin" / "microtun").exists():
        pytest.skip("needs the project's .venv (make setup)")
    topo = blocks("toml")[0]
    steps = commands()
    ports = dict(zip(["7300", "7101", "7102", "5000"], (str(p) for p in free_ports(4))))

    def subst(text):
        for old, new in ports.items():
            text = text.replace(old, new)
        return text
    for name in (".venv", "tools", "lib"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "topology.toml").write_text(subst(topo))
    env = dict(os.environ)

    def run(line, **kw):
        argv = shlex.split(subst(line))
        e = dict(env)
        while argv and "=" in argv[0]:          # VAR=value cmd ...
            k, v = argv.pop(0).split("=", 1)
            e[k] = v
        return argv, e

    assert len(steps[2]) == 1 and "provision" in steps[2][0]
    argv, e = run(steps[2][0])
    r = subprocess.run(argv, cwd=str(tmp_path), env=e, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    procs = {}
    try:
        assert [ln.split()[1] for ln in steps[3]] == ["pop", "pop", "gateway", "echo"], steps[3]
        for ln in steps[3]:
            argv, e = run(ln)
            procs[ln] = subprocess.Popen(argv, cwd=str(tmp_path), env=e, stdout=subprocess.PIPE,
                                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
        end = time.monotonic() + 20
        socks = [tmp_path / "net" / "gw.sock", tmp_path / "net" / "pops" / "a1.sock",
                 tmp_path / "net" / "pops" / "a2.sock"]
        while not all(s.exists() for s in socks):
            assert time.monotonic() < end, {k: p.poll() for k, p in procs.items()}
            time.sleep(0.1)
        device = [ln for ln in steps[4] if "device_run.py" in ln][0]
        argv, e = run(device)
        r = subprocess.run(argv, cwd=str(tmp_path), env=e, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout[-2000:]
        assert "device_run: 20 sent, 20 came back, 0 lost" in r.stdout, r.stdout[-2000:]

        st = re.search(r"`(\.venv/bin/microtun status [^`]*)`", README).group(1)
        argv, e = run(st)
        r = subprocess.run(argv, cwd=str(tmp_path), env=e, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and re.search(r"^sensor-1 +yes ", r.stdout, re.M), r.stdout + r.stderr

        echo = procs.pop(steps[3][3])             # no service on channel 1 now
        os.killpg(echo.pid, signal.SIGINT)
        assert "20 datagrams echoed" in echo.communicate(timeout=10)[0]
        argv, e = run(device)
        r = subprocess.run(argv, cwd=str(tmp_path), env=e, capture_output=True, text=True, timeout=120)
        assert r.returncode == 1, r.stdout[-2000:]
        assert "device_run: 20 sent, 0 came back, 20 lost" in r.stdout
        assert "Check that a service listens on the gateway's address for channel 1" in r.stdout
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs.values():
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
