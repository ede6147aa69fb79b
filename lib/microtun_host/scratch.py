"""Private temporary directories for files that hold keys (the demo's and
the benchmarks' provisioned networks): mode 0700, and removed on every exit
this process can see.

    tmp = scratch.mkdtemp("microtun-demo-")    # removed at exit, Ctrl-C, SIGTERM, SIGHUP
    scratch.keep(tmp)                           # --keep: leave it (and say where)
    scratch.remove(tmp)                         # now

Normal exit and exceptions (Ctrl-C is KeyboardInterrupt) run the atexit
hook; SIGTERM and SIGHUP, which would end the process without it, are turned
into SystemExit(128 + signal) so `finally` blocks and the hook run too (only
where the signal still has its default action, in the main thread). SIGKILL
cannot be caught: nothing can clean up after it.
"""
import atexit
import shutil
import signal
import tempfile
import threading

_dirs = []
_installed = []


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def _cleanup():
    while _dirs:
        shutil.rmtree(_dirs.pop(), ignore_errors=True)


def _install():
    if _installed:
        return
    _installed.append(True)
    atexit.register(_cleanup)
    if threading.current_thread() is not threading.main_thread():
        return
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) == signal.SIG_DFL:
            signal.signal(sig, _exit_on_signal)


def catch_signals():
    """Turn SIGTERM and SIGHUP into SystemExit here too (for a process whose
    `finally` blocks remove key material, like provision's scratch check)."""
    _install()


def mkdtemp(prefix):
    """A new 0700 directory, removed when this process exits."""
    d = tempfile.mkdtemp(prefix=prefix)
    _dirs.append(d)
    _install()
    return d


def keep(d):
    """Leave d in place at exit."""
    if d in _dirs:
        _dirs.remove(d)


def remove(d):
    """Remove d now."""
    keep(d)
    shutil.rmtree(d, ignore_errors=True)


def finish(net, d, keep_it):
    """The end of a demo run: stop its network (if it started), then keep d
    (saying where, and that it holds private keys) or remove it."""
    if net is not None:
        net.stop()
    if keep_it:
        keep(d)
        print("kept (holds private keys; remove it when done): %s" % d)
    else:
        remove(d)
