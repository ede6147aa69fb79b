"""Fleet mode against a real etcd (Debian's etcd-server), started here on
loopback with random ports and a temporary data dir, and always stopped:
records in and out of etcd, refusals, and a live network of real processes
that follows the log (revocation, expiry, a malformed entry, etcd lost and
back). Skipped with one line when etcd is not installed."""
import asyncio
import json
import threading
import time

import pytest

from microtun_host import changelog, etcd, fleet, fleetnode
from microtun_host.config import Node
from microtun_host.changelog import OperatorKey, make_record
from microtun_host.localnet import parse_result

if etcd.etcd_binary() is None:
    pytest.skip(etcd.INSTALL_HINT, allow_module_level=True)


def _wait(cond, timeout=10.0, step=0.05):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(step)
    return cond()


@pytest.fixture
def store_env(tmp_path):
    e = etcd.LocalEtcd().start()
    try:
        key = OperatorKey.generate(str(tmp_path / "op.key"))
        node = Node(str(tmp_path / "fleet.json"), "", {"endpoints": [e.endpoint],
                                                             "trusted_operators": [key.public.hex()]})
        yield e, key, fleet.Settings(node, str(tmp_path))
    finally:
        e.stop()


def test_client_basics(store_env):
    e, _, _ = store_env
    c = etcd.Client(e.endpoint)
    c.put("/t/a", b"1")
    c.put("/t/b", b"2")
    kvs, rev, more = c.range("/t/", prefix=True)
    assert [(k.key, k.value) for k in kvs] == [("/t/a", b"1"), ("/t/b", b"2")] and not more
    assert not c.txn([c.cmp_mod_revision("/t/a", 0)], [c.op_put("/t/a", b"x")])[0]
    assert c.get("/t/a").value == b"1"
    lease = c.lease_grant(5)
    assert c.lease_keepalive(lease) > 0
    with pytest.raises(etcd.EtcdError, match="127.0.0.1"):
        etcd.Client("http://127.0.0.1:1", timeout=0.5).range("/")


def test_follower_applies_verified_records_and_refuses_the_rest(store_env):
    """A node follows the log live; forged, untrusted, replayed and
    reordered records put straight into etcd are refused, counted, and
    the genuine record after them still applies."""
    e, key, s = store_env
    store = fleet.Store(s)
    store.append(key, "d1 added", [{"op": "put", "key": "devices/d1", "value": {"n": 1}}])
    got = []
    loop = asyncio.new_event_loop()
    lines = []

    class L:
        def __getattr__(self, name):
            return lambda fmt, *a: lines.append(fmt % a)
    f = fleetnode.Follower(s, "pops", "t", "127.0.0.1:1", lambda st, seq, t: got.append((seq, dict(st))), L())
    th = threading.Thread(target=loop.run_forever, daemon=True)
    th.start()
    f.start(loop)
    try:
        assert _wait(lambda: got and got[-1][0] == 1)
        c = etcd.Client(e.endpoint)
        chain, _, _, _ = store.verified()
        other = OperatorKey.generate(str(e.dir) + "/x.key")
        r1 = json.loads(c.range("/microtun/log/", prefix=True)[0][0].value)
        bad = [
            dict(make_record(key, 2, chain.head, "ok?", []), what="forged"),            # bad signature
            make_record(other, 2, chain.head, "untrusted", []),                        # untrusted operator
            make_record(key, 1, changelog.GENESIS, "fork of 1", []),                   # replay of seq 1
            make_record(key, 3, chain.head, "too early", []),                          # out of order
        ]
        for i, r in enumerate(bad):
            c.put("/microtun/log/%012d.bad%d" % (r["seq"], i), changelog.canonical(r))
        c.put("/microtun/log/000000000001.copy", changelog.canonical(r1))              # an exact copy: skipped
        c.put("/microtun/log/000000000002.junk", b"{not json")
        store.append(key, "d2 added", [{"op": "put", "key": "devices/d2", "value": {"n": 2}}])
        assert _wait(lambda: got[-1][0] == 2)
        assert sorted(got[-1][1]) == ["devices/d1", "devices/d2"]
        st = f.status()
        assert st["refused"] == {"bad_signature": 1, "untrusted_operator": 1, "replayed": 1, "out_of_order": 1,
                                 "malformed": 1}, st
        assert sum("refused" in x for x in lines) == 5
        assert any("bad_signature" in x and ".bad0" in x for x in lines)
        # a second writer working from a stale head does not fork the chain
        chain2, _, head_rev, _ = store.verified()
        store.append(key, "d3", [{"op": "put", "key": "devices/d3", "value": {}}])
        with pytest.raises(changelog.LogError, match="another writer"):
            store.append(key, "stale", [{"op": "delete", "key": "devices/d1"}], chain2, head_rev)
    finally:
        f.stop()
        loop.call_soon_threadsafe(loop.stop)
        th.join(2)
        loop.close()


@pytest.fixture
def net(tmp_path):
    from microtun_host.fleetnet import FleetNet
    n = FleetNet(tmp_path, routes={"a": ["a1", "a2"]}, devices={"d1": {}, "d2": {}, "d3": {}}, spare_pops=("a3",))
    try:
        n.start()
        yield n
    finally:
        n.stop()


def test_fleet_config_errors(tmp_path):
    """A fleet node config that also holds what etcd provides: one line, exit 2."""
    import subprocess
    from microtun_host.localnet import PY, ROOT, py_env
    cfg = {"name": "a1", "listen": "127.0.0.1:7000", "routes": [],
           "fleet": {"endpoints": ["http://127.0.0.1:2379"], "trusted_operators": ["ab" * 32]}}
    (tmp_path / "a1.json").write_text(json.dumps(cfg))
    r = subprocess.run([PY, "-m", "microtun_host.cli", "pop", "--config", str(tmp_path / "a1.json"), "--check"],
                       capture_output=True, text=True, env=py_env(), cwd=str(ROOT), timeout=30)
    assert r.returncode == 2 and "routes: comes from etcd in fleet mode" in r.stderr, r.stderr
    del cfg["routes"]
    cfg["fleet"]["trusted_operators"] = ["nothex"]
    (tmp_path / "a1.json").write_text(json.dumps(cfg))
    r = subprocess.run([PY, "-m", "microtun_host.cli", "pop", "--config", str(tmp_path / "a1.json"), "--check"],
                       capture_output=True, text=True, env=py_env(), cwd=str(ROOT), timeout=30)
    assert r.returncode == 2 and "fleet.trusted_operators[0]" in r.stderr, r.stderr


def _gw_devices(net):
    return sorted(d["name"] for d in net.gw_status()["devices"])


def test_fleet_network_follows_the_log(net):
    """PoPs and the gateway take everything from etcd and apply changes live
    (no SIGHUP): etcd lost and back, a revocation, an expiry, a malformed entry."""
    assert _wait(lambda: _gw_devices(net) == ["d1", "d2", "d3"])
    assert _wait(lambda: net.pop_stats("a1")["routes"] == 6)
    # no private key is ever in etcd (device keys stay in state.json and the boards' configs,
    # the gateway's in its local config)
    st = json.loads((net.out / "state.json").read_text())
    secrets = [st["gateway"]["private_key"]] + [d["private_key"] for d in st["devices"].values()]
    everything = b"".join(kv.value for kv in net.client().range("/", prefix=True)[0])
    assert len(everything) > 1000 and not any(k.encode() in everything for k in secrets)

    # etcd dies under live traffic: forwarding goes on, every node says so; it comes back, they resync
    dev = net.device("d1", "--count", "150", "--interval", "20", background=True)
    time.sleep(1.0)
    net.etcd.kill()
    assert _wait(lambda: net.pop_stats("a1")["fleet"]["etcd"] == "lost", 5)
    assert net.gw_status()["fleet"]["etcd"] == "lost" or _wait(lambda: net.gw_status()["fleet"]["etcd"] == "lost", 5)
    time.sleep(0.5)
    net.etcd.start()
    out, _ = dev.communicate(timeout=60)
    res = parse_result(out)
    assert res["lost"] == 0 and res["delivered"] == 150, res
    assert _wait(lambda: net.pop_stats("a1")["fleet"]["etcd"] == "connected", 10)
    assert "etcd unreachable" in net.log("a1") and "answers again" in net.log("a1")

    # a route re-spliced under live traffic (a1 > a2 becomes a1 > a3): make before break, nothing lost
    cfg = json.loads((net.out / "fleet" / "pops" / "a1.json").read_text())
    cfg.update(name="a3", listen=net.pops["a3"]["listen"], control=net.pops["a3"]["control"])
    cfg["fleet"]["cache"] = "a3.cache"
    (net.out / "fleet" / "pops" / "a3.json").write_text(json.dumps(cfg))
    net.start_pop("a3")
    dev = net.device("d2", "--count", "200", "--interval", "10", background=True)
    time.sleep(1.0)
    net.routes["a"] = ["a1", "a3"]
    net.write_topology()
    out = net.provision()
    assert "records 3,4,5 published" in out and "3 paths re-spliced or re-keyed" in out, out   # 3 steps
    res = parse_result(dev.communicate(timeout=60)[0])
    assert res["lost"] == 0 and res["delivered"] == 200, res
    assert _wait(lambda: net.pop_stats("a3")["routes"] == 6 and net.pop_stats("a2")["draining"] == 0
                 or net.pop_stats("a2")["routes"] == 0, 5)

    # revocation: one record, applied by every node without a signal
    r = net.fleet("revoke", "d1")
    assert r.returncode == 0 and "d1 revoked" in r.stdout, r.stdout + r.stderr
    assert _wait(lambda: _gw_devices(net) == ["d2", "d3"], 5)
    assert _wait(lambda: net.pop_stats("a1")["routes"] == 4 and net.pop_stats("a3")["routes"] == 4, 5)
    res = net.device("d1", "--count", "3", "--connect-ms", "1500", "--linger", "200")
    assert "no session" in res.get("error", ""), res

    # expiry: the session closes at that moment; renewal is a new record
    res = net.device("d2", "--count", "5")
    assert res["delivered"] == 5
    at = time.time() + 4        # past the time `fleet expire` takes on a loaded machine
    r = net.fleet("expire", "d2", "--at", changelog.utc_text(at + 1))      # whole seconds: at most 5 s away
    assert r.returncode == 0, r.stderr
    assert _wait(lambda: "d2" in net.gw_status()["fleet"]["expiring"], 5)
    assert _wait(lambda: _gw_devices(net) == ["d3"], 8)
    assert "device d2 credential expired at" in net.log("gw")
    r = net.fleet("expire", "d2", "--at", changelog.utc_text(time.time() + 3600))
    assert r.returncode == 0, r.stderr
    assert _wait(lambda: _gw_devices(net) == ["d2", "d3"], 5)

    # a signed record with a malformed entry: one line naming the record and field; state kept
    s = fleet.load_settings(str(net.fleet_path))
    store = fleet.Store(s)
    seq = store.append(net.key, "broken", [{"op": "put", "key": "devices/d3", "value": {
        "name": "d3", "public_key": "zz" * 32, "channels": [1]}}])[-1]
    assert _wait(lambda: net.gw_status()["fleet"]["config_errors"] == 1, 5)
    assert "fleet log record %d: devices/d3: public_key" % seq in net.log("gw")
    assert _gw_devices(net) == ["d2", "d3"]
    res = net.device("d3", "--count", "5")
    assert res["delivered"] == 5

    # `microtun log` tells who revoked d1 and when; `fleet status` lists every node
    r = net.fleet("status")
    assert r.returncode == 0 and "gateways/gw" in r.stdout and "pops/a1" in r.stdout, r.stdout + r.stderr
    import subprocess
    from microtun_host.localnet import PY, ROOT, py_env
    r = subprocess.run([PY, "-m", "microtun_host.cli", "log", "--fleet", str(net.fleet_path), "--device", "d1"],
                       capture_output=True, text=True, env=py_env(), cwd=str(ROOT), timeout=30)
    assert r.returncode == 0 and "device d1 revoked" in r.stdout and net.key.public.hex()[:12] in r.stdout, r.stdout


def test_client_with_etcd_auth(store_env, tmp_path):
    """etcd with authentication on (docs/FLEET.md, "Auth and TLS"): a node
    user may read the log and write alive/, not the log; a wrong password
    is one clear error."""
    e, key, s = store_env
    c = etcd.Client(e.endpoint)
    b64 = etcd._b64
    for path, body in [
            ("/v3/auth/user/add", {"name": "root", "password": "rootpw"}),
            ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
            ("/v3/auth/role/add", {"name": "node"}),
            ("/v3/auth/role/grant", {"name": "node", "perm": {"permType": "READ", "key": b64("/microtun/"),
                                                               "range_end": b64(etcd.prefix_end("/microtun/"))}}),
            ("/v3/auth/role/grant", {"name": "node", "perm": {"permType": "READWRITE", "key": b64("/microtun/alive/"),
                                                               "range_end": b64(etcd.prefix_end("/microtun/alive/"))}}),
            ("/v3/auth/user/add", {"name": "pop-a1", "password": "s3cret"}),
            ("/v3/auth/user/grant", {"user": "pop-a1", "role": "node"}),
            ("/v3/auth/enable", {})]:
        c._post(path, body)
    root = etcd.Client(e.endpoint, user="root", password="rootpw")
    fleet.Store(s, root).append(key, "d1", [{"op": "put", "key": "devices/d1", "value": {}}])
    node = etcd.Client(e.endpoint, user="pop-a1", password="s3cret")
    items, _ = fleet.read_log(node, "/microtun/")
    assert len(items) == 1
    node.put("/microtun/alive/pops/a1", b"{}")
    with pytest.raises(etcd.EtcdError, match="permission denied"):
        node.put("/microtun/log/000000000002.x", b"{}")
    with pytest.raises(etcd.EtcdError, match="authentication failed"):
        etcd.Client(e.endpoint, user="pop-a1", password="wrong").range("/microtun/")
    with pytest.raises(etcd.EtcdError):
        etcd.Client(e.endpoint).range("/microtun/")      # no user at all
    # the fleet section's user/password_file reach the client
    (tmp_path / "pw").write_text("s3cret\n")
    s2 = fleet.Settings(Node("f.json", "", {"endpoints": [e.endpoint], "trusted_operators": [key.public.hex()],
                                                  "user": "pop-a1", "password_file": "pw"}), str(tmp_path))
    assert len(fleet.read_log(s2.client(), "/microtun/")[0]) == 1


def test_gateway_pool_moves_a_dead_gateways_devices(tmp_path):
    """Two gateways of one identity ([[gateway.pool]]), each with a lease:
    the PoP sends each device's path to the gateway rendezvous hashing
    picks among those alive; a revocation reaches both; the gateway of a
    device sending under way dies (SIGKILL), its lease expires, the PoP
    moves the path to the other, and the device (unresponsive_s = 3, past
    the lease) handshakes there and sends again with its config unchanged."""
    import signal
    from microtun_host import gwpool
    from microtun_host.fleetnet import FleetNet
    net = FleetNet(tmp_path, routes={"a": ["a1"]}, devices={"d1": {}, "d2": {}, "d3": {}}, pool=["gw2"], lease_s=2)
    try:
        net.start()
        gws = lambda: net.pop_stats("a1")["fleet"].get("gateways", {})     # noqa: E731
        assert _wait(lambda: gws().get("live") == ["gw", "gw2"], 10), gws()
        assert sum(gws()["devices"].values()) == 3
        r = net.fleet("status")
        assert r.returncode == 0 and "gateway pool: gw, gw2; devices per gateway alive: gw " in r.stdout, r.stdout
        # the same answer on every PoP, from the same function
        dead = gwpool.choose("d1", ["gw", "gw2"])
        other = "gw2" if dead == "gw" else "gw"
        # a revocation reaches both gateways
        r = net.fleet("revoke", "d3")
        assert r.returncode == 0, r.stderr
        for g in ("gw", "gw2"):
            assert _wait(lambda: "d3" not in [d["name"] for d in net.status_of(g)["devices"]], 5), g

        dev = net.device("d1", "--count", "350", "--interval", "20", "--linger", "3000", background=True)
        assert _wait(lambda: net.echo.count >= 25, 20), "no traffic"
        assert any(d["name"] == "d1" and d["established"] for d in net.status_of(dead)["devices"])
        n_before = net.echo.count
        t_kill = time.monotonic()
        net.kill(dead, signal.SIGKILL)
        assert _wait(lambda: gws().get("live") == [other], 6), gws()
        res = parse_result(dev.communicate(timeout=60)[0])
        after = [t for t in net.echo.stamps[n_before:] if t > t_kill]
        assert after, ("nothing arrived after the kill", res)
        resume = after[0] - t_kill
        st = net.pop_stats("a1")["fleet"]["gateways"]
        assert st["live"] == [other] and st["devices"] == {other: 2}, st
        d1 = [d for d in net.status_of(other)["devices"] if d["name"] == "d1"][0]
        assert d1["established"] and res["handshakes"] >= 2, (d1, res)
        # lost: the messages sent while the dead gateway still held its lease and the device re-handshook,
        # one run of them; everything after arrives
        assert resume < 8 and res["longest_loss_run"] >= res["lost"] - 3 and res["delivered"] > 100, (resume, res)
        assert "gateways %s: gone: %s; the devices they served move" % (other, dead) in net.log("a1")
    finally:
        net.stop()


def test_fleet_ops_follows_the_device_record(tmp_path):
    """Fleet mode and the ops channel (docs/OPS.md): a device whose record in
    etcd says "ops": true is reached with `ops exec`; one whose record does
    not is refused with one clear line; a new record taking ops away
    refuses the next operation, token or not, without a restart."""
    from microtun_host.fleetnet import FleetNet
    from test_ops_e2e import Device, cli, wait_established
    key_path = str(tmp_path / "ops.key")
    key = OperatorKey.generate(key_path)
    net = FleetNet(tmp_path, routes={"a": ["a1"]}, devices={"d1": {"ops": True}, "d2": {}},
                   operators=[key.public.hex()])
    root = tmp_path / "root"
    root.mkdir()
    dev = None
    try:
        records = {kv.key: json.loads(kv.value) for kv in net.client().range("/microtun/log/", prefix=True)[0]}
        devs = [c for r in records.values() for c in r["changes"] if c["key"].startswith("devices/")]
        assert {c["key"]: c["value"].get("ops", False) for c in devs} == {"devices/d1": True, "devices/d2": False}
        net.start()
        dev = Device(net, "d1", root)
        wait_established(net, "d1", timeout=30)
        gwcfg = str(net.out / "fleet" / "gateway.json")
        r = cli("ops", "d1", "--config", gwcfg, "--operator-key", key_path, "exec", "print(6 * 7)")
        assert r.returncode == 0 and r.stdout == "42\n", r.stderr
        token = cli("ops", "d1", "--config", gwcfg, "--operator-key", key_path, "token").stdout.strip()
        r = cli("ops", "d2", "--config", gwcfg, "--operator-key", key_path, "exec", "print(1)")
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, r.stderr
        assert "device d2 does not allow ops" in r.stderr, r.stderr
        # the operator takes ops away from d1: one record, applied live; its token stops working
        net.devices["d1"] = {}
        net.write_topology()
        assert "published" in net.provision()
        assert _wait(lambda: cli("ops", "d1", "--config", gwcfg, "--token", token, "health").returncode == 1, 10)
        r = cli("ops", "d1", "--config", gwcfg, "--token", token, "exec", "print(1)")
        assert r.returncode == 1 and "device d1 does not allow ops" in r.stderr, r.stderr
        assert _gw_devices(net) == ["d1", "d2"]         # still registered: only ops went
        r = cli("status", "--config", gwcfg)            # a fleet gateway's config names its socket too
        assert r.returncode == 0 and "d1" in r.stdout, r.stderr
    finally:
        if dev is not None:
            dev.stop()
        net.stop()
    assert "Traceback" not in net.log("gw")
