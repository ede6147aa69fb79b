"""The ops channel's device agent (microtun.ops), sans-I/O: one request in,
one reply out, on a scratch directory; and its gating in TunnelCore over the
simulated stack (docs/OPS.md). Runs on CPython and the MicroPython unix port."""
import hashlib
import os
import sys

from microtun import ops as w
from microtun.logring import LogRing
from mtest import raises, Rng
from microtun.ticks import ticks_diff

PORTABLE = True


def scratch():
    d = "/tmp/microtun-ops-test-%d" % Rng(int.from_bytes(os.urandom(4), "big")).below(10 ** 9)
    os.mkdir(d)
    return d


def rmtree(d):
    for name in os.listdir(d):
        p = d + "/" + name
        if os.stat(p)[0] & 0x4000:
            rmtree(p)
        else:
            os.remove(p)
    os.rmdir(d)


class FakeFresh:
    boot = 7


class FakeDevice:
    _fresh = FakeFresh()

    def __init__(self):
        self.sent = []          # channel-0 messages queued (what the driver's ops_flush sends)

    def send(self, channel, data, now):
        assert channel == 0
        self.sent.append(data)


class FakeCore:
    def __init__(self):
        self.device = FakeDevice()
        self.log_ring = LogRing(lambda level, msg: None, 200)
        self.reboot_requested = False
        self.logged = []

    def log(self, level, msg):
        self.logged.append((level, msg))

    def health(self):
        return {"established": True, "paths": [], "tx_bytes": 1, "rx_bytes": 2}

    def _flush(self, now):
        pass


def clock():
    import time
    if hasattr(time, "ticks_ms"):
        return time.ticks_ms() & 0x3FFFFFFF
    return int(time.monotonic() * 1000) & 0x3FFFFFFF


def flushed_into(r, out, tag=None):
    """Give the rig's core a driver's ops_io (clock, flush): what the agent
    queued goes to out (with tag(), when given: the state at that moment)."""
    def flush():
        for m in r.core.device.sent:
            out.append(m if tag is None else (tag(), m))
        del r.core.device.sent[:]
    r.core.ops_io = (clock, flush)


class Rig:
    def __init__(self):
        self.dir = scratch()
        self.core = FakeCore()
        self.agent = w.Agent(self.core, self.dir)
        self.rid = 100

    def call(self, op, body=b"", rid=None):
        if rid is None:
            self.rid += 1
            rid = self.rid
        rep = self.agent.handle(w.request(op, rid, body))
        r = w.parse_reply(rep)
        assert r is not None and r[0] == op and r[1] == rid, rep
        return r[2], r[3]

    def ok(self, op, body=b""):
        st, b = self.call(op, body)
        assert st == w.OK, b
        return b

    def err(self, op, body=b""):
        st, b = self.call(op, body)
        assert st == w.ERR, b
        return b.decode()

    def exec(self, code):
        c = code.encode()
        rep = self.ok(w.EXEC, w.p32(len(c)) + w.p32(0) + c)
        out = rep[5:]
        while len(out) < w.u32(rep, 1):
            out += self.ok(w.RESULT, w.p32(len(out)))
        text = out.decode()
        i = text.find("\x04")
        return rep[0], text[:i], text[i + 1:]

    def put(self, name, data, order=None):
        digest = hashlib.sha256(data).digest()
        have = w.u32(self.ok(w.PUT_OPEN, w.p32(len(data)) + digest + name.encode()), 0)
        offs = list(range(0, len(data), w.PAGE))
        for off in (order(offs) if order else offs):
            self.ok(w.PUT_DATA, w.p32(off) + data[off:off + w.PAGE])
        return have

    def close(self):
        rmtree(self.dir)


def with_rig(fn):
    r = Rig()
    try:
        fn(r)
    finally:
        r.close()


def test_exec_prints_and_keeps_globals():
    with_rig(_exec_prints_and_keeps_globals)


def _exec_prints_and_keeps_globals(r):
    raised, out, err = r.exec("x = 6 * 7\nprint('x is', x)")
    assert (raised, out, err) == (0, "x is 42\n", "")
    assert r.exec("print(x + 1, end='')")[1] == "43"
    r.ok(w.RESET)
    raised, out, err = r.exec("print(x)")
    assert raised == 1 and "NameError" in err


def test_exec_raising_returns_the_traceback():
    with_rig(_exec_raising_returns_the_traceback)


def _exec_raising_returns_the_traceback(r):
    raised, out, err = r.exec("print('before')\n1/0")
    assert raised == 1 and out == "before\n"
    assert "ZeroDivisionError" in err and "Traceback" in err
    raised, out, err = r.exec("def f(:\n")
    assert raised == 1 and "SyntaxError" in err


def test_exec_in_parts_and_long_output_paged():
    with_rig(_exec_in_parts_and_long_output_paged)


def _exec_in_parts_and_long_output_paged(r):
    code = ("n = 0\n" + "n += 1\n" * 400 + "print('y' * 3000)\nprint(n)\n").encode()
    off = 0
    while off < len(code):
        part = code[off:off + 500]
        rep = r.ok(w.EXEC, w.p32(len(code)) + w.p32(off) + part)
        off += len(part)
        if off < len(code):
            assert rep[:1] == b"\x02" and w.u32(rep, 1) == off
    total = w.u32(rep, 1)
    out = rep[5:]
    assert len(out) == w.PAGE
    while len(out) < total:
        out += r.ok(w.RESULT, w.p32(len(out)))
    assert out.decode() == "y" * 3000 + "\n400\n\x04"
    # a part out of order is refused, and nothing runs
    assert "out of order" in r.err(w.EXEC, w.p32(100) + w.p32(50) + b"x" * 50)


def test_retransmitted_exec_runs_once():
    with_rig(_retransmitted_exec_runs_once)


def _retransmitted_exec_runs_once(r):
    c = b"hits = globals().get('hits', 0) + 1\nprint(hits)"
    body = w.p32(len(c)) + w.p32(0) + c
    a = r.call(w.EXEC, body, rid=5)
    b = r.call(w.EXEC, body, rid=5)          # the same request again (its reply was lost)
    assert a == b and a[1][5:].startswith(b"1\n")
    assert r.agent.stats["ops_retransmit"] == 1
    assert r.call(w.EXEC, body, rid=6)[1][5:].startswith(b"2\n")


def test_exec_stream_pushes_output_while_the_snippet_runs():
    with_rig(_exec_stream_pushes_output_while_the_snippet_runs)


def _exec_stream_pushes_output_while_the_snippet_runs(r):
    pushes = []                 # (the snippet's `stage` when the push went out, the message)
    flushed_into(r, pushes, lambda: r.agent.globals.get("stage"))
    code = ("import time\nstage = 1\nprint('first')\nstage = 2\ntime.sleep(0.08)\nprint('second')\n"
            "stage = 3\nfor i in range(10): print('x' * 700)\nstage = 4\n").encode()
    st, rep = r.call(w.EXEC_S, bytes((6,)) + w.p32(len(code)) + w.p32(0) + code, rid=40)
    assert st == w.OK and rep[0] == 0
    total = w.u32(rep, 1)
    out = rep[5:]
    while len(out) < total:
        out += r.ok(w.RESULT, w.p32(len(out)))
    msgs = [w.parse_reply(m) for _, m in pushes]
    # the first line went out while the snippet still ran (before its sleep), as a push of the request
    assert pushes[0][0] == 1 and msgs[0] == (w.EXEC_S, 40, w.STREAM, w.p32(0) + b"first\n"), msgs[0]
    assert pushes[1][0] == 2 and msgs[1][3][4:] == b"second\n"
    # the credit bounds the pushes; each is at most a page; together a prefix of the output
    assert len(pushes) == 6 and all(len(m[3]) <= 4 + w.PAGE for m in msgs), [(p[0], len(m[3])) for p, m in zip(pushes, msgs)]
    got = b""
    for m in msgs:
        assert w.u32(m[3], 0) == len(got)
        got += m[3][4:]
    assert out.startswith(got) and len(got) < total and out.endswith(b"\x04")
    # without the credit (plain EXEC), or without a driver that can send mid-exec: no push
    del pushes[:]
    r.exec("print('quiet')")
    del r.core.ops_io
    st, rep = r.call(w.EXEC_S, bytes((6,)) + w.p32(8) + w.p32(0) + b"print(1)")
    assert st == w.OK and rep[5:] == b"1\n\x04" and not pushes


def test_put_out_of_order_and_duplicated_is_byte_exact():
    with_rig(_put_out_of_order_and_duplicated_is_byte_exact)


def _put_out_of_order_and_duplicated_is_byte_exact(r):
    data = bytes(Rng(3).below(256) for _ in range(5000))

    def shuffled(offs):
        offs = offs[::-1] + offs[:2]          # reversed, and two duplicates
        return offs
    assert r.put("a.bin", data, shuffled) == 0
    r.ok(w.PUT_DONE)
    with open(r.dir + "/a.bin", "rb") as f:
        assert f.read() == data
    assert "a.bin.part" not in os.listdir(r.dir)
    # read it back
    rep = r.ok(w.GET_OPEN, b"a.bin")
    assert w.u32(rep, 0) == 5000 and rep[4:] == hashlib.sha256(data).digest()
    got = b""
    while len(got) < 5000:
        got += r.ok(w.GET_DATA, w.p32(len(got)) + bytes((4, 0)) + b"a.bin")[4:]
    assert got == data


def test_put_with_a_wrong_hash_replaces_nothing():
    with_rig(_put_with_a_wrong_hash_replaces_nothing)


def _put_with_a_wrong_hash_replaces_nothing(r):
    with open(r.dir + "/keep.txt", "wb") as f:
        f.write(b"the running code")
    data = b"z" * 3000
    digest = hashlib.sha256(b"something else").digest()
    r.ok(w.PUT_OPEN, w.p32(len(data)) + digest + b"keep.txt")
    for off in range(0, 3000, w.PAGE):
        r.ok(w.PUT_DATA, w.p32(off) + data[off:off + w.PAGE])
    assert "sha256" in r.err(w.PUT_DONE)
    with open(r.dir + "/keep.txt", "rb") as f:
        assert f.read() == b"the running code"
    assert sorted(os.listdir(r.dir)) == ["keep.txt"]


def test_put_resumes_after_a_restart():
    with_rig(_put_resumes_after_a_restart)


def _put_resumes_after_a_restart(r):
    data = bytes(range(256)) * 80           # 20 chunks
    digest = hashlib.sha256(data).digest()
    r.ok(w.PUT_OPEN, w.p32(len(data)) + digest + b"big.bin")
    for off in range(0, 18 * w.PAGE, w.PAGE):
        r.ok(w.PUT_DATA, w.p32(off) + data[off:off + w.PAGE])
    # the same transfer opened again in this boot: everything received counts
    assert w.u32(r.ok(w.PUT_OPEN, w.p32(len(data)) + digest + b"big.bin"), 0) == 18 * w.PAGE
    # a restart: a new agent finds the saved resume point (saved every 16 chunks)
    r.agent.put.f.close()
    r.agent = w.Agent(r.core, r.dir)
    have = w.u32(r.ok(w.PUT_OPEN, w.p32(len(data)) + digest + b"big.bin"), 0)
    assert have == 16 * w.PAGE
    for off in range(have, len(data), w.PAGE):
        r.ok(w.PUT_DATA, w.p32(off) + data[off:off + w.PAGE])
    r.ok(w.PUT_DONE)
    with open(r.dir + "/big.bin", "rb") as f:
        assert f.read() == data


def test_bad_requests_are_refused_not_raised():
    with_rig(_bad_requests_are_refused_not_raised)


def _bad_requests_are_refused_not_raised(r):
    digest = hashlib.sha256(b"").digest()
    cases = [                                        # (op, body, words in the error)
        (w.PUT_OPEN, w.p32(10) + digest + b"../outside", "leaves"),
        (w.PUT_OPEN, w.p32(10) + digest + b"a/../../x", "leaves"),
        (w.GET_OPEN, b"/../../etc/passwd", "leaves"),
        (w.LS, b"\x00\x00..", "leaves"),
        (w.PUT_DATA, w.p32(0) + b"x", "no transfer"),
        (w.PUT_DONE, b"", "no transfer"),
        (w.PUT_OPEN, w.p32(w.MAX_FILE + 1) + digest + b"f", "limit"),
        (w.EXEC, w.p32(w.MAX_CODE + 1) + w.p32(0), "limit"),
        (w.GET_OPEN, b"missing.txt", "get_open"),
        (99, b"", "unknown"),
        (w.GET_DATA, w.p32(0), "malformed"),
    ]
    for op, body, words in cases:
        msg = r.err(op, body)
        assert words in msg, (op, body, msg)
    r.ok(w.PUT_OPEN, w.p32(3000) + hashlib.sha256(b"q" * 3000).digest() + b"f.bin")
    assert "does not fit" in r.err(w.PUT_DATA, w.p32(5) + b"q" * 10)          # not on a chunk boundary
    assert "does not fit" in r.err(w.PUT_DATA, w.p32(0) + b"q" * 10)          # a short chunk
    assert "does not fit" in r.err(w.PUT_DATA, w.p32(3 * w.PAGE) + b"")        # past the end
    assert "incomplete" in r.err(w.PUT_DONE)
    # too short to answer at all: counted, no reply
    for junk in (b"", b"\x10", b"\x10\x01\x00\x00\x00", b"\x11\x01\x00\x00\x00\x01"):
        assert r.agent.handle(junk) is None
    assert r.agent.stats["ops_malformed"] >= 4
    # every refusal is a log line on the device too (the first ten, then every 100th)
    assert ("warn", "ops put_open refused: path '../outside' leaves the device's ops root") in r.core.logged
    assert len(r.core.logged) == 10
    assert os.listdir(r.dir) == ["f.bin.part", "f.bin.part.meta"] or sorted(os.listdir(r.dir)) == [
        "f.bin.part", "f.bin.part.meta"]


def test_ls_pages_and_marks_directories():
    with_rig(_ls_pages_and_marks_directories)


def _ls_pages_and_marks_directories(r):
    os.mkdir(r.dir + "/lib")
    for i in range(60):
        with open(r.dir + "/file-with-a-long-name-%02d.py" % i, "w") as f:
            f.write("x" * i)
    got = []
    start = 0
    pages = 0
    while True:
        rep = r.ok(w.LS, bytes((start >> 8, start & 255)) + b"/")
        pages += 1
        i = 3
        while i < len(rep):
            n = rep[i + 5]
            got.append((rep[i + 6:i + 6 + n].decode(), w.u32(rep, i + 1), rep[i]))
            i += 6 + n
        if not rep[0]:
            break
        start = (rep[1] << 8) | rep[2]
    assert pages >= 2 and len(got) == 61
    assert ("lib", 0, 1) in got and ("file-with-a-long-name-07.py", 7, 0) in got
    assert "not a directory" in r.err(w.LS, b"\x00\x00file-with-a-long-name-01.py")


def test_health_logs_reboot():
    with_rig(_health_logs_reboot)


def _health_logs_reboot(r):
    h = r.ok(w.HEALTH)
    assert b'"boot": 7' in h and b'"established": true' in h
    ring = r.core.log_ring
    for i in range(30):
        ring("info", "line %d" % i)
    rep = r.ok(w.LOGS, w.p32(0))
    nxt, first, text = w.u32(rep, 0), w.u32(rep, 4), rep[8:].decode()
    assert nxt == 30 and first > 1 and text.endswith("info line 29\n")     # 200 bytes: the oldest went
    ring("warn", "new")
    assert r.ok(w.LOGS, w.p32(nxt))[8:] == b"warn new\n"
    assert not r.core.reboot_requested
    r.ok(w.REBOOT)
    assert r.core.reboot_requested


def test_logs_request_held_until_a_line_comes():
    with_rig(_logs_request_held_until_a_line_comes)


def _logs_request_held_until_a_line_comes(r):
    ring = r.core.log_ring
    ring("info", "old")
    pushed = []
    flushed_into(r, pushed)
    since = ring.seq
    # nothing after `since`: no reply now, the request is held (wait 60 s)
    assert r.agent.handle(w.request(w.LOGS, 77, w.p32(since) + bytes((0xEA, 0x60)))) is None
    r.agent.tick()
    assert not pushed and r.agent.wait is not None
    ring("warn", "new line")
    r.agent.tick()
    assert r.agent.wait is None and len(pushed) == 1
    op, rid, st, body = w.parse_reply(pushed[0])
    assert (op, rid, st) == (w.LOGS, 77, w.OK) and w.u32(body, 0) == since + 1 and body[8:] == b"warn new line\n"
    # a line already there: answered at once; a wait that runs out: an empty reply
    assert w.parse_reply(r.agent.handle(w.request(w.LOGS, 78, w.p32(since) + b"\x00\x10")))[3][8:] == b"warn new line\n"
    assert r.agent.handle(w.request(w.LOGS, 79, w.p32(ring.seq) + b"\x00\x01")) is None
    t = clock()
    while ticks_diff(clock(), t) < 3:
        pass
    r.agent.tick()
    assert r.agent.wait is None and w.parse_reply(pushed[1])[1] == 79 and pushed[1][15:] == b""


def test_safe_path():
    assert w.safe_path("/r", "") == "/r"
    assert w.safe_path("/r", "/lib//x.py") == "/r/lib/x.py"
    assert w.safe_path("/", "/lib/./x.py") == "/lib/x.py"
    assert w.safe_path(".", "a") == "./a"
    for bad in ("..", "a/../..", "/x/../../y", "a\x00b"):
        raises(w.OpsError, w.safe_path, "/r", bad)


def test_device_without_ops_permission_drops_and_never_loads_the_agent():
    from stack_sim import StackSim
    for allowed in (False, True):
        sim = StackSim(n_paths=1)
        sim.cfg.ops = allowed
        sim.connect()
        replies = []
        gw_send = sim.gw.send
        sim.gw.send(sim.peer, 0, w.request(w.HEALTH, 9), sim.now)
        n0 = sim.gw_other
        sim.run(200)
        if allowed:
            assert sim.core.ops is not None and sim.gw_other == n0 + 1
        else:
            assert sim.core.ops is None and sim.core.stats.get("ops_disabled") == 1 and sim.gw_other == n0
        del replies, gw_send
