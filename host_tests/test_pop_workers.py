"""A PoP on every core (microtun_host.workers): real `microtun pop
--workers 2` processes on 127.0.0.1.

    device 1 --100--> PoP --300--> gateway      device 2 --U2--> PoP --401--> gateway
    device 1 <--101-- PoP <--301-- gateway      device 2 <--202-- PoP <--D2--- gateway

Route 301 learns from 100, and D2 from U2: by label % 2 each pair would be
split over the two workers, so the steering program must send each learn
group to one worker (U2, D2 are picked so that the two groups sit on
different workers, and D2 needs an entry). Checked through each worker's
own counters.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from microtun import outer
from microtun_host import control, pop, workers
from microtun_host.config import ConfigError

from test_pop import K_AB, K_BG, K_DA, HK, accounted, answer_challenge, free_port, recv_packets, route, udp

ROOT = Path(__file__).resolve().parent.parent
LIB = ROOT / "lib"
K_D2 = bytes(range(96, 128))
HK[K_D2] = outer.HopKey(K_D2)


def spec(in_label, nxt, learn=0):
    return pop.RouteSpec(in_label, b"k" * 32, None if learn else nxt, learn, in_label + 1000, b"o" * 32)


def test_steering_puts_each_learn_group_on_one_worker():
    routes = [spec(100, "x"), spec(301, None, learn=100), spec(201, "x"), spec(400, None, learn=201),
              spec(7, "x"), spec(8, None, learn=7), spec(12, None, learn=8)]      # a chain 12 -> 8 -> 7
    for n in (2, 3, 4, 7):
        ex = workers.steering(routes, n)
        w = lambda label: workers.worker_of(label, n, ex)      # noqa: E731
        assert w(100) == w(301) and w(201) == w(400) and w(7) == w(8) == w(12)
        assert all(v != k % n for k, v in ex.items())            # only real exceptions
    assert workers.steering(routes, 1) == {}
    # provisioned labels come in pairs (a path's uplink L and downlink L + 1): spread anyway
    pairs = []
    for i in range(200):
        pairs += [spec(100 + 2 * i, "x"), spec(101 + 2 * i, None, learn=100 + 2 * i)]
    ex = workers.steering(pairs, 2)
    on0 = sum(1 for i in range(200) if workers.worker_of(100 + 2 * i, 2, ex) == 0)
    assert 70 <= on0 <= 130, on0


def test_steering_puts_a_segments_feedback_with_its_route():
    """A LOOPS segment's ingress keeps the packets it sent (for NACKs) in the
    worker its route's in_label reaches; the egress's NACKs and pongs come
    back labelled with the route's out_label, so that label must reach the
    same worker, or a NACK finds an empty ring and nothing is repaired."""
    from microtun_host.segment import SegConfig
    routes = []
    for i in range(40):
        r = spec(101 + 2 * i, "x")              # out_label in_label + 1000: odd in, odd out
        r.out_label = 2000 + 2 * i              # ... now even: label % 2 would split them
        r.seg_out = SegConfig("nack")
        routes.append(r)
    routes.append(spec(500, "x"))               # no segment: no entry for its out_label
    for n in (2, 3):
        ex = workers.steering(routes, n)
        for r in routes[:-1]:
            assert workers.worker_of(r.out_label, n, ex) == workers.worker_of(r.in_label, n, ex), (n, r.in_label)
        assert 1500 not in ex


def test_aggregate_takes_each_segment_from_the_worker_its_label_reaches():
    seg = lambda sent: {"role": "ingress", "sent": sent, "srtt_ms": 40.0 if sent else None}     # noqa: E731
    a = {"rx": 1, "segments": {"out:2000": seg(0), "in:7": {"role": "egress", "received": 9}}}
    b = {"rx": 2, "segments": {"out:2000": seg(50), "in:7": {"role": "egress", "received": 0}}}
    s = workers.aggregate([a, b], worker_of_label=lambda label: {2000: 1, 7: 0}[label])
    assert s["segments"] == {"out:2000": seg(50), "in:7": {"role": "egress", "received": 9}}
    assert workers.aggregate([None, b], worker_of_label=lambda label: 0)["segments"] == {}


def test_steering_refuses_a_table_the_program_cannot_hold():
    routes = []
    for i in range(workers.MAX_EXCEPTIONS + 1):
        routes += [spec(10 * i + 100, "x"), spec(10 * i + 101, None, learn=10 * i + 100)]
    with pytest.raises(ConfigError, match="steering entry"):
        workers.steering(routes, 2)
    prog = workers.program(2, workers.steering(routes[:400], 2))
    assert len(prog) <= workers.BPF_MAXINSNS


def test_aggregate_adds_up_workers():
    a = {"rx": 3, "forwarded": 2, "dropped": 1, "drops": {"bad_mac": 1}, "routes": 4,
         "labels": {"100": {"packets": 2, "bytes": 20, "drops": {"bad_mac": 1}}}, "learned": {"100": "a:1"}}
    b = {"rx": 5, "forwarded": 5, "dropped": 0, "drops": {"bad_mac": 0}, "routes": 4,
         "labels": {"100": {"packets": 0, "bytes": 0}, "201": {"packets": 5, "bytes": 50}}, "learned": {"201": "b:2"}}
    s = workers.aggregate([a, None, b])
    assert (s["rx"], s["forwarded"], s["dropped"], s["routes"]) == (8, 7, 1, 4)
    assert s["drops"] == {"bad_mac": 1}
    assert s["labels"]["100"] == {"packets": 2, "bytes": 20, "drops": {"bad_mac": 1}}
    assert s["learned"] == {"100": "a:1", "201": "b:2"}


class Workers:
    def __init__(self, tmp, routes, n=2, **extra):
        self.port = free_port()
        self.addr = ("127.0.0.1", self.port)
        self.ctl = str(tmp / "pop.sock")
        self.path = tmp / "pop.json"
        self.cfg = {"name": "wpop", "listen": "127.0.0.1:%d" % self.port, "control": "pop.sock",
                    "log_level": "info", "stats_interval": 0, "routes": routes, **extra}
        self.write()
        self.log_path = tmp / "pop.log"
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "microtun_host.cli", "pop", "--config", str(self.path),
                                      "--workers", str(n)], stdout=self.log_file, stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONPATH=str(LIB)), cwd=str(ROOT))
        self.wait(lambda s: s.get("workers_answering", 1) == n, 15)

    def write(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.cfg))
        os.replace(tmp, self.path)

    def stats(self):
        return control.query(self.ctl, {"cmd": "stats"}, timeout=3.0)

    def wait(self, pred, timeout=5.0):
        deadline = time.monotonic() + timeout
        s = None
        while time.monotonic() < deadline:
            try:
                s = self.stats()
                if pred(s):
                    return s
            except control.ControlError:
                if self.proc.poll() is not None:
                    break
            time.sleep(0.05)
        raise AssertionError("condition not met; stats %s\n%s" % (json.dumps(s), self.log()))

    def log(self):
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)
        finally:
            self.log_file.close()


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:            # a zombie is not alive (its parent, the supervisor, has exited: reaped by init)
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def send_up(dev, label, key, pop_addr, payload):
    dev.sendto(outer.seal(outer.TYPE_DATA, label, HK[key], payload), pop_addr)


def got(sock, label, key, payload):
    pkts = recv_packets(sock, 1)
    assert pkts, "nothing arrived (wanted label %d)" % label
    pkt = pkts[0][0]
    assert outer.parse(pkt) == (outer.TYPE_DATA, label)
    assert outer.verify(HK[key], pkt)
    assert pkt[outer.HEADER_LEN:] == payload
    return pkts[0][1]


def _other_group():
    """Labels (U, D) for device 2 whose learn group sits on the other worker
    than device 1's (100, 301), with D % 2 != the group's worker (an exception)."""
    w1 = workers.group_worker([100, 301], 2)
    for u in range(201, 300):
        for d in (u + 199, u + 200):
            g = workers.group_worker([u, d], 2)
            if g != w1 and d % 2 != g:
                return u, d
    raise AssertionError("no label pair found")


def test_two_workers_forward_learn_challenge_reload_and_restart(tmp_path):
    gw, dev1, dev2 = udp(), udp(), udp()
    gwa = "127.0.0.1:%d" % gw.getsockname()[1]
    U2, D2 = _other_group()
    routes = [route(100, K_DA, gwa, 300, K_BG), route(301, K_BG, "learn:100", 101, K_DA),
              route(U2, K_D2, gwa, 401, K_AB), route(D2, K_AB, "learn:%d" % U2, 202, K_D2)]
    p = Workers(tmp_path, routes)
    try:
        s = p.stats()
        assert s["worker_count"] == 2 and s["steering_exceptions"] >= 1, s
        pids = [w["pid"] for w in s["workers"]]

        # both ways, both devices; the return traffic comes from the gateway's 4-tuple
        send_up(dev1, 100, K_DA, p.addr, b"up one")
        got(gw, 300, K_BG, b"up one")
        send_up(dev2, U2, K_D2, p.addr, b"up two")
        got(gw, 401, K_AB, b"up two")
        gw.sendto(outer.seal(outer.TYPE_DATA, 301, HK[K_BG], b"down one"), p.addr)
        got(dev1, 101, K_DA, b"down one")
        gw.sendto(outer.seal(outer.TYPE_DATA, D2, HK[K_AB], b"down two"), p.addr)
        got(dev2, 202, K_D2, b"down two")
        s = p.wait(lambda s: s["forwarded"] == 4)
        by = {w["index"]: w for w in s["workers"]}
        assert by[0]["forwarded"] == 2 and by[1]["forwarded"] == 2, s      # each learn group on its worker
        assert s["learned"] == {"100": "127.0.0.1:%d" % dev1.getsockname()[1],
                                str(U2): "127.0.0.1:%d" % dev2.getsockname()[1]}, s
        accounted(s)

        # device 1 moves: challenged, answers, and the return traffic follows it
        moved = udp()
        send_up(moved, 100, K_DA, p.addr, b"from the new address")
        got(gw, 300, K_BG, b"from the new address")
        answer_challenge(moved, 100, HK[K_DA])
        p.wait(lambda s: s["learned"]["100"] == "127.0.0.1:%d" % moved.getsockname()[1])
        gw.sendto(outer.seal(outer.TYPE_DATA, 301, HK[K_BG], b"follows"), p.addr)
        got(moved, 101, K_DA, b"follows")
        s = p.stats()
        assert s["challenges"] == 1 and s["path_responses"] == 1 and s["moves"] == 3, s

        # SIGHUP: a third device's learn group (503 learns from 502: worker 0 by min label)
        p.cfg["routes"] = routes + [route(502, K_DA, gwa, 600, K_BG), route(503, K_BG, "learn:502", 102, K_DA)]
        p.write()
        p.proc.send_signal(signal.SIGHUP)
        s = p.wait(lambda s: s["reloads"] == 1 and s["routes"] == 6)
        dev3 = udp()
        send_up(dev3, 502, K_DA, p.addr, b"new route")
        got(gw, 600, K_BG, b"new route")
        gw.sendto(outer.seal(outer.TYPE_DATA, 503, HK[K_BG], b"new way back"), p.addr)
        got(dev3, 102, K_DA, b"new way back")
        # a broken config is refused by the supervisor; everything keeps running
        p.path.write_text("{not json")
        assert not control.query(p.ctl, {"cmd": "reload"}, timeout=3.0)["ok"]
        p.write()

        # kill -9 device 2's worker: noticed, logged, restarted on the same socket and steering
        k = workers.group_worker([U2, D2], 2)
        os.kill(pids[k], signal.SIGKILL)
        s = p.wait(lambda s: s["workers"][k]["restarts"] == 1 and s["workers_answering"] == 2, 10)
        assert s["workers"][k]["pid"] != pids[k] and s["workers"][1 - k]["pid"] == pids[1 - k], s
        assert "worker %d (pid %d) killed by SIGKILL" % (k, pids[k]) in p.log()
        send_up(dev2, U2, K_D2, p.addr, b"after restart")           # relearns the device first
        got(gw, 401, K_AB, b"after restart")
        gw.sendto(outer.seal(outer.TYPE_DATA, D2, HK[K_AB], b"down after restart"), p.addr)
        got(dev2, 202, K_D2, b"down after restart")
        gw.sendto(outer.seal(outer.TYPE_DATA, 301, HK[K_BG], b"worker 0 kept its state"), p.addr)
        got(moved, 101, K_DA, b"worker 0 kept its state")

        # `microtun status` on the PoP's config: the sums and each worker
        out = subprocess.run([sys.executable, "-m", "microtun_host.cli", "status", "--config", str(p.path)],
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(LIB)), timeout=20)
        assert out.returncode == 0, out.stderr
        assert "2 workers" in out.stdout and "worker %d" % k in out.stdout and "restarts 1" in out.stdout, out.stdout
        pids = [w["pid"] for w in p.stats()["workers"]]
    finally:
        rc = p.stop()
    text = p.log()
    assert rc == 0, text
    assert "Traceback" not in text, text
    assert "changed to" not in text, text       # --workers 2 vs a file without "workers" is no change
    deadline = time.monotonic() + 5
    while any(alive(x) for x in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(x) for x in pids), "workers outlived the supervisor"


def test_workers_die_with_a_killed_supervisor(tmp_path):
    gw = udp()
    p = Workers(tmp_path, [route(100, K_DA, "127.0.0.1:%d" % gw.getsockname()[1], 300, K_BG)])
    pids = [w["pid"] for w in p.stats()["workers"]]
    p.proc.kill()
    p.proc.wait(5)
    p.log_file.close()
    deadline = time.monotonic() + 5
    while any(alive(x) for x in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(x) for x in pids)


def test_workers_setting_and_flag_are_checked(tmp_path):
    cfg = tmp_path / "p.json"
    cfg.write_text(json.dumps({"name": "p", "listen": "127.0.0.1:7000", "workers": 0, "routes": []}))
    env = dict(os.environ, PYTHONPATH=str(LIB))
    run = lambda *a: subprocess.run([sys.executable, "-m", "microtun_host.cli", "pop", "--config", str(cfg)] + list(a),
                                    capture_output=True, text=True, env=env, timeout=20)      # noqa: E731
    r = run("--check")
    assert r.returncode == 2 and "workers" in r.stderr and "1..256" in r.stderr, r.stderr
    cfg.write_text(json.dumps({"name": "p", "listen": "127.0.0.1:7000", "workers": 2, "routes": []}))
    r = run("--check", "--workers", "3")            # the flag wins over the file
    assert r.returncode == 0 and "3 workers" in r.stdout, r.stdout + r.stderr
    r = run("--check", "--workers", "0")
    assert r.returncode == 2 and "1..256" in r.stderr, r.stderr


# --- a standby next hop (microtun_host.nexthop) ---------------------------------

class FakeGateway:
    """Answers HOP_PROBEs on label 300 (key K_BG) while `alive`, and keeps
    the DATA it receives; a thread on its own socket."""

    def __init__(self):
        import threading
        self.sock = udp(timeout=0.05)
        self.addr = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.alive = True
        self.data = []
        self.probes = 0
        self.running = True
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while self.running:
            try:
                pkt, src = self.sock.recvfrom(65536)
            except socket.timeout:
                continue
            if not self.alive:
                continue
            parsed = outer.parse(pkt)
            if parsed == (outer.TYPE_HOP_PROBE, 300) and outer.verify(HK[K_BG], pkt):
                self.probes += 1
                body = outer.probe_reply_payload(pkt[outer.HEADER_LEN:], *pop.encode_source(src))
                self.sock.sendto(outer.seal(outer.TYPE_HOP_PROBE_REPLY, 300, HK[K_BG], body), src)
            elif parsed is not None and parsed[0] == outer.TYPE_DATA:
                self.data.append(pkt[outer.HEADER_LEN:])

    def stop(self):
        self.running = False
        self.t.join(2)
        self.sock.close()


def wait_for(pred, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("n", [1, 2])
def test_standby_next_hop_takes_over_when_the_primary_stops_answering(tmp_path, n):
    a, b = FakeGateway(), FakeGateway()
    dev = udp()
    routes = [dict(route(100, K_DA, a.addr, 300, K_BG), standby=b.addr),
              dict(route(101, K_DA, a.addr, 300, K_BG), standby=b.addr),     # the other worker when n = 2
              route(301, K_BG, "learn:100", 102, K_DA)]
    p = Workers(tmp_path, routes, n)            # n = 1: the single process, no supervisor
    try:
        for label in (100, 101):
            send_up(dev, label, K_DA, p.addr, b"to primary %d" % label)
        assert wait_for(lambda: len(a.data) == 2), a.data
        assert wait_for(lambda: b.probes >= 1)          # the standby is probed too, before it is needed
        a.alive = False                                 # the primary dies (kill -9: silent)
        t0 = time.monotonic()
        assert wait_for(lambda: "standby_in_use" in control.query(p.ctl, {"cmd": "stats"}, timeout=3.0), 5)
        switched = time.monotonic() - t0
        assert switched < 2.0, switched                 # DEAD_S 0.6 s plus a probe period
        for label in (100, 101):
            send_up(dev, label, K_DA, p.addr, b"to standby %d" % label)
        assert wait_for(lambda: len(b.data) == 2), b.data
        assert sorted(b.data) == [b"to standby 100", b"to standby 101"]
        a.alive = True                                  # back, but sticky: the standby stays in use
        time.sleep(1.2)
        send_up(dev, 100, K_DA, p.addr, b"still standby")
        assert wait_for(lambda: len(b.data) == 3)
        assert len(a.data) == 2
        s = control.query(p.ctl, {"cmd": "stats"}, timeout=3.0)
        mon = s["next_hop_monitor"]
        assert mon["switches"] == 1 and mon["rejected"] == 0, mon
        assert s["standby_in_use"] == {a.addr: b.addr}, s
        text = p.log()
        assert "next hop %s does not answer probes" % a.addr in text and "switch to its standby %s" % b.addr in text
    finally:
        rc = p.stop()
        a.stop()
        b.stop()
    assert rc == 0, p.log()


def test_a_forged_probe_reply_moves_nothing():
    import logging
    from microtun_host import nexthop
    from microtun_host.config import parse_address
    specs = [pop.RouteSpec(100, K_DA, parse_address("127.0.0.1:9001"), 0, 300, K_BG,
                           standby=parse_address("127.0.0.1:9002"))]
    now = [0.0]
    switched = []
    m = nexthop.Monitor(parse_address("127.0.0.1:9000"), specs, logging.getLogger("t"),
                        lambda p, d: switched.append(d), clock=lambda: now[0])
    pair = m.pairs[(("127.0.0.1", 9001), ("127.0.0.1", 9002))]
    pair.outstanding[7] = 1
    body = outer.probe_reply_payload(outer.probe_body(7, 0), 4, 9000, bytes((127, 0, 0, 1)))
    good = outer.seal(outer.TYPE_HOP_PROBE_REPLY, 300, HK[K_BG], body)
    for pkt, src in [(outer.seal(outer.TYPE_HOP_PROBE_REPLY, 300, HK[K_DA], body), ("127.0.0.1", 9002)),  # wrong key
                     (good, ("127.0.0.1", 9003)),                                                    # wrong source
                     (outer.seal(outer.TYPE_HOP_PROBE_REPLY, 301, HK[K_BG], body), ("127.0.0.1", 9002))]:  # label
        m._reply(pkt, src)
    assert m.rejected == 3 and pair.heard[1] is None
    m._reply(good, ("127.0.0.1", 9002))
    assert pair.heard[1] == 0.0 and m.replies == 1
    m._reply(good, ("127.0.0.1", 9002))                 # a replay: the id is no longer outstanding
    assert m.rejected == 4
    now[0] = 1.0                                        # primary silent for 1 s, standby heard 1 s ago
    m._judge(pair, now[0])
    assert switched == [("127.0.0.1", 9002)]


def test_two_workers_serve_one_metrics_endpoint(tmp_path):
    # With workers, the supervisor serves the metrics (the workers' own
    # "metrics" is off, or they would all try to bind the one address):
    # the counters are the workers' added up, as `microtun status` shows.
    from test_metrics import scrape, value, _wait_http
    gw = udp()
    mport = free_port()                  # free for TCP too (localnet.free_ports)
    routes = [route(100, K_DA, "127.0.0.1:%d" % gw.getsockname()[1], 300, K_BG),
              route(301, K_BG, "learn:100", 101, K_DA)]
    p = Workers(tmp_path, routes, metrics="127.0.0.1:%d" % mport)
    try:
        junk = udp()
        for i in range(10):                 # too short to carry a label: all dropped as "short"
            junk.sendto(b"\x10\x00" * (i % 5 + 1), p.addr)
        s = p.wait(lambda s: s.get("drops", {}).get("short", 0) == 10, 5)
        fams = _wait_http(mport)
        assert value(fams, "microtun_pop_info", name="wpop") == 1
        assert value(fams, "microtun_pop_drops", reason="short") == 10 == s["drops"]["short"]
        assert value(fams, "microtun_pop_routes") == 2
        assert "listening" in p.log() and "cannot serve metrics" not in p.log()
    finally:
        assert p.stop() == 0, p.log()
