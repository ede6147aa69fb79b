"""A local microtun network on one machine: real processes over loopback.
Used by `make demo` (tools/demo.py) and the integration tests.

    net = Net(tmp_path, routes={"a": ["a1", "a2"], "b": ["b1", "b2"]},
              lossy={"a": {"loss": 0.1}})        # a link emulator in front of a1
    net.start()                                    # PoPs, gateway, echo service, emulators
    res = net.device("d1", "--count", "200")       # the unix-port device, RESULT dict
    net.stop()

Topology files go through the real provisioner, PoPs and the gateway run as
`python -m microtun_host...` subprocesses, the device as `micropython
tools/device_run.py`. Every process is killed at stop(), also on failure.
"""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

LIB = Path(__file__).resolve().parent.parent
ROOT = LIB.parent
PY = sys.executable


def _ephemeral_low():
    """The first port of the kernel's ephemeral range (Linux's
    ip_local_port_range; 32768 where it cannot be read)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_given = set()                    # ports this process handed out already
_given_lock = threading.Lock()    # (tests run scenarios side by side in threads)
_cursor = None                    # where this process looks next (see free_ports)


def free_ports(n):
    """n ports on 127.0.0.1, free for UDP and TCP when checked, for the
    processes a test starts to listen on. Picked below the kernel's
    ephemeral range: a port from bind(0) was free when checked, but any
    other socket's bind(0) or outgoing datagram could take it before the
    child bound it (seen: "cannot listen on 127.0.0.1:60576: Address
    already in use" with two scenarios side by side). Below the range only
    an explicit bind takes a port, and none is handed out twice here; each
    process walks the range from its own place (its pid), so that two test
    processes at once look at different ports."""
    global _cursor
    hi = min(_ephemeral_low(), 65536)
    lo = max(1024, hi - 12000)
    span = hi - lo
    ports = []
    with _given_lock:
        if _cursor is None:
            _cursor = (os.getpid() * 613 + random.randrange(64)) % span
        for _ in range(50 * n + 100):
            if len(ports) == n:
                break
            p = lo + _cursor % span
            _cursor += 1
            if p in _given:
                continue
            free = True
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                s = socket.socket(socket.AF_INET, kind)
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    free = False
                finally:
                    s.close()
            if free:
                _given.add(p)
                ports.append(p)
    if len(ports) < n:
        raise RuntimeError("free_ports: found only %d free loopback ports of %d in %d..%d" % (len(ports), n, lo, hi - 1))
    return ports


def free_port():
    """One port, as free_ports(1) picks them."""
    return free_ports(1)[0]


def micropython():
    cand = Path(PY).with_name("micropython")
    return str(cand) if cand.exists() else "micropython"


def mp_env():
    env = dict(os.environ)
    env["MICROPYPATH"] = "%s:.frozen" % LIB
    return env


def py_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(LIB) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Echo:
    """A UDP echo service in a thread (the gateway's channel-1 service).
    Set .echo = False to make it a sink that only records (seen, stamps)."""

    def __init__(self, port):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.count = 0
        self.seen = []
        self.stamps = []        # time.monotonic() of each datagram in seen
        self.echo = True
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop:
            try:
                d, a = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            self.count += 1
            self.stamps.append(time.monotonic())
            self.seen.append(d)
            if not self.echo:
                continue
            try:
                self.sock.sendto(d, a)
            except OSError:
                pass

    def stop(self):
        self._stop = True
        self.thread.join(2)
        self.sock.close()


class Net:
    def __init__(self, tmp, routes=None, devices=None, lossy=None, policy="best", services=None, spare_pops=(),
                 standby=False, operators=()):
        self.tmp = Path(tmp)
        self.routes = routes or {"a": ["a1", "a2"]}
        self.devices = devices or {"d1": {}}
        self.lossy = lossy or {}
        self.policy = policy
        self.procs = {}
        self.logs = {}
        self.echo = None
        pops = sorted({p for chain in self.routes.values() for p in chain} | set(spare_pops))
        self.standby = standby          # a standby gateway (same identity), devices with unresponsive_s
        self.operators = list(operators)    # Ed25519 public keys (hex) trusted for ops (docs/OPS.md)
        n = len(pops) + 3 + 2 * len(self.lossy)
        ports = iter(free_ports(n))
        self.out = self.tmp / "out"
        # control channels: provision's default, an owner-only socket next to each config
        self.pops = {p: {"listen": "127.0.0.1:%d" % next(ports), "control": str(self.out / "pops" / (p + ".sock"))}
                     for p in pops}
        self.gw = {"listen": "127.0.0.1:%d" % next(ports), "control": str(self.out / "gw.sock")}
        self.gw_standby = {"listen": "127.0.0.1:%d" % next(ports), "control": str(self.out / "gw-standby.sock")}
        self.echo_port = next(ports)
        self.netem = {r: {"listen": "127.0.0.1:%d" % next(ports), "control": "127.0.0.1:%d" % next(ports)}
                      for r in sorted(self.lossy)}
        self.topology = self.tmp / "topology.toml"
        self.write_topology()
        self.provision()

    # -- provisioning -----------------------------------------------------------
    def write_topology(self):
        t = ['[gateway]', 'name = "gw"', 'listen = "%s"' % self.gw["listen"],
             'services = { "1" = "127.0.0.1:%d" }' % self.echo_port]
        if self.operators:
            t.append('operators = [%s]' % ", ".join('"%s"' % k for k in self.operators))
        if self.standby:
            t += ['standby = "%s"' % self.gw_standby["listen"], 'standby_control = "gw-standby.sock"',
                  'keepalive_s = 1']
        t += self.gateway_lines()
        t.append('')
        used = {p for chain in self.routes.values() for p in chain}
        for p, a in sorted(self.pops.items()):
            if p not in used:
                continue          # a spare PoP (ports reserved) joins when a route uses it
            t += ['[[pop]]', 'name = "%s"' % p, 'listen = "%s"' % a["listen"], '']
        for r, chain in sorted(self.routes.items()):
            t += ['[[route]]', 'name = "%s"' % r, 'pops = [%s]' % ", ".join('"%s"' % p for p in chain)]
            if r in self.netem:
                t.append('via = "%s"' % self.netem[r]["listen"])
            t.append('')
        for d, opts in sorted(self.devices.items()):
            t += ['[[device]]', 'name = "%s"' % d, 'channels = [1, 2]',
                  'policy = "%s"' % opts.get("policy", self.policy)]
            if self.standby or self.rehandshake_s():
                t.append('unresponsive_s = %d' % (self.rehandshake_s() or 2))
            if opts.get("ops"):
                t.append('ops = true')
            if "routes" in opts:
                t.append('routes = [%s]' % ", ".join('"%s"' % r for r in opts["routes"]))
            t.append('')
        self.topology.write_text("\n".join(t))

    def gateway_lines(self):
        """More lines of the topology's [gateway] table (fleetnet.py: its pool)."""
        return []

    def rehandshake_s(self):
        """Devices' unresponsive_s when a gateway may die under them (0: the default)."""
        return 0

    def provision(self):
        r = subprocess.run([PY, "-m", "microtun_host.provision", str(self.topology), "--out", str(self.out)],
                           capture_output=True, text=True, env=py_env(), cwd=str(ROOT), timeout=60)
        if r.returncode != 0:
            raise RuntimeError("provision failed: %s %s" % (r.stdout, r.stderr))
        for d in self.devices:
            cfg = json.loads((self.out / "devices" / ("%s.json" % d)).read_text())
            cfg["state_dir"] = str(self.state_dir(d))
            p = self.out / "devices" / ("%s.json" % d)
            p.write_text(json.dumps(cfg))
        return r.stdout

    def state_dir(self, name):
        """A device's own state directory (its boot counter), as on a board:
        two devices running at once never share (or race on) one file."""
        d = self.tmp / ("state-" + name)
        d.mkdir(exist_ok=True)
        return d

    def device_config(self, name):
        return str(self.out / "devices" / ("%s.json" % name))

    # -- processes ----------------------------------------------------------------
    def _spawn(self, name, argv, env):
        logf = open(self.tmp / ("%s.log" % name), "w")
        self.logs[name] = self.tmp / ("%s.log" % name)
        # Ctrl-C or SIGTERM while Popen forks would leave a child nobody
        # recorded, so nobody stops it: the signals wait (their handlers
        # run only in the main thread) until it is in self.procs.
        pending = []
        held = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                held[sig] = signal.signal(sig, lambda signum, frame: pending.append(signum))
        try:
            self.procs[name] = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
        finally:
            logf.close()
            for sig, handler in held.items():
                signal.signal(sig, handler)
            for sig in pending:
                signal.raise_signal(sig)

    def start_pop(self, name):
        self._spawn(name, [PY, "-m", "microtun_host.cli", "pop", "--config", str(self.out / "pops" / ("%s.json" % name))],
                    py_env())
        self.wait_control(self.pops[name]["control"], name)

    def start_gateway(self):
        self._spawn("gw", [PY, "-m", "microtun_host.cli", "gateway", "--config", str(self.out / "gateway.json")],
                    py_env())
        self.wait_control(self.gw["control"], "gw")

    def start_gateway_standby(self):
        self._spawn("gw-standby", [PY, "-m", "microtun_host.cli", "gateway", "--config",
                                   str(self.out / "gateway-standby.json")], py_env())
        self.wait_control(self.gw_standby["control"], "gw-standby")

    def start_netem(self, route, **imp):
        first = self.routes[route][0]
        argv = [PY, str(ROOT / "tools" / "netem.py"), "--listen", self.netem[route]["listen"],
                "--upstream", self.pops[first]["listen"], "--control", self.netem[route]["control"],
                "--seed", str(imp.pop("seed", 1))]
        for k, v in imp.items():
            argv += ["--" + k.replace("_", "-"), str(v)]
        self._spawn("netem-" + route, argv, py_env())
        self.wait_control(self.netem[route]["control"], "netem-" + route, netem=True)

    def start(self):
        self.echo = Echo(self.echo_port)
        used = {p for chain in self.routes.values() for p in chain}
        # every process starts at once (none needs another one up to start), then we wait for each
        self._deferred = []
        try:
            for p in sorted(self.pops):
                if p in used:
                    self.start_pop(p)
            self.start_gateway()
            if self.standby:
                self.start_gateway_standby()
            for r, imp in sorted(self.lossy.items()):
                self.start_netem(r, **dict(imp))
        finally:
            waits, self._deferred = self._deferred, None
        for args in waits:
            self.wait_control(*args)

    _deferred = None        # inside start(): the wait_control() calls still to make

    def wait_control(self, addr, name, netem=False, timeout=15):
        from microtun_host import control
        if self._deferred is not None:
            self._deferred.append((addr, name, netem, timeout))
            return None
        end = time.monotonic() + timeout
        wait = 0.05         # UDP (netem) has no refusal while it starts: short tries first, longer if slow
        while time.monotonic() < end:
            if self.procs[name].poll() is not None:
                raise RuntimeError("%s exited at start: %s" % (name, self.logs[name].read_text()[-3000:]))
            try:
                if netem:
                    return self.netem_cmd(addr, {"stats": True}, timeout=wait)
                return control.query(addr, {"cmd": "ping"}, timeout=0.3)
            except Exception:
                wait = min(1.0, wait * 2)
                time.sleep(0.05)
        raise RuntimeError("%s did not come up: %s" % (name, self.logs[name].read_text()[-3000:]))

    def netem_cmd(self, addr, cmd, timeout=1.0):
        host, port = addr.rsplit(":", 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(json.dumps(cmd).encode(), (host, int(port)))
            return json.loads(s.recvfrom(65535)[0])

    def blackhole(self, route, on=True):
        return self.netem_cmd(self.netem[route]["control"], {"blackhole": on})

    def kill(self, name, sig=signal.SIGKILL):
        p = self.procs[name]
        p.send_signal(sig)
        p.wait(10)

    def reload(self, name):
        self.procs[name].send_signal(signal.SIGHUP)

    def pop_stats(self, name):
        from microtun_host import control
        return control.query(self.pops[name]["control"], {"cmd": "stats"}, timeout=2)

    def gw_status(self):
        from microtun_host import control
        return control.query(self.gw["control"], {"cmd": "status"}, timeout=2)["status"]

    def device(self, name, *args, heap=None, timeout=120, background=False):
        argv = [micropython()]
        if heap:
            argv += ["-X", "heapsize=" + heap]
        argv += [str(ROOT / "tools" / "device_run.py"), self.device_config(name)] + list(args)
        if background:
            return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=mp_env(), cwd=str(ROOT))
        r = subprocess.run(argv, capture_output=True, text=True, env=mp_env(), cwd=str(ROOT), timeout=timeout)
        return parse_result(r.stdout, r.stderr)

    def stop(self):
        for name, p in self.procs.items():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for name, p in self.procs.items():
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        if self.echo is not None:
            self.echo.stop()

    def log(self, name):
        return self.logs[name].read_text()


def parse_result(out, err=""):
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise AssertionError("device printed no RESULT:\n%s\n%s" % (out[-3000:], err[-3000:]))


class Recorder:
    """A transparent UDP relay that keeps a copy of every datagram in both
    directions (to check what a link carries)."""

    def __init__(self, upstream):
        self.up = upstream
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.addr = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.out.settimeout(0.1)
        self.client = None
        self.seen = []
        self._stop = False
        self.threads = [threading.Thread(target=self._fwd, daemon=True),
                        threading.Thread(target=self._back, daemon=True)]
        for t in self.threads:
            t.start()

    def _fwd(self):
        host, port = self.up.rsplit(":", 1)
        while not self._stop:
            try:
                d, a = self.sock.recvfrom(65535)
            except (socket.timeout, OSError):
                continue
            self.client = a
            self.seen.append(d)
            self.out.sendto(d, (host, int(port)))

    def _back(self):
        while not self._stop:
            try:
                d, a = self.out.recvfrom(65535)
            except (socket.timeout, OSError):
                continue
            self.seen.append(d)
            if self.client:
                self.sock.sendto(d, self.client)

    def stop(self):
        self._stop = True
        for t in self.threads:
            t.join(2)
        self.sock.close()
        self.out.close()
