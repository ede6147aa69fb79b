"""Several gateways in fleet mode: each device's paths end at one gateway of
the pool, chosen from those alive (docs/FLEET.md, "Several gateways").

    pool = Pool(log)                               # one per fleet PoP
    pool.members_from(state, seq)                  # gateways/<name> of the signed log: who may be a gateway
    pool.alive_from({name: alive value}, seq)      # alive/gateways/*: leases, from the Follower's watch
    routes = pool.steer(state, "a2", entries)      # the PoP's route entries, last hops re-pointed

Who may be a gateway, and where it is reached, comes only from the signed
log (`gateways/<name>` = {"reach": "host:port"}); a lease only says which
of those is up. A node whose etcd account writes a lease for a name the
log does not hold moves nothing (counted: `unknown_alive`).

The choice is rendezvous hashing (highest random weight): a device goes to
the live gateway with the largest SHA-256(device name, 0, gateway name).
Every PoP computes the same answer from the same live set, so the two
paths of a device end at the same gateway with nothing published per
device; when a gateway goes, only its own devices move (each to the
gateway that comes next in its own ranking), and a gateway that joins
takes only the devices that rank it first.

Make before break: a gateway joins the live set only once its alive key
reports the log record this PoP applied (or a later one), so it has the
device's link and registry entry before any path is pointed at it. Once
live it stays live until its lease is gone (an alive key deleted by a
clean stop, or expired: `lease_s` after the gateway stopped renewing it).
With no member alive nothing moves: the routes stay where they were and
the PoP says so once.

A gateway that dies takes its sessions with it: its devices' packets reach
a gateway that has no session for them until the device notices its data
goes unanswered (`unresponsive_s`) and handshakes again. Every gateway of
the pool has the same identity (static key, links, registry: `provision
--fleet` writes their configs), so the device keeps its config.
"""
import hashlib

from microtun_host import config as hconfig


def rank(device, name):
    """The rendezvous weight of gateway `name` for `device` (bigger wins)."""
    return hashlib.sha256(device.encode() + b"\0" + name.encode()).digest()


def choose(device, names):
    """The gateway of `device` among `names` (None when there is none)."""
    best = None
    for n in names:
        w = rank(device, n)
        if best is None or w > best[0]:
            best = (w, n)
    return None if best is None else best[1]


def members(state):
    """{name: "host:port"} of the signed gateways/<name> keys, and
    [(key, why)] for those that are not usable."""
    out, bad = {}, []
    for k in sorted(state):
        if not k.startswith("gateways/"):
            continue
        v = state[k]
        if isinstance(v, (bytes, str)):
            import json
            try:
                v = json.loads(v)
            except ValueError:
                v = None
        reach = v.get("reach") if isinstance(v, dict) else None
        if not isinstance(reach, str) or hconfig.parse_address(reach) is None:
            bad.append((k, "reach: expected \"host:port\", got %s" % hconfig._short(str(reach))))
            continue
        out[k[len("gateways/"):]] = reach
    return out, bad


class Pool:
    def __init__(self, log):
        self.log = log
        self.members = {}           # name -> reach ("host:port"), from the signed log
        self.alive = None           # {name: applied seq} from the leases; None: not heard from etcd yet
        self.live = set()           # members serving now (see the module docstring)
        self.unknown_alive = 0      # alive keys for names the log does not hold
        self.moves = 0              # changes of the live set that moved devices
        self._all_dead_logged = False
        self._unknown_logged = set()

    def members_from(self, state, seq):
        m, bad = members(state)
        for k, why in bad:
            self.log.error("fleet: log record %d: %s: %s; that gateway is left out of the pool", seq, k, why)
        if m != self.members:
            self.members = m
            return self._update(seq)
        return False

    def alive_from(self, alive, seq):
        """alive: {name: the alive key's value (dict)}; seq: the record this PoP applied.
        Returns True when the live set changed (the routes must be steered again)."""
        self.alive = {}
        for n, v in alive.items():
            s = v.get("seq") if isinstance(v, dict) else None
            self.alive[n] = s if isinstance(s, int) else 0
        return self._update(seq)

    def _update(self, seq):
        if self.alive is None:
            live = set(self.members)                # etcd not heard yet: every member
        else:
            for n in set(self.alive) - set(self.members) - self._unknown_logged:
                self._unknown_logged.add(n)
                self.unknown_alive += 1
                self.log.warning("fleet: alive/gateways/%s holds a lease but the log names no gateway %s; "
                                 "no path is pointed at it", n, n)
            live = {n for n in self.members if n in self.alive and (n in self.live or self.alive[n] >= seq)}
        if not live:
            if self.live and not self._all_dead_logged and self.alive is not None:
                self._all_dead_logged = True
                self.log.error("fleet: no gateway of the pool (%s) holds a lease; paths stay where they are",
                               ", ".join(sorted(self.members)))
            live = self.live & set(self.members) or self.live
        else:
            self._all_dead_logged = False
        if live == self.live:
            return False
        gone, new = sorted(self.live - live), sorted(live - self.live)
        if self.live:
            self.moves += 1
            self.log.warning("fleet: gateways %s: %s%s%s; the devices they served move to those alive", ", ".join(
                sorted(live)) or "none", "gone: %s" % ", ".join(gone) if gone else "",
                "; " if gone and new else "", "joined: %s" % ", ".join(new) if new else "")
        self.live = live
        return True

    def steering(self):
        """True when last hops are chosen (a pool of two or more); a lone
        gateway keeps the routes as published (with their standby, if any)."""
        return len(self.members) >= 2 and bool(self.live)

    def steer(self, entries):
        """entries: [(device, route entry dict)] of one PoP. A route whose
        "next" is a pool member's address gets the chosen gateway's (and
        loses "standby": the pool replaces it). Returns the entries."""
        if not self.steering():
            return [e for _, e in entries]
        reach = set(self.members.values())
        live = sorted(self.live)
        out = []
        for device, e in entries:
            if isinstance(e, dict) and e.get("next") in reach and device is not None:
                e = dict(e, next=self.members[choose(device, live)])
                e.pop("standby", None)
            out.append(e)
        return out

    def status(self, devices=()):
        """For the PoP's stats: members, live, and how many of `devices` each serves."""
        live = sorted(self.live)
        per = dict.fromkeys(live, 0)
        for d in devices:
            if live:
                per[choose(d, live)] += 1
        return {"members": dict(self.members), "live": live,
                "alive": None if self.alive is None else sorted(self.alive), "devices": per,
                "moves": self.moves, "unknown_alive": self.unknown_alive}
