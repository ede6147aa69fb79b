"""What the firmware (microtun_fw) does only rarely, loaded only then: a
fatal error and the log dump asked for at the console. A normal run never
imports it, so neither its code nor its names take the heap while the
tunnel runs (docs/FIRMWARE.md).

    microtun_rare.fatal(fw, e)          # log, roll back a trial, wait, reset
    microtun_rare.dump_log(fw)          # the log files to the console
    microtun_rare.exception(log, what, e)
"""
import io
import sys

from microtun_fw import LOG, write_state, reset


def fatal(fw, e):
    """After fw.fatal() took the tunnel and its modules off the heap: roll
    back a release on trial, count the error, log its traceback, wait
    (crash_delay_ms, doubling per consecutive fatal error, at most
    crash_delay_max_ms; Ctrl-C for the REPL), reset."""
    slot = sys.modules.get("microtun_slot")
    if slot is not None:             # a release on trial: roll back, the next boot runs the last good set
        try:
            slot.failed("fatal error: %r" % (e,))
        except Exception:
            pass
    fw.crashes += 1
    write_state(fw.boots, fw.crashes)
    try:
        fw.log.exception("fatal error", e)
    except Exception:                # even logging failed (MemoryError): still wait and reset
        pass
    n = fw.crashes - 1 if fw.crashes < 24 else 23
    delay = min(fw.s["crash_delay_ms"] << n, fw.s["crash_delay_max_ms"])
    fw.log("fatal", "fatal error %d in a row; reset in %d.%03d s (Ctrl-C for the REPL)" % (
        fw.crashes, delay // 1000, delay % 1000))
    fw.sleep(delay)
    reset()


def exception(log, what, e):
    """Log.exception: the traceback to the console, and as one fatal line
    (continuation lines indented) to the log."""
    buf = io.StringIO()
    sys.print_exception(e, buf)
    tb = buf.getvalue()
    print(tb)
    log("fatal", "%s: %s" % (what, tb.strip().replace("\n", "\n    ")))


def dump_log(fw):
    """The log files to the console, between two marker lines: what
    `microtun logs --port` asks for with an "l" typed at the console.
    mpremote's fs cat would stop the tunnel (raw REPL, soft reset)."""
    print("microtun log begin")
    for name in (LOG + ".1", LOG):
        try:
            with open(name) as f:
                for line in f:
                    print(line, end="")
        except OSError:
            pass
        fw.feed()
    print("microtun log end")
