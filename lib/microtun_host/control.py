"""The loopback control channel of a host process (PoP now, gateway later).

One JSON request per UDP datagram, one JSON reply datagram back:

    -> {"cmd": "stats", "id": 7}
    <- {"ok": true, "id": 7, ...}
    <- {"ok": false, "id": 7, "error": "unknown command 'stat' (known: ping, reload, stats)"}

A process serves a dict of commands (name -> function(request) -> dict);
"ping" is always there. "id", when present, is echoed so a client can match
replies. Bound to loopback only: any local user can read stats and trigger a
reload, nobody else can reach it. See docs/OUTER.md ("Control channel").

    transport = await control.serve(Address or (host, port), {"stats": fn, ...}, log)
    reply = control.query("127.0.0.1:7001", {"cmd": "stats"}, timeout=1.0)

Shell: python -m microtun_host.control 127.0.0.1:7001 stats
"""
import asyncio
import ipaddress
import json
import os
import socket
import sys

MAX_DATAGRAM = 65507          # largest UDP payload over IPv4


class ControlError(Exception):
    """query() got no reply in time, or a reply that is not a JSON object."""


def _host_port(addr):
    if isinstance(addr, str):
        from microtun_host.config import parse_address
        a = parse_address(addr)
        if a is None:
            raise ValueError("control address must be \"a.b.c.d:port\" or \"[v6]:port\", got %r" % addr)
        return a.host, a.port
    if hasattr(addr, "sockaddr"):
        return addr.sockaddr
    return addr[0], addr[1]


def _family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _encode(reply):
    data = json.dumps(reply, separators=(",", ":"), sort_keys=True).encode()
    if len(data) > MAX_DATAGRAM:
        data = json.dumps({"ok": False, "id": reply.get("id"),
                           "error": "reply of %d bytes does not fit one datagram" % len(data)}).encode()
    return data


class ControlProtocol(asyncio.DatagramProtocol):
    def __init__(self, commands, log=None):
        self.commands = dict(commands)
        self.commands.setdefault("ping", lambda req: {})
        self.log = log
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        reply = self.handle(data)
        try:
            self.transport.sendto(_encode(reply), addr)
        except OSError as e:          # the client went away: nothing to do
            if self.log:
                self.log.debug("control: cannot reply to %s: %s", addr, e)

    def handle(self, data):
        """Reply dict for one request datagram; never raises."""
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
                reply = dict(fn(req))
                reply.setdefault("ok", True)
            except Exception as e:    # a bug in a handler must not kill the process
                if self.log:
                    self.log.exception("control: command %r failed", req["cmd"])
                reply = {"ok": False, "error": "internal error in %r: %s" % (req["cmd"], e)}
        if rid is not None:
            reply["id"] = rid
        return reply


async def serve(addr, commands, log=None):
    """Serve commands (name -> fn(request) -> dict) on a loopback UDP address;
    returns the asyncio transport (close() it to stop)."""
    host, port = _host_port(addr)
    if not ipaddress.ip_address(host).is_loopback:
        raise ValueError("the control channel binds to loopback only (127.0.0.0/8 or ::1), not %s" % host)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: ControlProtocol(commands, log), local_addr=(host, port), family=_family(host))
    return transport


def query(addr, request, timeout=1.0):
    """Send one request (a dict with "cmd") and return the reply dict.
    Raises ControlError when no matching reply arrives within timeout s."""
    host, port = _host_port(addr)
    req = dict(request)
    rid = req.setdefault("id", int.from_bytes(os.urandom(4), "big"))
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
        except OSError as e:
            raise ControlError("control %s:%d: %s" % (host, port, e.strerror or e)) from None


def _main(argv):
    if len(argv) < 2:
        print("usage: python -m microtun_host.control HOST:PORT CMD [JSON-FIELDS]", file=sys.stderr)
        return 2
    req = {"cmd": argv[1]}
    if len(argv) > 2:
        req.update(json.loads(argv[2]))
    try:
        reply = query(argv[0], req, timeout=2.0)
    except (ControlError, ValueError) as e:
        print(e, file=sys.stderr)
        return 1
    print(json.dumps(reply, indent=2, sort_keys=True))
    return 0 if reply.get("ok") else 1


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
