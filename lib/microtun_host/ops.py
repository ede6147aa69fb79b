"""Remote operations on one device through its gateway (docs/OPS.md): the
host-side client and `microtun ops DEVICE ...`.

    c = OpsClient.connect("net/gateway.json", "sensor-1", operator_key="operator.key")
    #   or OpsClient("net/gw.sock", "sensor-1", token="...")      (a token from `microtun ops sensor-1 token`)
    print(c.exec("import os; print(os.listdir())"))
    c.put("app.py", open("app.py", "rb").read(), progress=lambda done, total: ...)
    data = c.get("microtun.log")
    c.ls("/lib")                  # [(name, size, is_dir)]
    c.health()                    # dict: session, paths, heap, boot counter
    c.reboot(); c.wait_up(30)     # True once the device is back and answers
    c.close()

How it reaches the device: the gateway's control socket ("control" in
gateway.json; only its owner may use it), and through it the device's E2E
session: the gateway relays each operation over channel 0 as ops
requests (microtun.ops), retransmitting on a lossy path. Every method
blocks and raises OpsError, one line naming the device and what failed, on
any failure: not allowed, bad or expired token, device offline or gone
mid-transfer, an error on the device (exec: OpsError.traceback holds the
device's traceback).

On the unix port, `reboot` makes the firmware (or tools/device_run.py
--serve) exit with status 3, the unix port's "reset": whatever started the
process (tools/vboard.py, a service manager, the test harness) starts it
again. A board resets (machine.reset()).
"""
import base64
import hashlib
import json
import os
import sys
import time

from microtun import ops as wire
from microtun_host import control
from microtun_host.config import ConfigError
from microtun_host.opsgw import login_message, MAX_BATCH, TOKEN_TTL_S

FOLLOW_WAIT_S = 20      # `logs --follow`: how long the device may hold one request
REBOOT_EXIT = 3     # the unix port's exit status for a reset (firmware/microtun_fw.py reset())


class OpsError(Exception):
    """An operation that failed: str(e) is one line naming the device and
    what went wrong; .traceback is the device's traceback for exec."""

    def __init__(self, msg, traceback=None, output=None):
        Exception.__init__(self, msg)
        self.traceback = traceback
        self.output = output


def control_of(gateway_config):
    """The control socket path of a gateway config file."""
    from microtun_host.gateway import load_client_config
    cfg = load_client_config(gateway_config)       # file mode or fleet mode
    if cfg.control is None or not control.is_socket_path(str(cfg.control)):
        raise OpsError("%s: \"control\" must be a socket path for ops (e.g. \"gw.sock\")" % gateway_config)
    return str(cfg.control)


class OpsClient:
    """A connection to one device's ops agent through the gateway.
    OpsClient(control_socket, device, token=...) with a token, or
    OpsClient.connect(gateway_config_or_socket, device, operator_key=FILE)
    to log in with an operator key (a fresh token for ttl seconds)."""

    # how long the gateway waits for the device to answer one request (retransmitting meanwhile)
    # before it reports the device gone; None: the gateway's default, 5 s
    device_timeout = None

    def __init__(self, control_addr, device, token, timeout=60.0):
        self.control = control_addr
        self.device = device
        self.token = token
        self.timeout = timeout
        self._boot = None

    @classmethod
    def connect(cls, where, device, operator_key=None, token=None, ttl=TOKEN_TTL_S, timeout=60.0):
        addr = control_of(where) if where.endswith(".json") else where
        if token is None:
            if operator_key is None:
                raise OpsError("ops on %s: give an operator key (--operator-key FILE) or a token (--token, or "
                               "MICROTUN_OPS_TOKEN)" % device)
            token = login(addr, device, operator_key, ttl)
        return cls(addr, device, token, timeout)

    # -- plumbing ---------------------------------------------------------------------------------
    def _call(self, op, timeout=None, on_partial=None, **fields):
        req = dict(fields, cmd="ops", device=self.device, token=self.token, op=op)
        if self.device_timeout is not None:
            req["timeout"] = self.device_timeout
        if on_partial is not None:
            req["stream"] = True
        try:
            rep = control.query(self.control, req, timeout=timeout or self.timeout, on_partial=on_partial)
        except control.ControlError as e:
            raise OpsError("%s: %s: %s" % (self.device, op, e)) from None
        if not rep.get("ok"):
            raise OpsError("%s: %s" % (self.device, rep.get("error", "%s failed" % op)))
        return rep

    # -- the contract (docs/OPS.md) -------------------------------------------------------------------
    def exec(self, code):
        """Run code on the device (globals kept between calls, like a REPL);
        its printed output. OpsError with .traceback if it raised."""
        rep = self._call("exec", code=code)
        if rep.get("error") is not None:
            tb = rep["error"]
            last = tb.strip().splitlines()[-1] if tb.strip() else "an exception"
            raise OpsError("%s: exec raised %s" % (self.device, last), traceback=tb, output=rep.get("output"))
        return rep["output"]

    def exec_raw(self, code, on_output=None):
        """(output, traceback or ""): what the raw REPL reports, no raising.
        on_output: called with each piece of the output as the device
        prints it (streamed, docs/OPS.md); the pieces are a prefix of the
        output returned (the rest was not pushed: print output[len(seen):])."""
        cb = None if on_output is None else (lambda m: on_output(m.get("output", "")))
        rep = self._call("exec", code=code, on_partial=cb)
        return rep["output"], rep.get("error") or ""

    def reset(self):
        """Forget exec's globals (what mpremote's soft reset means here)."""
        self._call("reset")

    def ls(self, path=""):
        return [tuple(e) for e in self._call("ls", path=path)["entries"]]

    def put(self, path, data, progress=None):
        """Write data to path on the device: sent in pages, written to
        PATH.part, checked against its sha256 on the device and only then
        renamed over PATH. A put cut short (the device rebooted, the path
        died) resumes where it stopped when run again with the same data."""
        data = bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        have = self._call("put_open", path=path, size=len(data), sha256=digest)["have"]
        if progress:
            progress(have, len(data))
        off = have - have % wire.PAGE
        while off < len(data):
            chunk = data[off:off + MAX_BATCH]
            self._call("put_data", path=path, offset=off, data=base64.b64encode(chunk).decode())
            off += len(chunk)
            if progress:
                progress(off, len(data))
        self._call("put_done", path=path)

    def get(self, path, progress=None):
        info = self._call("get_open", path=path)
        size = info["size"]
        out = bytearray()
        while len(out) < size:
            n = min(MAX_BATCH, size - len(out))
            out.extend(base64.b64decode(self._call("get_data", path=path, offset=len(out), length=n)["data"]))
            if progress:
                progress(len(out), size)
        if hashlib.sha256(out).hexdigest() != info["sha256"]:
            raise OpsError("%s: get %s: sha256 mismatch (the file changed while it was read?); try again" % (
                self.device, path))
        return bytes(out)

    def health(self):
        h = self._call("health")["health"]
        return h

    def logs(self, since=0, wait=0):
        """(next, text): the device's log lines after sequence number since.
        wait (s, at most 30): when there is none yet, the device holds the
        request until one comes or wait is over (text "" then)."""
        r = self._call("logs", since=since, wait=wait) if wait else self._call("logs", since=since)
        text = r["text"]
        if since and r["first"] > since + 1:
            text = "[%d lines dropped from the device's ring]\n" % (r["first"] - since - 1) + text
        return r["next"], text

    def reboot(self):
        try:
            self._boot = self.health().get("boot")
        except OpsError:
            self._boot = None
        self._call("reboot")

    def wait_up(self, timeout):
        """True once the device answers ops again (after reboot(): with a
        new boot counter, i.e. it restarted and re-handshaked)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                rep = control.query(self.control, {"cmd": "ops", "device": self.device, "token": self.token,
                                                   "op": "health"}, timeout=max(0.5, min(7.0, end - time.monotonic())))
            except control.ControlError:
                rep = {}
            if rep.get("ok"):
                boot = rep["health"].get("boot")
                if self._boot is None or boot != self._boot:
                    self._boot = None
                    return True
            time.sleep(0.2)
        return False

    def close(self):
        self.token = None


def login(addr, device, key_path, ttl=TOKEN_TTL_S):
    """A token for device, from the gateway at addr, proving the operator key in key_path."""
    from microtun_host.changelog import OperatorKey, LogError
    try:
        key = OperatorKey.load(key_path)
    except LogError as e:
        raise OpsError(str(e)) from None
    try:
        ch = control.query(addr, {"cmd": "ops_challenge", "device": device}, timeout=5)
        if not ch.get("ok"):
            raise OpsError("%s: %s" % (device, ch.get("error")))
        sig = key.sign(login_message(ch["gateway"], device, ch["nonce"], ttl)).hex()
        rep = control.query(addr, {"cmd": "ops_login", "device": device, "operator": key.public.hex(),
                                   "nonce": ch["nonce"], "sig": sig, "ttl": ttl}, timeout=5)
    except control.ControlError as e:
        raise OpsError("%s: login: %s" % (device, e)) from None
    if not rep.get("ok"):
        raise OpsError("%s: %s" % (device, rep.get("error")))
    return rep["token"]


# --- `microtun ops DEVICE ...` -----------------------------------------------------------------------------

def add_parser(sub):
    p = sub.add_parser("ops", help="operate a device through the tunnel: exec, ls, get, put, logs, health, "
                                   "reboot, mpremote (docs/OPS.md)",
                       description="Operate one device through its gateway and its E2E session. Needs the "
                                   "device allowed (ops = true in the topology) and an operator key the gateway "
                                   "trusts, or a token from `microtun ops DEVICE token`.")
    p.add_argument("device", metavar="DEVICE")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", metavar="FILE", help="the gateway's config (its control socket is read from it)")
    g.add_argument("--control", metavar="SOCKET", help="the gateway's control socket")
    p.add_argument("--operator-key", metavar="FILE", help="log in with this operator key (Ed25519, "
                   "`microtun fleet keygen`)")
    p.add_argument("--token", metavar="TOKEN", help="a token from `microtun ops DEVICE token` (default: "
                   "$MICROTUN_OPS_TOKEN)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S", help="per request to the gateway")
    cmds = p.add_subparsers(dest="ops_cmd", metavar="COMMAND", required=True)
    c = cmds.add_parser("exec", help="run a snippet, print its output (and its traceback)")
    c.add_argument("code", nargs="?", help="the code; or -f FILE")
    c.add_argument("-f", "--file", metavar="FILE")
    c = cmds.add_parser("ls", help="list a directory")
    c.add_argument("path", nargs="?", default="")
    c = cmds.add_parser("get", help="copy a file from the device")
    c.add_argument("remote")
    c.add_argument("local", nargs="?")
    c = cmds.add_parser("put", help="copy a file to the device (sha256-checked, resumable)")
    c.add_argument("local")
    c.add_argument("remote", nargs="?")
    c = cmds.add_parser("logs", help="print the device's recent log lines")
    c.add_argument("--follow", "-f", action="store_true", help="then keep printing new ones until Ctrl-C")
    cmds.add_parser("health", help="session, paths, heap, boot counter (JSON)")
    c = cmds.add_parser("reboot", help="restart the device's firmware")
    c.add_argument("--wait", type=float, default=0, metavar="S", help="then wait this long for it to come back")
    c = cmds.add_parser("token", help="print a token for this device (give it to whoever operates it)")
    c.add_argument("--ttl", type=int, default=TOKEN_TTL_S, metavar="S", help="valid this long (max 3600)")
    c = cmds.add_parser("update", help="install a signed release (`microtun release build`) with automatic "
                                       "rollback (docs/UPDATE.md)")
    c.add_argument("bundle", help="the release bundle (.zip)")
    c.add_argument("--trust", action="append", metavar="KEYFILE",
                   help="check the signature here first against this operator public key (the device checks anyway)")
    c.add_argument("--wait", type=float, default=120.0, metavar="S",
                   help="for the device to come back committed or rolled back (default 120)")
    c = cmds.add_parser("mpremote", help="serve a socket:// address that mpremote connects to")
    c.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    c.add_argument("--once", action="store_true", help="stop after the first mpremote session")
    p.set_defaults(run=main)


def _progress(what):
    if not sys.stderr.isatty():
        return None

    def show(done, total):
        sys.stderr.write("\r%s %d/%d bytes (%d%%)" % (what, done, total, 100 * done // max(total, 1)))
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


def main(args):
    where = args.config or args.control
    token = args.token or os.environ.get("MICROTUN_OPS_TOKEN")
    bundle = None
    if args.ops_cmd == "update":        # a bad bundle is refused before anything reaches the device
        from microtun_host import release
        try:
            bundle = release.Bundle.load(args.bundle, release.keys_from_files(args.trust) if args.trust else None)
        except release.ReleaseError as e:
            print("microtun ops: %s" % e, file=sys.stderr)
            return 2
    try:
        if args.ops_cmd == "token":
            if args.operator_key is None:
                print("microtun ops: token needs --operator-key FILE", file=sys.stderr)
                return 2
            addr = control_of(where) if where.endswith(".json") else where
            print(login(addr, args.device, args.operator_key, args.ttl))
            return 0
        c = OpsClient.connect(where, args.device, args.operator_key if token is None else None, token,
                              timeout=args.timeout)
        k = args.ops_cmd
        if k == "exec":
            if (args.code is None) == (args.file is None):
                print("microtun ops exec: give the code or -f FILE", file=sys.stderr)
                return 2
            code = args.code if args.file is None else open(args.file).read()
            seen = [0]

            def show(text):                 # the output as the snippet prints it
                sys.stdout.write(text)
                sys.stdout.flush()
                seen[0] += len(text)
            out, err = c.exec_raw(code, on_output=show)
            sys.stdout.write(out[seen[0]:])
            if err:
                sys.stderr.write(err)
                return 1
        elif k == "ls":
            for name, size, is_dir in c.ls(args.path):
                print("%10s %s" % ("<dir>" if is_dir else size, name + ("/" if is_dir else "")))
        elif k == "get":
            data = c.get(args.remote, progress=_progress("get " + args.remote))
            local = args.local or os.path.basename(args.remote.rstrip("/"))
            if local == "-":
                sys.stdout.buffer.write(data)
            else:
                with open(local, "wb") as f:
                    f.write(data)
                print("%s: %d bytes, sha256 checked" % (local, len(data)))
        elif k == "put":
            with open(args.local, "rb") as f:
                data = f.read()
            remote = args.remote or os.path.basename(args.local)
            c.put(remote, data, progress=_progress("put " + remote))
            print("%s: %d bytes, sha256 checked on the device" % (remote, len(data)))
        elif k == "logs":
            nxt, text = c.logs(0)
            sys.stdout.write(text)
            sys.stdout.flush()
            wait = max(1.0, min(FOLLOW_WAIT_S, args.timeout / 2))
            while args.follow:             # each request held on the device until a line comes
                t0 = time.monotonic()
                nxt, text = c.logs(nxt, wait=wait)
                sys.stdout.write(text)
                sys.stdout.flush()
                if not text and time.monotonic() - t0 < wait / 2:
                    time.sleep(0.5)        # a device that does not hold requests (older firmware): poll
        elif k == "health":
            print(json.dumps(c.health(), indent=1, sort_keys=True))
        elif k == "reboot":
            c.reboot()
            if args.wait:
                if not c.wait_up(args.wait):
                    print("microtun ops: %s: not back within %.0f s" % (args.device, args.wait), file=sys.stderr)
                    return 1
                print("%s: back up" % args.device)
        elif k == "update":
            from microtun_host import release
            r = release.update_device(c, bundle, timeout_s=args.wait,
                                      progress=lambda msg: print("%s: %s" % (args.device, msg), flush=True))
            print("%s: %s %s (%s, %.1f s)" % (args.device, r.status, bundle.version, r.reason, r.seconds))
            return 0 if r.ok else 1
        elif k == "mpremote":
            from microtun_host import opsbridge
            return opsbridge.serve(c, args.listen, once=args.once)
    except OpsError as e:
        print("microtun ops: %s" % e, file=sys.stderr)
        return 1
    except ConfigError as e:
        print("microtun ops: %s" % e, file=sys.stderr)
        return 2
    except OSError as e:
        print("microtun ops: %s" % (e.strerror and "%s: %s" % (e.filename, e.strerror) or e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
