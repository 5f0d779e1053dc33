"""``compile=``: the vectorized per-meta-batch function through ``torch.compile`` (issue 26).

Compiled equals eager in float64 (1e-10), and the compiled graph is counted as it runs, so a test
fails if the learner silently ran eagerly. The ``aot_eager`` backend keeps compilation short.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.registry import lookup_backend

import metazoo
from maml import MAML, Reptile, iMAML
from metazoo.testing import (
    assert_same_meta_step,
    image_tasks,
    meta_step_snapshot,
    small_conv_net,
)


class CountingBackend:
    """``aot_eager`` that counts the graphs it compiles and the times they run."""

    def __init__(self) -> None:
        self.graphs = 0
        self.runs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        compiled = lookup_backend("aot_eager")(graph, example_inputs)

        def run(*args: object) -> object:
            self.runs += 1
            return compiled(*args)

        return run


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


BUILDERS = {
    "maml": lambda **kw: MAML(model=small_conv_net(), criterion=F.cross_entropy,
                              inner_optimizer=metazoo.SGD(0.4), inner_steps=2,
                              meta_optimizer=lambda p: torch.optim.SGD(p, lr=0.1), **kw),
    "reptile": lambda **kw: Reptile(model=small_conv_net(), criterion=F.cross_entropy,
                                    inner_optimizer=metazoo.SGD(0.4), inner_steps=2, **kw),
    "imaml": lambda **kw: iMAML(model=small_conv_net(), criterion=F.cross_entropy,
                                inner_optimizer=metazoo.SGD(0.4), inner_steps=2, cg_steps=2,
                                **kw),
}


@pytest.mark.parametrize("name", ["maml", "reptile", "imaml"])
def test_compiled_meta_step_equals_eager_and_runs_compiled(name, caplog):
    tasks = image_tasks(3)
    backend = CountingBackend()
    compiled = BUILDERS[name](vectorize=True, compile={"backend": backend})
    eager = BUILDERS[name](vectorize=True)
    with caplog.at_level(logging.INFO, logger="metazoo.vectorize"):
        got = meta_step_snapshot(compiled, tasks)
    assert backend.graphs >= 1 and backend.runs >= 2  # meta_backward and meta_step ran compiled
    assert any("compiling" in message for message in caplog.messages)
    assert_same_meta_step(got, meta_step_snapshot(eager, tasks))
    runs = backend.runs
    got_eval, want_eval = compiled.evaluate(tasks), eager.evaluate(tasks)
    assert backend.runs > runs  # evaluate's map ran compiled too
    for result in (got_eval, want_eval):
        assert len(result.per_task) == len(tasks)
    got_values = (got_eval.loss, *got_eval.inner_losses, *(x for x, _ in got_eval.per_task))
    want_values = (want_eval.loss, *want_eval.inner_losses, *(x for x, _ in want_eval.per_task))
    for a, b in zip(got_values, want_values, strict=True):
        assert math.isclose(a, b, rel_tol=1e-10, abs_tol=1e-10)


def test_a_second_meta_step_reuses_the_compiled_graph():
    tasks = image_tasks(3)
    backend = CountingBackend()
    learner = BUILDERS["maml"](vectorize=True, compile={"backend": backend})
    learner.meta_step(tasks)
    graphs = backend.graphs
    learner.meta_step(image_tasks(3, seed=5))
    assert backend.graphs == graphs  # same shapes: no recompilation


@pytest.mark.parametrize("kwargs, match", [
    ({"compile": True}, r"compile=True compiles the vectorized meta-batch; pass vectorize=True"),
    ({"compile": {"fullgraph": False}, "vectorize": True}, "torch.compile keywords among"),
    ({"compile": "inductor", "vectorize": True}, "compile must be False, True or a dict"),
])
def test_bad_compile_options_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BUILDERS["maml"](**kwargs)
