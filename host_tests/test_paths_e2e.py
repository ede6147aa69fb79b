"""Issue 5 scenarios with real processes (tools/path_scenarios.py): bounds
that hold on a shared 2-core machine; tools/bench_paths.py prints the
figures themselves."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import path_scenarios as sc  # noqa: E402


@pytest.mark.long      # ~16 s; make test keeps the blackhole and PoP-kill scenarios
def test_critical_over_two_paths_with_10_percent_loss(tmp_path):
    r = sc.scenario_loss10_critical(tmp_path, count=1000, interval=10)
    assert r["duplicates_delivered"] == 0, r
    assert r["delivered_ratio"] >= 0.975, r       # theory 0.99; issue figure 0.985 (bench)
    assert r["handshakes"] == 1


def test_blackhole_critical_loses_nothing_best_effort_back_within_1s(tmp_path):
    r = sc.scenario_blackhole(tmp_path)
    assert r["critical_lost"] == 0, r
    assert r["best_effort_gap_ms"] <= 1000, r
    assert r["handshakes"] == 1, r
    assert dict((n, s) for n, s, _ in r["paths"])["a"] == "down"


def test_pop_killed_and_restarted(tmp_path):
    r = sc.scenario_pop_kill(tmp_path)
    assert r["critical_lost"] == 0, r
    assert r["best_effort_gap_ms"] <= 1000, r
    assert r["handshakes"] == 1, r
    assert dict((n, s) for n, s, _ in r["paths"])["a"] == "up"     # came back after the restart


def test_source_address_change_keeps_the_session(tmp_path):
    r = sc.scenario_rebind(tmp_path)
    assert r["rebind_at_id"] is not None
    assert r["up_lost"] == 0, r
    assert r["replies_lost_after_rebind"] <= 2, r      # only what was in flight to the old port
    assert r["handshakes"] == 1, r


@pytest.mark.long      # ~40 s of a link degrading step by step
def test_adaptive_degrading_path(tmp_path):
    r = sc.adaptive_pair(tmp_path)
    assert r["delivered_ratio"] >= 0.97, r            # issue figure 0.98 (bench)
    assert r["extra_bytes_ratio"] < 0.20, r
    assert r["handshakes"] == 1


def test_route_respliced_under_load_loses_nothing(tmp_path):
    r = sc.scenario_resplice(tmp_path)
    assert r["up_lost"] == 0 and r["replies_lost"] == 0, r
    assert r["a3_forwarded"] > 50, r              # traffic really moved to the new PoP
    assert r["handshakes"] == 1
    assert not r["device_config_changed"]         # the device needs no new config
