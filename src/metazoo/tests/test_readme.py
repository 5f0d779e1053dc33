"""The README's core example runs as written and produces a meta-gradient."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[3] / "README.md"


def test_readme_core_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    example = next(b for b in blocks if "metazoo.unroll" in b)
    namespace: dict = {}
    exec(compile(example, str(README), "exec"), namespace)
    grads = [p.grad for p in namespace["net"].parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
