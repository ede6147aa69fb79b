"""TEST ONLY: a stand-in for microtun_host.ops.OpsClient over a unix-port
device that is a directory plus a firmware process, for the update tests
and tools/bench_update.py. It is not the ops channel: files move by plain
file writes on the host, exec runs a second MicroPython process in the
board directory, reboot kills and restarts the firmware. What it keeps of
a real device: the device's own code (firmware/, lib/microtun/update.py,
the loader) runs unmodified on the unix port, the firmware reaches a real
gateway through real PoPs, and a power cut is a SIGKILL at any moment.

    dev = Device(board_dir)            # starts the firmware; a reset or a crash restarts it, as power would
    client = DirClient(dev)            # put/get/ls/exec/health/reboot/wait_up/close, as OpsClient
    client.cut = Cut(op=7, frac=0.4)   # power cut during the 7th put or exec, 40 % of the way in

The contract (the lead swaps in the real OpsClient): put(path, data,
progress=None), get(path), ls(path), exec(code) -> printed output (raises
with the device traceback), health() -> dict, reboot(), wait_up(timeout)
-> True once the device's tunnel is up again, close().
"""
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tools"))
sys.path.insert(0, str(ROOT / "lib"))

import vboard                                     # noqa: E402
from microtun_host import ops as host_ops         # noqa: E402

MICROPYTHON = str(Path(sys.executable).with_name("micropython"))
UP = "session up"
EXIT = vboard.EXIT_MARKER.decode()

EXEC_SHIM = r'''
import sys, os
_root, _code = sys.argv[1], sys.argv[2]
with open(_code) as _f:
    _src = _f.read()
os.umount("/")
os.mount(os.VfsPosix(_root), "/")
os.chdir("/")
sys.path.clear()
sys.path.extend(["", ".frozen", "/lib"])
try:                        # import from the set the firmware runs, as an exec inside it would
    import microtun_slot as _s
    _r = _s.read()
    _s._use(_r[2] if _r[2] != _s.NONE and _r[3] > 0 else _r[1])
    del sys.modules["microtun_slot"], _s, _r
except ImportError:
    pass
exec(compile(_src, "<exec>", "exec"), {"__name__": "__main__"})
'''


class OpsError(host_ops.OpsError):
    """What the real client raises (and release.update_device catches);
    here: exec raised on the device, the device is off, or a timeout."""


class PowerCut(OSError):
    """The injected power cut happened during this operation."""


class Cut:
    """Cut the power during the op-th put or exec (1-based), frac of the way in."""

    def __init__(self, op, frac):
        self.op = op
        self.frac = frac


class Device:
    """The firmware process of one unix-port board directory, restarted
    whenever it resets or dies while powered."""

    def __init__(self, board_dir, heap="512K", log=None):
        self.dir = Path(board_dir)
        self.heap = heap
        self.shim_dir = Path(tempfile.mkdtemp(prefix="otadev-"))
        self.shim = self.shim_dir / "shim.py"
        self.shim.write_text(vboard.shim_source("power"))
        self.exec_shim = self.shim_dir / "exec_shim.py"
        self.exec_shim.write_text(EXEC_SHIM)
        self.lock = threading.RLock()
        self.proc = None
        self.out = b""              # this boot's console
        self.history = []           # every boot's console (text)
        self.boots = 0
        self.powered = False
        self.closed = False
        self.logf = open(log, "ab") if log else None
        self.power_on()
        self.watcher = threading.Thread(target=self._watch, daemon=True)
        self.watcher.start()

    # -- power ---------------------------------------------------------------------------
    def _start(self):
        self.proc = subprocess.Popen(
            [MICROPYTHON, "-X", "heapsize=" + self.heap, "-i", str(self.shim), str(self.dir), "power"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(self.dir),
            env=dict(os.environ, MICROPYPATH=".frozen"), start_new_session=True)
        self.out = b""
        self.boots += 1
        threading.Thread(target=self._read, args=(self.proc,), daemon=True).start()

    def _read(self, proc):
        while True:
            b = proc.stdout.read1(4096)
            if not b:
                return
            with self.lock:
                if proc is self.proc:
                    self.out += b
                if self.logf and not self.logf.closed:
                    self.logf.write(b)
                    self.logf.flush()

    def _kill(self):
        p = self.proc
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except OSError:
                pass
            p.wait(timeout=5)
        if p is not None:
            self.history.append(self.text)

    def power_on(self):
        with self.lock:
            if not self.powered:
                self.powered = True
                self._start()

    def power_off(self):
        with self.lock:
            self.powered = False
            self._kill()

    def reset(self):
        with self.lock:
            self._kill()
            self.powered = True
            self._start()

    def _watch(self):
        """A reset (the shim's exit marker) or a dead process: power on again."""
        while not self.closed:
            with self.lock:
                p = self.proc
                if self.powered and p is not None and (p.poll() is not None or EXIT in self.text):
                    self._kill()
                    self._start()
            time.sleep(0.02)

    def close(self):
        self.closed = True
        self.power_off()
        if self.logf:
            with self.lock:
                self.logf.close()
        for f in (self.shim, self.exec_shim):
            try:
                f.unlink()
            except OSError:
                pass
        try:
            self.shim_dir.rmdir()
        except OSError:
            pass

    @property
    def text(self):
        with self.lock:
            return self.out.decode("utf-8", "replace")

    def up(self):
        return UP in self.text

    def wait_up(self, timeout):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.powered and self.up():
                return True
            time.sleep(0.02)
        return False


class DirClient:
    """TEST ONLY: the OpsClient contract over a Device (see the module doc)."""

    def __init__(self, device, exec_timeout=30.0):
        self.dev = device
        self.exec_timeout = exec_timeout
        self.cut = None
        self.ops = 0
        self.rng = random.Random(0)

    def _path(self, path):
        p = (self.dev.dir / path.lstrip("/")).resolve()
        if self.dev.dir.resolve() not in p.parents and p != self.dev.dir.resolve():
            raise OpsError("%s: outside the device's filesystem" % path)
        return p

    def _tick(self):
        """The cut for this op, or None."""
        self.ops += 1
        if self.cut is not None and self.cut.op == self.ops:
            c = self.cut
            self.cut = None
            return c
        return None

    def _alive(self):
        if not self.dev.powered:
            raise OpsError("the device is off")

    def put(self, path, data, progress=None):
        self._alive()
        cut = self._tick()
        p = self._path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            if cut is not None:
                f.write(data[:int(len(data) * cut.frac)])
                f.flush()
                self.dev.power_off()
                raise PowerCut("power cut while writing %s (%d of %d B)" % (path, int(len(data) * cut.frac), len(data)))
            for i in range(0, len(data), 1024):
                f.write(data[i:i + 1024])
                if progress is not None:
                    progress(min(i + 1024, len(data)), len(data))

    def get(self, path):
        self._alive()
        try:
            return self._path(path).read_bytes()
        except OSError as e:
            raise OpsError("%s: %s" % (path, e.strerror))

    def ls(self, path):
        self._alive()
        p = self._path(path)
        try:
            return [(c.name, 0 if c.is_dir() else c.stat().st_size, c.is_dir()) for c in sorted(p.iterdir())]
        except OSError as e:
            raise OpsError("%s: %s" % (path, e.strerror))

    def exec(self, code):
        self._alive()
        cut = self._tick()
        with tempfile.NamedTemporaryFile("w", suffix=".py", dir=str(self.dev.shim_dir), delete=False) as f:
            f.write(code)
        try:
            proc = subprocess.Popen([MICROPYTHON, "-X", "heapsize=1M", str(self.dev.exec_shim), str(self.dev.dir), f.name],
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(self.dev.dir),
                                    env=dict(os.environ, MICROPYPATH=".frozen"), start_new_session=True)
            if cut is not None:
                # the cut lands somewhere in the exec (one takes 0.1-0.6 s here), or just
                # after it if it is done sooner
                try:
                    proc.wait(timeout=0.6 * cut.frac)
                except subprocess.TimeoutExpired:
                    pass
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
                proc.communicate()
                self.dev.power_off()
                raise PowerCut("power cut during exec")
            try:
                out, _ = proc.communicate(timeout=self.exec_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                raise OpsError("exec: no answer within %.0f s" % self.exec_timeout)
        finally:
            os.unlink(f.name)
        text = out.decode("utf-8", "replace")
        if proc.returncode != 0:
            raise OpsError("exec raised on the device:\n" + text.strip())
        return text

    def health(self):
        return {"up": self.dev.up(), "boots": self.dev.boots, "powered": self.dev.powered}

    def reboot(self):
        self._alive()
        self.dev.reset()

    def wait_up(self, timeout):
        return self.dev.wait_up(timeout)

    def close(self):
        self.dev.close()


class FlickerClient(DirClient):
    """Power cuts during the switch-over: after the reboot, the power goes
    off at a random moment within `window` s and comes back at once."""

    def __init__(self, device, delay, **kw):
        super().__init__(device, **kw)
        self.delay = delay
        self.flicker = None

    def wait_flicker(self):
        """Wait until the scheduled cut has happened, so that it lands in
        the update that scheduled it and not in whatever runs next."""
        if self.flicker is not None:
            self.flicker.join()

    def reboot(self):
        super().reboot()
        d = self.delay
        self.delay = None
        if d is not None:
            def flick():
                self.dev.power_off()
                self.dev.power_on()
            t = threading.Timer(d, flick)
            t.daemon = True
            t.start()
            self.flicker = t
