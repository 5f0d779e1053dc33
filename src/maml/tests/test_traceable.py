"""The vectorized meta-batch function traces as one Dynamo graph (issue 26, item 5).

``metazoo.forward`` swaps no module attribute (BatchNorm calls are routed by a
``TorchFunctionMode``), and nothing in the mapped function branches on tensor values, so
``torch.compile(fullgraph=True)`` of ``vmap(grad_and_value(objective))`` succeeds; with the eager
backend it reproduces the uncompiled meta-gradients in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor
from torch.func import grad_and_value, vmap

import metazoo
from maml import MAML
from maml import _vectorized as vectorized
from metazoo.testing import image_tasks, small_conv_net


def per_meta_batch(bn_mode: str):
    learner = MAML(model=small_conv_net(), criterion=F.cross_entropy,
                   inner_optimizer=metazoo.SGD(0.4), inner_steps=2, vectorize=True,
                   bn_mode=bn_mode)
    support, query = metazoo.vectorize.stack_tasks(image_tasks(3))
    params = vectorized._model_params(learner)

    def objective(inputs: list[Tensor], support: list[metazoo.Batch], query: metazoo.Batch
                  ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        meta = vectorized.MetaInputs(dict(zip(params, inputs)), learner.inner_optimizer)
        value, loss, _, inner = learner._task_objective(metazoo.Task(support, query), meta)
        return value, (inner, loss)

    def run(inputs: list[Tensor], support: list[metazoo.Batch], query: metazoo.Batch) -> object:
        with metazoo.closed_form_batch_norm():
            return vmap(grad_and_value(objective, has_aux=True), in_dims=(None, 0, 0))(
                inputs, support, query)

    return run, ([p.detach() for p in params.values()], support, query)


@pytest.mark.parametrize("bn_mode", ["batch", "running"])
def test_vectorized_meta_batch_compiles_without_graph_breaks(bn_mode: str) -> None:
    torch._dynamo.reset()
    run, args = per_meta_batch(bn_mode)
    explanation = torch._dynamo.explain(run)(*args)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    compiled = torch.compile(run, backend="eager", fullgraph=True)
    for got, want in zip(pytree.tree_leaves(compiled(*args)), pytree.tree_leaves(run(*args)),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch._dynamo.reset()


def test_forward_changes_no_module_attribute() -> None:
    net = small_conv_net()
    before = {name: dict(vars(m)) for name, m in net.named_modules()}
    params = metazoo.params_of(net)
    for mode in ("batch", "running"):
        buffers = metazoo.initial_buffers(net, mode)
        metazoo.forward(net, params, buffers, torch.randn(4, 1, 8, 8, dtype=torch.float64),
                        bn_mode=mode)
    after = {name: dict(vars(m)) for name, m in net.named_modules()}
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].keys() == after[name].keys(), name
