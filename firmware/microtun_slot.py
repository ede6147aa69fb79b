"""Which code set a board runs, and the trial of a new one (docs/UPDATE.md).

    import microtun_slot
    microtun_slot.start()         # main.py: boot() picks the set, then the firmware is imported
    ...
    slot = sys.modules.get("microtun_slot")
    if slot: slot.up()            # microtun_fw: the tunnel reached the gateway: commit
    if slot: slot.failed(why)     # microtun_fw: a fatal error on trial: roll back now

A code set is the flashed files ("base": /app.py, /lib/...) or one of two
slots, ota/a and ota/b, each holding the files of one release at the same
paths (ota/a/lib/microtun/tunnel.mpy, ota/a/app.py) and its manifest.
boot() puts the chosen slot in front of sys.path, so its modules shadow the
flashed and the frozen ones.

The state is one record "seq cur trial tries" kept twice (ota/state.0,
ota/state.1), each with a SHA-256 check: a write goes to the file that does
not hold the newest record, so a power cut while writing leaves the other
one intact, on any filesystem (FAT's rename is not atomic). The record is
the only switch: staging files never changes what boots, and arming is one
record write (microtun.update).

On a trial boot the number of tries is written before the new code runs.
The trial ends:
  - committed: microtun_fw calls up() once the tunnel reached the gateway;
  - rolled back: a fatal error (failed()), main.py cannot import the
    firmware (failed()), no session within the manifest's trial_s (a timer
    resets the board, failed() first), or MAX_TRIES boots without a commit
    (power cuts, a watchdog reset of a hard hang, crash loops).
This module is the boot loader: an update never replaces it (nor main.py,
boot.py, board.py, the config); `microtun flash` does. On a boot without a
trial it leaves sys.modules, so it costs no heap while the tunnel runs.
"""
import os
import sys

DIR = "ota"
SLOTS = ("a", "b")
BASE = "base"
NONE = "-"
MAX_TRIES = 3                # trial boots without a commit before rolling back
TRIAL_S = 60                 # when the manifest does not say
NOTE = DIR + "/last.txt"     # the last outcome, for `status` (not part of the switch)

_trial = None                # the slot on trial in this boot
_timer = None
_lock = None


def set_dir(name):
    return None if name == BASE else DIR + "/" + name


def _check(text):
    import hashlib
    import binascii
    return binascii.hexlify(hashlib.sha256(text.encode()).digest()[:8]).decode()


def _parse(raw):
    """(seq, cur, trial, tries) from a record's text, or None if torn or forged."""
    try:
        parts = raw.split()
        if len(parts) != 6 or parts[0] != "MTS1":
            return None
        body = " ".join(parts[:5])
        if _check(body) != parts[5]:
            return None
        seq, cur, trial, tries = int(parts[1]), parts[2], parts[3], int(parts[4])
        if cur not in (BASE,) + SLOTS or trial not in (NONE,) + SLOTS or trial == cur:
            return None
        return seq, cur, trial, tries
    except (ValueError, IndexError):
        return None


def _records():
    out = []
    for i in (0, 1):
        try:
            with open("%s/state.%d" % (DIR, i)) as f:
                r = _parse(f.read(200))
        except OSError:
            r = None
        out.append(r)
    return out


def read():
    """The newest valid record: (seq, cur, trial, tries); (0, base, -, 0) if none."""
    best = (0, BASE, NONE, 0)
    for r in _records():
        if r is not None and r[0] > best[0]:
            best = r
    return best


def write(cur, trial, tries):
    """Write the next record over the older (or broken) of the two files."""
    recs = _records()
    seq = read()[0] + 1
    i = 0 if recs[0] is None or (recs[1] is not None and recs[0][0] < recs[1][0]) else 1
    body = "MTS1 %d %s %s %d" % (seq, cur, trial, tries)
    try:
        os.mkdir(DIR)
    except OSError:
        pass
    with open("%s/state.%d" % (DIR, i), "w") as f:
        f.write("%s %s\n" % (body, _check(body)))


def note(text):
    """The last outcome (one line), for `microtun.update.status()`. Best effort."""
    try:
        with open(NOTE, "w") as f:
            f.write(text + "\n")
    except OSError:
        pass
    print("microtun update: " + text)
    _log("boot" if text.startswith("committed") else "warn", "update: " + text)


def _log(level, text):
    """Into microtun.log (a rollback must be visible later): through the
    firmware's Log when it is loaded, else appended in the same format for
    the boot about to start (the firmware counts it after us)."""
    fw = sys.modules.get("microtun_fw")
    try:
        if fw is not None:
            fw.Log(fw.read_state()[0]).write("%s %s" % (level, text))
            return
        try:
            with open("microtun_fw.txt") as f:
                boot = int(f.read().split()[0]) + 1
        except (OSError, ValueError, IndexError):
            boot = 1
        with open("microtun.log", "a") as f:
            f.write("#%d +0.000s %s %s\n" % (boot, level, text))
    except Exception:
        pass


def version(name):
    """The release version of a set, from its manifest ("" for base or unreadable)."""
    d = set_dir(name)
    if d is None:
        return ""
    try:
        import json
        with open(d + "/manifest.json") as f:
            m = json.load(f)
        return str(m.get("version", ""))
    except Exception:
        return ""


def _present(name):
    d = set_dir(name)
    if d is None:
        return True
    try:
        os.stat(d + "/manifest.json")
        return True
    except OSError:
        return False


def paths(name):
    """The sys.path entries a set puts in front (none for base)."""
    d = set_dir(name)
    return [] if d is None else [d, d + "/lib"]


def running():
    """The set this interpreter imports from: read back from sys.path."""
    for p in sys.path:
        for s in SLOTS:
            if p == set_dir(s):
                return s
    return BASE


def _use(name):
    for p in reversed(paths(name)):
        sys.path.insert(0, p)


def boot():
    """Pick the set for this boot and put it on sys.path. A pending trial
    is counted and guarded; a trial with MAX_TRIES boots behind it, or
    whose files are gone, is rolled back. Never raises."""
    global _trial
    try:
        seq, cur, trial, tries = read()
    except Exception as e:           # cannot even read: run the flashed files
        print("microtun update: cannot read the update state (%s); running the flashed files" % e)
        return
    if trial != NONE:
        if tries >= MAX_TRIES:
            _roll_back(cur, trial, "%d boots of %s without reaching the gateway" % (tries, trial))
        elif not _present(trial):
            _roll_back(cur, trial, "the files of %s are gone" % trial)
        else:
            try:
                write(cur, trial, tries + 1)
            except OSError as e:     # cannot count the try: do not run untested code uncounted
                print("microtun update: cannot write the update state (%s); not trying %s" % (e, trial))
            else:
                _trial = trial
                _use(trial)
                print("microtun update: trying %s (%s), boot %d of at most %d" % (
                    trial, version(trial) or "?", tries + 1, MAX_TRIES))
                _guard(_trial_ms(trial))
                return
    if not _present(cur):
        print("microtun update: the committed set %s is missing; running the flashed files" % cur)
        cur = BASE
    _use(cur)
    sys.modules.pop(__name__, None)  # nothing to watch this boot: off the heap


def start():
    """main.py's first call: boot(), then import the firmware. True if
    main.py should run it; a release on trial whose firmware does not even
    import is rolled back here and the board reset."""
    boot()
    try:
        import microtun_fw
        return True
    except Exception as e:
        print("microtun: cannot import microtun_fw (%r); flash the firmware: microtun flash" % (e,))
        if failed("cannot import microtun_fw: %r" % (e,)):
            reset()
        return False


def _trial_ms(name):
    try:
        import json
        with open(set_dir(name) + "/manifest.json") as f:
            t = json.load(f).get("trial_s", TRIAL_S)
        if isinstance(t, int) and not isinstance(t, bool) and 1 <= t <= 3600:
            return t * 1000
    except Exception:
        pass
    return TRIAL_S * 1000


def _roll_back(cur, trial, why):
    try:
        write(cur, NONE, 0)
    except OSError as e:
        print("microtun update: cannot write the update state (%s)" % e)
    note("rolled back from %s (%s) to %s: %s" % (trial, version(trial) or "?", cur, why))


def _take_trial():
    """With the lock held: the set on trial, no longer on trial (its
    deadline cancelled), and the state record; None if nothing is."""
    global _trial
    name = _trial
    if name is None:
        return None
    _trial = None
    _cancel()
    return (name,) + tuple(read())


def up():
    """The tunnel reached the gateway: commit the set on trial (once)."""
    if _trial is None:
        return False
    with _locked():
        t = _take_trial()
        if t is None:
            return False
        name, seq, cur, trial, tries = t
        if trial != name:
            return False
        write(name, NONE, 0)
    note("committed %s (%s) after %d boot(s)" % (name, version(name) or "?", tries))
    sys.modules.pop(__name__, None)  # nothing left to watch: off the heap
    return True


def failed(why):
    """The set on trial failed: roll back now (the caller resets). False if
    nothing is on trial (a committed set's failures are the firmware's)."""
    if _trial is None:
        return False
    with _locked():
        t = _take_trial()
        if t is None:
            return False
        name, seq, cur, trial, tries = t
        if trial == name:
            _roll_back(cur, name, why)
    return True


def on_trial():
    return _trial


# -- the trial deadline ------------------------------------------------------------------
class _Locked:
    def __enter__(self):
        if _lock is not None:
            _lock.acquire()

    def __exit__(self, *a):
        if _lock is not None:
            _lock.release()


def _locked():
    return _Locked()


def _expired(ms):
    if failed("no session with the gateway within %d s" % (ms // 1000)):
        reset()


def reset():
    """A hard reset, from anywhere (a timer callback, another thread): the
    board's (board.hard_reset() on the unix port, which ends the process),
    else machine.reset()."""
    try:
        import board
        f = getattr(board, "hard_reset", None)
        if f is not None:
            f()
    except ImportError:
        pass
    import machine
    machine.reset()


def _guard(ms):
    """Reset the board if the trial is neither committed nor failed in ms:
    a machine.Timer where the port has one (its callback runs between
    bytecodes, so a Python loop that never returns is interrupted), else a
    thread. A hang inside C (no bytecode runs) needs the hardware watchdog
    ("watchdog_s"): its reset counts as a try."""
    global _timer, _lock
    try:
        from machine import Timer
        try:
            t = Timer(-1)
        except (ValueError, TypeError):
            t = Timer(0)
        t.init(mode=Timer.ONE_SHOT, period=ms, callback=lambda _t: _expired(ms))
        _timer = t
        return
    except (ImportError, AttributeError, ValueError, TypeError, OSError):
        pass
    try:
        import _thread
    except ImportError:
        print("microtun update: no machine.Timer and no threads: the trial has no deadline, only MAX_TRIES")
        return
    _lock = _thread.allocate_lock()
    # The clock is imported here, by the thread that boots, and handed to
    # the guard: the guard thread imports nothing, so it never searches the
    # filesystem while the boot's own imports do (MicroPython's VFS is not
    # thread-safe; once, under load, both threads of the unix port took
    # `time` for a directory: "no module named 'time.ticks_ms'").
    try:
        from time import ticks_ms, ticks_diff, sleep_ms
    except ImportError:              # CPython (the tests)
        from time import monotonic, sleep

        def ticks_ms():
            return int(monotonic() * 1000)

        def ticks_diff(a, b):
            return a - b

        def sleep_ms(ms):
            sleep(ms / 1000)
    _thread.start_new_thread(_watch, (ms, ticks_ms, ticks_diff, sleep_ms))


def _watch(ms, ticks_ms, ticks_diff, sleep_ms):
    start = ticks_ms()
    while _trial is not None:
        if ticks_diff(ticks_ms(), start) >= ms:
            _expired(ms)
            return
        sleep_ms(50)


def _cancel():
    global _timer
    if _timer is not None:
        try:
            _timer.deinit()
        except Exception:
            pass
        _timer = None
