"""Code over the air, the device's side (docs/UPDATE.md): stage a release
beside the running code, verify it, arm it for the next boot.

The host drives it with ops exec, file puts and a reboot
(microtun_host/release.py, update_device):

    from microtun import update as u; u.begin()     # MTUPD {"dir": "ota/b", "free": ...}
    put ota/b/manifest.json, ota/b/manifest.sig
    from microtun import update as u; u.check()     # signature, shape, room: refuse before any file moves
    put ota/b/<path> for every file of the manifest
    from microtun import update as u; u.arm()       # every size and SHA-256, the signature again; armed
    reboot; the loader (microtun_slot) runs the new set on trial
    from microtun import update as u; u.status()    # committed, or rolled back and why

Each call prints one line "MTUPD <json>": the result, or {"error": "..."}
naming what is wrong and what to do; a refusal is also written to the
device log, and the running code and the committed set are untouched by
every step here: files only ever go to the slot that is neither committed
nor running, and the one switch is the state record arm() writes.

The manifest (JSON, the exact bytes signed):
    {"v": 1, "version": "2026.12.07-1", "operator": "<Ed25519 public key hex>", "trial_s": 60,
     "files": [{"path": "lib/microtun/tunnel.mpy", "size": 4711, "sha256": "<hex>"}, ...]}
manifest.sig: the operator's Ed25519 signature (hex) of
    b"microtun release v1\\n" + SHA-256(manifest bytes)
which the device checks against the keys its microtun.json trusts:
    "update": {"operators": ["<Ed25519 public key hex>", ...]}
"""
import json
import os

import microtun_slot as slot

PREFIX = b"microtun release v1\n"
VERSION = 1
MAX_FILES = 400
MAX_MANIFEST = 64 * 1024
MARGIN = 4096                # bytes left free after staging (logs, state records)
CONFIG = "microtun.json"
# never part of a release: the loader, what the loader needs, the device's own files
RESERVED = ("main.py", "boot.py", "board.py", "board.mpy", "microtun.json", "lib/microtun_slot.mpy", "lib/microtun_slot.py",
            "manifest.json", "manifest.sig", "microtun_boot.bin", "microtun_fw.txt", "microtun.log",
            "microtun.log.1", "SAFE", "safe_mode")


class UpdateError(Exception):
    pass


def _out(d):
    print("MTUPD " + json.dumps(d))
    return d


def _refuse(what, e):
    msg = "update %s refused: %s" % (what, e)
    try:
        import microtun_fw
        microtun_fw.Log(microtun_fw.read_state()[0]).write("error " + msg)
    except Exception:
        pass
    return _out({"error": str(e)})


def _rm(p):
    try:
        if os.stat(p)[0] & 0x4000:
            for n in os.listdir(p):
                _rm(p + "/" + n)
            os.rmdir(p)
        else:
            os.remove(p)
    except OSError:
        pass


def _mkdirs(p):
    cur = ""
    for part in p.split("/")[:-1]:
        cur = part if not cur else cur + "/" + part
        try:
            os.mkdir(cur)
        except OSError:
            pass


def free_bytes():
    try:
        s = os.statvfs(".")
        return s[0] * s[4]
    except (OSError, AttributeError):
        return None


def staging():
    """The slot a new release goes to: not the committed set, not the running one."""
    cur = slot.read()[1]
    run = slot.running()
    for s in slot.SLOTS:
        if s != cur and s != run:
            return s
    raise UpdateError("no free slot (committed %s, running %s)" % (cur, run))


def begin():
    """Cancel a pending (not yet booted) trial, empty the staging slot."""
    try:
        seq, cur, trial, tries = slot.read()
        if trial != slot.NONE and tries > 0:
            raise UpdateError("%s is on trial right now (boot %d); wait until it is committed or rolled back"
                              % (trial, tries))
        if trial != slot.NONE:
            slot.write(cur, slot.NONE, 0)
        s = staging()
        d = slot.set_dir(s)
        _rm(d)
        _mkdirs(d + "/x")
        return _out({"dir": d, "slot": s, "free": free_bytes(), "running": slot.running(), "committed": cur})
    except (UpdateError, OSError) as e:
        return _refuse("begin", e)


def trusted():
    """The operator keys this device's config trusts for updates (bytes)."""
    try:
        with open(CONFIG) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise UpdateError("%s: cannot read it (%s)" % (CONFIG, e))
    keys = (cfg.get("update") or {}).get("operators") if isinstance(cfg, dict) else None
    if not keys:
        raise UpdateError("%s trusts no operator key for updates; add \"update\": {\"operators\": "
                          "[\"<public key hex>\"]} (microtun provision writes it from update_operators in the "
                          "device's [[device]] table)" % CONFIG)
    out = []
    for k in keys:
        try:
            b = bytes.fromhex(k)
        except (ValueError, TypeError):
            b = b""
        if len(b) != 32:
            raise UpdateError("%s: update.operators: expected 64 hex characters per key, got %r" % (CONFIG, k))
        out.append(b)
    return out


def _path_ok(p):
    if not isinstance(p, str) or not p or len(p) > 96 or p.startswith("/") or "\\" in p:
        return False
    for part in p.split("/"):
        if part in ("", ".", ".."):
            return False
    return p not in RESERVED and not p.startswith(slot.DIR + "/")


def parse(text):
    """The manifest's dict from its bytes, or UpdateError naming the field."""
    try:
        m = json.loads(text)
    except ValueError:
        raise UpdateError("manifest.json is not JSON (a truncated transfer?)")
    if not isinstance(m, dict) or m.get("v") != VERSION:
        raise UpdateError("manifest.json: expected {\"v\": %d, ...}" % VERSION)
    if not isinstance(m.get("version"), str) or not 0 < len(m["version"]) <= 64:
        raise UpdateError("manifest.json: version: expected a string of 1..64 characters")
    t = m.get("trial_s")
    if not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= 3600:
        raise UpdateError("manifest.json: trial_s: expected 1..3600 seconds")
    files = m.get("files")
    if not isinstance(files, list) or not 0 < len(files) <= MAX_FILES:
        raise UpdateError("manifest.json: files: expected a list of 1..%d files" % MAX_FILES)
    seen = set()
    for i, f in enumerate(files):
        if not isinstance(f, dict) or not _path_ok(f.get("path")) or f["path"] in seen:
            raise UpdateError("manifest.json: files[%d].path: expected a new relative path, not one of %s "
                              "and not under %s/" % (i, ", ".join(RESERVED[:5]), slot.DIR))
        seen.add(f["path"])
        n, h = f.get("size"), f.get("sha256")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise UpdateError("manifest.json: files[%d].size: expected a byte count" % i)
        if not isinstance(h, str) or len(h) != 64:
            raise UpdateError("manifest.json: files[%d].sha256: expected 64 hex characters" % i)
    return m


def _read(path, limit):
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UpdateError("%s: larger than %d bytes" % (path, limit))
    return data


def _verified(d):
    """Read, verify and parse the staged manifest: (manifest dict, bytes)."""
    import hashlib
    from microtun.ed25519 import verify
    try:
        text = _read(d + "/manifest.json", MAX_MANIFEST)
        sig_text = _read(d + "/manifest.sig", 200).strip()
    except OSError:
        raise UpdateError("no manifest in %s: put manifest.json and manifest.sig there first (after begin)" % d)
    m = parse(text)
    try:
        sig = bytes.fromhex(sig_text.decode())
    except (ValueError, UnicodeError):
        sig = b""
    if len(sig) != 64:
        raise UpdateError("manifest.sig: expected an Ed25519 signature (128 hex characters); unsigned release?")
    keys = trusted()
    op = m.get("operator")
    try:
        opk = bytes.fromhex(op) if isinstance(op, str) else b""
    except ValueError:
        opk = b""
    if opk not in keys:
        raise UpdateError("manifest signed by operator %s…, which %s does not trust" % (str(op)[:16], CONFIG))
    if not verify(opk, PREFIX + hashlib.sha256(text).digest(), sig):
        raise UpdateError("manifest.sig does not verify under operator %s…: tampered or wrongly signed" % op[:16])
    return m, text


def check():
    """Before the files move: a signed manifest this device trusts, and room for it."""
    try:
        d = slot.set_dir(staging())
        m, _ = _verified(d)
        need = sum(f["size"] for f in m["files"])
        free = free_bytes()
        if free is not None and need + MARGIN > free:
            raise UpdateError("not enough room: the release needs %d bytes, %d are free (keep %d): "
                              "nothing was changed" % (need, free, MARGIN))
        return _out({"dir": d, "version": m["version"], "files": len(m["files"]), "bytes": need, "free": free})
    except (UpdateError, OSError) as e:
        return _refuse("check", e)


def _digest(path):
    import hashlib
    import binascii
    h = hashlib.sha256()
    n = 0
    buf = bytearray(512)
    with open(path, "rb") as f:
        while True:
            k = f.readinto(buf)
            if not k:
                break
            n += k
            h.update(buf if k == len(buf) else buf[:k])
    return n, binascii.hexlify(h.digest()).decode()


def arm():
    """Verify the whole staged set (signature, every size and SHA-256), then
    one state record makes it the set the next boot tries."""
    try:
        s = staging()
        d = slot.set_dir(s)
        m, _ = _verified(d)
        bad = []
        for f in m["files"]:
            try:
                got = _digest(d + "/" + f["path"])
            except OSError:
                got = None
            if got != (f["size"], f["sha256"]):
                bad.append(f["path"] if got is None else "%s (%d B)" % (f["path"], got[0]))
        if bad:
            raise UpdateError("%d file(s) missing or not as the manifest says: %s; put them again"
                              % (len(bad), ", ".join(bad[:5])))
        seq, cur, trial, tries = slot.read()
        slot.write(cur, s, 0)
        slot.note("armed %s (%s): the next boot tries it" % (s, m["version"]))
        return _out({"armed": s, "version": m["version"], "trial_s": m["trial_s"], "tries": slot.MAX_TRIES})
    except (UpdateError, OSError) as e:
        return _refuse("arm", e)


def status():
    seq, cur, trial, tries = slot.read()
    try:
        with open(slot.NOTE) as f:
            last = f.read().strip()
    except OSError:
        last = ""
    run = slot.running()
    return _out({"running": run, "running_version": slot.version(run), "committed": cur,
                 "committed_version": slot.version(cur), "trial": None if trial == slot.NONE else trial,
                 "tries": tries, "last": last})
