"""The control channel of a host process (PoP, gateway): stats, status,
reload. Only the user the process runs as (and root) can use it.

Where it listens is the config's "control" field:

  a socket path  ("gw.sock", "/run/microtun/gw.sock"; relative to the config
                 file): a unix stream socket, mode 0600, in a directory only
                 its owner can write to (made 0700 when missing), and every
                 connection's peer uid is checked (SO_PEERCRED) against the
                 process's own. Like wg's /var/run/wireguard/wg0.sock.
                 `microtun provision` writes this by default.
  "HOST:PORT"    a loopback UDP port (the older form): ANY local user can use
                 it. Still accepted, with a warning at start; write a socket
                 path instead.

One JSON request, one JSON reply (a line each on the socket, a datagram
each over UDP):

    -> {"cmd": "stats", "id": 7}
    <- {"ok": true, "id": 7, ...}
    <- {"ok": false, "id": 7, "error": "unknown command 'stat' (known: ping, reload, stats)"}

A process serves a dict of commands (name -> function(request) -> dict);
"ping" is always there. "id", when present, is echoed. A connection from
another uid gets {"ok": false, "error": ...}, is counted (`refused`) and
logged (rate-limited), and runs nothing.

    server = await control.serve(where, {"stats": fn, ...}, log)   # server.close() stops it
    reply = control.query("net/gw.sock", {"cmd": "stats"}, timeout=1.0)

Streaming (the socket form only): a request with "stream": true may get
lines {"partial": true, "id": ...} ahead of its reply, each as soon as the
command has it (the gateway's ops exec: a snippet's output while it runs).
A command sends them through partial_sender(req); query(..., on_partial=fn)
hands them to fn; a request without "stream" never gets one.

Shell: python -m microtun_host.control net/gw.sock stats
"""
import asyncio
import contextvars
import ipaddress
import json
import os
import socket
import stat
import struct
import sys

MAX_DATAGRAM = 65507          # largest UDP payload over IPv4
MAX_REQUEST = 65536           # one request line on the socket (an ops put's data batch fits: opsgw.MAX_BATCH)
_SUN_PATH_MAX = 100           # sun_path is 108 bytes on Linux, 104 on BSD/macOS: longer ones go via /proc/self/fd

UDP_WARNING = ("control on UDP %s: any local user can read stats and trigger a reload; write a socket "
               "path instead, e.g. \"control\": \"gw.sock\" (docs/CONFIG.md, \"Control channel\")")


# the current connection's way to send a line ahead of the reply (a socket connection only)
_emit = contextvars.ContextVar("control_emit", default=None)


def partial_sender(req):
    """A function(fields) sending one {"partial": true, ...} line ahead of
    the reply to req, or None when req did not ask ("stream": true) or its
    connection cannot carry it (UDP). Take it in the command (it belongs to
    the connection serving req); call it from anywhere later."""
    emit = _emit.get()
    if emit is None or req.get("stream") is not True:
        return None

    def send(fields):
        line = dict(fields, partial=True)
        if req.get("id") is not None:
            line["id"] = req["id"]
        emit(_encode(line, limit=1 << 30) + b"\n")
    return send


class ControlError(OSError):
    """query() got no reply in time, or a bad one; serve() cannot open the
    channel. str(e) is one line saying what to do."""


class SocketPath(str):
    """A control setting that names a unix socket (an absolute path)."""


def is_socket_path(text):
    """A control value names a socket (not "HOST:PORT") when it has a "/" or ends in ".sock"."""
    return isinstance(text, str) and ("/" in text or text.endswith(".sock"))


def from_config(node, key="control", default=None):
    """The control setting of a process config (a microtun_host.config.Node):
    `default` when absent, a SocketPath (resolved against the config file's
    directory), or a loopback config.Address (UDP)."""
    v = node.raw(key, "a socket path or a loopback HOST:PORT", default)
    if v is default:
        return v
    if is_socket_path(v):
        base = os.path.dirname(os.path.abspath(node.file))
        return SocketPath(os.path.normpath(os.path.join(base, os.path.expanduser(v))))
    from microtun_host.config import parse_address
    if isinstance(v, str) and parse_address(v) is None:
        raise node.error(key, "expected a socket path (e.g. \"gw.sock\", relative to this file) or a "
                              "loopback \"127.0.0.1:PORT\", got %r" % v)
    return node.address(key, default, loopback=True)


def _host_port(addr):
    if isinstance(addr, str):
        from microtun_host.config import parse_address
        a = parse_address(addr)
        if a is None:
            raise ControlError("control address %r: expected a socket path (e.g. net/gw.sock) or a loopback "
                               "\"127.0.0.1:PORT\" / \"[::1]:PORT\" (numeric, no host names)" % addr)
        return a.host, a.port
    if hasattr(addr, "sockaddr"):
        return addr.sockaddr
    return addr[0], addr[1]


def _family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _encode(reply, limit=MAX_DATAGRAM):
    data = json.dumps(reply, separators=(",", ":"), sort_keys=True).encode()
    if len(data) > limit:
        data = json.dumps({"ok": False, "id": reply.get("id"),
                           "error": "reply of %d bytes does not fit one datagram" % len(data)}).encode()
    return data


class Commands:
    """The commands of one process and the dispatch of one request."""

    def __init__(self, commands, log=None):
        self.commands = dict(commands)
        self.commands.setdefault("ping", lambda req: {})
        self.log = log
        self.refused = 0          # connections from another uid

    def handle(self, data):
        """Reply dict for one request; never raises."""
        try:
            req = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return {"ok": False, "error": "a request is one JSON object, e.g. {\"cmd\": \"stats\"}"}
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {"ok": False, "error": "a request is one JSON object with a string \"cmd\", e.g. {\"cmd\": \"stats\"}"}
        rid = req.get("id")
        fn = self.commands.get(req["cmd"])
        if fn is None:
            reply = {"ok": False, "error": "unknown command %r (known: %s)" % (
                req["cmd"], ", ".join(sorted(self.commands)))}
        else:
            try:
                reply = fn(req)
                if asyncio.iscoroutine(reply):      # a command that waits (the gateway's "ops")
                    return self._finish(reply, req, rid)
                reply = dict(reply)
                reply.setdefault("ok", True)
            except Exception as e:    # a bug in a handler must not kill the process
                reply = self._failed(req, e)
        if rid is not None:
            reply["id"] = rid
        return reply

    async def _finish(self, coro, req, rid):
        try:
            reply = dict(await coro)
            reply.setdefault("ok", True)
        except Exception as e:
            reply = self._failed(req, e)
        if rid is not None:
            reply["id"] = rid
        return reply

    def _failed(self, req, e):
        if self.log:
            self.log.exception("control: command %r failed", req["cmd"])
        return {"ok": False, "error": "internal error in %r: %s" % (req["cmd"], e)}

    def refuse(self, uid, where):
        self.refused += 1
        n = self.refused
        if self.log and (n < 10 or n % 100 == 0):      # rate-limited: the first few, then every 100th
            self.log.warning("control: refused a connection from uid %d on %s (only uid %d and root may "
                             "use it; %d refused so far)", uid, where, os.geteuid(), n)


class ControlProtocol(asyncio.DatagramProtocol):
    """The UDP form (any local user)."""

    def __init__(self, commands, log=None):
        self.cmds = commands if isinstance(commands, Commands) else Commands(commands, log)
        self.log = log
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        reply = self.cmds.handle(data)
        if asyncio.iscoroutine(reply):        # waiting commands need the socket form
            reply.close()
            reply = {"ok": False, "error": "this command needs the control socket (a socket path), not UDP"}
        try:
            self.transport.sendto(_encode(reply), addr)
        except OSError as e:          # the client went away: nothing to do
            if self.log:
                self.log.debug("control: cannot reply to %s: %s", addr, e)

    def handle(self, data):
        return self.cmds.handle(data)


# --- unix socket --------------------------------------------------------------------------
def peer_uid(sock):
    """The uid at the other end of a connected unix socket, or None where
    the OS does not tell (then the socket's mode is the only check)."""
    opt = getattr(socket, "SO_PEERCRED", None)
    if opt is None:
        return None
    try:
        _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, opt, struct.calcsize("3i")))
    except OSError:
        return None
    return uid


class _Short:
    """A path usable as a sun_path: the path itself, or /proc/self/fd/N/NAME
    through an open descriptor of its directory when the path is too long."""

    def __init__(self, path):
        self.fd = None
        self.path = path
        if len(os.fsencode(path)) > _SUN_PATH_MAX:
            d, name = os.path.split(path)
            try:
                self.fd = os.open(d, os.O_RDONLY)
            except OSError as e:
                raise ControlError("control socket %s: cannot open its directory: %s" % (path, e.strerror or e))
            self.path = "/proc/self/fd/%d/%s" % (self.fd, name)
            if len(os.fsencode(self.path)) > _SUN_PATH_MAX or not os.path.isdir("/proc/self/fd"):
                self.close()
                raise ControlError("control socket %s: the path is too long for a unix socket; choose a "
                                   "shorter one" % path)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _check_dir(path):
    """Make the socket's directory (0700) if missing; refuse one that others
    can write to (they could replace the socket)."""
    d = os.path.dirname(path) or "."
    if not os.path.isdir(d):
        try:
            os.makedirs(d, 0o700)
        except OSError as e:
            raise ControlError("control socket %s: cannot create its directory: %s" % (path, e.strerror or e))
        return
    st = os.stat(d)
    if st.st_uid not in (os.geteuid(), 0) or st.st_mode & 0o022:
        mine = st.st_uid == os.geteuid() and not st.st_mode & stat.S_ISVTX
        raise ControlError("control socket %s: its directory %s is writable by other users (mode %03o, owner "
                           "uid %d); put the socket in a directory only you can write to, e.g. next to the "
                           "config file%s" % (path, d, stat.S_IMODE(st.st_mode) & 0o777, st.st_uid,
                                               " (or chmod 700 %s)" % d if mine else ""))


def _claim(path):
    """Remove a stale socket left by a process that died; refuse to take
    over a live one or any other kind of file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError("control socket %s: a file that is not a socket is in the way; remove it or "
                           "choose another path" % path)
    sp = _Short(path)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            s.connect(sp.path)
        raise ControlError("control socket %s: another process is serving it (a second PoP or gateway "
                           "with the same config?)" % path)
    except (ConnectionRefusedError, FileNotFoundError):
        try:
            os.unlink(path)           # stale
        except FileNotFoundError:
            pass
    except socket.timeout:
        raise ControlError("control socket %s: another process holds it" % path) from None
    finally:
        sp.close()


class UnixServer:
    """A running control socket: close() stops it and removes the socket."""

    def __init__(self, server, path, cmds):
        self.server = server
        self.path = path
        self.cmds = cmds
        self._ino = os.stat(path).st_ino

    @property
    def refused(self):
        return self.cmds.refused

    def get_extra_info(self, name, default=None):
        return self.path if name == "sockname" else default

    def close(self):
        self.server.close()
        try:
            if os.stat(self.path).st_ino == self._ino:      # ours, not a successor's
                os.unlink(self.path)
        except OSError:
            pass


async def _serve_unix(path, cmds, log, max_request=MAX_REQUEST):
    _check_dir(path)
    _claim(path)
    uid = os.geteuid()

    async def client(reader, writer):
        try:
            sock = writer.get_extra_info("socket")
            peer = peer_uid(sock) if sock is not None else None
            if peer is not None and peer not in (uid, 0):
                cmds.refuse(peer, path)
                try:                  # take the request (unread) first: closing on it would be a reset
                    await asyncio.wait_for(reader.readline(), 1.0)
                except (asyncio.TimeoutError, ValueError):
                    pass
                writer.write(_encode({"ok": False, "error": "uid %d may not use this control socket (only "
                                                            "uid %d and root)" % (peer, uid)}) + b"\n")
                await writer.drain()
                return
            while True:
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError as e:
                    line = e.partial
                    if not line.strip():
                        return
                except asyncio.LimitOverrunError:
                    writer.write(_encode({"ok": False, "error": "a request is one line of at most %d bytes"
                                                                % max_request}) + b"\n")
                    return
                _emit.set(writer.write)
                reply = cmds.handle(line)
                if asyncio.iscoroutine(reply):
                    reply = await reply
                writer.write(_encode(reply, limit=1 << 30) + b"\n")
                await writer.drain()
        except (ConnectionError, OSError):
            pass                      # the client went away
        finally:
            try:
                writer.close()
            except Exception:
                pass

    sp = _Short(path)
    old = os.umask(0o177)             # the socket is born 0600: no window with a wider mode
    try:
        server = await asyncio.start_unix_server(client, path=sp.path, limit=max_request)
    except OSError as e:
        raise ControlError("control socket %s: %s" % (path, e.strerror or e)) from None
    finally:
        os.umask(old)
        sp.close()
    os.chmod(path, 0o600)
    return UnixServer(server, path, cmds)


async def serve(addr, commands, log=None, max_request=MAX_REQUEST):
    """Serve commands (name -> fn(request) -> dict) on a socket path (owner
    only) or a loopback UDP address (any local user; logged as a warning).
    Returns an object with close() and get_extra_info("sockname").
    Raises ControlError (an OSError) with one line when it cannot."""
    cmds = Commands(commands, log)
    if is_socket_path(addr):
        return await _serve_unix(os.path.abspath(addr), cmds, log, max_request)
    host, port = _host_port(addr)
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError("the control channel binds to loopback only (127.0.0.0/8 or ::1), not %s" % host)
    if log:
        log.warning(UDP_WARNING, "%s:%d" % (host, port))
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: ControlProtocol(cmds, log), local_addr=(host, port), family=_family(host))
    return transport


def _query_unix(path, req, timeout, on_partial=None):
    sp = None
    try:
        sp = _Short(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(sp.path)
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:        # partial lines ahead of the reply (streaming)
                    line, _, rest = buf.partition(b"\n")
                    msg = _parse_partial(line)
                    if msg is None:
                        break
                    buf = rest
                    if on_partial is not None:
                        on_partial(msg)
                if buf.endswith(b"\n"):
                    break
    except FileNotFoundError:
        raise ControlError("control %s: no such socket; is the process running? (it creates the socket "
                           "when it starts)" % path) from None
    except ConnectionRefusedError:
        raise ControlError("control %s: nothing is listening (a stale socket: the process is not "
                           "running)" % path) from None
    except PermissionError:
        raise ControlError("control %s: permission denied; only the user the process runs as (and root) "
                           "may use it" % path) from None
    except socket.timeout:
        raise ControlError("control %s: no reply within %.1f s" % (path, timeout)) from None
    except ControlError:
        raise
    except OSError as e:
        raise ControlError("control %s: %s" % (path, e.strerror or e)) from None
    finally:
        if sp is not None:
            sp.close()
    try:
        reply = json.loads(buf.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ControlError("control %s: %s" % (path, "no reply (connection closed)" if not buf
                                                  else "reply is not JSON")) from None
    if not isinstance(reply, dict):
        raise ControlError("control %s: reply is not a JSON object" % path)
    return reply


def _parse_partial(line):
    """The dict of a {"partial": true} line, None for anything else (the reply)."""
    if not line.startswith(b'{') or b'"partial"' not in line:
        return None
    try:
        msg = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return msg if isinstance(msg, dict) and msg.get("partial") is True else None


def query(addr, request, timeout=1.0, on_partial=None):
    """Send one request (a dict with "cmd") and return the reply dict.
    Raises ControlError (one line) when there is no matching reply within
    timeout s (of silence), nothing listens, or addr is not a control
    address. on_partial: called with each partial line's dict (a request
    with "stream": true on a socket)."""
    req = dict(request)
    rid = req.setdefault("id", int.from_bytes(os.urandom(4), "big"))
    if is_socket_path(addr):
        reply = _query_unix(os.path.abspath(addr), req, timeout, on_partial)
        if reply.get("id") not in (rid, None):
            raise ControlError("control %s: reply to another request" % addr)
        return reply
    host, port = _host_port(addr)
    data = json.dumps(req).encode()
    with socket.socket(_family(host), socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        try:
            s.sendto(data, (host, port))
            while True:
                raw, _ = s.recvfrom(MAX_DATAGRAM + 1)
                try:
                    reply = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, ValueError):
                    raise ControlError("control %s:%d: reply is not JSON" % (host, port)) from None
                if isinstance(reply, dict) and reply.get("id") == rid:
                    return reply
        except socket.timeout:
            raise ControlError("control %s:%d: no reply within %.1f s" % (host, port, timeout)) from None
        except ControlError:
            raise
        except OSError as e:
            raise ControlError("control %s:%d: %s" % (host, port, e.strerror or e)) from None


async def relay(path, req, timeout, on_partial=None):
    """query() from inside an event loop, to a socket path: send req as it
    is (its "id" too), hand partial lines to on_partial, return the reply
    dict. What a supervisor uses to pass a command on to a worker.
    ControlError when the socket is not there, the connection closes before
    the reply, or a line takes longer than timeout s."""
    sp = _Short(path)
    try:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(sp.path, limit=1 << 24), timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise ControlError("control %s: %s" % (path, getattr(e, "strerror", None) or e or "connect timed out"))
    finally:
        sp.close()
    try:
        writer.write(json.dumps(req).encode() + b"\n")
        while True:
            try:
                line = await asyncio.wait_for(reader.readline(), timeout)
            except asyncio.TimeoutError:
                raise ControlError("control %s: no reply within %.1f s" % (path, timeout)) from None
            except (OSError, ValueError) as e:
                raise ControlError("control %s: %s" % (path, e)) from None
            if not line:
                raise ControlError("control %s: connection closed before the reply (the process stopped?)" % path)
            msg = _parse_partial(line.rstrip(b"\n"))
            if msg is not None:
                if on_partial is not None:
                    on_partial(msg)
                continue
            try:
                reply = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                raise ControlError("control %s: reply is not JSON" % path) from None
            if not isinstance(reply, dict):
                raise ControlError("control %s: reply is not a JSON object" % path)
            return reply
    finally:
        writer.close()


def _main(argv):
    if len(argv) < 2:
        print("usage: python -m microtun_host.control SOCKET-PATH|HOST:PORT CMD [JSON-FIELDS]", file=sys.stderr)
        return 2
    req = {"cmd": argv[1]}
    if len(argv) > 2:
        try:
            extra = json.loads(argv[2])
        except ValueError as e:
            extra = e
        if not isinstance(extra, dict):
            print("control: JSON-FIELDS must be one JSON object, e.g. '{\"level\": \"debug\"}'", file=sys.stderr)
            return 2
        req.update(extra)
    try:
        reply = query(argv[0], req, timeout=2.0)
    except ControlError as e:
        print(e, file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2, sort_keys=True))
    return 0 if reply.get("ok") else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
