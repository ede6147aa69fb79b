"""tools/netem.py, the user-space lossy-link emulator: real UDP sockets on 127.0.0.1.

Statistical checks cannot flake: every run is seeded, and the relay draws a fixed
number of random values per datagram, so the drop/duplicate/reorder decisions for
datagram n are a pure function of (seed, n). The tests compare what really crossed
the sockets with the offline model (netem.Direction) and keep a generous binomial
bound as a sanity check. Timing is only ever bounded from below (delay, rate).
Host-only (asyncio, sockets, subprocess).
"""
import asyncio
import json
import math
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"
sys.path.insert(0, str(TOOLS))
import netem  # noqa: E402
from netem import Direction, GilbertElliott, Impairment, LinkEmulator  # noqa: E402

LO = "127.0.0.1"
EPS = 0.002     # asyncio timers may fire a hair before their deadline


def run(coro, timeout=8.0):
    """Run one async test body; it always stops by itself."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Peer:
    """A UDP endpoint on the test's event loop: records (data, addr, time), optionally echoes."""

    def __init__(self, echo=False):
        self.loop = asyncio.get_running_loop()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LO, 0))
        self.sock.setblocking(False)
        self.addr = self.sock.getsockname()
        self.echo = echo
        self.got = []
        self.loop.add_reader(self.sock.fileno(), self._read)

    def _read(self):
        while True:
            try:
                data, addr = self.sock.recvfrom(65535)
            except BlockingIOError:
                return
            self.got.append((data, addr, self.loop.time()))
            if self.echo:
                self.sock.sendto(data, addr)

    def send(self, data, addr):
        self.sock.sendto(data, addr)

    def seqs(self):
        return [struct.unpack_from("!I", d)[0] for d, _, _ in self.got]

    def close(self):
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


def pkt(i, size=32):
    return struct.pack("!I", i) + bytes(size - 4)


async def until(cond, timeout=2.0, what="condition"):
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out waiting for " + what)
        await asyncio.sleep(0.001)


async def quiet(relay, sink, direction="up"):
    """Wait until nothing is in flight and the sink has read everything forwarded."""
    await until(lambda: relay.stats["in_flight"] == 0
                and len(sink.got) >= relay.stats[direction]["forwarded"], what="relay to go quiet")


async def send_batches(client, relay, payloads, batch=50, sink=None):
    """Send in batches, letting the relay read each one (and, given a sink, letting
    everything reach it), so the kernel never drops a datagram for a full socket
    buffer: that would break the seeded comparison."""
    sent = relay.stats["up"]["received"]
    for k in range(0, len(payloads), batch):
        for p in payloads[k:k + batch]:
            client.send(p, relay.address)
        sent += len(payloads[k:k + batch])
        await until(lambda: relay.stats["up"]["received"] >= sent, what="relay to read a batch")
        if sink is not None:
            await quiet(relay, sink)


async def send_paced(client, relay, sink, payloads):
    await send_batches(client, relay, payloads, batch=100, sink=sink)


def balanced(stats):
    """received + duplicated copies == forwarded + every drop, once nothing is in flight."""
    return stats["received"] + stats["duplicated"] == stats["forwarded"] + sum(stats["dropped"].values())


def model_lost(imp, seed, n, size=32):
    """Which datagram indexes the offline model drops (same seed, same draws)."""
    d = Direction("up", imp, seed)
    return [i for i in range(n) if not d.admit(size, 0.0)]


async def pattern_through_sockets(imp, seed, n):
    sink, client = Peer(), Peer()
    relay = await LinkEmulator.start(listen=(LO, 0), upstream=sink.addr, up=imp, seed=seed)
    try:
        await send_paced(client, relay, sink, [pkt(i) for i in range(n)])
        got = set(sink.seqs())
        return [i for i in range(n) if i not in got], relay.stats
    finally:
        await relay.close()
        sink.close()
        client.close()


def bursts(lost):
    """Lengths of runs of consecutive lost indexes."""
    runs, prev = [], None
    for i in lost:
        if prev is not None and i == prev + 1:
            runs[-1] += 1
        else:
            runs.append(1)
        prev = i
    return runs


# --- pass-through, NAT mappings -------------------------------------------

def test_pass_through_both_directions():
    async def body():
        echo, client = Peer(echo=True), Peer()
        relay = await LinkEmulator.start(listen=(LO, 0), upstream=echo.addr, seed=1)
        for i in range(20):
            client.send(pkt(i), relay.address)
        await until(lambda: len(client.got) == 20)
        assert client.seqs() == list(range(20))
        assert {a for _, a, _ in client.got} == {relay.address}
        st = relay.stats
        for d in ("up", "down"):
            assert (st[d]["received"], st[d]["forwarded"], st[d]["bytes_forwarded"]) == (20, 20, 640)
            assert sum(st[d]["dropped"].values()) == 0
        assert (st["flows"], st["seed"]) == (1, 1)
        assert echo.got[0][1] != client.addr            # upstream sees the relay's mapping, not the client
        await relay.close()
        echo.close(), client.close()
    run(body())


def test_each_client_gets_its_own_mapping_and_its_own_replies():
    async def body():
        echo, a, b = Peer(echo=True), Peer(), Peer()
        relay = await LinkEmulator.start(listen=(LO, 0), upstream=echo.addr, seed=1)
        a.send(b"from a", relay.address)
        b.send(b"from b", relay.address)
        await until(lambda: len(a.got) == 1 and len(b.got) == 1)
        assert (a.got[0][0], b.got[0][0]) == (b"from a", b"from b")
        assert len({addr for _, addr, _ in echo.got}) == 2
        assert relay.stats["flows"] == 2
        await relay.close()
        echo.close(), a.close(), b.close()
    run(body())


def test_idle_timeout_and_rebind_give_a_new_source_port():
    async def body():
        echo, client = Peer(echo=True), Peer()
        relay = await LinkEmulator.start(listen=(LO, 0), upstream=echo.addr, seed=1, idle_timeout=0.2)
        client.send(b"1", relay.address)
        await until(lambda: len(client.got) == 1)
        await until(lambda: relay.stats["flows"] == 0, what="idle mapping to expire")
        client.send(b"2", relay.address)
        await until(lambda: len(client.got) == 2)
        assert relay.rebind() == 1                       # NAT rebinding on demand
        client.send(b"3", relay.address)
        await until(lambda: len(client.got) == 3)
        ports = [addr for _, addr, _ in echo.got]
        assert len(set(ports)) == 3
        assert relay.stats["flows_opened"] == 3
        assert [d for d, _, _ in client.got] == [b"1", b"2", b"3"]
        await relay.close()
        echo.close(), client.close()
    run(body())


# --- loss -----------------------------------------------------------------

def test_random_loss_rate_and_seeded_pattern():
    n, p, imp = 2000, 0.1, Impairment(loss=0.1)

    async def body():
        lost, st = await pattern_through_sockets(imp, seed=7, n=n)
        again, _ = await pattern_through_sockets(imp, seed=7, n=n)
        other, _ = await pattern_through_sockets(imp, seed=8, n=n)
        return lost, st, again, other
    lost, st, again, other = run(body())
    assert lost == again == model_lost(imp, 7, n)        # same seed: identical drop pattern
    assert other != lost
    assert st["up"]["dropped"]["loss"] == len(lost)
    assert st["up"]["forwarded"] == n - len(lost) and balanced(st["up"])
    sd = math.sqrt(n * p * (1 - p))                       # ~13.4
    assert abs(len(lost) - n * p) < 6 * sd


def test_gilbert_elliott_makes_bursts_and_same_seed_reproduces_them():
    n = 2000
    ge = Impairment(p_good_to_bad=0.05, p_bad_to_good=0.3, loss_good=0.0, loss_bad=1.0)
    avg = GilbertElliott.average_loss(ge)                 # 0.05 / 0.35 = 14.3 %

    async def body():
        return (await pattern_through_sockets(ge, seed=3, n=n),
                await pattern_through_sockets(ge, seed=3, n=n))
    (lost, st), (again, _) = run(body())
    assert lost == again == model_lost(ge, 3, n)
    assert st["up"]["dropped"]["burst_loss"] == len(lost) and st["up"]["dropped"]["loss"] == 0
    runs = bursts(lost)
    assert sum(runs) / len(runs) > 1.5                    # expected 1 / p_bad_to_good = 3.3
    assert abs(len(lost) / n - avg) < 0.07
    # the same average loss, independent: bursts stay near 1 / (1 - p) = 1.17
    indep = bursts(model_lost(Impairment(loss=avg), 3, n))
    assert sum(indep) / len(indep) < 1.5


def test_gilbert_elliott_formulas_match_the_model():
    # table: (p, r, loss_good, loss_bad)
    for p, r, k, h in [(0.05, 0.5, 0.0, 1.0), (0.01, 0.2, 0.001, 0.5), (0.2, 0.2, 0.0, 0.8)]:
        imp = Impairment(p_good_to_bad=p, p_bad_to_good=r, loss_good=k, loss_bad=h)
        n = 40000
        lost = model_lost(imp, 11, n)
        assert abs(len(lost) / n - GilbertElliott.average_loss(imp)) < 0.02, (p, r, k, h)
        if k == 0 and h == 1:
            runs = bursts(lost)
            assert abs(sum(runs) / len(runs) - 1 / r) < 0.2 / r


def test_decisions_per_index_do_not_depend_on_other_settings():
    # Fixed draws per datagram: adding jitter or duplication must not move the loss pattern.
    base = model_lost(Impairment(loss=0.2), 5, 500)
    assert base == model_lost(Impairment(loss=0.2, jitter_ms=5, duplicate=0.3, reorder=0.1), 5, 500)


# --- delay, jitter, duplication, reordering -------------------------------

def test_delay_is_at_least_the_configured_delay():
    async def body():
        echo, client = Peer(echo=True), Peer()
        relay = await LinkEmulator.start(listen=(LO, 0), upstream=echo.addr, seed=1,
                                         up=Impairment(delay_ms=60), down=Impairment(delay_ms=30))
        sent = {}
        for i in range(5):
            sent[i] = asyncio.get_running_loop().time()
            client.send(pkt(i), relay.address)
            await asyncio.sleep(0.005)
        await until(lambda: len(client.got) == 5)
        for (d, _, t_echo), (d2, _, t_back) in zip(echo.got, client.got):
            i = struct.unpack_from("!I", d)[0]
            assert t_echo - sent[i] >= 0.060 - EPS
            assert t_back - sent[struct.unpack_from("!I", d2)[0]] >= 0.090 - EPS
        await relay.close()
        echo.close(), client.close()
    run(body())


def test_jitter_stays_within_bounds_and_never_goes_negative():
    async def body():
        sink, client = Peer(), Peer()
        relay = await LinkEmulator.start(listen=(LO, 0), upstream=sink.addr, seed=2,
                                         up=Impairment(delay_ms=20, jitter_ms=15))
        t0 = asyncio.get_running_loop().time()
        for i in range(50):
            client.send(pkt(i), relay.address)
        await until(lambda: len(sink.got) == 50)
        assert min(t for _, _, t in sink.got) - t0 >= 0.005 - EPS     # delay - jitter
        relay.set(up={"jitter_dist": "normal", "jitter_ms": 40})     # clamped at 0, still delivered
        for i in range(50, 100):
            client.send(pkt(i), relay.address)
        await until(lambda: len(sink.got) == 100)
        assert sorted(sink.seqs()) == list(range(100))
        await relay.close()
        sink.close(), client.close()
    run(body())


def test_duplication_produces_duplicates():
    async def body():
        sink, client = Peer(), Peer()
        relay = await LinkEmulator.start(listen=(LO, 0), upstream=sink.addr, seed=4,
                                         up=Impairment(duplicate=0.5))
        await send_paced(client, relay, sink, [pkt(i) for i in range(200)])
        st = relay.stats["up"]
        seqs = sink.seqs()
        doubled = [i for i in range(200) if seqs.count(i) == 2]
        assert sorted(set(seqs)) == list(range(200))
        assert len(doubled) == st["duplicated"] and 60 < st["duplicated"] < 140
        assert st["forwarded"] == len(seqs) == 200 + st["duplicated"] and balanced(st)
        await relay.close()
        sink.close(), client.close()
    run(body())


def test_reordering_lets_later_datagrams_overtake():
    async def body():
        sink, client = Peer(), Peer()
        relay = await LinkEmulator.start(listen=(LO, 0), upstream=sink.addr, seed=5,
                                         up=Impairment(reorder=0.25, reorder_ms=30))
        for i in range(100):
            client.send(pkt(i), relay.address)
        await until(lambda: len(sink.got) == 100)
        seqs = sink.seqs()
        assert sorted(seqs) == list(range(100))
        overtaken = sum(1 for i in range(1, 100) if seqs[i] < seqs[i - 1])
        assert overtaken > 0 and relay.stats["up"]["reordered"] > 5
        await relay.close()
        sink.close(), client.close()
    run(body())


# --- rate limit -----------------------------------------------------------

def test_rate_limit_caps_throughput_and_counts_queue_full():
    rate, size, queue, depth = 50_000, 500, 20, 1500      # 100 datagrams/s, 3 fit the bucket

    async def body():
        sink, client = Peer(), Peer()
        relay = await LinkEmulator.start(listen=(LO, 0), upstream=sink.addr, seed=6,
                                         up=Impairment(rate=rate, queue=queue, burst_bytes=depth))
        t0 = asyncio.get_running_loop().time()
        await send_batches(client, relay, [pkt(i, size) for i in range(200)])   # within a few ms
        sending = asyncio.get_running_loop().time() - t0      # tokens refill meanwhile
        await quiet(relay, sink)
        st = relay.stats["up"]
        fwd = st["forwarded"]
        assert queue <= fwd <= queue + depth // size + 2 + sending * rate / size
        assert st["dropped"]["queue_full"] == 200 - fwd and balanced(st)
        # A token bucket lets at most depth + rate * T bytes through in T seconds. Measured from
        # before the first send to the last read, scheduling noise can only lengthen T.
        assert sink.got[-1][2] - t0 >= (fwd * size - depth) / rate - EPS
        assert sink.seqs() == sorted(sink.seqs())             # a shaper keeps FIFO order
        await relay.close()
        sink.close(), client.close()
    run(body())


# --- blackhole and control channel ----------------------------------------

def test_blackhole_via_api():
    async def body():
        echo, client = Peer(echo=True), Peer()
        relay = await LinkEmulator.start(listen=(LO, 0), upstream=echo.addr, seed=1)
        client.send(b"a", relay.address)
        await until(lambda: len(client.got) == 1)
        relay.blackhole(True)
        for _ in range(5):
            client.send(b"lost", relay.address)
        await until(lambda: relay.stats["up"]["received"] == 6)
        await asyncio.sleep(0.05)
        assert len(echo.got) == 1 and relay.stats["up"]["dropped"]["blackhole"] == 5
        relay.blackhole(False)
        relay.blackhole(True, direction="down")                # requests arrive, replies vanish
        client.send(b"b", relay.address)
        await until(lambda: relay.stats["down"]["dropped"]["blackhole"] == 1)
        assert len(echo.got) == 2 and len(client.got) == 1
        relay.blackhole(False, direction="down")
        client.send(b"c", relay.address)
        await until(lambda: len(client.got) == 2)
        with pytest.raises(ValueError):
            relay.blackhole(True, direction="sideways")
        await relay.close()
        echo.close(), client.close()
    run(body())


async def control(relay, ctl, cmd):
    """Send one control datagram, return the decoded one-line reply."""
    data = cmd if isinstance(cmd, bytes) else json.dumps(cmd).encode()
    ctl.sock.sendto(data, relay.control_address)
    n = len(ctl.got)
    await until(lambda: len(ctl.got) > n, timeout=1.0, what="control reply")
    line = ctl.got[-1][0]
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    return json.loads(line)


def test_blackhole_and_set_via_control_channel():
    async def body():
        echo, client, ctl = Peer(echo=True), Peer(), Peer()
        relay = await LinkEmulator.start(listen=(LO, 0), upstream=echo.addr, seed=1, control=(LO, 0))
        assert await control(relay, ctl, {"blackhole": True}) == {"ok": True}
        for _ in range(3):
            client.send(b"x", relay.address)
        await until(lambda: relay.stats["up"]["dropped"]["blackhole"] == 3)
        reply = await control(relay, ctl, {"blackhole": False, "stats": True})
        assert reply["ok"] and reply["stats"]["up"]["dropped"]["blackhole"] == 3
        client.send(b"y", relay.address)
        await until(lambda: len(client.got) == 1)
        assert (await control(relay, ctl, {"set": {"up": {"loss": 1.0}}}))["ok"]
        client.send(b"z", relay.address)
        await until(lambda: relay.stats["up"]["dropped"]["loss"] == 1)
        reply = await control(relay, ctl, {"set": {"both": {"loss": 0, "delay_ms": 1}}, "get": True})
        assert reply["impairments"]["up"]["loss"] == 0 and reply["impairments"]["down"]["delay_ms"] == 1
        assert (await control(relay, ctl, {"rebind": True}))["rebound"] == 1
        client.send(b"w", relay.address)
        await until(lambda: len(client.got) == 2)
        await relay.close()
        echo.close(), client.close(), ctl.close()
    run(body())


MALFORMED = [
    b"",
    b"not json",
    b"\xff\xfe{",
    b"[1, 2]",
    b"{}",
    b'{"nope": 1}',
    b'{"blackhole": "yes"}',
    b'{"blackhole": true, "direction": "sideways"}',
    b'{"direction": "up"}',
    b'{"stats": 1}',
    b'{"set": 5}',
    b'{"set": {}}',
    b'{"set": {"left": {"loss": 0.1}}}',
    b'{"set": {"up": 0.1}}',
    b'{"set": {"up": [["loss", 0.5]]}}',
    b'{"set": {"up": {"loss": 2}}}',
    b'{"set": {"up": {"warp": 1}}}',
    b'{"set": {"up": {"delay_ms": -1}}}',
    b'{"set": {"up": {"delay_ms": Infinity}}}',
    b'{"set": {"up": {"loss": NaN}}}',
    b'{"set": {"up": {"loss": true}}}',
    b'{"set": {"up": {"jitter_dist": "cauchy"}}}',
    b'{"set": {"up": {"queue": 0}}}',
    b'{"set": {"up": {"loss": 0.5}, "down": {"loss": 5}}}',     # all or nothing
    b"[" * 20000,
]


def test_malformed_control_input_gets_an_error_line_and_relay_keeps_working():
    async def body():
        echo, client, ctl = Peer(echo=True), Peer(), Peer()
        relay = await LinkEmulator.start(listen=(LO, 0), upstream=echo.addr, seed=1, control=(LO, 0))
        before = relay.impairments
        for n, bad in enumerate(MALFORMED):
            reply = await control(relay, ctl, bad)
            assert reply["ok"] is False and reply["error"], (n, bad, reply)
        assert relay.impairments == before
        client.send(b"still here", relay.address)
        await until(lambda: len(client.got) == 1)
        assert (await control(relay, ctl, {"stats": True}))["ok"]
        await relay.close()
        echo.close(), client.close(), ctl.close()
    run(body())


def test_api_misuse_raises_value_error():
    with pytest.raises(ValueError):
        Impairment(loss=1.5)
    with pytest.raises(ValueError):
        Impairment(jitter_dist="pareto")
    with pytest.raises(ValueError):
        Impairment().updated({"lost": 0.1})
    with pytest.raises(TypeError):
        LinkEmulator()

    async def body():
        with pytest.raises(ValueError):
            await LinkEmulator.start(listen=(LO, 0), upstream=(LO, 9), control=("0.0.0.0", 0))
    run(body())


def test_close_leaves_no_tasks_and_frees_the_port():
    async def body():
        tasks_before = asyncio.all_tasks()
        sink, client = Peer(), Peer()
        relay = await LinkEmulator.start(listen=(LO, 0), upstream=sink.addr, seed=1, control=(LO, 0),
                                         up=Impairment(delay_ms=500))
        client.send(b"in flight at close", relay.address)
        await until(lambda: relay.stats["in_flight"] == 1)
        addr, ctl_addr = relay.address, relay.control_address
        await relay.close()
        await relay.close()                                    # idempotent
        assert asyncio.all_tasks() == tasks_before
        for a in (addr, ctl_addr):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(a)                                          # port released
            s.close()
        await asyncio.sleep(0.6)
        assert sink.got == []                                  # the in-flight datagram died with the relay
        sink.close(), client.close()
    run(body())


# --- command line ---------------------------------------------------------

def _line_reader(stream):
    """Lines of a pipe, read by a daemon thread so that waiting for one can time out."""
    lines = queue.Queue()

    def pump():
        with stream:                    # closed by the thread itself at EOF
            for line in stream:
                lines.put(line)
    threading.Thread(target=pump, daemon=True).start()
    return lambda timeout=5.0: json.loads(lines.get(timeout=timeout))


def test_cli_forwards_obeys_control_and_sigusr1_and_prints_stats_on_sigterm():
    up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    up.bind((LO, 0))
    up.settimeout(2.0)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(2.0)
    proc = subprocess.Popen(
        [sys.executable, str(TOOLS / "netem.py"), "--listen", "%s:0" % LO, "--upstream", "%s:%d" % up.getsockname(),
         "--control", "%s:0" % LO, "--delay-ms", "5", "--seed", "1", "--down", "loss=0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stderr_line = _line_reader(proc.stderr)
        ready = stderr_line()
        host, port = ready["listen"].rsplit(":", 1)
        relay = (host, int(port))
        host, port = ready["control"].rsplit(":", 1)
        ctl_addr = (host, int(port))
        assert ready["seed"] == 1
        for i in range(5):
            client.sendto(pkt(i), relay)
        assert sorted(struct.unpack_from("!I", up.recvfrom(100)[0])[0] for _ in range(5)) == list(range(5))

        client.sendto(b'{"blackhole": true}', ctl_addr)
        assert json.loads(client.recvfrom(1000)[0]) == {"ok": True}
        client.sendto(b"not json", ctl_addr)
        assert json.loads(client.recvfrom(1000)[0])["ok"] is False
        for i in range(3):
            client.sendto(pkt(100 + i), relay)
        up.settimeout(0.2)
        with pytest.raises(socket.timeout):
            up.recvfrom(100)

        proc.send_signal(signal.SIGUSR1)                       # toggles the blackhole off
        assert stderr_line() == {"blackhole": False}
        up.settimeout(2.0)
        client.sendto(pkt(200), relay)
        assert up.recvfrom(100)[0] == pkt(200)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        out = proc.stdout.read()
        lines = out.strip().splitlines()
        assert len(lines) == 1
        stats = json.loads(lines[0])
        assert stats["up"]["received"] == 9 and stats["up"]["forwarded"] == 6
        assert stats["up"]["dropped"]["blackhole"] == 3 and stats["seed"] == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        proc.stdout.close()
        up.close()
        client.close()


def test_cli_rejects_bad_impairments():
    proc = subprocess.run([sys.executable, str(TOOLS / "netem.py"), "--listen", "%s:0" % LO,
                           "--upstream", "%s:9" % LO, "--loss", "1.5"],
                          capture_output=True, text=True, timeout=10)
    assert proc.returncode == 2 and "loss" in proc.stderr
    proc = subprocess.run([sys.executable, str(TOOLS / "netem.py"), "--listen", "%s:0" % LO,
                           "--upstream", "%s:9" % LO, "--up", "warp=9"],
                          capture_output=True, text=True, timeout=10)
    assert proc.returncode == 2 and "warp" in proc.stderr


def test_kv_parsing():
    assert netem._kv("loss=0.1,delay_ms=20,jitter-dist=normal,queue=8") == {
        "loss": 0.1, "delay_ms": 20.0, "jitter_dist": "normal", "queue": 8}
    assert os.path.basename(netem.__file__) == "netem.py"
