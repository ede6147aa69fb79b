"""Issue 13's update figures (docs/UPDATE.md, docs/FIGURES.md): one JSON object.

    .venv/bin/python tools/bench_update.py --ops [--loss 0.05] [--rounds 3] [--points 20]   # make bench-update
    .venv/bin/python tools/bench_update.py [--client module:factory]     # test-only DirClient by default

A unix-port device (the real firmware, loader and update code) behind the
link emulator (tools/netem.py, `--loss` each way on both paths) in front of
two PoPs and a gateway, all on loopback (host_tests/ota_lab.py):

  update_s      a full release (every .mpy file the board runs, the firmware
                runtime, app.py) staged, verified, armed, rebooted into and
                committed, per round; target <= 10 s at 5 % loss
  reboot_s      the floor, same rig and run: reboot into the same code and
                wait for the tunnel (update_s / reboot_s is the ratio)
  rollback      one release per fault (no_connect, raises, fw_raises,
                hangs): the result and whether the device came back on its
                last good set
  power_cuts    --points random moments, half inside staging (begin, the
                manifest, check, a file, arm), half in the switch-over (the
                power fails 0..1.2 s after the reboot): devices bricked

`--ops` (what `make bench-update` runs) updates through the real ops
channel: microtun_host.ops.OpsClient, the gateway, the E2E tunnel and the
lossy link, as `microtun ops DEVICE update` does. Without it, `--client
module:factory` makes the client from the device (otadev.Device); the
default is host_tests/otadev.py's DirClient, which is TEST ONLY (files move
by host file writes, exec in a second process): the transfer does not
cross the lossy link. The power cuts always use the test-only clients
(DirClient in staging: its cut points sit inside a put or an exec;
FlickerClient in the switch-over), whatever --ops says.
"""
import argparse
import importlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "host_tests"))
sys.path.insert(0, str(ROOT / "lib"))

import ota_lab                                    # noqa: E402
from microtun_host import release                 # noqa: E402


def factory(spec):
    if not spec:
        return None
    mod, _, name = spec.partition(":")
    return getattr(importlib.import_module(mod), name)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--loss", type=float, default=0.05)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--client", help="module:factory(device) for the client (default: otadev.DirClient, test only)")
    ap.add_argument("--ops", action="store_true", help="the real ops channel's OpsClient through the gateway and "
                    "the tunnel (the files cross the lossy link)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    a = ap.parse_args(argv)
    say = lambda m: print(m, file=sys.stderr, flush=True)   # noqa: E731
    tmp = Path(tempfile.mkdtemp(prefix="bench-update-"))
    cf = factory(a.client)
    lab = ota_lab.Lab(tmp, loss=a.loss, client_factory=cf, log=str(tmp / "console.log"), ops=a.ops)
    out = {"loss": a.loss, "client": "microtun_host.ops.OpsClient (the gateway, the tunnel, the lossy link)"
           if a.ops else a.client or "host_tests/otadev.py:DirClient (test only: no ops channel, "
                                     "the files do not cross the lossy link)",
           "target_update_s": 10}
    try:
        up, st = ota_lab.settle(lab, 60)
        if not up:
            raise SystemExit("the device did not come up: %s" % lab.device.text[-2000:])
        reboots, updates = [], []
        for i in range(a.rounds):
            t = time.monotonic()
            lab.client.reboot()
            up, _ = ota_lab.settle(lab, 60)
            reboots.append(time.monotonic() - t)
            b = lab.bundle("good")
            r = release.update_device(lab.client, b, timeout_s=60)
            up2, st = ota_lab.settle(lab, 60)
            if r.status != "updated" or not up2:
                say("round %d: %s" % (i + 1, r))
            updates.append(r.seconds if r.status == "updated" else None)
            say("round %d: reboot %.2f s, update %s in %.2f s" % (i + 1, reboots[-1], r.status, r.seconds))
        done = [u for u in updates if u is not None]
        out["release"] = {"files": len(b.files), "bytes": b.size,
                          "mpy_bytes": sum(len(d) for p, d in b.files.items() if p.endswith(".mpy"))}
        out["update_s"] = {"median": round(statistics.median(done), 3) if done else None,
                           "max": round(max(done), 3) if done else None,
                           "rounds": [None if u is None else round(u, 3) for u in updates]}
        out["reboot_s"] = {"median": round(statistics.median(reboots), 3), "rounds": [round(x, 3) for x in reboots]}
        out["update_over_reboot"] = round(out["update_s"]["median"] / out["reboot_s"]["median"], 2) if done else None
        out["update_within_target"] = bool(done) and len(done) == len(updates) and max(done) <= 10

        rb = {}
        for fault in ("no_connect", "raises", "fw_raises", "hangs"):
            before = lab.status()
            r = release.update_device(lab.client, lab.bundle(fault), timeout_s=60)
            up, st = ota_lab.settle(lab, 60)
            rb[fault] = {"result": r.status, "seconds": round(r.seconds, 3), "reason": r.reason,
                         "back_on_last_good": bool(up and st["running_version"] == before["running_version"])}
            say("%s: %s in %.2f s (%s)" % (fault, r.status, r.seconds, r.reason))
        out["rollback"] = rb

        t = time.monotonic()
        res = ota_lab.power_cut_soak(lab, a.points, seed=a.seed, say=say)
        out["power_cuts"] = {
            "points": len(res), "bricked": sum(not r["up"] for r in res),
            "wrong_code": sum(r["up"] and not r["ok"] for r in res),
            "staging": sum(r["where"] == "staging" for r in res),
            "switch_over": sum(r["where"] == "switch-over" for r in res),
            "updated_anyway": sum(r["update"] == "updated" for r in res),
            "seconds": round(time.monotonic() - t, 1), "seed": a.seed,
            "cuts": [r["cut"] for r in res]}
        out["bricked_total"] = out["power_cuts"]["bricked"] + sum(not v["back_on_last_good"] for v in rb.values())
    finally:
        lab.close()
        if a.keep:
            say("kept %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
