"""LOOPS segments (lib/microtun_host/segment.py, docs/LOOPS.md): the modes
and the bad input, sans-I/O over a fake link with a fake clock."""
import heapq
import random

from microtun import outer
from microtun_host import fec, segment
from microtun_host.segment import Receiver, SegConfig, Sender

KEY = outer.HopKey(bytes(range(32)))
OTHER = outer.HopKey(bytes(32))
LABEL = 200
ONE_WAY = 0.020               # 40 ms segment RTT
TICK = 0.005


def inner(i, size=200):
    return i.to_bytes(4, "big") + bytes((i * 7 + k) & 0xFF for k in range(size - 4))


class Link:
    """ingress --(delay, loss)--> egress and back, ticks every 5 ms."""

    def __init__(self, cfg, loss=0.0, back_loss=None, seed=1, delay=ONE_WAY, seq0=0, t0=1000.0, lose=None):
        self.snd = Sender(cfg, LABEL, KEY, seq0)
        self.rcv = Receiver(cfg, LABEL, KEY)
        self.rng = random.Random(seed)
        self.loss = loss
        self.back_loss = loss if back_loss is None else back_loss
        self.delay = delay
        self.lose = lose              # f(n-th packet on the forward link) -> lost
        self.n_fwd = 0
        self.q = []
        self.k = 0
        self.now = t0
        self.delivered = {}           # id -> delivery time
        self.duplicates = 0
        self.ce = 0
        self.bytes = 0
        self.ticks = 0                # timer runs (deadline-driven, no periodic tick)

    def _push(self, t, kind, pkt):
        self.k += 1
        heapq.heappush(self.q, (t, self.k, kind, pkt))

    def to_egress(self, pkts):
        for p in pkts:
            self.bytes += len(p)
            self.n_fwd += 1
            lost = self.lose(self.n_fwd, p) if self.lose else self.rng.random() < self.loss
            if not lost:
                self._push(self.now + self.delay, "e", p)

    def to_ingress(self, pkts):
        for p in pkts:
            self.bytes += len(p)
            if self.rng.random() >= self.back_loss:
                self._push(self.now + self.delay, "i", p)

    def _forward(self, fwd):
        for data, ce in fwd:
            i = int.from_bytes(data[0:4], "big")
            assert data == inner(i, len(data))
            if i in self.delivered:
                self.duplicates += 1
            else:
                self.delivered[i] = self.now
            self.ce += ce

    def timer(self):
        """The earliest of both ends' deadlines (their timer()), or None:
        the link runs their timers only then, as the PoP does."""
        ts = [x for x in (self.snd.timer(self.now), self.rcv.timer(self.now)) if x is not None]
        return min(ts) if ts else None

    def run_until(self, t):
        spins = 0
        while True:
            nt = self.q[0][0] if self.q else None
            tt = self.timer()
            if nt is not None and nt <= t and (tt is None or nt <= tt):
                self.now, _, kind, p = heapq.heappop(self.q)
                if kind == "e":
                    fwd, rep = self.rcv.receive(p, ("10.0.0.1", 1), self.now)
                    self._forward(fwd)
                    self.to_ingress(rep)
                else:
                    self.to_egress(self.snd.feedback(p, self.now))
            elif tt is not None and tt <= t:
                spins = spins + 1 if tt <= self.now else 0
                assert spins < 100, "a timer stays due after tick(): %r" % tt
                self.now = max(self.now, tt)
                self.ticks += 1
                self.to_egress(self.snd.tick(self.now))
                self.to_ingress(self.rcv.tick(self.now))
            else:
                self.now = t
                return

    def stream(self, n, interval=0.005, size=200, first=0):
        sent = {}
        for i in range(first, first + n):
            self.run_until(self.now + interval if i > first else self.now)
            sent[i] = self.now
            self.to_egress(self.snd.data(inner(i, size), False, self.now))
        self.run_until(self.now + 1.0)
        return sent

    def latencies(self, sent):
        return sorted(self.delivered[i] - sent[i] for i in self.delivered)


def p99(xs):
    return xs[min(len(xs) - 1, len(xs) * 99 // 100)]


# --- the modes ----------------------------------------------------------------------------

def test_nack_no_loss_costs_only_the_header():
    link = Link(SegConfig("nack"))
    sent = link.stream(1000)
    assert len(link.delivered) == 1000 and link.duplicates == 0
    s, r = link.snd.stats(), link.rcv.stats()
    assert s["retransmitted"] == 0 and r["nacks_sent"] == 0 and r["gaps"] == 0
    assert 38 < s["srtt_ms"] < 42               # 40 ms RTT measured by ping/pong
    assert max(link.latencies(sent)) < ONE_WAY + 0.001


def test_nack_recovers_random_loss_within_one_rtt():
    link = Link(SegConfig("nack"), loss=0.05, seed=3)
    sent = link.stream(4000)
    assert link.duplicates == 0
    assert len(link.delivered) / 4000 >= 0.997, link.rcv.stats()
    added = [x - ONE_WAY for x in link.latencies(sent)]
    # detection (one packet interval) + one segment RTT: the NACK leaves with the
    # packet that shows the gap, the retransmission with the NACK's arrival
    assert p99(added) <= 2 * ONE_WAY + 0.005 + 0.001, p99(added)
    r = link.rcv.stats()
    assert 0.04 < r["loss"] < 0.06 and r["recovered_nack"] > 150


def test_fec_recovers_without_a_round_trip():
    cfg = SegConfig("fec", fec_k=24, fec_m=3)
    link = Link(cfg, loss=0.05, seed=4)
    sent = link.stream(4000)
    r, s = link.rcv.stats(), link.snd.stats()
    assert link.duplicates == 0 and r["nacks_sent"] == 0 and s["retransmitted"] == 0
    assert len(link.delivered) / 4000 >= 0.99, r
    assert s["parity_bytes"] / s["sent_bytes"] <= 0.15
    # a rebuilt packet waits for its group's parities, never for a NACK round trip
    assert max(link.latencies(sent)) <= cfg.fec_window_ms / 1000 + ONE_WAY + 2 * TICK


def test_nack_plus_fec_nacks_only_what_fec_cannot_rebuild():
    link = Link(SegConfig("nack+fec", fec_k=24, fec_m=1), loss=0.05, seed=5)
    link.stream(3000)
    r = link.rcv.stats()
    assert r["recovered_fec"] > 0 and r["recovered_nack"] > 0
    assert len(link.delivered) / 3000 >= 0.997 and link.duplicates == 0


def test_bursty_loss_and_sequence_wrap():
    # losses in runs of 4 every 50 packets, seq starting just before the 15-bit wrap
    link = Link(SegConfig("nack"), seq0=segment.SEQ_MOD - 10, lose=lambda n, p: n > 10 and n % 50 < 4)
    link.stream(2000)
    assert len(link.delivered) == 2000 and link.duplicates == 0


def test_hold_budget_is_never_exceeded():
    # RTT 200 ms, hold 100 ms: a retransmission always comes too late and is dropped
    cfg = SegConfig("nack", hold_ms=100)
    link = Link(cfg, loss=0.05, seed=6, delay=0.1)
    sent = link.stream(1000)
    assert max(link.latencies(sent)) < 0.1 + 0.001      # nothing delivered after its budget
    r = link.rcv.stats()
    assert r["unrecovered"] > 0 and r["recovered_nack"] == 0
    assert r["drops"].get("seg_late", 0) > 0 or link.snd.stats()["retransmitted"] == 0


def test_tail_loss_is_found_by_the_ping():
    n = [0]

    def lose(k, p):
        n[0] = k
        return k == 100                   # the last data packet of the burst
    link = Link(SegConfig("nack"), lose=lose)
    link.stream(100)
    assert len(link.delivered) == 100


def test_ce_mark_only_when_rtt_rises():
    link = Link(SegConfig("nack"), loss=0.05, seed=7)
    link.stream(1000)
    assert link.ce == 0 and link.rcv.stats()["ce_marked"] == 0   # random loss at a steady RTT: hidden
    link.delay = 0.045                      # queue building: RTT 40 -> 90 ms
    link.stream(1500)
    r = link.rcv.stats()
    assert r["congested"] and r["ce_marked"] > 0 and link.ce == r["ce_marked"]
    assert r["ce_marked"] <= r["gaps"]      # at most one mark per lost packet


def test_fec_code_rebuilds_every_pattern_up_to_m():
    rng = random.Random(9)
    for n, m in ((1, 1), (5, 2), (24, 3), (40, 4)):
        syms = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60))) for _ in range(n)]
        length = max(len(s) for s in syms)
        pars = fec.encode(syms, m)
        for _ in range(20):
            lost = rng.sample(range(n), min(n, rng.randrange(1, m + 1)))
            have = {i: s.ljust(length, b"\0") for i, s in enumerate(syms) if i not in lost}
            use = dict(rng.sample(list(enumerate(pars)), len(lost)))
            got = fec.decode(have, use, n, length)
            assert {i: got[i] for i in lost} == {i: syms[i].ljust(length, b"\0") for i in lost}
        assert fec.decode({}, {0: pars[0]}, n, length) is None or n == 1


# --- bad input ------------------------------------------------------------------------------

def _loaded_sender(n=50):
    snd = Sender(SegConfig("nack"), LABEL, KEY)
    pkts = [snd.data(inner(i, 1000), False, 1.0)[0] for i in range(n)]
    return snd, pkts


def _nack(seqs, key=KEY):
    return outer.seal(outer.TYPE_SEG_NACK, LABEL, key, b"".join(s.to_bytes(2, "big") for s in seqs))


def test_forged_and_malformed_nacks_retransmit_nothing():
    snd, _ = _loaded_sender()
    cases = [
        (_nack([1, 2], OTHER), "seg_bad_mac"),                      # 1 forged (wrong key)
        (_nack([1])[:-1] + b"\0", "seg_bad_mac"),                   # 2 changed after sealing
        (outer.seal(outer.TYPE_SEG_NACK, LABEL, KEY, b""), "seg_malformed"),         # 3 empty
        (outer.seal(outer.TYPE_SEG_NACK, LABEL, KEY, b"\0\1\2"), "seg_malformed"),   # 4 odd length
        (_nack(range(segment.NACK_MAX + 1)), "seg_malformed"),     # 5 too many seqs
        (outer.seal(outer.TYPE_SEG_PONG, LABEL, KEY, bytes(5)), "seg_malformed"),    # 6 short pong
        (_nack([5000]), "nack_gone"),                               # 7 never sent
    ]
    for i, (pkt, reason) in enumerate(cases):
        before = dict(snd.st.drops)
        assert snd.feedback(pkt, 1.1) == [], i
        assert snd.st.drops[reason] == before[reason] + 1, (i, reason, snd.st.drops)
    assert snd.retx == 0


def test_nack_for_long_gone_packets():
    snd, _ = _loaded_sender()
    assert snd.feedback(_nack([0, 1, 2]), 1.0 + snd.cfg.hold_ms / 1000 + 0.01) == []
    assert snd.st.drops["nack_gone"] == 3


def test_nack_storm_is_bounded():
    snd, pkts = _loaded_sender()
    nack = _nack(range(segment.NACK_MAX))
    out = []
    t = 1.02
    for _ in range(1000):                          # a replayed NACK, 1000 times over 100 ms
        got = snd.feedback(nack, t)
        # per NACK: at most one retransmission per named seq, each an earlier packet unchanged
        assert len(got) <= segment.NACK_MAX and all(p in pkts for p in got)
        assert sum(map(len, got)) <= segment.NACK_MAX * max(map(len, pkts))
        out += got
        t += 0.0001
    # in all: each packet at most max_retx times, whatever the NACK count
    assert len(out) <= segment.NACK_MAX * snd.cfg.max_retx
    assert snd.st.drops["nack_limit"] >= 1000 * segment.NACK_MAX - len(out) - 1


def test_retransmission_byte_budget():
    cfg = SegConfig("nack", retx_ratio=0.1, max_retx=10)
    snd = Sender(cfg, LABEL, KEY)
    snd.tokens = 0.0
    for i in range(100):
        snd.data(inner(i, 1000), False, 1.0)
    t, total = 1.05, 0
    for _ in range(10):
        for o in range(0, 100, segment.NACK_MAX):
            total += sum(map(len, snd.feedback(_nack(range(o, min(100, o + segment.NACK_MAX))), t)))
        t += 0.02
    assert total <= 0.1 * snd.sent_bytes
    assert snd.st.drops["nack_budget"] > 0


def test_bad_segment_packets_at_the_egress():
    rcv = Receiver(SegConfig("nack+fec"), LABEL, KEY)
    snd = Sender(SegConfig("nack+fec"), LABEL, KEY)
    good = snd.data(inner(1), False, 1.0)[0]
    ping = snd.tick(1.0)[0]
    cases = [
        (outer.seal(outer.TYPE_SEG_DATA, LABEL, OTHER, b"\0\1xyz"), "seg_bad_mac"),
        (outer.seal(outer.TYPE_SEG_DATA, LABEL, KEY, b"\0"), "seg_malformed"),
        (outer.seal(outer.TYPE_SEG_REPAIR, LABEL, KEY, b"\0\0\0\1\0abc"), "seg_malformed"),     # n = 0
        (outer.seal(outer.TYPE_SEG_REPAIR, LABEL, KEY, b"\0\0\2\1\5abc"), "seg_malformed"),     # j >= m
        (outer.seal(outer.TYPE_SEG_PING, LABEL, KEY, bytes(11)), "seg_malformed"),
        (outer.seal(outer.TYPE_SEG_PING, LABEL, OTHER, bytes(12)), "seg_bad_mac"),
    ]
    for i, (pkt, reason) in enumerate(cases):
        before = rcv.st.drops[reason]
        assert rcv.receive(pkt, ("10.0.0.9", 9), 1.0) == ([], []), i
        assert rcv.st.drops[reason] == before + 1, (i, reason)
    assert rcv.peer is None                           # nothing unauthenticated steers the replies
    assert len(rcv.receive(good, ("10.0.0.1", 1), 1.0)[0]) == 1
    assert rcv.receive(good, ("10.0.0.9", 9), 1.0) == ([], [])   # replay
    assert rcv.st.drops["seg_duplicate"] == 1 and rcv.peer == ("10.0.0.1", 1)
    assert len(rcv.receive(ping, ("10.0.0.1", 1), 1.0)[1]) == 1  # one pong per ping ...
    assert rcv.receive(ping, ("10.0.0.9", 9), 1.0) == ([], [])   # ... and none for its replay
    assert rcv.st.drops["seg_stale_ping"] == 1 and rcv.peer == ("10.0.0.1", 1)
    pong = Receiver(SegConfig("nack"), LABEL, KEY).receive(ping, ("10.0.0.1", 1), 1.0)[1][0]
    assert len(pong) <= len(ping)                     # a reply is never larger than its ping


def test_far_sequence_numbers_need_a_run_to_resync():
    link = Link(SegConfig("nack"))
    link.stream(10)
    old = Sender(SegConfig("nack"), LABEL, KEY, 20000)
    for i in range(segment.RESYNC_AFTER - 1):      # a few captured packets of another epoch: dropped
        assert link.rcv.receive(old.data(inner(i), False, link.now)[0], ("10.0.0.1", 1), link.now)[0] == []
    assert link.rcv.stats()["drops"]["seg_late"] == segment.RESYNC_AFTER - 1
    # an ingress that really restarted: followed after RESYNC_AFTER packets in a row
    got = link.rcv.receive(old.data(inner(99), False, link.now)[0], ("10.0.0.1", 1), link.now)[0]
    assert len(got) == 1


def test_config_checks():
    import pytest
    with pytest.raises(ValueError):
        SegConfig("retransmit")
    assert SegConfig("nack+fec").nack_delay_ms == SegConfig("nack+fec").fec_window_ms + 10
    assert SegConfig("nack").nack_delay_ms == 0


def test_fec_rebuilds_the_last_packets_of_a_group():
    # the last two data packets of every group are lost: only the parities tell
    cfg = SegConfig("fec", fec_k=8, fec_m=2)
    link = Link(cfg, lose=lambda n, p: p[0] & 15 == outer.TYPE_SEG_DATA and ((p[12] << 8) | p[13]) % 8 in (6, 7))
    link.stream(400)
    assert len(link.delivered) == 400, link.rcv.stats()


def test_nack_plus_fec_nacks_at_once_when_the_parities_cannot_rebuild():
    # bursts of 4 in groups of 8 + 1 parity: FEC alone can't, the NACK goes
    # out when the group's parity is in, not after the fallback delay
    cfg = SegConfig("nack+fec", fec_k=8, fec_m=1, fec_window_ms=100, hold_ms=400)
    seen = set()

    def lose(n, p):                   # first copies only: retransmissions get through
        if p[0] & 15 != outer.TYPE_SEG_DATA or p in seen:
            return False
        seen.add(p)
        return ((p[12] << 8) | p[13]) % 16 in (1, 2, 3, 4)
    link = Link(cfg, lose=lose)
    sent = link.stream(400)
    assert len(link.delivered) == 400 and link.duplicates == 0
    # group of 8 at 5 ms: parity ~35 ms after the first loss, then one RTT; the fallback would be 110 ms + RTT
    assert max(link.latencies(sent)) < 0.035 + 2 * ONE_WAY + ONE_WAY + 0.015


def test_fast_seal_gives_outer_seal_bytes():
    for t in (outer.TYPE_DATA, outer.TYPE_DATA_CE, outer.TYPE_SEG_DATA, outer.TYPE_SEG_NACK):
        for n in (0, 5, 32, 33, 1200):
            p = bytes((i * 13) & 0xFF for i in range(n))
            assert segment.seal(t, 0x123456, KEY, p) == outer.seal(t, 0x123456, KEY, p)


def test_repair_delays_are_reported():
    link = Link(SegConfig("nack"), loss=0.05, seed=8)
    link.stream(1000)
    q = link.rcv.stats()["repair_ms"]
    assert 40 <= q["p50"] <= q["max"] <= SegConfig("nack").hold_ms


def test_timers_are_deadlines_and_sleep_when_idle():
    link = Link(SegConfig("nack"), loss=0.05, seed=4)
    link.stream(1000)                       # 5 s of traffic, then 1 s quiet
    # pings every 200 ms, re-NACKs and gap expiries: far fewer runs than a 5 ms tick (1200)
    assert link.ticks < 200, link.ticks
    link.run_until(link.now + 2.0)
    assert link.snd.timer(link.now) is None and link.rcv.timer(link.now) is None
    assert link.snd.stats()["buffered"] == 0 and not any(link.snd._pkt)   # the ring let go of every packet


def test_hot_path_makes_no_entry_per_packet():
    cfg = SegConfig("nack")
    snd, rcv = Sender(cfg, LABEL, KEY, 32700), Receiver(cfg, LABEL, KEY)
    for i in range(300):                    # across the seq wrap
        pkt = snd.send(inner(i), False, 1.0 + i * 0.001)
        assert rcv.data(pkt, ("10.0.0.1", 1), 1.02 + i * 0.001) == inner(i)
    assert not rcv.missing and not rcv.groups and not rcv.replies and not snd.extra
    assert rcv.received == 300 and rcv.st.total == 0


def test_trace_stamps_send_and_release():
    link = Link(SegConfig("nack"), loss=0.05, seed=9)
    link.snd.trace, link.rcv.trace = [], []
    link.stream(400)
    sent = {s: t for s, t in link.snd.trace}
    hows = {}
    for s, t, how in link.rcv.trace:
        hows[how] = hows.get(how, 0) + 1
        extra = t - sent[s] - ONE_WAY
        assert (extra < 1e-9) if how == "new" else (0.04 <= extra <= SegConfig().hold_ms / 1000), (how, extra)
    assert hows["new"] > 350 and hows["nack"] == link.rcv.recovered_nack > 10


def test_sealer_gives_outer_seal_bytes():
    for t in (outer.TYPE_DATA, outer.TYPE_SEG_DATA):
        sl = segment.Sealer(t, 0x123456, KEY)
        for n in (0, 5, 30, 31, 32, 33, 1200):
            p = bytes((i * 13) & 0xFF for i in range(n))
            assert sl.seal(p) == outer.seal(t, 0x123456, KEY, p)
            assert sl.seal(bytearray(p)) == outer.seal(t, 0x123456, KEY, p)
            assert sl.seal2(b"\x81\x02", p) == outer.seal(t, 0x123456, KEY, b"\x81\x02" + p), n
            for pre in (b"", b"\x01\x02\x03\x04\x05", bytes(range(16))):          # a SEG_REPAIR's header: 5
                assert sl.seal2(pre, p) == outer.seal(t, 0x123456, KEY, pre + p), (n, pre)


# --- the PoP's per-route functions (segment.ingress_for / egress_for) ----------------------

SIZES = (0, 1, 17, 29, 30, 31, 32, 33, 34, 250, 1200, 2100)
IN_KEY = outer.HopKey(bytes(range(5, 37)))
OUT_KEY = outer.HopKey(bytes(range(9, 41)))


def _state(snd):
    return (snd.seq, snd.sent, snd.sent_bytes, snd.last_data, list(snd._pkt or ()), list(snd.group), snd.parities)


def test_ingress_function_gives_send_bytes_and_state():
    for mode in ("nack", "fec", "nack+fec"):
        cfg = SegConfig(mode, fec_k=4)
        a, b = Sender(cfg, LABEL, KEY, 32760), Sender(cfg, LABEL, KEY, 32760)     # across the seq wrap
        ingress = segment.ingress_for(b, IN_KEY)
        for i, n in enumerate(SIZES * 2):
            ce = i % 3 == 0
            data = bytes(outer.seal(outer.TYPE_DATA_CE if ce else outer.TYPE_DATA, 100, IN_KEY, inner(i, n)
                                    if n >= 4 else bytes(n)))
            got = ingress(data, 1.0 + i * 0.001)
            want = a.send(data[outer.HEADER_LEN:], ce, 1.0 + i * 0.001)
            assert got == want, (mode, n, ce)
            assert b.extra == a.extra
            a.extra, b.extra = [], []
        assert _state(a) == _state(b)


def test_ingress_function_refuses_a_forged_packet_without_spending_a_seq():
    snd = Sender(SegConfig("nack"), LABEL, KEY, 7)
    ingress = segment.ingress_for(snd, IN_KEY)
    for n in (0, 20, 250):
        good = bytearray(outer.seal(outer.TYPE_DATA, 100, IN_KEY, bytes(n)))
        for forged in (bytes(outer.seal(outer.TYPE_DATA, 100, OTHER, bytes(n))),
                       bytes(good[:-1] + bytes((good[-1] ^ 1,))) if n else bytes(good[:4]) + bytes(8),
                       bytes(good[:11])):
            assert ingress(forged, 1.0) is None
    assert snd.seq == 7 and snd.sent == 0 and not any(snd._pkt)


def test_egress_function_gives_data_then_seal_bytes():
    for mode in ("nack", "fec"):
        cfg = SegConfig(mode)
        snd = Sender(cfg, LABEL, KEY, 32700)
        a, b = Receiver(cfg, LABEL, KEY), Receiver(cfg, LABEL, KEY)
        egress = segment.egress_for(b, 300, OUT_KEY)
        seal = {False: segment.Sealer(outer.TYPE_DATA, 300, OUT_KEY),
                True: segment.Sealer(outer.TYPE_DATA_CE, 300, OUT_KEY)}
        pkts = [snd.send(inner(i, n) if n >= 4 else bytes(n), i % 4 == 1, 1.0 + i * 0.001)
                for i, n in enumerate(SIZES * 3)]
        order = list(range(len(pkts)))
        order[5], order[9] = order[9], order[5]        # a gap, then its late original
        order.insert(12, 3)                            # a duplicate
        for k, i in enumerate(order):
            now = 1.02 + k * 0.001
            want = a.data(pkts[i], ("10.0.0.1", 1), now)
            got = egress(pkts[i], ("10.0.0.1", 1), now)
            assert (got is None) == (want is None), (mode, i)
            if want is not None:
                assert got == seal[a.ce].seal(want), (mode, i)
                assert b.ce == a.ce
        assert a.stats() == b.stats() and a.replies == b.replies
        assert b.st.drops["seg_duplicate"] == 1


def test_egress_function_counts_what_it_refuses():
    cfg = SegConfig("nack")
    rcv = Receiver(cfg, LABEL, KEY)
    egress = segment.egress_for(rcv, 300, OUT_KEY)
    good = Sender(cfg, LABEL, KEY).send(inner(1), False, 1.0)
    assert egress(Sender(cfg, LABEL, OTHER).send(inner(1), False, 1.0), ("10.0.0.1", 1), 1.0) is None
    assert egress(good[:outer.HEADER_LEN + 2], ("10.0.0.1", 1), 1.0) is None
    assert egress(good[:-1] + bytes((good[-1] ^ 1,)), ("10.0.0.1", 1), 1.0) is None
    assert rcv.st.drops["seg_bad_mac"] == 2 and rcv.st.drops["seg_malformed"] == 1
    assert rcv.received == 0 and rcv.top is None and rcv.peer is None     # no state from a refused packet
    assert egress(good, ("10.0.0.1", 1), 1.0) is not None and rcv.received == 1


def test_a_new_hop_key_gets_a_new_segment_on_reload():
    """swap() carries a segment's state over only when its hop key is the
    same: a Sender or Receiver kept across a key change would go on with
    the old key, and every packet would fail at the next PoP."""
    import logging
    from microtun_host import pop
    from microtun_host.config import Address
    k_in, k_out, k_new = bytes(range(32)), bytes(range(1, 33)), bytes(range(2, 34))
    nxt = Address(4, "127.0.0.1", 9)

    def table(out_key, in_key):
        return pop.build_table([pop.RouteSpec(100, k_in, nxt, 0, 200, out_key, seg_out=SegConfig("nack")),
                                pop.RouteSpec(300, in_key, nxt, 0, 400, k_out, seg_in=SegConfig("nack"))])
    f = pop.Forwarder(table(k_out, k_out), logging.getLogger("t"))
    data = bytes(outer.seal(outer.TYPE_DATA, 100, outer.HopKey(k_in), inner(1)))
    assert outer.verify(outer.HopKey(k_out), f.receive(data, ("127.0.0.1", 5))[0])
    kept = f.routes[100].seg_out
    f.swap(table(k_out, k_out))
    assert f.routes[100].seg_out is kept                  # same key: the state goes on
    seq = kept.seq
    f.receive(data, ("127.0.0.1", 5))
    assert kept.seq == (seq + 1) % segment.SEQ_MOD        # ... and numbers the next packet
    f.swap(table(k_new, k_new))
    assert f.routes[100].seg_out is not kept
    out = f.receive(data, ("127.0.0.1", 5))[0]
    assert outer.verify(outer.HopKey(k_new), out) and not outer.verify(outer.HopKey(k_out), out)
    seg = Sender(SegConfig("nack"), 300, outer.HopKey(k_new)).send(inner(2), False, 1.0)
    assert f.receive(seg, ("127.0.0.1", 6)) is not None   # the egress verifies under the new key


# --- adaptive FEC -------------------------------------------------------------------------

ADAPTIVE = dict(fec_k=24, fec_m_min=0, fec_m=6, fec_target=0.01)


def test_adaptive_fec_follows_the_measured_loss():
    link = Link(SegConfig("fec", **ADAPTIVE), loss=0.0, seed=5)
    link.stream(600)                        # 3 s without loss: no parities once measured
    assert link.snd.fec_m == 0 and link.snd.stats()["loss"] == 0.0
    before = link.snd.parities
    link.stream(200, first=1000)
    assert link.snd.parities == before      # none sent at fec_m 0
    link.loss = 0.05                        # the link starts losing 5 %
    link.stream(400, first=2000)            # the estimate settles within a few pongs
    start = len(link.delivered)
    link.stream(2000, first=3000)
    assert 2 <= link.snd.fec_m <= 5, link.snd.stats()
    got = len(link.delivered) - start
    assert got / 2000 >= 0.985, (got, link.rcv.stats())
    link.loss = 0.0
    link.stream(1200, first=6000)           # and back down when the loss stops
    assert link.snd.fec_m <= 1, link.snd.stats()


def test_adaptive_fec_stays_within_its_bounds():
    cfg = SegConfig("fec", fec_m_min=1, fec_m=4)
    snd = Sender(cfg, LABEL, KEY)
    rcv = Receiver(cfg, LABEL, KEY)
    for k, (gaps, received) in enumerate(((0, 0), (10 ** 6, 1), (10 ** 6 + 5, 1), (3, 2), (0, 10 ** 9))):
        snd.send(inner(k), False, 1.0 + k)
        rcv.gaps, rcv.received = gaps, received     # whatever an egress claims (restarts, wraps, 100 % loss)
        rcv.last_ping = None
        ping = snd.tick(1.0 + k)[-1]
        pong = rcv.receive(ping, ("10.0.0.1", 1), 1.0 + k)[1][0]
        assert snd.feedback(pong, 1.01 + k) == []
        assert 1 <= snd.fec_m <= 4
    assert snd.st.total == 0


def test_residual_loss_model():
    assert segment.residual_loss(0.0, 24, 0) == 0.0
    assert abs(segment.residual_loss(0.05, 24, 0) - 0.05) < 1e-9      # no parity: the link's loss
    r = [segment.residual_loss(0.05, 24, m) for m in range(7)]
    assert all(a > b for a, b in zip(r, r[1:]))                       # each parity helps
    assert segment.adapt_m(0.05, 24, 0, 6, 0.01) == 3                  # the fixed default at 5 %
    assert segment.adapt_m(0.0, 24, 0, 6, 0.01) == 0
    assert segment.adapt_m(0.5, 24, 1, 6, 0.01) == 6


def test_adaptive_config_checks():
    import pytest
    with pytest.raises(ValueError, match="fec_m_min"):
        SegConfig("fec", fec_m=2, fec_m_min=3)


def test_pop_forwarder_runs_segment_timers_by_deadline():
    import logging
    from microtun_host import pop
    from microtun_host.config import Address
    now = [5000.0]
    k1, k2 = bytes(range(32)), bytes(range(1, 33))
    spec = pop.RouteSpec(100, k1, Address(4, "127.0.0.1", 9), 0, 200, k2, seg_out=SegConfig("nack"))
    f = pop.Forwarder(pop.build_table([spec]), logging.getLogger("t"), clock=lambda: now[0])
    assert f.seg_tick() is None                     # nothing sent yet: no deadline at all
    data = bytes(outer.seal(outer.TYPE_DATA, 100, outer.HopKey(k1), inner(1)))
    out = f.receive(data, ("127.0.0.1", 5))
    assert out[0][0] == 0x10 | outer.TYPE_SEG_DATA and f.seg_kick     # the first packet arms the timer
    assert abs(f.seg_tick() - (now[0] + 0.2)) < 1e-6 and f.seg_q      # a ping now, the next in 200 ms
    f.seg_q.clear()
    now[0] += 0.2
    assert abs(f.seg_tick() - (now[0] + 0.051)) < 1e-6 and len(f.seg_q) == 1   # the buffered packet expires first
    now[0] += 2.0                                   # idle: pings stop, the buffer lets go
    f.seg_tick()
    assert f.seg_tick() is None


def test_a_new_fec_group_schedules_its_close_not_an_immediate_run():
    """An FEC group's first packet gives the segment a new deadline (the
    group closes by time): the PoP learns when (seg_due) instead of running
    every segment's timers at once on each new group."""
    import logging
    from microtun_host import pop
    from microtun_host.config import Address
    now = [100.0]
    k1, k2 = bytes(range(32)), bytes(range(1, 33))
    cfg = SegConfig("fec", fec_k=4, fec_window_ms=150)
    spec = pop.RouteSpec(100, k1, Address(4, "127.0.0.1", 9), 0, 200, k2, seg_out=cfg)
    f = pop.Forwarder(pop.build_table([spec]), logging.getLogger("t"), clock=lambda: now[0])
    data = bytes(outer.seal(outer.TYPE_DATA, 100, outer.HopKey(k1), inner(1)))
    f.receive(data, ("127.0.0.1", 5))
    assert f.seg_kick and f.seg_due <= now[0]                   # pings start: due now
    f.seg_tick()
    for _ in range(3):                                          # the group of 4 closes by count
        now[0] += 0.01
        f.receive(data, ("127.0.0.1", 5))
    assert not f.seg_kick
    now[0] += 0.01
    f.receive(data, ("127.0.0.1", 5))                           # a new group
    assert f.seg_kick and abs(f.seg_due - (now[0] + 0.150)) < 1e-9


def test_fec_egress_lets_go_of_old_symbols():
    """The FEC egress keeps each packet as a symbol for its group's repair,
    not for as long as its ring slot lasts (8192 packets: 10 MB per route at
    1200 bytes), nor a fixed number of packets: what is 2 hold_ms old is let
    go of every 16 packets."""
    cfg = SegConfig("fec")
    snd, rcv = Sender(cfg, LABEL, KEY), Receiver(cfg, LABEL, KEY)
    egress = segment.egress_for(rcv, 300, OUT_KEY)
    for i in range(3000):                   # 15 s at 200 packets/s, half through each path
        pkt = snd.send(inner(i), False, 1.0 + i * 0.005)
        if i % 2:
            assert egress(pkt, ("10.0.0.1", 1), 1.02 + i * 0.005) is not None
        else:
            assert rcv.data(pkt, ("10.0.0.1", 1), 1.02 + i * 0.005) is not None
    kept = sum(x is not None for x in rcv._rin)
    assert 100 <= kept <= 100 + 16 + 1, kept    # 2 hold_ms (100 packets) and what came since the last run
    # what a late parity may still need is there: the last 2 hold_ms (100 packets)
    assert all(rcv._inner((snd.seq - k) % segment.SEQ_MOD, 1.02 + 2999 * 0.005) is not None for k in range(1, 100))


def test_parities_of_a_complete_group_are_not_drops():
    """With no loss every parity arrives for a complete group: counted as
    unused, not as a drop (a drop is logged: a PoP would log "segment
    dropped" lines for normal FEC)."""
    link = Link(SegConfig("fec"), loss=0.0, seed=1)
    link.stream(480)                                  # 20 groups of 24
    st = link.rcv.stats()
    assert st["parities_unused"] == link.snd.parities == 60
    assert link.rcv.st.total == 0 and not st["drops"]


def test_parity_function_takes_complete_groups_and_leaves_the_rest():
    """segment.parity_for (the PoP's path for a SEG_REPAIR): a parity of a
    complete group is counted unused with nothing else done; a forged one
    and one that may repair go on to Receiver.repair, which gives what it
    gives alone (same rebuilt packets, same counters), across the seq wrap."""
    cfg = SegConfig("fec", fec_k=6, fec_m=2)
    for lost in ((), (3,), (8, 9), (13, 14, 15), (26,)):       # seq index in the stream (none, one, two, too many)
        snd = Sender(cfg, LABEL, KEY, segment.SEQ_MOD - 10)
        a, b = Receiver(cfg, LABEL, KEY), Receiver(cfg, LABEL, KEY)
        parity = segment.parity_for(b)
        got_a, got_b, k = [], [], 0
        for i in range(30):
            for p in snd.data(inner(i), False, 1.0 + i * 0.005):
                now = 1.02 + i * 0.005
                if p[0] & 0x0F == outer.TYPE_SEG_DATA:
                    k += 1
                    if k - 1 in lost:
                        continue
                    fa, _ = a.receive(p, ("10.0.0.1", 1), now)
                    fb, _ = b.receive(p, ("10.0.0.1", 1), now)
                else:
                    fa, _ = a.receive(p, ("10.0.0.1", 1), now)
                    ok = parity(p)
                    if ok:
                        fb = []
                    else:
                        assert ok is False
                        b.repair(p, now, verified=True)
                        fb, b.rebuilt = b.rebuilt, []
                got_a += fa
                got_b += fb
        assert got_a == got_b and a.stats() == b.stats(), lost
        st = b.stats()
        if not lost:
            assert st["parities_unused"] == snd.parities == 10 and not b.groups    # no group entry either
        elif len(lost) <= 2:
            assert st["recovered_fec"] == len(lost)
    forged = outer.seal(outer.TYPE_SEG_REPAIR, LABEL, OTHER, bytes(30))
    assert parity(forged) is None and parity(forged[:outer.HEADER_LEN + 4]) is None
    # refused and counted by the function, as Receiver.repair would count them
    assert b.st.total == 2 and b.st.drops["seg_bad_mac"] == 1 and b.st.drops["seg_malformed"] == 1


def test_complete_groups_need_every_seq_since_the_last_gap():
    cfg = SegConfig("fec")
    snd, rcv = Sender(cfg, LABEL, KEY, 100), Receiver(cfg, LABEL, KEY)
    pkts = [snd.send(inner(i), False, 1.0) for i in range(60)]
    for p in pkts[:30]:
        rcv.data(p, ("10.0.0.1", 1), 1.0)
    assert rcv.complete(100, 24) and rcv.complete(105, 25) and not rcv.complete(110, 24)   # 130 not in yet
    assert not rcv.complete(99, 2)                                   # before the first seq seen
    for p in pkts[31:40]:                                           # 130 missing
        rcv.data(p, ("10.0.0.1", 1), 1.0)
    assert not rcv.complete(120, 24) and not rcv.complete(100, 24) and rcv.complete(131, 9)
    rcv.data(pkts[30], ("10.0.0.1", 1), 1.0)                        # its late original: still not "complete"
    assert not rcv.complete(120, 24)                                 # (the group's own check finds it whole)
    for i in range(40, 60):
        rcv.data(pkts[i], ("10.0.0.1", 1), 1.0 + i * 0.001)
    assert rcv.complete(131, 29)


def test_complete_groups_over_many_seq_wraps():
    """The no-loss mark follows the top (forget keeps it within JUMP_MAX):
    after 40,000 packets without a gap, more than the 15-bit seq space, a
    parity still finds its group complete without a lookup."""
    cfg = SegConfig("fec")
    snd, rcv = Sender(cfg, LABEL, KEY), Receiver(cfg, LABEL, KEY)
    egress = segment.egress_for(rcv, 300, OUT_KEY)
    pars = []
    for i in range(40000):
        for p in snd.data(inner(i, 8), False, 1.0 + i * 0.001):
            if p[0] & 0x0F == outer.TYPE_SEG_DATA:
                assert egress(p, ("10.0.0.1", 1), 1.0 + i * 0.001) is not None
            else:
                pars.append(p)
    parity = segment.parity_for(rcv)
    assert all(parity(p) for p in pars[-30:]) and not rcv.groups
    assert segment.seq_diff(rcv.top, rcv.clean) <= segment.JUMP_MAX + 16


def test_pop_egress_parities_complete_group_or_repair():
    """A PoP's egress (pop.Forwarder): with no loss each parity is consumed
    (counted unused, in the "segment" drop reason, every datagram counted
    once); with a packet lost the same parities rebuild it, and a forged
    parity is a counted seg_bad_mac, as before the fast path."""
    import logging
    from microtun_host import pop
    from microtun_host.config import Address
    k1, k2 = bytes(range(32)), bytes(range(1, 33))
    cfg = SegConfig("fec", fec_k=8, fec_m=2)
    spec = pop.RouteSpec(200, k1, Address(4, "127.0.0.1", 9), 0, 300, k2, seg_in=cfg)
    for lost in (None, 5):
        now = [10.0]
        f = pop.Forwarder(pop.build_table([spec]), logging.getLogger("t"), clock=lambda: now[0])
        snd = Sender(cfg, 200, outer.HopKey(k1))
        out = []
        for i in range(16):
            now[0] += 0.005
            for k, p in enumerate(snd.data(inner(i), False, now[0])):
                if k == 0 and i == lost:
                    continue
                r = f.receive(bytes(p), ("127.0.0.1", 6))
                if r is not None:
                    out.append(r[0])
                out += [q for q, _ in f.seg_q]
                f.seg_q.clear()
        rcv = f.routes[200].seg_in
        assert len(out) == 16 and rcv.received == 16 - (lost is not None)
        assert rcv.parities_unused == (4 if lost is None else 3) and rcv.recovered_fec == (lost is not None)
        assert f.drops["segment"] == rcv.parities_unused and rcv.st.total == 0     # the parity that rebuilt: forwarded
        assert f.rx == f.forwarded + sum(f.drops.values())
    forged = outer.seal(outer.TYPE_SEG_REPAIR, 200, outer.HopKey(k2), bytes((0, 0, 8, 2, 0)) + bytes(40))
    second = []                     # a forged parity costs one hop MAC: Receiver.repair does not check it again
    rcv._verify = lambda pkt: second.append(pkt)
    assert f.receive(bytes(forged), ("127.0.0.1", 6)) is None and second == []
    assert rcv.st.drops["seg_bad_mac"] == 1 and f.drops["segment"] == 4 and f.rx == f.forwarded + sum(f.drops.values())
    assert f.receive(bytes(forged[:outer.HEADER_LEN + 4]), ("127.0.0.1", 6)) is None
    assert rcv.st.drops["seg_malformed"] == 1 and f.drops["segment"] == 5 and f.rx == f.forwarded + sum(f.drops.values())


def test_pop_ingress_inline_path_gives_the_senders_packets():
    """Forwarder.receive's inline path into a segment: the same SEG_DATA and
    parities as Sender.send alone, in order, every datagram counted; a
    forged DATA is a bad_mac drop that spends no seq."""
    import logging
    from microtun_host import pop
    from microtun_host.config import Address
    k1, k2 = bytes(range(32)), bytes(range(1, 33))
    cfg = SegConfig("nack+fec", fec_k=8, fec_m=2)
    spec = pop.RouteSpec(100, k1, Address(4, "127.0.0.1", 9), 0, 200, k2, seg_out=cfg)
    now = [50.0]
    f = pop.Forwarder(pop.build_table([spec]), logging.getLogger("t"), clock=lambda: now[0])
    snd = f.routes[100].seg_out
    ref = Sender(cfg, 200, outer.HopKey(k2), snd.seq)
    for i in range(20):
        now[0] += 0.005
        data = bytes(outer.seal(outer.TYPE_DATA, 100, outer.HopKey(k1), inner(i)))
        out = f.receive(data, ("127.0.0.1", 5))
        got = [out[0]] + [p for p, _ in f.seg_q]
        assert all(d == ("127.0.0.1", 9) for _, d in f.seg_q)
        f.seg_q.clear()
        assert got == ref.data(inner(i), False, now[0]), i
    forged = bytes(outer.seal(outer.TYPE_DATA, 100, outer.HopKey(k2), inner(99)))
    assert f.receive(forged, ("127.0.0.1", 5)) is None and f.drops[outer.DROP_BAD_MAC] == 1
    assert snd.seq == ref.seq and snd.parities == ref.parities == 4
    assert f.rx == 21 and f.forwarded == 20 and f.routes[100].packets == 20


def test_a_tail_gap_keeps_its_group_incomplete_until_repaired():
    """A tail loss found by a ping leaves nothing known clean (the mark one
    past the top); a late packet that lands on a forget slot then must not
    make the lost seqs look received: the group's parities still rebuild."""
    cfg = SegConfig("fec", fec_k=16, fec_m=4)
    snd, rcv = Sender(cfg, LABEL, KEY, 80), Receiver(cfg, LABEL, KEY)
    pkts, pars = [], []
    for i in range(32):
        for p in snd.data(inner(i), False, 1.0 + i * 0.001):
            (pkts if p[0] & 0x0F == outer.TYPE_SEG_DATA else pars).append(p)
    for p in pkts[:15]:                                   # seqs 80..94; 95.. not (yet)
        rcv.data(p, ("10.0.0.1", 1), 1.05)
    ping = [q for q in snd.tick(1.06) if q[0] & 0x0F == outer.TYPE_SEG_PING]
    rcv.ping(ping[0], ("10.0.0.1", 1), 1.07)              # next seq 112: 95..111 missing, top 111
    assert rcv.top == 111 and not rcv.complete(96, 16) and not rcv.complete(80, 16)
    assert (96 & segment._FORGET_MASK) == 0
    assert rcv.data(pkts[16], ("10.0.0.1", 1), 1.08) is not None     # seq 96 late, on a forget slot
    assert not rcv.complete(96, 16) and not rcv.complete(80, 16)
    rebuilt = []
    for p in pars[:4]:                                    # the first group's parities: seq 95 comes back
        fwd, _ = rcv.receive(p, ("10.0.0.1", 1), 1.09)
        rebuilt += fwd
    assert [f[0] for f in rebuilt] == [inner(15)]
