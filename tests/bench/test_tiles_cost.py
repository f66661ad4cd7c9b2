"""The cost scripts of the tree (``python -m bench.proofs``, ``python -m bench.verify_roots``)
run and measure what they say."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.journal import verify
from bench.proofs import measure
from bench.verify_roots import measure as measure_verify


def test_cost_script_runs_on_a_small_log(tmp_path: Path) -> None:
    figures = measure(3000, tmp_path, probes=20)
    assert figures["leaves"] == 3000
    for key in ("append_us_per_leaf", "inclusion_ms_mean", "consistency_ms_mean"):
        assert figures[key] > 0
    assert (tmp_path / "synced").read_text() == "3000\n"


def test_verify_cost_script_runs_on_a_small_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(verify, "PARALLEL_BYTES", verify.PARALLEL_BYTES)  # restored after
    figures = measure_verify(tmp_path / "data", 2500)
    assert figures["entries"] == 2500
    for way in ("chain", "inline", "parallel"):
        assert figures[way]["entries_per_s"] > 0
    assert figures["parallel"]["cpu_children_s"] > 0  # the roots came from a second process
