"""Issue 15, gateway failover with real processes (tools/path_scenarios.py,
scenario_gateway_failover): a standby gateway with the primary's identity,
the primary SIGKILLed mid-stream. Bounds that hold on a loaded 2-core
machine; tools/bench_failover.py prints the figure (target: resume <= 3 s).
Also what `microtun provision` writes for a standby."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import path_scenarios as sc  # noqa: E402


def test_primary_gateway_killed_devices_move_to_the_standby(tmp_path):
    # killed 1.5 s after the device connects (its paths are up within ~0.1 s, the last PoPs
    # probe both gateways every second); 5 s of messages after the kill
    r = sc.scenario_gateway_failover(tmp_path, count=325, at=1.5, linger=2000)
    assert r["resume_s"] is not None and r["resume_s"] <= 5.0, r
    assert r["duplicates_delivered"] == 0, r
    assert r["critical_lost"] <= r["in_flight"], r      # only what the kill caught in flight
    assert r["handshakes"] == 2, r                      # the first, and one with the standby
    for pop_name, use in r["standby_in_use"].items():
        assert use and len(use) == 1, r                 # both last PoPs switched


def test_provision_writes_the_standby(tmp_path):
    topo = tmp_path / "t.toml"
    topo.write_text('[gateway]\nlisten = "127.0.0.1:7300"\nstandby = "127.0.0.1:7301"\nkeepalive_s = 1\n'
                    '[[pop]]\nname = "a1"\nlisten = "127.0.0.1:7100"\n'
                    '[[pop]]\nname = "a2"\nlisten = "127.0.0.1:7200"\n'
                    '[[route]]\nname = "a"\npops = ["a1", "a2"]\n'
                    '[[device]]\nname = "d1"\nunresponsive_s = 2\n')
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "microtun_host.cli", "provision", str(topo), "--out", str(out)],
                       capture_output=True, text=True, cwd=str(ROOT), env={"PYTHONPATH": str(ROOT / "lib")})
    assert r.returncode == 0, r.stderr
    gw, sb = (json.loads((out / f).read_text()) for f in ("gateway.json", "gateway-standby.json"))
    assert sb["listen"] == "127.0.0.1:7301" and sb["control"] == "gateway-standby.sock"
    assert {k: v for k, v in sb.items() if k not in ("listen", "control")} == \
        {k: v for k, v in gw.items() if k not in ("listen", "control")}      # one identity: key, links, registry
    assert gw["keepalive_s"] == 1
    a1, a2 = (json.loads((out / "pops" / f).read_text()) for f in ("a1.json", "a2.json"))
    assert [x.get("standby") for x in a2["routes"] if x["next"] == "127.0.0.1:7300"] == ["127.0.0.1:7301"]
    assert not any("standby" in x for x in a1["routes"])                  # only the hop to the gateway
    assert json.loads((out / "devices" / "d1.json").read_text())["unresponsive_s"] == 2
    topo.write_text(topo.read_text().replace('standby = "127.0.0.1:7301"', 'standby = "127.0.0.1:7300"'))
    r = subprocess.run([sys.executable, "-m", "microtun_host.cli", "provision", str(topo), "--out", str(out)],
                       capture_output=True, text=True, cwd=str(ROOT), env={"PYTHONPATH": str(ROOT / "lib")})
    assert r.returncode == 2 and "standby" in r.stderr, r.stderr
