"""RFC 6479 dedup/anti-replay window: table-driven, both interpreters."""
from microtun.replay import ReplayWindow, REJECT_AFTER_MESSAGES, DEVICE_WINDOW, GATEWAY_WINDOW
from mtest import raises

PORTABLE = True
QEMU = True      # also runs on the qemu Cortex-M board (host_tests/qemu_manifest.py)

# (case, window size, counters marked in order, expected mark() results)
W = 1024
CASES = [
    (1, "in order", W, [0, 1, 2, 3], [True, True, True, True]),
    (2, "duplicate", W, [0, 1, 1, 0], [True, True, False, False]),
    (3, "reordered within window", W, [5, 3, 4, 0, 1, 2], [True] * 6),
    (4, "reordered then duplicate", W, [10, 2, 7, 2, 10], [True, True, True, False, False]),
    (5, "too old", W, [5000, 5000 - 1024, 5000 - 1023, 5000 - 1025], [True, False, True, False]),
    (6, "far jump ahead clears ring", W, [1, 2, 100000, 1, 2, 99999], [True, True, True, False, False, True]),
    (7, "jump by exactly a word", W, [31, 63, 31, 32, 63], [True, True, False, True, False]),
    (8, "counter limit", W, [REJECT_AFTER_MESSAGES - 1, REJECT_AFTER_MESSAGES], [True, False]),
    (9, "negative counter", W, [-1, 0], [False, True]),
    (10, "small window", 32, [100, 69, 68, 37], [True, True, False, False]),
    (11, "edge of window", W, [3000, 3000 - 1023, 3000 - 1024], [True, True, False]),
    (12, "first packet is not zero", W, [7, 0, 7], [True, True, False]),
    (13, "ring wrap reuses words", W, list(range(0, 6000, 7)) + [0, 5999 - 1024], None),
    # block 40 takes ring word 40 % 33 = 7, block 7's: too old, not a duplicate
    (14, "ring of 33 words wraps", W, [40 * 32 + 5, 7 * 32 + 5, 9 * 32 + 5, 40 * 32 + 4, 40 * 32 + 5],
     [True, False, True, True, False]),
]


def test_window_cases():
    for num, name, size, seq, expect in CASES:
        w = ReplayWindow(size)
        got = [w.mark(n) for n in seq]
        if expect is None:
            expect = [True] * (len(seq) - 2) + [False, False]
        assert got == expect, "case %d (%s): got %r" % (num, name, got)


def test_will_accept_never_commits():
    w = ReplayWindow()
    for n in (5, 3, 100, 2):
        assert w.will_accept(n)
        assert w.will_accept(n)  # a check alone does not mark
    assert w.last == -1
    assert w.mark(5)
    assert not w.will_accept(5)
    assert w.will_accept(4)


def test_will_accept_agrees_with_mark():
    # For any history, will_accept(n) is True exactly when mark(n) would succeed.
    from mtest import Rng
    rng = Rng(7)
    w = ReplayWindow(64)
    for _ in range(3000):
        n = rng.below(400)
        expect = w.will_accept(n)
        assert w.mark(n) == expect


def test_window_sizes():
    assert ReplayWindow().window >= DEVICE_WINDOW
    assert ReplayWindow(GATEWAY_WINDOW).window >= 8128
    assert ReplayWindow(1024).window == 1024      # 33 words, not a power of two (64: 2016)
    assert ReplayWindow(1000).window == 1024
    assert ReplayWindow(32).window == 32


def test_every_packet_once_under_reordering():
    # Two paths: one delivers in order, the other with up to 500 packets of lag,
    # every packet arrives twice: exactly one copy per counter is accepted.
    from mtest import Rng
    rng = Rng(3)
    w = ReplayWindow(1024)
    arrivals = []  # arrival time * 2**13 + counter, sorted = delivery order
    for n in range(5000):
        arrivals.append(n * 8192 + n)
        arrivals.append((n + rng.below(500)) * 8192 + n)
    arrivals.sort()
    accepted = [a & 8191 for a in arrivals if w.mark(a & 8191)]
    assert len(accepted) == 5000
    assert sorted(accepted) == list(range(5000))


def test_bad_size_is_api_misuse():
    raises(ValueError, ReplayWindow, 0)
    raises(ValueError, ReplayWindow, "1024")
