"""microtun firmware: what main.py runs on a board (docs/FIRMWARE.md).

    boot ──► safe mode? ──► config ──► watchdog ──► network ──► tunnel + app, forever
                │              │                       ▲              │
                └─► REPL       └─► one line, REPL      └── link lost ─┤
                                                                     fatal error:
                                                       log, wait (grows), reset

Safe mode leaves the REPL free and starts nothing: a file named SAFE or
safe_mode at the root, the board's safe-mode button pressed during the boot
window, or Ctrl-C during the boot window. A config problem is one line in
the log and the REPL, never a crash loop. A fatal error is logged with its
traceback, then the board resets after a delay that doubles with every
consecutive fatal error (5 s, 10 s, 20 s ... 10 min); the count goes back to
zero once a session has stayed up for a minute.

Ctrl-C at any time stops everything and leaves you at the REPL (mpremote
relies on it). The watchdog is opt-in ("watchdog_s" in microtun.json): once
started, machine.WDT cannot be stopped, so it also resets the board while
you sit at the REPL; the boot window and the SAFE file come before it.

This module stays in memory while the tunnel runs, so it holds only the
loop and the log. The start-up checks and the settings live in
microtun_boot, the network bring-up in microtun_net, both dropped once the
network is up; what a normal run never does (a fatal error, the console's
log dump) lives in microtun_rare, loaded only then. Board specifics (network, LED,
safe-mode button, limits) come from board.py, the application from app.py.
Timings: microtun_boot.DEFAULTS, then board.FIRMWARE, then the config's
"firmware" object (e.g. {"boot_window_ms": 0, "crash_delay_ms": 200} for a
test rig).
"""
import gc
import os
import sys
from time import ticks_ms, ticks_diff, ticks_add, sleep_ms

T0 = ticks_ms()                  # imported first thing by main.py: "boot" time

# Collect every 2 KB allocated while the code loads: what each module keeps
# then fills the holes the loading of the one before left, instead of piling
# up behind its garbage (docs/MEMORY.md, "Start-up"). Back to collecting only
# when the heap is full once the tunnel is built.
_STARTUP_GC = const(2048)
try:
    gc.threshold(_STARTUP_GC)
except AttributeError:           # a port built without gc.threshold
    pass

LOG = "microtun.log"             # and microtun.log.1: two files of log_bytes each
_STATE = const("microtun_fw.txt")   # "<boots> <consecutive fatal errors>"
_FILE_LEVELS = const(("boot", "warn", "error", "fatal"))   # info goes to the console only: flash wears


def read_state():
    try:
        with open(_STATE) as f:
            b, c = f.read().split()[:2]
        return int(b), int(c)
    except (OSError, ValueError):
        return 0, 0


def write_state(boots, crashes):
    try:
        with open(_STATE, "w") as f:
            f.write("%d %d\n" % (boots, crashes))
    except OSError:
        pass


class Log:
    """log(level, msg), the signature Tunnel takes: every line to the
    console; boot, warn, error and fatal lines also to a small rotating file
    (LOG, LOG + ".1"). Never raises: a full or read-only filesystem must not
    take the board down."""

    def __init__(self, boot, max_bytes=4096):     # microtun_boot sets log_bytes from the settings
        self.boot = boot
        self.max = max_bytes
        self._last = None
        self._repeat = 0

    def __call__(self, level, msg):
        print("microtun %s: %s" % (level, msg))
        if level not in _FILE_LEVELS:
            return
        if msg == self._last:
            self._repeat += 1
            return
        if self._repeat:
            self.write("(previous line repeated %d times)" % self._repeat)
        self._last = msg
        self._repeat = 0
        self.write("%s %s" % (level, msg))

    def write(self, text):
        t = ticks_diff(ticks_ms(), T0)
        line = "#%d +%d.%03ds %s\n" % (self.boot, t // 1000, t % 1000, text)
        try:
            try:
                size = os.stat(LOG)[6]
            except OSError:
                size = 0
            if size and size + len(line) > self.max:
                try:
                    os.remove(LOG + ".1")
                except OSError:
                    pass
                os.rename(LOG, LOG + ".1")
            with open(LOG, "a") as f:
                f.write(line)
        except OSError:
            pass

    def exception(self, what, e):
        """The traceback to the console and, as one fatal line, to the file."""
        import microtun_rare
        microtun_rare.exception(self, what, e)


def reset():
    import machine
    if hasattr(machine, "reset"):
        machine.reset()
    raise SystemExit(3)          # the plain unix port: whoever started us restarts us


class Firmware:
    # microtun_boot.start() sets s (the settings), cfg and wdt
    wdt = None
    tunnel = None

    def __init__(self):
        self.boots, self.crashes = read_state()
        self.boots += 1
        write_state(self.boots, self.crashes)
        self.log = Log(self.boots)
        # board.py right after the state file, before anything else: what is
        # allocated next lands where the file's transient objects were, and
        # a stale copy of a pointer to them, left on the C stack (the GC
        # scans it conservatively), then holds that object for good. Let it
        # be board.py, which stays anyway: when microtun_boot came first, it
        # was held, 6.2K of dropped code on every boot that found the state
        # file (32-bit .mpy build, heap used at session up 70,784 against
        # 64,768 B, tools/bench_board.py FirmwareRig, boot 1 against boot 2).
        try:
            import board
        except ImportError as e:
            board = None             # microtun_boot stands in a NoBoard and says so
            self.no_board = e
        self.board = board

    def feed(self):
        if self.wdt is not None:
            self.wdt.feed()

    def sleep(self, ms):
        """Sleep, feeding the watchdog; Ctrl-C interrupts as usual."""
        end = ticks_add(ticks_ms(), ms)
        while True:
            left = ticks_diff(end, ticks_ms())
            if left <= 0:
                return
            self.feed()
            sleep_ms(left if left < 200 else 200)

    def led(self, on):
        try:
            self.board.led(on)
        except Exception:
            pass

    def run(self):
        import microtun_boot
        self.cfg = microtun_boot.start(self)     # None: safe mode, said there
        del microtun_boot
        sys.modules.pop("microtun_boot", None)   # start-up code: off the heap
        if self.cfg is None:
            return
        try:
            self.network_up()
            self.run_tunnel()
        except KeyboardInterrupt:
            raise
        except Exception as e:       # anything else is fatal: log, wait, reset
            self.fatal(e)

    def network_up(self):
        """At boot, and when the link was lost: microtun_net, loaded for it."""
        import microtun_net
        microtun_net.network_up(self)
        del microtun_net
        sys.modules.pop("microtun_net", None)
        gc.collect()

    def run_tunnel(self):
        app = None
        try:                         # compiled while the heap is still empty (before the tunnel)
            import app
        except ImportError as e:
            if "app" not in str(e):
                raise
            self.log("warn", "no app.py: the tunnel runs without an application")
        gc.collect()
        from microtun.driver import Tunnel
        self.tunnel = t = Tunnel(self.cfg, log=self.log)
        if t.core.log_ring is not None:
            self.log = t.log         # ops allowed: the firmware's lines go to the log ring too (docs/OPS.md)
        a = None
        if app is not None:
            a = app.App(t, self.cfg.app, self.board, self.log)
            t.on_data = a.on_data
        gc.collect()
        try:
            # Loading is over (_STARTUP_GC). Running, collect once a quarter of
            # what is free has been allocated: what lives on (path figures,
            # queued datagrams) is then made near the rest, not strewn over
            # a heap filled with garbage, and a datagram's receive buffer
            # (2 KB in one piece) still finds room (docs/MEMORY.md).
            gc.threshold(gc.mem_free() // 4)
        except AttributeError:
            pass
        t.connect(0)
        loop_ms = self.s["loop_ms"]
        was_up = False
        first = True
        up_since = 0
        stable = self.crashes == 0
        next_net = ticks_add(ticks_ms(), self.s["net_check_ms"])
        try:                         # keys typed at the console ("l": the log), read without the REPL
            import select
            con = select.poll()
            con.register(sys.stdin, select.POLLIN)
        except Exception:            # a port without a pollable console
            con = None
        while True:
            wait = loop_ms
            if a is not None:
                w = a.tick(ticks_ms())
                if w is not None and w < wait:
                    wait = w if w > 0 else 0
            t.poll(wait)
            self.feed()
            if t.reboot_requested:       # an operator's `microtun ops DEVICE reboot` (docs/OPS.md)
                self.log("boot", "reboot asked for over the ops channel")
                t.close()
                reset()
            if con is not None and con.poll(0):
                c = sys.stdin.read(1)
                if not c:            # no console (stdin closed)
                    con = None
                elif c == "l":       # the log files, for `microtun logs --port`
                    try:
                        import microtun_rare
                        microtun_rare.dump_log(self)
                    except MemoryError:  # ~1 KB of code to load: not worth a fatal error
                        print("microtun: no heap free for the log dump just now; try again")
                    sys.modules.pop("microtun_rare", None)
            now = ticks_ms()
            up = t.established
            if up != was_up:
                was_up = up
                self.led(up)
                if up:
                    up_since = now
                    if first:
                        first = False
                        slot = sys.modules.get("microtun_slot")   # there only while a release is on trial
                        if slot is not None:
                            slot.up()        # it reached the gateway: commit (docs/UPDATE.md)
                        gc.collect()
                        self.log("info", "session up %d ms after boot, %d X25519 operations, heap used %d free %d" % (
                            ticks_diff(now, T0), t.device.dh_count, gc.mem_alloc(), gc.mem_free()))
                else:
                    self.log("warn", "session down; the tunnel keeps trying")
                if a is not None and hasattr(a, "on_link"):
                    a.on_link(up)
            if up and not stable and ticks_diff(now, up_since) >= self.s["stable_ms"]:
                stable = True
                self.crashes = 0
                write_state(self.boots, 0)
            if ticks_diff(now, next_net) >= 0:
                next_net = ticks_add(now, self.s["net_check_ms"])
                if not self.board.network_ok():
                    self.log("warn", "network link lost; bringing it up again")
                    self.network_up()
                    t.rebind()

    def close(self):
        t = self.tunnel
        self.tunnel = None
        if t is not None:
            try:
                t.close()
            except Exception:
                pass

    def fatal(self, e):
        """Log, roll back a release on trial, wait (doubling), reset: in
        microtun_rare, loaded once the tunnel and its modules are off the
        heap (after a MemoryError the heap is full of them)."""
        self.close()
        for name in list(sys.modules):
            if name.startswith("microtun.") or name in ("microtun", "app"):
                del sys.modules[name]
        gc.collect()
        try:
            import microtun_rare
        except Exception as x:       # cannot even load it: still wait and reset
            print("microtun: fatal error %r; cannot load microtun_rare (%r); reset" % (e, x))
            self.sleep(self.s["crash_delay_ms"])
            reset()
        microtun_rare.fatal(self, e)


def main():
    fw = Firmware()
    try:
        fw.run()
    except KeyboardInterrupt:        # (here, not in a Firmware method: a method's function and bytecode stay in the heap)
        fw.close()
        print("microtun: stopped by Ctrl-C; the REPL is yours (machine.reset() or Ctrl-D restarts)")
        if fw.wdt is not None:
            print("microtun: the watchdog is running and will reset the board")
