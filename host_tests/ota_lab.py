"""Code-over-the-air scenarios with real processes on loopback, shared by
host_tests/test_update.py (bounds) and tools/bench_update.py (figures).

A unix-port board directory as `microtun flash` leaves it (firmware, the
loader, the package as .mpy, the sample app, a config trusting the test's
operator key), its firmware process, two PoPs and a gateway (the rig of
test_firmware.py), optionally a link emulator with loss in front of each
PoP. Releases are the same compiled file set, signed, some with a planted
fault:

    good        the same code, a new version
    no_connect  a handshake that no gateway accepts (the Noise protocol
                name changed): it runs, but never reaches the gateway
    raises      app.py raises at import
    fw_raises   microtun_fw.mpy raises at import (main.py's path)
    hangs       app.py loops forever at import

`client_factory(device)` makes the client update_device talks to: the
test-only DirClient by default (host_tests/otadev.py); the lead passes the
real OpsClient's factory after the merge.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "lib"))
sys.path.insert(0, str(ROOT / "tools"))

import otadev                                           # noqa: E402
from test_firmware import Rig, make_board, built_files  # noqa: E402
from microtun_host import flash, release                # noqa: E402
from microtun_host.changelog import OperatorKey         # noqa: E402
from microtun_host.localnet import free_ports           # noqa: E402

STEPS = ("begin", "manifest", "check", "file", "arm")     # where a staging power cut lands
FAULTS = ("good", "no_connect", "raises", "fw_raises", "hangs")
TRIAL_S = 8                  # a good test release's deadline to reach the gateway (a loaded machine)
FAULT_TRIAL_S = 3            # a faulty one's: the tests wait it out


def release_files(fault="good"):
    """[(device path, bytes)]: what `microtun flash` put on the unix board,
    minus the reserved files, with the fault planted."""
    files = []
    for local, remote in built_files():
        if remote in release.RESERVED:
            continue
        files.append((remote, Path(local).read_bytes()))
    files = dict(files)
    if fault == "no_connect":
        src = (ROOT / "lib" / "microtun" / "handshake.py").read_text()
        assert 'b"Noise_IKpsk2_25519_AESCCM_SHA256"' in src
        src = src.replace('b"Noise_IKpsk2_25519_AESCCM_SHA256"', 'b"Noise_IKpsk2_25519_AESCCM_SHA257"')
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "handshake.py"
            p.write_text(src)
            flash.compile_mpy(p, Path(tmp) / "handshake.mpy", "microtun/handshake.py", "x64")
            files["lib/microtun/handshake.mpy"] = (Path(tmp) / "handshake.mpy").read_bytes()
    elif fault in ("raises", "hangs"):       # an app.py in the release, in place of its app.mpy
        del files["app.mpy"]
        files["app.py"] = (b"raise RuntimeError('release bug: app.py raises at import')\n" if fault == "raises"
                           else b"while True:\n    pass\n") + (flash.FIRMWARE / "app.py").read_bytes()
    elif fault == "fw_raises":
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "microtun_fw.py"
            p.write_text("raise ImportError('release bug: microtun_fw raises at import')\n")
            flash.compile_mpy(p, Path(tmp) / "fw.mpy", "microtun_fw.py", "x64")
            files["lib/microtun_fw.mpy"] = (Path(tmp) / "fw.mpy").read_bytes()
    elif fault != "good":
        raise ValueError(fault)
    return sorted(files.items())


class Netem:
    """tools/netem.py as a process: listen -> upstream with loss both ways."""

    def __init__(self, upstream_port, loss, seed):
        self.port, = free_ports(1)
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tools" / "netem.py"), "--listen", "127.0.0.1:%d" % self.port,
             "--upstream", "127.0.0.1:%d" % upstream_port, "--loss", str(loss), "--seed", str(seed)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Lab:
    """Rig + operator key + one board + its firmware process + a client."""

    def __init__(self, where, loss=0.0, client_factory=None, heap="512K", trial_s=TRIAL_S, log=None, ops=False,
                 fault_trial_s=FAULT_TRIAL_S):
        """ops=True: the device's client is the real OpsClient through the
        gateway and the tunnel (the device and the registry allow ops, the
        gateway trusts the operator key), so the files cross the lossy link.
        fault_trial_s: the trial of a release that never connects (waited out)."""
        self.dir = Path(where)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = OperatorKey.generate(str(self.dir / "operator.key"))
        self.rig = Rig(self.dir / "rig")
        if ops:
            self.rig.gateway["operators"] = [self.key.public.hex()]
            self.rig.registry["devices"][0]["ops"] = True
            for name, d in (("gateway", self.rig.gateway), ("registry", self.rig.registry)):
                (self.rig.dir / (name + ".json")).write_text(json.dumps(d))
            from microtun_host.ops import OpsClient
            key_path = str(self.dir / "operator.key")
            client_factory = lambda device: OpsClient.connect(self.rig.control, "dev1", operator_key=key_path)  # noqa: E731
        self.rig.start()
        self.netems = []
        self.trial_s = trial_s
        self.fault_trial_s = fault_trial_s
        try:
            cfg = json.loads(json.dumps(self.rig.device_config))
            if ops:
                cfg["ops"] = True
            if loss:
                for i, p in enumerate(cfg["paths"]):
                    ne = Netem(int(p["pop"].rsplit(":", 1)[1]), loss, seed=i + 1)
                    self.netems.append(ne)
                    p["pop"] = "127.0.0.1:%d" % ne.port
            cfg["firmware"] = {"boot_window_ms": 0, "crash_delay_ms": 100}
            cfg["app"] = {"telemetry_s": 5, "health_s": 60, "alarm_above": 1000}
            cfg["update"] = {"operators": [self.key.public.hex()]}
            self.config = cfg
            self.board = make_board(self.dir / "board", cfg)
            self.device = otadev.Device(self.board, heap=heap, log=log)
            if ops:
                ok, _ = settle_up(self.device, 60)     # the ops login needs the device's session
                if not ok:
                    raise RuntimeError("the device did not come up: %s" % self.device.text[-2000:])
            self.client = (client_factory or otadev.DirClient)(self.device)
        except BaseException:
            self.close()
            raise
        self._releases = {}
        self.n = 0

    def bundle(self, fault="good", version=None):
        self.n += 1
        files = self._releases.get(fault)
        if files is None:
            files = self._releases[fault] = release_files(fault)
        trial = self.trial_s if fault in ("good", "raises", "fw_raises") else min(self.trial_s, self.fault_trial_s)
        return release.Bundle.build(files, version or "r%d-%s" % (self.n, fault), self.key, trial)

    def status(self):
        return release.device_call(self.client, "status()")

    def close(self):
        d = getattr(self, "device", None)
        if d is not None:
            d.close()
        for ne in self.netems:
            ne.stop()
        self.rig.stop()


def settle_up(device, timeout):
    """Power on and wait for the tunnel: (up, None)."""
    device.power_on()
    return device.wait_up(timeout), None


def settle(lab, timeout=30.0):
    """Power the device on if it is off; wait until its tunnel is up and no
    trial is pending: (up, status). 'up' False is a bricked device."""
    lab.device.power_on()
    end = time.monotonic() + timeout
    st = None
    while time.monotonic() < end:
        if lab.device.wait_up(min(1.0, max(0.05, end - time.monotonic()))):
            try:
                st = lab.status()
            except (release.Refused, otadev.OpsError, OSError):
                continue
            if st["trial"] is None and st["running"] == st["committed"]:
                return True, st
        time.sleep(0.05)
    return False, st


def power_cut_soak(lab, points, seed=1, say=lambda m: None):
    """Power cuts at `points` random moments of an update: half during
    staging (inside a put or an exec: begin, check, the files, arm), half
    during the switch-over (the device loses power at a random moment of
    the reboot into the new set). After each, power on: the device must
    come back on a working code set (its tunnel up, old or new release).
    Returns a list of per-point dicts."""
    rng = random.Random(seed)
    out = []
    base_client = lab.client
    for i in range(points):
        b = lab.bundle("good")
        n_ops = 4 + len(b.files) + 1          # begin, 2 puts, check, the files, arm
        ok0, before = settle(lab)
        if i % 2 == 0:
            where = "staging"
            lab.client = otadev.DirClient(lab.device)
            # every step in turn: begin, the manifest, check, a file, arm; where inside it is random
            step = STEPS[(i // 2) % len(STEPS)]
            op = {"begin": 1, "manifest": rng.randint(2, 3), "check": 4,
                  "file": rng.randint(5, n_ops - 1), "arm": n_ops}[step]
            lab.client.cut = otadev.Cut(op, rng.random())
            what = "%s (op %d/%d) at %.0f %%" % (step, op, n_ops, 100 * lab.client.cut.frac)
        else:
            where = "switch-over"
            delay = rng.uniform(0.0, 1.2)
            lab.client = otadev.FlickerClient(lab.device, delay)
            what = "%.0f ms after the reboot" % (1000 * delay)
        r = release.update_device(lab.client, b, timeout_s=3 * lab.trial_s + 20)
        if where == "switch-over":
            # a device that commits sooner than the delay gets its cut after the
            # update returned: wait for it here, or it lands in the next point
            lab.client.wait_flicker()
        up, st = settle(lab)
        versions = (before or {}).get("running_version"), b.version
        good = up and st is not None and (st["running_version"] in versions or st["running_version"] == "")
        out.append({"point": i + 1, "where": where, "cut": what, "update": r.status, "up": up,
                    "running": None if st is None else st["running_version"], "ok": bool(good)})
        say("cut %2d %-11s %-26s update %-11s -> %s" % (i + 1, where, what, r.status,
                                                        "up on %s" % st["running_version"] if up else "BRICKED"))
    lab.client = base_client
    lab.client.ops = 0
    return out
