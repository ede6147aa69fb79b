"""The gateway server: the inner tunnel's responder for many devices.

    microtun gateway --config gateway.json

It terminates the last hop of every path (outer label + hop key), runs the
sans-I/O `microtun.endpoint.Gateway`, enforces each device's channel access,
and connects each channel to a local UDP service (`"1": "127.0.0.1:5000"`):
every (device, channel) pair gets its own local socket, so the service sees
one source port per device and its replies go back to that device.

Embedding (same process as the application):

    server = GatewayServer(load_gateway_config("gateway.json"))
    server.on_data = lambda device, channel, data: ...
    await server.start()
    server.send("sensor-1", 2, b"led on", critical=True)
    print(server.status())
    await server.stop()
"""
import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from time import monotonic as _monotonic

from microtun import outer
from microtun_host import config as hconfig
from microtun_host import control
from microtun_host import log as logs
from microtun_host import hostcrypto
from microtun_host.pop import encode_source
from microtun_host.config import ConfigError
from microtun.endpoint import DATA, HANDSHAKE, STALE
from microtun.responder import Gateway, EXPIRED, FAILED, DENIED, SWEEP_MS, GATEWAY_DH_PER_S, LINK_DH_PER_S, \
    DEVICE_PAYLOAD_MAX
from microtun.ticks import TICKS_MASK, ticks_diff
from microtun import timers
from microtun.replay import GATEWAY_WINDOW

log = logging.getLogger("microtun.gateway")

DRAIN_S = 10.0      # a link removed by a reload still accepts packets this long
LOG_EVERY_S = 10.0  # per device and kind of trouble, at most one info line this often
PROBE_REPLIES_PER_S = 10    # HOP_PROBE answers per link per second
RCVBUF = 4 << 20            # the listening socket's receive buffer asked for (the kernel may cap it)
# counters of normal traffic; every other counter is a drop or an answer to trouble
NORMAL_COUNTERS = ("data_rx", "data_tx", "handshake_ok", "keepalive_rx", "keepalive_tx", "path_probe_rx",
                   "response_tx")


def utc_text(t):
    # changelog's (the one UTC format of registries and the log), imported only when a device expires:
    # a gateway without expiries does not load the Ed25519 code it needs for nothing
    from microtun_host.changelog import utc_text
    return utc_text(t)


def parse_utc(text):
    from microtun_host.changelog import parse_utc
    return parse_utc(text)


def now_ms():
    return int(time.monotonic() * 1000) & TICKS_MASK


# --- configuration -----------------------------------------------------------
# gateway.json (docs/CONFIG.md, "Gateway"):
#   name, listen, control (optional, loopback), private_key, registry (file),
#   links: [{name, in_label, reply_label, key, next ("host:port" or "learn")}],
#   services: {"1": "127.0.0.1:5000", ...}, rekey_after_s, window, log_level
# registry.json: {"devices": [{name, public_key, psk (optional), channels, expires (optional)}]}

class Link:
    """The last hop of one path: packets arrive with in_label under key from
    the PoP at `next`; replies go back to it with reply_label."""

    def __init__(self, node):
        node.only("name", "in_label", "reply_label", "key", "next")
        self.in_label = node.integer("in_label", 1, 0xFFFFFF)
        self.name = node.text("name", "link%d" % self.in_label)
        self.reply_label = node.integer("reply_label", 1, 0xFFFFFF)
        self.key = outer.HopKey(node.key32("key"))
        nxt = node.value.get("next", "learn")
        self.learn = nxt == "learn"
        self.next = None if self.learn else node.address("next")
        self.peer_addr = None if self.next is None else self.next.sockaddr
        self.counters = {"rx_packets": 0, "rx_bytes": 0, "duplicates": 0, "tx_packets": 0, "tx_bytes": 0,
                         "ce_marks": 0}
        self.probe_window = None          # the second probe_replies counts in
        self.probe_replies = 0


class DeviceEntry:
    """A registry entry; expires: seconds since the epoch (from
    "YYYY-MM-DDTHH:MM:SSZ", UTC) after which the device is refused, or None."""

    def __init__(self, node):
        node.only("name", "public_key", "psk", "channels", "ops", "expires")
        self.name = node.text("name")
        self.public_key = node.key32("public_key")
        self.psk = node.key32("psk") if node.value.get("psk") is not None else None
        ch = node.items("channels", default=None)
        if ch is not None and not all(isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= 255 for c in ch):
            raise node.error("channels", "expected a list of channel numbers 1..255")
        self.channels = ch
        self.ops = node.value.get("ops", False)     # the operations channel allowed (docs/OPS.md)
        if self.ops not in (True, False):
            raise node.error("ops", "expected true or false")
        self.expires = None
        if node.has("expires"):
            self.expires = parse_utc(node.value["expires"])
            if self.expires is None:
                raise node.error("expires", "expected \"YYYY-MM-DDTHH:MM:SSZ\" (UTC), got %s"
                                 % hconfig._short(str(node.value["expires"])))




class GatewayConfig:
    """devices: the registry itself instead of the file "registry" names
    (fleet.py: the registry and the links come from etcd, and a fleet may
    start with no links yet)."""

    def __init__(self, root, devices=None):
        root.only("name", "listen", "control", "private_key", "registry", "links", "services",
                  "rekey_after_s", "window", "log_level", "metrics", "crypto", "keepalive_s", "workers",
                  "operators", "dh_per_s", "link_dh_per_s")
        self.source = root.file
        self.path = root.file
        # processes on the one port, each device's links steered to one (microtun_host.workers)
        self.workers = self.file_workers = root.integer("workers", 1, 256, 1)
        self.name = root.text("name", "gateway")
        self.listen = root.address("listen")
        self.control = control.from_config(root)
        self.private_key = root.key32("private_key")
        self.links = [Link(n) for n in root.objects("links", min_len=1 if devices is None else 0)]
        seen = {}
        names = {}
        for i, link in enumerate(self.links):
            if link.in_label in seen:
                raise ConfigError("%s: links[%d].in_label: %d is already used by links[%d]" % (
                    root.file, i, link.in_label, seen[link.in_label]))
            if link.name in names:
                raise ConfigError("%s: links[%d].name: %r is already used by links[%d]" % (
                    root.file, i, link.name, names[link.name]))
            seen[link.in_label] = i
            names[link.name] = i
        self.services = {}
        svc = root.obj("services", None)
        if svc is not None:
            for k in svc.value:
                if k.startswith("_"):
                    continue
                if not k.isdigit() or not 1 <= int(k) <= 255:
                    raise svc.error(k, "channel numbers are 1..255")
                self.services[int(k)] = svc.address(k).sockaddr
        if devices is None:
            reg = root.text("registry")
            base = os.path.dirname(os.path.abspath(root.file))
            self.registry_path = reg if os.path.isabs(reg) else os.path.join(base, reg)
        self.rekey_after_ms = root.integer("rekey_after_s", 10, 86400, timers.Params.rekey_after_ms // 1000) * 1000
        self.window = root.integer("window", 64, 65536, GATEWAY_WINDOW)
        # passive keepalive: an answer to a device's data within this, even with nothing to say; shorter
        # than the devices' unresponsive_s when a standby waits (docs/DEPLOY.md "Many cores and failover")
        self.keepalive_ms = root.integer("keepalive_s", 1, 10, timers.Params.keepalive_ms // 1000) * 1000
        self.log_level = root.text("log_level", "info", choices=("debug", "info", "warning", "error"))
        self.metrics = root.address("metrics", None)        # Prometheus over HTTP (metrics.py); off by default
        self.crypto = root.text("crypto", "cryptography", choices=tuple(sorted(hostcrypto.BACKENDS)))
        # handshakes that may cost a DH per second, per process over all links and per link (the flood
        # budgets of docs/PROTOCOL.md); the portable core's defaults, for either backend (docs/DEPLOY.md)
        self.dh_per_s = root.integer("dh_per_s", 1, 1000000, GATEWAY_DH_PER_S)
        self.link_dh_per_s = root.integer("link_dh_per_s", 1, 1000000, LINK_DH_PER_S)
        self.devices = load_registry(self.registry_path) if devices is None else devices
        # Ed25519 public keys (hex) that may log in to the ops channel (docs/OPS.md)
        ops = root.items("operators", default=[])
        for i, k in enumerate(ops):
            if not isinstance(k, str) or len(k) != 64 or any(c not in "0123456789abcdefABCDEF" for c in k):
                raise ConfigError("%s: operators[%d]: expected an Ed25519 public key as 64 hex characters "
                                  "(`microtun fleet keygen` prints one)" % (root.file, i))
        self.operators = frozenset(k.lower() for k in ops)


def load_registry(path):
    root = hconfig.load(path)
    root.only("devices")
    out = []
    names = {}
    keys = {}
    for i, n in enumerate(root.objects("devices")):
        e = DeviceEntry(n)
        if e.name in names:
            raise n.error("name", "%r is already used by devices[%d]" % (e.name, names[e.name]))
        if e.public_key in keys:
            raise n.error("public_key", "the same key is registered as devices[%d]" % keys[e.public_key])
        names[e.name] = i
        keys[e.public_key] = i
        out.append(e)
    return out


def load_gateway_config(path):
    return GatewayConfig(hconfig.load(path))


# --- the server ----------------------------------------------------------------

class _Proto(asyncio.DatagramProtocol):
    def __init__(self, on_datagram, on_error=None):
        self.on_datagram = on_datagram
        self.on_error = on_error
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.on_datagram(data, addr)

    def error_received(self, exc):
        # the listening socket: an ICMP error for something we sent (nothing
        # to do); a service socket: the local service is not listening
        if self.on_error is not None:
            self.on_error(exc)


class _Listener:
    """The listening socket, read in batches: one wake-up of the event loop
    takes every queued datagram (up to BATCH), where asyncio's datagram
    transport takes one per loop iteration; under a flood that difference
    is the legitimate packets the kernel does not have to drop. To the rest
    of the server it looks like that transport (sendto, get_extra_info,
    close). A send the socket refuses is counted (`send_error`), not queued."""
    BATCH = 256

    def __init__(self, sock, on_datagram, loop, count):
        sock.setblocking(False)
        self.sock = sock
        self.on_datagram = on_datagram
        self.loop = loop
        self.count = count
        loop.add_reader(sock.fileno(), self._ready)

    def _ready(self):
        recv = self.sock.recvfrom
        for _ in range(self.BATCH):
            try:
                data, addr = recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:         # an ICMP error for something we sent, reported here
                continue
            self.on_datagram(data, addr)

    def sendto(self, data, addr):
        try:
            self.sock.sendto(data, addr)
        except OSError:
            self.count("send_error")

    def get_extra_info(self, name):
        return {"sockname": self.sock.getsockname(), "socket": self.sock}.get(name)

    def close(self):
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()


class GatewayServer:
    def __init__(self, cfg):
        self.cfg = cfg
        p = timers.Params(rekey_after_ms=cfg.rekey_after_ms, keepalive_ms=cfg.keepalive_ms,
                          reject_after_ms=cfg.rekey_after_ms + (timers.Params.reject_after_ms - timers.Params.rekey_after_ms))
        self.crypto, suite = hostcrypto.choose(cfg.crypto)    # the one place the crypto backend is chosen
        self.core = Gateway(cfg.private_key, params=p, window=cfg.window, suite=suite)
        self._set_budgets(cfg)
        self._lazy_timer = p.keepalive_ms >= SWEEP_MS       # see _handle_outer
        self._set_links(cfg.links)
        self.names = {}                   # device name -> public key
        self.stats = {}
        self.on_data = None               # callback(device_name, channel, data)
        self.on_event = None              # callback(kind, device_name)
        self._transport = None
        self._control = None
        self._metrics = None
        self._services = {}               # (public key, channel) -> transport
        self._timer = None
        self._timer_at = None
        self._started = time.monotonic()
        self._drop_task = None
        self._logged = {}                 # (device, kind) -> [last line (monotonic s), lines held back]
        self.ops_devices = set()          # names of the devices the registry allows ops for
        self.expiry = {}                  # device name -> when its credential expires (s since the epoch)
        self.expired = 0
        self._expiry_timer = None
        self._apply_registry(cfg.devices)
        from microtun_host.opsgw import GatewayOps
        self.ops = GatewayOps(self)       # the operations channel (docs/OPS.md)

    def _set_budgets(self, cfg):
        self.core.dh_per_s = cfg.dh_per_s
        self.core.link_dh_per_s = cfg.link_dh_per_s

    # -- links and registry ------------------------------------------------------
    # A session's path is the *name* of the link its packets arrived on
    # ("d1/a"), so a reload can rebuild the link table (a route re-spliced:
    # new labels) without touching sessions. Links removed by a reload keep
    # working for DRAIN_S so packets already in flight on the old chain land.
    def _set_links(self, links, now=None):
        old = getattr(self, "by_name", {})
        self.by_name = {l.name: l for l in links}
        self.by_label = {l.in_label: l for l in links}
        for name, l in old.items():       # keep what was learned
            n = self.by_name.get(name)
            if n is not None and n.learn and n.peer_addr is None:
                n.peer_addr = l.peer_addr
        draining = getattr(self, "_draining", {})
        if now is not None:
            for l in old.values():
                if l.in_label not in self.by_label and self.by_name.get(l.name) is not l:
                    draining[l.in_label] = (l, now + DRAIN_S)
        self._draining = {lbl: v for lbl, v in draining.items() if lbl not in self.by_label}
        self.links = list(links)

    def _link_for_label(self, label):
        l = self.by_label.get(label)
        if l is None and self._draining:
            v = self._draining.get(label)
            if v is not None:
                if time.monotonic() < v[1]:
                    return v[0]
                del self._draining[label]
        return l

    def _apply_registry(self, devices):
        want = {e.public_key: e for e in devices}
        for name, pub in list(self.names.items()):
            e = want.get(pub)
            if e is None:
                self._remove(name, pub, "revoked")
            elif e.name != name:
                del self.names[name]        # renamed: the same device
        self.expiry = {}
        for e in devices:
            self._register(e)
        self._arm_expiry()

    def _register(self, e, quiet=False):
        """Add or update one registry entry; one whose credential has
        expired is removed instead (its sessions closed)."""
        if e.expires is not None and e.expires <= time.time():
            self.expiry.pop(e.name, None)
            if self.names.get(e.name) == e.public_key:
                self._remove(e.name, e.public_key, "credential expired at %s" % utc_text(e.expires))
            return
        if e.expires is not None:
            self.expiry[e.name] = e.expires
        else:
            self.expiry.pop(e.name, None)
        new = e.public_key not in self.core.peers
        self.core.register(e.public_key, psk=e.psk, name=e.name, channels=e.channels)     # its Peer: on first contact
        self.names[e.name] = e.public_key
        if getattr(e, "ops", False):
            self.ops_devices.add(e.name)
        else:
            self.ops_devices.discard(e.name)
        if new and not quiet:
            log.info("device %s registered (channels %s%s)", e.name, e.channels or "all",
                     ", expires %s" % utc_text(e.expires) if e.expires else "")

    def _remove(self, name, pub, why):
        """A device leaves the registry (revoked, re-keyed, expired): its
        sessions and service sockets close, its handshakes are refused."""
        if self.core.remove_peer(pub):
            self._close_services(pub)
            for k in [k for k in self._logged if k[0] == name]:
                del self._logged[k]
            log.info("device %s %s: its sessions are closed, its handshakes refused", name, why)
        if self.names.get(name) == pub:
            del self.names[name]
            self.ops_devices.discard(name)

    # -- credentials that expire (docs/FLEET.md): one timer, at the earliest expiry
    def _arm_expiry(self):
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        if not self.expiry:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return      # not started yet: start() arms it
        self._expiry_timer = loop.call_later(max(0.0, min(self.expiry.values()) - time.time()), self._expire)

    def _expire(self):
        self._expiry_timer = None
        now = time.time()
        for name, t in sorted(self.expiry.items(), key=lambda x: x[1]):
            if t <= now:
                del self.expiry[name]
                self.expired += 1
                pub = self.names.get(name)
                if pub is not None:
                    self._remove(name, pub, "credential expired at %s" % utc_text(t))
        self._arm_expiry()

    def reload(self):
        """Re-read the config and the registry: links (re-spliced routes),
        services, devices (add, update, revoke). The listen address and the
        private key need a restart. On any error the running configuration
        is kept. Returns (ok, message)."""
        try:
            cfg = load_gateway_config(self.cfg.source)
        except ConfigError as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            return False, str(e)
        if cfg.private_key != self.cfg.private_key or cfg.listen != self.cfg.listen:
            msg = "reload refused: private_key and listen change only with a restart"
            log.error(msg)
            return False, msg
        cfg.metrics, cfg.crypto = self.cfg.metrics, self.cfg.crypto     # these two: on restart only
        self._set_links(cfg.links, time.monotonic())
        self._set_budgets(cfg)
        self._apply_registry(cfg.devices)
        if cfg.services != self.cfg.services:
            for t in list(self._services.values()):
                t.close()
            self._services.clear()
        self.cfg = cfg
        msg = "reloaded: %d links, %d devices" % (len(cfg.links), len(cfg.devices))
        log.info(msg)
        return True, msg

    # -- lifecycle -----------------------------------------------------------
    async def start(self, sock=None):
        """Open the sockets and serve; `sock`: a bound UDP socket to use
        instead of binding `listen` (a worker's, from its supervisor)."""
        loop = asyncio.get_running_loop()
        if sock is None:
            sock = socket.socket(socket.AF_INET6 if self.cfg.listen.family == 6 else socket.AF_INET,
                                 socket.SOCK_DGRAM)
            try:
                sock.bind(self.cfg.listen.sockaddr)
            except OSError:
                sock.close()
                raise
        try:    # room for bursts (a flood shares this socket with every device's packets)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        except OSError:
            pass
        self._transport = _Listener(sock, self._on_outer, loop, self._count)
        if self.cfg.control is not None:
            self._control = await control.serve(self.cfg.control, {
                "status": lambda req: {"status": self.status()},
                "stats": lambda req: {"counters": self.counters()},
                "reload": self._reload_cmd,
                **self.ops.commands(),
                **self.extra_commands(),
            }, log)
        if self.cfg.metrics is not None:
            from microtun_host import metrics      # prometheus_client: loaded only when asked for
            self._metrics = await metrics.serve(self.cfg.metrics, metrics.GatewayCollector(
                self.status, self.crypto.name), log)
        self._schedule()
        self._arm_expiry()
        self._drop_task = loop.create_task(self._drop_lines())
        log.info("gateway %s listening on %s, %d links, %d devices, services %s, crypto %s, "
                 "handshakes %d/s (%d per link)",
                 self.cfg.name, hconfig.format_sockaddr(self.address), len(self.links), len(self.core.peers),
                 {c: "%s:%d" % a for c, a in self.cfg.services.items()}, self.crypto.name,
                 self.core.dh_per_s, self.core.link_dh_per_s)

    def extra_commands(self):
        """More control commands {name: fn(request) -> dict} (fleet.py adds "fleet")."""
        return {}

    @property
    def address(self):
        return self._transport.get_extra_info("sockname")

    @property
    def control_address(self):
        return None if self._control is None else self._control.get_extra_info("sockname")

    async def _drop_lines(self):
        """Every LOG_EVERY_S, one info line with what was dropped (or
        answered as trouble) since the last one, if anything: the drops
        before a device is known (replays, bad mac1, budgets, bad hop MACs)
        are counted gateway-wide and explained here; a known device's own
        trouble has its own lines (_rlog)."""
        last = self.counters()
        while True:
            await asyncio.sleep(LOG_EVERY_S)
            c = self.counters()
            d = sorted((k, v - last.get(k, 0)) for k, v in c.items()
                       if k not in NORMAL_COUNTERS and v != last.get(k, 0))
            last = c
            if d:
                log.info("in the last %d s: %s", LOG_EVERY_S, ", ".join("%s %d" % kv for kv in d))

    async def stop(self, quiet=False):
        if self._drop_task is not None:
            self._drop_task.cancel()
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        if self._timer is not None:
            self._timer.cancel()
        for t in list(self._services.values()):
            t.close()
        self._services.clear()
        if self._control is not None:
            self._control.close()
        if self._metrics is not None:
            self._metrics.close()
        if self._transport is not None:
            self._transport.close()
        if not quiet:
            log.info("gateway stopped: %s", json.dumps(self.counters()))

    # -- outer plane ---------------------------------------------------------
    def _count(self, reason):
        self.stats[reason] = self.stats.get(reason, 0) + 1

    def _on_outer(self, pkt, src):
        try:
            self._handle_outer(pkt, src)
        except Exception:           # a bug must cost one datagram, never the gateway
            self._count("internal_error")
            log.exception("internal error handling a datagram from %s", src)

    def _handle_outer(self, pkt, src):
        parsed = outer.parse(pkt)
        if parsed is None:
            self._count("outer_" + (outer.reject_reason(pkt) or "malformed"))
            return
        ptype, label = parsed
        link = self.by_label.get(label)
        if link is None:
            link = self._link_for_label(label)      # a link draining after a reload?
            if link is None:
                self._count("outer_unknown_label")
                return
        if not outer.verify(link.key, pkt):
            self._count("outer_bad_mac")
            return
        # A "learn" link's reply address: set by the first authenticated
        # packet, and moved afterwards only by an inner transport packet that
        # authenticates and is fresh (the replay window): a captured packet
        # replayed from elsewhere passes the hop MAC but must not steer the
        # replies (issue 11, defect 4; roaming as WireGuard does it).
        if link.learn:
            if link.peer_addr is None:
                link.peer_addr = src
            roam = src != link.peer_addr
        else:
            roam = False
        if ptype == outer.TYPE_HOP_KEEPALIVE:
            self._count("outer_keepalive_rx")
            return
        if ptype == outer.TYPE_HOP_PROBE:
            payload = pkt[outer.HEADER_LEN:]
            # answered with the address it came from: a replayed probe from a
            # forged source would aim the answers elsewhere, so at most
            # PROBE_REPLIES_PER_S per link
            t = int(time.monotonic())
            if link.probe_window != t:
                link.probe_window, link.probe_replies = t, 0
            if link.probe_replies >= PROBE_REPLIES_PER_S:
                self._count("outer_probe_limited")
                return
            link.probe_replies += 1
            if not outer.PROBE_MIN <= len(payload) <= outer.PROBE_MAX:
                self._count("outer_bad_probe")      # a reply may never be longer than its probe
                return
            family, port, addr = encode_source(src)     # as the PoP answers probes
            self._send_outer(outer.TYPE_HOP_PROBE_REPLY, link.in_label, link,
                             outer.probe_reply_payload(payload, family, port, addr), src)
            return
        c = link.counters
        if ptype == outer.TYPE_DATA_CE:     # a congested LOOPS segment on the way (docs/LOOPS.md)
            c["ce_marks"] += 1
            ptype = outer.TYPE_DATA
        if ptype != outer.TYPE_DATA:
            self._count("outer_unexpected_type")
            return
        now = int(_monotonic() * 1000) & TICKS_MASK     # now_ms(), inline: once per packet
        c["rx_packets"] += 1
        c["rx_bytes"] += len(pkt)
        core = self.core
        st = core.stats
        dup = st.get("duplicate", 0)
        if roam:
            fresh = st.get("data_rx", 0) + st.get("keepalive_rx", 0)
        core.receive_datagram(memoryview(pkt)[outer.HEADER_LEN:], link.name, now)    # the inner packet, not copied
        if roam and st.get("data_rx", 0) + st.get("keepalive_rx", 0) != fresh:
            log.info("link %s: replies now go to %s (was %s; authentic fresh packet)",
                     link.name, hconfig.format_sockaddr(src), hconfig.format_sockaddr(link.peer_addr))
            link.peer_addr = src
        if st.get("duplicate", 0) != dup:
            c["duplicates"] += 1            # the copy that came second, on this link
        if core._events:                    # most dropped datagrams leave nothing to do
            self._events(now)
        if core._out:
            self._flush(now)
        elif self._timer is not None and self._lazy_timer:
            # Nothing was sent: an armed timer stays right. While any session
            # exists the core's sweep keeps one armed at most SWEEP_MS ahead,
            # and a deadline a data packet creates (a passive keepalive,
            # keepalive_ms >= SWEEP_MS ahead) comes after it; that timer's
            # handler re-arms exactly. This spares Gateway.get_timer (a walk
            # over the sessions owing a keepalive) per packet.
            return
        self._schedule()

    def _send_outer(self, ptype, label, link, payload, addr):
        if addr is None:
            self._count("no_route")
            return
        pkt = outer.seal(ptype, label, link.key, payload)
        link.counters["tx_packets"] += 1
        link.counters["tx_bytes"] += len(pkt)
        self._transport.sendto(pkt, addr)

    def _flush(self, now):
        for data, name in self.core.datagrams_to_send(now):
            link = self.by_name.get(name)
            if link is None:
                self._count("no_route")
                continue
            self._send_outer(outer.TYPE_DATA, link.reply_label, link, data, link.peer_addr)

    # -- inner events and services ----------------------------------------------
    def _events(self, now):
        core = self.core
        while core._events:
            events = core._events           # the core's whole queue at once (next_event() pops one)
            core._events = []
            for e in events:
                if e.kind == DATA and e.channel and self.on_event is None:
                    self._deliver(e.peer, e.channel, e.data)    # the usual one, without another call
                else:
                    self._event(e)

    def _event(self, e):
        name = e.peer.name
        if e.kind == DATA:
            if e.channel == 0:            # channel 0 beyond path probes: an ops reply (docs/OPS.md)
                self.ops.on_reply(e.peer, e.data)
            else:
                self._deliver(e.peer, e.channel, e.data)
        elif e.kind == HANDSHAKE:
            log.info("device %s: session established (handshake %d, via %s)",
                     name, e.peer.handshakes, e.peer.addr)
        elif e.kind == EXPIRED:
            log.info("device %s: session expired", name)
        elif e.kind == FAILED:
            self._rlog(name, FAILED, "device %s: handshake answered but never confirmed: the device could not "
                       "open the RESPONSE (a wrong psk? compare its config with the registry) or it was lost")
        elif e.kind == STALE:
            st = e.peer.stale
            theirs, ours = int.from_bytes(st[1][:4], "big"), int.from_bytes(st[2][:4], "big")
            answered = e.peer.stale_answered_at == st[0]
            self._rlog(name, STALE, "device %s: stale handshake (counter %d \u2264 %d): its boot counter went "
                       "backwards (re-flashed, storage wiped) or an old INIT was replayed; %s" % (
                           "%s", theirs, ours, "told it to continue from %d" % (ours + 1) if answered else
                           "not answered (one answer per device per 5 s)"))
        elif e.kind == DENIED:
            self._rlog(name, DENIED, "device %%s: data on channel %d refused: the registry does not allow it "
                       "(channels %s)" % (e.channel, sorted(e.peer.channels)))
        if self.on_event is not None:
            self.on_event(e.kind, name)

    def _rlog(self, name, kind, fmt):
        """One info line per device and kind per LOG_EVERY_S; the lines held
        back meanwhile are counted in the next one."""
        t = time.monotonic()
        e = self._logged.get((name, kind))
        if e is not None and t - e[0] < LOG_EVERY_S:
            e[1] += 1
            return
        more = 0 if e is None else e[1]
        self._logged[(name, kind)] = [t, 0]
        log.info(fmt % name + (" (%d more like this since the last line)" % more if more else ""))

    def _dev_count(self, peer, reason):
        """A server-side drop that concerns one device: counted in the
        gateway's counters and the device's."""
        self._count(reason)
        peer.counts[reason] = peer.counts.get(reason, 0) + 1

    def _deliver(self, peer, channel, data):
        svc = self.cfg.services.get(channel)
        if svc is None:
            if self.on_data is not None:
                self.on_data(peer.name, channel, bytes(data))
            else:
                self._dev_count(peer, "no_service")
                self._rlog(peer.name, "no_service", "device %%s: data on channel %d dropped: no service is "
                           "configured for it (gateway.json \"services\")" % channel)
            return
        key = (peer.public_key, channel)
        t = self._services.get(key)
        if t is None:
            self._open_service(peer, channel, svc, data)
            return
        t.sendto(bytes(data))

    def _open_service(self, peer, channel, svc, first):
        loop = asyncio.get_running_loop()
        pub = peer.public_key

        def on_reply(data, addr):
            if len(data) > DEVICE_PAYLOAD_MAX:
                self._dev_count(peer, "too_long_for_device")
                self._rlog(peer.name, "too_long_for_device", "device %%s: a %d-byte reply from the channel %d "
                           "service %s:%d dropped: a device takes at most %d bytes per message" % (
                               len(data), channel, svc[0], svc[1], DEVICE_PAYLOAD_MAX))
                return
            try:
                self.send(pub, channel, data)
            except ValueError:      # the device was revoked meanwhile
                self._count("service_reply_dropped")

        def on_error(exc):
            # ICMP port unreachable for what we forwarded: nobody listens there
            self._dev_count(peer, "service_unreachable")
            self._rlog(peer.name, "service_unreachable", "device %%s: channel %d service %s:%d is not listening "
                       "(%s); its data is lost until the service starts" % (
                           channel, svc[0], svc[1], getattr(exc, "strerror", None) or exc))

        async def opener():
            try:
                t, _ = await loop.create_datagram_endpoint(lambda: _Proto(on_reply, on_error), remote_addr=svc)
            except OSError as e:
                self._dev_count(peer, "service_error")
                log.warning("channel %d service %s:%d unavailable: %s", channel, svc[0], svc[1], e)
                return
            old = self._services.get((pub, channel))
            if old is not None:
                t.close()
                t = old
            else:
                self._services[(pub, channel)] = t
            t.sendto(bytes(first))
        loop.create_task(opener())

    def _close_services(self, pub):
        for key in [k for k in self._services if k[0] == pub]:
            self._services.pop(key).close()

    def send(self, device, channel, data, critical=False):
        """Send data to a device (name or public key) on a channel. Returns
        False if the device has no session now (counted as no_session).
        ValueError for an unknown device, or for data longer than a device
        takes (DEVICE_PAYLOAD_MAX, 2003 bytes: its driver reads datagrams of
        2048)."""
        pub = self.names.get(device, device) if isinstance(device, str) else device
        if pub not in self.core.peers:
            raise ValueError("unknown device %r" % (device,))
        now = now_ms()
        ok = self.core.send(pub, channel, data, now, route="critical" if critical else None)
        self._flush(now)
        self._schedule()
        return ok

    # -- timers ------------------------------------------------------------------
    def _schedule(self):
        # Called after every datagram: keep the armed timer when the core's
        # deadline did not change (the usual case), rather than cancel and
        # re-arm one per packet (a cancelled TimerHandle stays in asyncio's
        # heap until the loop cleans it up).
        d = self.core.get_timer()
        if self._timer is not None:
            if d == self._timer_at:
                return
            self._timer.cancel()
        self._timer_at = d
        if d is None:
            self._timer = None
            return
        delay = max(0, ticks_diff(d, now_ms())) / 1000
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self):
        self._timer = None
        now = now_ms()
        self.core.handle_timer(now)
        self._events(now)
        self._flush(now)
        self._schedule()

    # -- status and control --------------------------------------------------------
    def counters(self):
        c = dict(self.core.stats)
        c.update(self.stats)
        if self.expired:
            c["expired"] = self.expired
        return c

    def status(self):
        now = now_ms()
        devices = []
        peers = self.core.peers
        for pub in peers:
            s = peers.peek(pub)         # a device never heard from has no Peer yet: a blank one, not kept
            d = s.info(now)
            d["public_key"] = pub.hex()
            pp = s.path_probe or {}
            d["paths"] = [dict({"link": a, "last_seen_ms_ago": ticks_diff(now, seen), "srtt_ms": s.path_rtt.get(a),
                                "probe_loss": round(pp[a][1], 4) if a in pp else None},
                               **(self.by_name[a].counters if a in self.by_name else {}))
                          for a, seen in sorted(s.paths.items(), key=lambda x: str(x[0]))]
            devices.append(d)
        st = {"gateway": self.cfg.name, "uptime_s": round(time.monotonic() - self._started, 1),
              "crypto": self.crypto.name, "dh_per_s": self.core.dh_per_s, "link_dh_per_s": self.core.link_dh_per_s,
              "devices": devices, "counters": self.counters()}
        if self.expiry:
            st["expiring"] = {n: utc_text(t) for n, t in sorted(self.expiry.items(), key=lambda x: x[1])[:20]}
        return st

    def _reload_cmd(self, req):
        ok, msg = self.reload()
        return {"ok": ok, "message": msg} if ok else {"ok": False, "error": msg}


async def serve(cfg, ready=None, server=None, sock=None):
    """Run a gateway (server: one already built, e.g. fleet mode's; sock:
    its socket, from a workers supervisor) until SIGTERM/SIGINT; returns the
    exit code (1 when its sockets cannot be opened, with one line on stderr)."""
    server = GatewayServer(cfg) if server is None else server
    try:
        await server.start(sock)
    except OSError as e:
        await server.stop(quiet=True)
        what = ("listen on %s" % cfg.listen if server._transport is None else
                "open the control channel on %s" % cfg.control if server._control is None and cfg.control else
                "serve metrics on %s" % cfg.metrics)
        print("microtun gateway: cannot %s: %s (is another gateway or PoP using it?)" % (what, e.strerror or e),
              file=sys.stderr)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    if ready:
        ready(server)
    await stop.wait()
    await server.stop()
    print(json.dumps({"gateway": cfg.name, "counters": server.counters()}), flush=True)
    return 0


def main(config_path, check=False, workers=None):
    """`microtun gateway --config FILE [--workers N] [--check]`; returns the exit code."""
    try:
        cfg = load_gateway_config(config_path)
    except ConfigError as e:
        print("microtun gateway: %s" % e, file=sys.stderr)
        return 2
    if workers is not None:
        cfg.workers = workers
    if cfg.workers > 1:
        from microtun_host import gateway_workers
        return gateway_workers.gateway_main(cfg, check)
    if check:
        print("%s: ok (%d links, %d devices)" % (config_path, len(cfg.links), len(cfg.devices)))
        return 0
    logs.setup("gateway", cfg.log_level)    # the logger this module writes to
    return asyncio.run(serve(cfg))



# --- `microtun status` ------------------------------------------------------------

def _ago(ms):
    if ms is None:
        return "never"
    s = ms / 1000
    return "%.1fs ago" % s if s < 120 else "%dm ago" % (s // 60)


def format_status(st):
    """A human table of a status() dict."""
    lines = ["gateway %s, up %ss%s" % (st["gateway"], st["uptime_s"],
                                      ", crypto %s" % st["crypto"] if st.get("crypto") else "")]
    lines.append("%-16s %-5s %-10s %-12s %-12s %s" % ("device", "up", "handshake", "rx", "tx",
                                                      "paths (link: last seen, srtt, packets, duplicates dropped)"))
    normal = NORMAL_COUNTERS
    for d in st["devices"]:
        paths = ", ".join("%s: %s, %s, rx %d dup %d" % (
            p["link"], _ago(p["last_seen_ms_ago"]), "-" if p["srtt_ms"] is None else "%dms" % p["srtt_ms"],
            p.get("rx_packets", 0), p.get("duplicates", 0)) for p in d["paths"])
        lines.append("%-16s %-5s %-10s %-12s %-12s %s" % (
            d["name"], "yes" if d["established"] else "no", _ago(d["last_handshake_ms_ago"]),
            "%d/%dB" % (d["rx_packets"], d["rx_bytes"]), "%d/%dB" % (d["tx_packets"], d["tx_bytes"]), paths or "-"))
        dc = {k: v for k, v in sorted(d.get("counters", {}).items()) if k not in normal}
        if dc:
            lines.append("%16s drops/events: %s" % ("", ", ".join("%s=%d" % kv for kv in dc.items())))
        if d.get("stale"):
            x = d["stale"]
            lines.append("%16s stale handshake %s: counter %d \u2264 %d (boot counter went backwards?)" % (
                "", _ago(x["last_ms_ago"]), x["counter"], x["gateway_counter"]))
    drops = {k: v for k, v in sorted(st["counters"].items()) if k not in normal}
    lines.append("counters: " + (", ".join("%s=%d" % kv for kv in drops.items()) or "no drops"))
    for w in st.get("workers", ()):         # a gateway run with workers (microtun_host.workers)
        lines.append("worker %d: pid %s, restarts %d%s, %s" % (
            w["index"], w.get("pid"), w.get("restarts", 0), " (last: %s)" % w["last_exit"] if w.get("last_exit") else "",
            "NOT ANSWERING: %s" % w["error"] if "error" in w else "%d sessions" % w.get("established", 0)))
    return "\n".join(lines)


def _is_pop_config(path):
    try:
        with open(path) as f:
            root = json.load(f)
    except (OSError, ValueError):
        return False                # load_gateway_config says what is wrong
    return isinstance(root, dict) and "routes" in root


def load_client_config(path):
    """What a client of a running gateway reads from its config (the control
    socket): a file-mode gateway.json, or a fleet-mode one (its "fleet"
    section; links and registry are in etcd)."""
    from microtun_host import fleet
    if fleet.wants_fleet(path):
        from microtun_host import fleetnode
        return fleetnode.gateway_local_config(path)
    return load_gateway_config(path)


def status_main(config_path=None, control_addr=None, as_json=False):
    """`microtun status --config gateway.json | --control ADDR [--json]`
    (a PoP's config, with "routes", is answered by workers.pop_status_main)."""
    if control_addr is None and _is_pop_config(config_path):
        from microtun_host import workers
        return workers.pop_status_main(config_path, as_json)
    if control_addr is None:
        try:
            cfg = load_client_config(config_path)
        except ConfigError as e:
            print("microtun status: %s" % e, file=sys.stderr)
            return 2
        if cfg.control is None:
            print("microtun status: %s: control: not set; add \"control\": \"gw.sock\" and restart the gateway"
                  % config_path, file=sys.stderr)
            return 2
        control_addr = str(cfg.control)
    try:
        reply = control.query(control_addr, {"cmd": "status"}, timeout=2.0)
    except control.ControlError as e:
        print("microtun status: %s (is the gateway running?)" % e, file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:      # a host name, a bad port, no such address family...
        print("microtun status: --control %s: %s" % (control_addr, getattr(e, "strerror", None) or e), file=sys.stderr)
        return 2
    if not reply.get("ok") or not isinstance(reply.get("status"), dict):
        print("microtun status: %s" % (reply.get("error") or "the reply holds no status: is %s a gateway?" % control_addr),
              file=sys.stderr)
        return 1
    print(json.dumps(reply["status"], indent=1) if as_json else format_status(reply["status"]))
    return 0


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(prog="python -m microtun_host.gateway")
    ap.add_argument("--config", required=True)
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args()
    sys.exit(main(a.config, a.check))
