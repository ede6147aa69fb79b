"""`make demo-fleet`: a fleet on etcd, on this machine, over loopback.

Starts a real etcd (random loopback ports, temporary data dir), provisions
two routes (a: a1 -> a2, b: b1 -> b2) and two devices with `provision
--fleet`, runs the four PoPs and the gateway from etcd, and then:

  1. sensor-1 sends 300 messages; etcd is killed 2 s in and restarted 3 s
     later: forwarding goes on, every node says etcd was lost and resyncs;
  2. sensor-2 is revoked with `microtun fleet revoke`: every node applies
     the record (no SIGHUP) and sensor-2 gets no session any more;
  3. `microtun fleet status` and `microtun log` show the nodes and the history.

Exits 0 only if sensor-1 lost nothing and the revocation reached every node.
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))
from microtun_host import etcd, scratch  # noqa: E402
from microtun_host.localnet import PY, ROOT, parse_result, py_env  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    args = ap.parse_args()
    if etcd.etcd_binary() is None:
        print("microtun demo-fleet: %s" % etcd.INSTALL_HINT, file=sys.stderr)
        return 2
    from microtun_host.fleetnet import FleetNet
    tmp = scratch.mkdtemp("microtun-demo-fleet-")
    net = None
    ok = False
    try:
        print("microtun demo-fleet: etcd, provisioning into it (%s)" % tmp, flush=True)
        net = FleetNet(tmp, routes={"a": ["a1", "a2"], "b": ["b1", "b2"]},
                       devices={"sensor-1": {}, "sensor-2": {}}, policy="critical")
        print("  etcd %s; PoPs a1 a2 b1 b2 and the gateway take their config from it" % net.etcd.endpoint)
        net.start()
        dev = net.device("sensor-1", "--count", "300", "--interval", "20", background=True)
        time.sleep(2)
        net.etcd.kill()
        print("  t=2s  etcd killed")
        time.sleep(3)
        lost = net.pop_stats("a1")["fleet"]
        print("  t=5s  PoP a1 says: etcd %s for %ss; restarting etcd" % (lost["etcd"], lost["lost_for_s"]))
        net.etcd.start()
        res = parse_result(dev.communicate(timeout=120)[0])
        print("  sensor-1: %d sent, %d delivered, %d lost" % (res["sent"], res["delivered"], res["lost"]))
        r = net.fleet("revoke", "sensor-2")
        print("  fleet revoke sensor-2: %s" % (r.stdout.strip() or r.stderr.strip()))
        end = time.monotonic() + 5
        while time.monotonic() < end and any(d["name"] == "sensor-2" for d in net.gw_status()["devices"]):
            time.sleep(0.05)
        gone = not any(d["name"] == "sensor-2" for d in net.gw_status()["devices"])
        res2 = net.device("sensor-2", "--count", "3", "--connect-ms", "1500", "--linger", "200")
        print("  sensor-2 after the revocation: %s" % res2.get("error", "delivered %s" % res2.get("delivered")))
        time.sleep(1.5)     # the nodes' alive keys catch up
        st = net.fleet("status")
        print("\n$ microtun fleet status\n" + st.stdout.rstrip())
        lg = subprocess.run([PY, "-m", "microtun_host.cli", "log", "--fleet", str(net.fleet_path)],
                            capture_output=True, text=True, env=py_env(), cwd=str(ROOT), timeout=30)
        print("\n$ microtun log\n" + lg.stdout.rstrip())
        ok = res["lost"] == 0 and gone and "no session" in res2.get("error", "") and "(behind)" not in st.stdout
        print("\ndemo-fleet: %s" % ("ok" if ok else "FAILED"))
    except Exception as e:      # noqa: BLE001 - one line, the logs are in tmp with --keep
        print("microtun demo-fleet: %s" % (str(e).strip().splitlines() or [type(e).__name__])[0], file=sys.stderr)
    finally:
        scratch.finish(net, tmp, args.keep)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
