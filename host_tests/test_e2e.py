"""End to end over loopback with real processes (issue 4): a unix-port device,
two PoPs, the gateway and a local UDP echo service.

The tests that leave the network as they found it share one (`net`, per
module) and check what changed during the test (counters before and
after); a test that changes the network (a revoked device, a killed
gateway) or needs another one builds its own."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import Net, Recorder, ROOT, PY, py_env
from microtun import outer

sys.path.insert(0, str(ROOT / "tools"))
from path_scenarios import Run  # noqa: E402


def _new_net(tmp):
    n = Net(tmp, routes={"a": ["a1", "a2"]}, devices={"d1": {}, "d2": {}})
    try:
        n.start()
    except BaseException:
        n.stop()
        raise
    return n


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    """One network for the tests that leave it as it was (d2 never connects to it)."""
    n = _new_net(tmp_path_factory.mktemp("e2e"))
    yield n
    n.stop()


@pytest.fixture
def own_net(tmp_path):
    """A network of its own, for a test that changes it."""
    n = _new_net(tmp_path)
    yield n
    n.stop()


def _d1_rx(net):
    return sum(d["rx_packets"] for d in net.gw_status()["devices"] if d["name"] == "d1")


def test_device_to_service_and_back(net):
    echoed, rx = net.echo.count, _d1_rx(net)
    res = net.device("d1", "--count", "60", "--interval", "10")
    assert res["sent"] == 60
    assert res["delivered"] == 60, res
    assert res["duplicate_replies"] == 0
    st = net.gw_status()
    d1 = [d for d in st["devices"] if d["name"] == "d1"][0]
    assert d1["established"] and d1["rx_packets"] - rx >= 60
    assert [p["link"] for p in d1["paths"]] == ["d1/a"]
    assert net.echo.count - echoed == 60


def test_pop_drops_and_counts_forged_datagrams(net):
    res = net.device("d1", "--count", "5")
    assert res["delivered"] == 5
    before = net.pop_stats("a1")["drops"]
    host, port = net.pops["a1"]["listen"].rsplit(":", 1)
    cfg = json.loads((net.out / "pops" / "a1.json").read_text())
    label = cfg["routes"][0]["in_label"]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wrong_key = outer.HopKey(bytes(32))
    s.sendto(outer.seal(outer.TYPE_DATA, label, wrong_key, b"x" * 40), (host, int(port)))          # bad MAC
    s.sendto(outer.seal(outer.TYPE_DATA, 0xFFFFF0, wrong_key, b"x" * 40), (host, int(port)))       # unknown label
    s.sendto(b"\x11\x00", (host, int(port)))                                                      # short
    s.close()
    time.sleep(0.3)
    after = net.pop_stats("a1")["drops"]
    drops = {k: v - before.get(k, 0) for k, v in after.items()}
    assert drops.get("bad_mac") == 1 and drops.get("unknown_label") == 1 and drops.get("short") == 1, (before, after)
    res = net.device("d1", "--count", "5")
    assert res["delivered"] == 5


def test_pop_never_sees_plaintext(tmp_path):
    n = Net(tmp_path, routes={"a": ["a1", "a2"]})
    # put a recording relay in front of a2: it sees everything a1 <-> a2 carries
    rec = Recorder(n.pops["a2"]["listen"])
    cfg_path = n.out / "pops" / "a1.json"
    cfg = json.loads(cfg_path.read_text())
    for r in cfg["routes"]:
        if r["next"] == n.pops["a2"]["listen"]:
            r["next"] = rec.addr
    cfg_path.write_text(json.dumps(cfg))
    try:
        n.start()
        res = n.device("d1", "--count", "20", "--size", "64")   # payloads "<id>:xxxx...x"
        assert res["delivered"] == 20
        assert len(rec.seen) >= 20          # a1 -> a2 carried every message (replies go a2 -> a1 directly)
        payloads = [d for d in n.echo.seen]
        assert payloads and all(b":" in p for p in payloads)        # the service got plaintext
        for d in rec.seen:
            for p in payloads[:5]:
                assert p not in d, "plaintext crossed the PoP link"
            assert b"xxxxxxxx" not in d
    finally:
        n.stop()
        rec.stop()


def test_revoke_device_after_reload(own_net):
    net = own_net
    assert net.device("d2", "--count", "5")["delivered"] == 5
    # re-provision without d2, reload the gateway and the PoPs
    net.devices = {"d1": {}}
    net.write_topology()
    net.provision()
    for name in ("gw", "a1", "a2"):
        net.reload(name)
    end = time.monotonic() + 10             # the gateway has reloaded when d2 is gone from its status
    while [d["name"] for d in net.gw_status()["devices"]] != ["d1"] and time.monotonic() < end:
        time.sleep(0.05)
    assert net.device("d1", "--count", "10")["delivered"] == 10
    cfg_d2 = json.loads(open(net.device_config("d2")).read()) if os.path.exists(net.device_config("d2")) else None
    assert cfg_d2 is None                      # the provisioner removed its config
    # the old d2 config, kept aside, no longer gets through
    st = net.gw_status()
    assert [d["name"] for d in st["devices"]] == ["d1"]


def test_channel_access_control(net):
    denied = net.gw_status()["counters"].get("channel_denied", 0)
    echoed = net.echo.count
    # the device's config lists its channels (1, 2): it refuses 9 itself
    res = net.device("d1", "--count", "5", "--channel", "9", "--linger", "500")
    assert res["delivered"] == 0 and res["health"]["driver"].get("channel_denied") == 5
    assert net.gw_status()["counters"].get("channel_denied", 0) == denied
    # a device config without the list (an older one): the gateway drops and counts
    cfg = Path(net.device_config("d1"))
    text = cfg.read_text()
    d = json.loads(text)
    del d["channels"]
    cfg.write_text(json.dumps(d))
    try:
        res = net.device("d1", "--count", "5", "--channel", "9", "--linger", "500")
    finally:
        cfg.write_text(text)        # the shared network's d1 as it was
    assert res["delivered"] == 0
    assert net.gw_status()["counters"].get("channel_denied", 0) - denied == 5
    assert net.echo.count == echoed


def test_pop_reload_mid_stream_loses_nothing(net):
    run = Run(net, "d1", "--count", "200", "--interval", "10")
    try:
        run.wait_connected()
        run.at(0.5)                 # three reloads of both PoPs from 0.5 s to 1.4 s of a 2 s stream
        for _ in range(3):
            net.reload("a1")
            net.reload("a2")
            time.sleep(0.3)
        res = run.result(timeout=60)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
    assert res["sent"] == 200 and res["delivered"] == 200, res
    assert "reload" in net.log("a1").lower()


def test_gateway_restart_device_reconnects(own_net):
    net = own_net
    # 20 ms apart: message i leaves i * 20 ms after the device reports its session
    run = Run(net, "d1", "--count", "400", "--interval", "20", "--linger", "2000")
    try:
        run.wait_connected()
        run.at(1.0)                 # paths up and probed for 1 s (id 50)
        net.kill("gw", signal.SIGKILL)
        run.at(2.0)                 # id 100
        net.start_gateway()
        res = run.result(timeout=90)
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
    assert res["handshakes"] >= 2, res
    # everything sent well after the restart (from 4 s after it, id 300) was delivered
    late = [i for i in res["lost_ids"] if i > 300]
    assert late == [], res["lost_ids"]
    assert res["health"]["driver"].get("rehandshake_all_paths_down", 0) >= 1


def test_fuzz_gateway_and_pop_keep_working(net):
    import random
    rng = random.Random(5)
    assert net.device("d1", "--count", "5")["delivered"] == 5
    targets = [net.pops["a1"]["listen"], net.gw["listen"]]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent = 0
    for i in range(20000):
        host, port = targets[i % 2].rsplit(":", 1)
        kind = rng.randrange(3)
        if kind == 0:
            d = rng.randbytes(rng.randrange(0, 300))
        elif kind == 1:
            d = bytes([0x11]) + rng.randbytes(rng.randrange(0, 200))
        else:
            d = bytes([0x11, 0, 0, rng.randrange(1, 4)]) + rng.randbytes(rng.randrange(8, 200))
        s.sendto(d, (host, int(port)))
        sent += 1
        if i % 200 == 0:
            time.sleep(0.005)
    s.close()
    time.sleep(0.5)
    assert net.procs["gw"].poll() is None and net.procs["a1"].poll() is None
    assert net.device("d1", "--count", "20")["delivered"] == 20
    counters = net.gw_status()["counters"]
    assert counters.get("internal_error", 0) == 0
    assert sum(v for k, v in counters.items() if k.startswith("outer_")) > 1000


def test_status_command_shows_devices(net):
    # nothing answers there: the command waits its 2 s out, meanwhile the rest of the test runs
    dead = subprocess.Popen([PY, "-m", "microtun_host.cli", "status", "--control", "127.0.0.1:1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=py_env(), cwd=str(ROOT))
    try:
        _status_shows_d1(net)
        _, err = dead.communicate(timeout=30)
    finally:
        if dead.poll() is None:
            dead.kill()
            dead.wait()
    assert dead.returncode == 1 and "is the gateway running?" in err


def _status_shows_d1(net):
    # 1 s of traffic: several path probes, so the device has reported its RTT
    assert net.device("d1", "--count", "40", "--interval", "25")["delivered"] == 40
    r = subprocess.run([PY, "-m", "microtun_host.cli", "status", "--config", str(net.out / "gateway.json")],
                       capture_output=True, text=True, env=py_env(), cwd=str(ROOT), timeout=30)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("gateway gw")
    row = [l for l in lines if l.startswith("d1 ")][0]
    assert " yes " in row and "d1/a" in row and "ms" in row       # established, path, srtt
    assert [l for l in lines if l.startswith("d2 ")][0].split()[1] == "no"
    assert lines[-1].startswith("counters:")


def test_embedded_gateway_api(tmp_path):
    """The gateway inside an application: on_data for a channel without a
    service, send() back to the device."""
    import asyncio
    import threading
    from microtun_host.gateway import GatewayServer, load_gateway_config
    n = Net(tmp_path, routes={"a": ["a1"]}, devices={"d1": {}})
    cfg_path = n.out / "gateway.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["services"] = {}                       # channel 1 goes to the app, not a UDP service
    cfg_path.write_text(json.dumps(cfg))
    got = []
    loop = asyncio.new_event_loop()
    server = GatewayServer(load_gateway_config(str(cfg_path)))

    def on_data(device, channel, data):
        got.append((device, channel, data))
        server.send(device, channel, data)                 # the app answers (echo)

    server.on_data = on_data
    ready = threading.Event()

    def run():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(server.start())
        ready.set()
        loop.run_forever()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        assert ready.wait(10)
        n.echo = None
        n.start_pop("a1")
        res = n.device("d1", "--count", "10", "--interval", "20")
        assert len(got) == 10 and all(d == "d1" and ch == 1 for d, ch, _ in got)
        assert res["delivered"] == 10                           # the acks came back
        st = server.status()
        assert st["devices"][0]["name"] == "d1" and st["devices"][0]["established"]
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
        n.stop()
