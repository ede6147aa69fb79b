"""The provisioner (lib/microtun_host/provision.py, docs/PROVISIONING.md).

Every file it writes is loaded with the loader its process really uses, and
every path is walked packet by packet through the real PoP forwarding code
(pop.Forwarder) in both directions, so a label or key that does not line up
end to end fails here rather than in a deployment.
"""
import datetime
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:              # Python 3.10 (pyproject installs tomli there)
    import tomli as tomllib

import pytest

from microtun import config as dconfig
from microtun import outer
from microtun import x25519
from microtun_host import gateway, pop, provision

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "topology.toml"
LOG = logging.getLogger("test.provision")


# --- helpers --------------------------------------------------------------------

def example():
    with open(EXAMPLE, "rb") as f:
        return tomllib.load(f)


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, datetime.date):
        return v.isoformat()
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join("%s = %s" % (json.dumps(k), _toml_value(x)) for k, x in v.items()) + " }"
    raise TypeError(v)


def to_toml(topo):
    """Just enough TOML for a topology dict: tables and arrays of tables."""
    out = []
    for key, v in topo.items():
        if isinstance(v, dict):
            out.append("[%s]" % key)
            out += ["%s = %s" % (json.dumps(k), _toml_value(x)) for k, x in v.items()]
        else:
            for t in v:
                out.append("[[%s]]" % key)
                out += ["%s = %s" % (json.dumps(k), _toml_value(x)) for k, x in t.items()]
        out.append("")
    return "\n".join(out)


def write_topology(tmp_path, topo, name="topology.toml"):
    p = tmp_path / name
    p.write_text(to_toml(topo) if isinstance(topo, dict) else topo)
    return p


def run(tmp_path, topo, out="out"):
    return provision.provision(write_topology(tmp_path, topo), tmp_path / out)


def snapshot(out):
    """{relative path: bytes} of every file under out."""
    files = {}
    for dirpath, _, names in os.walk(out):
        for n in names:
            full = Path(dirpath) / n
            files[str(full.relative_to(out))] = full.read_bytes()
    return files


def load_all(out):
    out = Path(out)
    return {
        "devices": {p.stem: dconfig.load(str(p)) for p in sorted((out / "devices").glob("*.json"))},
        "pops": {p.stem: pop.load_config(str(p)) for p in sorted((out / "pops").glob("*.json"))},
        "gateway": gateway.load_gateway_config(str(out / "gateway.json")),
        "state": json.loads((out / "state.json").read_text()),
    }


def _addr(text):
    host, port = text.rsplit(":", 1)
    return (host.strip("[]"), int(port))


def addresses(topo):
    """Address a node is reached at -> node name ("gateway" for the gateway)."""
    amap = {_addr(topo["gateway"].get("reach", topo["gateway"]["listen"])): "gateway"}
    for p in topo["pop"]:
        amap[_addr(p.get("reach", p["listen"]))] = p["name"]
    return amap


def walk(topo, out):
    """Send one DATA packet along every path, device -> gateway, and one back,
    through the real pop.Forwarder of every PoP. Returns the hop segments
    seen as [(sender, receiver, key)], asserting on every step."""
    cfg = load_all(out)
    amap = addresses(topo)
    routes = {r["name"]: r for r in topo["route"]}
    fwd = {name: pop.Forwarder(pop.build_table(c.routes), LOG) for name, c in cfg["pops"].items()}
    listen = {p["name"]: _addr(p["listen"]) for p in topo["pop"]}
    gw = cfg["gateway"]
    gw_links = {l.in_label: l for l in gw.links}
    segments = []
    for di, (dname, dev) in enumerate(cfg["devices"].items()):
        src = ("10.9.%d.%d" % (di // 200, di % 200 + 1), 40000 + di)      # the device's public address
        for pc in dev.paths:
            route = routes[pc.name]
            chain = route["pops"]
            # forward: device -> P1 -> ... -> gateway
            payload = b"inner packet from %s over %s" % (dname.encode(), pc.name.encode())
            pkt = outer.seal(outer.TYPE_DATA, pc.label, outer.HopKey(pc.hop_key), payload)
            node = route["pops"][0] if route.get("via") else amap[pc.pop]
            if route.get("via"):
                assert pc.pop == _addr(route["via"])
            sender, seen = dname, []
            while node != "gateway":
                assert len(seen) <= len(chain), "forwarding loop on %s/%s: %s" % (dname, pc.name, seen)
                seen.append(node)
                label = outer.label_of(pkt)
                segments.append((sender, node, fwd[node].routes[label].spec.in_key))
                res = fwd[node].receive(pkt, src if sender == dname else listen[sender])
                assert res is not None, "%s dropped %s/%s: %s" % (node, dname, pc.name, fwd[node].drops)
                pkt, dest = res
                sender, node = node, amap[dest]
            assert seen == chain
            ptype, label = outer.parse(pkt)
            link = gw_links[label]
            assert ptype == outer.TYPE_DATA and outer.verify(link.key, pkt)
            assert link.name == "%s/%s" % (dname, pc.name)
            assert pkt[outer.HEADER_LEN:] == payload
            assert amap[link.next.sockaddr] == chain[-1]
            segments.append((chain[-1], "gateway", link.key.key))
            # reverse: gateway -> Pn -> ... -> P1 -> device (learned address)
            reply = b"reply to %s over %s" % (dname.encode(), pc.name.encode())
            pkt = outer.seal(outer.TYPE_DATA, link.reply_label, link.key, reply)
            node, sender, back = amap[link.next.sockaddr], "gateway", []
            while node != dname:
                assert len(back) <= len(chain), "forwarding loop back to %s/%s: %s" % (dname, pc.name, back)
                back.append(node)
                label = outer.label_of(pkt)
                segments.append((sender, node, fwd[node].routes[label].spec.in_key))
                res = fwd[node].receive(pkt, gw.listen.sockaddr if sender == "gateway" else listen[sender])
                assert res is not None, "%s dropped the reply to %s/%s: %s" % (node, dname, pc.name, fwd[node].drops)
                pkt, dest = res
                sender = node
                node = dname if dest == src else amap[dest]
            assert back == chain[::-1]
            ptype, label = outer.parse(pkt)
            assert ptype == outer.TYPE_DATA and label == pc.rx_label
            assert outer.verify(outer.HopKey(pc.hop_key), pkt)
            assert pkt[outer.HEADER_LEN:] == reply
            segments.append((chain[0], dname, pc.hop_key))
    for name, f in fwd.items():
        assert sum(f.drops.values()) == 0, (name, f.drops)
    return segments


def path_labels(out):
    """{(device, route): every label of that path, by node} from the files."""
    cfg = load_all(out)
    st = cfg["state"]["labels"]
    result = {}
    for ns, v in st.items():
        for ident, label in v["labels"].items():
            if ns.startswith("device:"):
                key = (ns[7:], ident.split(":")[0])
            else:
                key = tuple(ident.split(":")[0].split("/"))
            result.setdefault(key, {})[(ns, ident)] = label
    return result


# --- the example -----------------------------------------------------------------

def test_example_provisions_and_every_file_loads(tmp_path):
    s = provision.provision(EXAMPLE, tmp_path / "out")
    files = snapshot(tmp_path / "out")
    assert sorted(files) == sorted([
        "state.json", "gateway.json", "registry.json",
        "pops/a1.json", "pops/a2.json", "pops/b1.json", "pops/b2.json",
        "devices/sensor-1.json", "devices/sensor-2.json"])
    cfg = load_all(tmp_path / "out")
    assert set(cfg["devices"]) == {"sensor-1", "sensor-2"}
    assert [p.name for p in cfg["devices"]["sensor-1"].paths] == ["a", "b"]
    assert cfg["devices"]["sensor-1"].policy == "adaptive"
    assert cfg["devices"]["sensor-1"].network == {"ssid": "my-wifi", "password": "change-me"}
    assert cfg["devices"]["sensor-2"].policy == "critical"
    gw = cfg["gateway"]
    assert gw.name == "gw" and str(gw.listen) == "127.0.0.1:7300" and gw.control == str(tmp_path / "out" / "gw.sock")
    assert gw.services == {1: ("127.0.0.1", 5000), 2: ("127.0.0.1", 5001)}
    assert len(gw.links) == 4
    assert {e.name: e.channels for e in gw.devices} == {"sensor-1": [1, 2], "sensor-2": [1]}
    assert gateway.load_registry(str(tmp_path / "out" / "registry.json"))[0].name == "sensor-1"
    for name, c in cfg["pops"].items():
        assert len(c.routes) == 4           # two devices x (forward + reverse)
        assert c.control == str(tmp_path / "out" / "pops" / (name + ".sock"))    # the default
    assert s.devices_added == ["sensor-1", "sensor-2"] and s.paths == 4
    assert ("gateway", "start") in s.actions
    assert s.devices_to_flash == ["sensor-1", "sensor-2"]


def test_device_config_is_compact_with_no_extras(tmp_path):
    provision.provision(EXAMPLE, tmp_path / "out")
    raw = (tmp_path / "out" / "devices" / "sensor-2.json").read_text()
    assert "\n" not in raw.rstrip("\n") and ": " not in raw and ", " not in raw
    d = json.loads(raw)
    assert list(d) == ["name", "private_key", "gateway_public_key", "psk", "channels", "paths", "policy"]
    assert d["channels"] == [1]                  # the device refuses other channels itself
    assert list(d["paths"][0]) == ["name", "pop", "label", "rx_label", "hop_key"]
    assert len(raw) < 700


def test_labels_unique_per_node_and_in_range(tmp_path):
    provision.provision(EXAMPLE, tmp_path / "out")
    cfg = load_all(tmp_path / "out")
    spaces = {"gateway": [l.in_label for l in cfg["gateway"].links]}
    for name, c in cfg["pops"].items():
        spaces["pop:" + name] = [r.in_label for r in c.routes]
    for name, d in cfg["devices"].items():
        spaces["device:" + name] = [p.rx_label for p in d.paths]
    for ns, labels in spaces.items():
        assert len(labels) == len(set(labels)), ns
        assert all(provision.LABEL_FIRST <= l <= provision.LABEL_MAX for l in labels), ns
    # the state file records exactly the labels in the files
    st = cfg["state"]["labels"]
    for ns, labels in spaces.items():
        assert sorted(st[ns]["labels"].values()) == sorted(labels), ns


def test_every_path_walks_end_to_end_both_ways(tmp_path):
    provision.provision(EXAMPLE, tmp_path / "out")
    segments = walk(example(), tmp_path / "out")
    assert len(segments) == 4 * (3 + 3)     # 4 paths x 3 hops each way


SHAPES = {
    "one PoP": [["a1"]],
    "three PoPs": [["a1", "a2", "b1"]],
    "shared first PoP": [["a1", "a2"], ["a1", "b2"]],
    "shared middle link": [["a1", "a2", "b2"], ["b1", "a2", "b2"]],
    "opposite directions over one link": [["a1", "a2"], ["a2", "a1"]],
    "five PoPs and a one-PoP route": [["a1", "a2", "b1", "b2", "a3"], ["b1"]],
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_route_shapes_walk_end_to_end(tmp_path, shape):
    topo = example()
    topo["pop"].append({"name": "a3", "listen": "127.0.0.1:7103"})
    topo["route"] = [{"name": "r%d" % i, "pops": chain} for i, chain in enumerate(SHAPES[shape])]
    topo["device"][1].pop("routes")
    topo["device"].append({"name": "sensor-3", "psk": False})
    run(tmp_path, topo)
    walk(topo, tmp_path / "out")


def test_keys_one_per_link_and_equal_at_both_ends(tmp_path):
    topo = example()
    topo["route"].append({"name": "c", "pops": ["a1", "a2"]})       # a second route over a1~a2
    run(tmp_path, topo)
    segments = walk(topo, tmp_path / "out")
    gw = load_all(tmp_path / "out")["gateway"]
    by_link = {}
    devices = {d["name"] for d in topo["device"]}
    for a, b, key in segments:
        if a in devices or b in devices:
            continue
        by_link.setdefault(frozenset((a, b)), set()).add(key)
    for link, keys in by_link.items():
        assert len(keys) == 1, "link %s uses %d keys" % (sorted(link), len(keys))
    # gateway side: one key per last PoP, equal to that PoP's out_key towards it
    keys_by_pop = {}
    for l in gw.links:
        keys_by_pop.setdefault(l.next.sockaddr, set()).add(l.key.key)
    assert all(len(k) == 1 for k in keys_by_pop.values())
    # device links: one key per (device, route), all different from each other
    dev_keys = {k for a, b, k in segments if b in devices}
    assert len(dev_keys) == sum(len(d.paths) for d in load_all(tmp_path / "out")["devices"].values())
    # and no key is used on two different links
    state = load_all(tmp_path / "out")["state"]
    hk = list(state["hop_keys"].values())
    assert len(hk) == len(set(hk))


def test_static_keys_and_psks_match_across_ends(tmp_path):
    provision.provision(EXAMPLE, tmp_path / "out")
    cfg = load_all(tmp_path / "out")
    gw = cfg["gateway"]
    registry = {e.name: e for e in gw.devices}
    gw_pub = x25519.public_key(gw.private_key)
    for name, d in cfg["devices"].items():
        assert d.gateway_public == gw_pub
        assert registry[name].public_key == x25519.public_key(d.private_key)
        assert registry[name].psk == d.psk and len(d.psk) == 32
    assert len({d.private_key for d in cfg["devices"].values()}) == 2


def test_psk_false_writes_none(tmp_path):
    topo = example()
    topo["device"][1]["psk"] = False
    run(tmp_path, topo)
    cfg = load_all(tmp_path / "out")
    assert cfg["devices"]["sensor-2"].psk is None
    assert {e.name: e.psk for e in cfg["gateway"].devices}["sensor-2"] is None
    assert "psk" not in json.loads((tmp_path / "out" / "devices" / "sensor-2.json").read_text())
    # turning it back on makes a new one, everything else stays
    before = load_all(tmp_path / "out")["devices"]["sensor-2"]
    topo["device"][1]["psk"] = True
    run(tmp_path, topo)
    after = load_all(tmp_path / "out")["devices"]["sensor-2"]
    assert after.psk is not None and after.private_key == before.private_key
    assert [p.hop_key for p in after.paths] == [p.hop_key for p in before.paths]


def test_via_and_reach(tmp_path):
    topo = example()
    topo["route"][1]["via"] = "127.0.0.1:7601"           # a link emulator in front of b1
    topo["pop"][1]["listen"] = "0.0.0.0:7102"            # a2 behind a relay: others use reach
    topo["pop"][1]["reach"] = "127.0.0.2:7102"
    run(tmp_path, topo)
    cfg = load_all(tmp_path / "out")
    paths = {p.name: p for p in cfg["devices"]["sensor-1"].paths}
    assert paths["b"].pop == ("127.0.0.1", 7601)
    assert paths["a"].pop == ("127.0.0.1", 7101)
    assert str(cfg["pops"]["a2"].listen) == "0.0.0.0:7102"
    assert {str(r.next_addr) for r in cfg["pops"]["a1"].routes if r.next_addr} == {"127.0.0.2:7102"}
    assert {str(l.next) for l in cfg["gateway"].links if l.name.endswith("/a")} == {"127.0.0.2:7102"}
    walk(topo, tmp_path / "out")


def test_ipv6_topology(tmp_path):
    topo = example()
    topo["gateway"]["listen"] = "[::1]:7300"
    topo["gateway"]["services"] = {"1": "[::1]:5000"}
    for i, p in enumerate(topo["pop"]):
        p["listen"] = "[::1]:%d" % (7101 + i)
        p["control"] = "[::1]:%d" % (7191 + i)
    run(tmp_path, topo)
    cfg = load_all(tmp_path / "out")
    assert cfg["devices"]["sensor-1"].paths[0].pop == ("::1", 7101)
    assert all(c.listen.family == 6 for c in cfg["pops"].values())
    walk(topo, tmp_path / "out")


def test_via_may_be_a_host_name(tmp_path):
    topo = example()
    topo["route"][0]["via"] = "pop-a.example.net:7101"
    run(tmp_path, topo)
    d = load_all(tmp_path / "out")["devices"]["sensor-1"]
    assert d.paths[0].pop == ("pop-a.example.net", 7101)


def test_optional_fields_are_copied(tmp_path):
    topo = example()
    topo["gateway"].update(log_level="debug", rekey_after_s=60, window=4096)
    topo["pop"][0].update(log_level="warning", stats_interval=5)
    topo["device"][0].update(nat_keepalive_s=20, window=2048, state_dir="/flash", watchdog_s=30,
                             app={"led": 2, "names": ["x"]})
    run(tmp_path, topo)
    cfg = load_all(tmp_path / "out")
    assert cfg["gateway"].log_level == "debug" and cfg["gateway"].rekey_after_ms == 60000
    assert cfg["gateway"].window == 4096
    assert cfg["pops"]["a1"].log_level == "warning" and cfg["pops"]["a1"].stats_interval == 5
    d = cfg["devices"]["sensor-1"]
    assert (d.nat_keepalive_ms, d.window, d.state_dir, d.watchdog_ms) == (20000, 2048, "/flash", 30000)
    assert d.app == {"led": 2, "names": ["x"]}


# --- files ------------------------------------------------------------------------------

def test_file_modes(tmp_path):
    provision.provision(EXAMPLE, tmp_path / "out")
    out = tmp_path / "out"
    for d in (out, out / "pops", out / "devices"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for rel in snapshot(out):
        assert stat.S_IMODE((out / rel).stat().st_mode) == 0o600, rel
    assert not [p for p in out.rglob(".tmp-*")]
    # a mode loosened by hand is put back on the next run
    os.chmod(out / "registry.json", 0o644)
    provision.provision(EXAMPLE, out)
    assert stat.S_IMODE((out / "registry.json").stat().st_mode) == 0o600


def test_rerun_without_change_changes_nothing(tmp_path):
    provision.provision(EXAMPLE, tmp_path / "out")
    before = snapshot(tmp_path / "out")
    mtimes = {rel: (tmp_path / "out" / rel).stat().st_mtime_ns for rel in before}
    s = provision.provision(EXAMPLE, tmp_path / "out")
    assert snapshot(tmp_path / "out") == before
    assert {rel: (tmp_path / "out" / rel).stat().st_mtime_ns for rel in before} == mtimes
    assert not s.changed and s.files_written == [] and s.actions == [] and s.devices_to_flash == []
    assert "nothing changed" in str(s)


# --- re-runs ------------------------------------------------------------------------------

def _old_and_new(tmp_path, change):
    topo = example()
    run(tmp_path, topo)
    before = snapshot(tmp_path / "out")
    labels_before = path_labels(tmp_path / "out")
    st_before = load_all(tmp_path / "out")["state"]
    change(topo)
    s = run(tmp_path, topo)
    return topo, s, before, labels_before, st_before


def test_adding_a_device_keeps_every_other_key_and_label(tmp_path):
    def add(topo):
        topo["device"].append({"name": "sensor-3", "channels": [2], "routes": ["b"]})
    topo, s, before, labels_before, st_before = _old_and_new(tmp_path, add)
    after = snapshot(tmp_path / "out")
    st = load_all(tmp_path / "out")["state"]
    # every old device config byte for byte, every old key and label the same
    for rel in ("devices/sensor-1.json", "devices/sensor-2.json", "pops/a1.json", "pops/a2.json"):
        assert after[rel] == before[rel], rel
    labels_after = path_labels(tmp_path / "out")
    for path, labels in labels_before.items():
        assert labels_after[path] == labels, path
    assert st["gateway"] == st_before["gateway"]
    assert st["devices"]["sensor-1"] == st_before["devices"]["sensor-1"]
    for k, v in st_before["hop_keys"].items():
        assert st["hop_keys"][k] == v
    assert set(st["hop_keys"]) - set(st_before["hop_keys"]) == {"sensor-3/b@b1"}
    # the new device has its own
    assert set(labels_after) - set(labels_before) == {("sensor-3", "b")}
    assert s.devices_added == ["sensor-3"] and s.devices_to_flash == ["sensor-3"]
    actions = dict(s.actions)
    assert actions["pop b1"].startswith("reload") and actions["pop b2"].startswith("reload")
    assert "pop a1" not in actions and actions["gateway"] == "reload (SIGHUP)"
    walk(topo, tmp_path / "out")


def test_removing_a_device_revokes_it_everywhere(tmp_path):
    def remove(topo):
        del topo["device"][0]
    topo, s, before, labels_before, st_before = _old_and_new(tmp_path, remove)
    out = tmp_path / "out"
    cfg = load_all(out)
    assert not (out / "devices" / "sensor-1.json").exists()
    assert [e.name for e in cfg["gateway"].devices] == ["sensor-2"]
    assert all(not l.name.startswith("sensor-1/") for l in cfg["gateway"].links)
    # none of its labels is left in any PoP table, and no PoP holds its hop keys
    gone = {(ns, label) for path, labels in labels_before.items() if path[0] == "sensor-1"
            for (ns, _), label in labels.items()}
    kept = {(ns, label) for path, labels in labels_before.items() if path[0] != "sensor-1"
            for (ns, _), label in labels.items()}
    for name, c in cfg["pops"].items():
        in_labels = {("pop:" + name, r.in_label) for r in c.routes}
        assert not in_labels & gone, name
        assert {k for k in kept if k[0] == "pop:" + name} == in_labels
    dev_keys = {bytes.fromhex(v) for k, v in st_before["hop_keys"].items() if k.startswith("sensor-1/")}
    for c in cfg["pops"].values():
        assert not dev_keys & {r.in_key for r in c.routes} and not dev_keys & {r.out_key for r in c.routes}
    assert "sensor-1" not in cfg["state"]["devices"]
    assert not [ns for ns in cfg["state"]["labels"] if ns == "device:sensor-1"]
    # the other device is untouched
    assert snapshot(out)["devices/sensor-2.json"] == before["devices/sensor-2.json"]
    assert s.devices_removed == ["sensor-1"] and s.files_removed == ["devices/sensor-1.json"]
    assert s.devices_to_flash == []
    actions = dict(s.actions)
    assert all(actions["pop " + p].startswith("reload") for p in ("a1", "a2", "b1", "b2"))
    walk(topo, out)
    # re-adding it later is a new device: new keys, new labels
    topo["device"].insert(0, example()["device"][0])
    run(tmp_path, topo)
    st = load_all(out)["state"]
    assert st["devices"]["sensor-1"]["private_key"] != st_before["devices"]["sensor-1"]["private_key"]
    for k, v in st_before["labels"]["pop:a1"]["labels"].items():
        if k.startswith("sensor-1/"):
            assert st["labels"]["pop:a1"]["labels"][k] != v, "a revoked label came back at once"


def test_resplicing_a_route_changes_only_its_labels_past_the_first_pop(tmp_path):
    def resplice(topo):
        topo["pop"].append({"name": "a3", "listen": "127.0.0.1:7103", "control": "127.0.0.1:7193"})
        topo["route"][0]["pops"] = ["a1", "a3"]
    topo, s, before, labels_before, st_before = _old_and_new(tmp_path, resplice)
    out = tmp_path / "out"
    after = snapshot(out)
    labels_after = path_labels(out)
    # the devices need nothing: their first hop (address, label, rx_label, key) is unchanged
    assert after["devices/sensor-1.json"] == before["devices/sensor-1.json"]
    assert after["devices/sensor-2.json"] == before["devices/sensor-2.json"]
    # route b: untouched, byte for byte
    assert after["pops/b1.json"] == before["pops/b1.json"] and after["pops/b2.json"] == before["pops/b2.json"]
    for dev in ("sensor-1", "sensor-2"):
        assert labels_after[(dev, "b")] == labels_before[(dev, "b")]
        old, new = labels_before[(dev, "a")], labels_after[(dev, "a")]
        # the device's own labels stay; every label on a changed segment is new
        first = {k: v for k, v in old.items() if k[1].endswith(":fwd:*device") or k[0].startswith("device:")}
        assert first and all(new[k] == v for k, v in first.items())
        changed_old = {k: v for k, v in old.items() if k not in first}
        changed_new = {k: v for k, v in new.items() if k not in first}
        assert len(changed_old) == len(changed_new) == 4        # F2, G at the gateway, R2, R1
        assert not set(changed_old) & set(changed_new)
        assert {k[0] for k in changed_new} == {"pop:a3", "gateway", "pop:a1"}
        r1_old = [v for k, v in changed_old.items() if k[0] == "pop:a1"]
        r1_new = [v for k, v in changed_new.items() if k[0] == "pop:a1"]
        assert r1_old != r1_new
    # a2 carries nothing now; a1's entries for the devices' first hop keep their labels and keys
    cfg = load_all(out)
    assert cfg["pops"]["a2"].routes == []
    assert s.routes_respliced == [("a", ["a1", "a2"], ["a1", "a3"])]
    assert s.devices_to_flash == [] and s.devices_added == [] and s.devices_removed == []
    actions = dict(s.actions)
    assert actions["pop a1"].startswith("reload") and actions["pop a2"].startswith("reload")
    assert actions["pop a3"].startswith("start") and actions["gateway"] == "reload (SIGHUP)"
    assert "pop b1" not in actions and "pop b2" not in actions
    assert "a1~a2" not in cfg["state"]["hop_keys"] and "a1~a3" in cfg["state"]["hop_keys"]
    assert cfg["state"]["hop_keys"]["sensor-1/a@a1"] == st_before["hop_keys"]["sensor-1/a@a1"]
    walk(topo, out)
    # and back again: new labels once more, never the old ones at once
    topo["route"][0]["pops"] = ["a1", "a2"]
    run(tmp_path, topo)
    walk(topo, out)


def test_changing_the_first_pop_needs_new_device_configs(tmp_path):
    def first(topo):
        topo["pop"].append({"name": "a3", "listen": "127.0.0.1:7103"})
        topo["route"][0]["pops"] = ["a3", "a2"]
    topo, s, before, *_ = _old_and_new(tmp_path, first)
    assert s.devices_to_flash == ["sensor-1", "sensor-2"]
    assert "needing their new config: sensor-1, sensor-2" in str(s)
    walk(topo, tmp_path / "out")


def test_removing_a_pop_deletes_its_file(tmp_path):
    def drop(topo):
        topo["pop"] = [p for p in topo["pop"] if p["name"] != "b2"]
        topo["route"][1]["pops"] = ["b1"]
    topo, s, *_ = _old_and_new(tmp_path, drop)
    assert not (tmp_path / "out" / "pops" / "b2.json").exists()
    assert dict(s.actions)["pop b2"].startswith("stop")
    walk(topo, tmp_path / "out")


def test_listen_change_asks_for_a_restart(tmp_path):
    def move(topo):
        topo["pop"][0]["control"] = "127.0.0.1:7199"
    _, s, *_ = _old_and_new(tmp_path, move)
    assert dict(s.actions)["pop a1"] == "restart (control changed)"


def test_gateway_listen_change_asks_for_a_restart(tmp_path):
    def move(topo):
        topo["gateway"]["listen"] = "127.0.0.1:7301"
    _, s, *_ = _old_and_new(tmp_path, move)
    actions = dict(s.actions)
    assert actions["gateway"] == "restart (listen changed)"
    assert all(actions["pop " + p] == "reload (SIGHUP)" for p in ("a2", "b2"))    # next hop moved
    assert "pop a1" not in actions


def test_channel_change_reaches_the_registry_and_the_device(tmp_path):
    def channels(topo):
        topo["device"][1]["channels"] = [1, 2]
    _, s, *_ = _old_and_new(tmp_path, channels)
    assert s.actions == [("gateway", "reload (SIGHUP; registry changed)")]
    assert s.files_written == ["devices/sensor-2.json", "registry.json"]    # the device refuses others itself
    assert s.devices_to_flash == ["sensor-2"]


# --- labels ---------------------------------------------------------------------------------

def test_label_space_wraps_and_skips_labels_in_use(monkeypatch):
    monkeypatch.setattr(provision, "LABEL_MAX", 104)
    labels = provision.Labels({"pop:x": {"next": 103, "labels": {"old": 100, "keep": 101}}})
    got = [labels.get("pop:x", "old"), labels.get("pop:x", "keep")]
    got += [labels.get("pop:x", "n%d" % i) for i in range(3)]
    assert got == [100, 101, 103, 104, 102]
    with pytest.raises(provision.LabelSpaceExhausted):
        labels.get("pop:x", "one too many")


def test_label_space_exhausted_is_a_topology_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(provision, "LABEL_MAX", provision.LABEL_FIRST + 5)   # 6 labels per node
    topo = example()
    topo["device"].append({"name": "sensor-3"})                             # a1 needs 3 x 2 = 6: fits
    path = write_topology(tmp_path, topo)
    assert provision.main(str(path), str(tmp_path / "out")) == 0
    topo["device"].append({"name": "sensor-4"})
    path = write_topology(tmp_path, topo)
    before = snapshot(tmp_path / "out")
    capsys.readouterr()
    assert provision.main(str(path), str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "device[3].routes: no label left for path sensor-4/a at pop a1" in err
    assert snapshot(tmp_path / "out") == before


# --- broken topologies -----------------------------------------------------------------------

def _mutate(f):
    topo = example()
    f(topo)
    return to_toml(topo)


def _set(path, value):
    def f(topo):
        obj = topo
        for k in path[:-1]:
            obj = obj[k]
        if value is KeyError:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value
    return f


BROKEN = [
    # (case, topology text or mutation, expected "field: message" fragment)
    ("toml syntax", "[gateway\nname = 1\n", "not valid TOML"),
    ("not utf-8", b"\xff\xfe", "not UTF-8"),
    ("no gateway", _set(["gateway"], KeyError), "gateway: missing; expected a [gateway] table"),
    ("gateway as array", lambda t: t.update(gateway=[t["gateway"]]), "gateway: expected one [gateway] table"),
    ("unknown top-level table", lambda t: t.update(gatway={"x": 1}), "gatway: unknown field"),
    ("typo in a field", lambda t: t["pop"][0].update(lisen="127.0.0.1:1"), "pop[0].lisen: unknown field"),
    ("gateway listen missing", _set(["gateway", "listen"], KeyError), "gateway.listen: missing"),
    ("bad address", _set(["pop", 1, "listen"], "127.0.0.1"), "pop[1].listen: expected"),
    ("host name as listen", _set(["pop", 1, "listen"], "pop.example.net:7102"), "pop[1].listen: expected"),
    ("port out of range", _set(["gateway", "listen"], "127.0.0.1:70000"), "gateway.listen: expected"),
    ("wildcard without reach", _set(["pop", 0, "listen"], "0.0.0.0:7101"), "pop[0].listen: 0.0.0.0:7101 is a wildcard"),
    ("control not loopback", _set(["pop", 0, "control"], "10.0.0.1:7191"), "pop[0].control: expected a loopback"),
    ("service channel 0", _set(["gateway", "services"], {"0": "127.0.0.1:5000"}), "gateway.services.0: expected a channel number"),
    ("service address", _set(["gateway", "services"], {"1": "localhost"}), "gateway.services.1: expected"),
    ("no pops", _set(["pop"], KeyError), "pop: missing; expected at least one [[pop]] table"),
    ("pop as single table", lambda t: t.update(pop=t["pop"][0]), "pop: expected [[pop]] tables"),
    ("duplicate pop name", _set(["pop", 1, "name"], "a1"), "pop[1].name: \"a1\" is already the name of pop[0]"),
    ("pop named like the gateway", _set(["pop", 1, "name"], "gw"), "pop[1].name: \"gw\" is already the gateway's name"),
    ("bad name", _set(["pop", 1, "name"], "a/2"), "pop[1].name: expected 1..64 letters"),
    ("duplicate address", _set(["pop", 1, "listen"], "127.0.0.1:7101"), "pop[1].listen: 127.0.0.1:7101 is already where pop[0].listen"),
    ("pop at the gateway's address", _set(["pop", 1, "listen"], "127.0.0.1:7300"), "pop[1].listen: 127.0.0.1:7300 is already where gateway.listen"),
    ("no routes", _set(["route"], KeyError), "route: missing; expected at least one [[route]] table"),
    ("route without pops", _set(["route", 0, "pops"], []), "route[0].pops: expected at least 1 entry"),
    ("route pops missing", _set(["route", 0, "pops"], KeyError), "route[0].pops: missing"),
    ("unknown pop in route", _set(["route", 0, "pops"], ["a1", "a9"]), "route[0].pops[1]: unknown PoP \"a9\""),
    ("pop twice in a route", _set(["route", 0, "pops"], ["a1", "a2", "a1"]), "route[0].pops[2]: PoP \"a1\" appears twice"),
    ("duplicate route name", _set(["route", 1, "name"], "a"), "route[1].name: \"a\" is already the name of route[0]"),
    ("bad via", _set(["route", 0, "via"], "nowhere"), "route[0].via: expected \"host:port\""),
    ("ipv6 hop from an ipv4 pop", lambda t: t["pop"][1].update(listen="[::1]:7102"), "route[0].pops[1]: a1 listens on IPv4"),
    ("ipv6 pop answering an ipv4 neighbour", lambda t: t["pop"][1].update(listen="[::1]:7102", reach="127.0.0.2:7102"),
     "route[0].pops[1]: a2 listens on IPv6 ([::1]:7102) but sends to a1"),
    ("no devices", _set(["device"], KeyError), "device: missing; expected at least one [[device]] table"),
    ("duplicate device name", _set(["device", 1, "name"], "sensor-1"), "device[1].name: \"sensor-1\" is already the name of device[0]"),
    ("device name missing", _set(["device", 1, "name"], KeyError), "device[1].name: missing"),
    ("unknown route", _set(["device", 0, "routes"], ["a", "z"]), "device[0].routes[1]: unknown route \"z\""),
    ("route listed twice", _set(["device", 0, "routes"], ["a", "a"]), "device[0].routes[1]: route \"a\" is listed twice"),
    ("empty routes", _set(["device", 0, "routes"], []), "device[0].routes: expected at least 1 entry"),
    ("channel 0", _set(["device", 0, "channels"], [0]), "device[0].channels[0]: expected a channel number 1..255"),
    ("channel 256", _set(["device", 0, "channels"], [1, 256]), "device[0].channels[1]: expected a channel number 1..255"),
    ("channel not a number", _set(["device", 0, "channels"], ["1"]), "device[0].channels[0]: expected a channel number"),
    ("bad policy", _set(["device", 0, "policy"], "fastest"), "device[0].policy: expected one of \"best\""),
    ("psk not a bool", _set(["device", 0, "psk"], "yes"), "device[0].psk: expected true or false"),
    ("network not a table", _set(["device", 0, "network"], "wifi"), "device[0].network: expected an object"),
    ("keepalive too short", _set(["device", 0, "nat_keepalive_s"], 1), "device[0].nat_keepalive_s: expected an integer in 5..3600"),
    ("date in app", _set(["device", 0, "app"], {"since": datetime.date(2024, 1, 1)}), "device[0].app.since: expected strings, numbers"),
    ("too many routes", lambda t: t.update(route=[{"name": "r%d" % i, "pops": ["a1"]} for i in range(9)]),
     "device[0].routes: missing, so all 9 routes, but a device takes at most 8"),
]


@pytest.mark.parametrize("case,topo,expect", BROKEN, ids=[c[0] for c in BROKEN])
def test_broken_topology_is_one_line_exit_2_nothing_written(tmp_path, capsys, case, topo, expect):
    if callable(topo):
        topo = _mutate(topo)
    path = tmp_path / "topology.toml"
    path.write_bytes(topo if isinstance(topo, bytes) else topo.encode())
    rc = provision.main(str(path), str(tmp_path / "out"))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1, err
    assert err.startswith("microtun provision: %s: " % path), err
    assert expect in err, err
    assert not (tmp_path / "out").exists()


def test_broken_topology_leaves_existing_output_alone(tmp_path, capsys):
    provision.provision(EXAMPLE, tmp_path / "out")
    before = snapshot(tmp_path / "out")
    bad = _mutate(_set(["route", 0, "pops"], ["a1", "nope"]))
    path = tmp_path / "bad.toml"
    path.write_text(bad)
    assert provision.main(str(path), str(tmp_path / "out")) == 2
    assert snapshot(tmp_path / "out") == before


def test_a_generated_file_that_does_not_load_stops_the_run(tmp_path, monkeypatch, capsys):
    real = provision.plan

    def broken(*args):
        files, state, paths = real(*args)
        files["pops/a1.json"] = files["pops/a1.json"].replace(b'"in_label": 100', b'"in_label": 0')
        return files, state, paths
    monkeypatch.setattr(provision, "plan", broken)
    assert provision.main(str(EXAMPLE), str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the generated pops/a1.json does not load (pops/a1.json: routes[0].in_label" in err
    assert not (tmp_path / "out").exists()


def test_broken_state_file_is_reported(tmp_path, capsys):
    provision.provision(EXAMPLE, tmp_path / "out")
    st = tmp_path / "out" / "state.json"
    d = json.loads(st.read_text())
    d["hop_keys"]["a1~a2"] = "00"
    st.write_text(json.dumps(d))
    assert provision.main(str(EXAMPLE), str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "state.json: hop_keys.a1~a2: expected 64 hex characters" in err


# --- command line ------------------------------------------------------------------------------

def test_microtun_provision_subcommand(tmp_path, capsys):
    from microtun_host import cli
    assert cli.main(["provision", str(EXAMPLE), "--out", str(tmp_path / "out")]) == 0
    assert "devices added: sensor-1, sensor-2" in capsys.readouterr().out
    load_all(tmp_path / "out")
    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway]\nlisten = 1\n")
    assert cli.main(["provision", str(bad), "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "gateway.listen" in err


def test_module_command_line(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "lib"))
    cmd = [sys.executable, "-m", "microtun_host.provision", str(EXAMPLE), "--out", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "devices added: sensor-1, sensor-2" in r.stdout
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and "nothing changed" in r.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway]\nlisten = 1\n")
    r = subprocess.run(cmd[:3] + [str(bad), "--out", str(tmp_path / "out2")], capture_output=True,
                       text=True, env=env, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "gateway.listen" in r.stderr
