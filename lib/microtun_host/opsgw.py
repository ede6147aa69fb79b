"""The gateway's half of the operations channel (docs/OPS.md): operator
authorisation, the per-device permission, the audit log, and the reliable
request/reply exchange with a device's ops agent inside its E2E session.

    ops = GatewayOps(server)               # GatewayServer: sessions, registry, logging
    commands.update(ops.commands())        # control socket: ops_challenge, ops_login, ops
    ops.on_reply(peer, payload)            # a channel-0 payload from a device starting with 0x11

An operator proves an Ed25519 key the gateway trusts ("operators" in
gateway.json) by signing a fresh challenge, and gets a token bound to one
device for a short time (600 s unless asked for less; at most 3600). Every
`ops` request carries that token; the gateway runs it against the device
(retransmitting over the lossy path, a window of requests in flight for
transfers), and logs one line per operation: who, which device, what, the
result and how long it took. Only the owner of the control socket reaches
any of this (control.py), so the challenge, the login and the token are a
second, separate check: the right to operate one device, for a while.
"""
import asyncio
import base64
import codecs
import contextvars
import logging
import os
import time

from microtun import ops as wire
from microtun_host import control

log = logging.getLogger("microtun.gateway")

TOKEN_TTL_S = 600
TOKEN_TTL_MAX_S = 3600
CHALLENGE_S = 30
MAX_CHALLENGES = 256
MAX_TOKENS = 1024
REQUEST_TIMEOUT_S = 5.0         # one request without any answer: the device is gone
RTO_MIN_S = 0.1                 # retransmission timeout: RFC 6298 (srtt + 4 rttvar), within these
RTO_INIT_S = 0.5
RTO_MAX_S = 2.0
WINDOW = 16                     # transfer requests in flight per device
LOGS_WAIT_MAX_S = 30            # a logs request held on the device until a line comes (`logs --follow`)
STREAM_CREDIT = 64              # pushes a streamed exec may send (microtun.ops.EXEC_S): <= 64 KB of output
FAST_AFTER = 3                  # answers to later requests that make an unanswered one count as lost
MAX_BATCH = 40 * wire.PAGE      # put_data / get_data bytes per control request: in base64, under control.MAX_REQUEST
LOGIN_CONTEXT = b"microtun-ops-login-v1"
# how long one request may go unanswered, for the control request being served ("timeout" in it)
_timeout = contextvars.ContextVar("ops_timeout", default=REQUEST_TIMEOUT_S)


def login_message(gateway, device, nonce_hex, ttl):
    """What an operator signs to get a token (Ed25519)."""
    return b"\n".join((LOGIN_CONTEXT, gateway.encode(), device.encode(), nonce_hex.encode(), b"%d" % ttl))


class Refused(Exception):
    """An ops control request refused before it reaches the device: one line."""


class _Dev:
    """Per device: request ids, the replies awaited, the RTT seen by ops."""

    def __init__(self):
        self.rid = int.from_bytes(os.urandom(4), "big")
        self.pending = {}           # rid -> [op, future, packet, send order, fast-retransmitted, on_push, last push]
        self.sent = 0               # send order of the newest request
        self.srtt = None
        self.rttvar = None
        self.window = asyncio.Semaphore(WINDOW)

    def rto(self):
        if self.srtt is None:
            return RTO_INIT_S
        return min(RTO_MAX_S, max(RTO_MIN_S, self.srtt + 4 * self.rttvar))

    def sample(self, r):
        """An RTT sample from a request answered without retransmission (Karn), RFC 6298 §2."""
        if self.srtt is None:
            self.srtt, self.rttvar = r, r / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - r)
            self.srtt = 0.875 * self.srtt + 0.125 * r

    def next_rid(self):
        self.rid = (self.rid + 1) & 0xFFFFFFFF
        return self.rid


class GatewayOps:
    def __init__(self, server):
        self.server = server
        self.challenges = {}        # nonce hex -> (device, expiry)
        self.tokens = {}            # token hex -> (operator hex, device, expiry)
        self.devs = {}              # public key -> _Dev
        self.stats = {}

    # -- configuration ---------------------------------------------------------------------
    @property
    def operators(self):
        return self.server.cfg.operators

    def allowed(self, name):
        return name in self.server.ops_devices

    def _count(self, what, peer=None):
        """Counted in the gateway's counters (microtun status), and the device's when known."""
        self.stats[what] = self.stats.get(what, 0) + 1
        if peer is not None:
            self.server._dev_count(peer, what)
        else:
            self.server._count(what)

    def commands(self):
        return {"ops_challenge": self.challenge, "ops_login": self.login, "ops": self.run}

    # -- authorisation ---------------------------------------------------------------------------
    def _sweep(self, now):
        for d in (self.challenges, self.tokens):
            for k in [k for k, v in d.items() if v[-1] <= now]:
                del d[k]

    def _device(self, req):
        name = req.get("device")
        if not isinstance(name, str) or name not in self.server.names:
            raise Refused("unknown device %r (the registry has %s)" % (
                name, ", ".join(sorted(self.server.names)) or "no devices"))
        if not self.allowed(name):
            peer = self.server.core.peers.get(self.server.names[name])
            self._count("ops_denied", peer)
            self.server._rlog(name, "ops_denied", "device %s: ops refused: the registry does not allow ops for it "
                                                  "(ops = true on its [[device]], then provision and reload)")
            raise Refused("device %s does not allow ops: set ops = true on its [[device]] in the topology, "
                          "provision, and reload the gateway" % name)
        return name

    def challenge(self, req):
        try:
            name = self._device(req)
        except Refused as e:
            return {"ok": False, "error": str(e)}
        if not self.operators:
            self._count("ops_no_operators")
            return {"ok": False, "error": "this gateway trusts no operator key: add \"operators\" (Ed25519 public "
                                          "keys, hex) to gateway.json, or operators = [...] under [gateway] in "
                                          "the topology, and restart it"}
        now = time.monotonic()
        self._sweep(now)
        if len(self.challenges) >= MAX_CHALLENGES:
            self._count("ops_challenge_limited")
            return {"ok": False, "error": "too many open challenges; try again in %d s" % CHALLENGE_S}
        nonce = os.urandom(16).hex()
        self.challenges[nonce] = (name, now + CHALLENGE_S)
        return {"nonce": nonce, "gateway": self.server.cfg.name}

    def login(self, req):
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        now = time.monotonic()
        self._sweep(now)
        try:
            name = self._device(req)
        except Refused as e:
            return {"ok": False, "error": str(e)}
        nonce, op_hex, sig, ttl = req.get("nonce"), req.get("operator"), req.get("sig"), req.get("ttl", TOKEN_TTL_S)
        ch = self.challenges.pop(nonce, None) if isinstance(nonce, str) else None
        why = None
        if ch is None or ch[0] != name:
            why = "unknown or expired challenge (they last %d s and serve once); ask for a new one" % CHALLENGE_S
        elif not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= TOKEN_TTL_MAX_S:
            why = "ttl must be 1..%d seconds" % TOKEN_TTL_MAX_S
        elif not isinstance(op_hex, str) or op_hex.lower() not in self.operators:
            why = "operator key %s is not trusted by this gateway (\"operators\" in gateway.json)" % (
                str(op_hex)[:16] + "...")
        else:
            try:
                Ed25519PublicKey.from_public_bytes(bytes.fromhex(op_hex)).verify(
                    bytes.fromhex(sig), login_message(self.server.cfg.name, name, nonce, ttl))
            except (InvalidSignature, ValueError, TypeError):
                why = "bad signature for operator %s..." % op_hex[:16]
        peer = self.server.core.peers.get(self.server.names[name])
        if why is not None:
            self._count("ops_bad_login", peer)
            self.server._rlog(name, "ops_bad_login", "device %%s: ops login refused: %s" % why.replace("%", "%%"))
            return {"ok": False, "error": "ops login refused: " + why}
        if len(self.tokens) >= MAX_TOKENS:
            return {"ok": False, "error": "too many live tokens; try again when some expire"}
        token = os.urandom(16).hex()
        self.tokens[token] = (op_hex.lower(), name, now + ttl)
        log.info("ops: operator %s... logged in for device %s, token %s... valid %d s", op_hex[:16], name,
                 token[:8], ttl)
        return {"token": token, "expires_in": ttl}

    def _check_token(self, req, name):
        tok = req.get("token")
        now = time.monotonic()
        t = self.tokens.get(tok) if isinstance(tok, str) else None
        peer = self.server.core.peers.get(self.server.names[name])
        if t is None or t[2] <= now:
            self._count("ops_bad_token", peer)
            self.server._rlog(name, "ops_bad_token", "device %s: ops request with a bad or expired token refused")
            raise Refused("bad or expired ops token; log in again (microtun ops DEVICE ... with --operator-key, "
                          "or a fresh `microtun ops DEVICE token`)")
        if t[1] != name:
            self._count("ops_bad_token", peer)
            raise Refused("this ops token is for device %s, not %s" % (t[1], name))
        return t[0]

    # -- the exchange with the device ----------------------------------------------------------------
    def on_reply(self, peer, data):
        r = wire.parse_reply(data)
        d = self.devs.get(peer.public_key)
        if r is None:
            self._count("ops_malformed_reply", peer)
            return
        if r[2] == wire.STREAM:         # output of a running snippet, pushed (EXEC_S): the reply comes later
            p = d.pending.get(r[1]) if d is not None else None
            if p is None or p[0] != wire.EXEC_S or p[5] is None or p[1].done() or len(r[3]) < 4:
                self._count("ops_late_reply", peer)
                return
            p[6] = time.monotonic()
            self._count("ops_stream_rx", peer)
            p[5](wire.u32(r[3], 0), r[3][4:])
            return
        p = d.pending.pop(r[1], None) if d is not None else None
        if p is None or p[1].done() or p[0] != r[0]:
            self._count("ops_late_reply", peer)         # a retransmission's second answer
            return
        p[1].set_result((r[2], r[3]))
        # Fast retransmit (as TCP's on three duplicate ACKs, RFC 5681 §3.2): a request sent
        # FAST_AFTER or more requests before this answered one is taken as lost, sent again now
        # rather than at its timeout; once per request.
        for q in d.pending.values():
            if not q[4] and p[3] - q[3] >= FAST_AFTER:
                q[4] = True
                self._count("ops_fast_retransmit")
                try:
                    self.server.send(peer.public_key, 0, q[2])
                except ValueError:
                    pass

    async def request(self, name, op, body=b"", timeout=None, on_push=None, hold=0.0):
        """One request, retransmitted until answered: (status, body). Raises
        Refused when the device does not answer within timeout. on_push
        (EXEC_S): called with (offset, bytes) for each push of output; a
        push shows the device has the request and is running it, so the
        timeout runs from the latest push. hold: the device may keep the
        request this long before it answers (a logs request waiting for a
        line): not sent again before hold + RTO."""
        if timeout is None:
            timeout = _timeout.get()
        pub = self.server.names[name]
        d = self.devs.get(pub)
        if d is None:
            d = self.devs[pub] = _Dev()
        rid = d.next_rid()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        pkt = wire.request(op, rid, body)
        d.sent += 1
        ent = d.pending[rid] = [op, fut, pkt, d.sent, False, on_push, None]
        t0 = loop.time()
        end = t0 + timeout + hold
        rto = d.rto() + hold
        first = True
        try:
            while True:
                try:
                    self.server.send(pub, 0, pkt)
                except ValueError:          # revoked meanwhile
                    raise Refused("device %s was removed from the registry" % name) from None
                if not first:
                    self._count("ops_retransmit")
                left = end - loop.time()
                if left <= 0:
                    break
                try:
                    res = await asyncio.wait_for(asyncio.shield(fut), min(rto, left))
                except asyncio.TimeoutError:
                    if ent[6] is not None:      # pushes came: it runs; the timeout counts from the latest
                        end = max(end, ent[6] + timeout)      # loop.time() is time.monotonic()
                    # sent again all the same (its reply may be lost): a device still running it answers
                    # the copy from its cache once the snippet ends
                    first = False
                    rto = min(RTO_MAX_S + hold, rto * 2)
                    continue
                if first and ent[6] is None and not hold:    # Karn: only unambiguous samples (not a snippet's run time)
                    d.sample(loop.time() - t0)
                return res
        finally:
            d.pending.pop(rid, None)
            if not fut.done():
                fut.cancel()
        self._count("ops_timeout", self.server.core.peers.get(pub))
        raise Refused("device %s did not answer %s within %.1f s: is it online (microtun status), and does its "
                      "config allow ops (\"ops\": true)?" % (name, wire.NAMES.get(op, op), timeout))

    async def _ok(self, name, op, body=b"", what=None, on_push=None):
        st, rep = await self.request(name, op, body, on_push=on_push)
        if st != wire.OK:
            raise Refused("device %s: %s" % (name, rep.decode("utf-8", "replace")))
        return rep

    async def _windowed(self, name, reqs):
        """Run [(op, body)] with up to WINDOW in flight: the ok bodies, in order."""
        pub = self.server.names[name]
        d = self.devs.get(pub)
        if d is None:
            d = self.devs[pub] = _Dev()

        async def one(op, body):
            async with d.window:
                return await self._ok(name, op, body)
        tasks = [asyncio.ensure_future(one(op, body)) for op, body in reqs]
        try:
            return await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()

    # -- one control request ---------------------------------------------------------------------------
    async def run(self, req):
        t0 = time.monotonic()
        name = req.get("device")
        op = req.get("op")
        who = "?"
        try:
            name = self._device(req)
            who = self._check_token(req, name)[:16] + "..."
            tmo = req.get("timeout", REQUEST_TIMEOUT_S)
            if not isinstance(tmo, (int, float)) or not 0.2 <= tmo <= 120:
                raise ValueError("timeout must be 0.2..120 s")
            _timeout.set(float(tmo))
            fn = getattr(self, "_op_" + op, None) if isinstance(op, str) else None
            if fn is None:
                raise Refused("unknown ops request %r (known: %s)" % (op, ", ".join(sorted(
                    n[4:] for n in dir(self) if n.startswith("_op_")))))
            reply, what = await fn(name, req)
            self._count("ops_ok", self.server.core.peers.get(self.server.names[name]))
            result = "ok"
        except Refused as e:
            reply, what, result = {"ok": False, "error": str(e)}, op, "refused: %s" % e
            if name in self.server.names:
                self._count("ops_failed", self.server.core.peers.get(self.server.names[name]))
        except (ValueError, TypeError, KeyError) as e:
            reply, what, result = {"ok": False, "error": "malformed ops request: %s" % e}, op, "malformed"
        log.info("ops: operator %s on device %s: %s -> %s (%d ms)", who, name, what, result,
                 (time.monotonic() - t0) * 1000)
        return reply

    async def _op_exec(self, name, req):
        code = req["code"].encode()
        if len(code) > wire.MAX_CODE:
            raise Refused("snippet of %d bytes is over the device's limit of %d" % (len(code), wire.MAX_CODE))
        send = control.partial_sender(req)       # the client streams: ask the device to push its output
        out = bytearray()                        # the output's bytes from 0, as far as they are contiguous
        early = {}                               # offset -> bytes: pushes that came past a gap
        dec = codecs.getincrementaldecoder("utf-8")("replace")
        fed = [0]                                # bytes of out passed on to the client

        def pushed(off, data):
            if off > len(out):                   # a push before it was lost: keep it for later
                if len(early) < STREAM_CREDIT:
                    early[off] = bytes(data)
                return
            if off + len(data) <= len(out):      # had it
                return
            out.extend(data[len(out) - off:])
            while len(out) in early:
                out.extend(early.pop(len(out)))
            text = dec.decode(bytes(out[fed[0]:]))
            fed[0] = len(out)
            if text:
                send({"output": text})
        op = wire.EXEC_S if send is not None else wire.EXEC
        step = wire.PAGE - 8
        off = 0
        while True:
            part = code[off:off + step]
            body = wire.p32(len(code)) + wire.p32(off) + part
            if op == wire.EXEC_S:
                body = bytes((STREAM_CREDIT,)) + body
            st, rep = await self.request(name, op, body, on_push=pushed if op == wire.EXEC_S else None)
            if st != wire.OK and op == wire.EXEC_S and off == 0 and rep.startswith(b"unknown ops request"):
                op = wire.EXEC                   # firmware from before streaming: the output at the end
                continue
            if st != wire.OK:
                raise Refused("device %s: %s" % (name, rep.decode("utf-8", "replace")))
            off += len(part)
            if rep[:1] != b"\x02":
                break
            if off >= len(code):
                raise Refused("device %s: exec acknowledged every part but ran nothing" % name)
        raised = rep[0] == 1
        total = wire.u32(rep, 1)
        first = rep[5:]
        if len(first) > len(out):
            out.extend(first[len(out):])
        while len(out) < total:
            page = await self._ok(name, wire.RESULT, wire.p32(len(out)))
            if not page:
                break
            out.extend(page)
        text = bytes(out).decode("utf-8", "replace")
        printed, _, err = text.partition("\x04")
        return ({"output": printed, "error": err if raised else None},
                "exec %d bytes -> %d bytes out%s" % (len(code), len(printed), ", raised" if raised else ""))

    async def _op_ls(self, name, req):
        path = req.get("path", "") or ""
        entries = []
        start = 0
        while True:
            rep = await self._ok(name, wire.LS, bytes(((start >> 8) & 255, start & 255)) + path.encode())
            i = 3
            while i < len(rep):
                isdir, size, n = rep[i], wire.u32(rep, i + 1), rep[i + 5]
                entries.append([rep[i + 6:i + 6 + n].decode("utf-8", "replace"), size, bool(isdir)])
                i += 6 + n
            if not rep[0]:
                break
            start = (rep[1] << 8) | rep[2]
        return {"entries": entries}, "ls %r (%d entries)" % (path, len(entries))

    async def _op_put_open(self, name, req):
        digest = bytes.fromhex(req["sha256"])
        if len(digest) != 32:
            raise ValueError("sha256 must be 64 hex characters")
        rep = await self._ok(name, wire.PUT_OPEN, wire.p32(int(req["size"])) + digest + req["path"].encode())
        return {"have": wire.u32(rep, 0)}, "put %r %d bytes (open)" % (req["path"], req["size"])

    async def _op_put_data(self, name, req):
        data = base64.b64decode(req["data"])
        off = int(req["offset"])
        if len(data) > MAX_BATCH or off % wire.PAGE:
            raise ValueError("put_data takes at most %d bytes at a multiple of %d" % (MAX_BATCH, wire.PAGE))
        reqs = [(wire.PUT_DATA, wire.p32(off + i) + data[i:i + wire.PAGE]) for i in range(0, len(data), wire.PAGE)]
        await self._windowed(name, reqs)
        return {}, "put data %d bytes at %d" % (len(data), off)

    async def _op_put_done(self, name, req):
        await self._ok(name, wire.PUT_DONE)
        return {}, "put %r done, sha256 verified on the device" % req.get("path", "?")

    async def _op_get_open(self, name, req):
        rep = await self._ok(name, wire.GET_OPEN, req["path"].encode())
        return {"size": wire.u32(rep, 0), "sha256": rep[4:36].hex()}, "get %r (open)" % req["path"]

    async def _op_get_data(self, name, req):
        off, n, path = int(req["offset"]), int(req["length"]), req["path"].encode()
        if not 0 < n <= MAX_BATCH:
            raise ValueError("get_data takes 1..%d bytes" % MAX_BATCH)
        reqs = []
        for o in range(off, off + n, wire.PAGE):
            k = min(wire.PAGE, off + n - o)
            reqs.append((wire.GET_DATA, wire.p32(o) + bytes(((k >> 8) & 255, k & 255)) + path))
        pages = await self._windowed(name, reqs)
        data = b"".join(p[4:] for p in pages)
        return {"data": base64.b64encode(data).decode()}, "get data %d bytes at %d" % (len(data), off)

    async def _op_health(self, name, req):
        import json
        rep = await self._ok(name, wire.HEALTH)
        return {"health": json.loads(rep.decode())}, "health"

    async def _op_logs(self, name, req):
        since = int(req.get("since", 0))
        wait = req.get("wait", 0)
        if not isinstance(wait, (int, float)) or not 0 <= wait <= LOGS_WAIT_MAX_S:
            raise ValueError("wait must be 0..%d s" % LOGS_WAIT_MAX_S)
        body = wire.p32(since)
        if wait:                # held on the device until a new line, at most wait s
            ms = int(wait * 1000)
            body += bytes(((ms >> 8) & 255, ms & 255))
        # the device answers within wait, give or take its poll (firmware: 0.5 s at most)
        st, rep = await self.request(name, wire.LOGS, body, hold=float(wait) + 0.5 if wait else 0.0)
        if st != wire.OK:
            raise Refused("device %s: %s" % (name, rep.decode("utf-8", "replace")))
        return ({"next": wire.u32(rep, 0), "first": wire.u32(rep, 4), "text": rep[8:].decode("utf-8", "replace")},
                "logs since %d" % since)

    async def _op_reboot(self, name, req):
        await self._ok(name, wire.REBOOT)
        return {}, "reboot"

    async def _op_reset(self, name, req):
        await self._ok(name, wire.RESET)
        return {}, "reset (exec globals cleared)"
