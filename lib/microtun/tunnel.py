"""The device's whole protocol stack, sans-I/O: the inner endpoint (Device),
the paths (PathSet) and the outer framing, driven by datagrams and `now`.

    core = TunnelCore(cfg, boot_counter)
    core.connect(now)
    core.send(1, b"temp=21.5", now, policy="critical")
    core.receive(path_index, outer_packet, now)    # from path i's socket
    for i, pkt in core.datagrams_to_send(now): ... # send pkt on path i
    core.next_message()                            # (channel, data) or None
    core.get_timer() / core.handle_timer(now)

microtun.driver wraps it with sockets and select.poll; tests wrap it with a
fake network and a fake clock (a simulated hour takes a second).
"""
# whole modules, as `import microtun.x as y`: endpoint.py says why
import microtun.endpoint as endpoint
import microtun.hop as hop
import microtun.paths as paths
import microtun.ticks as ticks

if __import__("sys").implementation.name != "micropython":
    def const(x):   # CPython; MicroPython's compiler folds const() with no name bound (a global costs a board heap)
        return x

_ALL_DOWN_MS = const(2000)   # every path down this long: handshake again (doubling while it lasts)
_ALL_DOWN_MAX_SHIFT = const(5)
_PUBLIC_ADDR_REFRESH_MS = const(1800000)  # ask the first PoP for our public address this often


_CTL_OPS_REQ = const(0x10)   # microtun.ops.CTL_OPS_REQ: an operations request (docs/OPS.md)


class TunnelCore:
    storage = None               # the driver's storage: a boot counter jump is persisted there
    ops = None                   # the ops agent (microtun.ops), made by the first ops request
    ops_root = "."               # the directory ops may read and write (on a board: "/", its cwd)
    log_ring = None              # the last log lines, kept when the config allows ops (microtun.logring)
    reboot_requested = False     # an ops `reboot` asked for a restart: the firmware does it (docs/OPS.md)

    def __init__(self, cfg, boot_counter, params=None, log=lambda level, msg: None):
        self.cfg = cfg
        if cfg.ops:
            from microtun.logring import LogRing
            log = self.log_ring = LogRing(log)
        self.log = log
        if params is None and getattr(cfg, "unresponsive_ms", 0):
            from microtun import timers
            params = timers.Params(unresponsive_ms=cfg.unresponsive_ms)
        self.device = endpoint.Device(cfg.private_key, cfg.gateway_public, psk=cfg.psk, boot_counter=boot_counter,
                                      params=params, window=cfg.window, room=True)
        self.paths = paths.PathSet([paths.Path(i, pc.name, pc.label, pc.rx_label, hop.HopKey(pc.hop_key))
                              for i, pc in enumerate(cfg.paths)], cfg.policy, cfg.nat_keepalive_ms)
        self.stats = {}
        self.tx_bytes = 0            # outer bytes sent, all paths
        self.rx_bytes = 0            # outer bytes received and authenticated
        self._out = []
        self._inbox = []
        self._all_down_since = None
        self._all_down_n = 0         # all-down handshakes in this outage

    # -- app side --------------------------------------------------------------
    @property
    def established(self):
        return self.device.established

    def connect(self, now):
        self.device.connect(now)
        self._flush(now)

    def send(self, channel, data, now, policy=None):
        """Send data on an app channel. ValueError for a policy that is not
        None/best/critical/adaptive or channel 0; False (counted as
        `channel_denied`, logged) for a channel the config does not list."""
        if channel == endpoint.CONTROL_CHANNEL:
            raise ValueError("channel 0 is reserved for path control; use 1..255")
        if not isinstance(channel, int) or not 0 < channel < 256:
            raise ValueError("channel must be an int from 1 to 255, got %r" % (channel,))
        if policy is not None and policy not in paths.POLICIES:
            raise ValueError("policy must be None (the config's default) or one of %s, got %r" % (
                ", ".join(paths.POLICIES), policy))
        allowed = self.cfg.channels
        if allowed is not None and channel not in allowed:
            # The gateway would drop it (counted there): refuse it here, where the app can see it.
            self._count("channel_denied")
            n = self.stats["channel_denied"]
            if n in (1, 10, 100, 1000) or n % 10000 == 0:
                self.log("warn", "channel %r is not in this device's config (channels %s): not sent (%d refused)" % (
                    channel, ", ".join("%d" % c for c in allowed), n))
            return False
        ok = self.device.send(channel, data, now, route=policy)
        self.paths.note_app_send(now)
        self._flush(now)
        return ok

    def next_message(self):
        return self._inbox.pop(0) if self._inbox else None

    def health(self):
        return {"established": self.device.established, "paths": self.paths.health(),
                "tunnel": dict(self.device.stats), "driver": dict(self.stats),
                "tx_bytes": self.tx_bytes, "rx_bytes": self.rx_bytes}

    # -- network side -------------------------------------------------------------
    def _count(self, reason):
        self.stats[reason] = self.stats.get(reason, 0) + 1

    def datagrams_to_send(self, now=None):
        out = self._out
        self._out = []
        return out

    def receive(self, i, pkt, now):
        """An outer packet that arrived on path i's socket."""
        # Small on purpose (as endpoint.Device.receive_datagram): a frame
        # over 11 words is taken from the heap, and this one (20 words with
        # the checks' names) stayed there through the device's whole
        # receive, a handshake's X25519s and AEAD calls included. The checks
        # run in _outer_in, whose frame is gone when the device runs.
        p = self._outer_in(i, pkt, now)
        if p is not None:
            self._data_in(p, i, pkt, now)

    def _outer_in(self, i, pkt, now):
        """The outer checks and the hop's own messages; for a DATA packet
        that authenticated (counted on its path), the path, else None."""
        if not 0 <= i < len(self.paths.paths):
            raise ValueError("no path %r" % (i,))
        p = self.paths.paths[i]
        # outer.parse()'s checks without its tuple per packet
        why = hop.reject_reason(pkt)
        if why is not None:
            self._count("outer_" + why)
            return
        ptype = pkt[0] & 0x0F
        label = (pkt[1] << 16) | (pkt[2] << 8) | pkt[3]
        if ptype == hop.TYPE_PATH_CHALLENGE:
            # The first PoP saw us at a new address and will move its return
            # address only when we echo its nonce from there (docs/OUTER.md
            # §3). 12 bytes in, 12 bytes out, to our PoP only.
            if label == p.label and len(pkt) == hop.HEADER_LEN:
                self._count("path_challenge_rx")
                self._emit(p, hop.path_response(p.label, p.key, pkt), now)
            else:
                self._count("outer_bad_challenge")
            return
        if label != p.rx_label and not (ptype == hop.TYPE_HOP_PROBE_REPLY and label == p.label):
            self._count("outer_unknown_label")
            return
        if not hop.verify(p.key, pkt):
            self._count("outer_bad_mac")
            return
        p.rx_packets += 1
        p.rx_bytes += len(pkt)
        self.rx_bytes += len(pkt)
        if ptype == hop.TYPE_DATA_CE:           # a congested segment on the way (docs/LOOPS.md)
            self._count("ce_marks")
            ptype = hop.TYPE_DATA
        if ptype == hop.TYPE_DATA:
            return p
        if ptype == hop.TYPE_HOP_PROBE_REPLY:
            r = hop.parse_probe_reply(pkt[hop.HEADER_LEN:])
            if r is not None:
                addr = hop.format_addr(r[1], r[2], r[3])
                if addr != p.public_addr:
                    self.log("info", "path %s: the PoP sees us at %s" % (p.name, addr))
                p.public_addr = addr
        else:
            self._count("outer_unexpected_type")

    def _data_in(self, p, i, pkt, now):
        # (11 words: its frame on the C stack too)
        dup = self.device.stats.get("duplicate", 0)
        pkt = memoryview(pkt)[hop.HEADER_LEN:]   # a view, not a slice: no copy (the AEAD reads it in place)
        self.device.receive_datagram(pkt, i, now)
        if self.device.stats.get("duplicate", 0) != dup:
            p.duplicates += 1           # the copy that came second, on this path
        self._events(now)
        self._flush(now)

    def _events(self, now):
        while True:
            e = self.device.next_event()
            if e is None:
                return
            if e.kind == endpoint.DATA:
                if e.channel != endpoint.CONTROL_CHANNEL:
                    self._inbox.append((e.channel, e.data))
                    continue
                # channel 0 is control: an ops request, or the gateway's reply to a path probe
                d = e.data
                i = e.addr
                if len(d) and d[0] == _CTL_OPS_REQ:
                    # an operations request (docs/OPS.md): microtun.ops is imported on the
                    # first one, and only if the config allows ops; otherwise a counted drop
                    # (the gateway tells the operator when no answer comes)
                    if self.cfg.ops:
                        from microtun import ops    # (not microtun.ops: endpoint.py's rare imports say why)
                        ops.serve(self, d, now)
                    else:
                        self._count("ops_disabled")
                elif isinstance(i, int) and self.paths.on_probe_reply(d, now, i):
                    # a path probe's reply, back on the path it names, that moved its state
                    p = self.paths.paths[i]
                    self.log("info", "path %s is %s (srtt %s ms)" % (p.name, p.state, p.srtt))
            elif e.kind == endpoint.STALE:
                # Our boot counter went backwards (re-flashed, storage wiped):
                # persist the one the gateway's answer names, before the retry goes out.
                n = self.device._fresh.boot
                self.log("warn", "the gateway has seen boot counter %d, ours was lower; continuing from %d, "
                         "handshaking again" % (n - 1, n))
                if self.storage is not None:
                    from microtun.freshness import save_boot_counter
                    try:
                        save_boot_counter(self.storage, n)
                    except OSError as err:
                        self.log("warn", "cannot persist boot counter %d (%s)" % (n, err))
            elif e.kind == endpoint.HANDSHAKE:
                self.log("info", "session established (handshake %d)" % self.device.session.handshakes)
                self._all_down_since = None     # the paths get probed now: give them time
                for p in self.paths.paths:
                    if p.next_probe is None:
                        p.next_probe = now      # validate every path at once

    # -- timers ----------------------------------------------------------------------
    def get_timer(self):
        return ticks.ticks_min(self.device.get_timer(), self.paths.get_timer())

    def handle_timer(self, now):
        d = self.device.get_timer()
        if d is not None and ticks.ticks_diff(d, now) <= 0:
            self.device.handle_timer(now)
        before = [p.state for p in self.paths.paths]
        if self.device.established:
            for p, seq in self.paths.due_probes(now):
                probe = paths.probe_message(p.index, seq, now, p.srtt)
                self.device.send(endpoint.CONTROL_CHANNEL, probe, now, route=p.index)
        else:
            for p in self.paths.paths:
                p.check_timeouts(now)
        for p, old in zip(self.paths.paths, before):
            if p.state != old:
                self.log("info", "path %s: %s -> %s" % (p.name, old, p.state))
        for p in self.paths.due_keepalives(now):
            # Keep the NAT mapping and the first PoP's learned address fresh.
            # Usually a 12-byte HOP_KEEPALIVE (never answered: 144 of them an
            # hour cost 1.7 KB per path); a HOP_PROBE, which the PoP answers
            # with the address it sees, while we do not know that address yet
            # and every _PUBLIC_ADDR_REFRESH_MS to notice NAT changes.
            if p.public_addr is None or p.hop_probe_at is None or \
                    ticks.ticks_diff(now, p.hop_probe_at) >= _PUBLIC_ADDR_REFRESH_MS:
                p.hop_probe_at = now
                pkt = hop.seal(hop.TYPE_HOP_PROBE, p.label, p.key, hop.probe_body(p.seq, now))
                self._count("hop_probe_tx")
            else:
                pkt = hop.seal(hop.TYPE_HOP_KEEPALIVE, p.label, p.key, b"")
                self._count("hop_keepalive_tx")
            self._emit(p, pkt, now)
        # Every path dead while we think we have a session: the far end may
        # have restarted. One handshake after _ALL_DOWN_MS; its own retries
        # then back off (5 s doubling to 60 s, timers.retry_interval). Only a
        # completed handshake whose paths stay dark starts another, after
        # twice the wait of the one before (at most max_retry_ms).
        if not self.device.established or any(p.live for p in self.paths.paths):
            self._all_down_since = None
            self._all_down_n = 0
        elif self._all_down_since is None:
            self._all_down_since = now
        elif self.device.session.hs is None and ticks.ticks_diff(now, self._all_down_since) >= min(
                _ALL_DOWN_MS << self._all_down_n, self.device.params.max_retry_ms):
            self._all_down_since = now
            if self._all_down_n < _ALL_DOWN_MAX_SHIFT:
                self._all_down_n += 1
            self._count("rehandshake_all_paths_down")
            self.log("warn", "every path is down; handshaking again (retries back off to %d s)" % (
                self.device.params.max_retry_ms // 1000))
            self.device.rekey(now)
        self._events(now)
        self._flush(now)

    def _emit(self, p, pkt, now):
        p.last_tx = now
        p.tx_packets += 1
        p.tx_bytes += len(pkt)
        self.tx_bytes += len(pkt)
        self._out.append((p.index, pkt))

    def _flush(self, now):
        for data, route in self.device.datagrams_to_send(now):
            chosen = self.paths.select(route, now)
            if data[0]:
                # a handshake message (it starts with its type): framed anew
                for p in chosen:
                    self._emit(p, hop.seal(hop.TYPE_DATA, p.label, p.key, data), now)
                continue
            # a transport packet after HEADER_LEN bytes of room (Device(room=True)):
            # the outer header is written in place; only a second path copies it
            n = len(data) - hop.HEADER_LEN
            last = len(chosen) - 1
            for k in range(last + 1):       # (no enumerate object per packet)
                p = chosen[k]
                pkt = data if k == last else bytearray(data)
                hop.seal_in_place(pkt, hop.TYPE_DATA, p.label, p.key, n)
                self._emit(p, pkt, now)
