"""Issue 11 attack benchmark: prints ONE JSON object with every figure, its
target and whether it was met.

    .venv/bin/python tools/bench_attack.py            # full run, 5-7 minutes (283-393 s measured)
    .venv/bin/python tools/bench_attack.py --quick    # about 2 minutes, for development
    .venv/bin/python tools/bench_attack.py --only flood --kinds replay --flood-seconds 10

Real processes over loopback (tools/attack_scenarios.py): a unix-port
device, CPython PoPs a1 -> a2 and the gateway, provisioned into a temp dir
that is removed on every exit path (it holds keys); attack traffic comes
from other 127.0.0.x addresses (tools/attack.py). Every scenario is bounded
in time and the whole run stops itself (an alarm) if anything hangs.

1. flood: handshake initiations at the first PoP for --flood-seconds, three
   kinds (random bytes; the genuine device's captured INITs replayed; fresh
   INITs with a valid mac1 and a valid hop MAC under an insider's hop key)
   plus a no-flood baseline, and "replay_gw": the captured INITs sent at
   the gateway itself (the issue's defect 1, cookies reflected down the
   label path onto the genuine device): a fresh device's connect time, an already
   connected device's echo loss, replies per flood packet (arriving at the
   attacker's sockets or unasked at the genuine device; and those the
   gateway says it sent). The rate actually sent is reported: a 2-core
   machine running the flood next to the PoP and the gateway may not reach
   100k/s, and the JSON says so.
2. replay: one captured outer packet of the device sent to the first PoP
   from another address, once and every 100 ms for 20 s, while the service
   streams 100 packets/s down to the device: return-direction packets lost.
3. fuzz: 1,000,000 mixed datagrams (random, mutated captures, mutations
   re-sealed under a hop key the attacker holds) into PoP a1 and into the
   gateway: RSS growth after a warm-up, crashes, traffic afterwards.
4. reset: a device whose stored boot counter was deleted: time to be back.
"""
import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import attack_scenarios as sc  # noqa: E402

FULL = {"flood_seconds": 20.0, "flood_kinds": ("none", "random", "replay", "fresh", "replay_gw"), "workers": 2,
        "stream_s": 22.0, "replay_s": 20.0, "fuzz_n": 1000000, "fuzz_warmup": 100000,
        "reset_limit_ms": 15000, "alarm_s": 1800}
QUICK = {"flood_seconds": 5.0, "flood_kinds": ("none", "random", "replay", "fresh", "replay_gw"), "workers": 2,
         "stream_s": 6.0, "replay_s": 4.0, "fuzz_n": 100000, "fuzz_warmup": 20000,
         "reset_limit_ms": 8000, "alarm_s": 600}

TARGET_RATE = 100000
# The flood is paced to a little over the target by default: as fast as
# possible (--rate 0) the generators take both of this machine's CPUs
# (330k/s measured) and the run measures who wins the CPU, not the defences.
DEFAULT_RATE = 110000


def figure(value, target, met):
    """met: True / False against the target, None for a figure only reported."""
    return {"value": value, "target": target, "met": None if met is None else bool(met)}


def flood_figures(kind, r):
    out = {}
    p = "flood.%s." % kind
    if kind == "replay_gw":
        out[p + "rate_sent_pps"] = figure(r["flood_rate"], "report (sent at the gateway, as in the issue's defect 1)",
                                          None)
    elif kind != "none":
        out[p + "rate_sent_pps"] = figure(r["flood_rate"], ">= %d initiations/s at the first PoP" % TARGET_RATE,
                                          r["flood_rate"] >= TARGET_RATE)
    out[p + "fresh_device_connect_ms"] = figure(
        r["fresh_device_connect_ms"], "<= 2000 (null: not within %d ms)" % r["fresh_device_limit_ms"],
        r["fresh_device_connect_ms"] is not None and r["fresh_device_connect_ms"] <= 2000)
    loss = r["connected_device"]["loss"]
    out[p + "connected_device_loss"] = figure(loss, "<= 0.01", loss is not None and loss <= 0.01)
    if kind != "none":
        out[p + "replies_per_flood_packet"] = figure(
            r["replies_per_flood_packet"], "<= 0.01 (arriving at the attacker or unasked at the device)",
            r["replies_per_flood_packet"] <= 0.01)
        g = r["gateway_replies_per_flood_packet"]
        out[p + "gateway_replies_per_flood_packet"] = figure(
            g, "<= 0.01 (cookies and responses the gateway counted, beyond the devices' own handshakes)",
            g <= 0.01)
    return out


def run(cfg, only, tmp, log):
    res = {}
    figs = {}
    if "flood" in only:
        res["flood"] = {}
        for kind in cfg["flood_kinds"]:
            d = Path(tmp) / ("flood-" + kind)
            d.mkdir()
            secs = cfg["flood_seconds"] if kind != "none" else min(cfg["flood_seconds"], 5.0)
            r = sc.flood(d, kind, seconds=secs, workers=cfg["workers"], rate=cfg["rate"])
            shutil.rmtree(d)
            res["flood"][kind] = r
            figs.update(flood_figures(kind, r))
            log("flood %s: %s" % (kind, json.dumps(r)))
    if "replay" in only:
        d = Path(tmp) / "replay"
        d.mkdir()
        r = sc.replay(d, stream_s=cfg["stream_s"], replay_s=cfg["replay_s"])
        shutil.rmtree(d)
        res["replay"] = r
        figs["replay.baseline.return_lost"] = figure(r["baseline"]["return_lost"], "0 (no attack: checks the harness)",
                                                     r["baseline"]["return_lost"] == 0)
        figs["replay.once.return_lost"] = figure(r["once"]["return_lost"], "0", r["once"]["return_lost"] == 0)
        figs["replay.every_100ms.return_lost"] = figure(
            r["every"]["return_lost"],
            "0 (of %d streamed, %d replays)" % (r["every"]["streamed"], r["every"]["replays"]),
            r["every"]["return_lost"] == 0)
        log("replay: %s" % json.dumps(r))
    if "fuzz" in only:
        res["fuzz"] = {}
        for target in ("pop", "gateway"):
            d = Path(tmp) / ("fuzz-" + target)
            d.mkdir()
            r = sc.fuzz(d, target, n=cfg["fuzz_n"], warmup=cfg["fuzz_warmup"])
            shutil.rmtree(d)
            res["fuzz"][target] = r
            p = "fuzz.%s." % target
            g = r["rss_growth_kb"]
            figs[p + "rss_growth_kb"] = figure(g, "<= 1024 after a %d-datagram warm-up" % cfg["fuzz_warmup"],
                                               g is not None and g <= 1024)
            crashes = int(not r["alive"]) + int(not r["answers_control"]) + (r["internal_errors"] or 0)
            figs[p + "crashes"] = figure(crashes, "0 (exited, stopped answering, or internal_error)", crashes == 0)
            la = r["legit_after"]
            figs[p + "legit_after_delivered"] = figure(
                "%s/%s" % (la["delivered"], la["sent"]), "all echoes back after the fuzz",
                la["sent"] is not None and la["delivered"] == la["sent"] and la["sent"] > 0)
            figs[p + "datagrams"] = figure(r["datagrams"], "%d sent (kernel drops reported apart)" % cfg["fuzz_n"],
                                           r["datagrams"] >= cfg["fuzz_n"])
            log("fuzz %s: %s" % (target, json.dumps({k: v for k, v in r.items() if k != "counters"})))
    if "reset" in only:
        d = Path(tmp) / "reset"
        d.mkdir()
        r = sc.reset_counter(d, limit_ms=cfg["reset_limit_ms"])
        shutil.rmtree(d)
        res["reset"] = r
        figs["reset.back_ms"] = figure(r["connect_ms"], "<= 5000 without touching the gateway (null: not within %d ms)"
                                       % r["limit_ms"], r["connect_ms"] is not None and r["connect_ms"] <= 5000)
        log("reset: %s" % json.dumps(r))
    return figs, res


class Interrupted(Exception):
    pass


def main(argv=None):
    ap = argparse.ArgumentParser(prog="tools/bench_attack.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs for development (about 2 minutes)")
    ap.add_argument("--only", default="flood,replay,fuzz,reset", help="comma-separated scenarios")
    ap.add_argument("--kinds", default=None, help="flood kinds: none,random,replay,fresh,replay_gw")
    ap.add_argument("--flood-seconds", type=float, default=None)
    ap.add_argument("--workers", type=int, default=None, help="flood processes (2 sockets each)")
    ap.add_argument("--fuzz-n", type=int, default=None)
    ap.add_argument("--rate", type=int, default=DEFAULT_RATE,
                    help="flood packets/s over all workers (default %d; 0 = as fast as possible)" % DEFAULT_RATE)
    a = ap.parse_args(argv)
    cfg = dict(QUICK if a.quick else FULL)
    if a.kinds:
        cfg["flood_kinds"] = tuple(k for k in a.kinds.split(",") if k)
        bad = [k for k in cfg["flood_kinds"] if k not in sc.KINDS]
        if bad:
            ap.error("unknown flood kind %s (expected %s)" % (", ".join(bad), ", ".join(sc.KINDS)))
    if a.flood_seconds is not None:
        if not 0 < a.flood_seconds <= 120:
            ap.error("--flood-seconds must be in (0, 120]")
        cfg["flood_seconds"] = a.flood_seconds
    if a.workers is not None:
        cfg["workers"] = max(1, min(8, a.workers))
    if a.rate < 0:
        ap.error("--rate must be 0 (as fast as possible) or a positive packets/s")
    cfg["rate"] = a.rate
    if a.fuzz_n is not None:
        cfg["fuzz_n"] = max(1000, min(5000000, a.fuzz_n))
        cfg["fuzz_warmup"] = min(cfg["fuzz_warmup"], cfg["fuzz_n"] // 5)
    only = {s for s in a.only.split(",") if s}
    if not only <= {"flood", "replay", "fuzz", "reset"}:
        ap.error("--only takes flood, replay, fuzz, reset")

    def stop(signum, frame):
        raise Interrupted("signal %d" % signum)
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(s, stop)
    signal.alarm(int(cfg["alarm_s"]))
    tmp = tempfile.mkdtemp(prefix="microtun-bench-attack-")
    t0 = time.monotonic()
    out = {"bench": "attack", "mode": "quick" if a.quick else "full", "python": sys.version.split()[0],
           "cpus": os.cpu_count(), "params": {k: v for k, v in cfg.items() if k != "alarm_s"}}
    try:
        figs, res = run(cfg, only, tmp, lambda msg: print(msg, file=sys.stderr, flush=True))
        out["duration_s"] = round(time.monotonic() - t0, 1)
        out["met"] = sum(1 for f in figs.values() if f["met"] is True)
        out["not_met"] = sorted(k for k, f in figs.items() if f["met"] is False)
        slow = sorted(k for k, f in figs.items() if k.endswith(".rate_sent_pps") and f["met"] is False)
        if slow:
            out["note"] = ("flood rate below %d/s for %s: the generators share this machine's %d CPUs with the "
                           "PoPs, the gateway and the devices; the figures are for the rate reached"
                           % (TARGET_RATE, ", ".join(k.split(".")[1] for k in slow), os.cpu_count() or 1))
        out["figures"] = figs
        out["scenarios"] = res
        print(json.dumps(out))
        return 0
    except Interrupted as e:
        print("bench_attack: stopped (%s) after %.0f s; processes stopped, temp dir removed"
              % (e, time.monotonic() - t0), file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
