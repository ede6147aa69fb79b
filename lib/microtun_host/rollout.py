"""Fleet-wide updates in waves (docs/UPDATE.md, "Roll out in waves").

    report = rollout(["s1", "s2", ...], lambda name: update_device(client_for(name), bundle, 120),
                     waves=(1, 0.1, 0.5, 1.0), max_failure_rate=0.2, parallel=4)
    report.stopped        # None, or why the rollout stopped
    report.results        # {device: UpdateResult-like}: updated, rolled_back, failed
    report.skipped        # devices never touched because the rollout stopped

`waves` says how much of the fleet has been updated by the end of each
wave: an int is a number of devices, a float a fraction of the fleet (the
default: one canary, then 10 %, half, everyone). A wave whose failure rate
(rolled back or failed, over the devices of that wave) is above
`max_failure_rate` stops the rollout: no further device is touched. A
device that rolled back runs its last good code (the device guarantees it);
a failed one may not have been touched at all (refused, unreachable): its
result says at which stage.

update_one(device) returns an object with .status ("updated",
"rolled_back" or "failed") and .reason, as release.update_device does; an
exception out of it counts as "failed" with its text.
"""
import math
import time
from concurrent.futures import ThreadPoolExecutor

OK = "updated"


class Failed:
    def __init__(self, reason):
        self.status = "failed"
        self.reason = reason
        self.stage = "exception"

    def as_dict(self):
        return {"status": self.status, "reason": self.reason, "stage": self.stage}


def plan(n, waves):
    """Wave sizes for n devices: a list of counts adding up to n."""
    if n == 0:
        return []
    sizes = []
    done = 0
    for w in waves:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0:
            raise ValueError("waves: expected positive device counts (int) or fleet fractions (float), got %r" % (w,))
        target = w if isinstance(w, int) else math.ceil(w * n - 1e-9)   # a fraction rounds up
        target = min(target, n)
        if target > done:                   # a wave already reached (10 % of 5 after the canary) adds nobody
            sizes.append(target - done)
            done = target
        if done == n:
            break
    if done < n:
        sizes.append(n - done)      # the last wave takes the rest
    return sizes


class Report:
    def __init__(self):
        self.waves = []              # [{"devices": [...], "failures": n, "rate": r, "seconds": s}]
        self.results = {}
        self.stopped = None
        self.skipped = []

    def devices(self, status):
        return sorted(d for d, r in self.results.items() if r.status == status)

    def as_dict(self):
        return {"waves": self.waves, "stopped": self.stopped, "updated": self.devices(OK),
                "rolled_back": self.devices("rolled_back"), "failed": self.devices("failed"),
                "skipped": list(self.skipped),
                "results": {d: (r.as_dict() if hasattr(r, "as_dict") else {"status": r.status, "reason": r.reason})
                            for d, r in sorted(self.results.items())}}


def rollout(devices, update_one, waves=(1, 0.1, 0.5, 1.0), max_failure_rate=0.2, parallel=4, log=None):
    """Update `devices` in waves with update_one(device); see the module doc."""
    say = log or (lambda msg: None)
    devices = list(devices)
    if len(set(devices)) != len(devices):
        raise ValueError("devices: a device is listed twice")
    if not 0 <= max_failure_rate < 1:
        raise ValueError("max_failure_rate: expected 0 <= rate < 1, got %r" % (max_failure_rate,))
    if parallel < 1:
        raise ValueError("parallel: expected at least 1")
    sizes = plan(len(devices), waves)
    rep = Report()

    def one(dev):
        try:
            return dev, update_one(dev)
        except Exception as e:   # a bug or a dead link for one device must not stop the others' reports
            return dev, Failed("%s: %s" % (type(e).__name__, e))

    start = 0
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for i, size in enumerate(sizes):
            wave = devices[start:start + size]
            start += size
            t0 = time.monotonic()
            say("wave %d/%d: %d device(s): %s" % (i + 1, len(sizes), len(wave), ", ".join(map(str, wave))))
            bad = 0
            for dev, r in pool.map(one, wave):
                rep.results[dev] = r
                if r.status != OK:
                    bad += 1
                say("  %s: %s%s" % (dev, r.status, "" if r.status == OK else " (%s)" % r.reason))
            rate = bad / len(wave)
            rep.waves.append({"devices": list(wave), "failures": bad, "rate": round(rate, 3),
                              "seconds": round(time.monotonic() - t0, 3)})
            if rate > max_failure_rate:
                rep.skipped = devices[start:]
                rep.stopped = ("wave %d: %d of %d device(s) not updated (%.0f %% > %.0f %%); %d device(s) left "
                               "untouched" % (i + 1, bad, len(wave), 100 * rate, 100 * max_failure_rate,
                                              len(rep.skipped)))
                say("stopped: " + rep.stopped)
                break
    return rep
