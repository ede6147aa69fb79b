"""mpremote through the tunnel (docs/OPS.md, "mpremote"): a local TCP
port that speaks MicroPython's raw REPL, each command run on the device by
the ops channel's exec.

    microtun ops sensor-1 --config net/gateway.json --operator-key op.key mpremote
    #  -> prints socket://127.0.0.1:PORT
    mpremote connect socket://127.0.0.1:PORT exec "print(1)"      # or fs ls, fs cp, run

mpremote opens socket:// addresses with pyserial (serial_for_url), so it
drives this port exactly as it drives a USB board. The raw REPL's framing
(Ctrl-A, the code, Ctrl-D, "OK", output, 0x04, traceback, 0x04, ">") is
answered here, on the host; what it carries runs on the device: one exec
request per command, the device's globals kept between commands as in a
REPL, Ctrl-D at the raw prompt (a soft reset) clears them. Doing the
framing here costs one round trip per command, where byte-by-byte framing
over the tunnel would cost one per keystroke; it also spares the device
the raw REPL, which a unix port without os.dupterm could not hand over.
Raw-paste mode is declined ("R\\x00"), so mpremote falls back to the plain
raw REPL. Output arrives when the command ends (the device runs it to
completion, then answers).
"""
import socket
import sys

from microtun_host.ops import OpsError

RAW_BANNER = b"raw REPL; CTRL-B to exit\r\n>"
SOFT_REBOOT = b"OK\r\nMPY: soft reboot\r\n"


class RawRepl:
    """The raw REPL state machine over a byte stream: feed(bytes) -> bytes to send back."""

    def __init__(self, client, banner=b""):
        self.c = client
        self.raw = False
        self.buf = bytearray()
        self.esc = b""              # a raw-paste request being read (0x05 'A' 0x01)
        self.friendly = banner or (b"MicroPython via microtun ops (device %s)\r\n" % client.device.encode())

    def feed(self, data, send=None):
        """send: a function(bytes) to stream a running snippet's output
        through (what was answered so far goes first); without it the
        output comes in the returned bytes when the snippet ends."""
        out = bytearray()
        for b in data:
            ch = bytes((b,))
            if self.esc:
                self.esc += ch
                if len(self.esc) == 3:
                    if self.esc == b"\x05A\x01":
                        out += b"R\x00"             # raw-paste not supported: mpremote sends plain raw
                    self.esc = b""
                continue
            if ch == b"\x01":                       # Ctrl-A: raw REPL
                self.raw = True
                self.buf = bytearray()
                out += b"\r\n" + RAW_BANNER
            elif ch == b"\x02":                     # Ctrl-B: friendly REPL
                self.raw = False
                self.buf = bytearray()
                out += b"\r\n" + self.friendly + b">>> "
            elif ch == b"\x03":                     # Ctrl-C: nothing runs between commands here
                self.buf = bytearray()
            elif not self.raw:
                continue                            # the friendly REPL is not emulated: keys are ignored
            elif ch == b"\x05" and not self.buf:
                self.esc = ch
            elif ch == b"\x04":
                if not self.buf.strip():
                    self.buf = bytearray()
                    out += SOFT_REBOOT + self._reset() + RAW_BANNER
                else:
                    code = bytes(self.buf).decode("utf-8", "replace")
                    self.buf = bytearray()
                    out += b"OK"
                    if send is not None:
                        send(bytes(out))
                        out = bytearray()
                    out += self._run(code, send) + b">"
            else:
                self.buf += ch
        return bytes(out)

    def _reset(self):
        try:
            self.c.reset()
            return b""
        except OpsError as e:
            return ("microtun ops: %s\r\n" % e).encode()

    def _run(self, code, send=None):
        seen = [0]

        def show(text):             # the output as the device prints it (streamed)
            send(text.encode())
            seen[0] += len(text)
        try:
            out, err = self.c.exec_raw(code, on_output=show if send is not None else None)
        except OpsError as e:
            out, err = "", "microtun ops: %s\n" % e
        return out[seen[0]:].encode() + b"\x04" + err.encode() + b"\x04"


def serve(client, listen="127.0.0.1:0", once=False, ready=None):
    """Accept mpremote sessions on listen (loopback) until Ctrl-C (or after
    one with once); each gets a fresh RawRepl over client."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if host not in ("127.0.0.1", "::1", "localhost"):
        print("microtun ops mpremote: listen on loopback only (127.0.0.1 or ::1), not %s" % host, file=sys.stderr)
        return 2
    srv = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, int(port or 0)))
    srv.listen(1)
    addr = srv.getsockname()
    url = "socket://%s:%d" % (host if ":" not in host else "[%s]" % host, addr[1])
    print(url, flush=True)
    print("microtun ops: mpremote connect %s ...   (device %s; Ctrl-C stops)" % (url, client.device),
          file=sys.stderr, flush=True)
    if ready:
        ready(url)
    try:
        while True:
            conn, _ = srv.accept()
            with conn:
                repl = RawRepl(client)
                while True:
                    try:
                        data = conn.recv(4096)
                    except OSError:
                        break
                    if not data:
                        break
                    try:
                        out = repl.feed(data, conn.sendall)
                    except OSError:
                        break
                    if out:
                        try:
                            conn.sendall(out)
                        except OSError:
                            break
            if once:
                return 0
    except KeyboardInterrupt:
        return 0
    finally:
        srv.close()
