"""Path health and send policies (microtun.paths), on a fake clock that wraps."""
from microtun import paths as P
from microtun.ticks import ticks_add, TICKS_PERIOD
from mtest import raises

PORTABLE = True
T0 = TICKS_PERIOD - 500


def make(n=2, policy="best"):
    ps = [P.Path(i, "p%d" % i, 100 + i, 200 + i, None) for i in range(n)]
    return P.PathSet(ps, policy)


def reply(ps, path, seq, now):
    return ps.on_probe_reply(P.probe_message(path.index, seq, 0, kind=2), now)   # 2: the gateway's PATH_REPLY


def bring_up(ps, now, rtts=(20, 40)):
    for (p, seq) in ps.due_probes(now):
        assert reply(ps, p, seq, ticks_add(now, rtts[p.index]))
    return ticks_add(now, max(rtts))


def test_state_table_is_complete():
    # (printed on the host: test_pathtable.py) every state can be left, and
    # DOWN comes back only through a reply
    assert P.TRANSITIONS[("down", "reply")] == "up"
    assert ("down", "miss") not in P.TRANSITIONS


def test_new_paths_come_up_on_reply_and_best_is_fastest():
    ps = make()
    assert ps.best() is None
    now = bring_up(ps, T0)
    assert [p.state for p in ps.paths] == ["up", "up"]
    assert ps.best() is ps.paths[0]
    assert ps.select(None, now) == [ps.paths[0]]


def test_transitions_table_driven():
    # (events, expected state): r = reply, m = probe lost (RTO passes)
    cases = [
        ("r", "up"), ("rm", "suspect"), ("rmr", "up"), ("rmmm", "down"),
        ("rmmmr", "up"), ("mmm", "down"), ("m", "new"),
    ]
    for events, expect in cases:
        ps = make(1)
        p = ps.paths[0]
        now = T0
        for ev in events:
            ps.note_app_send(now)
            (q, seq), = ps.due_probes(now)
            if ev == "r":
                reply(ps, p, seq, ticks_add(now, 10))
                now = ticks_add(now, 10)
            else:
                now = ticks_add(now, p.rto() + 1)
                p.check_timeouts(now)
            now = ticks_add(now, 5000)      # the next probe is due
        assert p.state == expect, (events, p.state)
        assert p.live == (expect in ("up", "suspect"))


def test_rtt_estimator_rfc6298():
    ps = make(1)
    p = ps.paths[0]
    now = T0
    for rtt in (100, 100, 100, 100):
        ps.note_app_send(now)
        (q, seq), = ps.due_probes(now)
        reply(ps, p, seq, ticks_add(now, rtt))
        now = ticks_add(now, 5000)
    assert abs(p.srtt - 100) < 1e-6
    assert p.rttvar < 50
    assert 100 <= p.rto() <= 200             # RTO floor 100 ms


def test_late_or_duplicate_reply_ignored():
    ps = make(1)
    p = ps.paths[0]
    (q, seq), = ps.due_probes(T0)
    assert reply(ps, p, seq, ticks_add(T0, 10))
    assert not reply(ps, p, seq, ticks_add(T0, 12))       # duplicate copy
    assert not reply(ps, p, seq + 7, ticks_add(T0, 12))   # never sent


def test_only_a_reply_back_on_the_path_it_names_counts():
    # the checks microtun.tunnel relies on: anything else on channel 0
    # leaves the probe outstanding, and the reply then still counts
    ps = make(2)
    p = ps.paths[1]
    probes = dict(ps.due_probes(T0))
    seq = probes[p]
    now = ticks_add(T0, 10)
    msg = P.probe_message(1, seq, 0, kind=2)
    assert not ps.on_probe_reply(msg, now, 0)                          # came back on path 0
    assert not ps.on_probe_reply(P.probe_message(1, seq, 0), now, 1)   # a probe, not a reply
    assert not ps.on_probe_reply(msg[:11], now, 1)                     # short
    assert not ps.on_probe_reply(P.probe_message(2, seq, 0, kind=2), now)   # no path 2
    assert not ps.on_probe_reply(b"\x10" + msg[1:], now, 1)            # an ops request's type
    assert p.state == "new" and p.srtt is None
    assert ps.on_probe_reply(msg, now, 1)
    assert p.state == "up" and p.srtt == 10


def test_suspect_path_means_send_on_both():
    # The best path misses a probe but is still the best choice (the other
    # one is worse): while in doubt, traffic goes on both.
    ps = make()
    now = bring_up(ps, T0)
    best, other = ps.paths
    other.loss = 0.2
    best.outstanding[99] = now
    now = ticks_add(now, best.rto() + 1)
    best.check_timeouts(now)
    assert best.state == "suspect"
    assert ps.select("best", now) == [best, other]


def test_suspect_path_yields_to_validated_clean_path():
    # Make-before-break: the other path is already validated (UP) and clean,
    # so traffic moves to it at once instead of waiting on the doubtful one.
    ps = make()
    now = bring_up(ps, T0)
    best, other = ps.paths
    best.outstanding[99] = now
    now = ticks_add(now, best.rto() + 1)
    best.check_timeouts(now)
    assert best.state == "suspect"
    assert ps.select("best", now) == [other]


def test_down_path_not_used_and_other_takes_over():
    ps = make()
    now = bring_up(ps, T0)
    a = ps.paths[0]
    for i in range(3):
        a.outstanding[50 + i] = now
        now = ticks_add(now, a.rto() + 1)
        a.check_timeouts(now)
    assert a.state == "down"
    assert ps.select("best", now) == [ps.paths[1]]
    assert ps.select("critical", now) == [ps.paths[1]]


def test_critical_uses_every_live_path():
    ps = make(3)
    now = bring_up(ps, T0, (10, 20, 30))
    assert ps.select("critical", now) == ps.paths


def test_nothing_validated_sends_everywhere():
    ps = make()
    assert ps.select("best", T0) == ps.paths


def test_explicit_path_index_route():
    ps = make()
    assert ps.select(1, T0) == [ps.paths[1]]
    assert ps.select(5, T0) == []


def test_adaptive_hysteresis():
    # Adaptive duplicates while even the best path is lossy (here both are),
    # with hysteresis between 5 % (on) and 2 % (off).
    ps = make(policy="adaptive")
    now = bring_up(ps, T0)
    a, b = ps.paths

    def both(loss):
        a.loss = b.loss = loss
        return len(ps.select(None, now))
    assert both(0.0) == 1
    assert both(0.06) == 2         # above ON
    assert both(0.03) == 2         # between OFF and ON: keep duplicating
    assert both(0.01) == 1         # below OFF: stop
    assert both(0.03) == 1         # between again, not duplicating: stay single


def test_probe_pacing_idle_vs_active():
    ps = make(1)
    p = ps.paths[0]
    now = bring_up(ps, T0, (10, 10))
    # idle and healthy: the next probe is minutes away
    assert ps.due_probes(ticks_add(now, 1000)) == []
    now = ticks_add(now, 60000)
    assert ps.due_probes(now) == []
    ps.note_app_send(now)                # becoming active pulls the probe in
    assert p.next_probe == ticks_add(now, P.PROBE_ACTIVE_MS["up"])
    assert ps.due_probes(ticks_add(now, 50)) == []
    assert len(ps.due_probes(ticks_add(now, 200))) == 1
    assert len(ps.due_probes(ticks_add(now, 400))) == 1


def test_nat_keepalive_due():
    ps = make()
    for p in ps.paths:
        p.last_tx = T0
    assert ps.due_keepalives(ticks_add(T0, 24000)) == []
    assert ps.due_keepalives(ticks_add(T0, 25000)) == ps.paths


def test_timer_points_at_earliest_need():
    ps = make(1)
    p = ps.paths[0]
    ps.due_probes(T0)
    t = ps.get_timer()
    assert t is not None


def test_misuse():
    raises(ValueError, P.PathSet, [], "best")
    raises(ValueError, P.PathSet, [P.Path(0, "a", 1, 2, None)], "fastest")
    ps = make(1)
    assert not ps.on_probe_reply(b"\x02" * 5, T0) and not ps.on_probe_reply(bytes(12), T0)


def test_lossy_best_path_loses_its_place_with_margin():
    ps = make()
    now = bring_up(ps, T0, (10, 12))
    a, b = ps.paths
    assert ps.best() is a
    a.loss = 0.005                 # 5 ms penalty: within the margin, no flapping
    assert ps.best() is a
    a.loss = 0.1                   # 100 ms penalty: b takes over
    assert ps.best() is b
    assert ps.best_switches == 1
    a.loss = 0.0                   # a is back, but only 2 ms better: stay on b
    assert ps.best() is b
    b.loss = 0.05
    assert ps.best() is a
    assert ps.best_switches == 2
