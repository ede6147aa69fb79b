"""The PoP's defences (docs/OUTER.md §3 and §5), sans-I/O on the Forwarder
with a hand-moved clock, plus the device's side of path validation:

- a learned return address moves only after a path challenge answered from
  the new address; replayed packets from elsewhere never move it;
- replayed (or mutated-replayed) inner INITs are dropped before any HMAC,
  fresh ones are budgeted per label and per source, so a flood on one
  label does not starve another;
- no reply is larger or more numerous than the packet that provoked it;
- every new table is bounded.

Topology of the Forwarder under test (labels local to the PoP):

    device --100 (K_DA)--> PoP --200--> next hop      and back 201 -> learn:100 (101)
    other  --110 (K_DX)--> PoP --210--> next hop      and back 211 -> learn:110 (111)
"""
import logging
import os
import random

from microtun import outer
from microtun_host import pop
from microtun_host.config import Address

K_DA = bytes(range(0, 32))
K_AB = bytes(range(32, 64))
K_DX = bytes(range(96, 128))
HK = {k: outer.HopKey(k) for k in (K_DA, K_AB, K_DX)}
NEXT = ("127.0.0.1", 9001)
DEV = ("198.51.100.7", 40000)
DEV2 = ("198.51.100.7", 40001)          # the same device after a NAT rebinding
EVIL = ("203.0.113.66", 666)


class Lines(logging.Handler):
    def __init__(self):
        logging.Handler.__init__(self, logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append((record.levelno, record.getMessage()))

    def info(self, needle):
        return [m for lvl, m in self.records if lvl >= logging.INFO and needle in m]


def forwarder():
    specs = [pop.RouteSpec(100, K_DA, Address(4, "127.0.0.1", 9001), 0, 200, K_AB),
             pop.RouteSpec(201, K_AB, None, 100, 101, K_DA),
             pop.RouteSpec(110, K_DX, Address(4, "127.0.0.1", 9001), 0, 210, K_AB),
             pop.RouteSpec(211, K_AB, None, 110, 111, K_DX)]
    log = logging.getLogger("test_pop_defences.%s" % os.urandom(4).hex())
    log.setLevel(logging.DEBUG)
    log.propagate = False
    lines = Lines()
    log.addHandler(lines)
    clock = [1000.0]
    f = pop.Forwarder(pop.build_table(specs), log, clock=lambda: clock[0])
    f.lines = lines
    f.now = clock
    return f


def send(f, pkt, src):
    """receive() plus the challenges it queued: [(datagram, destination)]."""
    res = f.receive(pkt, src)
    out = ([] if res is None else [res]) + list(f.extra)
    f.extra.clear()
    return out


def data(label=100, key=K_DA, body=None):
    return outer.seal(outer.TYPE_DATA, label, HK[key], os.urandom(48) if body is None else body)


def init(label=100, key=K_DA):
    """An outer DATA packet carrying a fresh inner INIT (type 1, 148 bytes)."""
    body = bytes((1, 0, 0, 0)) + os.urandom(outer.INNER_INIT_LEN - 4)
    return outer.seal(outer.TYPE_DATA, label, HK[key], body)


def keepalive(label=100, key=K_DA):
    return outer.seal(outer.TYPE_HOP_KEEPALIVE, label, HK[key], b"")


def probe(label=100, key=K_DA):
    return outer.seal(outer.TYPE_HOP_PROBE, label, HK[key], outer.probe_body(1, 2))


def downlink(f, label=201):
    """Where a packet from the gateway side for the device goes now."""
    out = send(f, data(label, K_AB), NEXT)
    return out[0][1] if out else None


def connected():
    f = forwarder()
    assert send(f, data(), DEV)[0][1] == NEXT
    assert f.learned == {100: DEV}              # the first authenticated packet: nothing to protect yet
    assert f.lines.info("next hop learned: 198.51.100.7:40000 (was unknown; first authenticated packet)")
    return f


def accounted(f):
    s = f.stats()
    assert s["rx"] == (s["forwarded"] + s["probes"] + s["keepalives"] + s["path_responses"]
                       + sum(s["drops"].values())), s
    auth = sum(v["packets"] for v in s["labels"].values())
    assert auth == (s["forwarded"] + s["probes"] + s["keepalives"] + s["path_responses"]
                    + sum(s["drops"][k] for k in pop.AUTHENTIC_DROPS)), s
    return s


# --- replay-proof address learning --------------------------------------------------

# (name, captured packet maker): every kind of authenticated packet a device sends
CAPTURES = (
    ("data", lambda: data()),
    ("data 1200 B", lambda: data(body=os.urandom(1200))),
    ("init", lambda: init()),
    ("keepalive", lambda: keepalive()),
    ("probe", lambda: probe()),
)


def test_01_replay_from_another_address_never_moves_the_learned_address():
    for name, make in CAPTURES:
        f = connected()
        captured = make()
        send(f, captured, DEV)                  # the genuine one
        challenges = 0
        for i in range(200):                    # every 100 ms for 20 s
            f.now[0] += 0.1
            for pkt, dest in send(f, captured, EVIL):
                if dest == EVIL:
                    assert len(pkt) <= len(captured), name
                    if outer.parse(pkt)[0] == outer.TYPE_PATH_CHALLENGE:
                        challenges += 1
            assert f.learned == {100: DEV}, name
            assert downlink(f) == DEV, name     # the return direction never moves
        # at most one challenge per CHALLENGE_TIMEOUT_S (only DATA and keepalives provoke them)
        assert challenges <= 20 / pop.CHALLENGE_TIMEOUT_S + 1, (name, challenges)
        assert f.moves == 1 and f.path_responses == 0, name
        accounted(f)


def test_02_a_validated_nat_rebinding_moves_it_and_both_moves_are_logged():
    f = connected()
    # the device's NAT mapping changes: its next packet comes from DEV2 and
    # is forwarded at once; replies go on to DEV until DEV2 answers
    out = send(f, data(), DEV2)
    assert out[0][1] == NEXT
    [(chal, dest)] = out[1:]
    assert dest == DEV2 and len(chal) == outer.HEADER_LEN
    assert downlink(f) == DEV
    assert send(f, outer.path_response(100, HK[K_DA], chal), DEV2) == []
    assert f.learned == {100: DEV2} and downlink(f) == DEV2
    # and back (the mapping moved again)
    out = send(f, keepalive(), DEV)
    [(chal2, dest)] = out
    assert dest == DEV and chal2[4:] != chal[4:]        # a fresh nonce
    send(f, outer.path_response(100, HK[K_DA], chal2), DEV)
    assert f.learned == {100: DEV} and downlink(f) == DEV
    moved = f.lines.info("next hop learned")
    assert len(moved) == 3, moved
    assert "198.51.100.7:40001 (was 198.51.100.7:40000; path validated)" in moved[1]
    assert "198.51.100.7:40000 (was 198.51.100.7:40001; path validated)" in moved[2]
    s = accounted(f)
    assert (s["challenges"], s["path_responses"], s["moves"]) == (2, 2, 3)


def _respond_ok(chal):
    return outer.path_response(100, HK[K_DA], chal)


# (name, response maker(chal), source, seconds after the challenge, expected drop)
RESPONSES = (
    ("wrong nonce", lambda c: outer.path_response(100, HK[K_DA], c[:4] + bytes(8)), DEV2, 0, "bad_mac"),
    ("wrong key", lambda c: outer.path_response(100, HK[K_DX], c), DEV2, 0, "bad_mac"),
    ("from another source", _respond_ok, EVIL, 0, "unsolicited_response"),
    ("from the old address", _respond_ok, DEV, 0, "unsolicited_response"),
    ("too late", _respond_ok, DEV2, pop.CHALLENGE_TIMEOUT_S, "unsolicited_response"),
    ("with a payload", lambda c: _respond_ok(c) + c[4:], DEV2, 0, "bad_response"),
    ("on the other label", lambda c: outer.path_response(110, HK[K_DX], c), DEV2, 0, "unsolicited_response"),
)


def test_03_only_the_right_response_from_the_challenged_address_moves_it():
    for name, make, src, delay, reason in RESPONSES:
        f = connected()
        [_, (chal, _)] = send(f, data(), DEV2)
        f.now[0] += delay
        assert send(f, make(chal), src) == [], name
        assert f.learned == {100: DEV}, name
        assert f.drops[reason] == 1, (name, {k: v for k, v in f.drops.items() if v})
        assert (f.routes[100].drops or {}).get(reason) == 1 or name == "on the other label", name
        accounted(f)
    # a response captured from an earlier migration is useless later
    f = connected()
    [_, (chal, _)] = send(f, data(), DEV2)
    old = _respond_ok(chal)
    send(f, old, DEV2)
    assert f.learned == {100: DEV2}
    f.now[0] += 5
    [_, (chal2, _)] = send(f, data(), EVIL)
    assert send(f, old, EVIL) == [] and f.learned == {100: DEV2} and f.drops["bad_mac"] == 1
    assert chal2 != chal


def test_04_one_outstanding_challenge_per_label_and_a_global_budget():
    f = connected()
    send(f, data(110, K_DX), DEV)
    out = [send(f, data(), ("192.0.2.1", 1000 + i)) for i in range(50)]
    assert sum(len(o) - 1 for o in out) == 1                   # one challenge, the rest only forwarded
    assert len(send(f, data(110, K_DX), EVIL)) == 2            # the other label has its own slot
    f.now[0] += pop.CHALLENGE_TIMEOUT_S
    assert len(send(f, data(), EVIL)) == 2                     # expired: the next source may be tried
    # many labels at once are bounded by CHALLENGE_RATE in all
    n = int(pop.CHALLENGE_BURST) + 200
    specs = [pop.RouteSpec(10000 + i, K_DA, Address(4, "127.0.0.1", 9001), 0, 50000 + i, K_AB)
             for i in range(n)]
    specs += [pop.RouteSpec(30000 + i, K_AB, None, 10000 + i, 60000 + i, K_DA) for i in range(n)]
    g = pop.Forwarder(pop.build_table(specs), logging.getLogger("quiet"), clock=lambda: 50.0)
    for i in range(n):
        send(g, outer.seal(1, 10000 + i, HK[K_DA], b"x" * 40), DEV)
    chal = sum(len(send(g, outer.seal(1, 10000 + i, HK[K_DA], b"y" * 40), EVIL)) - 1 for i in range(n))
    assert chal == pop.CHALLENGE_BURST and g.challenges == chal


def test_04b_a_replaying_address_cannot_hold_the_slot_against_a_real_move():
    f = connected()
    captured = data()
    [_, (chal, _)] = send(f, captured, EVIL)             # the replayer gets the first challenge
    f.now[0] += pop.CHALLENGE_TIMEOUT_S
    [_, (chal, dest)] = send(f, captured, EVIL)          # unanswered: it may have the free slot again ...
    assert dest == EVIL
    out = send(f, data(), DEV2)                          # ... but yields it to a source that did not fail
    [_, (chal2, dest)] = out
    assert dest == DEV2
    send(f, outer.path_response(100, HK[K_DA], chal2), DEV2)
    assert f.learned == {100: DEV2}
    # a fresh source never displaces an outstanding challenge to another fresh one
    g = connected()
    send(g, data(), ("192.0.2.1", 1))
    assert len(send(g, data(), ("192.0.2.2", 2))) == 1
    # a device whose response was lost is asked again when the slot is free
    h = connected()
    send(h, data(), DEV2)
    h.now[0] += pop.CHALLENGE_TIMEOUT_S
    [_, (chal3, dest)] = send(h, data(), DEV2)
    assert dest == DEV2
    send(h, outer.path_response(100, HK[K_DA], chal3), DEV2)
    assert h.learned == {100: DEV2}


def test_05_a_challenge_is_no_larger_than_a_keepalive_and_probes_provoke_none():
    f = connected()
    out = send(f, keepalive(), EVIL)
    assert [(len(p), d) for p, d in out] == [(12, EVIL)]
    f.now[0] += 5
    out = send(f, probe(), EVIL)                # the probe's reply is its one answer
    assert len(out) == 1 and outer.parse(out[0][0])[0] == outer.TYPE_HOP_PROBE_REPLY
    assert f.learned == {100: DEV}


# --- the handshake-flood defence ------------------------------------------------------------

def test_06_replayed_and_mutated_inits_are_dropped_before_any_hmac():
    f = connected()
    captured = init()
    assert send(f, captured, DEV)[0][1] == NEXT
    mutated = bytearray(captured)
    mutated[60] ^= 0xFF                         # between the excerpt halves: the hop MAC still verifies
    assert outer.verify(HK[K_DA], bytes(mutated))
    for pkt, src in ((captured, DEV), (captured, EVIL), (bytes(mutated), ("192.0.2.9", 9))):
        assert send(f, pkt, src) == []
    assert f.drops["init_replay"] == 3 and f.routes[100].drops == {"init_replay": 3}
    assert f.routes[100].packets == 2           # counted before authentication: not "packets"
    # a fresh INIT from the device still goes through
    assert send(f, init(), DEV)[0][1] == NEXT
    assert f.lines.info("label 100: dropped init_replay from")
    accounted(f)


def test_07_fresh_inits_are_budgeted_per_label():
    f = connected()
    sent = [send(f, init(), DEV) for _ in range(20)]
    assert sum(1 for o in sent if o) == pop.INIT_BURST
    assert f.drops["init_rate"] == 20 - pop.INIT_BURST
    f.now[0] += 1 / pop.INIT_RATE
    assert send(f, init(), DEV)[0][1] == NEXT
    assert send(f, init(), DEV) == []
    accounted(f)


def test_08_an_init_flood_on_one_label_does_not_starve_another():
    f = connected()
    send(f, data(110, K_DX), EVIL)
    forwarded = 0
    for i in range(20000):                      # 100k/s for 0.2 s, from spoofed sources, with the key of 110
        f.now[0] += 0.00001
        out = send(f, init(110, K_DX), ("10.%d.%d.%d" % (i >> 16, (i >> 8) & 255, i & 255), 1))
        forwarded += sum(1 for p, d in out if d == NEXT)
        if i % 5000 == 0:                       # the device on label 100 gets through all along
            assert send(f, init(), DEV)[0][1] == NEXT
    assert forwarded <= pop.INIT_BURST + 0.2 * pop.INIT_RATE + 1
    assert f.routes[110].drops["init_rate"] >= 20000 - forwarded - 1
    assert "init_rate" not in (f.routes[100].drops or {})
    # replies towards the flood's sources: none
    assert f.challenges <= 1
    # the device's next INIT after the flood
    f.now[0] += 1
    assert send(f, init(), DEV)[0][1] == NEXT
    accounted(f)


def test_09_inits_are_budgeted_per_source_and_the_source_table_is_bounded():
    specs = [pop.RouteSpec(1000 + i, K_DA, Address(4, "127.0.0.1", 9001), 0, 5000 + i, K_AB) for i in range(40)]
    specs += [pop.RouteSpec(3000 + i, K_AB, None, 1000 + i, 6000 + i, K_DA) for i in range(40)]
    f = pop.Forwarder(pop.build_table(specs), logging.getLogger("quiet"), clock=lambda: 7.0)
    got = [send(f, outer.seal(1, 1000 + i, HK[K_DA], bytes((1, 0, 0, 0)) + os.urandom(144)), EVIL)
           for i in range(40)]                  # one source, many labels (an attacker holding many keys)
    assert sum(1 for o in got if o and o[0][1] == NEXT) == pop.SOURCE_BURST
    assert f.drops["init_source_rate"] == 40 - pop.SOURCE_BURST
    # behind the first PoP a source is a neighbour PoP carrying many devices'
    # INITs, on labels with a fixed next hop: no per-source budget there
    inner = [pop.RouteSpec(2000 + i, K_AB, Address(4, "127.0.0.1", 9001), 0, 7000 + i, K_AB) for i in range(40)]
    g = pop.Forwarder(pop.build_table(inner), logging.getLogger("quiet"), clock=lambda: 7.0)
    got = [send(g, outer.seal(1, 2000 + i, HK[K_AB], bytes((1, 0, 0, 0)) + os.urandom(144)), EVIL)
           for i in range(40)]
    assert all(o and o[0][1] == NEXT for o in got) and g.drops["init_source_rate"] == 0
    # spoofed sources: the table stops at SOURCE_MAX, the rest share one budget
    t = [100.0]
    g = forwarder()
    g.clock = lambda: t[0]
    for i in range(pop.SOURCE_MAX + 2000):
        t[0] += 0.01
        label, key = (100, K_DA) if i % 2 else (110, K_DX)
        send(g, init(label, key), ("10.0.%d.%d" % (i >> 8, i & 255), 1 + i))
    assert len(g._sources) <= pop.SOURCE_MAX


def test_09b_handshake_replies_to_a_device_are_budgeted_and_never_replayed():
    # issue 11, defect 1, at the last relay before the device: however many
    # COOKIEs or RESPONSEs the gateway sends (or an attacker replays) down a
    # device's label, its link carries REPLY_BURST, then REPLY_RATE per second
    f = connected()

    def down(t, n):
        return outer.seal(outer.TYPE_DATA, 201, HK[K_AB], bytes((t, 0, 0, 0)) + os.urandom(n - 4))

    cookies = [down(3, outer.INNER_COOKIE_LEN) for _ in range(50)]
    got = [send(f, c, NEXT) for c in cookies]
    assert sum(1 for o in got if o and o[0][1] == DEV) == pop.REPLY_BURST
    assert f.routes[201].drops == {"reply_rate": 50 - pop.REPLY_BURST}
    f.now[0] += 1 / pop.REPLY_RATE
    resp = down(2, outer.INNER_RESPONSE_LEN)
    assert send(f, resp, NEXT)[0][1] == DEV
    assert send(f, resp, NEXT) == [] and f.drops["reply_replay"] == 1
    # transport packets of the same lengths are not handshake replies
    for n in (outer.INNER_COOKIE_LEN, outer.INNER_RESPONSE_LEN):
        for _ in range(20):
            assert send(f, down(4, n), NEXT)[0][1] == DEV
    # and uplink packets of these shapes are not either (their next hop is fixed)
    for _ in range(20):
        up = outer.seal(1, 100, HK[K_DA], bytes((3, 0, 0, 0)) + os.urandom(outer.INNER_COOKIE_LEN - 4))
        assert send(f, up, DEV)[0][1] == NEXT
    accounted(f)


# --- no reply larger or more numerous than its trigger ------------------------------------

def test_10_no_reply_larger_or_more_numerous_than_its_trigger():
    f = connected()
    rnd = random.Random(10)
    captured = [data(), init(), keepalive(), probe(), data(110, K_DX), keepalive(110, K_DX)]
    for c in captured:
        send(f, c, DEV)
    for i in range(20000):
        f.now[0] += 0.001
        k = rnd.randrange(6)
        if k == 0:
            pkt = rnd.choice(captured)
        elif k == 1:
            pkt = bytearray(rnd.choice(captured))
            pkt[rnd.randrange(len(pkt))] ^= 1 << rnd.randrange(8)
            pkt = bytes(pkt)
        elif k == 2:        # fresh and authentic: made with the key the attacker holds (label 110's)
            pkt = rnd.choice((init, keepalive, probe, data))(110, K_DX)
        elif k == 3:
            pkt = bytes((0x10 | rnd.randrange(16),)) + rnd.choice((b"\0\0\x64", b"\0\0\x6e")) + os.urandom(
                rnd.randrange(8, 40))
        elif k == 4:
            pkt = os.urandom(rnd.randrange(0, 200))
        else:
            pkt = bytes((0x15, 0, 0, 100)) + os.urandom(8)
        src = rnd.choice((EVIL, DEV2, ("192.0.2.%d" % rnd.randrange(256), rnd.randrange(1, 65536))))
        out = send(f, pkt, src)
        replies = [(p, d) for p, d in out if d != NEXT and d != DEV]
        assert len(replies) <= 1, (i, pkt, out)
        for p, d in replies:
            assert len(p) <= len(pkt), (i, pkt, p)
    s = accounted(f)
    assert s["drops"]["internal_error"] == 0
    # the device's address never moved; the insider's own label may have (its fresh INITs)
    assert f.learned[100] == DEV


def test_11_probes_are_answered_within_a_budget():
    f = connected()
    answered = sum(len(send(f, probe(), EVIL)) for _ in range(50))
    assert answered == pop.PROBE_BURST and f.drops["probe_rate"] == 50 - pop.PROBE_BURST
    f.now[0] += 1 / pop.PROBE_RATE
    assert len(send(f, probe(), DEV)) == 1


def test_12_reload_keeps_learned_addresses_budgets_and_per_label_drops():
    f = connected()
    [_, (chal, _)] = send(f, data(), DEV2)
    captured = init()
    send(f, captured, DEV)
    send(f, captured, EVIL)
    before = dict(f.routes[100].drops or {})
    specs = [pop.RouteSpec(100, K_DA, Address(4, "127.0.0.1", 9002), 0, 200, K_AB),
             pop.RouteSpec(201, K_AB, None, 100, 101, K_DA)]
    f.swap(pop.build_table(specs))
    assert f.learned == {100: DEV}
    assert f.routes[100].drops == before == {"init_replay": 1}
    assert send(f, captured, EVIL) == []        # the replay filter survives the reload too
    # the challenge still stands across the reload
    send(f, outer.path_response(100, HK[K_DA], chal), DEV2)
    assert f.learned == {100: DEV2}


# --- the device answers a challenge -------------------------------------------------------

def test_13_the_device_answers_a_challenge_with_a_response_the_pop_accepts():
    from stack_sim import make_config
    from microtun.tunnel import TunnelCore
    cfg = make_config(n_paths=2)
    core = TunnelCore(cfg, 1)
    p0 = cfg.paths[0]
    specs = [pop.RouteSpec(p0.label, p0.hop_key, Address(4, "127.0.0.1", 9001), 0, 300, K_AB),
             pop.RouteSpec(301, K_AB, None, p0.label, p0.rx_label, p0.hop_key)]
    f = pop.Forwarder(pop.build_table(specs), logging.getLogger("quiet"), clock=lambda: 3.0)
    hk = outer.HopKey(p0.hop_key)
    send(f, outer.seal(1, p0.label, hk, bytes(40)), DEV)
    [_, (chal, dest)] = send(f, outer.seal(1, p0.label, hk, bytes(41)), DEV2)
    core.receive(0, chal, 5)
    [(i, resp)] = core.datagrams_to_send(5)
    assert i == 0 and len(resp) == 12 and core.stats["path_challenge_rx"] == 1
    assert send(f, resp, DEV2) == [] and f.learned == {p0.label: DEV2}
    # a challenge on another label, or of another length, gets no answer
    for bad in (bytes((0x15, 0, 0, 77)) + bytes(8), chal + b"x"):
        core.receive(0, bad, 6)
    assert core.datagrams_to_send(6) == [] and core.stats["outer_bad_challenge"] == 2


# --- bounded memory ---------------------------------------------------------------------------

def test_14_memory_stays_flat_under_mixed_fuzz_from_spoofed_sources():
    import tracemalloc
    f = connected()
    f.log.setLevel(logging.INFO)                # the test's handler keeps every line it gets
    f.log_level_changed()
    send(f, data(110, K_DX), DEV)
    rnd = random.Random(14)
    captures = [data(), init(), keepalive(), probe(), data(110, K_DX), init(110, K_DX)]
    for c in captures:                          # what the devices sent, and an eavesdropper captured
        send(f, c, DEV)

    def one(i):
        f.now[0] += 0.0001
        k = rnd.randrange(6)
        if k == 0:
            pkt = os.urandom(rnd.randrange(0, 200))
        elif k == 1:                            # mutated capture
            pkt = bytearray(rnd.choice(captures))
            pkt[rnd.randrange(len(pkt))] ^= 1 << rnd.randrange(8)
        elif k == 2:                            # valid hop MAC, changed between the excerpt halves
            pkt = bytearray(rnd.choice(captures[:2] + captures[4:]))
            pkt[28 + rnd.randrange(len(pkt) - 44)] ^= 0x55     # payload bytes 16 .. len - 16
        elif k == 3:
            pkt = rnd.choice(captures)
        elif k == 4:                            # fresh, authentic, from the keys the attacker holds
            pkt = rnd.choice((init, keepalive, probe, data))(110, K_DX)
        else:
            pkt = bytes((0x16, 0, 0, 100)) + os.urandom(8)
        src = ("10.%d.%d.%d" % ((i >> 16) & 255, (i >> 8) & 255, i & 255), 1 + i % 65000)
        res = f.receive(bytes(pkt), src)
        f.extra.clear()
        return res

    for i in range(20000):                      # warm-up: tables reach their working size
        one(i)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(20000, 60000):
        one(i)
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert grown < 64 * 1024, grown
    s = accounted(f)
    assert s["drops"]["internal_error"] == 0 and s["sources_tracked"] <= pop.SOURCE_MAX
    assert f.learned[100] == DEV                # label 110's key is the attacker's: its address may move
    assert len(f.lines.records) < 200          # info lines are rate-limited: 8 simulated seconds




def _reply(kind=2, n=outer.INNER_RESPONSE_LEN):
    """The gateway's handshake answer on its way down to the device."""
    return outer.seal(outer.TYPE_DATA, 201, HK[K_AB], bytes((kind, 0, 0, 0)) + os.urandom(n - 4))


def test_15_a_fresh_init_from_a_new_address_moves_it_at_once_a_replayed_one_never():
    """A device that rebooted (a new source port) starts with an INIT: it
    must get the gateway's answer and its first replies at once, not after
    a handshake retry. A fresh INIT (never seen by the replay filter, with a
    valid hop MAC) is fresh and authentic for this hop, so the address moves
    at once; a replayed one is dropped before it can move anything."""
    for kind, n in ((2, outer.INNER_RESPONSE_LEN), (3, outer.INNER_COOKIE_LEN), (5, outer.INNER_STALE_LEN)):
        f = connected()
        out = send(f, init(), DEV2)
        assert [d for _, d in out] == [NEXT]                # forwarded, no challenge: nothing back
        assert f.learned[100] == DEV2
        assert f.lines.info("next hop learned: 198.51.100.7:40001 (was 198.51.100.7:40000; fresh handshake")
        assert [d for _, d in send(f, _reply(kind, n), NEXT)] == [DEV2]
        assert downlink(f) == DEV2
        accounted(f)
    f = connected()
    ini = init()
    send(f, ini, DEV)
    for src in (EVIL, DEV2):
        assert send(f, ini, src) == [] and f.learned[100] == DEV     # init_replay
    assert f.stats()["drops"]["init_replay"] == 2
