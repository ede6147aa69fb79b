"""The gateway as a real process (issue 11): a device whose boot counter
was reset is back within one retry; per-device counters and log lines for
stale handshakes and a service that is not listening; one-line errors for a
taken port and an unusable --control address."""
import json
import socket
import subprocess
import time

import pytest

from harness import Net, ROOT, PY, py_env, mp_env, micropython, parse_result, free_ports


@pytest.fixture
def net(tmp_path):
    n = Net(tmp_path, routes={"a": ["a1", "a2"]}, devices={"d1": {}})
    n.start()
    yield n
    n.stop()


def _dev(st, name):
    return [d for d in st["devices"] if d["name"] == name][0]


def test_reset_boot_counter_back_within_one_retry(net):
    res = net.device("d1", "--count", "3")
    assert res["delivered"] == 3
    res = net.device("d1", "--count", "3")        # boot 2: fine
    assert res["delivered"] == 3
    # the board is re-flashed: its stored boot counter starts again
    (net.tmp / "microtun_boot.bin").write_bytes((0).to_bytes(4, "big"))
    t0 = time.monotonic()
    r = subprocess.run([micropython(),
                        str(ROOT / "tools" / "device_run.py"), net.device_config("d1"), "--count", "3",
                        "--connect-ms", "5000"],
                       capture_output=True, text=True, env=mp_env(), cwd=str(ROOT), timeout=60)
    took = time.monotonic() - t0
    res = parse_result(r.stdout, r.stderr)
    assert res.get("delivered") == 3, (res, r.stdout[-2000:])
    # connected at the first attempt's answer, not after a retry timer
    connected = [json.loads(l[2:]) for l in r.stdout.splitlines() if l.startswith("P {\"connected_ms\"")]
    assert connected and connected[0]["connected_ms"] < 5000, (connected, took)
    assert "the gateway has seen boot counter 2" in r.stdout and "continuing from 3" in r.stdout, r.stdout
    # the jump was persisted: the next boot continues above it
    assert int.from_bytes((net.tmp / "microtun_boot.bin").read_bytes(), "big") >= 3
    st = net.gw_status()
    d1 = _dev(st, "d1")
    assert d1["counters"]["stale_handshake"] >= 1 and d1["counters"]["stale_answer_tx"] >= 1
    assert d1["stale"]["counter"] == 1 and d1["stale"]["gateway_counter"] == 2
    time.sleep(0.2)
    assert "device d1: stale handshake (counter 1 \u2264 2)" in net.log("gw")
    out = subprocess.run([PY, "-m", "microtun_host.cli", "status", "--control", net.gw["control"]],
                         capture_output=True, text=True, env=py_env(), cwd=str(ROOT), timeout=30)
    assert out.returncode == 0 and "stale handshake" in out.stdout and "stale_handshake=" in out.stdout, out.stdout


def test_service_not_listening_counted_and_logged(net):
    net.echo.stop()                                # nobody serves channel 1 now
    res = net.device("d1", "--count", "10", "--interval", "50", "--linger", "500")
    assert res["delivered"] == 0
    time.sleep(0.3)
    d1 = _dev(net.gw_status(), "d1")
    assert d1["counters"].get("service_unreachable", 0) >= 1, d1["counters"]
    lines = [l for l in net.log("gw").splitlines() if "is not listening" in l]
    assert 1 <= len(lines) <= 2 and "device d1: channel 1 service 127.0.0.1:%d" % net.echo_port in lines[0], lines


def _run_cli(*args):
    return subprocess.run([PY, "-m", "microtun_host.cli"] + list(args), capture_output=True, text=True,
                          env=py_env(), cwd=str(ROOT), timeout=30)


def test_gateway_port_taken_is_one_line(tmp_path):
    n = Net(tmp_path, routes={"a": ["a1"]})
    host, port = n.gw["listen"].rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, int(port)))
    try:
        r = _run_cli("gateway", "--config", str(n.out / "gateway.json"))
    finally:
        s.close()
    assert r.returncode == 1
    assert "Traceback" not in r.stderr + r.stdout
    err = [l for l in r.stderr.splitlines() if l.strip() and " gateway INFO " not in l]   # info log lines aside
    assert len(err) == 1 and "cannot listen on %s" % n.gw["listen"] in err[0], r.stderr


@pytest.mark.parametrize("addr", ["localhost:7390", "127.0.0.1:%d" % free_ports(1)[0], "127.0.0.1:99999", "nonsense"])
def test_status_bad_control_is_one_line(addr):
    r = _run_cli("status", "--control", addr)
    assert r.returncode in (1, 2)
    assert "Traceback" not in r.stderr + r.stdout
    err = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("microtun status:"), r.stderr
