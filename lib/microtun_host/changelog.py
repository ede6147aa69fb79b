"""The signed, hash-chained change log (docs/FLEET.md, "The change log").

Every provisioning change is one record:

    {"v": 1, "seq": 12, "prev": "<sha256 hex of record 11>", "time": "2026-12-07T04:00:00Z",
     "operator": "<Ed25519 public key hex>", "what": "device s1 revoked",
     "changes": [{"op": "delete", "key": "devices/s1"}], "sig": "<Ed25519 signature hex>"}

The signature covers the record's canonical bytes without "sig" (JSON, keys
sorted, no spaces, ASCII); a record's hash is SHA-256 over its canonical
bytes with "sig". Record 1 has prev = 64 zeros. A node applies a record
only when its operator is trusted, its signature verifies, its seq is the
next one and its prev is the hash of the record applied before it: a forged
record fails the signature, a replayed one comes with an old seq, a
reordered one with a seq or prev that does not follow. Each refusal is
counted under its reason and explained in one line.

    key = OperatorKey.load("operator.key")            # or OperatorKey.generate(path)
    rec = make_record(key, seq, prev, "device s1 revoked", changes)
    chain = Chain(trusted={key.public})
    ok, reason, msg = chain.check(rec)                # then chain.accept(rec)

Ed25519 (RFC 8032) through the `cryptography` package.
"""
import hashlib
import json
import os
import time

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

VERSION = 1
GENESIS = "0" * 64
OPS = ("put", "delete")
MAX_CHANGES = 2000          # changes per record: a record stays under etcd's 1.5 MiB request limit
# why a record was refused (counters "log_<reason>")
REASONS = ("malformed", "untrusted_operator", "bad_signature", "replayed", "out_of_order", "broken_chain")


class LogError(Exception):
    """A record or log file that cannot be used; one line naming which and why."""


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def record_hash(rec):
    return hashlib.sha256(canonical(rec)).hexdigest()


def _signed_and_whole(rec):
    """(canonical bytes without "sig", canonical bytes with it) of a
    well-formed record, encoding its changes once: "changes" sorts before
    every other field, so both are '{"changes":' + changes + the rest."""
    head = b'{"changes":' + canonical(rec["changes"]) + b","
    rest = {k: v for k, v in rec.items() if k != "changes"}
    whole = canonical(rest)
    del rest["sig"]
    return head + canonical(rest)[1:], head + whole[1:]


def utc_text(t=None):
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))


def parse_utc(text):
    """Seconds since the epoch from "YYYY-MM-DDTHH:MM:SSZ", or None."""
    import calendar
    if not isinstance(text, str):
        return None
    try:
        return calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ"))
    except ValueError:
        return None


class OperatorKey:
    """An operator's Ed25519 key: a file holding the 32-byte seed as hex
    (mode 0600). Nodes trust its public key (hex) in their config."""

    def __init__(self, seed):
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self.public = self._key.public_key().public_bytes_raw()

    @classmethod
    def generate(cls, path):
        seed = os.urandom(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(seed.hex() + "\n")
        return cls(seed)

    @classmethod
    def load(cls, path):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError as e:
            raise LogError("%s: cannot read the operator key: %s" % (path, e.strerror or e)) from None
        try:
            seed = bytes.fromhex(text)
        except ValueError:
            seed = b""
        if len(seed) != 32:
            raise LogError("%s: expected an operator key (64 hex characters, `microtun fleet keygen` writes one)"
                           % path)
        if os.stat(path).st_mode & 0o077:
            raise LogError("%s: the operator key is readable by others (chmod 600 it)" % path)
        return cls(seed)

    def sign(self, data):
        return self._key.sign(data)


def make_record(key, seq, prev, what, changes, when=None):
    rec = {"v": VERSION, "seq": seq, "prev": prev, "time": utc_text(when), "operator": key.public.hex(),
           "what": what, "changes": changes}
    rec["sig"] = key.sign(canonical(rec)).hex()
    return rec


def _malformed(rec):
    """What is wrong with a record's shape, or None."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    want = {"v", "seq", "prev", "time", "operator", "what", "changes", "sig"}
    if set(rec) != want:
        return "fields %s, expected %s" % (sorted(rec), sorted(want))
    if rec["v"] != VERSION:
        return "v: expected %d, got %r" % (VERSION, rec["v"])
    if isinstance(rec["seq"], bool) or not isinstance(rec["seq"], int) or rec["seq"] < 1:
        return "seq: expected a positive integer, got %r" % (rec["seq"],)
    for k, n in (("prev", 32), ("operator", 32), ("sig", 64)):
        v = rec[k]
        if not isinstance(v, str) or len(v) != 2 * n or any(c not in "0123456789abcdef" for c in v):
            return "%s: expected %d lowercase hex characters" % (k, 2 * n)
    if parse_utc(rec["time"]) is None:
        return "time: expected \"YYYY-MM-DDTHH:MM:SSZ\", got %r" % (rec["time"],)
    if not isinstance(rec["what"], str):
        return "what: expected a string"
    ch = rec["changes"]
    if not isinstance(ch, list) or len(ch) > MAX_CHANGES:
        return "changes: expected a list of at most %d changes" % MAX_CHANGES
    for i, c in enumerate(ch):
        if not isinstance(c, dict) or c.get("op") not in OPS or not isinstance(c.get("key"), str) or not c["key"]:
            return "changes[%d]: expected {\"op\": \"put\"|\"delete\", \"key\": ..., \"value\": ...}" % i
        if set(c) != ({"op", "key", "value"} if c["op"] == "put" else {"op", "key"}):
            return "changes[%d]: fields %s" % (i, sorted(c))
    return None


class Chain:
    """The verifier a node (or `microtun log`) runs over the records in
    order. Holds the hash of every accepted record (32 bytes each), so a
    record seen again on a resync is recognised as already applied."""

    def __init__(self, trusted):
        self.trusted = {}
        for k in trusted:
            kb = bytes.fromhex(k) if isinstance(k, str) else bytes(k)
            self.trusted[kb] = Ed25519PublicKey.from_public_bytes(kb)
        self.hashes = []            # hashes[i]: record seq i+1
        self.refused = {r: 0 for r in REASONS}
        self._checked = (None, None)    # (record, its hash) of the last check(), for accept()

    @property
    def seq(self):
        return len(self.hashes)

    @property
    def head(self):
        return self.hashes[-1] if self.hashes else GENESIS

    def check(self, rec):
        """(True, None, None) when rec is the next record; (False, None, None)
        when it is one already accepted (same hash: nothing to do, not an
        attack); (False, reason, message) when it is refused."""
        bad = _malformed(rec)
        if bad:
            return False, "malformed", bad
        op = bytes.fromhex(rec["operator"])
        pub = self.trusted.get(op)
        if pub is None:
            return False, "untrusted_operator", "operator %s… is not among the trusted keys" % rec["operator"][:16]
        signed, whole = _signed_and_whole(rec)
        try:
            pub.verify(bytes.fromhex(rec["sig"]), signed)
        except InvalidSignature:
            return False, "bad_signature", "the signature does not verify under operator %s…" % rec["operator"][:16]
        h = hashlib.sha256(whole).hexdigest()
        self._checked = (rec, h)
        seq = rec["seq"]
        if seq <= self.seq:
            if self.hashes[seq - 1] == h:
                return False, None, None
            return False, "replayed", "seq %d is already taken by another record (now at %d)" % (seq, self.seq)
        if seq != self.seq + 1:
            return False, "out_of_order", "seq %d does not follow %d" % (seq, self.seq)
        if rec["prev"] != self.head:
            return False, "broken_chain", "prev %s… is not the hash of record %d (%s…)" % (
                rec["prev"][:16], self.seq, self.head[:16])
        return True, None, None

    def accept(self, rec):
        r, h = self._checked
        self.hashes.append(h if r is rec else record_hash(rec))

    def refuse(self, reason):
        self.refused[reason] += 1


def apply_changes(state, rec):
    """state: {key: value}; a record's changes applied in order. Returns the keys touched."""
    keys = []
    for c in rec["changes"]:
        if c["op"] == "put":
            state[c["key"]] = c["value"]
        else:
            state.pop(c["key"], None)
        keys.append(c["key"])
    return keys


# --- the log in a file (file mode) ---------------------------------------------------

class FileLog:
    """One record per line (JSON Lines), appended; the history `microtun
    provision` keeps next to the files it writes."""

    def __init__(self, path):
        self.path = path

    def records(self):
        """Every record, in file order (the caller verifies them)."""
        if not os.path.exists(self.path):
            return []
        out = []
        with open(self.path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    out.append(json.loads(line))
                except ValueError:
                    out.append({"_unreadable": "line %d is not JSON" % n})
        return out

    def head(self):
        recs = self.records()
        if not recs:
            return 0, GENESIS
        last = recs[-1]
        if _malformed(last):
            raise LogError("%s: the last record cannot be read (%s); run `microtun log --file %s`"
                           % (self.path, _malformed(last), self.path))
        return last["seq"], record_hash(last)

    def append(self, rec):
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(canonical(rec) + b"\n")
            f.flush()
            os.fsync(f.fileno())


def verify(records, trusted):
    """Walk records through a Chain: a list of (record, ok, reason, message)
    and the resulting state."""
    chain = Chain(trusted)
    state = {}
    out = []
    for rec in records:
        if isinstance(rec, dict) and "_unreadable" in rec:
            chain.refuse("malformed")
            out.append((rec, False, "malformed", rec["_unreadable"]))
            continue
        ok, reason, msg = chain.check(rec)
        if ok:
            chain.accept(rec)
            apply_changes(state, rec)
        elif reason:
            chain.refuse(reason)
        out.append((rec, ok, reason, msg))
    return out, state, chain
