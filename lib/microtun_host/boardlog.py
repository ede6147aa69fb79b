"""`microtun logs --port PORT [--follow]`: the board's log without stopping
its tunnel (docs/FIRMWARE.md, "The log").

mpremote's `fs cat` enters the raw REPL: Ctrl-C stops main.py and the soft
reset that follows does not start it again, so the tunnel is gone until the
next reset. This opens the serial port without touching DTR/RTS (an ESP32
resets on them), sends one "l", which the running firmware answers with its
two log files between "microtun log begin" and "microtun log end", and
prints them. Nothing else is sent: no Ctrl-C, no raw REPL. --follow then
keeps printing the console (every log line, info included) until Ctrl-C.
"""
import sys
import time

BEGIN = b"microtun log begin"
END = b"microtun log end"


def _open(port):
    import serial                       # pyserial: installed with mpremote
    s = serial.Serial()
    s.port = port
    s.baudrate = 115200
    s.timeout = 0.1
    s.dtr = False                       # set before open: no reset pulse
    s.rts = False
    s.open()
    return s


def read_log(ser, timeout=5.0):
    """Ask the firmware for its log; the lines (bytes, without the markers),
    or None when no answer came within timeout s."""
    ser.reset_input_buffer()
    ser.write(b"l")
    ser.flush()
    buf = b""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        buf += ser.read(4096)
        i = buf.find(BEGIN)
        if i >= 0:
            j = buf.find(END, i)
            if j >= 0:
                body = buf[buf.index(b"\n", i) + 1:j] if b"\n" in buf[i:j] else b""
                return [ln.rstrip(b"\r") for ln in body.split(b"\n") if ln.strip(b"\r")]
    return None


def main(port, follow=False, timeout=5.0, out=None):
    out = out or sys.stdout
    try:
        ser = _open(port)
    except ImportError:
        print("microtun logs: pyserial is missing (pip install pyserial; mpremote brings it)", file=sys.stderr)
        return 1
    except Exception as e:              # serial.SerialException, OSError
        print("microtun logs: cannot open %s: %s" % (port, e), file=sys.stderr)
        return 1
    try:
        lines = read_log(ser, timeout)
        if lines is None:
            print("microtun logs: no answer from the firmware on %s within %.0f s: is microtun running there "
                  "(not at the REPL, not in safe mode)? A firmware older than this command does not answer; "
                  "`mpremote fs cat :microtun.log` works too but stops the tunnel until `mpremote reset`"
                  % (port, timeout), file=sys.stderr)
            return 1
        for ln in lines:
            out.write(ln.decode("utf-8", "replace") + "\n")
        if not lines:
            out.write("(the log is empty)\n")
        out.flush()
        if follow:
            try:
                while True:
                    data = ser.read(4096)
                    if data:
                        out.write(data.decode("utf-8", "replace").replace("\r\n", "\n"))
                        out.flush()
            except KeyboardInterrupt:
                pass
        return 0
    finally:
        ser.close()
