"""A deterministic two-endpoint simulator for portable tests: a fake clock that
starts just before the tick counter wraps, and a fake network between one
Device and one Gateway that can lose, duplicate, delay and reorder datagrams.
A `tap(direction, data)` hook sees every datagram sent and may return None
(drop), the same bytes, or other bytes (tamper)."""
from microtun.ticks import ticks_add, ticks_diff, TICKS_PERIOD
from microtun.endpoint import Device, DATA, HANDSHAKE
from microtun.responder import Gateway
from microtun import timers
from mtest import Rng
from simloop import EventLoop

START = TICKS_PERIOD - 3000      # the clock wraps 3 s into every test

TO_GW = "to_gw"
TO_DEV = "to_dev"


class Sim(EventLoop):
    def __init__(self, device, gateway, seed=1, loss=0.0, dup=0.0, delay=10, jitter=0, now=START):
        self.dev = device
        self.gw = gateway
        EventLoop.__init__(self, now)
        self.rng = Rng(seed)
        self.loss = loss
        self.dup = dup
        self.delay = delay
        self.jitter = jitter
        self.tap = None
        self.dev_events = []
        self.gw_events = []
        self.sent = {TO_GW: 0, TO_DEV: 0}

    def _chance(self, p):
        return p > 0 and self.rng.below(1000000) < p * 1000000

    def inject(self, direction, data, delay=0):
        self.push(delay, (direction, data))

    def _send(self, direction, data):
        self.sent[direction] += 1
        if self.tap is not None:
            data = self.tap(direction, data)
            if data is None:
                return
        if self._chance(self.loss):
            return
        copies = 2 if self._chance(self.dup) else 1
        for _ in range(copies):
            d = self.delay + (self.rng.below(self.jitter + 1) if self.jitter else 0)
            self.inject(direction, data, d)

    def _collect(self):
        for data, _ in self.dev.datagrams_to_send(self.now):
            self._send(TO_GW, data)
        for data, _ in self.gw.datagrams_to_send(self.now):
            self._send(TO_DEV, data)
        while True:
            e = self.dev.next_event()
            if e is None:
                break
            self.dev_events.append(e)
        while True:
            e = self.gw.next_event()
            if e is None:
                break
            self.gw_events.append(e)

    def _deliver(self, item):
        direction, data = item
        if direction == TO_GW:
            self.gw.receive_datagram(data, "pop", self.now)
        else:
            self.dev.receive_datagram(data, None, self.now)

    def _timed(self):
        return (self.dev, self.gw)

    def data(self, events):
        return [(e.channel, bytes(e.data)) for e in events if e.kind == DATA]

    def take_data(self, which):
        evs = self.dev_events if which == "dev" else self.gw_events
        out = self.data(evs)
        evs[:] = [e for e in evs if e.kind != DATA]
        return out


# Fixed keys so tests are reproducible (the Noise ephemerals are still random).
DEV_KEY = bytes(range(1, 33))
GW_KEY = bytes(range(101, 133))
PSK = b"\x42" * 32


def pair(psk=PSK, boot=1, params=None, gw_params=None, channels=None, dev_key=DEV_KEY, gw_window=None, **sim_kw):
    """A Device and a Gateway that know each other, inside a Sim."""
    gw = Gateway(GW_KEY, params=gw_params or params) if gw_window is None else \
        Gateway(GW_KEY, params=gw_params or params, window=gw_window)
    dev = Device(dev_key, gw.public_key, psk=psk, boot_counter=boot, params=params)
    gw.add_peer(dev.public_key, psk=psk, name="dev1", channels=channels)
    return Sim(dev, gw, **sim_kw)


def connected(**kw):
    sim = pair(**kw)
    sim.dev.connect(sim.now)
    sim.run(200)
    if not sim.dev.established:
        raise AssertionError("no handshake: dev %r gw %r" % (sim.dev.stats, sim.gw.stats))
    return sim


def fast_params(**kw):
    """Short timers for tests that need several rekeys."""
    return timers.Params(**kw)
