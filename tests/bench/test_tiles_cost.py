"""The cost script of the tree (``python -m bench.proofs``) runs and measures what it says."""

from __future__ import annotations

from pathlib import Path

from bench.proofs import measure


def test_cost_script_runs_on_a_small_log(tmp_path: Path) -> None:
    figures = measure(3000, tmp_path, probes=20)
    assert figures["leaves"] == 3000
    for key in ("append_us_per_leaf", "inclusion_ms_mean", "consistency_ms_mean"):
        assert figures[key] > 0
    assert (tmp_path / "synced").read_text() == "3000\n"
