"""The device side of the memory scenarios (tools/bench_memory.py,
host_tests/test_device_heap.py): a device alone in a small MicroPython heap,
driven over stdin/stdout by CPython, which plays the gateway (and the PoPs).

One source, four scripts: tools/bench_memory.build() compiles it with
mpy-cross once per scenario with _CORE and _COUNT set (the compiler drops
the branches of a false const), so that what a scenario's figure carries of
this harness is its own code only (docs/MEMORY.md, "What the harness
costs"). As written here (both 0) it is the endpoint's heap-minimum script:

  heap_device             "endpoint": a microtun.endpoint.Device; its private
                          key, the gateway's public key and the psk (hex) on
                          the first line of stdin
  heap_device_core        "core": the config file ARGS[0] loaded and its module
                          forgotten (microtun.config.forget(), as the firmware
                          does), then everything microtun.driver imports, and a
                          microtun.tunnel.TunnelCore
  heap_device_count, heap_device_core_count
                          the same, with the commands that count the bytes
                          allocated per packet (B, S)

run as `micropython -m heap_device[_core][_count] GC ARGS...`.
GC: 0, or N to set gc.threshold(N) (collect after every N bytes allocated)
while the modules load and the device is made, then gc.threshold(a quarter
of the free heap) while it runs, as the firmware does (docs/MEMORY.md); a
negative N keeps the threshold N for the whole run.

One line per command, from the host:
  D <path> <hex>   a datagram for the device (path: ignored by "endpoint")
  s <n> <len>      send n app packets of len bytes on channel 1
  T <ms>           advance the clock and run the timers
  H                a new handshake now, the session up (Device.rekey)
  Q                report and quit
and in the _count scripts:
  B <n>            the next n lines are D lines: take them in one batch and
                   count the bytes allocated per datagram (GC off: needs
                   more heap, so only for counting)
  S <n> <len>      as s, counting the bytes allocated per packet (GC off)
The device answers with "D <path> <hex>" per datagram it sends (path -1:
"any path", from the bare endpoint), "E" per app message,
"K" after each command, and finally its qstr pool figures and
"R established steady_heap over_start heap_total per_send per_receive"
(-1 for a count not taken).

Everything lives in main(): its variables are locals, which cost no qstr
(a module-level name would cost one, and heap, in the budget measured).
"""
import sys
import gc
import micropython
from micropython import const

_CORE = const(0)    # 1: the "core" scenario (set by tools/bench_memory.build())
_COUNT = const(0)   # 1: with the counting commands B and S


def main():
    gc.collect()
    base = gc.mem_alloc()
    threshold = int(sys.argv[1])
    if threshold:
        gc.threshold(abs(threshold))
    if _CORE:
        # as the firmware starts: the config first, its code dropped, then the stack
        from microtun import config
        cfg = config.load(sys.argv[2])
        config.forget()
        config = None
        gc.collect()
        import microtun.driver  # noqa: F401  (the whole device import set)
        from microtun.tunnel import TunnelCore
        dev = TunnelCore(cfg, 1)
        cfg = None
    else:
        from microtun.endpoint import Device
        # the keys on the first line, not in argv: the unix port interns
        # each argument as a qstr, which would stay in the heap measured
        k = sys.stdin.readline().split()
        dev = Device(bytes.fromhex(k[0]), bytes.fromhex(k[1]), bytes.fromhex(k[2]), 1)
        k = None
    from microtun.ticks import ticks_add
    if threshold > 0:       # then as the firmware runs (firmware/microtun_fw.py)
        gc.collect()
        gc.threshold(gc.mem_free() // 4)
    w = sys.stdout.write
    now = 1000
    per_send = per_receive = -1
    dev.connect(now)
    op = ""
    while op != "Q":
        # out: the datagrams and app messages the last command produced
        for a, b in dev.datagrams_to_send(now):
            # in 16-byte pieces: a whole datagram's hex line (~2.2x its size,
            # 320 bytes for an INIT) was the largest thing this script made,
            # where a device hands the socket the bytes it has
            if _CORE:
                w("D %d " % a)
            else:
                b = a
                w("D -1 ")
            for i in range(0, len(b), 16):
                w(b[i:i + 16].hex())
            w("\n")
        # what was sent is gone, as on a device: the loop's names would
        # hold the last datagram (an INIT: 160 bytes) until the next one
        a = b = None
        while True:
            if _CORE:
                e = dev.next_message()
            else:
                e = dev.next_event()
            if e is None:
                break
            if _CORE or e.kind == "data":
                w("E\n")
        w("K\n")
        line = sys.stdin.readline()
        op = line[:1]
        batch = [line] if op == "D" else []
        if _COUNT and op == "B":
            batch = [sys.stdin.readline() for _ in range(int(line[2:]))]
        if batch:
            for k in range(len(batch)):
                _, i, h = batch[k].split()
                batch[k] = (int(i), bytes.fromhex(h))
            # the datagrams' hex lines go before the device takes them (a
            # device holds the bytes it read, not twice their size in text)
            line = h = None
            if _COUNT and op == "B":
                gc.collect()
                gc.disable()
                a0 = gc.mem_alloc()
            got = 0
            for i, data in batch:
                if _CORE:
                    dev.receive(i, data, now)
                    e = dev.next_message()
                else:
                    dev.receive_datagram(data, None, now)
                    e = dev.next_event()
                    if e is not None and e.kind != "data":
                        e = None
                got += e is not None
            if _COUNT and op == "B":
                per_receive = (gc.mem_alloc() - a0) // len(batch)
                gc.enable()
            batch = None
            w("E\n" * got)
        elif op == "s" or (_COUNT and op == "S"):
            n, payload = line[2:].split()
            n = int(n)
            payload = bytes(int(payload))
            gc.collect()
            if _COUNT and op == "S":
                gc.disable()
                a0 = gc.mem_alloc()
            for _ in range(n):
                dev.send(1, payload, now)
            if _COUNT and op == "S":
                per_send = (gc.mem_alloc() - a0) // n
                gc.enable()
            payload = None
        elif op == "T":
            now = ticks_add(now, int(line[2:]))
            dev.handle_timer(now)
        elif op == "H":
            if _CORE:
                dev.device.rekey(now)
            else:
                dev.rekey(now)
    gc.collect()
    micropython.qstr_info()
    w("R %d %d %d %d %d %d\n" % (dev.established, gc.mem_alloc(), gc.mem_alloc() - base,
                                  gc.mem_alloc() + gc.mem_free(), per_send, per_receive))


main()
