"""The device's side of path validation (docs/OUTER.md §3), on both
interpreters: a 12-byte PATH_CHALLENGE on a path's send label is answered
with the 12-byte PATH_RESPONSE that binds its nonce under the path's hop
key, sent on that path (to its first PoP, never to the challenge's source);
anything else that looks like a challenge is counted and not answered."""
from microtun import hop, outer
from microtun.tunnel import TunnelCore
from stack_sim import make_config

PORTABLE = True


def _core():
    cfg = make_config(n_paths=2)
    return cfg, TunnelCore(cfg, 1)


def test_challenge_answered_on_its_path_with_the_bound_nonce():
    cfg, core = _core()
    for i, pc in enumerate(cfg.paths):
        chal = bytes((0x15, pc.label >> 16, (pc.label >> 8) & 0xFF, pc.label & 0xFF)) + bytes(range(i, i + 8))
        core.receive(i, chal, 100)
        out = core.datagrams_to_send(100)
        assert len(out) == 1 and out[0][0] == i
        resp = out[0][1]
        assert len(resp) == hop.HEADER_LEN == len(chal)             # no larger than the challenge
        assert outer.parse(resp) == (hop.TYPE_PATH_RESPONSE, pc.label)
        # the MAC is that of seal(PATH_RESPONSE, label, key, nonce)
        assert hop.verify(hop.HopKey(pc.hop_key), resp + chal[4:])
        assert resp == hop.path_response(pc.label, hop.HopKey(pc.hop_key), chal)
    assert core.stats["path_challenge_rx"] == 2


# (name, datagram on path 0): not answered
def _bad(cfg):
    p0, p1 = cfg.paths[0], cfg.paths[1]
    return (
        ("other path's label", bytes((0x15, 0, 0, p1.label)) + bytes(8)),
        ("receive label", bytes((0x15, 0, 0, p0.rx_label)) + bytes(8)),
        ("with a payload", bytes((0x15, 0, 0, p0.label)) + bytes(9)),
    )


def test_other_challenges_are_counted_not_answered():
    cfg, core = _core()
    rows = _bad(cfg)
    for name, pkt in rows:
        core.receive(0, pkt, 100)
        assert core.datagrams_to_send(100) == [], name
    assert core.stats["outer_bad_challenge"] == len(rows)
    assert "path_challenge_rx" not in core.stats
