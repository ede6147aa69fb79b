"""Scripted device traffic for integration tests, the demo and benchmarks.
Runs on the MicroPython unix port (and CPython):

    micropython tools/device_run.py CONFIG [options]

    --count N          messages to send (default 50)
    --interval MS      between messages (default 20)
    --size B           payload bytes (default 32)
    --policy P         best | critical | adaptive (default: the config's)
    --critical-every K every K-th message is sent critical (default 0: none)
    --connect-ms MS    give up if no session within this (default 10000)
    --linger MS        keep receiving after the last send (default 1500)
    --rebind-at MS     open new sockets this long after the first send
    --idle MS          send nothing, just stay connected this long (bytes/hour test)
    --channel C        app channel to send on (default 1)
    --serve MS         after the sends, stay connected this long answering ops
                       requests (docs/OPS.md); an ops `reboot` exits with status 3
    --ops-root DIR     change to this directory once connected: what ops and exec'd
                       code (mpremote's) see as the device's filesystem

Each message is "<id>:<padding>" on channel 1; the gateway's channel-1
service must echo it back (`microtun echo 127.0.0.1:5000` is one). Prints
progress lines "P {...}", one line "RESULT {json}" with counts, lost ids,
the longest run of lost messages, path health and heap figures, then a
summary line. Exit status: 0 if anything came back, 1 if nothing did (or
no session), 2 for a bad config or option.
"""
import sys
import gc
import json

try:
    from time import ticks_ms, ticks_diff, ticks_add, sleep_ms
except ImportError:
    import time as _t

    def ticks_ms():
        return int(_t.monotonic() * 1000)

    def ticks_diff(a, b):
        return a - b

    def ticks_add(a, b):
        return a + b

    def sleep_ms(ms):
        _t.sleep(ms / 1000)

from microtun.driver import Tunnel
from microtun.config import ConfigError


def parse_args(argv):
    opts = {"count": 50, "interval": 20, "size": 32, "policy": None, "critical-every": 0,
            "connect-ms": 10000, "linger": 1500, "rebind-at": -1, "idle": 0, "channel": 1,
            "serve": 0, "ops-root": "."}
    if not argv:
        print(__doc__)
        sys.exit(2)
    cfg = argv[0]
    i = 1
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--") or a[2:] not in opts or i + 1 >= len(argv):
            print("device_run: unknown option or missing value: %s" % a)
            sys.exit(2)
        v = argv[i + 1]
        opts[a[2:]] = v if a in ("--policy", "--ops-root") else int(v)
        i += 2
    return cfg, opts


def heap():
    gc.collect()
    try:
        return gc.mem_alloc()
    except AttributeError:
        return None


def main():
    cfg_path, o = parse_args(sys.argv[1:])
    t_start = ticks_ms()
    try:
        t = Tunnel.from_file(cfg_path, log=lambda lvl, msg: print("L", lvl, msg))
    except ConfigError as e:
        print("RESULT " + json.dumps({"error": str(e)}))
        return 2
    if o["ops-root"] != ".":
        import os
        os.chdir(o["ops-root"])      # ops paths and exec'd code (mpremote's) both see this directory
    replies = {}
    dup_replies = [0]
    peak = [heap() or 0]

    def on_data(ch, data):
        try:
            mid = int(bytes(data).split(b":", 1)[0])
        except ValueError:
            return
        if mid in replies:
            dup_replies[0] += 1
        else:
            replies[mid] = ticks_ms()
    t.on_data = on_data

    up = t.connect(o["connect-ms"])
    t_connected = ticks_diff(ticks_ms(), t_start)
    x25519_at_connect = t.device.dh_count
    if not up:
        print("RESULT " + json.dumps({"error": "no session within %d ms" % o["connect-ms"],
                                      "health": t.health()}))
        print("device_run: no session within %d ms: are the PoPs and the gateway running, and is this the "
              "config `microtun provision` wrote for them?" % o["connect-ms"])
        return 1
    print("P " + json.dumps({"connected_ms": t_connected}))
    sent_at = {}
    t0 = ticks_ms()
    if o["idle"]:
        t.run(o["idle"])
    rebound = False
    for i in range(o["count"]):
        due = ticks_add(t0, i * o["interval"])
        while ticks_diff(due, ticks_ms()) > 0:
            t.poll(ticks_diff(due, ticks_ms()))
        if o["rebind-at"] >= 0 and not rebound and ticks_diff(ticks_ms(), t0) >= o["rebind-at"]:
            t.rebind()
            rebound = True
            print("P " + json.dumps({"rebind_at_id": i}))
        pad = o["size"] - len(b"%d:" % i)
        msg = b"%d:" % i + b"x" * (pad if pad > 0 else 0)
        pol = o["policy"]
        if o["critical-every"] and i % o["critical-every"] == 0:
            pol = "critical"
        if t.send(o["channel"], msg, policy=pol):
            sent_at[i] = ticks_ms()
        if i % 50 == 0:
            h = heap()
            if h and h > peak[0]:
                peak[0] = h
    end = ticks_add(ticks_ms(), o["linger"])
    while ticks_diff(end, ticks_ms()) > 0 and len(replies) < len(sent_at):
        t.poll(min(100, ticks_diff(end, ticks_ms())))
    if o["serve"]:
        print("P " + json.dumps({"serving_ms": o["serve"]}))
        end = ticks_add(ticks_ms(), o["serve"])
        while ticks_diff(end, ticks_ms()) > 0:
            t.poll(min(500, ticks_diff(end, ticks_ms())))
            if t.reboot_requested:      # an ops reboot: the reply went out in that poll
                print("P " + json.dumps({"reboot": True}))
                t.close()
                sys.exit(3)
    lost = [i for i in sorted(sent_at) if i not in replies]
    run = best = 0
    for i in range(o["count"]):
        if i in sent_at and i not in replies:
            run += 1
            if run > best:
                best = run
        else:
            run = 0
    rtts = sorted(ticks_diff(replies[i], sent_at[i]) for i in replies if i in sent_at)
    res = {
        "sent": len(sent_at), "delivered": len(replies), "lost": len(lost),
        "lost_ids": lost[:200], "longest_loss_run": best,
        "longest_gap_ms": best * o["interval"],
        "duplicate_replies": dup_replies[0],
        "connect_ms": t_connected, "x25519_ops_to_connect": x25519_at_connect,
        "rtt_ms_median": rtts[len(rtts) // 2] if rtts else None,
        "rtt_ms_p99": rtts[min(len(rtts) - 1, (len(rtts) * 99) // 100)] if rtts else None,
        "rtt_ms_p90": rtts[min(len(rtts) - 1, (len(rtts) * 90) // 100)] if rtts else None,
        "rtt_ms_max": rtts[-1] if rtts else None,
        "handshakes": t.device.session.handshakes,
        "health": t.health(),
        "heap_steady": heap(), "heap_peak": peak[0],
    }
    t.close()
    print("RESULT " + json.dumps(res))
    if o["idle"] and not o["count"]:
        return 0
    print("device_run: %d sent, %d came back, %d lost" % (len(sent_at), len(replies), len(lost)))
    if sent_at and not replies:
        denied = res["health"]["driver"].get("channel_denied")
        print("device_run: nothing came back. %s" % (
            "Channel %d is not in this device's config (\"channels\")." % o["channel"] if denied else
            "Check that a service listens on the gateway's address for channel %d (\"services\" in "
            "gateway.json) and sends every datagram back (`microtun echo HOST:PORT`); `microtun status` "
            "shows the device's counters." % o["channel"]))
        return 1
    return 0


sys.exit(main())
