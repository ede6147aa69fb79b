"""Fleet mode (docs/FLEET.md): PoPs and gateways take their configuration
from etcd and follow it live; the configuration IS the signed change log
(changelog.py), replayed and verified by every node.

    microtun fleet keygen --out operator.key                 # prints the public key to trust
    microtun provision topo.toml --out deploy --fleet fleet.json --operator-key operator.key
    microtun pop --config deploy/fleet/pops/a1.json          # a config with a "fleet" section
    microtun gateway --config deploy/fleet/gateway.json
    microtun fleet revoke s1 --fleet fleet.json --operator-key operator.key
    microtun fleet expire s2 --at 2026-12-31T00:00:00Z ...   # renew: the same with a later time
    microtun fleet status --fleet fleet.json                 # the nodes alive and the record each applied
    microtun log --fleet fleet.json [--device s1]            # the history, verified

Store layout under the prefix (default /microtun/):

    log/<seq:012d>.<hash:16>    one signed record (changelog.py); the only thing nodes trust
    head                        {"seq", "hash"}: the writers' compare-and-swap point (not trusted)
    alive/<role>/<name>         {"seq", "listen", "since"} under a 5 s lease: who is up, what it applied

The state a record's changes build (keys of the replayed log):

    devices/<device>                 registry entry {name, public_key, psk?, channels?, expires?}
    routes/<pop>/<device>/<route>    that path's two label-table entries at that PoP
    links/<device>/<route>           the gateway's link for that path
    services                         {"1": "127.0.0.1:5000", ...}
    gateways/<gateway>               {"reach": "host:port"}: the gateways a path may end at (gwpool.py)

This module is the writer's side (Store, publish_plan), the operator
commands (`microtun fleet`, `microtun log`, `provision --fleet`) and the
settings; the nodes that follow the log are in fleetnode.py, the choice of
a device's gateway in gwpool.py.
"""
import json
import os
import sys
import time

from microtun_host import changelog, config as hconfig, gwpool
from microtun_host.changelog import Chain, LogError
from microtun_host.config import ConfigError
from microtun_host.etcd import Client, EtcdError

DEFAULT_PREFIX = "/microtun/"
LEASE_TTL_S = 5             # an alive key disappears this long after its node stops (fleet "lease_s")
SYNC_PAGE = 200             # records per range request on a resync, at most ...
PAGE_BYTES = 1 << 20        # ... fewer while pages carry more than this (a record holds up to 2,000 changes)
FLEET_FIELDS = ("endpoints", "prefix", "trusted_operators", "user", "password_file", "ca_file", "cert_file",
                "key_file", "cache", "timeout_s", "lease_s")


# --- settings -------------------------------------------------------------------------

class Settings:
    """A config's "fleet" section (or a fleet.json holding only that)."""

    def __init__(self, node, base):
        node.only(*FLEET_FIELDS)
        eps = node.items("endpoints", min_len=1)
        for i, e in enumerate(eps):
            if not isinstance(e, str) or not (e.startswith("http://") or e.startswith("https://")):
                raise node.error("endpoints[%d]" % i, "expected \"http://host:port\" or \"https://host:port\"")
        self.endpoints = list(eps)
        self.prefix = node.text("prefix", DEFAULT_PREFIX)
        if not self.prefix.endswith("/"):
            raise node.error("prefix", "expected a prefix ending in \"/\", e.g. \"/microtun/\"")
        trusted = node.items("trusted_operators", min_len=1)
        for i, k in enumerate(trusted):
            if not isinstance(k, str) or len(k) != 64 or any(c not in "0123456789abcdefABCDEF" for c in k):
                raise node.error("trusted_operators[%d]" % i, "expected an Ed25519 public key (64 hex characters; "
                                 "`microtun fleet keygen` prints one)")
        self.trusted = [k.lower() for k in trusted]

        def path(key):
            v = node.text(key, None)
            return None if v is None else (v if os.path.isabs(v) else os.path.join(base, v))
        self.user = node.text("user", None)
        self.password = None
        pw = path("password_file")
        if pw is not None:
            try:
                with open(pw) as f:
                    self.password = f.read().strip()
            except OSError as e:
                raise node.error("password_file", "cannot read %s: %s" % (pw, e.strerror or e)) from None
        if self.user and self.password is None:
            raise node.error("password_file", "missing: \"user\" is set, so a password file is needed")
        self.ca_file, self.cert_file, self.key_file = path("ca_file"), path("cert_file"), path("key_file")
        self.cache = path("cache")
        self.timeout = node.number("timeout_s", 0.1, 60, 2.0)
        # etcd grants no lease under 2 s (3/2 of its election timeout, rounded up); a gateway's lease is
        # how long the PoPs wait before its devices move to another (docs/FLEET.md, "Several gateways")
        self.lease_s = node.integer("lease_s", 2, 60, LEASE_TTL_S)
        self.where = "%s: %s" % (node.file, node.path or "top level")

    def client(self, timeout=None):
        return Client(self.endpoints, user=self.user, password=self.password, ca_file=self.ca_file,
                      cert_file=self.cert_file, key_file=self.key_file,
                      timeout=self.timeout if timeout is None else timeout)


def load_settings(path):
    """Settings from a fleet.json, or from the "fleet" section of a node config."""
    root = hconfig.load(path)
    base = os.path.dirname(os.path.abspath(path))
    return Settings(root.obj("fleet") if root.has("fleet") else root, base)


def wants_fleet(path):
    """True when a node config file has a "fleet" section (cli.py dispatches on it)."""
    try:
        with open(path, "rb") as f:
            v = json.loads(f.read())
    except (OSError, ValueError):
        return False            # the file-mode loader reports what is wrong
    return isinstance(v, dict) and "fleet" in v


# --- reading and writing the log in etcd ------------------------------------------------

def _log_prefix(prefix):
    return prefix + "log/"


def iter_log(client, prefix, after_create=0):
    """The records put under log/ after create revision after_create, in
    creation order, a page at a time: yields ([(key, create_revision,
    record or None)], header revision). Pages start small and grow while
    they stay under PAGE_BYTES, so a log of a few huge records (a
    100,000-device provisioning) is never in memory whole."""
    rev = 0
    lo = after_create + 1
    limit = 4
    while True:
        kvs, rev_now, more = client.range(_log_prefix(prefix), prefix=True, limit=limit,
                                          min_create_revision=lo, sort_create=True, revision=rev)
        rev = rev or rev_now
        size = sum(len(kv.value) for kv in kvs)
        items = [(kv.key, kv.create_revision, _json(kv.value)) for kv in kvs]
        del kvs
        yield items, rev
        if not more or not items:
            return
        lo = items[-1][1] + 1
        limit = max(1, limit // 2) if size > PAGE_BYTES else min(SYNC_PAGE, limit * 2)


def read_log(client, prefix, after_create=0):
    """Every record put under log/ after create revision after_create, in
    creation order: ([(key, create_revision, record or None)], header revision)."""
    out = []
    rev = 0
    for items, rev in iter_log(client, prefix, after_create):
        out.extend(items)
    return out, rev


class Store:
    """The writer's side: verify the log, append records with a
    compare-and-swap on head (two operators never fork the chain)."""

    def __init__(self, settings, client=None):
        self.s = settings
        self.client = client or settings.client(timeout=max(settings.timeout, 10.0))
        self.prefix = settings.prefix

    def verified(self):
        """(Chain, state, head mod revision, refusals) of the log as it is now."""
        head = self.client.get(self.prefix + "head")
        items, _ = read_log(self.client, self.prefix)
        chain = Chain(self.s.trusted)
        state = {}
        refusals = []
        for key, _, rec in items:
            if rec is None:
                chain.refuse("malformed")
                refusals.append((key, "malformed", "not JSON"))
                continue
            ok, reason, msg = chain.check(rec)
            if ok:
                chain.accept(rec)
                changelog.apply_changes(state, rec)
            elif reason:
                chain.refuse(reason)
                refusals.append((key, reason, msg))
        return chain, state, (head.mod_revision if head else 0), refusals

    def append(self, opkey, what, changes, chain=None, head_rev=None):
        """Publish changes as records (at most MAX_CHANGES each). Returns
        the seqs written. Raises LogError when another writer got there first."""
        if chain is None:
            chain, _, head_rev, _ = self.verified()
        seqs = []
        n = changelog.MAX_CHANGES
        parts = [changes[i:i + n] for i in range(0, len(changes), n)] or []
        for i, part in enumerate(parts):
            label = what if len(parts) == 1 else "%s (part %d of %d)" % (what, i + 1, len(parts))
            rec = changelog.make_record(opkey, chain.seq + 1, chain.head, label, part)
            h = changelog.record_hash(rec)
            key = "%s%012d.%s" % (_log_prefix(self.prefix), rec["seq"], h[:16])
            head = json.dumps({"seq": rec["seq"], "hash": h})
            ok, rev = self.client.txn([Client.cmp_mod_revision(self.prefix + "head", head_rev)],
                                      [Client.op_put(key, changelog.canonical(rec)),
                                       Client.op_put(self.prefix + "head", head)])
            if not ok:
                raise LogError("another writer changed the log meanwhile (head moved past record %d): "
                               "nothing more published; run the command again" % chain.seq)
            chain.accept(rec)
            head_rev = rev         # the txn's own revision is head's mod revision now
            seqs.append(rec["seq"])
        return seqs


def diff(old, new):
    """The changes that turn state old into state new, in key order."""
    out = []
    for k in sorted(set(old) | set(new)):
        if k not in new:
            out.append({"op": "delete", "key": k})
        elif old.get(k) != new[k]:
            out.append({"op": "put", "key": k, "value": new[k]})
    return out


def describe(changes, old):
    """A short "what" for a record: devices added / revoked / changed, paths added / removed / changed."""
    dev = {"added": [], "revoked": [], "changed": []}
    paths = {"added": set(), "removed": set(), "re-spliced or re-keyed": set()}
    other = []
    for c in changes:
        parts = c["key"].split("/")
        if parts[0] == "devices" and len(parts) == 2:
            if c["op"] == "delete":
                dev["revoked"].append(parts[1])
            elif c["key"] in old:
                v, o = c["value"], old[c["key"]]
                dev["changed"].append(parts[1] + (" (expires %s)" % v["expires"] if v.get("expires") !=
                                                  o.get("expires") and v.get("expires") else ""))
            else:
                dev["added"].append(parts[1])
        elif parts[0] in ("routes", "links"):
            kind = "removed" if c["op"] == "delete" else "re-spliced or re-keyed" if c["key"] in old else "added"
            paths[kind].add("/".join(parts[-2:]))
        else:
            other.append(c["key"])
    gone = set(dev["revoked"])
    out = []
    for word, names in dev.items():
        if names:
            out.append("device%s %s %s" % ("s" if len(names) > 1 else "", ", ".join(names[:5]) +
                                           (" and %d more" % (len(names) - 5) if len(names) > 5 else ""), word))
    for word, ps in paths.items():
        ps = {p for p in ps if p.split("/")[0] not in gone}     # a revoked device's paths go with it
        if ps:
            out.append("%d path%s %s" % (len(ps), "s" if len(ps) > 1 else "", word))
    if other:
        out.append("%s changed" % ", ".join(other[:5]))
    return "; ".join(out) or "no change"


def desired_state(files, paths):
    """The fleet state a provisioning plan describes (provision.plan's files
    and paths): every PoP route entry is filed under the path it belongs to."""
    state = {}
    by_label = {}
    for p in paths:
        pid = "%s/%s" % (p.device.name, p.route.name)
        for i, pn in enumerate(p.route.pops):
            by_label[(pn, p.fwd[i])] = pid
            by_label[(pn, p.rev[i])] = pid
    for rel, data in files.items():
        if rel.startswith("pops/"):
            pn = rel[5:-5]
            for r in json.loads(data)["routes"]:
                state.setdefault("routes/%s/%s" % (pn, by_label[(pn, r["in_label"])]), []).append(r)
    g = json.loads(files["gateway.json"])
    for link in g["links"]:
        state["links/" + link["name"]] = link
    state["services"] = g.get("services", {})
    for e in json.loads(files["registry.json"])["devices"]:
        state["devices/" + e["name"]] = e
    for k in state:
        if k.startswith("routes/"):
            state[k].sort(key=lambda r: r["in_label"])
    return state


def phases(old, changes):
    """Make before break: the changes in up to three steps, each published
    once every node applied the one before (nodes apply a record at
    slightly different moments, so a PoP must never switch to a label its
    next hop does not know yet):
      1. new route keys, and every changed route key as the union of its
         old entries and the new entries whose in_label is new;
      2. changed gateway links (the old label drains for DRAIN_S);
      3. the rest: the final route tables, deletions (removed routes drain
         too), devices, services.
    A change with nothing to prepare is one step."""
    first, second, rest = [], [], []
    for c in changes:
        k = c["key"]
        if k.startswith("routes/") and c["op"] == "put":
            if k not in old:
                first.append(c)
                continue
            have = {r.get("in_label") for r in old[k] if isinstance(r, dict)} if isinstance(old[k], list) else None
            if have is not None and isinstance(c["value"], list):
                extra = [r for r in c["value"] if isinstance(r, dict) and r.get("in_label") not in have]
                if extra:
                    first.append({"op": "put", "key": k, "value": list(old[k]) + extra})
            rest.append(c)
        elif k.startswith("links/") and c["op"] == "put" and k in old:
            second.append(c)
        else:
            rest.append(c)
    if not first and not second:
        return [changes]
    return [p for p in (first, second, rest) if p]


def wait_applied(client, prefix, seq, timeout=10.0):
    """Wait until every node alive (alive/ keys) reports record seq or
    later; returns the names still behind at timeout."""
    end = time.monotonic() + timeout
    while True:
        kvs, _, _ = client.range(prefix + "alive/", prefix=True)
        behind = [kv.key[len(prefix) + 6:] for kv in kvs if (_json(kv.value) or {}).get("seq", 0) < seq]
        if not behind or time.monotonic() > end:
            return behind
        time.sleep(0.02)


def publish_plan(settings, opkey, files, paths, what, gateways=None):
    """provision --fleet: publish what changed since the log's state, make
    before break (phases()). gateways: {name: "host:port"}, the gateways
    of the topology (the [gateway] and its [[gateway.pool]]), published as
    gateways/<name>. Returns (seqs, what)."""
    store = Store(settings)
    chain, state, head_rev, refusals = store.verified()
    new = desired_state(files, paths)
    for name, reach in (gateways or {}).items():
        new["gateways/" + name] = {"reach": reach}
    changes = diff(state, new)
    if not changes:
        return [], "nothing changed"
    text = "%s: %s" % (what, describe(changes, state))
    steps = phases(state, changes)
    seqs = []
    for i, step in enumerate(steps):
        label = text if len(steps) == 1 else "%s (step %d of %d, make before break)" % (text, i + 1, len(steps))
        seqs += store.append(opkey, label, step, chain, head_rev)
        head_rev = store.client.get(store.prefix + "head").mod_revision
        if i + 1 < len(steps):
            behind = wait_applied(store.client, store.prefix, seqs[-1])
            if behind:
                print("fleet: %s did not report record %d within 10 s; going on (their traffic may see "
                      "the switch before they do)" % (", ".join(behind), seqs[-1]))
    return seqs, text


def file_log_plan(path, trusted, opkey, files, paths, what):
    """File mode with --operator-key: the same records, appended to a JSONL file."""
    flog = changelog.FileLog(path)
    results, state, chain = changelog.verify(flog.records(), trusted)
    bad = [r for r in results if not r[1] and r[2]]
    if bad:
        raise LogError("%s: the log does not verify (%s: %s); run `microtun log --file %s`"
                       % (path, bad[0][2], bad[0][3], path))
    changes = diff(state, desired_state(files, paths))
    if not changes:
        return [], "nothing changed"
    text = "%s: %s" % (what, describe(changes, state))
    seqs = []
    n = changelog.MAX_CHANGES
    for i in range(0, len(changes), n):
        rec = changelog.make_record(opkey, chain.seq + 1, chain.head, text, changes[i:i + n])
        flog.append(rec)
        chain.accept(rec)
        seqs.append(rec["seq"])
    return seqs, text


def _json(b):
    try:
        return json.loads(b)
    except ValueError:
        return None


# --- operator commands ---------------------------------------------------------------------

def _opkey(path):
    return changelog.OperatorKey.load(path)


def cmd_keygen(args):
    try:
        k = changelog.OperatorKey.generate(args.out)
    except FileExistsError:
        print("microtun fleet keygen: %s exists; not overwriting a key" % args.out, file=sys.stderr)
        return 2
    print(k.public.hex())
    return 0


def _change_device(args, make):
    """revoke / expire: one record changing devices/<name> (and, for a
    revoke, every route and link of that device)."""
    s = load_settings(args.fleet)
    key = _opkey(args.operator_key)
    store = Store(s)
    chain, state, head_rev, _ = store.verified()
    k = "devices/" + args.device
    if k not in state:
        print("microtun fleet: no device %r in the fleet log (record %d)" % (args.device, chain.seq), file=sys.stderr)
        return 2
    changes = make(state, k)
    what = describe(changes, state)
    seqs = store.append(key, what, changes, chain, head_rev)
    print("record %d: %s" % (seqs[-1], what))
    return 0


def revoke_changes(state, name):
    """A revocation: the registry entry and every route and link of the device."""
    out = [{"op": "delete", "key": "devices/" + name}]
    for other in sorted(state):
        parts = other.split("/")
        if (parts[0] == "routes" and len(parts) == 4 and parts[2] == name) or \
                (parts[0] == "links" and len(parts) == 3 and parts[1] == name):
            out.append({"op": "delete", "key": other})
    return out


def cmd_revoke(args):
    return _change_device(args, lambda state, k: revoke_changes(state, k[len("devices/"):]))


def cmd_expire(args):
    if changelog.parse_utc(args.at) is None:
        print("microtun fleet expire: --at: expected YYYY-MM-DDTHH:MM:SSZ (UTC), got %r" % args.at, file=sys.stderr)
        return 2

    def make(state, k):
        v = dict(state[k])
        if args.at == "never":
            v.pop("expires", None)
        else:
            v["expires"] = args.at
        return [{"op": "put", "key": k, "value": v}]
    return _change_device(args, make)


def cmd_status(args):
    s = load_settings(args.fleet)
    c = s.client()
    chain, state, _, refusals = Store(s, c).verified()
    kvs, _, _ = c.range(s.prefix + "alive/", prefix=True)
    print("log: %d records, head %s…; %d devices; %d refused records" % (
        chain.seq, chain.head[:16], sum(1 for k in state if k.startswith("devices/")), len(refusals)))
    for kv in kvs:
        v = _json(kv.value) or {}
        print("%-30s %-22s applied record %s%s" % (kv.key[len(s.prefix + "alive/"):], v.get("listen", "?"),
                                                    v.get("seq", "?"), "" if v.get("seq") == chain.seq else " (behind)"))
    if not kvs:
        print("no node is alive (none holds a lease under %salive/)" % s.prefix)
    members, _ = gwpool.members(state)
    if len(members) >= 2:       # a pool: which gateway each device's paths end at (as the PoPs choose)
        pre = s.prefix + "alive/gateways/"
        live = sorted(n for n in members if any(kv.key == pre + n for kv in kvs))
        per = dict.fromkeys(live, 0)
        for k in state:
            if k.startswith("devices/") and live:
                per[gwpool.choose(k[len("devices/"):], live)] += 1
        print("gateway pool: %s; devices per gateway alive: %s" % (", ".join(sorted(members)), ", ".join(
            "%s %d" % kv for kv in per.items()) or "none alive"))
    return 0


def _run(fn):
    def run(args):
        try:
            return fn(args)
        except (ConfigError, LogError) as e:
            print("microtun fleet: %s" % e, file=sys.stderr)
            return 2
        except EtcdError as e:
            print("microtun fleet: %s (is etcd running? check the fleet settings' endpoints and credentials)" % e,
                  file=sys.stderr)
            return 1
    return run


def add_parser(sub):
    p = sub.add_parser("fleet", help="operator commands for a fleet on etcd (docs/FLEET.md)",
                       description="Fleet mode: keys, revocations, expiries, status. See docs/FLEET.md.")
    fs = p.add_subparsers(dest="fleet_cmd", metavar="ACTION", required=True)
    k = fs.add_parser("keygen", help="make an operator key (prints its public key to trust)")
    k.add_argument("--out", required=True, metavar="FILE")
    k.set_defaults(run=_run(cmd_keygen))
    for name, fn, help_ in (("revoke", cmd_revoke, "revoke a device: one record, every node applies it"),
                            ("expire", cmd_expire, "set (or renew) a device's expiry: one record")):
        q = fs.add_parser(name, help=help_)
        q.add_argument("device", metavar="DEVICE")
        q.add_argument("--fleet", required=True, metavar="FILE", help="fleet settings (fleet.json)")
        q.add_argument("--operator-key", required=True, metavar="FILE")
        if name == "expire":
            q.add_argument("--at", required=True, metavar="TIME", help="YYYY-MM-DDTHH:MM:SSZ (UTC), or never")
        q.set_defaults(run=_run(fn))
    st = fs.add_parser("status", help="the log head and every node alive with the record it applied")
    st.add_argument("--fleet", required=True, metavar="FILE")
    st.set_defaults(run=_run(cmd_status))


# --- microtun log ------------------------------------------------------------------------------

def _touches(rec, device):
    for c in rec.get("changes", []):
        parts = str(c.get("key", "")).split("/")
        if device in parts[1:3] and parts[0] in ("devices", "routes", "links"):
            return True
    return False


def log_main(args):
    """`microtun log --fleet fleet.json | --file changelog.jsonl --trust KEY [--device NAME] [--json]`:
    every record, verified; 0 when the whole log verifies, 1 when some record is refused."""
    try:
        if args.fleet:
            s = load_settings(args.fleet)
            items, _ = read_log(s.client(), s.prefix)
            trusted = s.trusted
            records = [(key, rec if rec is not None else {"_unreadable": "not JSON"}) for key, _, rec in items]
        else:
            trusted = list(args.trust or [])
            if args.fleet_settings:
                trusted += load_settings(args.fleet_settings).trusted
            if not trusted:
                print("microtun log: --file needs --trust KEY (or --trust-from fleet.json)", file=sys.stderr)
                return 2
            records = [("line %d" % (i + 1), r) for i, r in enumerate(changelog.FileLog(args.file).records())]
            if not os.path.exists(args.file):
                print("microtun log: %s: no such file" % args.file, file=sys.stderr)
                return 2
        results, _, chain = changelog.verify([r for _, r in records], trusted)
    except (ConfigError, LogError, ValueError) as e:
        print("microtun log: %s" % e, file=sys.stderr)
        return 2
    except EtcdError as e:
        print("microtun log: %s (is etcd running?)" % e, file=sys.stderr)
        return 1
    bad = 0
    for (where, _), (rec, ok, reason, msg) in zip(records, results):
        if not ok and reason is None:
            continue            # a copy of an accepted record
        if not ok:
            bad += 1
        if args.device and (not isinstance(rec, dict) or not _touches(rec, args.device)):
            continue
        if args.json:
            print(json.dumps({"where": where, "ok": ok, "refused": reason, "why": msg, "record": rec}))
            continue
        if ok:
            print("#%-5d %s  operator %s…  %s" % (rec["seq"], rec["time"], rec["operator"][:12], rec["what"]))
        else:
            print("REFUSED %s: %s: %s" % (where, reason, msg))
    if not args.json:
        print("%d records verified, head %s…%s" % (chain.seq, chain.head[:16],
                                                    "; %d REFUSED" % bad if bad else "; the chain is intact"))
    return 1 if bad else 0


def add_log_parser(sub):
    p = sub.add_parser("log", help="list and verify the signed change log (who changed what, when)",
                       description="Walk the change log, verify every signature and the hash chain, and list "
                                   "the records. Exit 1 when some record is refused.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--fleet", metavar="FILE", help="fleet settings: read the log from etcd")
    g.add_argument("--file", metavar="FILE", help="a changelog.jsonl (file mode)")
    p.add_argument("--trust", action="append", metavar="KEY", help="a trusted operator public key (hex; repeat)")
    p.add_argument("--trust-from", dest="fleet_settings", metavar="FILE", help="take the trusted keys from fleet.json")
    p.add_argument("--device", metavar="NAME", help="only the records that touch this device")
    p.add_argument("--json", action="store_true", help="one JSON object per record")
    p.set_defaults(run=log_main)


# --- microtun provision --fleet / --operator-key --------------------------------------------

def node_configs(topo, out_dir, settings_path):
    """DIR/fleet/pops/<name>.json and DIR/fleet/gateway.json: what each node
    keeps locally in fleet mode (no routes, links or registry: those come
    from etcd). Returns the relative paths written."""
    from microtun_host import provision as prov
    with open(settings_path, "rb") as f:
        section = json.loads(f.read())
    section = section.get("fleet", section)
    # paths in the settings are relative to fleet.json; make them absolute for the copies
    base = os.path.dirname(os.path.abspath(settings_path))
    for k in ("password_file", "ca_file", "cert_file", "key_file"):
        if isinstance(section.get(k), str) and not os.path.isabs(section[k]):
            section[k] = os.path.join(base, section[k])
    written = []
    os.makedirs(os.path.join(out_dir, "fleet", "pops"), 0o700, exist_ok=True)
    with open(os.path.join(out_dir, "state.json")) as f:
        state = json.load(f)
    gw = topo.gateway
    from microtun_host.control import is_socket_path

    def ctl(value, where):      # a socket path was relative to the file-mode config's directory
        v = str(value)
        return os.path.abspath(os.path.join(out_dir, where, v)) if is_socket_path(v) and not os.path.isabs(v) else v
    for name, p in topo.pops.items():
        cfg = {"name": name, "listen": str(p.listen)}
        if p.control is not None:
            cfg["control"] = ctl(p.control, "pops")
        cfg.update(p.extra)
        cfg["fleet"] = dict(section, cache="%s.cache" % name)
        rel = "fleet/pops/%s.json" % name
        prov.write_atomic(os.path.join(out_dir, rel), (json.dumps(cfg, indent=1) + "\n").encode())
        written.append(rel)
    cfg = {"name": gw.name, "listen": str(gw.listen)}
    if gw.control is not None:
        cfg["control"] = ctl(gw.control, ".")
    cfg["private_key"] = state["gateway"]["private_key"]      # stays in this file: never in etcd
    cfg.update(gw.extra)
    cfg["fleet"] = dict(section, cache="gateway.cache")
    prov.write_atomic(os.path.join(out_dir, "fleet", "gateway.json"), (json.dumps(cfg, indent=1) + "\n").encode())
    written.append("fleet/gateway.json")
    if gw.pool:         # the same identity (key, and from etcd the same links and registry) on more hosts
        os.makedirs(os.path.join(out_dir, "fleet", "gateways"), 0o700, exist_ok=True)
    for m in gw.pool:
        mcfg = dict(cfg, name=m.name, listen=str(m.listen), fleet=dict(section, cache="%s.cache" % m.name))
        mcfg.pop("control", None)
        if m.control is not None:
            mcfg["control"] = ctl(m.control, ".")
        rel = "fleet/gateways/%s.json" % m.name
        prov.write_atomic(os.path.join(out_dir, rel), (json.dumps(mcfg, indent=1) + "\n").encode())
        written.append(rel)
    return written


def provision_publish(summary, topology, out_dir, settings_path, key_path):
    """After `provision` wrote its files: publish to etcd (--fleet) and/or
    append to DIR/changelog.jsonl (--operator-key without --fleet)."""
    topo, files, paths = summary.plan
    gw = topo.gateway
    gateways = dict([(gw.name, str(gw.reach))] + [(m.name, str(m.reach)) for m in gw.pool])
    try:
        if key_path is None:
            raise LogError("--fleet needs --operator-key: every change in etcd is a signed record")
        key = _opkey(key_path)
        what = "provision %s" % os.path.basename(topology)
        if settings_path:
            s = load_settings(settings_path)
            if key.public.hex() not in s.trusted:
                raise LogError("%s: trusted_operators does not hold this operator's key %s: nodes would refuse "
                               "its records" % (settings_path, key.public.hex()))
            seqs, text = publish_plan(s, key, files, paths, what, gateways)
            written = node_configs(topo, out_dir, settings_path)
            print("fleet: %s" % ("records %s published: %s" % (",".join(map(str, seqs)), text) if seqs else text))
            print("fleet: node configs in %s: %s" % (out_dir, ", ".join(written)))
        else:
            seqs, text = file_log_plan(os.path.join(out_dir, "changelog.jsonl"), [key.public.hex()], key,
                                       files, paths, what)
            print("changelog.jsonl: %s" % ("records %s: %s" % (",".join(map(str, seqs)), text) if seqs else text))
    except (ConfigError, LogError) as e:
        print("microtun provision: %s" % e, file=sys.stderr)
        return 2
    except EtcdError as e:
        print("microtun provision: the files are written, but publishing failed: %s (is etcd running? run "
              "the same command again once it is)" % e, file=sys.stderr)
        return 1
    return 0
