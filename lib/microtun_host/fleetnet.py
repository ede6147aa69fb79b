"""localnet.Net in fleet mode: the same loopback network of real processes,
but provisioned into a real etcd (started here on random loopback ports,
temporary data dir) and with every PoP and the gateway following the
signed change log. Used by the fleet tests, tools/bench_fleet.py and
tools/demo_fleet.py.

    net = FleetNet(tmp_path, routes={"a": ["a1", "a2"]})   # starts etcd, provisions, publishes
    net.start()
    net.fleet("revoke", "d1")                               # `microtun fleet revoke d1 ...`
    net.stop()                                              # processes, then etcd

pool=["gw2", ...]: more gateways of the same identity ([[gateway.pool]]),
started with net.start() as well; each device's paths end at one of those
alive (gwpool.py). lease_s: the nodes' lease (the fleet section's "lease_s").
"""
import json
import subprocess

from microtun_host import changelog, fleet, localnet
from microtun_host.etcd import Client, LocalEtcd
from microtun_host.localnet import PY, ROOT, py_env


class FleetNet(localnet.Net):
    def __init__(self, tmp, *args, etcd=None, pool=(), lease_s=None, **kw):
        from pathlib import Path
        tmp = Path(tmp)
        self.pool = {n: {"listen": "127.0.0.1:%d" % p, "control": str(tmp / "out" / ("%s.sock" % n))}
                     for n, p in zip(pool, localnet.free_ports(len(pool)))}
        self.etcd = etcd or LocalEtcd().start()
        self.key_path = tmp / "operator.key"
        self.key = changelog.OperatorKey.generate(str(self.key_path))
        self.fleet_path = tmp / "fleet.json"
        settings = {"endpoints": [self.etcd.endpoint], "prefix": "/microtun/",
                    "trusted_operators": [self.key.public.hex()]}
        self.lease_s = lease_s
        if lease_s is not None:
            settings["lease_s"] = lease_s
        self.fleet_path.write_text(json.dumps(settings))
        try:
            super().__init__(tmp, *args, **kw)
        except BaseException:
            self.etcd.stop()
            raise

    def gateway_lines(self):
        lines = ['keepalive_s = 1'] if self.pool else []
        for n, a in sorted(self.pool.items()):
            lines += ['[[gateway.pool]]', 'name = "%s"' % n, 'listen = "%s"' % a["listen"],
                      'control = "%s.sock"' % n]
        return lines

    def rehandshake_s(self):
        # past the lease: the device's first new handshake goes through the moved path
        return (self.lease_s or fleet.LEASE_TTL_S) + 1 if self.pool else 0

    def start(self):
        super().start()
        for n in sorted(self.pool):
            self.start_pool_gateway(n)

    def start_pool_gateway(self, name):
        self._spawn(name, [PY, "-m", "microtun_host.cli", "gateway", "--config",
                           str(self.out / "fleet" / "gateways" / ("%s.json" % name))], py_env())
        self.wait_control(self.pool[name]["control"], name)

    def status_of(self, name):
        """The control `status` of gateway name ("gw" or a pool member)."""
        from microtun_host import control
        addr = self.gw["control"] if name == "gw" else self.pool[name]["control"]
        return control.query(addr, {"cmd": "status"}, timeout=2)["status"]

    def client(self):
        return Client(self.etcd.endpoint)

    def provision(self):
        r = subprocess.run([PY, "-m", "microtun_host.cli", "provision", str(self.topology), "--out", str(self.out),
                            "--fleet", str(self.fleet_path), "--operator-key", str(self.key_path)],
                           capture_output=True, text=True, env=py_env(), cwd=str(ROOT), timeout=60)
        if r.returncode != 0:
            raise RuntimeError("provision failed: %s %s" % (r.stdout, r.stderr))
        for d in self.devices:
            p = self.out / "devices" / ("%s.json" % d)
            cfg = json.loads(p.read_text())
            cfg["state_dir"] = str(self.tmp)
            p.write_text(json.dumps(cfg))
        return r.stdout

    def fleet(self, *args):
        """Run `microtun fleet ACTION ...` with this net's settings and key."""
        argv = [PY, "-m", "microtun_host.cli", "fleet", args[0]] + list(args[1:]) + ["--fleet", str(self.fleet_path)]
        if args[0] in ("revoke", "expire"):
            argv += ["--operator-key", str(self.key_path)]
        return subprocess.run(argv, capture_output=True, text=True, env=py_env(), cwd=str(ROOT), timeout=60)

    def start_pop(self, name):
        self._spawn(name, [PY, "-m", "microtun_host.cli", "pop", "--config",
                           str(self.out / "fleet" / "pops" / ("%s.json" % name))], py_env())
        self.wait_control(self.pops[name]["control"], name)

    def start_gateway(self):
        self._spawn("gw", [PY, "-m", "microtun_host.cli", "gateway", "--config", str(self.out / "fleet" / "gateway.json")],
                    py_env())
        self.wait_control(self.gw["control"], "gw")

    def stop(self):
        try:
            super().stop()
        finally:
            self.etcd.stop()
