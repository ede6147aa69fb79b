"""The device side of the operations channel (docs/OPS.md): run a snippet,
list, read and write files, health, log tail, reboot, all inside the E2E
tunnel on channel 0. Loaded only when the first ops request arrives on a
device whose config says "ops": true (TunnelCore._events); a device that
never sees one never imports this module.

    agent = Agent(core, root="/")          # core: the TunnelCore (health, log ring, reboot flag)
    reply = agent.handle(request)          # one request -> one reply (bytes) or None

Wire (all integers big-endian, a message is one channel-0 payload):

    request   10 op(1) rid(4) body
    reply     11 op(1) rid(4) status(1) body     status 0 ok, 1 error (body: one line of text)

One reply per request, never larger than a page (PAGE bytes of data plus
a small header). The one exception is asked for: EXEC_S carries a credit,
and while the snippet runs its printed output is pushed (status STREAM) in
at most that many messages of at most a page each, one per STREAM_MS
unless a full page waits; the final reply follows as for EXEC. A LOGS
request with a wait is answered later (tick(), from the driver's poll),
still once. Both need the driver's core.ops_io, (clock, flush): its
millisecond ticks and a function sending what the core queued at once;
without it nothing is pushed or held (the agent itself reads no clock).

The gateway retransmits a request it got no reply to; ops that are not
idempotent (EXEC, EXEC_S, PUT_DONE, RESET, REBOOT) answer a retransmission
from a small cache instead of running twice.

The gateway is the only sender (the tunnel authenticates it); operators are
authorised there (docs/OPS.md, "Security model"). Still, every request is
checked here: malformed or out-of-range input is a counted drop or an error
reply, never an exception out of handle().
"""
import gc
import hashlib
import os
import sys

if __import__("sys").implementation.name != "micropython":
    def const(x):   # CPython; MicroPython's compiler folds const() with no name bound (a global costs a board heap)
        return x

CTL_OPS_REQ = const(0x10)
CTL_OPS_REP = const(0x11)
HEADER = const(6)               # type, op, rid
OK = const(0)
ERR = const(1)

EXEC = const(1)         # total(4) off(4) code   -> ok: raised(1) out_len(4) first page | (parts) ok: have(4)
RESULT = const(2)       # off(4)                 -> ok: page of the last exec's output
LS = const(3)           # start(2) path          -> ok: more(1) next(2), entries is_dir(1) size(4) len(1) name
PUT_OPEN = const(4)     # size(4) sha256(32) path -> ok: have(4), bytes already there (resume)
PUT_DATA = const(5)     # off(4) data            -> ok: off(4)
PUT_DONE = const(6)     # (none)                 -> ok, or error (hash mismatch, write failed)
GET_OPEN = const(7)     # path                   -> ok: size(4) sha256(32)
GET_DATA = const(8)     # off(4) n(2)            -> ok: off(4) data
HEALTH = const(9)       # (none)                 -> ok: JSON
LOGS = const(10)        # since(4) [wait_ms(2)]  -> ok: next(4) first(4) text; with wait_ms and nothing new,
                        #                           the reply waits for a new line (at most wait_ms: tick())
REBOOT = const(11)      # (none)                 -> ok; the firmware restarts once the reply is out
RESET = const(12)       # (none)                 -> ok; exec's globals start afresh (mpremote's soft reset)
EXEC_S = const(13)      # credit(1) + EXEC's body -> as EXEC; meanwhile up to `credit` pushes of the output
STREAM = const(2)       # reply status of a push: off(4) output bytes, sent while the snippet runs
STREAM_MS = const(50)   # a push at most this often, unless a page of output is waiting

NAMES = {EXEC: "exec", RESULT: "result", LS: "ls", PUT_OPEN: "put_open", PUT_DATA: "put_data",
         PUT_DONE: "put_done", GET_OPEN: "get_open", GET_DATA: "get_data", HEALTH: "health", LOGS: "logs",
         REBOOT: "reboot", RESET: "reset", EXEC_S: "exec_stream"}

PAGE = const(1024)              # data bytes per reply (and per PUT_DATA request)
MAX_CODE = const(32768)         # a snippet's source
MAX_OUTPUT = const(32768)       # what one exec may print; the rest is cut with a note
MAX_FILE = const(16777216)      # one put
_CACHE = const(8)               # replies kept for retransmitted non-idempotent requests
_META_EVERY = const(16)         # chunks between two saves of a put's resume point
_NO_CACHE = (PUT_DATA, GET_DATA, GET_OPEN, RESULT, LS, HEALTH, LOGS, PUT_OPEN)


def serve(core, d, now):
    """TunnelCore's hook (its config allows ops): one request from the
    gateway, answered on channel 0."""
    if core.ops is None:
        core.ops = Agent(core, core.ops_root)
    rep = core.ops.handle(d)
    if rep is not None:
        core.device.send(0, rep, now)


def u32(b, i):
    return (b[i] << 24) | (b[i + 1] << 16) | (b[i + 2] << 8) | b[i + 3]


def p32(n):
    return bytes(((n >> 24) & 255, (n >> 16) & 255, (n >> 8) & 255, n & 255))


def request(op, rid, body=b""):
    return bytes((CTL_OPS_REQ, op)) + p32(rid) + body


def parse_reply(d):
    """(op, rid, status, body) of a reply, or None if it is not one."""
    if len(d) < HEADER + 1 or d[0] != CTL_OPS_REP:
        return None
    return d[1], u32(d, 2), d[6], bytes(d[7:])


class OpsError(Exception):
    """An ops request the agent refuses: str(e) is the one line sent back."""


def safe_path(root, path):
    """root + path, where path ("/lib/x.py", "lib/x.py", "") may not leave
    root: ".." and NUL are refused; "." and empty parts are dropped."""
    if "\x00" in path:
        raise OpsError("bad path %r: NUL byte" % path)
    parts = []
    for p in path.split("/"):
        if p == "..":
            raise OpsError("path %r leaves the device's ops root" % path)
        if p and p != ".":
            parts.append(p)
    if not parts:
        return root
    return (root.rstrip("/") + "/" if root not in ("", "/") else root) + "/".join(parts)


def _isdir(path):
    try:
        return os.stat(path)[0] & 0x4000 != 0
    except OSError:
        return False


def _sha256_file(path, buf):
    h = hashlib.sha256()
    mv = memoryview(buf)
    with open(path, "rb") as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(mv[:n])
    return h.digest()


def _exc_text(e):
    try:
        import io
        out = io.StringIO()
        if hasattr(sys, "print_exception"):
            sys.print_exception(e, out)
        else:                               # CPython
            import traceback
            traceback.print_exception(type(e), e, e.__traceback__, file=out)
        return out.getvalue()
    except Exception:
        return "%s: %s\n" % (type(e).__name__, e)


class _Put:
    """One file transfer into the device: written at its offsets into
    PATH.part, a bitmap of chunks in RAM, the contiguous prefix saved in
    PATH.part.meta now and then (what survives a reboot: the resume point)."""

    def __init__(self, path, size, digest):
        self.path = path
        self.size = size
        self.digest = digest
        self.part = path + ".part"
        n = (size + PAGE - 1) // PAGE
        self.nchunks = n
        self.bits = bytearray((n + 7) // 8)
        self.prefix = 0             # chunks 0..prefix-1 all present
        self.saved = 0
        self.f = None

    def meta_text(self):
        return "%d %s %d\n" % (self.size, "".join("%02x" % b for b in self.digest), self.prefix)

    def has(self, i):
        return self.bits[i >> 3] & (1 << (i & 7))

    def mark(self, i):
        self.bits[i >> 3] |= 1 << (i & 7)
        while self.prefix < self.nchunks and self.has(self.prefix):
            self.prefix += 1

    def close(self):
        if self.f is not None:
            try:
                self.f.close()
            except OSError:
                pass
            self.f = None


class Agent:
    def __init__(self, core, root="/"):
        self.core = core
        self.root = root
        self.stats = {}
        self.globals = None
        self.code = None            # exec source being received: [total, bytearray]
        self.out = b""              # the last exec's output (paged by RESULT)
        self.put = None
        self.cache = []             # [(rid, op, reply)]
        self.buf = bytearray(512)   # hashing
        self.rid = 0                # the request being handled (pushes carry it)
        self.wait = None            # a held logs request: (rid, since, since when ms, wait ms)

    def _count(self, what):
        self.stats[what] = self.stats.get(what, 0) + 1

    # -- dispatch ----------------------------------------------------------------------------
    def handle(self, d):
        """One request (a channel-0 payload starting with CTL_OPS_REQ) ->
        one reply, or None for a message too short to answer (counted)."""
        if len(d) < HEADER or d[0] != CTL_OPS_REQ:
            self._count("ops_malformed")
            return None
        op = d[1]
        rid = u32(d, 2)
        for r, o, rep in self.cache:
            if r == rid and o == op:
                self._count("ops_retransmit")
                return rep
        body = memoryview(d)[HEADER:]
        self.rid = rid
        fn = self._OPS.get(op)
        try:
            if fn is None:
                raise OpsError("unknown ops request %d (this firmware knows %s)" % (
                    op, ", ".join(sorted(NAMES.values()))))
            st, out = OK, fn(self, body)
            if out is None:         # a logs request held until a line comes (tick answers it)
                return None
            self._count("ops_ok")
        except OpsError as e:
            st, out = ERR, str(e).encode()
            self._count("ops_error")
        except OSError as e:
            st, out = ERR, ("%s: %s" % (NAMES.get(op, op), e)).encode()
            self._count("ops_error")
        except MemoryError:
            self.code = None
            self.out = b""
            gc.collect()
            st, out = ERR, b"out of memory on the device"
            self._count("ops_error")
        except (ValueError, IndexError, UnicodeError) as e:
            st, out = ERR, ("malformed %s request (%s)" % (NAMES.get(op, op), e)).encode()
            self._count("ops_malformed")
        if st == ERR:
            n = self.stats.get("ops_error", 0) + self.stats.get("ops_malformed", 0)
            log = getattr(self.core, "log", None)
            if log is not None and (n <= 10 or n % 100 == 0):    # rate-limited: the first ten, then every 100th
                log("warn", "ops %s refused: %s" % (NAMES.get(op, op), bytes(out[:200]).decode()))
        rep = bytes((CTL_OPS_REP, op)) + p32(rid) + bytes((st,)) + out[:PAGE + 64]
        if op not in _NO_CACHE:
            self.cache.append((rid, op, rep))
            if len(self.cache) > _CACHE:
                self.cache.pop(0)
        return rep

    # -- exec ----------------------------------------------------------------------------------
    def _exec_s(self, b):
        return self._exec(b[1:], b[0])

    def _exec(self, b, credit=0):
        total = u32(b, 0)
        off = u32(b, 4)
        part = b[8:]
        if total > MAX_CODE:
            raise OpsError("snippet of %d bytes is over the device's limit of %d" % (total, MAX_CODE))
        if off == 0:
            self.code = [total, bytearray()]
        elif self.code is None or self.code[0] != total or len(self.code[1]) != off:
            raise OpsError("exec part at %d out of order (have %d); send the snippet again" % (
                off, 0 if self.code is None else len(self.code[1])))
        c = self.code[1]
        if off + len(part) > total:
            self.code = None
            raise OpsError("exec part runs past the snippet's length %d" % total)
        c.extend(part)
        if len(c) < total:
            return b"\x02" + p32(len(c))     # more to come
        self.code = None
        src = bytes(c).decode()
        del c
        out, raised = self.run(src, credit)
        self.out = out
        return (b"\x01" if raised else b"\x00") + p32(len(out)) + out[:PAGE]

    def run(self, src, credit=0):
        """Run source in the ops globals (kept between runs, like a REPL's):
        (printed output + the traceback, if it raised; raised). print() is
        captured; what is written to sys.stdout directly goes to the console.
        With credit and a driver that can send mid-exec, the output is also
        pushed as it is printed (_stream)."""
        if self.globals is None:
            self.globals = {"__name__": "__main__"}
        buf = []
        size = [0]
        push = self._push if credit and getattr(self.core, "ops_io", None) is not None else None
        # credit left, last push (ms), bytes pushed, output not pushed yet
        st = [credit, None, 0, bytearray()] if push is not None else None

        def captured(*args, sep=" ", end="\n", file=None):
            if file is not None:
                print(*args, sep=sep, end=end, file=file)
                return
            s = sep.join([a if isinstance(a, str) else str(a) for a in args]) + end
            if size[0] < MAX_OUTPUT:
                buf.append(s)
            size[0] += len(s)
            if st is not None and st[0]:
                self._stream(st, s, size[0], push)
        g = self.globals
        g["print"] = captured
        raised = False
        err = ""
        try:
            exec(src, g)
        except (Exception, SystemExit) as e:
            raised = True
            err = _exc_text(e)
        out = "".join(buf)
        if size[0] > MAX_OUTPUT:
            out = out[:MAX_OUTPUT] + "\n[ops: output cut at %d of %d bytes]\n" % (MAX_OUTPUT, size[0])
        # output, then 0x04, then the traceback: the raw REPL's own framing
        return (out + "\x04" + err).encode(), raised

    def _stream(self, st, s, size, push):
        """Push what was printed since the last push: when STREAM_MS have
        passed since it, or a page is waiting; while credit lasts and the
        output is under MAX_OUTPUT (past it, or out of credit, the rest
        comes with the final reply and RESULT, as without streaming)."""
        if size > MAX_OUTPUT:
            st[0] = 0
            st[3] = None
            return
        from microtun.ticks import ticks_diff
        p = st[3]
        p.extend(s.encode())
        now = self.core.ops_io[0]()
        while p and st[0] and (st[1] is None or len(p) >= PAGE or ticks_diff(now, st[1]) >= STREAM_MS):
            n = min(len(p), PAGE)
            try:
                push(bytes((CTL_OPS_REP, EXEC_S)) + p32(self.rid) + bytes((STREAM,)) + p32(st[2]) + p[:n])
            except Exception:       # not the snippet's problem: the output still comes with the reply
                st[0] = 0
                break
            st[0] -= 1
            st[1] = now
            st[2] += n
            p = st[3] = p[n:]
        if not st[0]:
            st[3] = None

    def _result(self, b):
        off = u32(b, 0)
        return self.out[off:off + PAGE]

    def _reset(self, b):
        self.globals = None
        self.out = b""
        gc.collect()
        return b""

    # -- files ----------------------------------------------------------------------------------
    def _ls(self, b):
        start = (b[0] << 8) | b[1]
        path = safe_path(self.root, bytes(b[2:]).decode())
        if not _isdir(path):
            os.stat(path)           # OSError ENOENT for a missing one
            raise OpsError("%s is not a directory" % bytes(b[2:]).decode())
        out = bytearray(b"\x00\x00\x00")     # more(1) next start(2), then the entries
        i = 0
        for name in sorted(os.listdir(path)):
            if i >= start:
                nb = name.encode()[:255]
                full = safe_path(path, name)
                try:
                    st = os.stat(full)
                    isdir = st[0] & 0x4000 != 0
                    size = 0 if isdir else st[6]
                except OSError:
                    isdir, size = False, 0
                e = bytes((1 if isdir else 0,)) + p32(size) + bytes((len(nb),)) + nb
                if len(out) + len(e) > PAGE:
                    out[0] = 1      # more: ask again from i
                    out[1] = (i >> 8) & 255
                    out[2] = i & 255
                    return bytes(out)
                out.extend(e)
            i += 1
        return bytes(out)

    def _put_open(self, b):
        size = u32(b, 0)
        digest = bytes(b[4:36])
        rel = bytes(b[36:]).decode()
        if len(digest) != 32 or not rel:
            raise OpsError("put needs a size, a sha256 and a file name")
        if size > MAX_FILE:
            raise OpsError("file of %d bytes is over the limit of %d" % (size, MAX_FILE))
        path = safe_path(self.root, rel)
        if path == self.root or _isdir(path):
            raise OpsError("%s is a directory" % rel)
        p = self.put
        if p is not None and p.path == path and p.size == size and p.digest == digest:
            return p32(p.prefix * PAGE if p.prefix < p.nchunks else size)    # same transfer again: resume
        if p is not None:
            p.close()
        self.put = None
        free = _free_bytes(path)
        if free is not None and size > free:
            raise OpsError("not enough room on the device for %s: %d bytes, %d free" % (rel, size, free))
        p = _Put(path, size, digest)
        have = 0
        try:                        # a transfer cut by a reboot: its resume point
            with open(p.part + ".meta") as f:
                m = f.read().split()
            if len(m) == 3 and int(m[0]) == size and m[1] == "".join("%02x" % x for x in digest):
                k = min(int(m[2]), p.nchunks)
                if os.stat(p.part)[6] >= k * PAGE or k == p.nchunks:
                    for i in range(k):
                        p.mark(i)
                    have = k * PAGE
        except (OSError, ValueError):
            pass
        if not have:
            with open(p.part, "wb"):
                pass
        p.f = open(p.part, "r+b")
        self._save_meta(p)
        self.put = p
        return p32(min(have, size))

    def _save_meta(self, p):
        try:
            with open(p.part + ".meta", "w") as f:
                f.write(p.meta_text())
            p.saved = p.prefix
        except OSError:
            pass

    def _put_data(self, b):
        p = self.put
        off = u32(b, 0)
        data = b[4:]
        if p is None or p.f is None:
            raise OpsError("no transfer open (the device restarted?); run the put again to resume")
        if off % PAGE or off >= p.size and p.size or len(data) != min(PAGE, p.size - off):
            raise OpsError("chunk at %d with %d bytes does not fit the open transfer (%d bytes, %d per chunk)" % (
                off, len(data), p.size, PAGE))
        i = off // PAGE
        if i >= p.nchunks:
            raise OpsError("chunk at %d is past the end of the transfer" % off)
        if not p.has(i):
            p.f.seek(off)
            p.f.write(data)
            p.mark(i)
            if p.prefix - p.saved >= _META_EVERY:
                p.f.flush()
                self._save_meta(p)
        return p32(off)

    def _put_done(self, b):
        p = self.put
        if p is None:
            raise OpsError("no transfer open (the device restarted?); run the put again to resume")
        if p.prefix < p.nchunks:
            raise OpsError("transfer incomplete: chunk %d of %d missing" % (p.prefix, p.nchunks))
        p.close()
        self.put = None
        got = _sha256_file(p.part, self.buf)
        if got != p.digest:
            _remove(p.part)
            _remove(p.part + ".meta")
            raise OpsError("sha256 of the received file does not match (a corrupted transfer); %s removed, "
                           "nothing replaced" % p.part)
        _remove(p.path)
        os.rename(p.part, p.path)
        _remove(p.part + ".meta")
        return b""

    def _get_open(self, b):
        rel = bytes(b).decode()
        path = safe_path(self.root, rel)
        if _isdir(path):
            raise OpsError("%s is a directory" % rel)
        size = os.stat(path)[6]
        return p32(size) + _sha256_file(path, self.buf)

    def _get_data(self, b):
        off = u32(b, 0)
        n = (b[4] << 8) | b[5]
        path = safe_path(self.root, bytes(b[6:]).decode())
        if n > PAGE:
            raise OpsError("get chunk of %d bytes is over %d" % (n, PAGE))
        with open(path, "rb") as f:
            f.seek(off)
            return p32(off) + f.read(n)

    # -- health, logs, reboot ------------------------------------------------------------------
    def _health(self, b):
        import json
        h = self.core.health()
        gc.collect()
        try:
            h["heap"] = {"alloc": gc.mem_alloc(), "free": gc.mem_free()}
        except AttributeError:
            pass
        h["ops"] = dict(self.stats)
        h["boot"] = self.core.device._fresh.boot
        s = json.dumps(h)
        if len(s) > PAGE:           # many paths: keep the summary
            s = json.dumps({"established": h["established"], "boot": h["boot"], "heap": h.get("heap"),
                            "paths": [[p.get("name"), p.get("state"), p.get("srtt_ms")] for p in h["paths"]],
                            "tx_bytes": h["tx_bytes"], "rx_bytes": h["rx_bytes"]})
        return s.encode()

    def _logs(self, b):
        since = u32(b, 0)
        ring = getattr(self.core, "log_ring", None)
        if ring is None:
            return p32(0) + p32(0) + b"(no log ring: this driver keeps none)\n"
        io = getattr(self.core, "ops_io", None)
        if len(b) >= 6 and ring.seq <= since and io is not None:
            # nothing new: answer when there is (one request held; a newer one takes its place)
            self.wait = (self.rid, since, io[0](), (b[4] << 8) | b[5])
            return None
        nxt, first, text = ring.since(since, PAGE - 8)
        return p32(nxt) + p32(first) + text

    def tick(self):
        """The driver's poll: a held logs request's reply, once the ring has
        a newer line or its wait is over."""
        if self.wait is None:
            return
        from microtun.ticks import ticks_diff
        rid, since, t0, wait = self.wait
        if self.core.log_ring.seq > since or ticks_diff(self.core.ops_io[0](), t0) >= wait:
            self.wait = None
            nxt, first, text = self.core.log_ring.since(since, PAGE - 8)
            self._push(bytes((CTL_OPS_REP, LOGS)) + p32(rid) + bytes((OK,)) + p32(nxt) + p32(first) + text)

    def _push(self, data):
        """A channel-0 message out now, not at the end of the driver's poll
        (a running snippet's output; a held request's reply)."""
        core = self.core
        clock, flush = core.ops_io
        now = clock()
        core.device.send(0, data, now)
        core._flush(now)
        flush()

    def _reboot(self, b):
        self.core.reboot_requested = True
        return b""

    _OPS = {EXEC: _exec, RESULT: _result, LS: _ls, PUT_OPEN: _put_open, PUT_DATA: _put_data,
            PUT_DONE: _put_done, GET_OPEN: _get_open, GET_DATA: _get_data, HEALTH: _health, LOGS: _logs,
            REBOOT: _reboot, RESET: _reset, EXEC_S: _exec_s}


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _free_bytes(path):
    d = path.rsplit("/", 1)[0] if "/" in path else "."
    try:
        st = os.statvfs(d or "/")
        return st[1] * st[4]          # f_frsize * f_bavail
    except (AttributeError, OSError):
        return None
