"""The gateway's side of issue 11, on the fake network: replies never more
numerous than what provoked them (replay filter, per-link budgets, COOKIE
limits), session confirmation, freshness recovery (STALE), per-device
counters, bounded tables. Both interpreters."""
from microtun.endpoint import Device, HANDSHAKE, STALE
from microtun.responder import Gateway, FAILED, DENIED, LINK_DH_PER_S, LINK_COOKIES_PER_S, create_stale
from microtun import responder
from microtun import messages as m
from microtun.handshake import create_initiation
from tunnel_sim import Sim, pair, connected, TO_GW, TO_DEV, DEV_KEY, GW_KEY, PSK
from mtest import Rng, MICROPYTHON

PORTABLE = True


def _garbage_inits(gw, n, seed=5):
    """INITs with a valid mac1 and a random body: what a compromised PoP can
    make (it knows the gateway's public key), each new."""
    rng = Rng(seed)
    k = m.mac1_key(gw.public_key)
    for _ in range(n):
        yield m.finish(m.header(m.TYPE_INIT) + rng.bytes(m.INIT_MAC1 - 4), k, None)[0]


def _replies(gw):
    return gw.datagrams_to_send()


def test_exact_replays_never_answered_and_cost_no_dh():
    sim = pair()
    inits = []
    sim.tap = lambda d, data: (inits.append(data) if data[0] == m.TYPE_INIT else None) or data
    sim.dev.connect(sim.now)
    sim.run(200)
    assert sim.dev.established
    _replies(sim.gw)
    for _ in range(500):
        sim.gw.receive_datagram(inits[0], "elsewhere", sim.now)
    assert _replies(sim.gw) == []
    assert sim.gw.stats["init_replay"] == 500
    assert "bad_init" not in sim.gw.stats and "stale_handshake" not in sim.gw.stats


def test_dual_path_copy_of_an_init_is_dropped_not_stale():
    sim = pair()
    sim.dev.connect(sim.now)
    init = sim.dev.datagrams_to_send()[0][0]
    sim.gw.receive_datagram(init, "path-a", sim.now)
    sim.gw.receive_datagram(init, "path-b", sim.now + 3)
    out = _replies(sim.gw)
    assert len(out) == 1 and out[0][0][0] == m.TYPE_RESPONSE and out[0][1] == "path-a"
    assert sim.gw.stats["init_replay"] == 1
    assert "stale_handshake" not in sim.gw.stats and "handshake_flood" not in sim.gw.stats


def test_flood_on_one_link_is_bounded_and_other_links_get_in():
    sim = pair()
    gw = sim.gw
    flood = list(_garbage_inits(gw, 400))
    for pkt in flood:
        gw.receive_datagram(pkt, "flooded", sim.now)
    # at most LINK_DH_PER_S of them cost a DH in this second; none is answered
    assert gw.stats["bad_init"] == LINK_DH_PER_S
    assert gw.stats.get("init_budget", 0) + gw.stats.get("cookie_limited", 0) + gw.stats.get("cookie_sent", 0) == \
        400 - LINK_DH_PER_S
    out = _replies(gw)
    assert all(d[0] == m.TYPE_COOKIE for d, a in out) and len(out) <= LINK_COOKIES_PER_S
    # the same second, a device on another link connects at once
    sim.dev.connect(sim.now)
    sim.run(100)
    assert sim.dev.established
    # replies towards the flooded link stay bounded second after second
    for sec in range(3):
        sim.run(1000)
        for pkt in _garbage_inits(gw, 300, seed=10 + sec):
            gw.receive_datagram(pkt, "flooded", sim.now)
        out = [a for d, a in _replies(gw) if a == "flooded"]
        assert len(out) <= LINK_COOKIES_PER_S


def test_cookie_replies_limited_per_link():
    sim = pair()
    gw = sim.gw
    gw.under_load = True
    k = m.mac1_key(gw.public_key)
    sent = 0
    for i in range(100):
        _, msg, _ = create_initiation((DEV_KEY, sim.dev.public_key), gw.public_key, PSK, i + 1,
                                      bytes(12), k, None, ss=b"\x01" * 32)
        gw.receive_datagram(msg, "lnk", sim.now)
        sent += 1
    out = _replies(gw)
    assert len(out) == LINK_COOKIES_PER_S and all(len(d) < m.INIT_LEN for d, a in out)
    assert gw.stats["cookie_limited"] == 100 - LINK_COOKIES_PER_S


def test_wrong_psk_is_handshake_failed_never_ok():
    gw = Gateway(GW_KEY)
    dev = Device(DEV_KEY, gw.public_key, psk=b"\x01" * 32, boot_counter=1)
    gw.add_peer(dev.public_key, psk=PSK, name="dev1")
    sim = Sim(dev, gw)
    dev.connect(sim.now)
    sim.run(30000)      # the first attempt and its retries (5, 10 s ...), then the confirmation timeout
    assert not dev.established
    assert "handshake_ok" not in gw.stats
    peer = gw.peers[dev.public_key]
    n = dev.stats["handshake_init_tx"]
    assert n >= 3
    assert peer.counts["handshake_failed"] == n == gw.stats["handshake_failed"], (n, peer.counts)
    assert [e.kind for e in sim.gw_events] == [FAILED] * n
    assert peer.handshakes == 0 and peer.current is None and peer.next is None


def test_session_counts_only_once_confirmed():
    sim = pair()
    held = []

    def tap(d, data):
        if d == TO_GW and data[0] == m.TYPE_TRANSPORT and not held:
            held.append(data)            # the device's confirming keepalive, delayed
            return None
        return data
    sim.tap = tap
    sim.dev.connect(sim.now)
    sim.run(200)
    assert sim.dev.established
    assert sim.gw.stats["response_tx"] == 1 and "handshake_ok" not in sim.gw.stats
    assert sim.gw_events == []
    sim.inject(TO_GW, held[0])
    sim.run(50)
    assert sim.gw.stats["handshake_ok"] == 1
    assert [e.kind for e in sim.gw_events] == [HANDSHAKE]
    assert sim.gw.peers[sim.dev.public_key].counts["handshake_ok"] == 1


def test_reset_boot_counter_recovers_in_one_exchange():
    sim = connected(boot=13)
    gw = sim.gw
    sim.run(5000)
    # the board was re-flashed: its boot counter starts again at 8
    again = Device(DEV_KEY, gw.public_key, psk=PSK, boot_counter=8)
    sim2 = Sim(again, gw, now=5)
    again.connect(sim2.now)
    sim2.run(200)                 # INIT -> STALE -> INIT (boot 14) -> RESPONSE: no retry timer involved
    assert again.established
    assert again.stats["stale_rx"] == 1 and "handshake_retry" not in again.stats
    assert again._fresh.boot == 14
    assert [e.kind for e in sim2.dev_events] == [STALE, HANDSHAKE]
    peer = gw.peers[again.public_key]
    assert peer.counts["stale_handshake"] == 1 and peer.counts["stale_answer_tx"] == 1
    info = peer.info(sim2.now)
    assert info["stale"]["counter"] == 8 and info["stale"]["gateway_counter"] == 13
    again.send(1, b"back", sim2.now)
    sim2.run(50)
    assert sim2.take_data("gw") == [(1, b"back")]


def test_stale_answers_limited_per_device():
    sim = connected(boot=13)
    gw = sim.gw
    old = []
    for i in range(30):     # 30 stale INITs (distinct: the replay filter does not catch them)
        d = Device(DEV_KEY, gw.public_key, psk=PSK, boot_counter=2)
        d.connect(sim.now)
        old.append(d.datagrams_to_send()[0][0])
    _replies(gw)
    for pkt in old:
        gw.receive_datagram(pkt, "pop", sim.now)
    out = _replies(gw)
    assert len(out) == 1 and len(out[0][0]) == m.STALE_LEN < m.INIT_LEN
    assert gw.stats["stale_handshake"] == 30
    sim.run(5000)
    gw.receive_datagram(old[0], "pop", sim.now)      # a replay: filtered, not answered
    assert _replies(gw) == []


def test_stale_answer_only_opens_for_its_own_handshake():
    sim = connected(boot=13)
    gw = sim.gw
    dev = Device(DEV_KEY, gw.public_key, psk=PSK, boot_counter=3)
    dev.connect(sim.now)
    init = dev.datagrams_to_send()[0][0]
    idx = m.u32(init, 4)
    # another INIT's answer, and a forged one, for the outstanding index
    other = Device(DEV_KEY, gw.public_key, psk=PSK, boot_counter=3)
    other.connect(sim.now)
    gw.receive_datagram(other.datagrams_to_send()[0][0], "pop", sim.now)
    st = _replies(gw)[0][0]
    wrong = bytearray(st)
    wrong[4:8] = idx.to_bytes(4, "big")
    dev.receive_datagram(bytes(wrong), None, sim.now)
    forged = bytearray(st)
    forged[4:8] = idx.to_bytes(4, "big")
    forged[30] ^= 1
    dev.receive_datagram(bytes(forged), None, sim.now)
    assert dev.stats["bad_stale"] == 2 and dev._fresh.boot == 3
    assert dev.datagrams_to_send() == []           # no retry provoked
    # a genuine answer naming a value behind ours moves nothing
    sim.run(6000)
    dev2 = Device(DEV_KEY, gw.public_key, psk=PSK, boot_counter=20)
    dev2.connect(sim.now)
    hs = dev2.session.hs
    pkt = dev2.datagrams_to_send()[0][0]
    hs_r, sender, fresh = responder.read_initiation(pkt, gw._static, gw._ss_lookup)
    low = create_stale(hs_r, sender, (5).to_bytes(4, "big") + bytes(8))
    dev2.receive_datagram(low, None, sim.now)
    assert dev2.stats["bad_stale"] == 1 and dev2._fresh.boot == 20 and dev2.session.hs is hs


def test_per_device_counters_and_denied_event():
    sim = connected(channels=[1])
    sim.dev.send(7, b"nope", sim.now)
    sim.run(50)
    peer = sim.gw.peers[sim.dev.public_key]
    assert peer.counts["channel_denied"] == 1
    assert [(e.kind, e.channel) for e in sim.gw_events if e.kind == DENIED] == [(DENIED, 7)]
    info = peer.info(sim.now)
    assert info["counters"]["channel_denied"] == 1 and info["counters"]["handshake_ok"] == 1


def test_tables_stay_bounded_under_floods():
    sim = pair()
    gw = sim.gw
    now = sim.now
    for i, pkt in enumerate(_garbage_inits(gw, 3000)):
        gw.receive_datagram(pkt, "link%d" % i, now)       # a new link name every time
    assert len(gw._budgets) <= responder.MAX_LINKS + 1
    gw.link_dh_per_s = gw.dh_per_s = gw.params.under_load_per_s = 10 ** 6
    if not MICROPYTHON:              # there _RECENT_INITS is a folded const
        responder._RECENT_INITS = 50
    try:
        for pkt in _garbage_inits(gw, 300, seed=9):
            gw.receive_datagram(pkt, "one", now)
    finally:
        if not MICROPYTHON:
            responder._RECENT_INITS = 2048
    assert gw.stats["bad_init"] >= 300
    if not MICROPYTHON:
        assert len(gw._recent) + len(gw._recent_old) <= 100
    assert len(gw._by_index) == 0                   # garbage: no state
    out = gw.datagrams_to_send()                    # links beyond the bound share one budget
    assert len(out) <= LINK_COOKIES_PER_S and all(d[0] == m.TYPE_COOKIE for d, a in out)
    sim.dev.connect(sim.now)
    sim.run(200)
    assert sim.dev.established


class _Storage:
    def __init__(self):
        self.d = {}

    def read(self, name):
        return self.d.get(name)

    def write(self, name, data):
        self.d[name] = bytes(data)


def test_device_stack_persists_the_jump_and_says_why():
    from stack_sim import StackSim
    from microtun.tunnel import TunnelCore
    s = StackSim()
    s.connect()
    s.run(3000)
    # the same board after a re-flash: boot counter 1 again, over both paths
    logs = []
    core = TunnelCore(s.cfg, 1, log=lambda level, msg: logs.append((level, msg)))
    core.storage = _Storage()
    s.core = core
    core.connect(s.now)
    s.run(1500)
    assert core.established
    assert core.storage.d["boot"] == (2).to_bytes(4, "big")
    assert [l for l in logs if "boot counter 1" in l[1] and "continuing from 2" in l[1]], logs
    assert s.gw.stats["stale_handshake"] == 1 and s.gw.stats["init_replay"] >= 1   # the second path's copy
    assert s.peer.counts["handshake_ok"] == 2


def test_registry_builds_a_peer_only_on_an_authentic_handshake():
    """A large registry costs one small entry per device: register() builds
    no Peer; an INIT naming a registered key that does not authenticate
    builds none either (the static key is not proven until the payload's
    tag); the device's own handshake builds its Peer; revoking works with
    or without one."""
    from microtun.x25519 import public_key as x_public
    gw = Gateway(GW_KEY)
    dev = Device(DEV_KEY, gw.public_key, psk=PSK, boot_counter=1)
    others = [x_public(bytes([i + 1]) * 32) for i in range(20)]
    for i, pub in enumerate(others):
        gw.register(pub, name="d%d" % i, channels=[1, 2])
    gw.register(dev.public_key, psk=PSK, name="dev1", channels=[1, 2])
    assert len(gw.peers) == 21 and len(gw.peers.active) == 0 and dev.public_key in gw.peers
    # one frozenset for every device with the same channels
    assert gw.peers._entries[others[0]][2] is gw.peers._entries[others[5]][2]
    # garbage INITs with a valid mac1: nothing built
    for pkt in _garbage_inits(gw, 5):
        gw.receive_datagram(pkt, "b", 10)
    assert len(gw.peers.active) == 0
    sim = Sim(dev, gw)
    sim.dev.connect(sim.now)
    sim.run(200)
    assert sim.dev.established and list(gw.peers.active) == [dev.public_key]
    assert gw.peers[dev.public_key].handshakes == 1
    assert gw.remove_peer(others[3]) and others[3] not in gw.peers and len(gw.peers) == 20
    assert gw.remove_peer(dev.public_key) and len(gw.peers.active) == 0
    assert not gw.remove_peer(others[3])
