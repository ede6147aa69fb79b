"""The event loop shared by the simulators (tunnel_sim, stack_sim): a fake
clock and a queue of in-flight items, advanced by `run(ms)`. Subclasses say
what to collect after each step, how to deliver an item, and which
endpoints have timers."""
from microtun.ticks import ticks_add, ticks_diff


class EventLoop:
    MAX_STEPS = 2000000

    def __init__(self, now):
        self.now = now
        self.q = []               # [deliver_at, seq, item]
        self.seq = 0

    def push(self, delay, item):
        self.seq += 1
        self.q.append([ticks_add(self.now, delay), self.seq, item])

    # -- hooks -------------------------------------------------------------------
    def _collect(self):
        pass

    def _deliver(self, item):
        raise NotImplementedError

    def _timed(self):
        return ()                 # objects with get_timer() / handle_timer(now)

    # -- the loop ------------------------------------------------------------------
    def _next_time(self):
        best = None
        for it in self.q:
            if best is None or ticks_diff(it[0], best) < 0:
                best = it[0]
        for ep in self._timed():
            t = ep.get_timer()
            if t is not None and (best is None or ticks_diff(t, best) < 0):
                best = t
        return best

    def run(self, ms):
        """Advance the clock by ms, delivering and firing everything due."""
        end = ticks_add(self.now, ms)
        steps = 0
        while True:
            self._collect()
            t = self._next_time()
            if t is None or ticks_diff(t, end) > 0:
                self.now = end
                self._collect()
                return
            if ticks_diff(t, self.now) > 0:
                self.now = t
            steps += 1
            if steps > self.MAX_STEPS:
                raise AssertionError("simulation does not settle (busy timer?)")
            due = [it for it in self.q if ticks_diff(it[0], self.now) <= 0]
            if due:
                due.sort(key=lambda it: (ticks_diff(it[0], self.now), it[1]))
                for it in due:
                    self.q.remove(it)
                for it in due:
                    self._deliver(it[2])
                continue
            for ep in self._timed():
                t = ep.get_timer()
                if t is not None and ticks_diff(t, self.now) <= 0:
                    ep.handle_timer(self.now)
