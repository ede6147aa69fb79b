"""The usual mistakes with the `microtun` command line (issue 11, item 9):
one line on stderr naming what is wrong, a non-zero status, never a
traceback."""
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from microtun_host import provision

ROOT = Path(__file__).resolve().parent.parent
TOPOLOGY = """
[gateway]
name = "gw"
listen = "127.0.0.1:%(gw)d"
services = { "1" = "127.0.0.1:%(svc)d" }
[[pop]]
name = "a1"
listen = "127.0.0.1:%(a1)d"
[[route]]
name = "a"
pops = ["a1"]
[[device]]
name = "d1"
channels = [1]
"""


def microtun(*argv, timeout=30):
    return subprocess.run([sys.executable, "-m", "microtun_host.cli"] + [str(a) for a in argv],
                          capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
                          env=dict(os.environ, PYTHONPATH=str(ROOT / "lib")))


def one_line(r, status, *words):
    """The one error line (a process's info log lines before it are fine)."""
    err = [ln for ln in r.stderr.strip().splitlines() if not re.match(r"\d{4}-\d\d-\d\d [\d:]{8} \S+ INFO ", ln)]
    assert r.returncode == status, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and len(err) == 1, r.stderr
    for w in words:
        assert w in err[0], err[0]
    return err[0]


@pytest.fixture
def net(tmp_path):
    from microtun_host.localnet import free_ports
    gw, svc, a1 = free_ports(3)
    topo = tmp_path / "topology.toml"
    topo.write_text(TOPOLOGY % {"gw": gw, "svc": svc, "a1": a1})
    provision.provision(topo, tmp_path / "net")
    return tmp_path / "net", {"gw": gw, "a1": a1}


def edit(path, **fields):
    d = json.loads(path.read_text())
    d.update(fields)
    out = path.with_name("edited-" + path.name)
    out.write_text(json.dumps(d))
    return out


@pytest.mark.parametrize("role, config", [("pop", "pops/a1.json"), ("gateway", "gateway.json")])
def test_port_taken(net, role, config):
    d, ports = net
    port = ports["a1" if role == "pop" else "gw"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port))
        r = microtun(role, "--config", d / config)
    line = one_line(r, 1, "Address already in use")
    if role == "pop":
        assert "127.0.0.1:%d" % port in line


@pytest.mark.parametrize("role, config", [("pop", "pops/a1.json"), ("gateway", "gateway.json")])
def test_control_socket_in_a_shared_directory(net, role, config):
    d, _ = net
    cfg = edit(d / config, control="/tmp/microtun-test-%d.sock" % os.getpid())
    one_line(microtun(role, "--config", cfg), 1, "/tmp is writable by other users",
             "a directory only you can write to")


def test_second_process_on_the_same_control_socket(net):
    d, ports = net
    first = subprocess.Popen([sys.executable, "-m", "microtun_host.cli", "pop", "--config", str(d / "pops/a1.json")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(ROOT),
                             env=dict(os.environ, PYTHONPATH=str(ROOT / "lib")))
    try:
        end = time.monotonic() + 15
        while not (d / "pops" / "a1.sock").exists():
            assert time.monotonic() < end and first.poll() is None
            time.sleep(0.05)
        other = edit(d / "pops/a1.json", listen="127.0.0.1:0", control="a1.sock")
        one_line(microtun("pop", "--config", other), 1, "another process is serving it")
        assert microtun("status", "--control", d / "pops" / "a1.sock").returncode == 1   # a PoP has no "status"
    finally:
        first.terminate()
        first.wait(10)
    assert not (d / "pops" / "a1.sock").exists(), "the socket outlived its process"


@pytest.mark.parametrize("argv, status, words", [
    (["pop", "--config", "{d}/missing.json"], 2, ["missing.json: cannot read"]),
    (["gateway", "--config", "{d}/pops/a1.json"], 2, ["a1.json"]),
    (["status", "--config", "{d}/gateway.json"], 1, ["no such socket; is the process running?"]),
    (["status", "--control", "localhost:7390"], 1, ["expected a socket path"]),
    (["provision", "{d}/missing.toml", "--out", "{d}/x"], 2, ["missing.toml"]),
])
def test_usual_mistakes(net, argv, status, words):
    d, _ = net
    one_line(microtun(*[a.replace("{d}", str(d)) for a in argv]), status, *words)
