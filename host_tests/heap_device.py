"""The device side of the memory scenarios (tools/bench_memory.py,
host_tests/test_device_heap.py): a device alone in a small MicroPython heap,
driven over stdin/stdout by CPython, which plays the gateway (and the PoPs).
Precompiled with mpy-cross and run as `micropython -m heap_device MODE ...`.

MODE "endpoint": a microtun.endpoint.Device; args: private key, gateway
public key, psk (hex). MODE "core": everything microtun.driver imports, and
a microtun.tunnel.TunnelCore built from the config file argv[2].

One line per command, from the host:
  D <path> <hex>   a datagram for the device (path: ignored by "endpoint")
  B <n>            the next n lines are D lines: take them in one batch and
                   count the bytes allocated per datagram (GC off); one
                   "E" line per app message after the batch
  S <n> <len>      send n app packets of len bytes on channel 1, counting
                   the bytes allocated per packet (GC off)
  b <n>, s <n> <len>  the same with the GC on and nothing counted (so the
                   counting does not need a bigger heap)
  T <ms>           advance the clock and run the timers
  Q                report and quit
The device answers with "D <path> <hex>" per datagram it sends (path -1:
"any path", from the bare endpoint), "E <channel> <len>" per app message,
"K" after each command, and finally "R <json>".
"""
import sys
import gc
import json

gc.collect()
base = gc.mem_alloc()
MODE = sys.argv[1]
if MODE == "core":
    import microtun.driver  # noqa: F401  (the whole device import set)
    from microtun.config import load
    from microtun.tunnel import TunnelCore
    dev = TunnelCore(load(sys.argv[2]), 1)
else:
    from microtun.endpoint import Device
    dev = Device(bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3]), psk=bytes.fromhex(sys.argv[4]),
                 boot_counter=1)
from microtun.ticks import ticks_add

now = 1000
alloc = {}


def out():
    w = sys.stdout.write
    for a, b in dev.datagrams_to_send(now):
        if MODE == "core":
            w("D %d %s\n" % (a, b.hex()))
        else:
            w("D -1 %s\n" % a.hex())
    while True:
        if MODE == "core":
            e = dev.next_message()
            if e is None:
                break
            w("E %d %d\n" % (e[0], len(e[1])))
        else:
            e = dev.next_event()
            if e is None:
                break
            if e.kind == "data":
                w("E %d %d\n" % (e.channel, len(e.data)))


def take(line):
    _, i, h = line.split()
    return int(i), bytes.fromhex(h)


def receive(i, data):
    if MODE == "core":
        dev.receive(i, data, now)
    else:
        dev.receive_datagram(data, None, now)


dev.connect(now)
out()
sys.stdout.write("K\n")
while True:
    line = sys.stdin.readline()
    op = line[:1]
    if op == "D":
        receive(*take(line))
    elif op in "Bb":
        batch = [take(sys.stdin.readline()) for _ in range(int(line[2:]))]
        gc.collect()
        if op == "B":
            gc.disable()
        a0 = gc.mem_alloc()
        got = 0
        for i, data in batch:
            receive(i, data)
            e = dev.next_message() if MODE == "core" else dev.next_event()
            got += e is not None
        if op == "B":
            alloc["per_receive"] = (gc.mem_alloc() - a0) // len(batch)
            gc.enable()
        batch = None
        for _ in range(got):
            sys.stdout.write("E 1 0\n")
    elif op in "Ss":
        n, ln = line[2:].split()
        n = int(n)
        payload = bytes(int(ln))
        gc.collect()
        if op == "S":
            gc.disable()
        a0 = gc.mem_alloc()
        for _ in range(n):
            dev.send(1, payload, now)
        if op == "S":
            alloc["per_send"] = (gc.mem_alloc() - a0) // n
            gc.enable()
        payload = None
    elif op == "T":
        now = ticks_add(now, int(line[2:]))
        dev.handle_timer(now)
    else:
        break
    out()
    sys.stdout.write("K\n")
gc.collect()
alloc["established"] = dev.established
alloc["steady_heap"] = gc.mem_alloc()
alloc["over_start"] = gc.mem_alloc() - base
alloc["heap_total"] = gc.mem_alloc() + gc.mem_free()
sys.stdout.write("R %s\n" % json.dumps(alloc))
