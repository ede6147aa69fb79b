"""Speed on an emulated Cortex-M3 (issue 10, item 6): prints one JSON object.

    .venv/bin/python tools/bench_qemu.py [--elf PATH] [--qemu qemu-system-arm] [--packets N] [--no-pyaes]
    make bench-qemu

Runs MicroPython's qemu port for the MPS2_AN385 board (Cortex-M3) with
microtun frozen in (build/qemu-an385/firmware.elf, built or brought up to
date by tools/mpbuild.py as `make qemu` does; or --elf,
or QEMU_ELF) under `qemu-system-arm -icount shift=0`: the virtual clock
advances exactly 1 ns per instruction executed, so the port's
time.ticks_us() (SysTick, driven by the virtual clock) read around an
operation gives its instruction count: microseconds x 1000. The run checks
that reading first: the same loop timed again with shift=1 (2 ns per
instruction) must read twice as long ("icount_check").

The board is driven over its UART (stdio) by the raw REPL, and measures,
all in instructions ("insns"):

  x25519          one X25519 (microtun.x25519, big-int Python);
  handshake       the device's side of a handshake as the initiator: create
                  the INIT (connect + datagrams_to_send) and process the
                  RESPONSE (receive_datagram until established); the
                  gateway's part runs on the host (microtun.responder,
                  CPython), only its bytes go through the UART;
  send_1200       one 1200-byte app packet sent by an established
                  microtun.endpoint.Device (seal, header, queue), averaged;
  receive_1200    one 1200-byte transport packet from the gateway received
                  and delivered (replay window, open), averaged;
  seal_1200, open_1200  the AEAD alone (AES-256-CCM) on 1200 bytes;
  aes_floor_1200  with cryptolib: one ECB and one CBC pass over a 1200-byte
                  message's blocks, the AES work CCM cannot avoid;

  hop_mac         the outer layer's hop MAC (HMAC-SHA256 over the header
                  and a 32-byte excerpt) sealed into and verified on a
                  1212-byte packet, as the two-path stack does per packet:
                  with the backend in use (microtun.hop.HMAC: "native",
                  microtun/hopmac.py frozen as ARMv7-M code) and with
                  hashlib's SHA-256 objects (what a .mpy deployment runs);

"aead_xor" says which CCM XOR ran: "viper" (microtun/xorbuf.py frozen as
ARMv7-M code) or "big-int" (the fallback);

with the AES backend the build has: cryptolib where the firmware has it,
the pure-Python AES (microtun.aes_pure) otherwise. A build with cryptolib
freezes no pure AES, so the pure figures come from a second image, the
port's own MPS2_AN385 board without cryptolib (tools/mpbuild.py
qemu-pyaes), measured in the same run ("pure_aes": the handshake and the
packets, PURE_PACKETS each way; --no-pyaes leaves it out, and so does
--elf, which measures the one image named).

"estimate_133mhz" / "estimate_240mhz" are ESTIMATES, not measurements:
instructions x CPI / clock, with CPI (cycles per instruction) = CPI below,
an assumption for interpreter code on a Cortex-M with cache/XIP misses
(RP2040: Cortex-M0+ at 133 MHz, ARMv6-M, whose smaller instruction set
needs somewhat more instructions than the M3 counted here; ESP32: Xtensa
at 240 MHz, another instruction set altogether). The instruction counts
are the measured figures; the seconds are what they suggest.
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "lib"))
sys.path.insert(0, str(ROOT / "tools"))

import mpbuild  # noqa: E402  (its targets' artefacts)
from microtun.responder import Gateway  # noqa: E402
from microtun.x25519 import public_key  # noqa: E402

CPI = 1.5
CLOCKS_MHZ = (133, 240)
DEV_KEY = bytes(range(1, 33))
GW_KEY = bytes(range(101, 133))
PSK = b"\x42" * 32
TIMEOUT = 600          # seconds for one raw-REPL command (pure-Python AES on an emulated CPU is slow)
TARGETS = {"handshake_s_133mhz": 1.0, "packets_per_s_133mhz_cryptolib": 200}
PURE_PACKETS = 2       # packets each way on the pure-Python AES (~35 M instructions each)


class Board:
    """qemu-system-arm running the firmware, its UART on stdio, driven by
    the raw REPL."""

    def __init__(self, qemu, elf, shift=0):
        self.proc = subprocess.Popen(
            [qemu, "-machine", "mps2-an385", "-nographic", "-monitor", "null", "-semihosting",
             "-icount", "shift=%d" % shift, "-kernel", str(elf)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.buf = b""
        self._write(b"\r\x03\x03\x01")
        self._until(b"raw REPL; CTRL-B to exit\r\n>", 30)
        self.buf = b""

    def _write(self, data):
        for i in range(0, len(data), 256):      # the UART has a small FIFO: no flood
            self.proc.stdin.write(data[i:i + 256])
            self.proc.stdin.flush()
            time.sleep(0.002)

    def _until(self, token, timeout):
        end = time.monotonic() + timeout
        while token not in self.buf:
            if time.monotonic() > end or self.proc.poll() is not None:
                raise RuntimeError("qemu: no %r within %d s; got %r" % (token, timeout, self.buf[-400:]))
            b = self.proc.stdout.read()
            if b:
                self.buf += b
            else:
                time.sleep(0.005)
        i = self.buf.index(token) + len(token)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out

    def exec(self, code, timeout=TIMEOUT):
        """Run code in the raw REPL; its stdout (RuntimeError with the
        board's traceback if it raised)."""
        self._write(code.encode() + b"\x04")
        self._until(b"OK", 30)
        out = self._until(b"\x04", timeout)[:-1]
        err = self._until(b"\x04>", 30)[:-2]
        if err.strip():
            raise RuntimeError("on the board: " + err.decode(errors="replace").strip())
        return out.decode(errors="replace")

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


LOOP = """
import time
def _loop():
    t0 = time.ticks_us()
    x = 0
    for i in range(20000):
        x += i
    return time.ticks_diff(time.ticks_us(), t0)
print("LOOP", _loop())
"""

# The qemu port has no os.urandom (no entropy source on the emulated
# board): microtun.rand gets a stand-in for this benchmark only, a PRNG
# (random.getrandbits) behind an `os` that is otherwise the real one.
# Never a way to run a device: its keys would be predictable.
SETUP = """
import gc, sys, time, random, os as _os0
if not hasattr(_os0, "urandom"):
    class _BenchOS:
        def __getattr__(self, name):
            return getattr(_os0, name)
        def urandom(self, n):
            return bytes(random.getrandbits(8) for _ in range(n))
    sys.modules["os"] = _BenchOS()
    print("URANDOM stand-in")
from microtun.aead import AEAD
from microtun.x25519 import x25519, BASE_POINT
from microtun.endpoint import Device
def _t(f, n=1):
    gc.collect()
    t0 = time.ticks_us()
    for _ in range(n):
        f()
    return time.ticks_diff(time.ticks_us(), t0) // n
try:
    import cryptolib
    _HAS = 1
except ImportError:
    _HAS = 0
gc.collect()
from microtun.aead import XOR
print("INFO", _HAS, AEAD(bytes(32)).backend, XOR, gc.mem_free() + gc.mem_alloc(), sys.implementation._machine)
"""

X25519 = """
print("T x25519", _t(lambda: x25519(bytes(range(32)), BASE_POINT), 2))
"""

HS_INIT = """
dev = Device(bytes.fromhex(%r), bytes.fromhex(%r), bytes.fromhex(%r), 1)
now = 1000
def _init():
    global out
    dev.connect(now)
    out = [d for d, a in dev.datagrams_to_send(now)]
print("T init", _t(_init))
for d in out:
    print("D", d.hex())
"""

HS_RESPONSE = """
_resp = [bytes.fromhex(h) for h in %r]
def _response():
    global out
    for d in _resp:
        dev.receive_datagram(d, None, now)
    out = [d for d, a in dev.datagrams_to_send(now)]
print("T response", _t(_response))
print("EST", int(dev.established))
while dev.next_event() is not None:     # the handshake's own event
    pass
for d in out:
    print("D", d.hex())
"""

PACKETS = """
_p = bytes(1200)
def _send():
    dev.send(1, _p, now)
    for d, a in dev.datagrams_to_send(now):
        pass
print("T send_1200", _t(_send, %d))
"""

RECEIVE = """
_in = [bytes.fromhex(h) for h in %r]
_got = [0]
def _receive():
    for d in _in:
        dev.receive_datagram(d, None, now)
        e = dev.next_event()
        _got[0] += e is not None and e.kind == "data" and len(e.data) == 1200
print("T receive_1200", _t(_receive) // len(_in))
print("GOT", _got[0])
"""

AEAD_RUN = """
_a = AEAD(bytes(range(32)), %s)
_m = bytes(1200)
_n = bytes(12)
_s = _a.seal(_n, _m, b"hdr")
assert _a.open(_n, _s, b"hdr") == _m
print("T seal_1200", _t(lambda: _a.seal(_n, _m, b"hdr"), %d))
print("T open_1200", _t(lambda: _a.open(_n, _s, b"hdr"), %d))
if _HAS:
    # the floor under CCM: one ECB pass (the key stream) and one CBC pass
    # (the MAC) over a 1200-byte message's blocks, each with its key expansion
    _b = bytearray(1248)
    def _floor():
        cryptolib.aes(bytes(32), 1).encrypt(_b[:1232], _b)
        cryptolib.aes(bytes(32), 2, bytes(16)).encrypt(_b[:1248], _b)
    print("T aes_floor_1200", _t(_floor, %d))
"""

HOP_RUN = """
from microtun import hop
_hk = hop.HopKey(bytes(range(32)), any_message=True)   # (the pads too: hashlib below)
_pk = bytearray(1212)
print("HMAC", hop.HMAC)
print("T seal_1200", _t(lambda: hop.seal_in_place(_pk, 1, 5, _hk, 1200), %d))
print("T verify_1200", _t(lambda: hop.verify(_hk, _pk), %d))
_nat = hop._native
hop._native = None
try:
    print("T seal_1200_hashlib", _t(lambda: hop.seal_in_place(_pk, 1, 5, _hk, 1200), %d))
    print("T verify_1200_hashlib", _t(lambda: hop.verify(_hk, _pk), %d))
finally:
    hop._native = _nat
"""


def _times(text):
    return {m.group(1): int(m.group(2)) * 1000 for m in re.finditer(r"^T (\w+) (-?\d+)", text, re.M)}


def _datagrams(text):
    return [bytes.fromhex(h) for h in re.findall(r"^D ([0-9a-f]+)", text, re.M)]


def icount_check(qemu, elf):
    """ticks_us with 1 ns per instruction (shift=0) and with 2 ns (shift=1):
    the second must read twice the first if ticks_us counts virtual time."""
    res = {}
    for shift in (0, 1):
        b = Board(qemu, elf, shift)
        try:
            res[shift] = int(re.search(r"LOOP (\d+)", b.exec(LOOP)).group(1))
        finally:
            b.close()
    return {"loop_us_shift0": res[0], "loop_us_shift1": res[1], "ratio": round(res[1] / res[0], 3),
            "ok": abs(res[1] / res[0] - 2) < 0.02}


def run(qemu, elf, packets):
    b = Board(qemu, elf)
    try:
        out = b.exec(SETUP)
        info = out[out.index("INFO"):].split()
        has_cryptolib, backend, xor, heap, machine = (bool(int(info[1])), info[2], info[3], int(info[4]),
                                                      " ".join(info[5:]))
        res = {"machine": machine, "heap_bytes": heap, "cryptolib": has_cryptolib, "aead_backend": backend,
               "aead_xor": xor,    # "viper" (microtun/xorbuf.py, native) or "big-int"
               "urandom": "benchmark stand-in (the port has none)" if "URANDOM" in out else "os.urandom"}
        t = _times(b.exec(X25519))
        # the handshake: the device's INIT, the gateway's RESPONSE made here
        gw = Gateway(GW_KEY)
        peer = gw.add_peer(public_key(DEV_KEY), psk=PSK)
        out = b.exec(HS_INIT % (DEV_KEY.hex(), public_key(GW_KEY).hex(), PSK.hex()))
        t.update(_times(out))
        now = 1000
        for d in _datagrams(out):
            gw.receive_datagram(d, "dev", now)
        resp = [d.hex() for d, _ in gw.datagrams_to_send(now)]
        out = b.exec(HS_RESPONSE % (resp,))
        t.update(_times(out))
        if "EST 1" not in out:
            raise RuntimeError("the device did not establish a session: " + out[-300:])
        for d in _datagrams(out):
            gw.receive_datagram(d, "dev", now)
        gw.datagrams_to_send(now)
        t.update(_times(b.exec(PACKETS % packets)))
        for _ in range(packets):
            gw.send(peer, 1, bytes(1200), now)
        incoming = [d.hex() for d, _ in gw.datagrams_to_send(now)]
        out = b.exec(RECEIVE % (incoming,))
        t.update(_times(out))
        got = int(re.search(r"GOT (\d+)", out).group(1))
        if got != len(incoming):
            raise RuntimeError("the device delivered %d of %d packets" % (got, len(incoming)))
        runs = {backend: "None"}
        if has_cryptolib and backend != "pure":
            runs["pure"] = '"pure"'
        aead = {}
        for name, arg in runs.items():
            try:
                aead[name] = _times(b.exec(AEAD_RUN % (arg, packets, packets, packets)))
            except RuntimeError as e:
                if "aes_pure" not in str(e):
                    raise
                # a cryptolib build freezes no pure AES (boards/microtun_manifest.py)
                aead[name] = "not in this build (microtun.aes_pure is frozen only without cryptolib)"
        out = b.exec(HOP_RUN % ((packets,) * 4))
        hop_mac = dict(_times(out), backend=re.search(r"HMAC (\w+)", out).group(1))
    finally:
        b.close()
    res["hop_mac_insns"] = hop_mac
    res["insns"] = {"x25519": t["x25519"], "handshake": t["init"] + t["response"],
                    "handshake_init": t["init"], "handshake_response": t["response"],
                    "send_1200": t["send_1200"], "receive_1200": t["receive_1200"]}
    res["aead_insns"] = aead
    return res


def estimates(insns, mhz):
    s = {k: v * CPI / (mhz * 1e6) for k, v in insns.items()}
    return {"x25519_s": round(s["x25519"], 3), "handshake_s": round(s["handshake"], 3),
            "send_packets_per_s": round(1 / s["send_1200"], 1), "receive_packets_per_s": round(1 / s["receive_1200"], 1)}


def built_elf(target):
    """(path, None), or (None, why not) for a tools/mpbuild.py qemu target.
    Through tools/mpbuild.py every time (cached: it rebuilds only when
    lib/microtun, the manifests or the source changed), so the image
    measured is the code in the checkout, not the last one built."""
    built = ROOT / "build" / mpbuild.TARGETS[target][2]
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "mpbuild.py"), target],
                       capture_output=True, text=True, timeout=1200)
    if r.returncode == 0 and r.stdout.strip():
        return r.stdout.strip().splitlines()[-1], None
    why = (r.stderr.strip().splitlines() or ["tools/mpbuild.py %s failed" % target])[-1]
    return None, why + (" (not measuring the %s there: it may be older than lib/microtun; "
                        "pass --elf PATH to measure it anyway)" % built.relative_to(ROOT) if built.exists() else "")


def find_elf(argv):
    if "--elf" in argv:
        return argv[argv.index("--elf") + 1]
    if os.environ.get("QEMU_ELF"):
        return os.environ["QEMU_ELF"]
    elf, why = built_elf("qemu")
    if elf is None:
        raise SystemExit("bench_qemu: " + why)
    return elf


def main(argv):
    qemu = argv[argv.index("--qemu") + 1] if "--qemu" in argv else "qemu-system-arm"
    packets = int(argv[argv.index("--packets") + 1]) if "--packets" in argv else 4
    elf = find_elf(argv)
    res = {"elf": elf, "icount": "shift=0 (1 virtual ns per instruction)", "cpi_assumed": CPI}
    res["icount_check"] = icount_check(qemu, elf)
    if not res["icount_check"]["ok"]:
        raise SystemExit("bench_qemu: ticks_us does not follow qemu's instruction counter: %r" % res["icount_check"])
    res.update(run(qemu, elf, packets))
    res["estimates_are_not_measurements"] = True
    for mhz in CLOCKS_MHZ:
        res["estimate_%dmhz" % mhz] = estimates(res["insns"], mhz)
    # The same on the pure-Python AES (the issue asks for that figure too):
    # a second image, the port's board without cryptolib, unless an image
    # was named (--elf: measure that one) or --no-pyaes
    if "--elf" not in argv and not os.environ.get("QEMU_ELF") and "--no-pyaes" not in argv:
        pelf, why = built_elf("qemu-pyaes")
        if pelf is None:
            res["pure_aes"] = {"skipped": why}
        else:
            p = run(qemu, pelf, min(packets, PURE_PACKETS))
            res["pure_aes"] = {"elf": pelf, "aead_backend": p["aead_backend"], "aead_xor": p["aead_xor"],
                               "insns": p["insns"], "aead_insns": p["aead_insns"]}
            for mhz in CLOCKS_MHZ:
                res["pure_aes"]["estimate_%dmhz" % mhz] = estimates(p["insns"], mhz)
    e = res["estimate_133mhz"]
    res["targets_133mhz"] = {"handshake_s_max": TARGETS["handshake_s_133mhz"],
                             "handshake_meets": e["handshake_s"] <= TARGETS["handshake_s_133mhz"],
                             "packets_per_s_min_cryptolib": TARGETS["packets_per_s_133mhz_cryptolib"],
                             "packets_meet": (min(e["send_packets_per_s"], e["receive_packets_per_s"])
                                              >= TARGETS["packets_per_s_133mhz_cryptolib"])
                             if res["aead_backend"] == "cryptolib" else None}
    print(json.dumps(res))


if __name__ == "__main__":
    main(sys.argv[1:])
