"""The device's handshake backoff while the gateway is down (issue 11, item
11), on the fake clock of stack_sim, both interpreters.

docs/FIRMWARE.md and docs/PROTOCOL.md ("Timers") promise: retries 5 s
(+ up to 333 ms jitter) doubling to 60 s, forever; after recovery, one
handshake. Before the fix the all-paths-down rule rekeyed every 2 s, the
unresponsive-data timer spun at a past deadline while a handshake was
outstanding, and a second handshake followed the first after recovery."""
from stack_sim import StackSim, GW_KEY, DEV_KEY
from microtun import outer
from microtun import messages as m
from microtun.responder import Gateway
from microtun.ticks import ticks_diff
from microtun.x25519 import public_key

PORTABLE = True

JITTER = 333 + 50            # timers jitter + the simulated path delays and step granularity


class GatewayOutage(StackSim):
    """The PoPs stay up (hop probes answered); the gateway behind them is
    down while `down` is set, and comes back as a fresh process (no
    sessions) by restart()."""

    def __init__(self, **kw):
        StackSim.__init__(self, **kw)
        self.down = False
        self.t0 = self.now
        self.inits = []           # ms since t0 of each handshake initiation the device sent

    def _pop(self, i, pkt):
        parsed = outer.parse(pkt)
        if parsed is not None and parsed[0] == outer.TYPE_DATA:
            inner = pkt[outer.HEADER_LEN:]
            if m.message_type(inner) == m.TYPE_INIT:
                t = ticks_diff(self.now, self.t0)
                if not self.inits or t - self.inits[-1] > 100:    # one attempt, sent on several paths
                    self.inits.append(t)
            if self.down:
                return
        StackSim._pop(self, i, pkt)

    def restart(self):
        self.gw = Gateway(GW_KEY)
        self.gw.add_peer(public_key(DEV_KEY), psk=b"\x42" * 32, channels=[1, 2])
        self.peer = self.gw.peers[public_key(DEV_KEY)]
        self.down = False


def outage(seconds, traffic_every_ms=5000):
    s = GatewayOutage()
    s.connect()
    s.stream(10, 500)
    s.down = True
    s.t0 = s.now
    s.inits = []
    s.stream(seconds * 1000 // traffic_every_ms, traffic_every_ms)    # the app keeps sending
    return s


def gaps(times):
    return [b - a for a, b in zip(times, times[1:])]


def test_retries_back_off_5_s_doubling_to_60_s_while_the_gateway_is_down():
    s = outage(300)
    g = gaps(s.inits)
    want = [min(5000 << k, 60000) for k in range(len(g))]      # 5, 10, 20, 40, 60, 60 ... s
    assert len(g) >= 6, (s.inits, g)
    for got, w in zip(g, want):
        assert w <= got <= w + JITTER, (g, want)
    assert s.inits[0] <= 3000, s.inits        # the first: once every path has been dark for 2 s
    assert s.core.stats.get("rehandshake_all_paths_down") == 1, s.core.stats


def test_an_idle_device_backs_off_too():
    s = outage(200, traffic_every_ms=200000)
    g = gaps(s.inits)
    want = [min(5000 << k, 60000) for k in range(len(g))]
    assert len(g) >= 4, (s.inits, g)
    for got, w in zip(g, want):
        assert w <= got <= w + JITTER, (g, want)


def test_one_handshake_after_recovery():
    s = outage(150)
    before = len(s.inits)
    s.restart()                               # a fresh gateway: our old session is gone
    back = s.now
    s.stream(30, 5000)                        # 150 s more
    assert s.core.established
    assert s.peer.handshakes == 1, s.peer.handshakes
    new = [t for t in s.inits[before:]]
    assert len(new) == 1, (s.inits[before:], s.core.stats)
    # the retry that was pending when the gateway came back: at most the longest gap away
    assert new[0] - ticks_diff(back, s.t0) <= 60000 + JITTER
    # and the device's traffic reaches the new gateway afterwards
    assert s.gw_rx, "nothing delivered after recovery"
