"""LOOPS with real processes (issue 14): device, PoPs a1 -> a2 with the link
emulator on the segment between them (10 % loss, 40 ms RTT), gateway; NACK
mode repairs the losses, nothing is delivered twice, and the PoPs report the
segment in their stats. Figures: tools/bench_loops.py."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import loops_scenarios as ls  # noqa: E402


@pytest.mark.parametrize("pop_workers", [1, 2])
def test_nack_segment_repairs_loss_end_to_end(tmp_path, pop_workers):
    # pop_workers 2: each PoP a supervisor with two workers; a segment's NACKs come back
    # on its out_label, which the steering must send to the worker holding its packets
    r = ls.run(tmp_path, "nack", imp={"loss": 0.10, "seed": 3}, count=400, interval=5, pop_workers=pop_workers,
               trace=pop_workers == 1)        # seg_trace is a worker's command, not the supervisor's
    eg = [v for k, v in r["segments"].items() if k.startswith("a2/in:") and v["role"] == "egress"][0]
    assert r["netem_dropped_up"] > 20                  # the link really lost packets ...
    assert eg["gaps"] > 20 and eg["recovered_nack"] > 20
    assert r["delivered_ratio"] >= 0.99, r            # ... and the segment repaired them
    assert r["duplicates_delivered"] == 0
    ing = [v for k, v in r["segments"].items() if k.startswith("a1/out:") and v["role"] == "ingress"][0]
    assert 35 <= ing["min_rtt_ms"] <= 80               # RTT by timestamp echo (40 ms emulated)
    assert ing["retransmitted"] <= eg["gaps"] * 2
