"""The cost scripts of the tree (``python -m bench.proofs``, ``python -m bench.verify_roots``)
run and measure what they say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from actors.journal import verify
from bench.proofs import measure
from bench.proofs_store import measure as measure_store
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


def test_store_cost_script_runs_on_a_small_log(tmp_path: Path) -> None:
    figures = measure_store(tmp_path / "data", 3000, 7, 20)
    assert (figures["entries"], figures["tenants"]) == (3000, 7)
    assert 8 <= figures["trail_index_bytes_per_entry"] < 200
    for call in ("inclusion_proof", "consistency_proof", "trail_page_of_100"):
        assert figures[call]["cpu_ms_mean"] > 0


def test_the_build_without_the_tree_runs_the_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.without_tree", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout.startswith("vm-tenant ")
