"""The launch-count benchmark (benchmarks/launches.py --quick) runs in seconds and counts what it
says: the hand-written loop has no host sync, a learner one per meta-step for its fault
checks, its reported means and its step's finite check together, and the vectorized MAML fewer
kernel ops than its loop."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("maml")
pytest.importorskip("leap")

_SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "launches.py"


def test_quick_table_counts_ops_and_syncs() -> None:
    result = subprocess.run(
        [sys.executable, str(_SCRIPT), "--quick", "--impls", "loop,maml,maml_vectorized"],
        capture_output=True, text=True, check=True, timeout=600)
    rows = {m.group(1): [int(v.replace(",", "")) for v in m.group(2, 3, 4)]
            for m in re.finditer(r"^\| (\w+) \| ([\d,]+) \| ([\d,]+) \| (\d+) \|", result.stdout,
                                 re.MULTILINE)}
    assert set(rows) == {"loop", "maml", "maml_vectorized"}, result.stdout
    assert rows["loop"][2] == 0
    # One transfer per meta-step: the fault flags, the means and the step's finite check.
    assert rows["maml"][2] == 1 and rows["maml_vectorized"][2] == 1
    assert rows["maml_vectorized"][1] < 0.5 * rows["maml"][1]
    assert all(ops > kernel > 0 for ops, kernel, _ in rows.values())


def test_quick_warpgrad_table_counts_copies() -> None:
    """W2 (WarpGrad): the vectorized meta-step dispatches far fewer kernel ops than the loop and
    neither copies the replay buffer's states tensor by tensor (`copies` column)."""
    pytest.importorskip("warpgrad")
    result = subprocess.run(
        [sys.executable, str(_SCRIPT), "--quick", "--impls", "warpgrad,warpgrad_vectorized"],
        capture_output=True, text=True, check=True, timeout=600)
    rows = {m.group(1): [int(v.replace(",", "")) for v in m.group(2, 3, 4, 5)]
            for m in re.finditer(r"^\| (\w+) \| ([\d,]+) \| ([\d,]+) \| (\d+) \| ([\d,]+) \|",
                                 result.stdout, re.MULTILINE)}
    assert set(rows) == {"warpgrad", "warpgrad_vectorized"}, result.stdout
    assert rows["warpgrad_vectorized"][1] < 0.7 * rows["warpgrad"][1]
    assert all(syncs == 1 for _, _, syncs, _ in rows.values()), rows
    # 2 tasks x 2 steps x 18 tensors were copied one by one (72 + 36 more on reading them).
    assert all(copies < 12 for *_, copies in rows.values()), rows
