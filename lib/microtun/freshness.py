"""Handshake freshness without a wall clock (docs/PROTOCOL.md, "Freshness").

Boards boot with wrong clocks, and embedded WireGuard ports reject reconnects
after a reboot because their TAI64N timestamp went backwards. microtun's
initiation instead carries 12 bytes that only ever grow:

    boot counter (u32, persisted, +1 at every boot) || ms since this boot (u64)

The responder keeps the highest value per peer and refuses anything not
above it (a replayed initiation). Big-endian, so comparing the bytes compares
the numbers. A device whose counter went backwards (re-flashed, storage
wiped) learns the value to pass from the gateway's authenticated STALE
answer (docs/PROTOCOL.md §5), jumps past it (microtun.stale.jump) and persists it
with `save_boot_counter`.
"""
from microtun.ticks import ticks_diff

if __import__("sys").implementation.name != "micropython":
    def const(x):   # CPython; MicroPython's compiler folds const() with no name bound (a global costs a board heap)
        return x

_MAX_BOOT = const(0xFFFFFFFF)


def next_boot_counter(storage):
    """Read, increment and persist the boot counter; call once per boot,
    before the first handshake. `storage` is a driver object with
    read(name) -> bytes or None and write(name, data). Raises ValueError if
    the stored value is corrupt (the driver decides whether to reset it) and
    lets the storage's own errors through: without a persisted counter,
    reconnects after a reboot may be refused for a while."""
    raw = storage.read("boot")
    if raw is None:
        n = 0
    elif len(raw) == 4:
        n = int.from_bytes(raw, "big")
    else:
        raise ValueError("boot counter in storage is corrupt (%d bytes, expected 4)" % len(raw))
    if n >= _MAX_BOOT:
        raise ValueError("boot counter exhausted; re-provision this device's keys")
    n += 1
    save_boot_counter(storage, n)
    return n


def save_boot_counter(storage, n):
    storage.write("boot", n.to_bytes(4, "big"))


class Freshness:
    """Produces strictly increasing freshness values from the boot counter and
    the tick values the endpoint is driven with (no clock read here)."""

    def __init__(self, boot_counter):
        if not isinstance(boot_counter, int) or not 0 <= boot_counter <= _MAX_BOOT:
            raise ValueError("boot_counter must be an int from 0 to 2**32-1")
        self.boot = boot_counter
        self._uptime = 0
        self._last_now = None
        self._last_value = -1

    def observe(self, now):
        """Accumulate elapsed ms; call with every `now` the endpoint sees."""
        if self._last_now is not None:
            d = ticks_diff(now, self._last_now)
            if d > 0:
                self._uptime += d
        self._last_now = now

    def next(self, now):
        self.observe(now)
        v = self._uptime
        if v <= self._last_value:
            v = self._last_value + 1
        self._last_value = v
        return self.boot.to_bytes(4, "big") + v.to_bytes(8, "big")
