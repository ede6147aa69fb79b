"""Tick arithmetic across the wrap, and the randomness source."""
from microtun.ticks import ticks_add, ticks_diff, ticks_min, TICKS_PERIOD, TICKS_MASK
from microtun.rand import random_bytes, random_u32

PORTABLE = True

NEAR_WRAP = TICKS_PERIOD - 1000


def test_ticks_add_wraps():
    for t, d, expect in [
        (0, 5, 5), (NEAR_WRAP, 1000, 0), (NEAR_WRAP, 1500, 500), (3, -5, TICKS_PERIOD - 2),
        (TICKS_MASK, 1, 0),
    ]:
        assert ticks_add(t, d) == expect, (t, d)


def test_ticks_diff_across_wrap():
    for a, b, expect in [
        (5, 3, 2), (3, 5, -2), (ticks_add(NEAR_WRAP, 2000), NEAR_WRAP, 2000),
        (NEAR_WRAP, ticks_add(NEAR_WRAP, 2000), -2000), (0, TICKS_MASK, 1),
    ]:
        assert ticks_diff(a, b) == expect, (a, b)


def test_ticks_min():
    later = ticks_add(NEAR_WRAP, 5000)  # numerically small, but later
    assert ticks_min(NEAR_WRAP, later) == NEAR_WRAP
    assert ticks_min(later, NEAR_WRAP) == NEAR_WRAP
    assert ticks_min(None, 7) == 7
    assert ticks_min(7, None) == 7
    assert ticks_min(None, None) is None


def test_random_bytes():
    a, b = random_bytes(32), random_bytes(32)
    assert len(a) == 32 and len(b) == 32 and a != b
    assert len(random_bytes(0)) == 0
    assert len(random_bytes(100)) == 100
    assert 0 <= random_u32() < 2**32


def test_conditioned_generator():
    from microtun import rand
    out = rand._conditioned_bytes(70)
    assert len(out) == 70 and out != rand._conditioned_bytes(70)
