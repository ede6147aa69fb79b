"""The LOOPS erasure code (lib/microtun_host/fec.py): its matrix as the
module doc states it, and every erasure pattern it promises to repair.
(test_segment.py has the random-pattern test and the code in use.)"""
import itertools
import math
import random

import pytest

from microtun_host import fec


def _field_parity(row, syms, length):
    """Parity of one matrix row, byte by byte with the field's mul: what
    encode must give whatever its shortcuts."""
    out = bytearray(length)
    for c, s in zip(row, syms):
        for k, v in enumerate(s):
            out[k] ^= fec.mul(c, v)
    return bytes(out)


def test_matrix_is_the_scaled_cauchy_one():
    cauchy = lambda j, i: fec.inv((128 + j) ^ i)             # noqa: E731
    for j in range(fec.M_MAX):
        for i in range(fec.K_MAX):
            e = fec.coef(j, i)
            assert e == fec.mul(fec.mul(cauchy(j, i), cauchy(0, 0)), fec.inv(fec.mul(cauchy(0, i), cauchy(j, 0))))
            assert e != 0
    assert all(fec.coef(0, i) == 1 for i in range(fec.K_MAX))      # parity 0: the plain XOR
    assert all(fec.coef(j, 0) == 1 for j in range(fec.M_MAX))      # symbol 0 enters every parity as it is


def test_encode_is_the_matrix_times_the_symbols():
    rng = random.Random(4)
    for n, m in ((1, 1), (2, 16), (24, 3), (128, 4), (7, 6)):
        syms = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80))) for _ in range(n)]
        length = max(len(s) for s in syms)
        want = [_field_parity([fec.coef(j, i) for i in range(n)], syms, length) for j in range(m)]
        assert fec.encode(syms, m) == want, (n, m)
    big = [bytes(rng.randrange(256) for _ in range(3000)) for _ in range(3)]    # beyond the first masks' 2048 bytes
    assert fec.encode(big, 3) == [_field_parity([fec.coef(j, i) for i in range(3)], big, 3000) for j in range(3)]


def _all_patterns(n, m, syms, pars, length):
    """Erase every set of up to m of the n + m symbols (data and parities):
    whatever stays rebuilds the erased data exactly."""
    padded = [s.ljust(length, b"\0") for s in syms]
    checked = 0
    for e in range(m + 1):
        for gone in itertools.combinations(range(n + m), e):
            have = {i: padded[i] for i in range(n) if i not in gone}
            use = {j: pars[j] for j in range(m) if n + j not in gone}
            got = fec.decode(have, use, n, length)
            assert got == {i: padded[i] for i in range(n) if i in gone}, (n, m, gone)
            checked += 1
    return checked


def test_every_pattern_of_up_to_m_erasures_small_groups():
    rng = random.Random(11)
    total = 0
    for n in range(1, 9):
        for m in range(1, 5):
            syms = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40))) for _ in range(n)]
            length = max(len(s) for s in syms)
            total += _all_patterns(n, m, syms, fec.encode(syms, m), length)
    assert total == sum(math.comb(n + m, e) for n in range(1, 9) for m in range(1, 5) for e in range(m + 1))


def test_every_pattern_of_up_to_3_erasures_default_group():
    rng = random.Random(12)
    syms = [len(x).to_bytes(2, "big") + x for x in
            (bytes(rng.randrange(256) for _ in range(rng.randrange(40, 260))) for _ in range(24))]
    length = max(len(s) for s in syms)
    assert _all_patterns(24, 3, syms, fec.encode(syms, 3), length) == 1 + 27 + 351 + 2925


def test_high_rows_and_columns_rebuild():
    """Patterns far from row and column 0 (the scaled entries): the last
    data symbols of a full 128 lost, rebuilt from the last parities of 16."""
    rng = random.Random(13)
    syms = [bytes(rng.randrange(256) for _ in range(30)) for _ in range(fec.K_MAX)]
    pars = fec.encode(syms, fec.M_MAX)
    for lost, rows in ((range(112, 128), range(16)), (range(120, 128), range(8, 16)), ((0, 64, 127), (3, 9, 15))):
        have = {i: s for i, s in enumerate(syms) if i not in lost}
        got = fec.decode(have, {j: pars[j] for j in rows}, fec.K_MAX, 30)
        assert got == {i: syms[i] for i in lost}


def test_too_many_erasures_and_bad_sizes():
    syms = [bytes([i]) * 10 for i in range(5)]
    pars = fec.encode(syms, 2)
    assert fec.decode({0: syms[0], 1: syms[1]}, {0: pars[0], 1: pars[1]}, 5, 10) is None   # 3 lost, 2 parities
    assert fec.decode({i: s for i, s in enumerate(syms)}, {}, 5, 10) == {}
    for n, m in ((0, 1), (fec.K_MAX + 1, 1), (3, 0), (3, fec.M_MAX + 1)):
        with pytest.raises(ValueError, match="FEC group"):
            fec.encode([b"x"] * n, m)
