"""The gateway as a real process (issue 11): a device whose boot counter
was reset is back within one retry; per-device counters and log lines for
stale handshakes and a service that is not listening; one-line errors for a
taken port and an unusable --control address."""
import json
import socket
import subprocess
import time

import pytest

from harness import Net, ROOT, PY, py_env, mp_env, micropython, parse_result, free_ports


@pytest.fixture
def net(tmp_path):
    n = Net(tmp_path, routes={"a": ["a1", "a2"]}, devices={"d1": {}})
    n.start()
    yield n
    n.stop()


def _dev(st, name):
    return [d for d in st["devices"] if d["name"] == name][0]


def test_reset_boot_counter_back_within_one_retry(net):
    res = net.device("d1", "--count", "3")
    assert res["delivered"] == 3
    res = net.device("d1", "--count", "3")        # boot 2: fine
    assert res["delivered"] == 3
    # the board is re-flashed: its stored boot counter starts again
    (net.state_dir("d1") / "microtun_boot.bin").write_bytes((0).to_bytes(4, "big"))
    t0 = time.monotonic()
    r = subprocess.run([micropython(),
                        str(ROOT / "tools" / "device_run.py"), net.device_config("d1"), "--count", "3",
                        "--connect-ms", "5000"],
                       capture_output=True, text=True, env=mp_env(), cwd=str(ROOT), timeout=60)
    took = time.monotonic() - t0
    res = parse_result(r.stdout, r.stderr)
    assert res.get("delivered") == 3, (res, r.stdout[-2000:])
    # connected at the first attempt's answer, not after a retry timer
    connected = [json.loads(l[2:]) for l in r.stdout.splitlines() if l.startswith("P {\"connected_ms\"")]
    assert connected and connected[0]["connected_ms"] < 5000, (connected, took)
    assert "the gateway has seen boot counter 2" in r.stdout and "continuing from 3" in r.stdout, r.stdout
    # the jump was persisted: the next boot continues above it
    assert int.from_bytes((net.state_dir("d1") / "microtun_boot.bin").read_bytes(), "big") >= 3
    st = net.gw_status()
    d1 = _dev(st, "d1")
    assert d1["counters"]["stale_handshake"] >= 1 and d1["counters"]["stale_answer_tx"] >= 1
    assert d1["stale"]["counter"] == 1 and d1["stale"]["gateway_counter"] == 2
    time.sleep(0.2)
    assert "device d1: stale handshake (counter 1 \u2264 2)" in net.log("gw")
    out = subprocess.run([PY, "-m", "microtun_host.cli", "status", "--control", net.gw["control"]],
                         capture_output=True, text=True, env=py_env(), cwd=str(ROOT), timeout=30)
    assert out.returncode == 0 and "stale handshake" in out.stdout and "stale_handshake=" in out.stdout, out.stdout


def test_service_not_listening_counted_and_logged(net):
    net.echo.stop()                                # nobody serves channel 1 now
    res = net.device("d1", "--count", "10", "--interval", "50", "--linger", "500")
    assert res["delivered"] == 0
    time.sleep(0.3)
    d1 = _dev(net.gw_status(), "d1")
    assert d1["counters"].get("service_unreachable", 0) >= 1, d1["counters"]
    lines = [l for l in net.log("gw").splitlines() if "is not listening" in l]
    assert 1 <= len(lines) <= 2 and "device d1: channel 1 service 127.0.0.1:%d" % net.echo_port in lines[0], lines


def test_service_reply_longer_than_a_device_takes_counted_and_logged(net):
    # The echo service sends back what the device sent: 2003 bytes is the
    # most a device takes (its driver reads 2048-byte datagrams), 2500 is
    # more. The gateway drops the long reply where it can say why, instead of
    # letting the device's socket cut it into a forgery.
    from microtun import driver, hop
    from microtun.responder import DEVICE_PAYLOAD_MAX
    assert DEVICE_PAYLOAD_MAX == driver._RECV_MAX - hop.HEADER_LEN - 16 - 1 - 16
    res = net.device("d1", "--count", "3", "--size", str(DEVICE_PAYLOAD_MAX), "--linger", "500")
    assert res["delivered"] == 3, res
    res = net.device("d1", "--count", "3", "--size", "2500", "--interval", "50", "--linger", "500")
    assert res["delivered"] == 0, res
    time.sleep(0.3)
    d1 = _dev(net.gw_status(), "d1")
    assert d1["counters"].get("too_long_for_device") == 3, d1["counters"]
    lines = [l for l in net.log("gw").splitlines() if "too_long_for_device" in l or "takes at most" in l]
    assert lines and "device d1: a 2500-byte reply from the channel 1 service 127.0.0.1:%d dropped: a device " \
        "takes at most %d bytes per message" % (net.echo_port, DEVICE_PAYLOAD_MAX) in lines[0], lines


def _run_cli(*args):
    return subprocess.run([PY, "-m", "microtun_host.cli"] + list(args), capture_output=True, text=True,
                          env=py_env(), cwd=str(ROOT), timeout=30)


def test_gateway_port_taken_is_one_line(tmp_path):
    n = Net(tmp_path, routes={"a": ["a1"]})
    host, port = n.gw["listen"].rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, int(port)))
    try:
        r = _run_cli("gateway", "--config", str(n.out / "gateway.json"))
    finally:
        s.close()
    assert r.returncode == 1
    assert "Traceback" not in r.stderr + r.stdout
    err = [l for l in r.stderr.splitlines() if l.strip() and " gateway INFO " not in l]   # info log lines aside
    assert len(err) == 1 and "cannot listen on %s" % n.gw["listen"] in err[0], r.stderr


@pytest.mark.parametrize("addr", ["localhost:7390", "127.0.0.1:%d" % free_ports(1)[0], "127.0.0.1:99999", "nonsense"])
def test_status_bad_control_is_one_line(addr):
    r = _run_cli("status", "--control", addr)
    assert r.returncode in (1, 2)
    assert "Traceback" not in r.stderr + r.stdout
    err = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("microtun status:"), r.stderr


class _FakeTransport:
    def __init__(self):
        self.sent = 0

    def sendto(self, data, addr=None):
        self.sent += 1

    def close(self):
        pass


N, W, DEBUG = 12000, 4000, False


def test_mixed_fuzz_keeps_gateway_memory_flat(tmp_path):
    """Defect 5: the gateway's memory under mixed fuzzing (random, mutated
    captures, valid-hop-MAC mutations, replays, hop types, new INITs with a
    valid mac1 on ever new links), in process under tracemalloc, driven the
    way the event loop drives it (the loop runs between datagrams)."""
    import asyncio
    import random
    import tracemalloc
    from microtun import outer, messages as m
    from microtun.endpoint import Device
    from microtun.config import load as load_device
    from microtun_host.gateway import GatewayServer, load_gateway_config, now_ms

    n = Net(tmp_path, routes={"a": ["a1"]}, devices={"d1": {}})

    async def run():
        srv = GatewayServer(load_gateway_config(str(n.out / "gateway.json")))
        srv._transport = _FakeTransport()
        link = srv.links[0]
        dc = load_device(n.device_config("d1"))
        dev = Device(dc.private_key, dc.gateway_public, psk=dc.psk, boot_counter=1)
        caps = []

        def to_gw():
            for d, _ in dev.datagrams_to_send():
                pkt = outer.seal(outer.TYPE_DATA, link.in_label, link.key, d)
                caps.append(pkt)
                srv._on_outer(pkt, ("127.0.0.1", 4000))
        # the fuzzer's captures: a real handshake (its RESPONSE read back from the core) and data
        dev.connect(now_ms())
        sent = []
        srv._send_outer = lambda ptype, label, lk, payload, addr: sent.append(payload)
        to_gw()
        dev.receive_datagram(sent[0], 0, now_ms())
        to_gw()
        for i in range(20):
            dev.send(1, b"%d:x" % i, now_ms())
            to_gw()
        assert dev.established
        del srv._send_outer                        # the real one again, into the fake transport
        rng = random.Random(3)
        mk = m.mac1_key(srv.core.public_key)

        def fuzz(i):
            k = i % 6
            if k == 0:
                return rng.randbytes(rng.randrange(1, 200))
            if k == 1:
                c = bytearray(rng.choice(caps))
                c[rng.randrange(len(c))] ^= 1 + rng.getrandbits(7)
                return bytes(c)
            if k == 2:
                c = bytearray(rng.choice(caps)[outer.HEADER_LEN:])
                c[rng.randrange(len(c))] ^= 1 + rng.getrandbits(7)
                return outer.seal(outer.TYPE_DATA, link.in_label, link.key, bytes(c))
            if k == 3:
                return rng.choice(caps)
            if k == 4:
                return outer.seal(rng.choice((outer.TYPE_HOP_PROBE, outer.TYPE_HOP_KEEPALIVE)), link.in_label,
                                  link.key, rng.randbytes(rng.randrange(0, 30)))
            init = m.finish(m.header(m.TYPE_INIT) + rng.randbytes(m.INIT_MAC1 - 4), mk, None)[0]
            return outer.seal(outer.TYPE_DATA, link.in_label, link.key, init)

        def src():
            return ("127.0.0.%d" % rng.randrange(1, 250), rng.randrange(1, 65535))
        for i in range(W):                      # warm-up
            srv._on_outer(fuzz(i), src())
            if i % 4 == 0:
                await asyncio.sleep(0)
        tracemalloc.start(8 if DEBUG else 1)
        base = tracemalloc.get_traced_memory()[0]
        import time as _t
        t0 = _t.monotonic()
        s0 = tracemalloc.take_snapshot()
        for i in range(N):
            srv._on_outer(fuzz(i), src())
            if i % 4 == 0:
                await asyncio.sleep(0)
        grown = tracemalloc.get_traced_memory()[0] - base
        if DEBUG:
            print("took", _t.monotonic() - t0)
            for st in tracemalloc.take_snapshot().compare_to(s0, "traceback")[:5]:
                print(st)
                for l in st.traceback.format()[-10:]:
                    print("   ", l)
        tracemalloc.stop()
        await srv.stop(quiet=True)
        return grown, srv.counters()
    grown, counters = asyncio.run(run())
    assert counters.get("internal_error", 0) == 0
    assert counters["bad_init"] > 0 and counters["outer_bad_mac"] > 0 and counters["decrypt_failed"] > 0
    assert grown < 32 * 1024, (grown, counters)


def test_learned_link_moves_only_on_fresh_authentic_packets(tmp_path):
    """A link with `next: "learn"` (a device talking to the gateway without
    PoPs, or a NATed last PoP): a captured packet replayed from another
    address passes the hop MAC but must not steer the replies (defect 4);
    the device's own next packet from a new address (NAT rebinding) does."""
    import asyncio
    from microtun import outer
    from microtun.endpoint import Device
    from microtun.config import load as load_device
    from microtun_host.gateway import GatewayServer, load_gateway_config, now_ms

    n = Net(tmp_path, routes={"a": ["a1"]}, devices={"d1": {}})
    A, B, C = ("127.0.0.1", 4000), ("127.0.0.66", 666), ("127.0.0.1", 4001)

    async def run():
        srv = GatewayServer(load_gateway_config(str(n.out / "gateway.json")))
        srv._transport = _FakeTransport()
        link = srv.links[0]
        link.learn, link.peer_addr = True, None
        dc = load_device(n.device_config("d1"))
        dev = Device(dc.private_key, dc.gateway_public, psk=dc.psk, boot_counter=1)
        sent, caps = [], []
        srv._send_outer = lambda ptype, label, lk, payload, addr: sent.append(payload)

        def to_gw(src):
            for d, _ in dev.datagrams_to_send():
                pkt = outer.seal(outer.TYPE_DATA, link.in_label, link.key, d)
                caps.append(pkt)
                srv._on_outer(pkt, src)
        dev.connect(now_ms())
        to_gw(A)
        dev.receive_datagram(sent[0], 0, now_ms())
        dev.send(1, b"first", now_ms())
        to_gw(A)
        assert dev.established and link.peer_addr == A
        for pkt in caps:                       # every captured packet, replayed from B
            srv._on_outer(pkt, B)
        assert link.peer_addr == A
        dev.send(1, b"after the NAT rebound", now_ms())
        to_gw(C)
        assert link.peer_addr == C
        await srv.stop(quiet=True)
    asyncio.run(run())


def test_drops_before_a_device_is_known_are_explained_in_a_log_line(tmp_path, monkeypatch, caplog):
    """Replayed INITs, bad mac1 or hop MACs can't be counted per device (the
    device isn't known before the DH): the gateway counts them and says so in
    one info line per interval, nothing when nothing was dropped."""
    import asyncio
    import logging
    from microtun import outer
    from microtun_host import gateway as g

    monkeypatch.setattr(g, "LOG_EVERY_S", 0.3)
    n = Net(tmp_path, routes={"a": ["a1"]}, devices={"d1": {}})

    async def run():
        srv = g.GatewayServer(g.load_gateway_config(str(n.out / "gateway.json")))
        await srv.start()
        await asyncio.sleep(0.5)                # a quiet interval: no line
        quiet = [r for r in caplog.records if "in the last" in r.getMessage()]
        link = srv.links[0]
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(30):
            s.sendto(outer.seal(outer.TYPE_DATA, link.in_label, outer.HopKey(bytes(32)), b"x" * 40), srv.address)
        s.close()
        await asyncio.sleep(0.8)
        await srv.stop(quiet=True)
        return quiet
    with caplog.at_level(logging.INFO, logger="microtun.gateway"):
        quiet = asyncio.run(run())
    assert quiet == []
    lines = [r.getMessage() for r in caplog.records if "in the last" in r.getMessage()]
    assert len(lines) == 1 and "outer_bad_mac 30" in lines[0], lines


def test_file_mode_registry_expires(tmp_path, caplog):
    """File mode: a registry entry's "expires" (UTC) closes the device's
    session at that moment and refuses its handshakes from then on; an entry
    already past is never registered; renewal is the entry with a later time
    (a reload); a malformed time is one error naming the field."""
    import asyncio
    import logging
    from microtun import outer
    from microtun.endpoint import Device
    from microtun.config import load as load_device
    from microtun_host import gateway as g
    from microtun_host.changelog import utc_text
    from microtun_host.config import ConfigError

    n = Net(tmp_path, routes={"a": ["a1"]}, devices={"d1": {}, "d2": {}})
    reg_path = n.out / "registry.json"
    reg = json.loads(reg_path.read_text())

    def write_registry(d1_expires):
        for e in reg["devices"]:
            e["expires"] = d1_expires if e["name"] == "d1" else utc_text(time.time() - 60)
        reg_path.write_text(json.dumps(reg))
    at = int(time.time()) + 3                  # whole seconds: 2 to 3 s from now
    write_registry(utc_text(at))

    async def run():
        srv = g.GatewayServer(g.load_gateway_config(str(n.out / "gateway.json")))
        srv._transport = _FakeTransport()
        link = srv.links[0]
        got, out = [], []
        srv.on_data = lambda name, ch, data: got.append((name, bytes(data)))
        srv._send_outer = lambda ptype, label, lk, payload, addr: out.append(payload)

        def device(name):
            dc = load_device(n.device_config(name))
            return Device(dc.private_key, dc.gateway_public, psk=dc.psk, boot_counter=int(time.time()))

        def to_gw(dev):
            for d, _ in dev.datagrams_to_send():
                srv._on_outer(outer.seal(outer.TYPE_DATA, link.in_label, link.key, d), ("127.0.0.1", 4000))

        def connect(dev):
            out.clear()
            dev.connect(g.now_ms())
            to_gw(dev)
            for p in out:
                dev.receive_datagram(p, 0, g.now_ms())
            return dev.established

        assert sorted(srv.names) == ["d1"]           # d2's credential expired before the gateway started
        assert "d1" in srv.status()["expiring"]
        d1 = device("d1")
        assert connect(d1)
        d1.send(2, b"before", g.now_ms())      # channel 2: no service, on_data
        to_gw(d1)
        assert got == [("d1", b"before")]
        refused = srv.counters().get("unknown_peer", 0)
        assert not connect(device("d2")) and srv.counters()["unknown_peer"] == refused + 1
        await asyncio.sleep(max(0.0, at - time.time()) + 0.3)
        # the session closed at that moment, with nothing arriving to trigger it
        assert srv.names == {} and len(srv.core.peers) == 0 and srv.counters()["expired"] == 1
        d1.send(2, b"after", g.now_ms())
        to_gw(d1)
        assert got == [("d1", b"before")]
        assert not connect(device("d1")) and srv.counters()["unknown_peer"] == refused + 2
        # renewal: the entry with a later time, then a reload
        write_registry(utc_text(time.time() + 3600))
        assert srv.reload()[0] and sorted(srv.names) == ["d1"]
        assert connect(device("d1"))
        await srv.stop(quiet=True)
    with caplog.at_level(logging.INFO, logger="microtun.gateway"):
        asyncio.run(run())
    assert any("device d1 credential expired at %s" % utc_text(at) in r.getMessage() for r in caplog.records)
    reg["devices"][0]["expires"] = "tomorrow"
    reg_path.write_text(json.dumps(reg))
    with pytest.raises(ConfigError, match=r"devices\[0\]\.expires: expected \"YYYY-MM-DDTHH:MM:SSZ\" \(UTC\)"):
        g.load_gateway_config(str(n.out / "gateway.json"))


def test_handshake_budget_is_a_setting(tmp_path):
    """dh_per_s / link_dh_per_s (docs/CONFIG.md): the flood budgets of the
    portable core are settings of the gateway, from the topology through
    provision, live on reload; an INIT over the budget costs no DH and is
    counted."""
    import random
    from microtun import outer, messages as m
    from microtun_host import gateway as g
    from microtun_host.config import ConfigError
    from microtun.responder import GATEWAY_DH_PER_S, LINK_DH_PER_S

    n = Net(tmp_path, routes={"a": ["a1"]}, devices={"d1": {}})
    gw_path = n.out / "gateway.json"
    cfg = g.load_gateway_config(str(gw_path))
    assert (cfg.crypto, cfg.dh_per_s, cfg.link_dh_per_s) == ("cryptography", GATEWAY_DH_PER_S, LINK_DH_PER_S)

    # from the topology, through provision, into the running core
    n.topology.write_text(n.topology.read_text().replace("[gateway]\n", "[gateway]\ndh_per_s = 3\n", 1))
    n.provision()
    assert json.loads(gw_path.read_text())["dh_per_s"] == 3
    srv = g.GatewayServer(g.load_gateway_config(str(gw_path)))
    srv._transport = _FakeTransport()
    assert srv.status()["dh_per_s"] == 3
    link = srv.links[0]
    mk = m.mac1_key(srv.core.public_key)
    rng = random.Random(5)
    for _ in range(5):      # fresh INITs with a valid mac1 from nobody registered: the 4th and 5th cost no DH
        init = m.finish(m.header(m.TYPE_INIT) + rng.randbytes(m.INIT_MAC1 - 4), mk, None)[0]
        srv._on_outer(outer.seal(outer.TYPE_DATA, link.in_label, link.key, init), ("127.0.0.1", 4000))
    c = srv.counters()
    assert c.get("init_budget") == 2 and c.get("unknown_peer", 0) + c.get("bad_init", 0) == 3, c

    # a reload applies a new budget; a bad one is one line naming the field
    gw_path.write_text(json.dumps(dict(json.loads(gw_path.read_text()), dh_per_s=500, link_dh_per_s=20)))
    assert srv.reload()[0] and (srv.core.dh_per_s, srv.core.link_dh_per_s) == (500, 20)
    gw_path.write_text(json.dumps(dict(json.loads(gw_path.read_text()), dh_per_s=0)))
    with pytest.raises(ConfigError, match=r"dh_per_s"):
        g.load_gateway_config(str(gw_path))
