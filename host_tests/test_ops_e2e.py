"""The ops channel end to end (docs/OPS.md): a unix-port device behind a PoP,
the gateway, `microtun ops` commands, the real mpremote through the bridge,
a reboot, and the refusals (no permission, bad or expired token, an
untrusted key, a device gone mid-transfer). Real processes over loopback."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from harness import Net, ROOT, PY, py_env, mpremote_bridge
from microtun_host.changelog import OperatorKey
from microtun_host.localnet import micropython, mp_env
from microtun_host.ops import OpsClient, OpsError, REBOOT_EXIT
from microtun_host import control

MPREMOTE = os.path.join(os.path.dirname(sys.executable), "mpremote")


class Device:
    """device_run --serve in a scratch root, restarted when it exits with
    the unix port's reset status (an ops reboot), as a board would reset."""

    def __init__(self, net, name, root):
        self.net, self.name, self.root = net, name, root
        self.starts = 0
        self.proc = None
        self.stopped = False
        self.out = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopped:
            self.starts += 1
            self.proc = subprocess.Popen(
                [micropython(), str(ROOT / "tools" / "device_run.py"), self.net.device_config(self.name),
                 "--count", "0", "--linger", "0", "--serve", "60000", "--connect-ms", "30000",
                 "--ops-root", str(self.root)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=mp_env(), cwd=str(ROOT))
            self.out.append(self.proc.communicate()[0])
            if self.proc.returncode != REBOOT_EXIT:
                return

    def stop(self):
        self.stopped = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        self.thread.join(10)


def wait_established(net, name, timeout=15):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for d in net.gw_status()["devices"]:
            if d["name"] == name and d["established"]:
                return
        time.sleep(0.1)
    raise AssertionError("%s never came up: %r" % (name, net.gw_status()))


def exec_streamed(args, first, timeout=30):
    """`microtun ops ... exec` of a snippet that prints `first`, sleeps and
    prints again: (seconds from the first line on stdout to the process's
    end, the whole stdout, stderr)."""
    argv = list(args) if args[0] == MPREMOTE else [PY, "-m", "microtun_host.cli"] + list(args)
    p = subprocess.Popen(argv, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=py_env(), cwd=str(ROOT))
    try:
        line = p.stdout.readline()
        t_first = time.monotonic()
        assert line == first + "\n", (line, p.stderr.read() if p.poll() is not None else "")
        rest, err = p.communicate(timeout=timeout)
        return time.monotonic() - t_first, line + rest, err
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


STREAMED = "import time\nprint('first')\ntime.sleep(1.2)\nprint('second')"


def cli(*args, timeout=30):
    return subprocess.run([PY, "-m", "microtun_host.cli"] + list(args), capture_output=True, text=True,
                          env=py_env(), cwd=str(ROOT), timeout=timeout)


@pytest.fixture
def rig(tmp_path):
    key_path = str(tmp_path / "op.key")
    key = OperatorKey.generate(key_path)
    other = OperatorKey.generate(str(tmp_path / "other.key"))
    net = Net(tmp_path, routes={"a": ["a1"]}, devices={"d1": {"ops": True}, "d2": {}},
              operators=[key.public.hex()])
    net.start()
    root = tmp_path / "root"
    root.mkdir()
    dev = Device(net, "d1", root)
    try:
        wait_established(net, "d1")
        yield net, dev, key_path, str(tmp_path / "other.key"), root
    finally:
        dev.stop()
        net.stop()


def test_ops_end_to_end(rig, tmp_path):
    net, dev, key_path, other_key, root = rig
    gwcfg = str(net.out / "gateway.json")
    sock = net.gw["control"]

    # -- the CLI: exec, put, ls, get, health, logs -----------------------------------------
    r = cli("ops", "d1", "--config", gwcfg, "--operator-key", key_path, "exec", "print(6 * 7)")
    assert r.returncode == 0 and r.stdout == "42\n", r.stderr
    # streamed: the first line is on the host's stdout while the snippet still sleeps
    after, out, err = exec_streamed(["ops", "d1", "--config", gwcfg, "--operator-key", key_path, "exec",
                                     STREAMED], "first")
    assert out == "first\nsecond\n" and after > 0.9, (after, out, err)
    token = cli("ops", "d1", "--config", gwcfg, "--operator-key", key_path, "token", "--ttl", "60").stdout.strip()
    assert len(token) == 32
    src = tmp_path / "blob.bin"
    blob = os.urandom(40000)
    src.write_bytes(blob)
    r = cli("ops", "d1", "--control", sock, "--token", token, "put", str(src), "blob.bin")
    assert r.returncode == 0, r.stderr
    assert (root / "blob.bin").read_bytes() == blob
    c = OpsClient(sock, "d1", token)             # the same calls, in process
    assert ("blob.bin", 40000, False) in c.ls("/")
    assert c.get("blob.bin") == blob
    h = c.health()
    assert h["established"] and h["boot"] >= 1
    nxt, text = c.logs(0)
    assert "session established" in text
    # logs --follow: the request waits on the device until a line comes (here: the refusal of a bad get)
    threading.Timer(1.0, lambda: pytest.raises(OpsError, c.get, "../held.txt")).start()
    t0 = time.monotonic()
    nxt2, text = c.logs(nxt, wait=10)
    assert 0.9 < time.monotonic() - t0 < 6 and "held.txt" in text and nxt2 > nxt, (time.monotonic() - t0, text)
    with pytest.raises(OpsError, match="ImportError") as e:
        c.exec("print('first')\nimport nosuchmodule")
    assert "Traceback" in e.value.traceback and e.value.output == "first\n"

    # a token that expires in 1 s (used after the mpremote part, which takes longer than that)
    short = OpsClient.connect(sock, "d1", operator_key=key_path, ttl=1)
    t_short = time.monotonic()

    # -- mpremote through the bridge ----------------------------------------------------------
    url = mpremote_bridge(c)
    (tmp_path / "hello.txt").write_text("hello\n" * 100)
    for args, want in ((["exec", "print('via', 'mpremote')"], "via mpremote\n"),
                       (["fs", "cp", str(tmp_path / "hello.txt"), ":hello.txt"], None),
                       (["fs", "cat", "hello.txt"], "hello\nhello\n")):
        r = subprocess.run([MPREMOTE, "connect", url] + args, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
        if want:
            assert want in r.stdout, (args, r.stdout)
    assert (root / "hello.txt").read_text() == "hello\n" * 100
    after, out, err = exec_streamed([MPREMOTE, "connect", url, "exec", STREAMED], "first")
    assert out.replace("\r\n", "\n") == "first\nsecond\n" and after > 0.9, (after, out, err)    # streamed too

    # -- refusals: one clear line each, counted, logged --------------------------------------------
    r = cli("ops", "d2", "--config", gwcfg, "--operator-key", key_path, "health")
    assert r.returncode == 1 and "does not allow ops" in r.stderr and len(r.stderr.splitlines()) == 1
    with pytest.raises(OpsError, match="bad or expired ops token"):
        OpsClient(sock, "d1", "0" * 32).health()
    with pytest.raises(OpsError, match="not trusted"):
        OpsClient.connect(gwcfg, "d1", operator_key=other_key)
    rep = control.query(sock, {"cmd": "ops_challenge", "device": "d1"})
    rep = control.query(sock, {"cmd": "ops_login", "device": "d1", "nonce": rep["nonce"], "ttl": 60,
                               "operator": OperatorKey.load(key_path).public.hex(), "sig": "00" * 64})
    assert not rep["ok"] and "bad signature" in rep["error"]
    t1 = control.query(sock, {"cmd": "ops_login", "device": "d1"})
    assert not t1["ok"] and "challenge" in t1["error"]
    # an expired token
    time.sleep(max(0.0, t_short + 1.1 - time.monotonic()))
    with pytest.raises(OpsError, match="expired"):
        short.health()
    with pytest.raises(OpsError, match="leaves the device's ops root"):
        c.get("../op.key")
    counters = [d for d in net.gw_status()["devices"] if d["name"] == "d1"][0]["counters"]
    assert counters.get("ops_bad_token") == 2 and counters.get("ops_bad_login") >= 2
    assert [d for d in net.gw_status()["devices"] if d["name"] == "d2"][0]["counters"]["ops_denied"] == 1
    gwlog = net.log("gw")
    assert "ops: operator" in gwlog and "exec 12 bytes -> 3 bytes out -> ok" in gwlog
    assert "ops login refused: operator key" in gwlog      # the first; more within 10 s are counted in the next line

    # -- reboot: the device restarts and answers again with a new boot counter -----------------
    boot = c.health()["boot"]
    c.reboot()
    assert c.wait_up(20)
    assert c.health()["boot"] == boot + 1 and dev.starts == 2

    # -- the device gone mid-transfer: an error within the timeout, then the put resumes ----------
    big = os.urandom(100000)
    part = root / "big.bin.part"

    def cut():                              # once half the file is on the device
        end = time.monotonic() + 20
        while time.monotonic() < end:
            if part.exists() and part.stat().st_size >= 50000:
                dev.proc.kill()             # status -9: the supervisor does not restart it
                return
            time.sleep(0.002)
    threading.Thread(target=cut, daemon=True).start()
    t0 = time.monotonic()
    c.device_timeout = 1.5
    with pytest.raises(OpsError, match="did not answer"):
        c.put("big.bin", big)
    assert time.monotonic() - t0 < 10
    assert not (root / "big.bin").exists()
    dev2 = Device(net, "d1", root)
    try:
        assert c.wait_up(20)
        seen = []
        c.put("big.bin", big, progress=lambda done, total: seen.append(done))
        assert seen[0] >= 16 * 1024, seen      # resumed from the saved point, not from 0
        assert (root / "big.bin").read_bytes() == big
    finally:
        dev2.stop()


def test_ops_through_a_gateway_with_two_workers(tmp_path):
    """The supervisor's control socket passes ops (login, exec streamed,
    health) to the worker holding each device's session: two devices on
    two workers, both reached through the one socket."""
    from microtun_host import workers
    key_path = str(tmp_path / "op.key")
    key = OperatorKey.generate(key_path)
    net = Net(tmp_path, routes={"a": ["a1"]}, devices={"d1": {"ops": True}, "d2": {"ops": True}},
              operators=[key.public.hex()])
    path = net.out / "gateway.json"
    cfg = json.loads(path.read_text())
    cfg["workers"] = 2
    path.write_text(json.dumps(cfg))
    groups = workers.link_groups([type("L", (), l) for l in cfg["links"]])
    exc = workers.steering_groups(groups, 2)
    owner = {[l["name"] for l in cfg["links"] if l["in_label"] == g[0]][0].split("/")[0]:
             workers.worker_of(g[0], 2, exc) for g in groups}
    assert sorted(owner.values()) == [0, 1], owner       # one device per worker
    devs = []
    try:
        net.start()
        for name in ("d1", "d2"):
            (tmp_path / name).mkdir()
            devs.append(Device(net, name, tmp_path / name))
        for name in ("d1", "d2"):
            wait_established(net, name, timeout=30)
        gwcfg = str(path)
        for name in ("d1", "d2"):
            after, out, err = exec_streamed(["ops", name, "--config", gwcfg, "--operator-key", key_path, "exec",
                                             STREAMED.replace("first", "first on " + name)], "first on " + name)
            assert out == "first on %s\nsecond\n" % name and after > 0.9, (name, after, out, err)
        c = OpsClient.connect(gwcfg, "d2", operator_key=key_path)
        assert c.health()["established"]
        with pytest.raises(OpsError, match="bad or expired ops token"):      # d1's worker never issued it
            OpsClient(net.gw["control"], "d1", c.token).health()
        with pytest.raises(OpsError, match="unknown device 'd9'"):
            OpsClient.connect(gwcfg, "d9", operator_key=key_path)
        log = net.log("gw")
        for name in ("d1", "d2"):                # audited by the worker that ran it
            assert "w%d" % owner[name] in [l for l in log.splitlines()
                                           if "on device %s: exec" % name in l and "-> ok" in l][0], log
    finally:
        for d in devs:
            d.stop()
        net.stop()
    assert "Traceback" not in net.log("gw")
