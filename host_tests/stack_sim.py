"""The whole device stack (TunnelCore: endpoint + paths + outer framing)
against the gateway endpoint, over N simulated paths, on a fake clock that
wraps. Each path's first PoP is simulated: it checks the hop MAC, answers
hop probes, and applies the path's loss / delay / blackhole. Deterministic
for a seed; a simulated hour runs in about a second on CPython."""
from microtun import outer
from microtun.config import from_dict
from microtun.endpoint import DATA
from microtun.responder import Gateway
from microtun.ticks import ticks_add, ticks_diff, TICKS_PERIOD
from microtun.tunnel import TunnelCore
from microtun.x25519 import public_key
from mtest import Rng
from simloop import EventLoop

START = TICKS_PERIOD - 2000
DEV_KEY = bytes(range(1, 33))
GW_KEY = bytes(range(101, 133))


class PathNet:
    def __init__(self, delay=10, loss=0.0, down_loss=None):
        self.delay = delay
        self.loss = loss                  # device -> gateway
        self.down_loss = loss if down_loss is None else down_loss
        self.blackhole = False


def make_config(n_paths=2, policy="best", hop_keys=None):
    paths = []
    for i in range(n_paths):
        paths.append({"name": "p%d" % i, "pop": "127.0.0.1:%d" % (7000 + i), "label": 100 + i,
                      "rx_label": 200 + i, "hop_key": bytes([i + 1]) * 32})
    d = {"name": "dev", "private_key": DEV_KEY.hex(), "gateway_public_key": public_key(GW_KEY).hex(),
         "psk": ("42" * 32), "paths": [dict(p, hop_key=p["hop_key"].hex()) for p in paths],
         "policy": policy}
    return from_dict(d, "sim")


class StackSim(EventLoop):
    def __init__(self, n_paths=2, policy="best", seed=1, nets=None, params=None):
        self.cfg = make_config(n_paths, policy)
        self.core = TunnelCore(self.cfg, 1, params=params)
        self.gw = Gateway(GW_KEY)
        self.gw.add_peer(public_key(DEV_KEY), psk=b"\x42" * 32, channels=[1, 2])
        self.peer = self.gw.peers[public_key(DEV_KEY)]
        self.nets = nets or [PathNet() for _ in range(n_paths)]
        self.keys = [outer.HopKey(p.hop_key) for p in self.cfg.paths]
        self.rng = Rng(seed)
        EventLoop.__init__(self, START)
        self.gw_rx = []      # ids of channel-1 messages delivered to the gateway app (small ints:
                             # the unix port's heap stays unfragmented)
        self.gw_other = 0    # deliveries on other channels
        self.dev_rx = []
        self.bytes_up = 0    # outer bytes the device sent
        self.bytes_down = 0  # outer bytes sent to the device
        self.echo = False    # gateway echoes channel-1 data back (best route)
        self.down_type = outer.TYPE_DATA    # DATA_CE: as if a congested LOOPS segment marked it

    def _lost(self, p):
        return p > 0 and self.rng.below(1000000) < p * 1000000

    def _collect(self):
        for i, pkt in self.core.datagrams_to_send(self.now):
            self.bytes_up += len(pkt)
            net = self.nets[i]
            if net.blackhole or self._lost(net.loss):
                continue
            self.push(net.delay, ("pop", i, pkt))
        for data, name in self.gw.datagrams_to_send(self.now):
            i = int(name[1:])
            pkt = outer.seal(self.down_type, self.cfg.paths[i].rx_label, self.keys[i], data)
            self.bytes_down += len(pkt)
            net = self.nets[i]
            if net.blackhole or self._lost(net.down_loss):
                continue
            self.push(net.delay, ("dev", i, pkt))
        while True:
            e = self.gw.next_event()
            if e is None:
                break
            if e.kind == DATA:
                if e.channel == 1:
                    self.gw_rx.append(int(bytes(e.data).split(b":", 1)[0]))
                else:
                    self.gw_other += 1
                if self.echo:
                    self.gw.send(self.peer, e.channel, e.data, self.now)
        while True:
            m = self.core.next_message()
            if m is None:
                break
            self.dev_rx.append((m[0], bytes(m[1])))

    def _pop(self, i, pkt):
        """The first PoP of path i (and everything behind it)."""
        parsed = outer.parse(pkt)
        if parsed is None or not outer.verify(self.keys[i], pkt):
            raise AssertionError("the device sent a packet its PoP would drop")
        ptype, label = parsed
        if ptype == outer.TYPE_DATA:
            self.gw.receive_datagram(pkt[outer.HEADER_LEN:], "p%d" % i, self.now)
        elif ptype == outer.TYPE_HOP_PROBE:
            payload = outer.probe_reply_payload(pkt[outer.HEADER_LEN:], 4, 40000 + i, bytes((10, 0, 0, 1)))
            reply = outer.seal(outer.TYPE_HOP_PROBE_REPLY, label, self.keys[i], payload)
            self.bytes_down += len(reply)
            net = self.nets[i]
            if not (net.blackhole or self._lost(net.down_loss)):
                self.push(net.delay, ("dev", i, reply))
        # other types (keepalives) end at the PoP

    def _deliver(self, item):
        to, i, data = item
        if to == "pop":
            self._pop(i, data)
        else:
            self.core.receive(i, data, self.now)

    def _timed(self):
        return (self.core, self.gw)

    def connect(self):
        self.core.connect(self.now)
        self.run(1500)
        if not self.core.established:
            raise AssertionError("no session: %r" % self.core.health())

    def stream(self, count, interval, policy=None, channel=1, size=24, on_step=None):
        """Send count messages "<id>:xxx" every interval ms; returns ids sent."""
        ids = []
        for k in range(count):
            if on_step is not None:
                on_step(k)
            pad = size - len(b"%d:" % k)
            if self.core.send(channel, b"%d:" % k + b"x" * max(pad, 0), self.now, policy):
                ids.append(k)
            self.run(interval)
        return ids

    def delivered_ids(self):
        return list(self.gw_rx)
