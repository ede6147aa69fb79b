"""The firmware's start-up (docs/FIRMWARE.md): safe mode, the config and
the settings, the watchdog. Used once per boot by microtun_fw, which then
drops this module so its bytecode leaves the heap (the network comes up
through microtun_net).

    cfg = microtun_boot.start(fw)    # None: safe mode (said here, in the log and on the console)
"""
import json
import os
from micropython import const
from time import ticks_ms, ticks_diff, ticks_add, sleep_ms

_CONFIG = const("microtun.json")
_SAFE_FILES = const(("SAFE", "safe_mode"))

DEFAULTS = {
    "boot_window_ms": 3000,      # Ctrl-C / safe button window before anything starts
    "crash_delay_ms": 5000,      # wait before the reset after a fatal error ...
    "crash_delay_max_ms": 600000,  # ... doubling per consecutive fatal error, up to this
    "stable_ms": 60000,          # session up this long: the fatal error count goes back to 0
    "net_timeout_ms": 20000,     # one attempt to bring the network up
    "net_retry_ms": 2000,        # wait after a failed attempt ...
    "net_retry_max_ms": 60000,   # ... doubling up to this
    "net_check_ms": 5000,        # how often the link is checked while running
    "loop_ms": 500,              # longest wait in the main loop (watchdog feeding, app ticks)
    "log_bytes": 4096,           # size of each of the two log files
}


class SafeMode(Exception):
    """Stop here and leave the REPL to the user: SafeMode(why, level); a
    config problem is logged as an error, a request for safe mode as boot."""


def exists(name):
    try:
        os.stat(name)
        return True
    except OSError:
        return False


class NoBoard:
    """Stands in when board.py is missing: no network to bring up, no LED.
    (Its methods keep this module loaded: a desk setup, not a tight heap.)"""
    NAME = "unknown"

    def network_up(self, net, timeout_ms, feed):
        return "no board.py: assuming the network is up"

    def network_ok(self):
        return True

    def safe_button(self):
        return False

    def led(self, on):
        pass

    def temperature(self):
        return None


def start(fw):
    """Safe mode checks, boot window, config, watchdog: the validated
    config (microtun.config.Settings), or None in safe mode, which is
    logged and said on the console here (its lines are then off the heap
    with this module: microtun_fw stays resident). fw.board is None when
    board.py is missing: a NoBoard stands in."""
    fw.s = dict(DEFAULTS)
    board = fw.board
    if board is None:
        board = fw.board = NoBoard()
        fw.log("warn", "no board.py (%s); running without board support" % fw.no_board)
    fw.log("boot", "boot %d on %s (%s)%s" % (
        fw.boots, getattr(board, "NAME", "?"), reset_cause(),
        "" if not fw.crashes else ", after %d fatal error(s) in a row" % fw.crashes))
    for config_fw in (firmware_object(), {}):
        try:
            fw.s = settings(getattr(board, "FIRMWARE", {}), config_fw)
            break
        except ValueError:
            pass                     # reported after the boot window, with the config
    try:
        check_safe_mode(fw)
        cfg = load_config(fw)
    except SafeMode as e:
        fw.log(e.args[1] if len(e.args) > 1 else "boot", "safe mode: %s" % e.args[0])
        print("microtun: nothing started; the REPL is yours (machine.reset() to try again)")
        return None
    start_watchdog(fw, cfg.watchdog_ms)
    return cfg


def check_safe_mode(fw):
    for name in _SAFE_FILES:
        if exists(name):
            raise SafeMode("the file %s exists (remove it: mpremote rm :%s)" % (name, name))
    board = fw.board
    button = getattr(board, "SAFE_BUTTON", None)
    if button is not None and board.safe_button():
        raise SafeMode("%s held at boot" % button)
    ms = fw.s["boot_window_ms"]
    if ms <= 0:
        return
    print("microtun: starting in %d.%d s; Ctrl-C%s for safe mode" % (
        ms // 1000, ms % 1000 // 100, "" if button is None else " or press " + button))
    end = ticks_add(ticks_ms(), ms)
    on = False
    try:
        while ticks_diff(end, ticks_ms()) > 0:
            if button is not None and board.safe_button():
                raise SafeMode("%s pressed during the boot window" % button)
            on = not on
            fw.led(on)
            sleep_ms(50)
    except KeyboardInterrupt:
        raise SafeMode("Ctrl-C during the boot window")
    finally:
        fw.led(False)


def load_config(fw):
    try:
        from microtun import config as mconfig
    except ImportError as e:
        raise SafeMode("the microtun package is missing or incomplete (%s); flash it: microtun flash" % e, "error")
    try:
        cfg = mconfig.load(_CONFIG)
    except mconfig.ConfigError as e:
        raise SafeMode("config: %s" % e, "error")
    finally:
        mconfig.forget()             # validation code: off the heap once we return
    try:
        fw.s = settings(getattr(fw.board, "FIRMWARE", {}), firmware_object())
    except ValueError as e:
        raise SafeMode("config: %s" % e, "error")
    if getattr(fw.board, "NETWORK", None) == "wifi":
        err = check_wifi(cfg.network)
        if err:
            raise SafeMode("config: " + err, "error")
    fw.log.max = fw.s["log_bytes"]
    return cfg


def start_watchdog(fw, ms):
    if not ms:
        return
    top = getattr(fw.board, "WDT_MAX_MS", None)
    if top and ms > top:
        fw.log("warn", "watchdog_s %d is above this board's %d ms; using %d ms" % (ms // 1000, top, top))
        ms = top
    try:
        from machine import WDT
    except (ImportError, AttributeError):
        fw.log("warn", "watchdog_s is set but this port has no machine.WDT; running without it")
        return
    fw.wdt = WDT(timeout=ms)
    fw.log("info", "watchdog on: %d ms; it cannot be stopped, so Ctrl-C leaves that long at the REPL" % ms)


# -- settings -------------------------------------------------------------------------
def firmware_object():
    """The config's "firmware" object. Read on its own, before the boot
    window; a broken file is reported by load_config() instead."""
    try:
        with open(_CONFIG) as f:
            d = json.load(f)
        fw = d.get("firmware")
        return fw if isinstance(fw, dict) else {}
    except Exception:
        return {}


def settings(board_fw, config_fw, source=_CONFIG):
    """DEFAULTS, then the board's FIRMWARE dict, then the config's "firmware"
    object; an unknown name or a bad value raises ValueError (one line)."""
    s = dict(DEFAULTS)
    for where, d in (("board.py FIRMWARE", board_fw), (source + ": firmware", config_fw)):
        if not isinstance(d, dict):
            raise ValueError("%s: expected an object of settings" % where)
        for k in d:
            v = d[k]
            if k not in DEFAULTS:
                raise ValueError("%s.%s: unknown setting; known: %s" % (where, k, ", ".join(sorted(DEFAULTS))))
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError("%s.%s: expected a whole number of ms (>= 0), got %r" % (where, k, v))
            s[k] = v
    return s


def check_wifi(net, source=_CONFIG):
    """The "network" object of a Wi-Fi board: None if usable, else one line."""
    ssid = net.get("ssid")
    if not isinstance(ssid, str) or not ssid or len(ssid) > 32:
        return ("%s: network.ssid: %s; this board joins Wi-Fi: \"network\": {\"ssid\": \"...\", \"password\": \"...\"}"
                % (source, "missing" if ssid is None else "expected 1..32 characters, got %r" % (ssid,)))
    pw = net.get("password", "")
    if not isinstance(pw, str) or len(pw) > 64 or 0 < len(pw) < 8:
        return "%s: network.password: expected \"\" (open network) or 8..64 characters" % source
    return None


def reset_cause():
    try:
        import machine
        c = machine.reset_cause()
    except (ImportError, AttributeError):
        return "reset cause unknown"
    for name in ("PWRON_RESET", "HARD_RESET", "WDT_RESET", "DEEPSLEEP_RESET", "SOFT_RESET"):
        if getattr(machine, name, None) == c:
            return name.lower().replace("_", " ")
    return "reset cause %s" % c
