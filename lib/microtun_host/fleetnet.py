"""localnet.Net in fleet mode: the same loopback network of real processes,
but provisioned into a real etcd (started here on random loopback ports,
temporary data dir) and with every PoP and the gateway following the
signed change log. Used by the fleet tests, tools/bench_fleet.py and
tools/demo_fleet.py.

    net = FleetNet(tmp_path, routes={"a": ["a1", "a2"]})   # starts etcd, provisions, publishes
    net.start()
    net.fleet("revoke", "d1")                               # `microtun fleet revoke d1 ...`
    net.stop()                                              # processes, then etcd
"""
import json
import subprocess

from microtun_host import changelog, localnet
from microtun_host.etcd import Client, LocalEtcd
from microtun_host.localnet import PY, ROOT, py_env


class FleetNet(localnet.Net):
    def __init__(self, tmp, *args, etcd=None, **kw):
        from pathlib import Path
        tmp = Path(tmp)
        self.etcd = etcd or LocalEtcd().start()
        self.key_path = tmp / "operator.key"
        self.key = changelog.OperatorKey.generate(str(self.key_path))
        self.fleet_path = tmp / "fleet.json"
        self.fleet_path.write_text(json.dumps({"endpoints": [self.etcd.endpoint], "prefix": "/microtun/",
                                               "trusted_operators": [self.key.public.hex()]}))
        try:
            super().__init__(tmp, *args, **kw)
        except BaseException:
            self.etcd.stop()
            raise

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
