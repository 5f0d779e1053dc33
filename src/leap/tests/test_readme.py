"""The Leap page's code examples (docs/algorithms/leap.md) run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[3] / "docs" / "algorithms" / "leap.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_both_examples():
    assert len(BLOCKS) == 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    namespace: dict = {}
    exec(compile(BLOCKS[index], f"{README}:block{index}", "exec"), namespace)
    if "learner" in namespace:
        assert namespace["result"].num_tasks == 1
    else:
        assert all(p.grad is None for p in namespace["leap"].parameters())
