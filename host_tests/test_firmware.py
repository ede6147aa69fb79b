"""The board firmware (firmware/, boards/unix) on the MicroPython unix port,
with real processes on loopback (issue 6): safe mode, config errors, crash
handling, the log, and the whole firmware talking through two PoPs to a
gateway. Every test is bounded in time and cleans up its processes.

The firmware runs the way tools/vboard.py runs it, without the pty: the
boot shim mounts a directory at "/", runs boot.py and main.py, then the REPL
reads stdin. A reset prints vboard's exit marker and waits to be killed.

Figures for docs/FIRMWARE.md (heap, time to first message, X25519 count):

    .venv/bin/python host_tests/test_firmware.py figures
"""
import ast
import atexit
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "lib"))
sys.path.insert(0, str(ROOT / "tools"))

import vboard                                   # noqa: E402
from microtun_host import flash, control         # noqa: E402
from microtun_host.localnet import free_ports    # noqa: E402
from microtun.x25519 import public_key           # noqa: E402

PY = sys.executable
MICROPYTHON = str(Path(sys.executable).with_name("micropython"))
WORKING_HEAP = "256K"        # the full firmware on the 64-bit unix port (figures(): smallest that works)


# -- a board directory, as `microtun flash` leaves it -------------------------------------
_BUILD = {}


def built_files(arch=None, lines=False):
    """[(local, remote)] of the compiled firmware for the unix board (its
    MPY_ARCH, or `arch`: a 32-bit build is x86; lines: flash.compile_mpy);
    once per arch."""
    key = (arch, lines)
    if key not in _BUILD:
        b = flash.boards()["unix"]
        if arch is not None:
            b.arch = arch
        out = Path(tempfile.mkdtemp(prefix="microtun-test-firmware-"))
        atexit.register(shutil.rmtree, out, True)
        files = flash.build(b, out / "unix", log=lambda *a: None, lines=lines)
        files += [(flash.FIRMWARE / n, n) for n in flash.FW_FILES]
        files += flash.build_app(flash.FIRMWARE / "app.py", b, out / "app")
        _BUILD[key] = files
    return _BUILD[key]


def make_board(path, config, app=None, arch=None, lines=False, compile_app=False):
    """A board filesystem at path: firmware, unix board.py, config (a dict,
    or text for broken-config tests), app (source text: app.py, as a user
    copies it by hand, imported before app.mpy; compile_app: app.mpy, as
    `microtun flash --app` ships it) or the sample app; compiled for `arch`
    (built_files)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for local, remote in built_files(arch, lines):
        dst = path / remote
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, dst)
    if app is not None:
        (path / "app.py").write_text(app)
        if compile_app:
            flash.compile_app_module(path / "app.py", path / "app.mpy", "app", arch)
            (path / "app.py").unlink()
    if config is not None:
        (path / "microtun.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return path


class Firmware:
    """The firmware in the unix port, without a pty: output collected by a
    thread, stdin open for the REPL."""

    def __init__(self, board_dir, heap="512K", mode="power"):
        self.dir = Path(board_dir)
        shim = self.dir.parent / ("shim_%s.py" % mode)
        shim.write_text(vboard.shim_source(mode))
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [MICROPYTHON, "-X", "heapsize=" + heap, "-i", str(shim), str(self.dir), mode],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            cwd=str(self.dir), env=dict(os.environ, MICROPYPATH=".frozen"), start_new_session=True)
        self.out = b""
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        while True:
            b = self.proc.stdout.read1(4096)
            if not b:
                return
            with self.lock:
                self.out += b

    @property
    def text(self):
        with self.lock:
            return self.out.decode("utf-8", "replace")

    def wait_for(self, pattern, timeout):
        """Seconds since start when the output first matches pattern (regex)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if re.search(pattern, self.text):
                return time.monotonic() - self.t0
            if self.proc.poll() is not None:
                time.sleep(0.1)
                if re.search(pattern, self.text):
                    return time.monotonic() - self.t0
                break
            time.sleep(0.02)
        raise AssertionError("no %r within %.1f s; output:\n%s" % (pattern, timeout, self.text[-3000:]))

    def repl(self, line, expect, timeout=5):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self.wait_for(expect, timeout)

    def interrupt(self):
        os.kill(self.proc.pid, signal.SIGINT)

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.wait(timeout=5)
        self.reader.join(timeout=2)


@pytest.fixture
def running():
    procs = []

    def start(*a, **kw):
        f = Firmware(*a, **kw)
        procs.append(f)
        return f
    yield start
    for f in procs:
        f.stop()


RESET = re.escape(vboard.EXIT_MARKER.decode()) + r"(\d+)"


def device_config(name="dev1", port=9, **extra):
    """A valid device config; with the default port nothing answers (the
    tunnel just keeps trying)."""
    k = bytes(range(32)).hex()
    d = {"name": name, "private_key": k, "gateway_public_key": public_key(bytes(range(32))).hex(),
         "paths": [{"name": "a", "pop": "127.0.0.1:%d" % port, "label": 101, "rx_label": 401, "hop_key": k}],
         "firmware": {"boot_window_ms": 0}}
    d.update(extra)
    return d


# -- safe mode and config errors ------------------------------------------------------------------
BAD_CONFIGS = [
    # (what is wrong, config text, the line we expect in the log)
    ("missing file", None, r"microtun\.json: cannot read the file; provision one"),
    ("not JSON", "{\"name\": ", r"microtun\.json: not valid JSON"),
    ("short key", json.dumps(dict(device_config(), private_key="abcd")),
     r"microtun\.json: private_key: expected 64 hex characters \(a 32-byte key\), got 4 characters"),
    ("no paths", json.dumps(dict(device_config(), paths=[])), r"microtun\.json: paths: expected a non-empty list"),
    ("unknown firmware setting", json.dumps(dict(device_config(), firmware={"boot_windw_ms": 0})),
     r"microtun\.json: firmware\.boot_windw_ms: unknown setting; known: boot_window_ms"),
    ("bad firmware value", json.dumps(dict(device_config(), firmware={"crash_delay_ms": -5})),
     r"microtun\.json: firmware\.crash_delay_ms: expected a whole number of ms \(>= 0\), got -5"),
]


@pytest.mark.parametrize("what,text,line", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_config_error_is_one_line_and_the_repl(tmp_path, running, what, text, line):
    d = make_board(tmp_path / "board", text)
    fw = running(d)
    fw.wait_for(r"microtun error: safe mode: config: " + line, 10)
    fw.repl("print('REPL', 6 * 7)", r"REPL 42")
    log = (d / "microtun.log").read_text()
    errors = [l for l in log.splitlines() if " error " in l]
    assert len(errors) == 1 and re.search(line, errors[0]), log
    assert "Traceback" not in fw.text, fw.text
    assert not re.search(RESET, fw.text)                # no reset, no loop
    assert "session" not in fw.text and "network up" not in fw.text


@pytest.mark.parametrize("name", ["SAFE", "safe_mode"])
def test_sentinel_file_is_safe_mode(tmp_path, running, name):
    d = make_board(tmp_path / "board", device_config())
    (d / name).write_text("")
    fw = running(d)
    fw.wait_for(r"safe mode: the file %s exists \(remove it: mpremote rm :%s\)" % (name, name), 10)
    fw.repl("import os; print(sorted(os.listdir('/')))", r"'%s'" % name)
    assert "network up" not in fw.text
    assert "boot safe mode: the file %s exists" % name in (d / "microtun.log").read_text()


def test_ctrl_c_in_the_boot_window_is_safe_mode(tmp_path, running):
    d = make_board(tmp_path / "board", device_config(firmware={"boot_window_ms": 5000}))
    fw = running(d)
    fw.wait_for(r"starting in 5\.0 s; Ctrl-C for safe mode", 10)
    fw.interrupt()
    fw.wait_for(r"safe mode: Ctrl-C during the boot window", 5)
    fw.repl("print('still here')", r"still here")
    assert fw.proc.poll() is None and "network up" not in fw.text


def test_ctrl_c_while_running_drops_to_the_repl(tmp_path, running):
    d = make_board(tmp_path / "board", device_config())
    fw = running(d)
    fw.wait_for(r"network up", 10)
    time.sleep(0.3)
    fw.interrupt()
    fw.wait_for(r"stopped by Ctrl-C; the REPL is yours", 5)
    fw.repl("print('at the REPL')", r"at the REPL")
    assert "Traceback" not in fw.text
    # what of the firmware's own code stayed loaded while the tunnel ran: the
    # loop only (start-up dropped; the loader, with no /ota, and the rare
    # paths never loaded: a loaded module's names stay in the heap for good)
    fw.repl("import sys; print('FW', sorted(m for m in sys.modules if m.startswith('microtun_')))",
            r"FW \['microtun_fw'\]")


def test_watchdog_is_opt_in_and_missing_on_the_unix_port(tmp_path, running):
    d = make_board(tmp_path / "board", device_config(watchdog_s=5))
    fw = running(d)
    fw.wait_for(r"microtun warn: watchdog_s is set but this port has no machine\.WDT; running without it", 10)
    fw.wait_for(r"network up", 5)
    assert "watchdog_s is set" in (d / "microtun.log").read_text()


# -- fatal errors -------------------------------------------------------------------------------------
CRASHING_APP = """
class App:
    def __init__(self, tunnel, settings, board, log):
        raise RuntimeError("sensor on fire")
"""


def test_fatal_error_is_logged_then_a_growing_delay_then_reset(tmp_path, running):
    # compiled, as `microtun flash --app` ships it: its traceback still names the line
    d = make_board(tmp_path / "board", device_config(firmware={"boot_window_ms": 0, "crash_delay_ms": 400}),
                   app=CRASHING_APP, compile_app=True)
    assert not (d / "app.py").exists()
    delays = []
    for n in (1, 2, 3):
        fw = running(d, mode="power" if n == 1 else "hard")     # as vboard restarts after machine.reset()
        logged = fw.wait_for(r"fatal error %d in a row; reset in" % n, 10)
        reset = fw.wait_for(RESET, 10)
        assert re.search(RESET, fw.text).group(1) == "3"          # machine.reset()
        delays.append(reset - logged)
        fw.stop()
    # 0.4 s, 0.8 s, 1.6 s: doubling, never a tight loop
    for got, want in zip(delays, (0.4, 0.8, 1.6)):
        assert want - 0.05 <= got <= want + 1.0, delays
    log = (d / "microtun.log").read_text()
    assert log.count("RuntimeError: sensor on fire") == 3, log
    assert 'File "app.py", line 4, in __init__' in log
    assert "boot 3 on unix (hard reset), after 2 fatal error(s) in a row" in log
    assert (d / "microtun_fw.txt").read_text().split() == ["3", "3"]


def test_fatal_error_resets_even_without_microtun_rare(tmp_path, running):
    """The fatal path loads microtun_rare; if that fails, the board still
    waits crash_delay_ms and resets rather than stop at the REPL."""
    d = make_board(tmp_path / "board", device_config(firmware={"boot_window_ms": 0, "crash_delay_ms": 300}),
                   app=CRASHING_APP)
    (d / "lib" / "microtun_rare.mpy").unlink()
    fw = running(d)
    logged = fw.wait_for(r"fatal error RuntimeError\('sensor on fire',\); cannot load microtun_rare", 10)
    reset = fw.wait_for(RESET, 10)
    assert re.search(RESET, fw.text).group(1) == "3" and reset - logged >= 0.25


def test_crash_delay_is_capped(tmp_path, running):
    d = make_board(tmp_path / "board", device_config(
        firmware={"boot_window_ms": 0, "crash_delay_ms": 100, "crash_delay_max_ms": 300}), app=CRASHING_APP)
    (d / "microtun_fw.txt").write_text("40 30\n")                # 30 fatal errors in a row so far
    fw = running(d)
    fw.wait_for(r"fatal error 31 in a row; reset in 0\.300 s", 10)
    fw.wait_for(RESET, 5)


def test_log_rotates_between_two_small_files(tmp_path):
    d = make_board(tmp_path / "board", None)
    script = (
        "import microtun_fw as f\n"
        "log = f.Log(7, max_bytes=600)\n"
        "for i in range(60):\n"
        "    log('warn', 'line %d of the rotation test' % i)\n"
        "    log('info', 'console only %d' % i)\n"
        "for i in range(5):\n"
        "    log('warn', 'same again')\n"
        "log('error', 'last')\n")
    r = subprocess.run([MICROPYTHON, "-c", script], cwd=str(d), env=dict(os.environ, MICROPYPATH="lib"),
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stdout + r.stderr
    cur, old = (d / "microtun.log").read_text(), (d / "microtun.log.1").read_text()
    assert len(cur) <= 600 and len(old) <= 600
    assert not (d / "microtun.log.2").exists()
    assert "line 59 of the rotation test" in old + cur and "console only" not in old + cur
    assert cur.count("same again") == 1 and "(previous line repeated 4 times)" in cur
    assert cur.rstrip().endswith("error last") and cur.startswith("#7 +")


WIFI_CASES = [
    ({"ssid": "home", "password": "correct horse"}, None),
    ({"ssid": "cafe", "password": ""}, None),
    ({}, r"network\.ssid: missing; this board joins Wi-Fi"),
    ({"ssid": "x" * 33, "password": "12345678"}, r"network\.ssid: expected 1\.\.32 characters"),
    ({"ssid": "home", "password": "short"}, r"network\.password: expected \"\" \(open network\) or 8\.\.64"),
    ({"ssid": "home", "password": 12345678}, r"network\.password"),
]


def test_wifi_settings_are_checked_before_anything_starts(tmp_path):
    d = make_board(tmp_path / "board", None)
    # and the join each Wi-Fi board's board.py imports is where it looks for it
    joins = sorted({n.module for f in flash.BOARDS.glob("*/board.py") for n in ast.walk(ast.parse(f.read_text()))
                    if isinstance(n, ast.ImportFrom) and any(a.name == "wifi_connect" for a in n.names)})
    assert joins
    script = "".join("from %s import wifi_connect\n" % m for m in joins) + (
        "import microtun_boot as b, json\nfor c in %s:\n    print('R', json.dumps(b.check_wifi(c)))\n" % (
            json.dumps([c for c, _ in WIFI_CASES]),))
    r = subprocess.run([MICROPYTHON, "-c", script], cwd=str(d), env=dict(os.environ, MICROPYPATH="lib"),
                       capture_output=True, text=True, timeout=20)
    got = [json.loads(l[2:]) for l in r.stdout.splitlines() if l.startswith("R ")]
    assert len(got) == len(WIFI_CASES), r.stdout + r.stderr
    for (case, want), g in zip(WIFI_CASES, got):
        if want is None:
            assert g is None, (case, g)
        else:
            assert g and re.search(want, g), (case, g)


# -- the rig: two PoPs, a gateway, services ----------------------------------------------------------
class Service(threading.Thread):
    """A gateway-side UDP service: records (time, data, addr); echo=True
    sends each datagram back; replies[data] = answer sends that instead."""

    def __init__(self, port, echo=False):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", port))
        self.sock.settimeout(0.2)
        self.echo = echo
        self.got = []
        self.stopped = False

    def run(self):
        while not self.stopped:
            try:
                data, addr = self.sock.recvfrom(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.got.append((time.monotonic(), data, addr))
            if self.echo:
                self.sock.sendto(data, addr)

    def send(self, data, addr):
        self.sock.sendto(data, addr)

    def wait(self, pred, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for t, d, a in list(self.got):
                if pred(d):
                    return t, d, a
            time.sleep(0.02)
        raise AssertionError("service got nothing matching within %.1f s: %r" % (timeout, self.got[-5:]))

    def close(self):
        self.stopped = True
        self.sock.close()


class Rig:
    """device -> pop1 -> pop2 -> gateway (path a) and device -> pop2 -> pop1
    -> gateway (path b), every hop with its own key, as /tmp/e2e/gen.py
    does for one path. Services: channel 1 echo, channel 2 commands."""

    def __init__(self, where, device="dev1"):
        self.dir = Path(where)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.device = device
        p1, p2, gw, echo, cmd = free_ports(5)
        r = os.urandom
        dev_priv, gw_priv, psk = r(32), r(32), r(32)
        k_d1, k_d2, k_12, k_1g, k_2g = (r(32).hex() for _ in range(5))
        a = "127.0.0.1:%d".__mod__
        self.pops = {
            "pop1": {"name": "pop1", "listen": a(p1), "routes": [
                {"in_label": 101, "in_key": k_d1, "next": a(p2), "out_label": 201, "out_key": k_12},
                {"in_label": 102, "in_key": k_12, "next": "learn:101", "out_label": 401, "out_key": k_d1},
                {"in_label": 111, "in_key": k_12, "next": a(gw), "out_label": 311, "out_key": k_1g},
                {"in_label": 112, "in_key": k_1g, "next": a(p2), "out_label": 212, "out_key": k_12}]},
            "pop2": {"name": "pop2", "listen": a(p2), "routes": [
                {"in_label": 201, "in_key": k_12, "next": a(gw), "out_label": 301, "out_key": k_2g},
                {"in_label": 202, "in_key": k_2g, "next": a(p1), "out_label": 102, "out_key": k_12},
                {"in_label": 211, "in_key": k_d2, "next": a(p1), "out_label": 111, "out_key": k_12},
                {"in_label": 212, "in_key": k_12, "next": "learn:211", "out_label": 402, "out_key": k_d2}]},
        }
        self.control = str(self.dir / "gw.sock")     # owner-only control socket (docs/CONFIG.md)
        self.gateway = {
            "name": "gw", "listen": a(gw), "control": self.control, "private_key": gw_priv.hex(),
            "registry": str(self.dir / "registry.json"),
            "links": [{"name": "%s/a" % device, "in_label": 301, "reply_label": 202, "key": k_2g, "next": a(p2)},
                      {"name": "%s/b" % device, "in_label": 311, "reply_label": 112, "key": k_1g, "next": a(p1)}],
            "services": {"1": a(echo), "2": a(cmd)}}
        self.registry = {"devices": [{"name": device, "public_key": public_key(dev_priv).hex(), "psk": psk.hex(),
                                      "channels": [1, 2]}]}
        self.device_config = {
            "name": device, "private_key": dev_priv.hex(), "gateway_public_key": public_key(gw_priv).hex(),
            "psk": psk.hex(), "policy": "best",
            "paths": [{"name": "a", "pop": a(p1), "label": 101, "rx_label": 401, "hop_key": k_d1},
                      {"name": "b", "pop": a(p2), "label": 211, "rx_label": 402, "hop_key": k_d2}],
            "app": {"telemetry_s": 1, "health_s": 2, "alarm_above": 0},
            "firmware": {"boot_window_ms": 200}}
        for name, d in list(self.pops.items()) + [("gateway", self.gateway), ("registry", self.registry)]:
            (self.dir / (name + ".json")).write_text(json.dumps(d, indent=1))
        (self.dir / "deploy" / "devices").mkdir(parents=True, exist_ok=True)
        (self.dir / "deploy" / "devices" / (device + ".json")).write_text(json.dumps(self.device_config, indent=1))
        self.echo = Service(echo, echo=True)
        self.cmd = Service(cmd)
        self.procs = []

    def start(self):
        env = dict(os.environ, PYTHONPATH=str(ROOT / "lib"))
        for name in self.pops:
            self.procs.append(subprocess.Popen(
                [PY, "-m", "microtun_host.cli", "pop", "--config", str(self.dir / (name + ".json"))],
                stdout=open(self.dir / (name + ".log"), "wb"), stderr=subprocess.STDOUT, env=env,
                start_new_session=True))
        self.procs.append(subprocess.Popen(
            [PY, "-m", "microtun_host.gateway", "--config", str(self.dir / "gateway.json")],
            stdout=open(self.dir / "gateway.log", "wb"), stderr=subprocess.STDOUT, env=env, start_new_session=True))
        self.echo.start()
        self.cmd.start()
        end = time.monotonic() + 15
        while True:
            try:
                control.query(self.control, {"cmd": "ping"}, timeout=0.3)
                return self
            except control.ControlError:
                if time.monotonic() > end or any(p.poll() is not None for p in self.procs):
                    self.stop()          # the fixture never reaches its teardown: no PoP left behind
                    raise AssertionError("the gateway did not come up:\n" + (self.dir / "gateway.log").read_text())

    def status(self):
        return control.query(self.control, {"cmd": "status"}, timeout=2.0)["status"]

    def wait_established(self, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for d in self.status()["devices"]:
                if d.get("name") == self.device and d.get("established"):
                    return d
            time.sleep(0.1)
        raise AssertionError("%s not established at the gateway: %r" % (self.device, self.status()))

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.echo.close()
        self.cmd.close()


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path / "rig").start()
    yield r
    r.stop()


def test_firmware_connects_through_two_pops(tmp_path, rig, running):
    """The whole firmware on the unix port, straight from a board directory:
    session, telemetry echoed, critical alarm, a command answered."""
    d = make_board(tmp_path / "board", rig.device_config)
    fw = running(d, heap=WORKING_HEAP)
    t_up = fw.wait_for(r"session up \d+ ms after boot", 15)
    st = rig.wait_established(5)
    t, data, addr = rig.echo.wait(lambda d: d.startswith(b'{"') and b'"n": 1' in d, 5)
    assert json.loads(data)["temp"] is not None
    rig.echo.wait(lambda d: b'"alarm": "temp"' in d, 5)            # the critical copy got through (once)
    _, hello, caddr = rig.cmd.wait(lambda d: b'"hello"' in d, 5)
    assert json.loads(hello) == {"hello": "dev1", "boot": 1}
    rig.cmd.send(b"ping", caddr)
    rig.cmd.wait(lambda d: d == b"pong", 5)
    fw.wait_for(r"path a is up", 5)
    fw.wait_for(r"path b is up", 5)
    fw.wait_for(r"app: health: session up; a up", 5)
    assert len({p["link"] for p in rig.wait_established(1)["paths"]}) >= 1
    assert "MemoryError" not in fw.text and "Traceback" not in fw.text
    assert t_up < 10 and st["established"]


def test_firmware_answers_ops_and_mpremote_through_the_tunnel(tmp_path, running):
    """The firmware with "ops": true (docs/OPS.md): an operator reaches the
    board's files and log through the gateway, mpremote runs on it through
    the bridge, and an ops reboot resets the board (the unix port's exit 3)."""
    from microtun_host.changelog import OperatorKey
    from microtun_host.ops import OpsClient
    from harness import mpremote_bridge
    key_path = str(tmp_path / "op.key")
    key = OperatorKey.generate(key_path)
    r = Rig(tmp_path / "rig")
    r.gateway["operators"] = [key.public.hex()]
    r.registry["devices"][0]["ops"] = True
    for name, d in (("gateway", r.gateway), ("registry", r.registry)):
        (r.dir / (name + ".json")).write_text(json.dumps(d))
    r.start()
    try:
        d = make_board(tmp_path / "board", dict(r.device_config, ops=True))
        fw = running(d, heap=WORKING_HEAP)
        fw.wait_for(r"session up \d+ ms after boot", 15)
        c = OpsClient.connect(r.control, "dev1", operator_key=key_path)
        assert c.exec("import os\nprint(sorted(os.listdir('/'))[:3])").startswith("['app.mpy', 'board.mpy'")
        assert "session up" in c.logs(0)[1]          # the firmware's own lines are in the ring
        c.put("note.txt", b"from afar\n")
        assert (d / "note.txt").read_bytes() == b"from afar\n"
        url = mpremote_bridge(c)
        mp = subprocess.run([str(Path(PY).with_name("mpremote")), "connect", url, "fs", "cat", "note.txt"],
                            capture_output=True, text=True, timeout=30)
        assert mp.returncode == 0 and mp.stdout == "from afar\n", (mp.stdout, mp.stderr)
        c.reboot()
        fw.wait_for(RESET.replace(r"(\d+)", "3"), 10)
        assert "reboot asked for over the ops channel" in (d / "microtun.log").read_text()
    finally:
        r.stop()


# -- figures -------------------------------------------------------------------------------------------
def _trial(rig, base, heap, seconds):
    """Run the firmware with `heap` for `seconds`: (ok, details). Every
    trial is a reboot of the same device: the boot counter carries over
    (without it the gateway rightly refuses the handshake as stale)."""
    d = base / "board"
    make_board(d, dict(rig.device_config, app={"telemetry_s": 1, "health_s": 1},
                       firmware={"boot_window_ms": 0}))
    n0 = len(rig.echo.got)
    fw = Firmware(d, heap=heap)
    try:
        time.sleep(seconds)
    finally:
        fw.stop()
    text = fw.text
    got = [(t, x) for t, x, _ in rig.echo.got[n0:] if t >= fw.t0]
    up = re.search(r"session up (\d+) ms after boot, (\d+) X25519 operations, heap used (\d+)", text)
    used = [int(x) for x in re.findall(r"health: .*heap used (\d+)", text)]
    ok = up is not None and len(got) >= seconds - 2 and "MemoryError" not in text
    return ok, {"heap": heap, "first_delivered_s": round(got[0][0] - fw.t0, 3) if got else None,
                "session_up_ms": int(up.group(1)) if up else None, "x25519": int(up.group(2)) if up else None,
                "used_at_session_up": int(up.group(3)) if up else None,
                "steady_used_max": max(used) if used else None,
                "steady_used_last": used[-1] if used else None, "delivered": len(got),
                "memory_error": "MemoryError" in text}


MODULE_COST = """
import gc, sys
gc.collect()
base = gc.mem_alloc()
prev = base
for m in %r:
    __import__(m)
    gc.collect()
    a = gc.mem_alloc()
    print("COST", m, a - prev)
    prev = a
print("COST total", prev - base)
"""


def _leaf_first(mods):
    """microtun modules ordered so that each comes after what it imports."""
    out, seen = [], set()

    def visit(m):
        if m in seen:
            return
        seen.add(m)
        for d in sorted(flash._imports(flash.LIB / (m + ".py"))):
            if d in mods:
                visit(d)
        out.append(m)
    for m in sorted(mods):
        visit(m)
    return out


def module_costs(board_dir):
    """Heap bytes each import takes (unix port, 64-bit): the firmware's own
    imports in its order, then the modules the tunnel really loads, leaf
    first, so each figure is that module alone."""
    env = dict(os.environ, MICROPYPATH=":lib")

    def run(order):
        r = subprocess.run([MICROPYTHON, "-X", "heapsize=1M", "-c", MODULE_COST % order], cwd=str(board_dir),
                           env=env, capture_output=True, text=True, timeout=30)
        return [(l.split()[1], int(l.split()[2])) for l in r.stdout.splitlines() if l.startswith("COST ")]
    firmware = run(["microtun_fw", "microtun_boot", "board", "app", "microtun.config", "microtun.driver"])
    r = subprocess.run([MICROPYTHON, "-c", "import sys, microtun.driver, microtun.config\n"
                        "print(' '.join(k[9:] for k in sys.modules if k.startswith('microtun.')))"],
                       cwd=str(board_dir), env=env, capture_output=True, text=True, timeout=30)
    loaded = set(r.stdout.split())
    return firmware, run(["microtun"] + ["microtun." + m for m in _leaf_first(loaded)])


def figures(seconds=8):
    from microtun_host import scratch
    base = Path(scratch.mkdtemp("microtun-figures-"))     # keys: removed on any exit
    rig = Rig(base / "rig").start()
    try:
        total, dev_total = flash.build_bundle(base / "mpy", log=lambda *a: None)
        print("portable package .mpy total: %d B (all %d modules); shipped to a cryptolib board: %d B"
              % (total, len(list(flash.LIB.glob("*.py"))), dev_total))
        d = make_board(base / "costs", rig.device_config)
        firmware, modules = module_costs(d)
        print("heap taken by each import, in the firmware's order: %s" % ", ".join("%s %d" % c for c in firmware))
        print("  the tunnel's modules alone, largest first: %s" % ", ".join(
            "%s %d" % c for c in sorted(modules, key=lambda c: -c[1])))
        for heap in ("64K", WORKING_HEAP):
            ok, r = _trial(rig, base, heap, seconds)
            print("heap %s: %s %s" % (heap, "works" if ok else "FAILS", json.dumps(r)))
        lo, hi = 64, int(WORKING_HEAP[:-1])
        while hi - lo > 8:
            mid = (lo + hi) // 2 // 8 * 8
            ok, r = _trial(rig, base, "%dK" % mid, seconds)
            print("  %dK: %s" % (mid, "works" if ok else "fails"))
            if ok:
                hi = mid
            else:
                lo = mid
        print("smallest heap that works (8K steps, %d s runs): %dK" % (seconds, hi))
    finally:
        rig.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["figures"]:
        figures()
    else:
        print(__doc__)
