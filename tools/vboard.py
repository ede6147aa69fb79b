"""A virtual MicroPython board: the unix port behind a pseudo-terminal, which
real mpremote drives through the raw REPL exactly as it drives a USB board.

    python tools/vboard.py DIR [--heapsize 64K] [--log FILE] [--link PATH]

DIR is the board's filesystem: it is mounted at "/" inside the board, so
`mpremote fs cp x.mpy :/lib/microtun/` lands in DIR/lib/microtun/. The
serial port path (/dev/pts/N) is the first line on stdout; the board then
runs until vboard gets SIGTERM or SIGINT.

    mpremote connect /dev/pts/N fs ls
    microtun flash --port /dev/pts/N --device sensor-1 --board unix

What it does like a board (docs/FIRMWARE.md, "The virtual board"):

  power-on, reset   the unix port starts: a boot shim mounts DIR at "/", sets
                    sys.path to ['', '.frozen', '/lib'], runs boot.py, then
                    main.py, then the REPL (`micropython -i`)
  Ctrl-C            while Python code runs: a KeyboardInterrupt (vboard sends
                    SIGINT, as a board's UART interrupt would); at a prompt it
                    is an ordinary key, as on a board
  soft reset        Ctrl-D in the raw REPL (mpremote does it when it connects):
                    "soft reboot", boot.py only, back in the raw REPL; Ctrl-D at
                    the friendly REPL or machine.soft_reset(): boot.py + main.py
  machine.reset()   a hard reset: the interpreter process restarts behind the
                    same pty (the shim adds reset() and reset_cause() to machine)

The pty stays open across resets, so mpremote sessions come and go as with a
USB board. Linux only: whether the interpreter is executing Python (Ctrl-C
becomes SIGINT) or waiting at a prompt (Ctrl-C is a key) is read from
/proc/PID/status, because SIGINT at a prompt would kill the unix port.
"""
import argparse
import errno
import fcntl
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tty

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# The interpreter's first output once DIR is mounted and sys.path is set;
# vboard strips it. Until then a Ctrl-C is held back (SIGINT that early would
# be lost, or land before "/" is the board's filesystem).
MARKER = b"\x00vboard-up\x00"
# SystemExit out of boot.py or main.py (machine.reset(), machine.soft_reset(),
# sys.exit()) would land in the REPL under `micropython -i`; the shim prints
# this with the exit code instead and waits to be restarted.
EXIT_MARKER = b"\x00vboard-exit:"
HARD_RESET_EXIT = 3          # machine.reset() in the shim exits with this
RAW_SOFT_RESET_TAIL = b">OK\r\n"   # raw REPL, Ctrl-D on an empty command: the port exits
SIGINT_MIN_INTERVAL = 0.3    # the unix port exits on a second SIGINT before the first is handled
QUICK_EXIT_S = 1.0           # exits sooner than this after start count as a crash loop

# Runs inside the unix port as `micropython -i SHIM DIR MODE`.
SHIM = r'''
import sys, os
_vb_root, _vb_mode = sys.argv[1], sys.argv[2]
os.umount("/")
os.mount(os.VfsPosix(_vb_root), "/")
os.chdir("/")
sys.path.clear()
sys.path.extend(["", ".frozen", "/lib"])
sys.argv.clear()
sys.argv.append("")
import machine as _vb_machine


class _VbMachine:
    PWRON_RESET = 1
    HARD_RESET = 2
    WDT_RESET = 3
    DEEPSLEEP_RESET = 4
    SOFT_RESET = 5

    def __getattr__(self, name):
        return getattr(_vb_machine, name)

    def reset(self):
        raise SystemExit(%(hard)d)

    def reset_cause(self):
        return %(cause)s


sys.modules["machine"] = _VbMachine()
del _VbMachine


def _vb_run(name):
    try:
        with open(name) as f:
            src = f.read()
    except OSError:
        return
    try:
        code = compile(src, name, "exec")
        src = None                      # a board does not keep main.py's text while main.py runs
        exec(code, globals())
    except SystemExit as e:
        code = e.args[0] if e.args and isinstance(e.args[0], int) else (0 if not e.args else 1)
        sys.stdout.write(%(exit)r + str(code) + "\x00")
        import time
        while True:
            time.sleep(1)               # vboard restarts the interpreter
    except BaseException as e:          # a board prints it and goes on to the REPL
        sys.print_exception(e)


sys.stdout.write(%(marker)r)
_vb_run("boot.py")
if _vb_mode != "raw":
    _vb_run("main.py")
del _vb_run, _vb_root, _vb_mode
'''

CAUSES = {"power": "1", "hard": "2", "soft": "5", "raw": "5", "crash": "2"}


def shim_source(mode):
    """The boot shim for `micropython -i SHIM DIR MODE`; MODE is power, hard,
    soft, crash (boot.py + main.py) or raw (boot.py only: a raw-REPL soft
    reset). Tests run it without a pty too."""
    return SHIM % {"hard": HARD_RESET_EXIT, "cause": CAUSES.get(mode, "1"), "marker": MARKER.decode(),
                   "exit": EXIT_MARKER.decode()}


def log(msg, f=None):
    line = "[vboard %s] %s\n" % (time.strftime("%H:%M:%S"), msg)
    sys.stderr.write(line)
    sys.stderr.flush()
    if f is not None:
        f.write(line.encode())
        f.flush()


def sigint_caught(pid):
    """True while the unix port runs Python code: it installs its SIGINT
    handler only around execution and restores SIG_DFL at the prompt."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    except (OSError, ValueError):
        pass
    return False


def _child_setup():
    """In the interpreter before exec: its own session (a Ctrl-C typed at
    vboard's terminal is not the board's), and death with vboard (Linux
    PR_SET_PDEATHSIG), so a killed vboard leaves no firmware running."""
    os.setsid()
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def micropython_default():
    cand = os.path.join(os.path.dirname(sys.executable), "micropython")
    return cand if os.path.exists(cand) else "micropython"


class Board:
    def __init__(self, root, exe, heapsize, logfile=None):
        self.root = os.path.abspath(root)
        self.exe = exe
        self.heapsize = heapsize
        self.logf = open(logfile, "ab") if logfile else None
        self.shim_dir = tempfile.mkdtemp(prefix="vboard-")
        # the client side: mpremote opens the slave; vboard keeps one slave fd
        # too, so the master never sees a hangup between sessions
        self.cm, self.cs = pty.openpty()
        tty.setraw(self.cs)
        os.set_blocking(self.cm, False)
        self.port = os.ttyname(self.cs)
        self.proc = None
        self.bm = None               # master of the interpreter's pty
        self.to_board = b""          # client bytes not yet written to the interpreter
        self.tail = b""
        self.held = b""              # output that may be the start of EXIT_MARKER
        self.exit_code = None        # from EXIT_MARKER
        self.up = False              # MARKER seen
        self.early = b""
        self.pending_sigint = False
        self.last_sigint = 0.0
        self.started = 0.0
        self.quick_exits = 0
        self.boots = 0
        self.stopping = False

    # -- the interpreter -------------------------------------------------------
    def start(self, mode):
        shim = os.path.join(self.shim_dir, "shim_%s.py" % mode)
        with open(shim, "w") as f:
            f.write(shim_source(mode))
        bm, bs = pty.openpty()
        tty.setraw(bs)
        env = dict(os.environ)
        env["MICROPYPATH"] = ".frozen"
        self.proc = subprocess.Popen(
            [self.exe, "-X", "heapsize=" + self.heapsize, "-i", shim, self.root, mode],
            stdin=bs, stdout=bs, stderr=bs, cwd=self.root, env=env, preexec_fn=_child_setup)
        os.close(bs)
        os.set_blocking(bm, False)
        self.bm = bm
        self.to_board = b"\x01" if mode == "raw" else b""   # read by the REPL after boot.py
        self.tail = b""
        self.held = b""
        self.exit_code = None
        self.up = False
        self.early = b""
        self.started = time.monotonic()
        self.boots += 1
        log("boot %d (%s), pid %d, heap %s" % (self.boots, mode, self.proc.pid, self.heapsize), self.logf)

    def stop_child(self):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait()
        if self.bm is not None:
            os.close(self.bm)
            self.bm = None

    def _child_exited(self):
        # drain what it printed last (the tail decides the kind of reset)
        end = time.monotonic() + 0.2
        while self.bm is not None and time.monotonic() < end:
            try:
                data = os.read(self.bm, 4096)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            except OSError:
                break
            if not data:
                break
            self._from_board(data)
        rc = self.proc.returncode if self.exit_code is None else self.exit_code
        os.close(self.bm)
        self.bm = None
        if self.tail.endswith(RAW_SOFT_RESET_TAIL):
            mode, note = "raw", "soft reset from the raw REPL"
            self._to_client(b"MPY: soft reboot\r\n")
        elif rc == 0:
            mode, note = "soft", "soft reset"
            self._to_client(b"MPY: soft reboot\r\n")
        elif rc == HARD_RESET_EXIT:
            mode, note = "hard", "machine.reset()"
        else:
            mode, note = "crash", "interpreter exited with %s" % rc
        quick = time.monotonic() - self.started < QUICK_EXIT_S and mode == "crash"
        self.quick_exits = self.quick_exits + 1 if quick else 0
        log("%s (exit %s)" % (note, rc), self.logf)
        if self.quick_exits >= 3:
            delay = min(5.0, 0.5 * self.quick_exits)
            log("interpreter keeps exiting at start; waiting %.1f s" % delay, self.logf)
            time.sleep(delay)
        self.start(mode)

    # -- bytes both ways -------------------------------------------------------
    def _to_client(self, data):
        try:
            os.write(self.cm, data)
        except BlockingIOError:
            pass                     # nobody reads the port: a UART talking to the void
        except OSError as e:
            if e.errno not in (errno.EIO, errno.EAGAIN):
                raise

    def _from_board(self, data):
        if not self.up:
            self.early += data
            i = self.early.find(MARKER)
            if i < 0:
                return
            data = self.early[:i] + self.early[i + len(MARKER):]
            self.early = b""
            self.up = True
            if self.pending_sigint:
                self.pending_sigint = False
                self._sigint()
        data = self.held + data
        self.held = b""
        i = data.find(EXIT_MARKER)
        if i >= 0:
            end = data.find(b"\x00", i + len(EXIT_MARKER))
            if end < 0:
                self.held = data[i:]
            else:
                try:
                    self.exit_code = int(data[i + len(EXIT_MARKER):end])
                except ValueError:
                    self.exit_code = 1
            data = data[:i]
        else:
            j = data.rfind(b"\x00")
            if j >= 0 and EXIT_MARKER.startswith(data[j:j + len(EXIT_MARKER)]):
                self.held = data[j:]
                data = data[:j]
        if not data:
            return
        self.tail = (self.tail + data)[-256:]
        if self.logf is not None:
            self.logf.write(data)
            self.logf.flush()
        self._to_client(data)

    def _sigint(self):
        now = time.monotonic()
        if now - self.last_sigint < SIGINT_MIN_INTERVAL:
            return
        self.last_sigint = now
        try:
            os.kill(self.proc.pid, signal.SIGINT)
        except OSError:
            pass

    def _from_client(self, data):
        out = bytearray()
        for b in data:
            if b == 3 and self.proc is not None and self.proc.poll() is None:
                if not self.up:
                    self.pending_sigint = True
                    continue
                if sigint_caught(self.proc.pid):
                    self._sigint()
                    continue
            out.append(b)
        self.to_board += bytes(out)

    def _flush_to_board(self):
        if not self.to_board or self.bm is None:
            return
        try:
            n = os.write(self.bm, self.to_board)
            self.to_board = self.to_board[n:]
        except BlockingIOError:
            pass
        except OSError:
            pass

    def run(self):
        self.start("power")
        while not self.stopping:
            rd = [self.cm] + ([self.bm] if self.bm is not None else [])
            wr = [self.bm] if (self.to_board and self.bm is not None) else []
            try:
                r, w, _ = select.select(rd, wr, [], 0.05)
            except InterruptedError:
                continue
            if self.cm in r:
                try:
                    data = os.read(self.cm, 4096)
                except (BlockingIOError, OSError):
                    data = b""
                if data:
                    self._from_client(data)
            if self.bm is not None and self.bm in r:
                try:
                    data = os.read(self.bm, 4096)
                except BlockingIOError:
                    data = None
                except OSError:
                    data = b""           # EIO: the interpreter closed its side
                if data:
                    self._from_board(data)
            self._flush_to_board()
            if self.exit_code is not None and self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            if self.proc is not None and self.proc.poll() is not None and not self.stopping:
                self._child_exited()
        self.stop_child()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="vboard", description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", help="the board's filesystem (created if missing)")
    ap.add_argument("--heapsize", default="64K", help="MicroPython heap, e.g. 64K (default), 128K, 2M")
    ap.add_argument("--micropython", default=micropython_default(), help="unix port executable")
    ap.add_argument("--log", help="append the console (and vboard events) to this file")
    ap.add_argument("--link", help="also make this symlink to the pty")
    a = ap.parse_args(argv)
    os.makedirs(a.dir, exist_ok=True)
    board = Board(a.dir, a.micropython, a.heapsize, a.log)

    def stop(signum, frame):
        board.stopping = True
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if a.link:
        try:
            os.unlink(a.link)
        except FileNotFoundError:
            pass
        os.symlink(board.port, a.link)
    print(board.port, flush=True)
    log("board %s on %s" % (board.root, board.port), board.logf)
    try:
        board.run()
    finally:
        board.stop_child()
        shutil.rmtree(board.shim_dir, ignore_errors=True)
        if a.link:
            try:
                os.unlink(a.link)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
