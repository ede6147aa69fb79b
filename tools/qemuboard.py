"""Run Python code on the emulated Cortex-M board: MicroPython's qemu port
(MPS2_AN385, built by `tools/mpbuild.py qemu`) under qemu-system-arm, driven
through its UART on a pseudo-terminal by the raw REPL (the protocol mpremote
speaks to a USB board).

    python tools/qemuboard.py [--kernel ELF] [--icount SHIFT] [--timeout S] (-c CODE | FILE)

prints what the code printed (its exception, if any, on stderr; exit 1).
The default kernel is build/qemu-an385/firmware.elf. `--icount SHIFT` runs
qemu with `-icount shift=SHIFT` (one instruction = 2**SHIFT ns of virtual
time); the board's time.ticks_us() reads SysTick on that virtual clock, so
at shift 0 a ticks_diff in microseconds times 1000 is the instruction count.

As a module:

    with QemuBoard(kernel) as b:
        out, err = b.exec("print(1 + 1)", timeout=60)

qemu always ends with the board (close(), the with block, or this process
being interrupted): the process is killed by its id.
"""
import os
import re
import select
import shutil
import subprocess
import sys
import time
import tty

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_KERNEL = os.path.join(ROOT, "build", "qemu-an385", "firmware.elf")
QEMU = "qemu-system-arm"
BOOT_TIMEOUT = 30.0


class BoardError(Exception):
    """qemu did not start, the board did not answer, or a command timed out."""


class QemuBoard:
    def __init__(self, kernel=DEFAULT_KERNEL, icount=None, extra_args=(), preexec_fn=None):
        self.kernel = kernel
        self.preexec_fn = preexec_fn
        self.icount = icount
        self.extra_args = list(extra_args)
        self.proc = None
        self.fd = None
        self.buf = b""

    # -- process ------------------------------------------------------------------------
    def command(self):
        cmd = [QEMU, "-machine", "mps2-an385", "-nographic", "-monitor", "null", "-semihosting",
               "-serial", "pty", "-kernel", self.kernel]
        if self.icount is not None:
            cmd[1:1] = ["-icount", "shift=%d" % self.icount]
        return cmd + self.extra_args

    def start(self):
        if not shutil.which(QEMU):
            raise BoardError("%s not found: install the Debian package qemu-system-arm" % QEMU)
        if not os.path.isfile(self.kernel):
            raise BoardError("no firmware at %s: build it with `make qemu` (tools/mpbuild.py)" % self.kernel)
        self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, preexec_fn=self.preexec_fn)
        # qemu names the pty on its output: "char device redirected to /dev/pts/N (label serial0)"
        deadline = time.monotonic() + BOOT_TIMEOUT
        text = b""
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if r:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                text += chunk
                m = re.search(rb"redirected to (/dev/pts/\d+)", text)
                if m:
                    self.fd = os.open(m.group(1).decode(), os.O_RDWR | os.O_NOCTTY)
                    tty.setraw(self.fd)
                    break
            elif self.proc.poll() is not None:
                break
        if self.fd is None:
            self.close()
            raise BoardError("qemu did not open its serial pty: %s" % text.decode(errors="replace").strip()[-300:])
        self.enter_raw()
        return self

    def close(self):
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            if self.proc.stdout:
                self.proc.stdout.close()
            self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    # -- serial ---------------------------------------------------------------------------
    def write(self, data):
        for i in range(0, len(data), 256):        # the UART has no flow control: small pieces
            os.write(self.fd, data[i:i + 256])
            if len(data) > 256:
                time.sleep(0.01)

    def read_until(self, marker, timeout):
        deadline = time.monotonic() + timeout
        while marker not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BoardError("timed out after %.0f s waiting for %r; got: %r" % (timeout, marker, self.buf[-300:]))
            if self.proc is None or self.fd is None:
                raise BoardError("the board was closed")
            if self.proc.poll() is not None:
                raise BoardError("qemu exited (%s); got: %r" % (self.proc.returncode, self.buf[-300:]))
            r, _, _ = select.select([self.fd], [], [], min(left, 0.5))
            if r:
                try:
                    chunk = os.read(self.fd, 65536)
                except OSError:
                    chunk = b""
                self.buf += chunk
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def enter_raw(self):
        self.write(b"\r\x03\x03")
        time.sleep(0.1)
        self.write(b"\r\x01")
        self.read_until(b"raw REPL; CTRL-B to exit\r\n>", BOOT_TIMEOUT)
        self.buf = b""

    def exec(self, code, timeout=60.0):
        """Run code in the raw REPL; returns (stdout, exception text) as str."""
        if isinstance(code, str):
            code = code.encode()
        self.write(code + b"\x04")
        self.read_until(b"OK", 10.0)
        out = self.read_until(b"\x04", timeout)[:-1]
        err = self.read_until(b"\x04", 10.0)[:-1]
        self.read_until(b">", 10.0)
        return out.decode(errors="replace").replace("\r\n", "\n"), err.decode(errors="replace").replace("\r\n", "\n")


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="Run Python code on the qemu MPS2_AN385 board over its raw REPL.")
    ap.add_argument("file", nargs="?", help="a Python file to run on the board")
    ap.add_argument("-c", dest="code", help="code to run instead of a file")
    ap.add_argument("--kernel", default=DEFAULT_KERNEL, help="firmware ELF (default: %(default)s)")
    ap.add_argument("--icount", type=int, help="qemu -icount shift=N: 2**N ns of virtual time per instruction")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds for the code (default %(default)s)")
    a = ap.parse_args(argv)
    if (a.file is None) == (a.code is None):
        ap.error("give a FILE or -c CODE")
    code = a.code if a.code is not None else open(a.file).read()
    try:
        with QemuBoard(a.kernel, a.icount) as b:
            out, err = b.exec(code, a.timeout)
    except BoardError as e:
        print("qemuboard: %s" % e, file=sys.stderr)
        return 2
    sys.stdout.write(out)
    if err:
        sys.stderr.write(err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
