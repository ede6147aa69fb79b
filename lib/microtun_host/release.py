"""Code releases: build and sign a bundle, put it on one device over the ops
channel with automatic rollback (docs/UPDATE.md).

    microtun release build --board unix --version 2026.12.07-1 --key operator.key --out rel.mtr
    microtun release build DIR --version V --key operator.key --out rel.mtr   # a directory
    microtun release show rel.mtr [--trust operator.pub]          # (or python -m microtun_host.release ...)

    bundle = Bundle.load("rel.mtr", trusted=[pub])           # signature and hashes checked here too
    result = update_device(client, bundle, timeout_s=120)     # client: microtun_host.ops.OpsClient
    result.status  # "updated" | "rolled_back" | "failed"; result.reason; result.seconds

A bundle is a zip file: manifest.json (the exact bytes signed), manifest.sig
(hex) and files/<path> for every file the manifest lists. The manifest
names every file's path on the device (lib/microtun/tunnel.mpy, app.py),
size and SHA-256, the release version, the operator's public key and
trial_s, the time the device gives the new code to reach the gateway.
The signature is Ed25519 by the operator key (the same key file as the
change log, microtun_host.changelog.OperatorKey) over
b"microtun release v1\\n" + SHA-256(manifest.json): the device hashes the
manifest with its C SHA-256 and runs Ed25519 over 52 bytes only
(lib/microtun/ed25519.py, pure Python).

update_device uses only the OpsClient calls exec, put, reboot and wait_up,
and the device API in lib/microtun/update.py (begin, check, arm, status).
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

PREFIX = b"microtun release v1\n"
VERSION = 1
TRIAL_S = 60
# never in a release (lib/microtun/update.py refuses them too): the loader and the device's own files
RESERVED = ("main.py", "boot.py", "board.py", "board.mpy", "microtun.json", "lib/microtun_slot.mpy", "lib/microtun_slot.py",
            "manifest.json", "manifest.sig", "microtun_boot.bin", "microtun_fw.txt", "microtun.log",
            "microtun.log.1", "SAFE", "safe_mode")
MAX_FILES = 400


class ReleaseError(Exception):
    """A bundle or key that cannot be used: one line naming it and why."""


# -- building and signing --------------------------------------------------------------------
def collect(src):
    """[(device path, bytes)] from a directory laid out as the board's
    filesystem (lib/..., app.py) or as `make mpy` leaves it (microtun/,
    microtun_fw.mpy at the top: those go under lib/). Reserved files (the
    loader, main.py, boot.py, board.py, the config) are left out."""
    src = Path(src)
    if not src.is_dir():
        raise ReleaseError("%s: not a directory" % src)
    mpy_layout = (src / "microtun").is_dir() and not (src / "lib").exists()
    out = []
    for p in sorted(src.rglob("*")):
        if not p.is_file() or "__pycache__" in p.parts:
            continue
        rel = p.relative_to(src).as_posix()
        if mpy_layout and (rel.startswith("microtun/") or rel.endswith(".mpy")):
            rel = "lib/" + rel
        if rel in RESERVED:
            continue
        out.append((rel, p.read_bytes()))
    if not out:
        raise ReleaseError("%s: no files to release" % src)
    return out


def board_files(board_name, app=None, log=lambda *a: None):
    """The file set `microtun flash` puts on a board of that kind, compiled
    now: the package and firmware runtime as .mpy, plus the app as app.mpy
    (as flash.build_app compiles it; board.py is the board's own, never in
    a release)."""
    from microtun_host import flash
    known = flash.boards()
    if board_name not in known:
        raise ReleaseError("unknown board %r; known: %s" % (board_name, ", ".join(sorted(known))))
    with tempfile.TemporaryDirectory(prefix="microtun-release-") as tmp:
        b = known[board_name]
        files = flash.build(b, Path(tmp) / "out", log=log)
        app_mpy = Path(tmp) / "app.mpy"
        flash.compile_app_module(app or flash.FIRMWARE / "app.py", app_mpy, "app", b.arch)
        files.append((app_mpy, "app.mpy"))
        return [(remote, Path(local).read_bytes()) for local, remote in files if remote not in RESERVED]


def make_manifest(files, version, operator_public, trial_s=TRIAL_S):
    if not isinstance(version, str) or not 0 < len(version) <= 64:
        raise ReleaseError("version: expected 1..64 characters")
    if not isinstance(trial_s, int) or not 1 <= trial_s <= 3600:
        raise ReleaseError("trial_s: expected 1..3600 seconds")
    if len(files) > MAX_FILES:
        raise ReleaseError("%d files: at most %d in one release" % (len(files), MAX_FILES))
    seen = set()
    for path, _ in files:
        if path in RESERVED or path.startswith("/") or ".." in path.split("/") or path.startswith("ota/"):
            raise ReleaseError("%s: not a path a release may write" % path)
        if path in seen:
            raise ReleaseError("%s: listed twice" % path)
        seen.add(path)
    m = {"v": VERSION, "version": version, "operator": operator_public.hex(), "trial_s": trial_s,
         "files": [{"path": p, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for p, d in files]}
    return json.dumps(m, sort_keys=True, separators=(",", ":")).encode()


def signed_message(manifest_bytes):
    return PREFIX + hashlib.sha256(manifest_bytes).digest()


class Bundle:
    """A signed release: manifest (bytes and dict), sig (hex), files {path: bytes}."""

    def __init__(self, manifest_bytes, sig_hex, files):
        self.manifest_bytes = manifest_bytes
        self.sig = sig_hex
        self.files = files
        try:
            self.manifest = json.loads(manifest_bytes)
        except ValueError:
            raise ReleaseError("manifest.json is not JSON")
        self.version = self.manifest.get("version")

    @classmethod
    def build(cls, files, version, key, trial_s=TRIAL_S):
        """files: [(device path, bytes)]; key: changelog.OperatorKey."""
        mb = make_manifest(files, version, key.public, trial_s)
        return cls(mb, key.sign(signed_message(mb)).hex(), dict(files))

    @property
    def size(self):
        return sum(len(d) for d in self.files.values())

    def save(self, path):
        tmp = str(path) + ".tmp"
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("manifest.json", self.manifest_bytes)
            z.writestr("manifest.sig", self.sig + "\n")
            for p, d in self.files.items():
                z.writestr("files/" + p, d)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path, trusted=None):
        try:
            with zipfile.ZipFile(path) as z:
                mb = z.read("manifest.json")
                sig = z.read("manifest.sig").decode().strip()
                files = {n[6:]: z.read(n) for n in z.namelist() if n.startswith("files/")}
        except (OSError, zipfile.BadZipFile, KeyError, UnicodeError) as e:
            raise ReleaseError("%s: not a release bundle (%s)" % (path, e))
        b = cls(mb, sig, files)
        b.check(trusted)
        return b

    def check(self, trusted=None):
        """Every file as the manifest says; with trusted (public keys), the signature too."""
        listed = {f["path"]: f for f in self.manifest.get("files", [])}
        if set(listed) != set(self.files):
            raise ReleaseError("the bundle's files differ from its manifest: %s"
                               % sorted(set(listed) ^ set(self.files))[:5])
        for p, d in self.files.items():
            f = listed[p]
            if (len(d), hashlib.sha256(d).hexdigest()) != (f["size"], f["sha256"]):
                raise ReleaseError("%s: not the file the manifest lists (tampered bundle?)" % p)
        if trusted is not None:
            from cryptography.exceptions import InvalidSignature
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
            op = bytes.fromhex(self.manifest.get("operator", ""))
            if op not in [bytes(k) for k in trusted]:
                raise ReleaseError("signed by operator %s…, which is not among the trusted keys" % op.hex()[:16])
            try:
                Ed25519PublicKey.from_public_bytes(op).verify(bytes.fromhex(self.sig), signed_message(self.manifest_bytes))
            except (InvalidSignature, ValueError):
                raise ReleaseError("the signature does not verify: tampered or wrongly signed")


# -- one device --------------------------------------------------------------------------------
class UpdateResult:
    """status: "updated", "rolled_back" or "failed"; reason (one line);
    stage (where it ended); seconds; version; status_after (the device's
    update status, when it answered)."""

    def __init__(self, status, reason="", stage="", seconds=0.0, version=None, device=None):
        self.status = status
        self.reason = reason
        self.stage = stage
        self.seconds = seconds
        self.version = version
        self.device = device

    @property
    def ok(self):
        return self.status == "updated"

    def as_dict(self):
        return {"status": self.status, "reason": self.reason, "stage": self.stage,
                "seconds": round(self.seconds, 3), "version": self.version, "device": self.device}

    def __repr__(self):
        return "UpdateResult(%s)" % self.as_dict()


class Refused(Exception):
    """The device said no (one line from lib/microtun/update.py)."""


def device_call(client, call):
    """Run microtun.update.<call> on the device; its MTUPD result dict."""
    # the call's return value is printed by the snippet itself: an exec
    # through the ops channel captures the snippet's print(), not the
    # module's (that goes to the device's console)
    head, _, last = ("_u." + call).rpartition("\n")    # statements first (a test's stand-in), then the call
    out = client.exec("import json as _j\nfrom microtun import update as _u\n%s\nprint('MTUPD ' + _j.dumps(%s))\n"
                      % (head, last))
    for line in reversed(out.splitlines()):
        if line.startswith("MTUPD "):
            d = json.loads(line[6:])
            if "error" in d:
                raise Refused(d["error"])
            return d
    raise Refused("no answer from microtun.update.%s on the device: %r" % (call, out.strip()[-200:]))


def make_dirs(client, base, paths):
    """Create the directories of `paths` under `base` on the device, parents
    first: a put through the ops channel creates no directory."""
    dirs = sorted({"/".join(p.split("/")[:i]) for p in paths for i in range(1, p.count("/") + 1)},
                  key=lambda x: (x.count("/"), x))
    if dirs:
        client.exec("import os\nfor _d in %r:\n    try:\n        os.mkdir(%r + '/' + _d)\n"
                    "    except OSError:\n        pass\n" % (dirs, base))


def update_device(client, bundle, timeout_s=120.0, progress=None):
    """Stage bundle beside the running code, verify and arm it on the
    device, reboot, and wait until the device answers again with the new
    release committed or rolled back. Never raises for a device problem:
    the result says what happened."""
    say = progress or (lambda msg: None)
    t0 = time.monotonic()
    stage = "begin"
    try:
        from microtun_host.ops import OpsError     # the real client's error, when it is there
    except ImportError:
        OpsError = None
    errors = (Refused, OSError, ValueError) + ((OpsError,) if OpsError is not None else ())

    def result(status, reason, at):
        return UpdateResult(status, reason, at, time.monotonic() - t0, bundle.version)
    try:
        b = device_call(client, "begin()")
        d = b["dir"]
        say("staging %s (%d files, %s B) in %s, beside the running %s" % (
            bundle.version, len(bundle.files), "{:,}".format(bundle.size), d, b.get("running")))
        stage = "check"
        client.put(d + "/manifest.json", bundle.manifest_bytes)
        client.put(d + "/manifest.sig", (bundle.sig + "\n").encode())
        device_call(client, "check()")
        stage = "transfer"
        make_dirs(client, d, bundle.files)
        done = 0
        for i, (p, data) in enumerate(sorted(bundle.files.items())):
            client.put(d + "/" + p, data)
            done += len(data)
            say("put [%d/%d] %s (%s/%s B)" % (i + 1, len(bundle.files), p, "{:,}".format(done),
                                            "{:,}".format(bundle.size)))
        stage = "arm"
        a = device_call(client, "arm()")
        armed = a["armed"]
        say("armed %s: trial of %d s, at most %d boots" % (armed, a["trial_s"], a["tries"]))
    except errors as e:
        return result("failed", "%s: %s" % (stage, e), stage)
    stage = "reboot"
    try:
        client.reboot()
    except errors as e:
        say("reboot: %s (the device may still be restarting)" % e)
    last = None
    while time.monotonic() - t0 < timeout_s:
        left = timeout_s - (time.monotonic() - t0)
        try:
            if not client.wait_up(left):
                break
            st = device_call(client, "status()")
        except errors as e:
            last = str(e)
            time.sleep(0.2)
            continue
        if st["trial"] is not None:
            time.sleep(0.2)          # up, but the trial is not decided yet
            continue
        if st["committed"] == armed and st["committed_version"] == bundle.version:
            say("updated: %s" % st["last"])
            return result("updated", st["last"], "committed")
        say("rolled back: %s" % st["last"])
        return result("rolled_back", st["last"] or "the device runs %s" % st["committed"], "rollback")
    return result("failed", "no answer within %.0f s after the reboot%s" % (
        timeout_s, "" if last is None else " (last: %s)" % last), "wait")


# -- the command -------------------------------------------------------------------------------
def keys_from_files(paths):
    """Operator public keys from files of 64 hex characters (ReleaseError if not)."""
    return _keys(paths)


def _keys(paths):
    out = []
    for p in paths or []:
        try:
            text = Path(p).read_text().strip()
        except (OSError, UnicodeError) as e:
            raise ReleaseError("%s: cannot read the public key file (%s)" % (p, getattr(e, "strerror", None) or e))
        try:
            k = bytes.fromhex(text)
        except ValueError:
            k = b""
        if len(k) != 32:
            raise ReleaseError("%s: expected an Ed25519 public key (64 hex characters)" % p)
        out.append(k)
    return out


def _arguments(sub):
    b = sub.add_parser("build", help="build and sign a release bundle")
    b.add_argument("dir", nargs="?", help="files laid out as on the board (or as `make mpy` leaves them)")
    b.add_argument("--board", help="compile the file set `microtun flash` puts on this board instead")
    b.add_argument("--app", help="with --board: the application (default firmware/app.py)")
    b.add_argument("--version", required=True)
    b.add_argument("--key", required=True, help="the operator key file (`microtun fleet keygen`)")
    b.add_argument("--trial-s", type=int, default=TRIAL_S, help="seconds the new code has to reach the gateway")
    b.add_argument("--out", required=True)
    r = sub.add_parser("rollout", help="update devices in waves through their gateway, stopping when a wave "
                                      "fails too often (docs/UPDATE.md)")
    r.add_argument("bundle")
    r.add_argument("--devices", required=True, help="comma-separated device names, in rollout order")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--config", metavar="FILE", help="the gateway's config (its control socket is read from it)")
    g.add_argument("--control", metavar="SOCKET", help="the gateway's control socket")
    r.add_argument("--operator-key", required=True, metavar="FILE", help="logs in to each device's ops channel")
    r.add_argument("--waves", default="1,0.1,0.5,1.0",
                   help="devices updated by the end of each wave: counts (1) or fractions (0.5); default 1,0.1,0.5,1.0")
    r.add_argument("--max-failure-rate", type=float, default=0.2, help="stop when a wave fails more (default 0.2)")
    r.add_argument("--parallel", type=int, default=4)
    r.add_argument("--wait", type=float, default=120.0, metavar="S", help="per device, after its reboot")
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    s = sub.add_parser("show", help="check a bundle and print its manifest")
    s.add_argument("bundle")
    s.add_argument("--trust", action="append", help="a public key file: check the signature against it")


def run(a):
    from microtun_host.changelog import OperatorKey, LogError
    try:
        if a.release_cmd == "build":
            if bool(a.dir) == bool(a.board):
                raise ReleaseError("give a directory or --board, not both or neither")
            key = OperatorKey.load(a.key)
            files = board_files(a.board, a.app) if a.board else collect(a.dir)
            bundle = Bundle.build(files, a.version, key, a.trial_s)
            bundle.save(a.out)
            print("release %s: %d files, %s B, signed by %s…, trial %d s -> %s" % (
                a.version, len(files), "{:,}".format(bundle.size), key.public.hex()[:16], a.trial_s, a.out))
        elif a.release_cmd == "rollout":
            return _rollout(a)
        else:
            bundle = Bundle.load(a.bundle, _keys(a.trust) if a.trust else None)
            print(json.dumps(bundle.manifest, indent=1))
            print("%s: %d files, %s B, %s" % (a.bundle, len(bundle.files), "{:,}".format(bundle.size),
                                             "signature verified" if a.trust else "hashes checked (no --trust)"))
        return 0
    except (ReleaseError, LogError) as e:
        print("microtun release: %s" % e, file=sys.stderr)
        return 1


def _waves(text):
    out = []
    for w in text.split(","):
        w = w.strip()
        try:
            out.append(float(w) if "." in w else int(w))
        except ValueError:
            raise ReleaseError("--waves: %r is neither a device count (3) nor a fraction (0.5)" % w)
    return tuple(out)


def _rollout(a):
    from microtun_host import rollout as ro
    from microtun_host.ops import OpsClient
    devices = [d.strip() for d in a.devices.split(",") if d.strip()]
    if not devices:
        raise ReleaseError("--devices: no device named")
    bundle = Bundle.load(a.bundle)
    where = a.config or a.control

    def update_one(name):
        return update_device(OpsClient.connect(where, name, a.operator_key), bundle, timeout_s=a.wait,
                             progress=lambda msg: print("  %s: %s" % (name, msg), flush=True))
    try:
        rep = ro.rollout(devices, update_one, waves=_waves(a.waves), max_failure_rate=a.max_failure_rate,
                         parallel=a.parallel, log=lambda msg: print(msg, flush=True))
    except ValueError as e:
        raise ReleaseError(str(e))
    if a.json:
        print(json.dumps(rep.as_dict(), indent=1))
    print("rollout of %s: %d updated, %d rolled back, %d failed, %d not touched%s" % (
        bundle.version, len(rep.devices("updated")), len(rep.devices("rolled_back")), len(rep.devices("failed")),
        len(rep.skipped), "; stopped: %s" % rep.stopped if rep.stopped else ""))
    return 0 if rep.stopped is None and len(rep.devices("updated")) == len(devices) else 1


def main(argv=None):
    ap = argparse.ArgumentParser(prog="microtun release")
    _arguments(ap.add_subparsers(dest="release_cmd", required=True))
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
