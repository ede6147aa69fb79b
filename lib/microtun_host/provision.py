"""The provisioner: one topology file in, every key and config out
(docs/PROVISIONING.md).

    microtun provision topology.toml --out deploy/

writes

    deploy/state.json          keys and label allocations: what makes a re-run stable
    deploy/gateway.json        gateway config (its private key, one link per path)
    deploy/registry.json       devices the gateway accepts (public key, psk, channels)
    deploy/pops/<name>.json    one label table per PoP
    deploy/devices/<name>.json one compact config per device, to copy to the board

The model (MPLS-style, docs/PROVISIONING.md "Labels and keys"): a route is
a chain of PoPs; every (device, route) pair is a path with its own label at
every node in both directions. A label lives in the namespace of the node
that receives it and is identified in state.json by the path, the direction
and the neighbour that sends it, so a label survives a re-run as long as the
segment it travels on is unchanged. Hop keys: one per (device, route, first
PoP) for the device's link, one per node pair for every other link.

Layers: parse_topology (TOML -> Topology, every check with a one-line error)
-> plan (Topology + previous state -> file contents + new state, pure) ->
write (atomic, mode 0600). `provision()` runs all three.
"""
import argparse
import json
import os
import re
import shutil
import sys
import tempfile

try:
    import tomllib
except ImportError:                        # Python 3.10: the same parser, as the tomli package
    try:
        import tomli as tomllib            # pyproject.toml installs it there
    except ImportError:
        tomllib = None

from microtun import config as dconfig
from microtun import outer
from microtun.paths import POLICIES
from microtun_host import config as hconfig
from microtun_host.config import ConfigError
from microtun_host.control import is_socket_path

# --- limits -------------------------------------------------------------------
LABEL_FIRST = 100                # first label handed out in every namespace
LABEL_MAX = outer.LABEL_MAX      # 2^24 - 1 (outer header: 24-bit label)
MAX_DEVICE_PATHS = 8             # microtun.config.from_dict takes at most 8 paths
STATE_VERSION = 1
FILE_MODE = 0o600                # every file we write holds a key or a psk
DIR_MODE = 0o700
LOG_LEVELS = ("debug", "info", "warning", "error")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_NAME_RULE = "1..64 letters, digits, '.', '_' or '-', starting with a letter or digit (it becomes a file name)"

# Tokens for the two ends of a path in state ids; '*' is not allowed in names.
_DEVICE = "*device"
_GATEWAY = "*gateway"

STATE_FILE = "state.json"
GATEWAY_FILE = "gateway.json"
GATEWAY_STANDBY_FILE = "gateway-standby.json"   # [gateway] standby: the same identity on another address
REGISTRY_FILE = "registry.json"

# What a changed file asks of the running process. Both the gateway and a PoP
# re-read their whole config on SIGHUP (gateway.py GatewayServer.reload: links,
# services, registry; pop.py Pop.reload: the label table) but keep these
# fields until they are restarted.
RESTART_FIELDS_GATEWAY = ("listen", "private_key", "control")
RESTART_FIELDS_POP = ("listen", "control", "name")


# --- topology ---------------------------------------------------------------------

class Node:
    """The gateway or a PoP: name, listen, reach (what the previous hop sends
    to), control, and the optional fields copied into its config."""

    def __init__(self, name, listen, reach, control, extra, where):
        self.name = name
        self.listen = listen
        self.reach = reach
        self.control = control
        self.extra = extra
        self.where = where
        self.standby = None             # the gateway's standby address (config.Address), if any
        self.standby_control = None


class Route:
    def __init__(self, name, pops, via, where):
        self.name = name
        self.pops = pops                # [PoP names], device side first
        self.via = via                  # "host:port" the device sends to, or None
        self.where = where


class Device:
    def __init__(self, name, routes, channels, psk, extra, where):
        self.name = name
        self.routes = routes            # [route names]
        self.channels = channels        # [int] or None (all channels)
        self.psk = psk                  # bool
        self.extra = extra              # optional device-config fields, as given
        self.where = where


class Topology:
    def __init__(self, source, gateway, pops, routes, devices, services):
        self.source = source
        self.gateway = gateway
        self.pops = pops                # {name: Node}, in file order
        self.routes = routes            # {name: Route}
        self.devices = devices          # {name: Device}
        self.services = services        # {"1": "127.0.0.1:5000"}


def _read_toml(path):
    name = str(path)
    if tomllib is None:
        raise ConfigError("%s: reading TOML needs Python 3.11 or newer, or the tomli package on 3.10 "
                          "(pip install tomli)" % name)
    text = hconfig.read_text(path, "TOML")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("%s: not valid TOML: %s" % (name, e)) from None
    return hconfig.Node(name, "", doc)


def _name(node, key="name", default=None):
    v = node.text(key) if default is None else node.text(key, default)
    if not _NAME.match(v):
        raise node.error(key, "expected %s, got %s" % (_NAME_RULE, hconfig._short(v)))
    return v


def _tables(root, key, min_len=1):
    """The [[key]] array of tables."""
    v = root.value.get(key)
    if v is None:
        if min_len == 0:
            return []
        raise root.error(key, "missing; expected at least one [[%s]] table" % key)
    if not isinstance(v, list):
        raise root.error(key, "expected [[%s]] tables (double brackets), got %s" % (key, hconfig._kind(v)))
    return root.objects(key, min_len=min_len)


def _plain(node, key):
    """A table copied verbatim into a JSON config: only JSON types inside."""
    t = node.obj(key, None)
    if t is None:
        return None

    def check(v, where):
        if isinstance(v, dict):
            for k, x in v.items():
                check(x, "%s.%s" % (where, k))
        elif isinstance(v, list):
            for i, x in enumerate(v):
                check(x, "%s[%d]" % (where, i))
        elif not isinstance(v, (str, int, float, bool)):
            raise ConfigError("%s: %s: expected strings, numbers, booleans, lists or tables, got %s"
                              % (node.file, where, type(v).__name__))
    check(t.value, t.path)
    return t.value


def _node(n, kind, extra_fields):
    where = n.path
    name = _name(n) if kind == "pop" else _name(n, default="gateway")
    listen = n.address("listen")
    reach = n.address("reach", listen)
    if reach.host in ("0.0.0.0", "::"):
        raise n.error("reach" if n.has("reach") else "listen",
                      "%s is a wildcard address the previous hop cannot send to; set \"reach\" to the "
                      "address it should use" % reach)
    # The control channel: an owner-only unix socket next to the node's
    # config unless the topology says otherwise (docs/CONFIG.md).
    if n.has("control") and is_socket_path(n.value["control"]):
        control = n.value["control"]
    elif n.has("control"):
        control = n.address("control", None, loopback=True)
    else:
        control = name + ".sock"
    extra = {}
    for k in extra_fields:
        if not n.has(k):
            continue
        if k == "log_level":
            extra[k] = n.text(k, choices=LOG_LEVELS)
        elif k == "stats_interval":
            extra[k] = n.number(k, 0, 86400)
        elif k == "rekey_after_s":
            extra[k] = n.integer(k, 10, 86400)
        elif k == "window":
            extra[k] = n.integer(k, 64, 65536)
        elif k == "keepalive_s":
            extra[k] = n.integer(k, 1, 10)
        elif k in ("dh_per_s", "link_dh_per_s"):
            extra[k] = n.integer(k, 1, 1000000)
    return Node(name, listen, reach, control, extra, where)


def parse_topology(path):
    """Topology from a TOML file, or ConfigError naming the file, the field
    and what is expected. Checks everything a plan needs except label space."""
    root = _read_toml(path)
    root.only("gateway", "pop", "route", "device", "segment")
    if not isinstance(root.value.get("gateway"), dict):
        if "gateway" not in root.value:
            raise root.error("gateway", "missing; expected a [gateway] table")
        raise root.error("gateway", "expected one [gateway] table (single brackets), got %s"
                         % hconfig._kind(root.value["gateway"]))

    # gateway
    g = root.obj("gateway")
    g.only("name", "listen", "reach", "control", "services", "log_level", "rekey_after_s", "window", "keepalive_s",
           "standby", "standby_control", "operators", "pool", "dh_per_s", "link_dh_per_s")
    gateway = _node(g, "gateway", ("log_level", "rekey_after_s", "window", "keepalive_s", "dh_per_s", "link_dh_per_s"))
    if g.has("operators"):              # who may log in to the ops channel (docs/OPS.md)
        ops = g.items("operators")
        for i, k in enumerate(ops):
            if not isinstance(k, str) or len(k) != 64 or any(c not in "0123456789abcdefABCDEF" for c in k):
                raise g.error("operators[%d]" % i, "expected an Ed25519 public key, 64 hex characters "
                                                   "(`microtun fleet keygen --out KEYFILE` prints one)")
        gateway.extra["operators"] = [k.lower() for k in ops]
    gateway.pool = []                   # [[gateway.pool]]: more gateways of this identity (fleet mode)
    if g.has("standby"):
        # one gateway identity on two addresses: the last PoP of every route
        # probes both and sends to the one that answers (docs/DEPLOY.md)
        gateway.standby = g.address("standby")
        if gateway.standby in (gateway.listen, gateway.reach) or gateway.standby.host in ("0.0.0.0", "::"):
            raise g.error("standby", "expected the standby gateway's own address (not the primary's, not a "
                                     "wildcard), got %s" % gateway.standby)
        sc = g.raw("standby_control", "a socket path", gateway.name + "-standby.sock")
        if not is_socket_path(sc):
            raise g.error("standby_control", "expected a socket path such as \"gw-standby.sock\", got %r" % (sc,))
        gateway.standby_control = sc
    elif g.has("standby_control"):
        raise g.error("standby_control", "only with \"standby\"")
    services = {}
    svc = g.obj("services", None)
    if svc is not None:
        for k in svc.value:
            if k.startswith("_"):
                continue
            if not k.isdigit() or not 1 <= int(k) <= 255:
                raise svc.error(k, "expected a channel number 1..255 as the key (\"1\" = \"127.0.0.1:5000\")")
            services[str(int(k))] = str(svc.address(k))

    # PoPs
    pops = {}
    reach = {gateway.reach: "gateway." + ("reach" if g.has("reach") else "listen")}
    if gateway.standby is not None:
        reach[gateway.standby] = "gateway.standby"
    if g.has("pool"):
        # fleet mode: the same identity on more hosts; each device's paths end at one of those
        # alive, chosen by the PoPs (docs/FLEET.md, "Several gateways")
        if gateway.standby is not None:
            raise g.error("pool", "a gateway has a standby (probed by the PoPs) or a pool (fleet mode, "
                                  "chosen by lease), not both")
        names = {gateway.name}
        for n in _tables(g, "pool"):
            n.only("name", "listen", "reach", "control")
            m = _node(n, "pop", ())
            if m.name in names:
                raise n.error("name", "%s is already a gateway's name" % hconfig._short(m.name))
            key = "reach" if n.has("reach") else "listen"
            if m.reach in reach or m.reach == gateway.listen:
                raise n.error(key, "%s is already where %s is reached; every gateway needs its own address"
                              % (m.reach, reach.get(m.reach, "gateway.listen")))
            if m.reach.family != gateway.reach.family:
                raise n.error(key, "expected the family of the gateway's address (IPv%d), got %s"
                              % (gateway.reach.family, m.reach))
            reach[m.reach] = "%s.%s" % (n.path, key)
            names.add(m.name)
            gateway.pool.append(m)
    for n in _tables(root, "pop"):
        n.only("name", "listen", "reach", "control", "log_level", "stats_interval")
        p = _node(n, "pop", ("log_level", "stats_interval"))
        if p.name in pops:
            raise n.error("name", "%s is already the name of %s" % (hconfig._short(p.name), pops[p.name].where))
        if p.name == gateway.name or p.name in {m.name for m in gateway.pool}:
            raise n.error("name", "%s is already the %s name" % (hconfig._short(p.name), "gateway's" if
                                                                  p.name == gateway.name else "pool gateway's"))
        key = "reach" if n.has("reach") else "listen"
        if p.reach in reach:
            raise n.error(key, "%s is already where %s is reached; every node needs its own address"
                          % (p.reach, reach[p.reach]))
        reach[p.reach] = "%s.%s" % (n.path, key)
        pops[p.name] = p

    # routes
    routes = {}
    for n in _tables(root, "route"):
        n.only("name", "pops", "via")
        name = _name(n)
        if name in routes:
            raise n.error("name", "%s is already the name of %s" % (hconfig._short(name), routes[name].where))
        chain = n.items("pops", min_len=1)
        for i, pname in enumerate(chain):
            w = "pops[%d]" % i
            if not isinstance(pname, str) or pname not in pops:
                raise n.error(w, "unknown PoP %s (expected one of the [[pop]] names: %s)"
                              % (hconfig._short(pname) if isinstance(pname, str) else hconfig._kind(pname),
                                 ", ".join(pops)))
            if pname in chain[:i]:
                raise n.error(w, "PoP %s appears twice in this route (a loop)" % hconfig._short(pname))
        hops = [pops[x] for x in chain] + [gateway]
        for i in range(len(hops) - 1):
            w = "pops[%d]" % (i + 1) if i + 1 < len(chain) else "pops"
            # packets go both ways: a sends to b.reach from a.listen, b to a.reach from b.listen
            for a, b in ((hops[i], hops[i + 1]), (hops[i + 1], hops[i])):
                if b.reach.family != a.listen.family:
                    raise n.error(w, "%s listens on IPv%d (%s) but sends to %s, reached over IPv%d (%s); "
                                  "a node sends from its listen socket" % (
                                      a.name, a.listen.family, a.listen, b.name, b.reach.family, b.reach))
                if b.reach == a.listen:
                    raise n.error(w, "%s is reached at %s, the listen address of %s (its neighbour here)"
                                  % (b.name, b.reach, a.name))
        via = None
        if n.has("via"):
            via = n.text("via")
            try:
                dconfig.parse_hostport(via, "via")
            except dconfig.ConfigError:
                raise n.error("via", "expected \"host:port\" (IPv6 as \"[addr]:port\"), got %s"
                              % hconfig._short(via)) from None
        routes[name] = Route(name, list(chain), via, n.path)

    # devices
    devices = {}
    for n in _tables(root, "device"):
        n.only("name", "routes", "channels", "policy", "psk", "network", "app",
               "nat_keepalive_s", "window", "state_dir", "watchdog_s", "expires", "unresponsive_s", "ops",
               "update_operators")
        name = _name(n)
        if name in devices:
            raise n.error("name", "%s is already the name of %s" % (hconfig._short(name), devices[name].where))
        if n.has("routes"):
            rs = n.items("routes", min_len=1)
            for i, r in enumerate(rs):
                if not isinstance(r, str) or r not in routes:
                    raise n.error("routes[%d]" % i, "unknown route %s (expected one of the [[route]] names: %s)"
                                  % (hconfig._short(r) if isinstance(r, str) else hconfig._kind(r),
                                     ", ".join(routes)))
                if r in rs[:i]:
                    raise n.error("routes[%d]" % i, "route %s is listed twice" % hconfig._short(r))
            if len(rs) > MAX_DEVICE_PATHS:
                raise n.error("routes", "a device takes at most %d routes, got %d" % (MAX_DEVICE_PATHS, len(rs)))
        else:
            rs = list(routes)
            if len(rs) > MAX_DEVICE_PATHS:
                raise n.error("routes", "missing, so all %d routes, but a device takes at most %d; list them"
                              % (len(rs), MAX_DEVICE_PATHS))
        channels = None
        if n.has("channels"):
            channels = n.items("channels")
            for i, c in enumerate(channels):
                if isinstance(c, bool) or not isinstance(c, int) or not 1 <= c <= 255:
                    raise n.error("channels[%d]" % i, "expected a channel number 1..255, got %s" % hconfig._kind(c))
            channels = sorted(set(channels))
        psk = n.raw("psk", "true or false", True)
        if not isinstance(psk, bool):
            raise n.error("psk", "expected true or false, got %s" % hconfig._kind(psk))
        extra = {}
        if n.has("policy"):
            extra["policy"] = n.text("policy", choices=POLICIES)
        if n.has("nat_keepalive_s"):
            extra["nat_keepalive_s"] = n.integer("nat_keepalive_s", 5, 3600)
        if n.has("window"):
            extra["window"] = n.integer("window", 64, 65536)
        if n.has("state_dir"):
            extra["state_dir"] = n.text("state_dir")
        if n.has("network"):
            extra["network"] = _plain(n, "network")
        if n.has("app"):
            extra["app"] = _plain(n, "app")
        if n.has("watchdog_s"):
            extra["watchdog_s"] = n.integer("watchdog_s", 0, 3600)
        if n.has("unresponsive_s"):
            extra["unresponsive_s"] = n.integer("unresponsive_s", 0, 60)
        if n.has("ops"):                # the operations channel (docs/OPS.md): off unless asked for
            ops = n.raw("ops", "true or false")
            if not isinstance(ops, bool):
                raise n.error("ops", "expected true or false, got %s" % hconfig._kind(ops))
            if ops:
                extra["ops"] = True
        if n.has("update_operators"):    # keys whose signed releases the device installs (docs/UPDATE.md)
            ops = n.items("update_operators", min_len=1)
            for i, k in enumerate(ops):
                if not isinstance(k, str) or len(k) != 64 or any(c not in "0123456789abcdefABCDEF" for c in k):
                    raise n.error("update_operators[%d]" % i, "expected an Ed25519 public key (64 hex characters; "
                                  "`microtun fleet keygen` prints one)")
            extra["update"] = {"operators": [k.lower() for k in ops]}
        devices[name] = Device(name, list(rs), channels, psk, extra, n.path)
        devices[name].expires = None
        if n.has("expires"):            # fleet mode (docs/FLEET.md, "Credentials that expire")
            from microtun_host.changelog import parse_utc
            t = n.value["expires"]
            if hasattr(t, "strftime"):      # a TOML date-time
                t = t.strftime("%Y-%m-%dT%H:%M:%SZ")
            if parse_utc(t) is None:
                raise n.error("expires", "expected a UTC time \"YYYY-MM-DDTHH:MM:SSZ\", got %s" % hconfig._short(str(t)))
            devices[name].expires = t

    topo = Topology(root.file, gateway, pops, routes, devices, services)
    topo.segments = _segments(root, pops, routes)
    return topo


def _segments(root, pops, routes):
    """{frozenset((pop, pop)): {setting: value}} from the [[segment]] tables
    (LOOPS local recovery between two consecutive PoPs, docs/LOOPS.md)."""
    from microtun_host import segment
    neighbours = {frozenset(r.pops[i:i + 2]) for r in routes.values() for i in range(len(r.pops) - 1)}
    segs = {}
    for n in _tables(root, "segment", min_len=0):
        n.only("pops", *segment.SegConfig.FIELDS)
        pair = n.items("pops", min_len=2)
        if len(pair) != 2 or not all(isinstance(x, str) and x in pops for x in pair) or pair[0] == pair[1]:
            raise n.error("pops", "expected two different [[pop]] names, e.g. [\"a1\", \"a2\"], got %s"
                          % hconfig._short(pair))
        key = frozenset(pair)
        if key not in neighbours:
            raise n.error("pops", "%s and %s are not next to each other in any [[route]]; a segment joins two "
                          "consecutive PoPs" % tuple(pair))
        if key in segs:
            raise n.error("pops", "a segment between %s and %s is already defined" % tuple(pair))
        segment.SegConfig.from_node(n.__class__(n.file, n.path, {k: v for k, v in n.value.items() if k != "pops"}))
        segs[key] = {k: v for k, v in n.value.items() if k != "pops" and not k.startswith("_")}
    return segs


# --- state: keys and label allocations ----------------------------------------------

def _hex(b):
    return b.hex()


def _x25519_public(private):
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def _x25519_private():
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    return X25519PrivateKey.generate().private_bytes_raw()


class LabelSpaceExhausted(Exception):
    pass


class Labels:
    """Label allocations per namespace ("pop:a1", "gateway", "device:sensor-1").

    A label is handed out from a per-namespace counter that only moves
    forward, so a freed label (revoked device, re-spliced segment) is not
    handed out again until the counter wraps: a stale sender hits no route
    rather than somebody else's."""

    def __init__(self, saved):
        self.saved = saved              # ns -> {"next": n, "labels": {id: label}}
        self.next = {ns: v["next"] for ns, v in saved.items()}
        self.taken = {}                 # ns -> labels not to hand out in this run (old and new)
        self.used = {}                  # ns -> {id: label} asked for in this run
        self.used_labels = {}           # ns -> set(used[ns].values())

    def get(self, ns, ident):
        if ns not in self.used:
            old = self.saved.get(ns, {}).get("labels", {})
            self.taken[ns] = set(old.values())
            self.used[ns] = {}
            self.used_labels[ns] = set()
            self.next.setdefault(ns, LABEL_FIRST)
        label = self.saved.get(ns, {}).get("labels", {}).get(ident)
        if label is None or not LABEL_FIRST <= label <= LABEL_MAX or label in self.used_labels[ns]:
            label = self._allocate(ns)
        self.used[ns][ident] = label
        self.used_labels[ns].add(label)
        return label

    def _allocate(self, ns):
        taken = self.taken[ns]
        nxt = self.next[ns]
        cand = nxt if LABEL_FIRST <= nxt <= LABEL_MAX else LABEL_FIRST
        for _ in range(LABEL_MAX - LABEL_FIRST + 1):
            if cand not in taken:
                break
            cand = cand + 1 if cand < LABEL_MAX else LABEL_FIRST
        else:
            raise LabelSpaceExhausted("labels %d..%d are all in use" % (LABEL_FIRST, LABEL_MAX))
        taken.add(cand)
        self.next[ns] = cand + 1
        return cand

    def export(self):
        """Only what this run asked for; counters of namespaces still in use."""
        return {ns: {"next": self.next[ns], "labels": dict(sorted(used.items()))}
                for ns, used in sorted(self.used.items())}


class Keys:
    """32-byte secrets by id, reused when present in the previous state."""

    def __init__(self, saved):
        self.old = dict(saved)
        self.used = {}

    def get(self, ident, make=lambda: os.urandom(32)):
        k = self.used.get(ident)
        if k is None:
            k = self.old.get(ident) or make()
            self.used[ident] = k
        return k

    def export(self):
        return {k: _hex(v) for k, v in sorted(self.used.items())}


def load_state(path):
    """The previous run's state, or an empty one when the file is missing."""
    empty = {"exists": False, "gateway_key": None, "device_keys": {}, "psks": {}, "hop_keys": {}, "labels": {},
             "routes": {}, "pops": [], "devices": []}
    if not os.path.exists(path):
        return empty
    root = hconfig.load(path)
    root.only("version", "gateway", "devices", "hop_keys", "labels", "routes", "pops")
    root.integer("version", STATE_VERSION, STATE_VERSION)
    st = dict(empty, exists=True)
    st["gateway_key"] = root.obj("gateway").key32("private_key")
    devs = root.obj("devices")
    for name in devs.value:
        d = devs.obj(name)
        st["device_keys"][name] = d.key32("private_key")
        if d.value.get("psk") is not None:
            st["psks"][name] = d.key32("psk")
    st["devices"] = list(devs.value)
    hk = root.obj("hop_keys")
    st["hop_keys"] = {k: hk.key32(k) for k in hk.value}
    labels = root.obj("labels")
    for ns in labels.value:
        s = labels.obj(ns)
        nxt = s.integer("next", 1, LABEL_MAX + 1)
        lab = s.obj("labels")
        st["labels"][ns] = {"next": nxt, "labels": {k: lab.integer(k, 1, LABEL_MAX) for k in lab.value}}
    rt = root.obj("routes")
    st["routes"] = {k: rt.items(k) for k in rt.value}
    st["pops"] = [x for x in root.items("pops") if isinstance(x, str)]
    return st


# --- the plan: pure, from topology + state to file contents -----------------------------

class Path:
    """One (device, route) path with every label and key along it.

    fwd[i]: label P_i receives from its predecessor (P_i's namespace);
    rev[i]: label P_i receives from its successor; g: label the gateway
    receives from P_n; d: label the device receives from P_1."""

    def __init__(self, device, route):
        self.device = device
        self.route = route
        self.fwd = []
        self.rev = []
        self.g = None
        self.d = None
        self.device_key = None          # device <-> P_1
        self.link_keys = []             # [P_i <-> P_i+1 ..., P_n <-> gateway]


def _pair(a, b):
    return "~".join(sorted((a, b)))


def _json_compact(obj):
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def _json_pretty(obj, sort=False):
    return (json.dumps(obj, indent=1, sort_keys=sort) + "\n").encode()


def _json_table(obj):
    """A top-level object one field per line, and a list of objects (routes,
    links, devices) one entry per line: easy to read, easy to diff."""
    lines = []
    for k, v in obj.items():
        if isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            rows = ",\n".join("  " + json.dumps(x) for x in v)
            lines.append(" %s: [\n%s\n ]" % (json.dumps(k), rows))
        else:
            lines.append(" %s: %s" % (json.dumps(k), json.dumps(v)))
    return ("{\n" + ",\n".join(lines) + "\n}\n").encode()


def plan(topo, state):
    """({relative path: bytes}, new state dict, [Path]) for a topology.
    Raises ConfigError (naming the topology field) when a label space is full."""
    gw = topo.gateway
    labels = Labels(state["labels"])
    hop = Keys(state["hop_keys"])
    gateway_priv = state["gateway_key"] or _x25519_private()
    gateway_pub = _x25519_public(gateway_priv)
    dev_priv = Keys(state["device_keys"])
    psks = Keys(state["psks"])

    def label(ns, ident, dev, route):
        try:
            return labels.get(ns, ident)
        except LabelSpaceExhausted as e:
            raise ConfigError("%s: %s.routes: no label left for path %s/%s at %s (%s)" % (
                topo.source, dev.where, dev.name, route.name, ns.replace(":", " "), e)) from None

    paths = []
    for dev in topo.devices.values():
        for rname in dev.routes:
            r = topo.routes[rname]
            p = Path(dev, r)
            pid = "%s/%s" % (dev.name, r.name)
            chain = r.pops
            # walk forward, then back, so first-run numbers read in path order
            for i, pn in enumerate(chain):
                prev = chain[i - 1] if i else _DEVICE
                p.fwd.append(label("pop:" + pn, "%s:fwd:%s" % (pid, prev), dev, r))
            p.g = label("gateway", "%s:fwd:%s" % (pid, chain[-1]), dev, r)
            rev = []
            for i in reversed(range(len(chain))):
                nxt = chain[i + 1] if i + 1 < len(chain) else _GATEWAY
                rev.append(label("pop:" + chain[i], "%s:rev:%s" % (pid, nxt), dev, r))
            p.rev = rev[::-1]
            p.d = label("device:" + dev.name, "%s:rev:%s" % (r.name, chain[0]), dev, r)
            p.device_key = hop.get("%s@%s" % (pid, chain[0]))
            p.link_keys = [hop.get(_pair(chain[i], chain[i + 1])) for i in range(len(chain) - 1)]
            p.link_keys.append(hop.get(_pair(chain[-1], _GATEWAY)))
            paths.append(p)

    files = {}
    segs = getattr(topo, "segments", {})

    def seg(a, b):
        return segs.get(frozenset((a, b)))

    # PoP tables
    tables = {name: [] for name in topo.pops}
    for p in paths:
        chain = p.route.pops
        n = len(chain)
        for i, pn in enumerate(chain):
            in_key = p.device_key if i == 0 else p.link_keys[i - 1]
            out_key = p.link_keys[i]
            if i + 1 < n:
                nxt, out_label = topo.pops[chain[i + 1]].reach, p.fwd[i + 1]
            else:
                nxt, out_label = gw.reach, p.g
            fwd = {"in_label": p.fwd[i], "in_key": _hex(in_key), "next": str(nxt)}
            if i + 1 == n and gw.standby is not None:
                fwd["standby"] = str(gw.standby)
            fwd.update(out_label=out_label, out_key=_hex(out_key))
            rev = {}
            # LOOPS: the route into a segment is its ingress, the route out of it its egress
            if i > 0 and seg(chain[i - 1], pn):
                fwd["seg_in"] = rev["seg_out"] = seg(chain[i - 1], pn)
            if i + 1 < n and seg(pn, chain[i + 1]):
                fwd["seg_out"] = rev["seg_in"] = seg(pn, chain[i + 1])
            tables[pn].append(fwd)
            if i == 0:
                back, back_label = "learn:%d" % p.fwd[0], p.d
            else:
                back, back_label = str(topo.pops[chain[i - 1]].reach), p.rev[i - 1]
            tables[pn].append(dict({"in_label": p.rev[i], "in_key": _hex(out_key), "next": back,
                                    "out_label": back_label, "out_key": _hex(in_key)}, **rev))
    for name, pop in topo.pops.items():
        cfg = {"name": name, "listen": str(pop.listen)}
        if pop.control is not None:
            cfg["control"] = str(pop.control)
        cfg.update(pop.extra)
        cfg["routes"] = sorted(tables[name], key=lambda r: r["in_label"])
        files["pops/%s.json" % name] = _json_table(cfg)

    # gateway and registry
    gcfg = {"name": gw.name, "listen": str(gw.listen)}
    if gw.control is not None:
        gcfg["control"] = str(gw.control)
    gcfg["private_key"] = _hex(gateway_priv)
    gcfg["registry"] = REGISTRY_FILE
    gcfg["links"] = [{"name": "%s/%s" % (p.device.name, p.route.name), "in_label": p.g,
                      "reply_label": p.rev[-1], "key": _hex(p.link_keys[-1]),
                      "next": str(topo.pops[p.route.pops[-1]].reach)} for p in paths]
    gcfg["services"] = dict(topo.services)
    gcfg.update(gw.extra)
    files[GATEWAY_FILE] = _json_table(gcfg)
    if gw.standby is not None:
        scfg = dict(gcfg, listen=str(gw.standby), control=gw.standby_control)
        files[GATEWAY_STANDBY_FILE] = _json_table(scfg)

    registry = []
    dev_state = {}
    for dev in topo.devices.values():
        priv = dev_priv.get(dev.name, _x25519_private)
        psk = psks.get(dev.name) if dev.psk else None
        e = {"name": dev.name, "public_key": _hex(_x25519_public(priv))}
        if psk is not None:
            e["psk"] = _hex(psk)
        if dev.channels is not None:
            e["channels"] = dev.channels
        if dev.extra.get("ops"):
            e["ops"] = True
        if dev.expires:
            e["expires"] = dev.expires
        registry.append(e)
        dev_state[dev.name] = {"private_key": _hex(priv)}
        if psk is not None:
            dev_state[dev.name]["psk"] = _hex(psk)

        # device config: compact, only what the board needs
        dcfg = {"name": dev.name, "private_key": _hex(priv), "gateway_public_key": _hex(gateway_pub)}
        if psk is not None:
            dcfg["psk"] = _hex(psk)
        if dev.channels is not None:
            dcfg["channels"] = dev.channels       # the device refuses other channels itself
        dcfg["paths"] = [{"name": p.route.name,
                          "pop": p.route.via or str(topo.pops[p.route.pops[0]].reach),
                          "label": p.fwd[0], "rx_label": p.d, "hop_key": _hex(p.device_key)}
                         for p in paths if p.device is dev]
        dcfg.update(dev.extra)
        files["devices/%s.json" % dev.name] = _json_compact(dcfg)
    files[REGISTRY_FILE] = _json_table({"devices": registry})

    new_state = {
        "version": STATE_VERSION,
        "gateway": {"private_key": _hex(gateway_priv), "public_key": _hex(gateway_pub)},
        "devices": dev_state,
        "hop_keys": hop.export(),
        "labels": labels.export(),
        "routes": {name: r.pops for name, r in topo.routes.items()},
        "pops": list(topo.pops),
    }
    return files, new_state, paths


# --- writing --------------------------------------------------------------------------

def write_atomic(path, data, mode=FILE_MODE):
    """Write data to path through a temporary file in the same directory and
    a rename: a reader sees the old file or the new one, never half of it."""
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=d)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _check_loads(files, source):
    """Load every generated file with the loader its process uses, in a
    private scratch directory, before anything is written. A failure here is
    a provisioner bug or a topology case the checks above miss."""
    from microtun_host import gateway, pop
    scratch = tempfile.mkdtemp(prefix="microtun-provision-")
    try:
        for sub in ("pops", "devices"):
            os.mkdir(os.path.join(scratch, sub), DIR_MODE)
        for rel, data in files.items():
            fd = os.open(os.path.join(scratch, rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        for rel in files:
            full = os.path.join(scratch, rel)
            try:
                if rel.startswith("pops/"):
                    pop.load_config(full)
                elif rel.startswith("devices/"):
                    dconfig.load(full)
                elif rel in (GATEWAY_FILE, GATEWAY_STANDBY_FILE):
                    gateway.load_gateway_config(full)
            except (ConfigError, dconfig.ConfigError) as e:
                raise ConfigError("%s: the generated %s does not load (%s); please report this"
                                  % (source, rel, str(e).replace(scratch + os.sep, ""))) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- summary ----------------------------------------------------------------------------

class Summary:
    """What a run changed and what the operator must do about it."""

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.devices_added = []
        self.devices_removed = []       # revoked: gone from registry and every PoP table
        self.routes_added = []
        self.routes_removed = []
        self.routes_respliced = []      # (route, old pops, new pops)
        self.files_written = []         # relative to out_dir
        self.files_removed = []
        self.actions = []               # (process, action): "pop a1", "reload (SIGHUP)"
        self.devices_to_flash = []      # devices whose config file changed (new ones too)
        self.paths = 0
        self.labels_allocated = 0

    @property
    def changed(self):
        return bool(self.files_written or self.files_removed)

    def lines(self):
        out = []
        if not self.changed:
            return ["%s: up to date, nothing changed (%d paths)" % (self.out_dir, self.paths)]
        if self.devices_added:
            out.append("devices added: %s" % ", ".join(self.devices_added))
        if self.devices_removed:
            out.append("devices removed (revoked once the gateway and PoPs reload): %s"
                       % ", ".join(self.devices_removed))
        if self.routes_added:
            out.append("routes added: %s" % ", ".join(self.routes_added))
        if self.routes_removed:
            out.append("routes removed: %s" % ", ".join(self.routes_removed))
        for name, old, new in self.routes_respliced:
            out.append("route %s re-spliced: %s -> %s" % (name, " > ".join(old), " > ".join(new)))
        out.append("%d paths, %d new labels; wrote %d files in %s%s" % (
            self.paths, self.labels_allocated, len(self.files_written), self.out_dir,
            ": " + _files(self.files_written) if self.files_written else ""))
        if self.files_removed:
            out.append("removed: %s" % _files(self.files_removed))
        for proc, action in self.actions:
            out.append("%s: %s" % (proc, action))
        if self.devices_to_flash:
            out.append("devices needing their new config: %s" % ", ".join(self.devices_to_flash))
        else:
            out.append("devices: no new config needed")
        return out

    def __str__(self):
        return "\n".join(self.lines())


def _files(rels):
    """'state.json, pops/{a1,a2}.json, devices/{s1}.json': short for many files."""
    top = [r for r in rels if "/" not in r]
    for sub in ("pops", "devices"):
        names = [r[len(sub) + 1:-5] for r in rels if r.startswith(sub + "/")]
        if len(names) == 1:
            top.append("%s/%s.json" % (sub, names[0]))
        elif names:
            top.append("%s/{%s}.json" % (sub, ",".join(names)))
    return ", ".join(top)


def _json_or_none(data):
    try:
        return json.loads(data)
    except (TypeError, ValueError):
        return None


def _action(old, new, restart_fields):
    moved = [f for f in restart_fields if old.get(f) != new.get(f)]
    return "restart (%s changed)" % ", ".join(moved) if moved else "reload (SIGHUP)"


def _summarize(summary, topo, state, files, old_files, stale, paths, labels_allocated):
    summary.paths = len(paths)
    summary.labels_allocated = labels_allocated
    old_devices = state["devices"]
    summary.devices_added = [d for d in topo.devices if d not in old_devices]
    summary.devices_removed = [d for d in old_devices if d not in topo.devices]
    old_routes = state["routes"]
    summary.routes_added = [r for r in topo.routes if state["exists"] and r not in old_routes]
    summary.routes_removed = [r for r in old_routes if r not in topo.routes]
    summary.routes_respliced = [(r, old_routes[r], topo.routes[r].pops) for r in topo.routes
                                if r in old_routes and old_routes[r] != topo.routes[r].pops]
    summary.files_written = [rel for rel in files if files[rel] != old_files.get(rel)]
    summary.files_removed = list(stale)
    actions = []
    for name in topo.pops:
        rel = "pops/%s.json" % name
        old = old_files.get(rel)
        if old is None:
            actions.append(("pop " + name, "start (new config %s)" % rel))
        elif old != files[rel]:
            o, n = _json_or_none(old) or {}, json.loads(files[rel])
            actions.append(("pop " + name, _action(o, n, RESTART_FIELDS_POP)))
    for rel in stale:
        if rel.startswith("pops/"):
            actions.append(("pop " + rel[5:-5], "stop (no longer in the topology)"))
    if old_files.get(GATEWAY_FILE) is None:
        actions.append(("gateway", "start"))
    elif files[GATEWAY_FILE] != old_files[GATEWAY_FILE]:
        o, n = _json_or_none(old_files[GATEWAY_FILE]) or {}, json.loads(files[GATEWAY_FILE])
        actions.append(("gateway", _action(o, n, RESTART_FIELDS_GATEWAY)))
    elif files[REGISTRY_FILE] != old_files.get(REGISTRY_FILE):
        actions.append(("gateway", "reload (SIGHUP; registry changed)"))
    summary.actions = actions
    summary.devices_to_flash = [d for d in topo.devices
                                if files["devices/%s.json" % d] != old_files.get("devices/%s.json" % d)]


# --- entry points -----------------------------------------------------------------------

def provision(topology_path, out_dir):
    """Read the topology, reuse the keys and labels in out_dir/state.json,
    write every config into out_dir. Returns a Summary. Raises ConfigError
    (nothing written) for a bad topology or state file, OSError when the
    files cannot be written."""
    topo = parse_topology(topology_path)
    out_dir = str(out_dir)
    state_path = os.path.join(out_dir, STATE_FILE)
    state = load_state(state_path)
    files, new_state, paths = plan(topo, state)
    _check_loads(files, topo.source)

    state_bytes = _json_pretty(new_state, sort=True)
    old_files = {rel: _read(os.path.join(out_dir, rel)) for rel in files}
    old_files = {k: v for k, v in old_files.items() if v is not None}
    stale = ["devices/%s.json" % d for d in state["devices"] if d not in topo.devices]
    stale += ["pops/%s.json" % p for p in state["pops"] if p not in topo.pops]
    stale = [rel for rel in stale if os.path.exists(os.path.join(out_dir, rel))]

    summary = Summary(out_dir)
    labels_allocated = sum(1 for ns, v in new_state["labels"].items() for ident, lbl in v["labels"].items()
                           if state["labels"].get(ns, {}).get("labels", {}).get(ident) != lbl)
    _summarize(summary, topo, state, files, old_files, stale, paths, labels_allocated)

    for d in (out_dir, os.path.join(out_dir, "pops"), os.path.join(out_dir, "devices")):
        if not os.path.isdir(d):
            os.makedirs(d, DIR_MODE, exist_ok=True)
            os.chmod(d, DIR_MODE)
    # state first: if we stop half way, a re-run rebuilds the same files
    if _read(state_path) != state_bytes:
        write_atomic(state_path, state_bytes)
        summary.files_written.insert(0, STATE_FILE)
    for rel, data in files.items():
        full = os.path.join(out_dir, rel)
        if old_files.get(rel) != data:
            write_atomic(full, data)
        elif os.stat(full).st_mode & 0o777 != FILE_MODE:
            os.chmod(full, FILE_MODE)
    for rel in stale:
        os.unlink(os.path.join(out_dir, rel))
    summary.plan = (topo, files, paths)        # for publishing (fleet.py)
    return summary


def main(topology, out_dir, fleet_settings=None, operator_key=None):
    """`microtun provision TOPOLOGY --out DIR`: 0 ok, 2 bad topology (one
    line on stderr, nothing written), 1 when the files cannot be written."""
    from microtun_host import scratch
    scratch.catch_signals()          # the load check's scratch copy of the keys goes on SIGTERM too
    try:
        summary = provision(topology, out_dir)
    except ConfigError as e:
        print("microtun provision: %s" % e, file=sys.stderr)
        return 2
    except OSError as e:
        print("microtun provision: cannot write %s: %s" % (e.filename or out_dir, e.strerror or e), file=sys.stderr)
        return 1
    print(summary)
    if not fleet_settings and summary.plan[0].gateway.pool:
        print("note: [[gateway.pool]] is used in fleet mode only (--fleet; docs/FLEET.md): the files of "
              "file mode send every path to the gateway's own address")
    if fleet_settings or operator_key:
        from microtun_host import fleet
        return fleet.provision_publish(summary, topology, out_dir, fleet_settings, operator_key)
    return 0


def add_arguments(p):
    p.add_argument("topology", metavar="TOPOLOGY", help="topology file (TOML, see docs/PROVISIONING.md)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory; its state.json keeps keys and labels stable across runs")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m microtun_host.provision",
                                 description="Generate every key and config from a topology file.")
    add_arguments(ap)
    a = ap.parse_args()
    sys.exit(main(a.topology, a.out))
