"""The node side of fleet mode (docs/FLEET.md): a PoP or gateway whose
configuration is the signed change log in etcd, followed live.

    microtun pop --config deploy/fleet/pops/a1.json          # cli.py: a config with a "fleet" section
    microtun gateway --config deploy/fleet/gateway.json

Follower (one per node) verifies the log and hands each batch to the node's
event loop; FleetPop and FleetGateway apply it through the paths file mode
uses too (Forwarder.swap, GatewayServer._set_links and _register). The
writer's side, the operator commands and the log's layout are in fleet.py;
choosing the gateway a device's paths end at, in gwpool.py.

Threads: a Follower runs two threads (watch + health/lease), three on a PoP
(+ the gateways' leases), that talk to etcd with blocking HTTP; verified
state goes to the node's event loop with call_soon_threadsafe.
"""
import asyncio
import gc
import json
import logging
import os
import re
import sys
import threading
import time

from microtun_host import changelog, config as hconfig, gwpool
from microtun_host import log as logs
from microtun_host.changelog import Chain
from microtun_host.config import ConfigError, Node
from microtun_host.etcd import EtcdError
from microtun_host.fleet import Settings, iter_log, _json, _log_prefix

HEALTH_EVERY_S = 1.0        # etcd is asked this often whether it is there (and the lease kept)
RETRY_MAX_S = 2.0           # reconnect back-off ceiling
BULK_LINES = 20             # more device changes than this in one batch: one summary line, not one each


# --- the node side: follow the log ------------------------------------------------------

class Follower:
    """Keeps a node's state in step with the log in etcd.

    on_state(state, seq, touched) runs on the node's event loop after every
    batch of verified records (touched: {state key they changed: its new
    value, None when deleted}; None for "everything in state"). Keys under
    a `thin` prefix are kept in state as THIN only, their value handed over
    in touched once: the gateway's registry is its copy of devices/. A lost etcd changes nothing the node runs: it says
    so once (log + status) and resyncs when etcd answers again."""

    def __init__(self, settings, role, name, listen, on_state, log, on_gateways=None, thin=()):
        self.s = settings
        self.thin = tuple(thin)
        self.on_gateways = on_gateways      # PoPs: called on the loop with {name: alive value} of the gateways
        self.role = role
        self.name = name
        self.listen = listen
        self.on_state = on_state
        self.log = log
        self.chain = Chain(settings.trusted)
        self.state = {}
        self.create_rev = 0         # create revision of the last log key read
        self.connected = False
        self.lost_since = None
        self.last_error = None
        self.applied = 0            # seq the node applied (set from the loop)
        self.apply_ms = []          # the last 20: records in from etcd -> applied, ms
        self.applied_at = None      # time.monotonic() of the last apply (one clock for every process of a host)
        self.resyncs = 0
        self._loop = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._watch = None
        self._gw_watch = None
        self._threads = []
        self._lock = threading.Lock()
        self._reported = -1
        self.client = settings.client()

    # -- lifecycle --
    def load_cache(self):
        """Replay the verified records a previous run saved (fleet "cache"):
        a node that starts while etcd is down serves its last good config.
        Returns what they touched (on_state's argument), None without a cache."""
        if not self.s.cache:
            return None
        touched = {}
        recs = changelog.FileLog(self.s.cache).records()
        for rec in recs:
            ok, reason, msg = self.chain.check(rec)
            if not ok:
                if reason:
                    self.log.error("fleet cache %s: record %s refused (%s: %s); ignoring the rest",
                                   self.s.cache, rec.get("seq", "?") if isinstance(rec, dict) else "?", reason, msg)
                break
            self.chain.accept(rec)
            touched.update(_apply_compact(self.state, rec, self.thin))
        return touched if self.chain.seq else None

    def start(self, loop):
        self._loop = loop
        fns = (self._watch_thread, self._health_thread) + ((self._gateways_thread,) if self.on_gateways else ())
        for fn in fns:
            t = threading.Thread(target=fn, name="fleet-" + fn.__name__.strip("_"), daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self):
        self._stop.set()
        self._wake.set()
        for w in (self._watch, self._gw_watch):
            if w is not None:
                w.close()
        for t in self._threads:
            t.join(3)
        try:
            self.client.delete("%salive/%s/%s" % (self.s.prefix, self.role, self.name))
        except EtcdError:
            pass

    def report(self, seq):
        """Called on the loop after the node applied up to seq."""
        self.applied = seq
        self._wake.set()

    def status(self):
        return {"etcd": "connected" if self.connected else "lost", "endpoints": self.s.endpoints,
                "lost_for_s": None if self.lost_since is None else round(time.monotonic() - self.lost_since, 1),
                "last_error": self.last_error, "log_seq": self.chain.seq, "applied_seq": self.applied,
                "refused": {k: v for k, v in self.chain.refused.items() if v}, "resyncs": self.resyncs,
                "apply_ms": self.apply_ms, "applied_at_monotonic": self.applied_at}

    # -- connection state --
    def _ok(self):
        with self._lock:
            if not self.connected:
                if self.lost_since is not None:
                    self.log.info("fleet: etcd %s answers again after %.1f s: resynced to log record %d",
                                  self.s.endpoints[0], time.monotonic() - self.lost_since, self.chain.seq)
                self.connected = True
                self.lost_since = None

    def _lost(self, e):
        with self._lock:
            self.last_error = str(e)
            if self.connected or self.lost_since is None:
                self.log.warning("fleet: etcd unreachable (%s): %s; retrying", e,
                                 "forwarding goes on with the configuration of log record %d" % self.applied
                                 if self.applied else "no configuration yet (no cache file with records)")
                self.lost_since = time.monotonic()
            self.connected = False
        w = self._watch
        if w is not None:
            w.close()

    # -- records --
    def _take(self, items, wait=False):
        """Verify and apply records (key, create_rev, rec); post one batch to
        the loop. wait: until the loop applied it (a resync, page by page:
        memory holds one page of records, not the whole log)."""
        t_in = time.monotonic()
        accepted = []
        last = self.chain.seq
        for key, crev, rec in items:
            self.create_rev = max(self.create_rev, crev)
            if rec is None:
                self._refuse(key, "malformed", "not JSON")
                continue
            ok, reason, msg = self.chain.check(rec)
            if ok:
                self.chain.accept(rec)
                accepted.append(rec)
            elif reason:
                self._refuse(key, reason, msg)
        if self.chain.seq != last:
            # verified here; applied to the state on the loop, which owns it (no copy per record)
            done = threading.Event()
            self._loop.call_soon_threadsafe(self._apply, accepted, self.chain.seq, t_in, done)
            if self.s.cache:        # after the node has the records: the fsync is not on the way
                cache = changelog.FileLog(self.s.cache)
                for rec in accepted:
                    cache.append(rec)
            while wait and not done.wait(0.5) and not self._stop.is_set():
                pass

    def _apply(self, records, seq, t_in, done=None):
        """On the loop: the verified records change the state, the node
        applies it; the time from the records' arrival from etcd to applied
        is kept (status "apply_ms")."""
        try:
            touched = {}
            for rec in records:
                touched.update(_apply_compact(self.state, rec, self.thin))
            self.on_state(self.state, seq, touched)
            self.applied_at = time.monotonic()
            self.apply_ms = [round((self.applied_at - t_in) * 1000, 2)] + self.apply_ms[:19]
        finally:
            if done is not None:
                done.set()

    def _refuse(self, key, reason, msg):
        self.chain.refuse(reason)
        n = self.chain.refused[reason]
        if n <= 5 or n % 100 == 0:      # a flood of forgeries is a count, not a flood of lines
            self.log.error("fleet: log record %s refused (%s): %s; nothing applied from it (%d refused so far%s)",
                           key, reason, msg, n, "" if n <= 5 else ", one line per 100 from now on")

    def _watch_thread(self):
        delay = 0.1
        first = True
        while not self._stop.is_set():
            try:
                rev = 0
                for items, rev in iter_log(self.client, self.s.prefix, self.create_rev):
                    self._take(items, wait=True)
                if not first:
                    self.resyncs += 1
                first = False
                self._ok()
                delay = 0.1
                self._watch = self.client.watch(_log_prefix(self.s.prefix), prefix=True, start_revision=rev + 1)
                if self._stop.is_set():
                    break
                for events in self._watch:
                    self._take([(kv.key, kv.create_revision, _json(kv.value))
                                for kind, kv in events if kind == "PUT" and kv.create_revision == kv.mod_revision])
            except EtcdError as e:
                if self._stop.is_set():
                    break
                self._lost(e)
                self._stop.wait(delay)
                delay = min(RETRY_MAX_S, delay * 2)
            finally:
                self._watch = None

    def _gateways_thread(self):
        """PoPs: the gateways holding a lease (alive/gateways/*), read whole
        and then followed; each change goes to on_gateways on the loop. While
        etcd is away the PoP keeps the last set it saw (nothing moves)."""
        pre = self.s.prefix + "alive/gateways/"
        delay = 0.1
        while not self._stop.is_set():
            try:
                kvs, rev, _ = self.client.range(pre, prefix=True)
                alive = {kv.key[len(pre):]: _json(kv.value) for kv in kvs}
                self._loop.call_soon_threadsafe(self.on_gateways, dict(alive))
                delay = 0.1
                self._gw_watch = self.client.watch(pre, prefix=True, start_revision=rev + 1)
                if self._stop.is_set():
                    break
                for events in self._gw_watch:
                    for kind, kv in events:
                        if kind == "PUT":
                            alive[kv.key[len(pre):]] = _json(kv.value)
                        else:
                            alive.pop(kv.key[len(pre):], None)
                    self._loop.call_soon_threadsafe(self.on_gateways, dict(alive))
            except EtcdError:
                if self._stop.is_set():
                    break
                self._stop.wait(delay)          # the log watch and the health check report the outage
                delay = min(RETRY_MAX_S, delay * 2)
            finally:
                self._gw_watch = None

    def _health_thread(self):
        lease = None
        next_keepalive = 0.0
        alive = "%salive/%s/%s" % (self.s.prefix, self.role, self.name)
        since = changelog.utc_text()
        ttl = self.s.lease_s
        every = min(HEALTH_EVERY_S, ttl / 4)       # a short lease is renewed four times per TTL
        while not self._stop.is_set():
            self._wake.wait(every)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                now = time.monotonic()
                if lease is None:
                    lease = self.client.lease_grant(ttl)
                    self._reported = -1
                    next_keepalive = now + ttl / 4
                elif now >= next_keepalive:
                    if self.client.lease_keepalive(lease) <= 0:
                        lease = None
                        continue
                    next_keepalive = now + ttl / 4
                else:
                    self.client.range(self.s.prefix + "head")      # still there?
                if self._reported != self.applied:
                    seq = self.applied
                    self.client.put(alive, json.dumps({"seq": seq, "listen": self.listen, "since": since}), lease)
                    self._reported = seq
                if not self.connected and self._watch is None:
                    pass        # the watch thread reconnects on its own schedule
            except EtcdError as e:
                lease = None
                self._lost(e)


THIN = b""      # a state key whose value went to the node and is not kept (Follower's thin)


def _apply_compact(state, rec, thin=()):
    """changelog.apply_changes, each value kept as its canonical JSON bytes
    (a third of the dicts), or as THIN under a thin prefix. Returns
    {key: new value (parsed), or None when deleted}."""
    touched = {}
    for c in rec["changes"]:
        k = c["key"]
        if c["op"] == "put":
            state[k] = THIN if thin and k.startswith(thin) else changelog.canonical(c["value"])
            touched[k] = c["value"]
        else:
            state.pop(k, None)
            touched[k] = None
    return touched


def _val(v):
    """A state value: parsed when it is kept as JSON bytes (a node's state)."""
    return json.loads(v) if isinstance(v, (bytes, str)) else v


# --- node configs from the state -----------------------------------------------------

FROM_ETCD = ("routes", "links", "services", "registry")


def _local(path):
    """The node's local file (without "fleet") and its Settings."""
    root = hconfig.load(path)
    s = Settings(root.obj("fleet"), os.path.dirname(os.path.abspath(path)))
    for k in FROM_ETCD:
        if root.has(k):
            raise root.error(k, "comes from etcd in fleet mode (the \"fleet\" section is set): remove it here, "
                                "or remove \"fleet\" to run from files")
    local = {k: v for k, v in root.value.items() if k != "fleet"}
    return local, s


def gateway_local_config(path):
    """A fleet gateway's GatewayConfig from its local file alone (no links,
    services or registry: those are in etcd): what a client of the gateway
    (`microtun ops`, `microtun status`) needs, its control socket."""
    from microtun_host import gateway
    local, _ = _local(path)
    return gateway.GatewayConfig(Node(path, "", dict(local, links=[], services={})), devices=[])


def pop_routes(state, name, pool=None):
    """The route entries of PoP `name`; with a gwpool.Pool, the last hops
    go to each device's chosen gateway."""
    out = []
    pre = "routes/%s/" % name
    for k in sorted(k for k in state if k.startswith(pre)):
        device = k.split("/")[2] if k.count("/") == 3 else None
        v = _val(state[k])
        for e in (v if isinstance(v, list) else [v]):       # load_config names the field that is wrong
            out.append((device, e))
    return pool.steer(out) if pool is not None else [e for _, e in out]


def pop_config(path, local, state, seq, pool=None):
    from microtun_host import pop
    merged = dict(local, routes=pop_routes(state, local.get("name"), pool))
    return pop.load_config(path, root=Node("%s + fleet log record %d" % (path, seq), "", merged))


_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_ENTRY_FIELDS = frozenset(("name", "public_key", "psk", "channels", "expires"))


class _Entry:
    __slots__ = ("name", "public_key", "psk", "channels", "expires")


def _fast_entry(v):
    """The common, well-formed entry without the field-by-field walk (a
    100,000-device registry at start-up); None sends it the slow way, which
    names what is wrong."""
    if type(v) is not dict or not _ENTRY_FIELDS.issuperset(v):
        return None
    name, pk, psk, ch = v.get("name"), v.get("public_key"), v.get("psk"), v.get("channels")
    if type(name) is not str or not name.strip() or type(pk) is not str or not _HEX64.fullmatch(pk):
        return None
    if psk is not None and (type(psk) is not str or not _HEX64.fullmatch(psk)):
        return None
    if ch is not None and not (type(ch) is list and all(type(c) is int and 1 <= c <= 255 for c in ch)):
        return None
    e = _Entry()
    e.name, e.public_key, e.psk, e.channels = name, bytes.fromhex(pk), None if psk is None else bytes.fromhex(psk), ch
    e.expires = None
    if "expires" in v:
        e.expires = changelog.parse_utc(v["expires"])
        if e.expires is None:
            return None
    return e


def device_entry(key, value, seq):
    """A gateway DeviceEntry from devices/<name> (with "expires", in seconds since the epoch or None)."""
    e = _fast_entry(value)
    if e is not None:
        return e
    from microtun_host import gateway
    where = "fleet log record %d: %s" % (seq, key)
    if not isinstance(value, dict):
        raise ConfigError("%s: expected an object {...}" % where)
    return gateway.DeviceEntry(Node(where, "", value))


# --- fleet PoP ------------------------------------------------------------------------------

def run_pop(path, check=False):
    from microtun_host import pop
    try:
        local, settings = _local(path)
        cfg = pop_config(path, local, {}, 0)
    except ConfigError as e:
        print("microtun pop: %s" % e, file=sys.stderr)
        return 2
    if check:
        print("%s: ok: PoP %s in fleet mode (etcd %s)" % (path, cfg.name, ", ".join(settings.endpoints)))
        return 0
    log = logs.setup(cfg.name, cfg.log_level)

    class FleetPop(pop.Pop):
        def __init__(self):
            super().__init__(cfg, log)
            self.pool = gwpool.Pool(log)        # several gateways: which one each device's last hop goes to
            self.follower = Follower(settings, "pops", cfg.name, str(cfg.listen), self.apply, log,
                                     on_gateways=self.on_gateways)
            self.config_errors = 0
            self.state = {}
            self.seq = 0

        def apply(self, state, seq, touched):
            self.state, self.seq = state, seq
            pre = "routes/%s/" % self.cfg.name
            pool_moved = False
            if touched is None or any(k.startswith("gateways/") for k in touched):
                pool_moved = self.pool.members_from(state, seq)
            if touched is not None and not pool_moved and not any(k.startswith(pre) for k in touched):
                self.follower.report(seq)
                return
            if self._rebuild("log record %d applied" % seq):
                self.follower.report(seq)

        def on_gateways(self, alive):
            """The gateways holding a lease changed (Follower's watch)."""
            if self.pool.alive_from(alive, self.seq):
                self._rebuild("gateways alive: %s" % (", ".join(sorted(self.pool.live)) or "none"))

        def _rebuild(self, why):
            try:
                new = pop_config(path, local, self.state, self.seq, self.pool)
            except ConfigError as e:
                self.config_errors += 1
                log.error("fleet: %s; keeping the running %d routes", e, len(self.fwd.routes))
                return False
            added, removed, changed = self.fwd.swap(pop.build_table(new.routes))
            self.cfg.routes = new.routes
            self._watch_next_hops(asyncio.get_running_loop(), new.routes)
            self.reloads += 1
            log.info("fleet: %s: %d routes (%d added, %d removed, %d changed)",
                     why, len(new.routes), added, removed, changed)
            return True

        def reload(self, why="reload"):
            self.apply(self.state, self.seq, None)
            return {"ok": True, "routes": len(self.fwd.routes), "fleet": self.follower.status()}

        def _cmd_stats(self, req):
            s = super()._cmd_stats(req)
            s["fleet"] = dict(self.follower.status(), config_errors=self.config_errors)
            if self.pool.members:
                pre = "routes/%s/" % self.cfg.name
                s["fleet"]["gateways"] = self.pool.status(
                    {k.split("/")[2] for k in self.state if k.startswith(pre) and k.count("/") == 3}
                    if self.pool.steering() else ())
            return s

        async def run(self):
            if self.follower.load_cache() is not None:
                self.apply(dict(self.follower.state), self.follower.chain.seq, None)
                log.info("fleet: %d log records from the cache %s", self.follower.chain.seq, settings.cache)
            self.follower.start(asyncio.get_running_loop())
            try:
                return await super().run()
            finally:
                await asyncio.get_running_loop().run_in_executor(None, self.follower.stop)

    loop = pop._new_loop()
    try:
        return loop.run_until_complete(FleetPop().run())
    finally:
        loop.close()


# --- fleet gateway ------------------------------------------------------------------------------

def make_gateway_server(path, local, settings, log):
    from microtun_host import gateway

    class FleetGateway(gateway.GatewayServer):
        """A gateway whose links, services and registry follow the log.
        Device changes apply one by one (a single change in a registry of
        100,000 costs one add_peer/remove_peer); an entry with "expires"
        is removed at that moment, its sessions closed."""

        def __init__(self, cfg):
            super().__init__(cfg)
            # devices/ values go straight into the registry (GatewayServer.core.peers), not kept twice
            self.follower = Follower(settings, "gateways", cfg.name, str(cfg.listen), self.apply, log,
                                     thin=("devices/",))
            self.config_errors = 0
            self.state = {}
            self.seq = 0

        def apply(self, state, seq, touched):
            """touched None (a reload): links and services again; the
            registry holds every device entry already (they apply as their
            records arrive)."""
            self.state, self.seq = state, seq
            full = touched is None
            if full or any(k.startswith("links/") or k == "services" for k in touched):
                try:
                    cfg = gateway.GatewayConfig(Node("%s + fleet log record %d" % (path, seq), "", dict(
                        local, links=[_val(state[k]) for k in sorted(state) if k.startswith("links/")],
                        services=_val(state.get("services", b"{}")))), devices=[])
                except ConfigError as e:
                    self.config_errors += 1
                    log.error("fleet: %s; keeping the running links and services", e)
                else:
                    self._set_links(cfg.links, time.monotonic())
                    if cfg.services != self.cfg.services:
                        for t in list(self._services.values()):
                            t.close()
                        self._services.clear()
                    self.cfg.services = cfg.services
                    self.cfg.links = cfg.links
            keys = [] if full else [k for k in touched if k.startswith("devices/")]
            quiet = len(keys) > BULK_LINES
            before = len(self.core.peers)
            for k in keys:
                self._device(k, touched[k], seq, quiet)
            if quiet:
                log.info("fleet: log record %d: %d device entries applied (%d registered before, %d now)",
                         seq, len(keys), before, len(self.core.peers))
                # the registry is long-lived: keep the cyclic GC from walking it again and again
                # (a full collection over 100,000 devices costs tens of ms on every later change)
                gc.collect()
                gc.freeze()
            self._arm_expiry()
            log.info("fleet: log record %d applied: %d links, %d devices", seq, len(self.links), len(self.core.peers))
            self.follower.report(seq)

        def _device(self, key, value, seq, quiet=False):
            name = key[len("devices/"):]
            old = self.names.get(name)
            if value is None:
                self.expiry.pop(name, None)
                if old is not None:
                    self._remove(name, old, "revoked (fleet log record %d)" % seq)
                return
            try:
                e = device_entry(key, _val(value), seq)
                if e.name != name:
                    raise ConfigError("fleet log record %d: %s: name: %r does not match the key" % (seq, key, e.name))
            except ConfigError as err:
                self.config_errors += 1
                log.error("fleet: %s; device %s keeps its previous entry", err, name)
                return
            if old is not None and old != e.public_key:
                self._remove(name, old, "re-keyed (fleet log record %d)" % seq)
            self._register(e, quiet)

        def reload(self):
            self.apply(self.state, self.seq, None)
            return True, "fleet: re-applied log record %d" % self.seq

        def status(self):
            st = super().status()
            st["fleet"] = dict(self.follower.status(), config_errors=self.config_errors, expired=self.expired,
                               expiring={n: changelog.utc_text(t) for n, t in sorted(self.expiry.items())[:20]})
            return st

        def counters(self):
            c = super().counters()
            c["fleet_refused"] = sum(self.follower.chain.refused.values())
            c["fleet_config_errors"] = self.config_errors
            c["fleet_expired"] = self.expired
            return c

        def extra_commands(self):
            # `fleet`: the follower's status without status's list of every device
            return {"fleet": lambda req: {"fleet": dict(self.follower.status(), config_errors=self.config_errors,
                                                        devices=len(self.core.peers))}}

        async def start(self, sock=None):
            await super().start(sock)
            touched = self.follower.load_cache()
            if touched is not None:
                self.apply(self.follower.state, self.follower.chain.seq, touched)
                log.info("fleet: %d log records from the cache %s", self.follower.chain.seq, settings.cache)
            self.follower.start(asyncio.get_running_loop())
            self._arm_expiry()

        async def stop(self, quiet=False):
            await asyncio.get_running_loop().run_in_executor(None, self.follower.stop)
            await super().stop(quiet=quiet)

    cfg = gateway.GatewayConfig(Node(path, "", dict(local, links=[], services={})), devices=[])
    return FleetGateway(cfg)


def run_gateway(path, check=False):
    from microtun_host import gateway
    try:
        local, settings = _local(path)
        cfg = gateway_local_config(path)
    except ConfigError as e:
        print("microtun gateway: %s" % e, file=sys.stderr)
        return 2
    if check:
        print("%s: ok: gateway %s in fleet mode (etcd %s)" % (path, cfg.name, ", ".join(settings.endpoints)))
        return 0
    logs.setup("gateway", cfg.log_level)       # the logger gateway.py writes to
    server = make_gateway_server(path, local, settings, logging.getLogger("microtun.gateway"))

    async def go():
        return await gateway.serve(cfg, server=server)
    return asyncio.run(go())
