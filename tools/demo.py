"""`make demo`: a whole microtun network on this machine, over loopback.

Two disjoint PoP chains to one gateway (route a: a1 -> a2, route b: b1 -> b2,
route b behind a link emulator with 5 % loss and 20 ms delay), a local UDP
echo service on channel 1, and a device on the MicroPython unix port sending
telemetry (adaptive policy) with a critical alarm every fifth message. Four
seconds in, PoP b2 (the middle of the lossy chain) is killed with SIGKILL;
three seconds later it restarts. (Kill a PoP of the clean chain instead and
the alarms sent meanwhile have one lossy path left: some are lost, as they
must be without retransmission.)

Prints a human summary and a final JSON line, stops everything, and exits 0
only if every critical alarm reached the service exactly once and best-effort
telemetry was never interrupted for more than 1 s.
"""
import argparse
import json
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lib"))
from microtun_host import scratch  # noqa: E402
from microtun_host.localnet import Net, parse_result  # noqa: E402

COUNT = 400
INTERVAL = 25
CRITICAL_EVERY = 5
KILL = "b2"
KILL_AT = 4.0
RESTART_AT = 7.0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    args = ap.parse_args()
    # Keys live in tmp: it goes on every exit (failure, Ctrl-C, SIGTERM; scratch.py).
    tmp = scratch.mkdtemp("microtun-demo-")
    print("microtun demo: provisioning a local network in %s" % tmp, flush=True)
    net = None
    ok = False
    try:
        net = Net(tmp, routes={"a": ["a1", "a2"], "b": ["b1", "b2"]}, devices={"sensor-1": {}},
                  lossy={"b": {"loss": 0.05, "delay_ms": 20, "seed": 7}}, policy="adaptive")
        net.start()
        print("  PoPs a1 a2 b1 b2, gateway, echo service on channel 1, link emulator on route b: running")
        print("  device sensor-1 (MicroPython unix port): %d messages every %d ms, every %dth critical"
              % (COUNT, INTERVAL, CRITICAL_EVERY))
        t0 = time.monotonic()
        dev = net.device("sensor-1", "--count", str(COUNT), "--interval", str(INTERVAL),
                         "--critical-every", str(CRITICAL_EVERY), "--linger", "2000", background=True)
        killed = restarted = False
        while dev.poll() is None:
            el = time.monotonic() - t0
            if not killed and el >= KILL_AT:
                net.kill(KILL, signal.SIGKILL)
                killed = True
                print("  t=%.1fs  PoP %s killed (SIGKILL)" % (el, KILL))
            if killed and not restarted and el >= RESTART_AT:
                net.start_pop(KILL)
                restarted = True
                print("  t=%.1fs  PoP %s restarted" % (time.monotonic() - t0, KILL))
            time.sleep(0.05)
        res = parse_result(dev.stdout.read())
        status = net.gw_status()
        pops = {p: net.pop_stats(p) for p in sorted(net.pops)}
        ok = report(net, res, status, pops)
    except Exception as e:             # a failed start: one line (the logs are in tmp with --keep)
        print("microtun demo: %s" % (str(e).strip().splitlines() or [type(e).__name__])[0], file=sys.stderr)
    finally:
        scratch.finish(net, tmp, args.keep)
    return 0 if ok else 1


def report(net, res, status, pops):
    if "error" in res:
        print("device failed: %s" % res["error"])
        print(json.dumps({"ok": False, "error": res["error"]}))
        return False
    seen = []
    for d in net.echo.seen:
        try:
            seen.append(int(d.split(b":", 1)[0]))
        except ValueError:
            pass
    sent = res["sent"]
    uniq = set(seen)
    dups = len(seen) - len(uniq)
    crit = [i for i in range(sent) if i % CRITICAL_EVERY == 0]
    crit_missing = [i for i in crit if i not in uniq]
    crit_dups = sum(1 for i in crit if seen.count(i) > 1)
    lost = sorted(i for i in range(sent) if i not in uniq)
    run = best = 0
    for i in range(sent):
        run = run + 1 if i not in uniq else 0
        best = max(best, run)
    gap_ms = best * INTERVAL
    dev = [d for d in status["devices"] if d["name"] == "sensor-1"][0]
    counters = status["counters"]
    drops = {k: v for k, v in counters.items() if k not in (
        "data_rx", "data_tx", "handshake_ok", "response_tx", "keepalive_rx", "keepalive_tx", "path_probe_rx")}
    pop_drops = {p: {k: v for k, v in s.get("drops", {}).items() if v} for p, s in pops.items()}
    health = res["health"]
    print()
    print("paths, as the device saw them at the end:")
    for p in health["paths"]:
        print("  %-2s %-8s srtt %5s ms  loss %5.1f%%  state changes %d  sent %d pkts  probes lost %d/%d" % (
            p["name"], p["state"], p["srtt_ms"], 100 * p["loss"], p["switches"], p["tx_packets"],
            p["probes_lost"], p["probes_sent"]))
    print("gateway view: %s" % ", ".join("%s seen %.1fs ago" % (p["link"], p["last_seen_ms_ago"] / 1000)
                                        for p in dev["paths"]))
    print()
    print("telemetry: %d sent, %d reached the service (%d lost), duplicates delivered: %d" % (
        sent, len(uniq), len(lost), dups))
    print("critical alarms: %d sent, %d delivered exactly once, %d missing" % (
        len(crit), len(crit) - len(crit_missing) - crit_dups, len(crit_missing)))
    print("longest interruption of best-effort telemetry: %d ms" % gap_ms)
    print("handshakes: %d%s" % (res["handshakes"], " (one session through the PoP failure)" if res["handshakes"] == 1 else ""))
    print("drops at the gateway: %s" % (drops or "none"))
    print("drops at the PoPs: %s" % ({p: d for p, d in pop_drops.items() if d} or "none"))
    ok = not crit_missing and crit_dups == 0 and dups == 0 and gap_ms <= 1000
    print("result: %s" % ("OK" if ok else "FAILED"))
    out = {"ok": ok, "sent": sent, "delivered": len(uniq), "lost": len(lost), "duplicates_delivered": dups,
           "critical": {"sent": len(crit), "missing": crit_missing, "duplicated": crit_dups},
           "longest_gap_ms": gap_ms, "handshakes": res["handshakes"],
           "connect_ms": res["connect_ms"], "x25519_ops_to_connect": res["x25519_ops_to_connect"],
           "rtt_ms_median": res["rtt_ms_median"], "rtt_ms_p99": res["rtt_ms_p99"],
           "paths": [{k: p[k] for k in ("name", "state", "srtt_ms", "loss", "switches")} for p in health["paths"]],
           "drops": {"gateway": drops, "pops": pop_drops, "device": {
               k: v for k, v in health["tunnel"].items() if k in ("duplicate", "replay", "decrypt_failed", "unknown_index")}}}
    print(json.dumps(out))
    return ok


if __name__ == "__main__":
    sys.exit(main())
