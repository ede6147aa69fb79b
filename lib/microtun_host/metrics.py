"""Prometheus metrics for a PoP and a gateway, with the official client
library (prometheus_client): the text exposition of the counters the nodes
already keep, served over HTTP at the config's "metrics" address (opt-in,
docs/CONFIG.md).

    server = await metrics.serve(where, metrics.GatewayCollector(gw), log)   # server.close() stops it
    text = metrics.exposition(metrics.PopCollector(pop))                      # the same bytes, no HTTP

The collectors read the dicts `microtun status` shows (the control
channel's "stats" for a PoP, "status" for a gateway), at scrape time: no
second set of counters to keep in step, and nothing on the packet path.
The HTTP server runs on the node's own asyncio loop, so a scrape sees one
consistent snapshot (no thread reads a dict while the loop changes it).

Cardinality (every label value is bounded by configuration, never by
traffic): PoP labels are its routes' in_labels and the fixed drop reasons;
gateway links are the configured links; device series exist only for
devices in the registry, and only for the first MAX_DEVICES of them (sorted
by name; `microtun_gateway_devices_exported` says how many were); a
device's paths are at most microtun.responder.MAX_PATHS_PER_PEER links.
"""
import asyncio
import time

from prometheus_client import CollectorRegistry, generate_latest, CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

MAX_DEVICES = 1000          # devices with their own series on one gateway (the rest are in the totals)
MAX_REQUEST = 8192          # bytes of request line and headers read from a scraper
REQUEST_TIMEOUT_S = 5.0     # a scraper that sends nothing is dropped after this long

# gateway counters that are normal traffic (every other counter is a drop or an answer to trouble)
_GW_TRAFFIC = {"data_rx": ("data", "rx"), "data_tx": ("data", "tx"), "keepalive_rx": ("keepalive", "rx"),
               "keepalive_tx": ("keepalive", "tx"), "path_probe_rx": ("path_probe", "rx")}
_GW_HANDSHAKE = {"handshake_ok": "confirmed", "response_tx": "answered", "handshake_failed": "failed"}
_POP_PACKETS = ("rx", "forwarded", "probes", "keepalives", "path_responses", "challenges")


def _counter(name, doc, labels=()):
    return CounterMetricFamily(name, doc, labels=list(labels))


def _gauge(name, doc, labels=()):
    return GaugeMetricFamily(name, doc, labels=list(labels))


class PopCollector:
    """A PoP's counters, from the dict its control channel's "stats" gives
    (microtun_host.pop.Pop._cmd_stats: `stats()` below)."""

    def __init__(self, stats):
        self.stats = stats          # () -> the "stats" dict

    def collect(self):
        s = self.stats()
        info = _gauge("microtun_pop_info", "This PoP (value 1).", ("name",))
        info.add_metric([s["name"]], 1)
        up = _gauge("microtun_pop_uptime_seconds", "Seconds since the PoP started.")
        up.add_metric([], s["uptime_s"])
        packets = _counter("microtun_pop_packets", "Datagrams received (rx) and what became of them.",
                           ("kind",))
        for k in _POP_PACKETS:
            packets.add_metric([k], s[k])
        drops = _counter("microtun_pop_drops", "Datagrams dropped, by reason (docs/OUTER.md).", ("reason",))
        for reason, n in sorted(s["drops"].items()):
            drops.add_metric([reason], n)
        lp = _counter("microtun_pop_label_packets", "Authenticated packets received per in_label.", ("label",))
        lb = _counter("microtun_pop_label_bytes", "Bytes of authenticated packets received per in_label.",
                      ("label",))
        ld = _counter("microtun_pop_label_drops", "Drops per in_label and reason.", ("label", "reason"))
        for label, e in sorted(s["labels"].items(), key=lambda kv: int(kv[0])):
            lp.add_metric([label], e["packets"])
            lb.add_metric([label], e["bytes"])
            for reason, n in sorted(e.get("drops", {}).items()):
                ld.add_metric([label, reason], n)
        routes = _gauge("microtun_pop_routes", "Routes in the forwarding table.")
        routes.add_metric([], s["routes"])
        learned = _gauge("microtun_pop_learned_addresses", "Next hops learned from authenticated packets.")
        learned.add_metric([], len(s["learned"]))
        sources = _gauge("microtun_pop_sources_tracked", "Source addresses with an INIT budget.")
        sources.add_metric([], s["sources_tracked"])
        moves = _counter("microtun_pop_learned_moves", "Learned-address changes (validated).")
        moves.add_metric([], s["moves"])
        reloads = _counter("microtun_pop_reloads", "Config reloads, by result.", ("result",))
        reloads.add_metric(["ok"], s["reloads"])
        reloads.add_metric(["failed"], s["reload_failures"])
        return [info, up, packets, drops, lp, lb, ld, routes, learned, sources, moves, reloads] + \
            _segment_metrics(s.get("segments", {}))


# A LOOPS segment's egress counts what crossed it (microtun_host.segment.Receiver.stats)
_SEG_PACKETS = ("received", "gaps", "reordered", "recovered_nack", "recovered_fec", "unrecovered", "parities_unused")


def _segment_metrics(segments):
    """Per-path loss and RTT where a PoP measures them: the LOOPS segments
    it is an end of (docs/LOOPS.md), keyed "in:<label>" (the egress: loss
    measured from sequence gaps) and "out:<label>" (the ingress: RTT from
    its pings). Bounded by configuration: one entry per segment route."""
    pk = _counter("microtun_pop_segment_packets", "LOOPS segment egress: packets received, sequence gaps seen, "
                  "gaps that were reordering, repaired by NACK or FEC, given up; FEC parities that had nothing "
                  "to repair.", ("segment", "kind"))
    loss = _gauge("microtun_pop_segment_loss_ratio", "LOOPS segment egress: share of packets lost on the "
                  "segment before repair (gaps that were not reordering).", ("segment",))
    rtt = _gauge("microtun_pop_segment_rtt_seconds", "LOOPS segment: smoothed RTT (the ingress from its pings, "
                 "the egress from the ingress's reports).", ("segment",))
    for name, st in sorted(segments.items()):
        if st.get("role") == "egress":
            for k in _SEG_PACKETS:
                pk.add_metric([name, k], st[k])
            loss.add_metric([name], st["loss"])
        if st.get("srtt_ms"):           # None or 0: no sample yet
            rtt.add_metric([name], st["srtt_ms"] / 1000)
    return [pk, loss, rtt]


class GatewayCollector:
    """A gateway's counters, from GatewayServer.status() (what `microtun
    status` prints) and its crypto backend."""

    def __init__(self, status, crypto=None, max_devices=MAX_DEVICES):
        self.status = status        # () -> the "status" dict
        self.crypto = crypto        # the backend's name, for microtun_gateway_info
        self.max_devices = max_devices

    def collect(self):
        st = self.status()
        c = st["counters"]
        info = _gauge("microtun_gateway_info", "This gateway (value 1) and its crypto backend.",
                      ("name", "crypto"))
        info.add_metric([st["gateway"], str(self.crypto or st.get("crypto", "unknown"))], 1)
        up = _gauge("microtun_gateway_uptime_seconds", "Seconds since the gateway started.")
        up.add_metric([], st["uptime_s"])
        inner = _counter("microtun_gateway_inner_packets", "Inner packets that authenticated (rx) or were "
                         "sent (tx), by kind.", ("kind", "direction"))
        for k, (kind, d) in sorted(_GW_TRAFFIC.items()):
            inner.add_metric([kind, d], c.get(k, 0))
        hs = _counter("microtun_gateway_handshakes", "Handshakes: answered (RESPONSE sent), confirmed (the "
                      "device used the keys), failed (answered, never confirmed).", ("result",))
        for k, result in sorted(_GW_HANDSHAKE.items()):
            hs.add_metric([result], c.get(k, 0))
        drops = _counter("microtun_gateway_drops", "Datagrams dropped or answered as trouble, by reason "
                         "(docs/PROTOCOL.md; the gateway's `microtun status` counters).", ("reason",))
        for reason, n in sorted(c.items()):
            if reason not in _GW_TRAFFIC and reason not in _GW_HANDSHAKE:
                drops.add_metric([reason], n)
        devices = st["devices"]
        registered = _gauge("microtun_gateway_devices", "Devices in the registry.")
        registered.add_metric([], len(devices))
        sessions = _gauge("microtun_gateway_sessions", "Devices with an established session.")
        sessions.add_metric([], sum(1 for d in devices if d["established"]))
        out = [info, up, inner, hs, drops, registered, sessions]
        out += self._links(devices)
        out += self._devices(devices)
        return out

    def _links(self, devices):
        # Link counters appear in each device's paths (a link serves one path).
        lp = _counter("microtun_gateway_link_packets", "Outer packets per last-hop link.", ("link", "direction"))
        lb = _counter("microtun_gateway_link_bytes", "Outer bytes per last-hop link.", ("link", "direction"))
        ld = _counter("microtun_gateway_link_duplicates", "Copies that came second on a link (dropped by the "
                      "replay window: the other path was faster).", ("link",))
        seen = set()
        for d in devices:
            for p in d["paths"]:
                link = str(p["link"])
                if link in seen or "rx_packets" not in p:
                    continue
                seen.add(link)
                for direction in ("rx", "tx"):
                    lp.add_metric([link, direction], p[direction + "_packets"])
                    lb.add_metric([link, direction], p[direction + "_bytes"])
                ld.add_metric([link], p["duplicates"])
        return [lp, lb, ld]

    def _devices(self, devices):
        chosen = sorted(devices, key=lambda d: str(d["name"]))[:self.max_devices]
        exported = _gauge("microtun_gateway_devices_exported", "Devices with their own series (at most "
                          "MAX_DEVICES; the totals count every device).")
        exported.add_metric([], len(chosen))
        est = _gauge("microtun_gateway_device_established", "1 while the device has a session.", ("device",))
        pk = _counter("microtun_gateway_device_packets", "Inner packets per device.", ("device", "direction"))
        by = _counter("microtun_gateway_device_bytes", "Inner bytes per device.", ("device", "direction"))
        hs = _counter("microtun_gateway_device_handshakes", "Confirmed handshakes per device.", ("device",))
        dr = _counter("microtun_gateway_device_drops", "Drops and trouble per device, by reason.",
                      ("device", "reason"))
        rtt = _gauge("microtun_gateway_path_rtt_seconds", "Smoothed RTT of a device path, as the device "
                     "measured and reported it in its last path probe.", ("device", "link"))
        seen = _gauge("microtun_gateway_path_last_seen_seconds", "Seconds since an authentic packet came "
                      "over this device path.", ("device", "link"))
        loss = _gauge("microtun_gateway_path_probe_loss_ratio", "Loss of a device path, device to gateway: an "
                      "average over its last ~16 path probes, from the gaps in their sequence numbers.",
                      ("device", "link"))
        for d in chosen:
            name = str(d["name"])
            est.add_metric([name], 1 if d["established"] else 0)
            for direction in ("rx", "tx"):
                pk.add_metric([name, direction], d[direction + "_packets"])
                by.add_metric([name, direction], d[direction + "_bytes"])
            hs.add_metric([name], d["handshakes"])
            for reason, n in sorted(d["counters"].items()):
                if reason not in _GW_TRAFFIC and reason not in _GW_HANDSHAKE:
                    dr.add_metric([name, reason], n)
            for p in d["paths"]:
                if p["srtt_ms"] is not None:
                    rtt.add_metric([name, str(p["link"])], p["srtt_ms"] / 1000)
                seen.add_metric([name, str(p["link"])], p["last_seen_ms_ago"] / 1000)
                if p.get("probe_loss") is not None:
                    loss.add_metric([name, str(p["link"])], p["probe_loss"])
        return [exported, est, pk, by, hs, dr, rtt, seen, loss]


def registry(collector):
    """A registry of its own holding `collector` (not the library's global
    one: several nodes may run in one test process)."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    return reg


def exposition(collector):
    """The Prometheus text exposition (bytes) of one collector."""
    return generate_latest(registry(collector))


async def serve(where, collector, log):
    """Serve `collector` over HTTP at `where` (a microtun_host.config.Address):
    GET /metrics (or /) -> 200 with the exposition; anything else 404 or
    405. One request per connection. Returns the asyncio server."""
    reg = registry(collector)
    scrapes = [0]

    async def handle(reader, writer):
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            status, body, ctype = b"400 Bad Request", b"bad request line\n", b"text/plain"
        elif parts[0] not in (b"GET", b"HEAD"):
            status, body, ctype = b"405 Method Not Allowed", b"GET /metrics\n", b"text/plain"
        elif parts[1].split(b"?")[0] not in (b"/metrics", b"/"):
            status, body, ctype = b"404 Not Found", b"the metrics are at /metrics\n", b"text/plain"
        else:
            t0 = time.perf_counter()
            body = generate_latest(reg)
            scrapes[0] += 1
            log.debug("metrics scrape %d: %d bytes in %.1f ms", scrapes[0], len(body),
                      (time.perf_counter() - t0) * 1000)
            status, ctype = b"200 OK", CONTENT_TYPE_LATEST.encode()
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: " +
                     str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" +
                     (b"" if parts and parts[0] == b"HEAD" else body))
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(handle, where.host, where.port, limit=MAX_REQUEST)
    if not where.is_loopback:
        log.warning("metrics on %s: anyone who can reach it reads device names and counters; "
                    "firewall it to the Prometheus server", where)
    log.info("metrics at http://%s/metrics", where)
    return server
