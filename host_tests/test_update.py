"""Code over the air with automatic rollback, and rollouts in waves (issue 13,
items 4 and 5; docs/UPDATE.md).

In process: Ed25519 verification against the `cryptography` package, the
boot loader's state records (torn writes, tries, commit, rollback), release
bundles, wave planning and stopping. Then one rig with real processes on
loopback (the unix-port firmware, two PoPs, a gateway; host_tests/ota_lab.py)
for every scenario: a good release is committed; one that never reaches the
gateway, one that raises at import (in app.py, in microtun_fw), one that
hangs: rolled back, the device back on its last good set; unsigned, wrongly
signed, tampered and too-large releases refused with the running code
untouched; power cuts during staging and switch-over. The client is the
test-only DirClient (host_tests/otadev.py), not the ops channel.
"""
import hashlib
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "lib"))
sys.path.insert(0, str(ROOT / "firmware"))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from microtun import ed25519                             # noqa: E402
from microtun_host import flash, release, rollout       # noqa: E402
from microtun_host.changelog import OperatorKey         # noqa: E402


# -- Ed25519 and SHA-512 -----------------------------------------------------------------------
def test_sha512_without_hashlib_matches_hashlib(monkeypatch):
    cases = [bytes((i * 7 + n) & 255 for i in range(n)) for n in (0, 1, 55, 111, 112, 127, 128, 129, 300)]
    want = [hashlib.sha512(d).digest() for d in cases]
    monkeypatch.setitem(sys.modules, "hashlib", None)         # the MicroPython case: no sha512
    assert [ed25519.sha512(d) for d in cases] == want


def test_ed25519_verify_agrees_with_cryptography():
    for i in range(24):
        k = Ed25519PrivateKey.generate()
        pub = k.public_key().public_bytes_raw()
        msg = os.urandom(i * 5)
        sig = k.sign(msg)
        assert ed25519.verify(pub, msg, sig)
        assert not ed25519.verify(pub, msg + b"!", sig)
        bad = bytearray(sig)
        bad[i % 64] ^= 1 << (i % 8)
        assert not ed25519.verify(pub, msg, bytes(bad))
        other = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        assert not ed25519.verify(other, msg, sig)


@pytest.mark.parametrize("pub, sig, why", [
    (bytes(31), bytes(64), "short key"),
    (bytes(32), bytes(63), "short signature"),
    (b"\xff" * 32, bytes(64), "key not a point (y >= p)"),
    ("00" * 32, bytes(64), "not bytes"),
])
def test_ed25519_bad_input_is_false_not_an_exception(pub, sig, why):
    assert ed25519.verify(pub, b"m", sig) is False, why


def test_ed25519_rejects_s_at_or_above_the_group_order():
    k = Ed25519PrivateKey.generate()
    pub = k.public_key().public_bytes_raw()
    sig = k.sign(b"m")
    s = int.from_bytes(sig[32:], "little") + ed25519._L          # the malleable twin (RFC 8032 §5.1.7)
    assert not ed25519.verify(pub, b"m", sig[:32] + s.to_bytes(32, "little"))


# -- the boot loader's state (firmware/microtun_slot.py, on CPython) -------------------------------
@pytest.fixture
def slot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("microtun_slot", None)
    import microtun_slot
    saved = list(sys.path)
    yield microtun_slot
    microtun_slot._trial = None                   # stops a guard thread
    sys.path[:] = saved
    sys.modules.pop("microtun_slot", None)


def _stage(name, version="v1", trial_s=60):
    d = Path("ota") / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"version": version, "trial_s": trial_s}))


def test_state_records_survive_a_torn_write(slot):
    assert slot.read() == (0, "base", "-", 0)
    slot.write("base", "a", 0)
    slot.write("base", "a", 1)
    assert slot.read() == (2, "base", "a", 1)
    files = sorted(Path("ota").glob("state.*"))
    assert len(files) == 2                         # the two records alternate
    newest = max(files, key=lambda p: int(p.read_text().split()[1]))
    text = newest.read_text()
    for torn in (text[:len(text) // 2], "", text.replace(" a ", " b ")):   # half written, empty, forged
        newest.write_text(torn)
        assert slot.read() == (1, "base", "a", 0)  # the older record stands
    slot.write("a", "-", 0)                        # and the next write goes over the broken one
    assert slot.read() == (2, "a", "-", 0)


def test_boot_counts_tries_then_rolls_back(slot, capsys):
    _stage("a")
    slot.write("base", "a", 0)
    for n in range(1, slot.MAX_TRIES + 1):
        slot._trial = None
        slot.boot()
        assert slot.read()[2:] == ("a", n)         # counted before the new code runs
        assert sys.path[:2] == ["ota/a", "ota/a/lib"]
        sys.path[:2] = []
    slot._trial = None
    slot.boot()                                    # MAX_TRIES boots without a commit
    assert slot.read()[1:] == ("base", "-", 0)
    assert "ota/a" not in sys.path
    assert "rolled back from a (v1) to base: 3 boots" in Path(slot.NOTE).read_text()


def test_commit_and_failure(slot):
    _stage("a", "v1")
    _stage("b", "v2")
    slot.write("base", "a", 0)
    slot.boot()
    assert slot.on_trial() == "a"
    assert slot.up() is True and slot.read()[1:] == ("a", "-", 0)
    assert slot.up() is False                      # once
    assert "committed a (v1)" in Path(slot.NOTE).read_text()
    sys.path[:2] = []
    slot.write("a", "b", 0)
    slot.boot()
    assert slot.failed("fatal error: boom") is True
    assert slot.read()[1:] == ("a", "-", 0)
    assert "rolled back from b (v2) to a: fatal error: boom" in Path(slot.NOTE).read_text()
    assert slot.failed("again") is False           # nothing on trial any more


def test_a_trial_whose_files_are_gone_is_rolled_back(slot):
    slot.write("base", "b", 0)                     # armed, then the slot vanished (wiped filesystem)
    slot.boot()
    assert slot.read()[1:] == ("base", "-", 0) and slot.on_trial() is None


def test_missing_committed_set_runs_the_flashed_files(slot):
    slot.write("a", "-", 0)
    slot.boot()
    assert "ota/a" not in sys.path and "microtun_slot" not in sys.modules


# -- bundles ------------------------------------------------------------------------------------
@pytest.fixture
def key(tmp_path):
    return OperatorKey.generate(str(tmp_path / "op.key"))


def test_a_boards_release_carries_what_flash_ships_but_the_boards_own_files(tmp_path):
    # `release build --board`: the package and runtime as .mpy and the app
    # compiled with its line numbers (flash.build_app's rule), never board.py
    # or anything else a release may not write
    app = tmp_path / "my_app.py"
    app.write_text("x = 1\n\n\ndef f():\n    return x\n")
    got = dict(release.board_files("unix", app=str(app)))
    assert not set(got) & set(release.RESERVED), sorted(got)
    assert "lib/microtun/tunnel.mpy" in got and "lib/microtun_fw.mpy" in got
    want = tmp_path / "want.mpy"
    flash.compile_app_module(app, want, "app", flash.boards()["unix"].arch)
    assert got["app.mpy"] == want.read_bytes()
    assert [p for p in got if not p.startswith("lib/")] == ["app.mpy"]


def test_bundle_round_trip_and_tampering(tmp_path, key):
    files = [("lib/microtun/x.mpy", b"M" * 100), ("app.py", b"print(1)\n")]
    b = release.Bundle.build(files, "1.2.3", key, trial_s=30)
    b.save(tmp_path / "r.mtr")
    back = release.Bundle.load(tmp_path / "r.mtr", trusted=[key.public])
    assert back.files == dict(files) and back.version == "1.2.3" and back.manifest["trial_s"] == 30
    m = json.loads(back.manifest_bytes)
    assert m["files"][0] == {"path": "lib/microtun/x.mpy", "size": 100,
                             "sha256": hashlib.sha256(b"M" * 100).hexdigest()}
    assert ed25519.verify(key.public, release.signed_message(b.manifest_bytes), bytes.fromhex(b.sig))
    back.files["app.py"] = b"print(2)\n"
    with pytest.raises(release.ReleaseError, match="app.py: not the file the manifest lists"):
        back.check()
    other = OperatorKey.generate(str(tmp_path / "other.key"))
    with pytest.raises(release.ReleaseError, match="not among the trusted keys"):
        release.Bundle.load(tmp_path / "r.mtr", trusted=[other.public])
    forged = release.Bundle(b.manifest_bytes.replace(b"1.2.3", b"1.2.4"), b.sig, dict(files))
    with pytest.raises(release.ReleaseError, match="does not verify"):
        forged.check([key.public])


@pytest.mark.parametrize("path", ["main.py", "boot.py", "microtun.json", "lib/microtun_slot.mpy", "../x.py",
                                  "/abs.py", "ota/a/x.mpy"])
def test_a_release_never_writes_the_loader_or_outside(key, path):
    with pytest.raises(release.ReleaseError, match="not a path a release may write"):
        release.Bundle.build([(path, b"x")], "1", key)


def test_release_cli_builds_from_a_make_mpy_directory(tmp_path, key, capsys):
    src = tmp_path / "mpy"
    (src / "microtun").mkdir(parents=True)
    (src / "microtun" / "a.mpy").write_bytes(b"A")
    (src / "microtun_fw.mpy").write_bytes(b"F")
    (src / "microtun_slot.mpy").write_bytes(b"L")        # the loader: never in a release
    out = tmp_path / "r.mtr"
    assert release.main(["build", str(src), "--version", "7", "--key", str(tmp_path / "op.key"),
                         "--out", str(out)]) == 0
    assert sorted(release.Bundle.load(out).files) == ["lib/microtun/a.mpy", "lib/microtun_fw.mpy"]
    (tmp_path / "op.pub").write_text(key.public.hex())
    assert release.main(["show", str(out), "--trust", str(tmp_path / "op.pub")]) == 0
    assert "signature verified" in capsys.readouterr().out
    assert release.main(["show", str(tmp_path / "nope.mtr")]) == 1
    assert "not a release bundle" in capsys.readouterr().err


# -- waves ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, waves, sizes", [
    (1, (1, 0.1, 0.5, 1.0), [1]),
    (10, (1, 0.1, 0.5, 1.0), [1, 4, 5]),
    (20, (1, 0.1, 0.5, 1.0), [1, 1, 8, 10]),
    (7, (2, 5), [2, 3, 2]),            # the last wave takes the rest
    (0, (1,), []),
])
def test_wave_plan(n, waves, sizes):
    assert rollout.plan(n, waves) == sizes


class R:
    def __init__(self, status, reason=""):
        self.status, self.reason = status, reason


def test_rollout_stops_when_a_wave_fails_too_often():
    devs = ["d%02d" % i for i in range(20)]
    bad = {"d03", "d05", "d07"}                         # all in the third wave (d02..d09)

    def one(d):
        if d == "d06":
            raise ConnectionError("no route")          # a crash in update_one is one failed device
        return R("rolled_back", "no session") if d in bad else R("updated")
    rep = rollout.rollout(devs, one, waves=(1, 0.1, 0.5, 1.0), max_failure_rate=0.25, parallel=3)
    d = rep.as_dict()
    assert [w["devices"] for w in d["waves"]] == [devs[:1], devs[1:2], devs[2:10]]
    assert d["waves"][2]["failures"] == 4 and d["waves"][2]["rate"] == 0.5
    assert d["rolled_back"] == sorted(bad) and d["failed"] == ["d06"]
    assert d["skipped"] == devs[10:] and "wave 3: 4 of 8" in d["stopped"]
    assert "ConnectionError: no route" in d["results"]["d06"]["reason"]
    ok = rollout.rollout(devs, lambda d: R("updated"), max_failure_rate=0.0)
    assert ok.stopped is None and len(ok.devices("updated")) == 20


def test_rollout_bad_arguments_are_one_line():
    with pytest.raises(ValueError, match="listed twice"):
        rollout.rollout(["a", "a"], lambda d: R("updated"))
    with pytest.raises(ValueError, match="waves: expected positive"):
        rollout.rollout(["a"], lambda d: R("updated"), waves=(0,))


# -- the device, for real (one rig for all scenarios) ----------------------------------------------------
@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    import ota_lab
    # the real ops channel (docs/OPS.md); a faulty release that never connects is waited out: 2 s
    lab = ota_lab.Lab(tmp_path_factory.mktemp("ota"), ops=True, fault_trial_s=2)
    up, st = ota_lab.settle(lab)
    assert up, lab.device.text[-2000:]
    yield lab
    lab.close()


def _update(lab, fault):
    r = release.update_device(lab.client, lab.bundle(fault), timeout_s=40)
    import ota_lab
    up, st = ota_lab.settle(lab)
    assert up, "the device did not come back: %s" % lab.device.text[-3000:]
    return r, st


def test_a_good_release_is_committed_once_the_tunnel_is_up(lab):
    r, st = _update(lab, "good")
    assert r.status == "updated", r
    assert st["running_version"] == r.version == st["committed_version"]
    assert "committed" in r.reason
    assert lab.rig.wait_established(5)["established"]       # the gateway sees the new code's session


@pytest.mark.parametrize("fault, why", [
    ("no_connect", r"no session with the gateway within 2 s"),
    ("raises", r"fatal error: RuntimeError\('release bug: app.py raises at import'"),
    ("fw_raises", r"cannot import microtun_fw: ImportError\('release bug: microtun_fw raises at import'"),
    ("hangs", r"no session with the gateway within 2 s"),
])
def test_a_bad_release_is_rolled_back_to_the_last_good_set(lab, fault, why):
    import re
    before = lab.status()
    r, st = _update(lab, fault)
    assert r.status == "rolled_back", r
    assert re.search(why, r.reason), r.reason
    assert st["running"] == before["running"] and st["running_version"] == before["running_version"]
    assert re.search(r"warn update: rolled back from \w+ \(%s\)" % re.escape(r.version),
                     (lab.board / "microtun.log").read_text())               # and in the device log


def _staged(lab, bundle):
    b = release.device_call(lab.client, "begin()")
    lab.client.put(b["dir"] + "/manifest.json", bundle.manifest_bytes)
    lab.client.put(b["dir"] + "/manifest.sig", (bundle.sig + "\n").encode())
    return b["dir"]


def test_unsigned_wrongly_signed_tampered_or_too_big_is_refused(lab, tmp_path):
    import ota_lab
    before = lab.status()
    good = lab.bundle("good")
    other = OperatorKey.generate(str(tmp_path / "other.key"))
    forged = release.Bundle.build(sorted(good.files.items()), "forged", other)
    tampered = release.Bundle(good.manifest_bytes.replace(b'"trial_s":8', b'"trial_s":9'), good.sig, good.files)
    cases = [(forged, "check()", r"signed by operator [0-9a-f]{16}…, which microtun.json does not trust"),
             (tampered, "check()", r"manifest.sig does not verify under operator"),
             (release.Bundle(good.manifest_bytes, "", good.files), "check()", "unsigned release"),
             (good, "free_bytes = lambda: 5000\n_u.check()", r"not enough room: the release needs \d+ bytes, 5000"),
             ]
    # the ops channel's exec runs in the firmware's own process: the room
    # stand-in below is undone afterwards, or later updates would see it
    lab.client.exec("from microtun import update as _u\n_free_bytes_orig = _u.free_bytes\n")
    try:
        for bundle, call, why in cases:
            _staged(lab, bundle)
            with pytest.raises(release.Refused, match=why):
                release.device_call(lab.client, call)
    finally:
        lab.client.exec("_u.free_bytes = _free_bytes_orig\n")
    # a file changed in transit: arm refuses it, nothing is armed
    d = _staged(lab, good)
    release.make_dirs(lab.client, d, good.files)
    for p, data in good.files.items():
        lab.client.put(d + "/" + p, data if p != "app.mpy" else data + b"#")
    with pytest.raises(release.Refused, match=r"1 file\(s\) missing or not as the manifest says: app.mpy"):
        release.device_call(lab.client, "arm()")
    st = lab.status()
    assert st["trial"] is None and st["committed"] == before["committed"] and lab.device.up()
    log = (lab.board / "microtun.log").read_text()
    assert "update check refused: manifest.sig does not verify" in log and "update arm refused" in log
    # through update_device: one line, stage named, the device untouched
    r = release.update_device(lab.client, forged, timeout_s=20)
    assert r.status == "failed" and r.stage == "check" and "does not trust" in r.reason
    assert ota_lab.settle(lab)[1]["running_version"] == before["running_version"]


def test_ops_update_and_rollout_commands(lab, tmp_path):
    """`microtun ops DEVICE update` and `microtun release rollout`, through
    the gateway's ops channel as an operator types them."""
    import ota_lab
    env = dict(os.environ, PYTHONPATH=str(ROOT / "lib"))
    gw = str(lab.rig.dir / "gateway.json")
    key = str(lab.dir / "operator.key")
    for i, argv in enumerate((["ops", "dev1", "--config", gw, "--operator-key", key, "update", "{b}", "--wait", "40"],
                              ["release", "rollout", "{b}", "--devices", "dev1", "--config", gw,
                               "--operator-key", key, "--wait", "40"])):
        b = lab.bundle("good")
        path = tmp_path / ("r%d.zip" % i)
        b.save(path)
        r = subprocess.run([sys.executable, "-m", "microtun_host.cli"] + [a.replace("{b}", str(path)) for a in argv],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert ("dev1: updated %s" % b.version) in r.stdout or "1 updated" in r.stdout, r.stdout
        assert ota_lab.settle(lab)[1]["committed_version"] == b.version
    r = subprocess.run([sys.executable, "-m", "microtun_host.cli", "ops", "dev1", "--config", gw, "--operator-key",
                        key, "update", str(tmp_path / "nope.zip")], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 2 and "not a release bundle" in r.stderr and "Traceback" not in r.stderr


def test_power_cuts_during_staging_and_switch_over_never_brick(lab):
    import ota_lab
    seed = int(time.time()) % 1000         # new points every run; the seed replays a failure
    res = ota_lab.power_cut_soak(lab, 4, seed=seed)
    assert all(r["up"] and r["ok"] for r in res), ("seed %d" % seed, res)


# -- provisioning: which operators a device trusts --------------------------------------------------
def test_provision_writes_the_trusted_update_operators(tmp_path, key):
    from microtun_host import provision
    topo = (ROOT / "examples" / "topology.toml").read_text()
    good = topo.replace('name = "sensor-1"\n', 'name = "sensor-1"\nupdate_operators = ["%s"]\n' % key.public.hex().upper(), 1)
    (tmp_path / "t.toml").write_text(good)
    provision.provision(tmp_path / "t.toml", tmp_path / "out")
    d = json.loads((tmp_path / "out" / "devices" / "sensor-1.json").read_text())
    assert d["update"] == {"operators": [key.public.hex()]}
    assert "update" not in json.loads((tmp_path / "out" / "devices" / "sensor-2.json").read_text())
    (tmp_path / "bad.toml").write_text(topo.replace('name = "sensor-1"\n', 'name = "sensor-1"\nupdate_operators = ["abc"]\n', 1))
    with pytest.raises(Exception, match=r"update_operators\[0\]: expected an Ed25519 public key"):
        provision.provision(tmp_path / "bad.toml", tmp_path / "out2")
