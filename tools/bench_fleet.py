"""Issue 12's figures (docs/FIGURES.md, "Fleet"): a real etcd and real
processes on loopback. Prints ONE JSON object.

    python tools/bench_fleet.py [--quick] [--pops 20] [--revocations 100] [--outage-s 30] [--registry 100000]

1. revocation: a fleet of --pops PoPs and 2 gateways; each of --revocations
   devices sends traffic through it, is revoked by one record, and we time
   (a) until every PoP and gateway reports (alive key in etcd) that it
   applied the record and (b) until the device's traffic stops arriving
   at the gateway's service. Target: p99 of both <= 1 s.
2. re-splice: a route re-spliced by `provision --fleet` under live
   traffic. Target: 0 messages lost.
3. etcd outage: etcd killed for --outage-s under live traffic, then
   restarted; a revocation published after it returns reaches every node.
   Target: 0 lost.
4. forged records: 1000 tampered records put straight into etcd's log,
   then one genuine: every node refuses all 1000 and applies the genuine one.
5. registry: --registry devices in the log; a fleet gateway process starts
   and is serving (its alive key reports the head) within 10 s, its RSS is
   <= 100 MB, a single change applies within 50 ms (median and max of 20).
6. gateway failover: two gateways of one identity ([[gateway.pool]]), 6
   devices on two one-PoP routes, each sending every 20 ms; the gateway
   serving most of them gets SIGKILL. Per device of the dead gateway: the
   time from the kill to its next message at the service (resume_s); for
   the others, their longest silence around the kill. Once per
   --failover-leases value (the nodes' lease_s; devices: unresponsive_s =
   lease_s + 1).

--quick: 6 PoPs, 10 revocations, 5 s outage, 20,000 devices (a smoke run).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "lib"))

from microtun_host import changelog, control, fleet, localnet   # noqa: E402
from microtun_host.etcd import Client, EtcdError, LocalEtcd     # noqa: E402
from microtun_host.fleetnet import FleetNet                     # noqa: E402
from microtun_host.localnet import PY, ROOT, parse_result, py_env   # noqa: E402


class AliveWatch:
    """Watches alive/ and notes when each node first reported each seq."""

    def __init__(self, endpoint, prefix):
        self.c = Client(endpoint)
        self.prefix = prefix + "alive/"
        self.seen = {}              # node -> [(seq, monotonic)]
        self.lock = threading.Lock()
        kvs, rev, _ = self.c.range(self.prefix, prefix=True)
        for kv in kvs:
            self._note(kv, time.monotonic())
        self.w = self.c.watch(self.prefix, prefix=True, start_revision=rev + 1)
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _note(self, kv, t):
        try:
            seq = json.loads(kv.value)["seq"]
        except (ValueError, KeyError, TypeError):
            return
        with self.lock:
            self.seen.setdefault(kv.key[len(self.prefix):], []).append((seq, t))

    def _run(self):
        try:
            for events in self.w:
                t = time.monotonic()
                for kind, kv in events:
                    if kind == "PUT":
                        self._note(kv, t)
        except EtcdError:
            pass

    def reached(self, nodes, seq, timeout=10.0):
        """{node: first monotonic time it reported >= seq} once all have, or what is there at timeout."""
        end = time.monotonic() + timeout
        while True:
            with self.lock:
                got = {}
                for n in nodes:
                    for s, t in self.seen.get(n, ()):
                        if s >= seq:
                            got[n] = t
                            break
            if len(got) == len(nodes) or time.monotonic() > end:
                return got
            time.sleep(0.01)

    def stop(self):
        self.w.close()


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else None


def revoke(net, store, key, name, marker=None):
    chain, state, head_rev, _ = store.verified()
    changes = fleet.revoke_changes(state, name) if name else [{"op": "put", "key": "bench/marker", "value": marker}]
    t0 = time.monotonic()
    seq = store.append(key, "bench: %s" % (("device %s revoked" % name) if name else "marker"), changes, chain,
                       head_rev)[-1]
    return seq, t0


def fleet_figures(args, tmp, out):
    npops = args.pops
    routes = {"r%02d" % i: ["p%02d" % (2 * i), "p%02d" % (2 * i + 1)] for i in range(npops // 2)}
    devs = {"d%03d" % i: {"routes": ["r%02d" % (i % len(routes))]} for i in range(args.revocations + 1)}
    devs["t"] = {"routes": ["r00"]}
    tmp.mkdir()
    t = time.monotonic()
    net = FleetNet(tmp, routes=routes, devices=devs, spare_pops=(), pool=["gw2"])    # 2 gateways, one identity
    out["provision_s"] = round(time.monotonic() - t, 2)
    try:
        net.start()
        nodes = ["pops/%s" % p for p in sorted(net.pops)] + ["gateways/gw", "gateways/gw2"]
        out["fleet"] = {"pops": len(net.pops), "gateways": 2, "devices": len(devs)}
        s = fleet.load_settings(str(net.fleet_path))
        store = fleet.Store(s)
        alive = AliveWatch(net.etcd.endpoint, s.prefix)
        chain, _, _, _ = store.verified()
        got = alive.reached(nodes, chain.seq, 30)
        if len(got) != len(nodes):
            raise RuntimeError("not every node came up: %s" % sorted(set(nodes) - set(got)))

        # 2. re-splice under live traffic
        dev = net.device("t", "--count", "400", "--interval", "10", background=True)
        time.sleep(1.5)
        net.routes["r00"] = ["p00", "p02"]
        net.write_topology()
        t = time.monotonic()
        net.provision()
        out["resplice_publish_s"] = round(time.monotonic() - t, 2)
        res = parse_result(dev.communicate(timeout=120)[0])
        out["resplice_sent"], out["resplice_lost"] = res.get("sent"), res.get("lost")
        out["resplice_met"] = res.get("lost") == 0 and res.get("sent") == 400

        # 3. etcd killed for outage_s under live traffic
        n = int((args.outage_s + 8) * 1000 / 20)
        dev = net.device("t", "--count", str(n), "--interval", "20", background=True)
        time.sleep(3)
        net.etcd.kill()
        time.sleep(args.outage_s)
        try:
            st = net.pop_stats("p00")["fleet"]
            out["outage_node_status"] = {"etcd": st["etcd"], "lost_for_s": st["lost_for_s"]}
        except Exception as e:      # noqa: BLE001 - a figure, not a test
            out["outage_node_status"] = str(e)
        net.etcd.start()
        alive.stop()
        alive = AliveWatch(net.etcd.endpoint, s.prefix)
        seq, t0 = revoke(net, store, key=net.key, name="d%03d" % args.revocations)
        got = alive.reached(nodes, seq, 30)
        out["outage_change_after_return_s"] = round(max(got.values()) - t0, 3) if len(got) == len(nodes) else None
        res = parse_result(dev.communicate(timeout=args.outage_s + 120)[0])
        out["outage_s"], out["outage_sent"], out["outage_lost"] = args.outage_s, res.get("sent"), res.get("lost")
        out["outage_met"] = res.get("lost") == 0 and out["outage_change_after_return_s"] is not None

        # 1. revocations
        reach, stop, failures = [], [], []
        for i in range(args.revocations):
            name = "d%03d" % i
            dev = net.device(name, "--count", "100000", "--interval", "10", "--linger", "0", background=True)
            c0 = net.echo.count
            end = time.monotonic() + 20
            while net.echo.count < c0 + 20 and time.monotonic() < end and dev.poll() is None:
                time.sleep(0.02)
            if net.echo.count < c0 + 20:
                failures.append("%s: no traffic before the revocation" % name)
                dev.kill()
                dev.wait()
                continue
            seq, t0 = revoke(net, store, net.key, name)
            got = alive.reached(nodes, seq, 10)
            if len(got) != len(nodes):
                failures.append("%s: not applied by %s" % (name, sorted(set(nodes) - set(got))))
            else:
                reach.append(max(got.values()) - t0)
            time.sleep(1.5)     # traffic still arriving now would count as not stopped
            # the echo notes when each datagram came (localnet.Echo.stamps)
            stop.append(max(0.0, (net.echo.stamps[-1] if net.echo.stamps else 0.0) - t0))
            dev.kill()
            dev.wait()
        out["revocations"] = len(reach)
        out["revocation_failures"] = failures[:10]
        out["revocation_reach_ms"] = {"p50": _ms(pct(reach, 50)), "p99": _ms(pct(reach, 99)),
                                      "max": _ms(max(reach) if reach else None)}
        out["revocation_traffic_stop_ms"] = {"p50": _ms(pct(stop, 50)), "p99": _ms(pct(stop, 99)),
                                             "max": _ms(max(stop) if stop else None)}
        out["revocation_met"] = bool(reach) and not failures and pct(reach, 99) <= 1.0 and pct(stop, 99) <= 1.0

        # 4. 1000 forged or tampered records
        c = net.client()
        chain, _, _, _ = store.verified()
        other = changelog.OperatorKey.generate(str(tmp / "intruder.key"))
        kinds = []
        for i in range(1000):
            k = i % 4
            if k == 0:      # tampered content, old signature
                r = changelog.make_record(net.key, chain.seq + 1, chain.head, "x", [])
                r["changes"] = [{"op": "delete", "key": "devices/t"}]
            elif k == 1:    # an intruder's key
                r = changelog.make_record(other, chain.seq + 1, chain.head, "intruder",
                                          [{"op": "delete", "key": "devices/t"}])
            elif k == 2:    # replay: an old seq with new content
                r = changelog.make_record(net.key, 1, changelog.GENESIS, "replay", [{"op": "delete", "key": "devices/t"}])
            else:           # reordered: a seq from the future
                r = changelog.make_record(net.key, chain.seq + 2, chain.head, "early",
                                          [{"op": "delete", "key": "devices/t"}])
            kinds.append(k)
            c.put("%slog/%012d.forged%04d" % (s.prefix, r["seq"], i), changelog.canonical(r))
        seq, t0 = revoke(net, store, net.key, None, marker=1)
        got = alive.reached(nodes, seq, 20)
        refused = {}
        for nname in net.pops:
            refused[nname] = sum(net.pop_stats(nname)["fleet"]["refused"].values())
        for gname, addr in (("gw", net.gw["control"]), ("gw2", str(net.out / "gw2.sock"))):
            st = control.query(addr, {"cmd": "status"}, timeout=5)["status"]
            refused[gname] = sum(st["fleet"]["refused"].values())
            if gname == "gw":
                t_alive = any(d["name"] == "t" for d in st["devices"])
        out["forged_records"] = 1000
        out["forged_refused_per_node"] = {"min": min(refused.values()), "max": max(refused.values())}
        out["forged_genuine_after_applied_by"] = "%d/%d nodes" % (len(got), len(nodes))
        out["forged_met"] = min(refused.values()) == 1000 and len(got) == len(nodes) and t_alive
        alive.stop()
    finally:
        net.stop()


def _ms(x):
    return None if x is None else round(x * 1000, 1)


def registry_figures(args, tmp, out):
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    n = args.registry
    e = LocalEtcd(data_dir=tempfile.mkdtemp(prefix="microtun-etcd-", dir="/dev/shm")
                  if args.etcd_tmpfs else None).start()
    out["registry_etcd_data"] = "tmpfs (/dev/shm): no disk fsync" if args.etcd_tmpfs else "disk (%s)" % e.dir
    proc = None
    try:
        key = changelog.OperatorKey.generate(str(tmp / "reg-op.key"))
        fl = {"endpoints": [e.endpoint], "trusted_operators": [key.public.hex()]}
        (tmp / "reg-fleet.json").write_text(json.dumps(fl))
        s = fleet.load_settings(str(tmp / "reg-fleet.json"))
        store = fleet.Store(s)
        t = time.monotonic()
        changes = [{"op": "put", "key": "devices/n%06d" % i, "value": {
            "name": "n%06d" % i, "public_key": X25519PrivateKey.generate().public_key().public_bytes_raw().hex(),
            "channels": [1]}} for i in range(n)]
        out["registry_keys_s"] = round(time.monotonic() - t, 2)
        t = time.monotonic()
        store.append(key, "bench: %d devices" % n, changes)
        out["registry_publish_s"] = round(time.monotonic() - t, 2)
        port = localnet.free_ports(1)[0]
        cfg = {"name": "big", "listen": "127.0.0.1:%d" % port, "control": str(tmp / "big.sock"),
               "private_key": os.urandom(32).hex(), "fleet": fl}
        (tmp / "big.json").write_text(json.dumps(cfg))
        chain, _, _, _ = store.verified()
        alive = AliveWatch(e.endpoint, s.prefix)
        logf = open(tmp / "big.log", "w")
        t0 = time.monotonic()
        proc = subprocess.Popen([PY, "-m", "microtun_host.cli", "gateway", "--config", str(tmp / "big.json")],
                                stdout=logf, stderr=subprocess.STDOUT, env=py_env(), cwd=str(ROOT))
        logf.close()
        got = alive.reached(["gateways/big"], chain.seq, 60)
        if not got:
            raise RuntimeError("the gateway did not load the registry: %s" % (tmp / "big.log").read_text()[-2000:])
        control.query(cfg["control"], {"cmd": "ping"}, timeout=5)
        out["registry_devices"] = n
        out["registry_start_serving_s"] = round(got["gateways/big"] - t0, 2)
        with open("/proc/%d/status" % proc.pid) as f:
            rss = [l for l in f if l.startswith("VmRSS")][0].split()[1]
        out["registry_rss_mb"] = round(int(rss) / 1024, 1)
        with open("/proc/%d/stat" % proc.pid) as f:       # CPU time: what the wall clock is on a machine to itself
            fields = f.read().rsplit(")", 1)[1].split()
        out["registry_start_cpu_s"] = round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)
        def applied(seq, timeout=10):
            """The gateway's own time.monotonic() when it applied seq (one clock for every process here)."""
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                fl = control.query(cfg["control"], {"cmd": "fleet"}, timeout=5)["fleet"]
                if fl["applied_seq"] >= seq:
                    return fl["applied_at_monotonic"], fl["apply_ms"][0] / 1000
                time.sleep(0.005)
            return None, None

        # one change through the API (an operator tool that keeps the verified chain), 20 times
        e2e, commit, publish, inside = [], [], [], []
        chain, state, head_rev, _ = store.verified()
        for i in range(20):
            name = "n%06d" % (i * 7)
            t1 = time.monotonic()
            seq = store.append(key, "bench: revoke %s" % name, fleet.revoke_changes(state, name), chain, head_rev)[-1]
            t2 = time.monotonic()          # the txn returned: etcd committed it (its WAL fsync'd)
            head_rev = store.client.get(s.prefix + "head").mod_revision
            changelog.apply_changes(state, {"changes": fleet.revoke_changes(state, name)})
            at, ins = applied(seq)
            publish.append(t2 - t1)
            if at is not None:
                e2e.append(at - t1)
                commit.append(at - t2)
                inside.append(ins)
        # the operator's command as typed: `microtun fleet revoke NAME` (a new process that reads and
        # verifies the whole log before it appends), 3 times
        cli = []
        for i in range(3):
            name = "n%06d" % (i * 7 + 3)
            t1 = time.monotonic()
            r = subprocess.run([PY, "-m", "microtun_host.cli", "fleet", "revoke", name, "--fleet",
                                str(tmp / "reg-fleet.json"), "--operator-key", str(tmp / "reg-op.key")],
                               capture_output=True, text=True, env=py_env(), cwd=str(ROOT), timeout=120)
            seq = int(r.stdout.split()[1].rstrip(":")) if r.returncode == 0 else None
            at = applied(seq, 30)[0] if seq else None
            cli.append(None if at is None else at - t1)
        out["registry_single_change_ms"] = {
            "n": len(e2e),
            "etcd_commit_to_applied_median": _ms(pct(commit, 50)), "etcd_commit_to_applied_max": _ms(
                max(commit) if commit else None),
            "api_append_to_applied_median": _ms(pct(e2e, 50)), "api_append_to_applied_max": _ms(
                max(e2e) if e2e else None),
            "of_which_etcd_txn_median": _ms(pct(publish, 50)),
            "in_gateway_median": _ms(pct(inside, 50)), "in_gateway_max": _ms(max(inside) if inside else None),
            "cli_command_to_applied": [_ms(x) for x in cli]}
        alive.stop()
        out["registry_met"] = {"start_10s": out["registry_start_serving_s"] <= 10,
                               "rss_100mb": out["registry_rss_mb"] <= 100,
                               "change_50ms_from_etcd_commit": bool(commit) and max(commit) <= 0.05,
                               "change_50ms_from_api_append_median": bool(e2e) and pct(e2e, 50) <= 0.05}
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        e.stop()
        if args.etcd_tmpfs:
            import shutil
            shutil.rmtree(e.dir, ignore_errors=True)


def failover_figures(args, tmp, out):
    from microtun_host import gwpool
    res = {}
    for lease in args.failover_leases:
        d = tmp / ("failover-lease%d" % lease)
        d.mkdir()
        devs = {"f%d" % i: {} for i in range(6)}
        net = FleetNet(d, routes={"a": ["a1"], "b": ["b1"]}, devices=devs, pool=["gw2"], lease_s=lease,
                       spare_pops=())
        procs = {}
        try:
            net.start()
            end = time.monotonic() + 20
            while time.monotonic() < end and net.pop_stats("a1")["fleet"].get("gateways", {}).get("live") != [
                    "gw", "gw2"]:
                time.sleep(0.1)
            by_gw = {}
            for n in devs:
                by_gw.setdefault(gwpool.choose(n, ["gw", "gw2"]), []).append(n)
            dead = max(by_gw, key=lambda g: len(by_gw[g]))
            size = {n: 40 + i for i, n in enumerate(sorted(devs))}      # the service tells devices apart by size
            count = int((lease + 1 + 10) * 1000 / 20)
            for n in sorted(devs):
                procs[n] = net.device(n, "--count", str(count), "--interval", "20", "--size", str(size[n]),
                                      "--linger", "2000", background=True)
            end = time.monotonic() + 30
            while time.monotonic() < end:
                got = {len(x) for x in net.echo.seen}
                if all(size[n] in got for n in devs):
                    break
                time.sleep(0.1)
            time.sleep(1.0)
            t_kill = time.monotonic()
            net.kill(dead, signal.SIGKILL)
            moved_at = None
            end = time.monotonic() + lease + 10
            while time.monotonic() < end and moved_at is None:
                if net.pop_stats("a1")["fleet"]["gateways"]["live"] == [g for g in ("gw", "gw2") if g != dead]:
                    moved_at = time.monotonic()
                time.sleep(0.02)
            results = {n: parse_result(p.communicate(timeout=120)[0]) for n, p in procs.items()}
            arrivals = {n: [] for n in devs}
            by_size = {v: k for k, v in size.items()}
            for t, x in zip(list(net.echo.stamps), list(net.echo.seen)):
                if len(x) in by_size:
                    arrivals[by_size[len(x)]].append(t)
            resume, silence = {}, {}
            for n, ts in arrivals.items():
                if n in by_gw[dead]:
                    nxt = [t for t in ts if t > t_kill]
                    resume[n] = round(nxt[0] - t_kill, 2) if nxt else None
                else:
                    near = [t for t in ts if t_kill - 2 <= t <= t_kill + lease + 5]
                    silence[n] = round(max((b - a for a, b in zip(near, near[1:])), default=0) * 1000)
            rs = [v for v in resume.values() if v is not None]
            res["lease_%ds" % lease] = {
                "devices_on_dead_gateway": len(by_gw[dead]), "devices_on_other": len(devs) - len(by_gw[dead]),
                "pop_moved_after_s": None if moved_at is None else round(moved_at - t_kill, 2),
                "resume_s": {"median": pct(rs, 50), "max": max(rs) if rs else None, "each": resume},
                "never_resumed": sum(1 for v in resume.values() if v is None),
                "others_longest_silence_ms": max(silence.values()) if silence else None,
                "handshakes_of_moved": [results[n].get("handshakes") for n in by_gw[dead]],
                "lost_of_moved": [results[n].get("lost") for n in by_gw[dead]],
                "lost_of_others": [results[n].get("lost") for n in devs if n not in by_gw[dead]]}
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()
            net.stop()
    out["gateway_failover"] = res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pops", type=int, default=20)
    ap.add_argument("--revocations", type=int, default=100)
    ap.add_argument("--outage-s", type=float, default=30)
    ap.add_argument("--registry", type=int, default=100000)
    ap.add_argument("--failover-leases", type=lambda v: [int(x) for x in v.split(",")], default=[2, 5],
                    help="lease_s values for the gateway failover figure (comma-separated)")
    ap.add_argument("--only", choices=("fleet", "registry", "failover"))
    ap.add_argument("--etcd-tmpfs", action="store_true",
                    help="registry figures with etcd's data dir in /dev/shm (a separate, labelled run)")
    args = ap.parse_args()
    if args.quick:
        args.pops, args.revocations, args.outage_s, args.registry = 6, 10, 5, 20000
    from pathlib import Path
    out = {"bench": "fleet", "cpus": os.cpu_count(), "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    t = time.monotonic()
    try:
        if args.only in (None, "fleet"):
            fleet_figures(args, tmp / "net", out)
        if args.only in (None, "failover"):
            failover_figures(args, tmp, out)
        if args.only in (None, "registry"):
            registry_figures(args, tmp, out)
    finally:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    out["wall_s"] = round(time.monotonic() - t, 1)
    out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]      # the machine is shared: times vary with it
    print(json.dumps(out))


if __name__ == "__main__":
    main()
