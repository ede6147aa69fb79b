"""The signed, hash-chained change log (changelog.py): what a node accepts
and what it refuses, one row per case."""
import json
import os
import subprocess
import sys

import pytest

from microtun_host import changelog
from microtun_host.changelog import Chain, OperatorKey, make_record, record_hash

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def keys(tmp_path):
    return OperatorKey.generate(str(tmp_path / "op.key")), OperatorKey.generate(str(tmp_path / "other.key"))


def _chain_of(key, n):
    recs, prev = [], changelog.GENESIS
    for i in range(1, n + 1):
        r = make_record(key, i, prev, "change %d" % i, [{"op": "put", "key": "devices/d%d" % i, "value": {"n": i}}])
        recs.append(r)
        prev = record_hash(r)
    return recs


def _tamper(rec, **kw):
    r = json.loads(json.dumps(rec))
    r.update(kw)
    return r


def test_a_good_chain_applies_in_order(keys):
    op, _ = keys
    results, state, chain = changelog.verify(_chain_of(op, 5), [op.public])
    assert [ok for _, ok, _, _ in results] == [True] * 5
    assert chain.seq == 5 and sorted(state) == ["devices/d%d" % i for i in range(1, 6)]


# (case, how record 3 of 3 is presented after records 1 and 2, expected reason)
CASES = [
    ("changed value, old signature", lambda r, o, x: _tamper(r[2], changes=[{"op": "delete", "key": "devices/d1"}]),
     "bad_signature"),
    ("changed what, old signature", lambda r, o, x: _tamper(r[2], what="nothing to see"), "bad_signature"),
    ("signed by an untrusted key", lambda r, o, x: make_record(x, 3, record_hash(r[1]), "evil", []),
     "untrusted_operator"),
    ("operator field swapped to a trusted key", lambda r, o, x: _tamper(make_record(x, 3, record_hash(r[1]), "e", []),
                                                                       operator=o.public.hex()), "bad_signature"),
    ("record 2 replayed", lambda r, o, x: r[1], None),        # a copy of an applied record: silently skipped
    ("record 2 re-signed with other content", lambda r, o, x: make_record(o, 2, record_hash(r[0]), "fork", []),
     "replayed"),
    ("record 4 before 3 (reordered)", lambda r, o, x: make_record(o, 4, record_hash(r[2]), "early", []),
     "out_of_order"),
    ("prev not the last record's hash", lambda r, o, x: make_record(o, 3, record_hash(r[0]), "fork", []),
     "broken_chain"),
    ("seq as a string", lambda r, o, x: _tamper(r[2], seq="3"), "malformed"),
    ("extra field", lambda r, o, x: _tamper(r[2], admin=True), "malformed"),
    ("unknown op", lambda r, o, x: make_record(o, 3, record_hash(r[1]), "x", [{"op": "drop", "key": "k"}]),
     "malformed"),
    ("not an object", lambda r, o, x: [1, 2], "malformed"),
]


@pytest.mark.parametrize("case,make,reason", CASES, ids=[c[0] for c in CASES])
def test_refused_records(keys, case, make, reason):
    op, other = keys
    recs = _chain_of(op, 3)
    chain = Chain([op.public])
    for r in recs[:2]:
        assert chain.check(r) == (True, None, None)
        chain.accept(r)
    ok, why, msg = chain.check(make(recs, op, other))
    assert not ok and why == reason, (case, why, msg)
    assert chain.seq == 2
    if reason:
        assert msg      # one line that says what is wrong
    # the genuine record 3 still applies afterwards: a refusal does not block the chain
    assert chain.check(recs[2])[0]


def test_operator_key_file_checks(tmp_path):
    p = tmp_path / "k"
    OperatorKey.generate(str(p))
    os.chmod(p, 0o644)
    with pytest.raises(changelog.LogError, match="chmod 600"):
        OperatorKey.load(str(p))
    p.write_text("nothex\n")
    os.chmod(p, 0o600)
    with pytest.raises(changelog.LogError, match="64 hex"):
        OperatorKey.load(str(p))


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "lib"))
    return subprocess.run([sys.executable, "-m", "microtun_host.cli"] + list(args), capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60)


def test_file_mode_log_from_provision(tmp_path):
    """provision --operator-key (no etcd): records appended to DIR/changelog.jsonl;
    `microtun log` verifies them, names who revoked a device, and flags a tampered line."""
    r = _cli("fleet", "keygen", "--out", str(tmp_path / "op.key"))
    assert r.returncode == 0, r.stderr
    pub = r.stdout.strip()
    topo = tmp_path / "t.toml"
    base = ('[gateway]\nlisten = "127.0.0.1:7100"\n[[pop]]\nname = "a1"\nlisten = "127.0.0.1:7101"\n'
            '[[route]]\nname = "a"\npops = ["a1"]\n[[device]]\nname = "s1"\n')
    topo.write_text(base + '[[device]]\nname = "s2"\n')
    out = tmp_path / "out"
    r = _cli("provision", str(topo), "--out", str(out), "--operator-key", str(tmp_path / "op.key"))
    assert r.returncode == 0, r.stderr
    topo.write_text(base)
    r = _cli("provision", str(topo), "--out", str(out), "--operator-key", str(tmp_path / "op.key"))
    assert r.returncode == 0 and "s2 revoked" in r.stdout, r.stdout + r.stderr
    r = _cli("log", "--file", str(out / "changelog.jsonl"), "--trust", pub, "--device", "s2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "#2" in r.stdout and "device s2 revoked" in r.stdout and pub[:12] in r.stdout
    assert "2 records verified" in r.stdout
    lines = (out / "changelog.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace("s2 revoked", "s3 revoked")
    (out / "changelog.jsonl").write_text("\n".join(lines) + "\n")
    r = _cli("log", "--file", str(out / "changelog.jsonl"), "--trust", pub)
    assert r.returncode == 1 and "REFUSED line 2: bad_signature" in r.stdout, r.stdout
    r = _cli("log", "--file", str(out / "changelog.jsonl"))
    assert r.returncode == 2 and "--trust" in r.stderr
