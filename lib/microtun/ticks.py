"""Millisecond tick arithmetic for the sans-I/O core.

The core never reads a clock: every entry point takes `now`, a millisecond
tick counter that wraps at TICKS_PERIOD (2**30, as on MicroPython MCU ports;
the unix port's 2**62 period is a multiple, so drivers simply mask). Compare
ticks only through ticks_diff / ticks_add, exactly like time.ticks_diff.
"""
if __import__("sys").implementation.name != "micropython":
    def const(x):   # CPython; MicroPython's compiler folds const() with no name bound (a global costs a board heap)
        return x

TICKS_PERIOD = const(0x40000000)
TICKS_MASK = const(0x3FFFFFFF)
_HALF = const(0x20000000)


def ticks_add(t, delta):
    """t + delta (ms), wrapped into the tick period."""
    return (t + delta) & TICKS_MASK


def ticks_diff(a, b):
    """Signed a - b in ms, correct across the wrap for |a - b| < 2**29 ms (~6 days)."""
    return ((a - b + _HALF) & TICKS_MASK) - _HALF


def ticks_min(a, b):
    """The earlier of two deadlines; None means 'no deadline'."""
    if a is None:
        return b
    if b is None:
        return a
    return a if ticks_diff(a, b) <= 0 else b
