"""Prometheus metrics (issue 15, item 4): a real PoP and a real gateway
process, scraped over HTTP on loopback, the scrape parsed with the official
parser; the values match the traffic this test sent and what `microtun
status` / the control channel say. Plus the config switch, the bound on
per-device series, and the HTTP edge cases."""
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness import Net, ROOT, PY, py_env, free_ports
from microtun_host import metrics


def scrape(port, path="/metrics"):
    with urllib.request.urlopen("http://127.0.0.1:%d%s" % (port, path), timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(fams, family, **labels):
    """The one sample of `family` whose labels include `labels` (the _total
    counter sample for counters)."""
    got = [s.value for s in fams[family].samples
           if not s.name.endswith("_created") and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(got) == 1, (family, labels, fams[family].samples)
    return got[0]


def _wait_http(port, timeout=15):
    end = time.monotonic() + timeout
    while True:
        try:
            return scrape(port)
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


@pytest.fixture
def net(tmp_path):
    n = Net(tmp_path, routes={"a": ["a1"]}, devices={"d1": {}})
    n.metrics_ports = dict(zip(("gw", "a1"), free_ports(2)))
    for name, path in (("gw", n.out / "gateway.json"), ("a1", n.out / "pops" / "a1.json")):
        cfg = json.loads(path.read_text())
        cfg["metrics"] = "127.0.0.1:%d" % n.metrics_ports[name]
        path.write_text(json.dumps(cfg))
    n.start()
    yield n
    n.stop()


def test_scrape_real_pop_and_gateway_matches_traffic(net):
    gw_port, pop_port = net.metrics_ports["gw"], net.metrics_ports["a1"]
    before_gw, before_pop = _wait_http(gw_port), _wait_http(pop_port)
    assert value(before_gw, "microtun_gateway_handshakes", result="confirmed") == 0
    assert value(before_gw, "microtun_gateway_info", crypto="cryptography") == 1

    res = net.device("d1", "--count", "20", "--interval", "20")
    assert res["delivered"] == 20, res
    # Junk the nodes must count as drops: a 5-byte datagram to each.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for addr in (net.pops["a1"]["listen"], net.gw["listen"]):
        host, port = addr.rsplit(":", 1)
        s.sendto(b"junk!", (host, int(port)))
    s.close()
    time.sleep(0.3)

    gw, pop = scrape(gw_port), scrape(pop_port)
    st = net.gw_status()
    c = st["counters"]
    # The 20 messages and their 20 echoes, on the gateway.
    assert value(gw, "microtun_gateway_inner_packets", kind="data", direction="rx") == c["data_rx"] == 20
    assert value(gw, "microtun_gateway_inner_packets", kind="data", direction="tx") == c["data_tx"] == 20
    assert value(gw, "microtun_gateway_handshakes", result="confirmed") == 1
    assert value(gw, "microtun_gateway_drops", reason="outer_short") == 1
    assert value(gw, "microtun_gateway_devices") == 1
    assert value(gw, "microtun_gateway_sessions") == 1
    d1 = [d for d in st["devices"] if d["name"] == "d1"][0]
    assert value(gw, "microtun_gateway_device_packets", device="d1", direction="rx") == d1["rx_packets"] >= 20
    assert value(gw, "microtun_gateway_device_bytes", device="d1", direction="tx") == d1["tx_bytes"] > 0
    assert value(gw, "microtun_gateway_device_handshakes", device="d1") == 1
    link = d1["paths"][0]["link"]
    assert value(gw, "microtun_gateway_link_packets", link=link, direction="rx") == d1["paths"][0]["rx_packets"] >= 21
    if d1["paths"][0]["srtt_ms"] is not None:      # the device reports it in its path probes
        assert value(gw, "microtun_gateway_path_rtt_seconds", device="d1", link=link) == d1["paths"][0]["srtt_ms"] / 1000
    if d1["paths"][0]["probe_loss"] is not None:   # from the probes' sequence numbers
        assert value(gw, "microtun_gateway_path_probe_loss_ratio", device="d1", link=link) == \
            d1["paths"][0]["probe_loss"] == 0.0      # loopback: nothing lost
    # The PoP forwarded the handshake, the 20 messages and the 20 echoes (and probes).
    ps = net.pop_stats("a1")
    fwd = value(pop, "microtun_pop_packets", kind="forwarded")
    assert fwd == ps["forwarded"] >= 2 + 40
    assert value(pop, "microtun_pop_packets", kind="rx") == ps["rx"]
    assert value(pop, "microtun_pop_drops", reason="short") == 1
    assert value(pop, "microtun_pop_drops", reason="bad_mac") == 0
    labels = sum(value(pop, "microtun_pop_label_packets", label=l) for l in ps["labels"])
    assert labels == sum(e["packets"] for e in ps["labels"].values()) >= 42
    assert value(pop, "microtun_pop_info", name="a1") == 1

    # `microtun status` keeps working, and names the crypto backend.
    out = subprocess.run([PY, "-m", "microtun_host.cli", "status", "--control", net.gw["control"]],
                         capture_output=True, text=True, env=py_env(), cwd=str(ROOT), timeout=30)
    assert out.returncode == 0 and "crypto cryptography" in out.stdout, out.stdout + out.stderr
    assert "metrics at http://127.0.0.1:%d/metrics" % gw_port in net.log("gw")


def test_http_edges(net):
    port = net.metrics_ports["gw"]
    _wait_http(port)
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen("http://127.0.0.1:%d/other" % port, timeout=5)
    assert e.value.code == 404
    req = urllib.request.Request("http://127.0.0.1:%d/metrics" % port, data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 405
    # A garbage request line gets a 400 and the server goes on.
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"nonsense\r\n\r\n")
    assert s.recv(100).startswith(b"HTTP/1.1 400")
    s.close()
    assert "microtun_gateway_info" in scrape(port)


def test_metrics_are_off_by_default_and_a_bad_address_is_one_line(tmp_path):
    n = Net(tmp_path, routes={"a": ["a1"]})
    for path in (n.out / "gateway.json", n.out / "pops" / "a1.json"):
        assert "metrics" not in json.loads(path.read_text())
        cfg = json.loads(path.read_text())
        cfg["metrics"] = "localhost:http"
        path.write_text(json.dumps(cfg))
        kind = "gateway" if path.name == "gateway.json" else "pop"
        r = subprocess.run([PY, "-m", "microtun_host.cli", kind, "--config", str(path), "--check"],
                           capture_output=True, text=True, env=py_env(), cwd=str(ROOT), timeout=30)
        assert r.returncode == 2 and "metrics" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def _fake_status(n):
    devs = [{"name": "dev%03d" % i, "established": i % 2 == 0, "rx_packets": i, "rx_bytes": 10 * i,
             "tx_packets": 0, "tx_bytes": 0, "handshakes": 1, "counters": {"data_rx": i, "bad_tag": 1},
             "paths": [{"link": "dev%03d/a" % i, "last_seen_ms_ago": 5, "srtt_ms": 12, "probe_loss": 0.25,
                        "rx_packets": i, "rx_bytes": 0, "tx_packets": 0, "tx_bytes": 0, "duplicates": 0}]}
            for i in range(n)]
    return {"gateway": "gw", "uptime_s": 1.0, "crypto": "pure", "devices": devs,
            "counters": {"data_rx": sum(range(n)), "bad_mac1": 3}}


def test_per_device_series_are_bounded():
    text = metrics.exposition(metrics.GatewayCollector(lambda: _fake_status(50), max_devices=10)).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert value(fams, "microtun_gateway_devices") == 50
    assert value(fams, "microtun_gateway_devices_exported") == 10
    assert value(fams, "microtun_gateway_sessions") == 25
    devices = {s.labels["device"] for s in fams["microtun_gateway_device_packets"].samples}
    assert devices == {"dev%03d" % i for i in range(10)}
    assert value(fams, "microtun_gateway_inner_packets", kind="data", direction="rx") == sum(range(50))
    assert value(fams, "microtun_gateway_drops", reason="bad_mac1") == 3
    assert value(fams, "microtun_gateway_device_drops", device="dev003", reason="bad_tag") == 1
    assert value(fams, "microtun_gateway_path_rtt_seconds", device="dev001", link="dev001/a") == 0.012
    assert value(fams, "microtun_gateway_path_probe_loss_ratio", device="dev001", link="dev001/a") == 0.25
    assert value(fams, "microtun_gateway_info", crypto="pure") == 1


def test_path_probe_loss_from_sequence_gaps():
    from microtun.responder import probe_loss
    st = None
    for seq in range(1, 200):             # every probe arrives
        st = probe_loss(st, seq)
    assert st == [199, 0.0]
    for seq in range(200, 2000):          # one in four lost
        if seq % 4:
            st = probe_loss(st, seq)
    assert 0.2 < st[1] < 0.3, st
    before = list(st)
    assert probe_loss(st, st[0]) == before and probe_loss(st, st[0] - 3) == before    # duplicate, reordered
    assert probe_loss(st, 1)[0] == 1                                                  # the device restarted
    assert probe_loss([5, 0.0], 5 + 2000) == [2005, 0.0]                             # far ahead: a new count
    st = [10, 0.0]
    st = probe_loss(st, 15)               # four lost in a row, then one
    assert abs(st[1] - (1 - (1 - 1 / 16) ** 4) * (1 - 1 / 16)) < 1e-12


def test_metrics_port_taken_is_one_line(tmp_path):
    n = Net(tmp_path, routes={"a": ["a1"]})
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        for kind, path in (("gateway", n.out / "gateway.json"), ("pop", n.out / "pops" / "a1.json")):
            cfg = json.loads(path.read_text())
            cfg["metrics"] = "127.0.0.1:%d" % port
            path.write_text(json.dumps(cfg))
            r = subprocess.run([PY, "-m", "microtun_host.cli", kind, "--config", str(path)],
                               capture_output=True, text=True, env=py_env(), cwd=str(ROOT), timeout=30)
            lines = [l for l in (r.stdout + r.stderr).splitlines() if "metrics" in l and "cannot" in l]
            assert r.returncode == 1 and len(lines) == 1 and str(port) in lines[0], (kind, r.stdout, r.stderr)
            assert "Traceback" not in r.stderr
    finally:
        taken.close()


def test_segment_loss_and_rtt_are_exported():
    """Per-path loss and RTT where a PoP measures them: the two ends of a
    LOOPS segment (5 % loss, 40 ms RTT, sans-I/O: test_segment.Link), in the
    shape a PoP's stats carry them, exposed and parsed back."""
    from microtun_host.segment import SegConfig
    from test_segment import Link
    link = Link(SegConfig("nack"), loss=0.05, seed=3)
    link.stream(1000)
    r, s = link.rcv.stats(), link.snd.stats()
    stats = {"name": "a2", "uptime_s": 1.0, "drops": {}, "labels": {}, "routes": 2, "learned": {},
             "sources_tracked": 0, "moves": 0, "reloads": 0, "reload_failures": 0,
             "segments": {"in:200": r, "out:201": s}}
    stats.update({k: 0 for k in metrics._POP_PACKETS})
    text = metrics.exposition(metrics.PopCollector(lambda: stats)).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert 0.04 < value(fams, "microtun_pop_segment_loss_ratio", segment="in:200") == r["loss"] < 0.06
    for kind in ("received", "gaps", "recovered_nack", "unrecovered", "parities_unused"):
        assert value(fams, "microtun_pop_segment_packets", segment="in:200", kind=kind) == r[kind]
    assert value(fams, "microtun_pop_segment_rtt_seconds", segment="out:201") == s["srtt_ms"] / 1000
    assert 0.035 < s["srtt_ms"] / 1000 < 0.045
    # a PoP without segments: the families are there, empty
    stats["segments"] = {}
    fams = {f.name: f for f in text_string_to_metric_families(metrics.exposition(
        metrics.PopCollector(lambda: stats)).decode())}
    assert fams["microtun_pop_segment_loss_ratio"].samples == []
