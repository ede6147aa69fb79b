"""The gateway on every core (microtun_host.workers, GatewaySupervisor):
`microtun gateway` with "workers": 2 and two unix-port devices over a PoP,
real processes on 127.0.0.1. Each device's links are steered to one worker
(link_groups); `microtun status` adds the workers up; a worker killed with
SIGKILL is restarted."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from microtun_host import workers
from microtun_host.localnet import Net, parse_result

ROOT = Path(__file__).resolve().parent.parent


def test_two_gateway_workers_each_holds_its_devices(tmp_path):
    net = Net(tmp_path, routes={"a": ["a1"]}, devices={"d1": {}, "d2": {}})
    path = net.out / "gateway.json"
    cfg = json.loads(path.read_text())
    cfg["workers"] = 2
    path.write_text(json.dumps(cfg))
    want = {}                   # device -> worker, from the steering the supervisor uses
    for labels in workers.link_groups([type("L", (), {"name": l["name"], "in_label": l["in_label"]})
                                       for l in cfg["links"]]):
        name = [l["name"] for l in cfg["links"] if l["in_label"] == labels[0]][0].split("/")[0]
        want[name] = workers.worker_of(labels[0], 2, workers.steering_groups([labels], 2))
    assert sorted(want.values()) == [0, 1], want        # consecutive labels: one device per worker
    try:
        net.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            st = net.gw_status()
            if all("error" not in w for w in st["workers"]):
                break
            time.sleep(0.1)
        runs = [net.device(d, "--count", "20", "--interval", "20", "--linger", "1000", background=True)
                for d in ("d1", "d2")]
        results = [parse_result(p.communicate(timeout=90)[0]) for p in runs]
        for r in results:
            assert r["sent"] == 20 and not r["lost_ids"], r
        st = net.gw_status()
        assert st["worker_count"] == 2
        assert {d["name"]: d["established"] for d in st["devices"]} == {"d1": True, "d2": True}, st
        assert [w["established"] for w in st["workers"]] == [1, 1], st
        assert st["counters"]["handshake_ok"] == 2 and st["counters"]["data_rx"] >= 40, st["counters"]
        out = subprocess.run([sys.executable, "-m", "microtun_host.cli", "status", "--config", str(path)],
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT / "lib")),
                             timeout=20)
        assert out.returncode == 0 and "d1" in out.stdout and "d2" in out.stdout, out.stdout + out.stderr
        assert "worker 1: pid" in out.stdout, out.stdout
        from microtun_host import control
        r = control.query(net.gw["control"], {"cmd": "reload"}, timeout=5)     # every worker reloads
        assert r["ok"] and r["workers"] == 2, r

        pid = st["workers"][want["d2"]]["pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            st = net.gw_status()
            w = st["workers"][want["d2"]]
            if w["restarts"] == 1 and w["alive"] and "error" not in w:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(st)
        assert "worker %d (pid %d) killed by SIGKILL" % (want["d2"], pid) in net.log("gw")
        # the other worker kept its session
        assert {d["name"]: d["established"] for d in st["devices"]}["d1"] is True, st
    finally:
        net.stop()
    assert "Traceback" not in net.log("gw"), net.log("gw")
