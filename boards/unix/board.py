"""Board: the MicroPython unix port (a desktop, CI, tools/vboard.py).

The host's network is already up, there is no LED and no button, and the
temperature is simulated (a slow 20..50 degree sawtooth) so that the sample
app's alarms can be tried. docs/BOARDS.md says what every name is for.
"""
from time import ticks_ms

# -- facts: NAME is read here too (the boot log); the rest only by the host
# (microtun flash: detection, mpy-cross, modules), from the source: private
# consts, compiled to nothing here --------------------------------------------
NAME = "unix"
_PLATFORM = const("linux")   # sys.platform
_MACHINE_HAS = const("")     # a substring of sys.implementation._machine
_MPY_ARCH = const("x64")     # mpy-cross -march; bytecode-only .mpy load on any arch
_CRYPTOLIB = const(True)     # False: ship microtun/aes_pure.mpy too

# -- board settings ------------------------------------------------------------
NETWORK = None               # nothing to bring up
SAFE_BUTTON = None           # no button: SAFE file or Ctrl-C in the boot window
WDT_MAX_MS = None            # no machine.WDT on this port
FIRMWARE = {"boot_window_ms": 1000}   # a shorter Ctrl-C window than a real board


def network_up(net, timeout_ms, feed):
    return "the host's network"


def network_ok():
    return True


def safe_button():
    return False


def led(on):
    pass


def temperature():
    return 20 + (ticks_ms() // 2000) % 31


def hard_reset():
    """What a reset button is to a board: the interpreter ends at once,
    from any thread, whatever the main thread is doing (its supervisor,
    tools/vboard.py or a test, starts it again). The update loader
    (firmware/microtun_slot.py) uses it when a release on trial misses its
    deadline; machine.reset() here is a SystemExit that only the thread
    raising it would see."""
    import os
    os.system("kill -9 $PPID")
