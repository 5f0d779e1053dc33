"""The package README's example runs as written and meta-trains."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert len(blocks) == 1
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    history = namespace["history"]
    assert len(history.steps) == 20 and [e.meta_step for e in history.evaluations] == [10, 20]
    assert set(namespace["adapted"].params) == {n for n, _ in namespace["net"].named_parameters()}
