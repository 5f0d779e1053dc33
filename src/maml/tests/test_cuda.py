"""Device handling of MAML (and its variants), Reptile and iMAML.

On a CPU: every learner's meta-step, adaptation and evaluation under ``metazoo.strict_devices``,
which fails where a GPU run would mix host and device tensors. On a GPU (``pytest -m cuda``):
a float64 meta-step on CUDA whose meta-gradient and adapted parameters equal the CPU ones.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metazoo
from maml import MAML, Reptile, iMAML
from metazoo.testing import (
    assert_same_meta_step,
    image_tasks,
    meta_step_snapshot,
    small_conv_net,
    strict_meta_step,
    tasks_to,
)


def _sgd(lr: float) -> Callable[..., torch.optim.Optimizer]:
    return lambda params: torch.optim.SGD(params, lr=lr)


LEARNERS: dict[str, Callable[[nn.Module], metazoo.MetaLearner]] = {
    "maml": lambda m: MAML(model=m, criterion=F.cross_entropy, inner_optimizer=metazoo.SGD(0.3),
                           inner_steps=3, meta_optimizer=_sgd(0.1)),
    "maml_checkpoint": lambda m: MAML(model=m, criterion=F.cross_entropy,
                                      inner_optimizer=metazoo.SGD(0.3, momentum=0.5),
                                      inner_steps=4, checkpoint=2, meta_optimizer=_sgd(0.1)),
    "maml_channels_last": lambda m: MAML(model=m, criterion=F.cross_entropy,
                                         inner_optimizer=metazoo.SGD(0.3), inner_steps=2,
                                         channels_last=True, meta_optimizer=_sgd(0.1)),
    "fomaml": lambda m: MAML(model=m, criterion=F.cross_entropy, first_order=True,
                             inner_optimizer=metazoo.Adam(0.05), inner_steps=3,
                             meta_optimizer=_sgd(0.1)),
    "meta_sgd": lambda m: MAML(model=m, criterion=F.cross_entropy,
                               inner_optimizer=metazoo.SGD(0.3), inner_steps=2,
                               learn_inner_lr="per_element", meta_optimizer=_sgd(0.1)),
    "maml++": lambda m: MAML(model=m, criterion=F.cross_entropy,
                             inner_optimizer=metazoo.SGD(0.3), inner_steps=3,
                             learn_inner_lr="per_tensor", per_step_inner_lr=True,
                             multi_step_weights=[0.2, 0.3, 0.5], inner_grad_clip=10.0,
                             backward_grad_clip=10.0, meta_optimizer=_sgd(0.1)),
    "anil": lambda m: MAML(model=m, criterion=F.cross_entropy, inner_optimizer=metazoo.SGD(0.3),
                           inner_steps=2, frozen=lambda n: not n.startswith("5."),
                           meta_optimizer=_sgd(0.1)),
    "zero_head": lambda m: MAML(model=m, criterion=F.cross_entropy,
                                inner_optimizer=metazoo.SGD(0.3), inner_steps=2,
                                zero_head=["5.weight", "5.bias"], meta_optimizer=_sgd(0.1)),
    "reptile": lambda m: Reptile(model=m, criterion=F.cross_entropy,
                                 inner_optimizer=metazoo.SGD(0.3), inner_steps=3,
                                 meta_optimizer=_sgd(0.5)),
    "reptile_running_bn": lambda m: Reptile(model=m, criterion=F.cross_entropy,
                                            inner_optimizer=metazoo.SGD(0.3), inner_steps=3,
                                            bn_mode="running", meta_optimizer=_sgd(0.5)),
    "imaml": lambda m: iMAML(model=m, criterion=F.cross_entropy, lam=1.0, cg_steps=3,
                             inner_optimizer=metazoo.SGD(0.3), inner_steps=3,
                             meta_optimizer=_sgd(0.1)),
}


@pytest.mark.parametrize("name", LEARNERS)
def test_meta_step_never_mixes_host_and_device_tensors(name):
    model = small_conv_net()
    result, evaluation = strict_meta_step(lambda: LEARNERS[name](model), image_tasks())
    assert result.num_tasks == 2 and evaluation.num_tasks == 2


@pytest.mark.cuda
@pytest.mark.parametrize("name", LEARNERS)
def test_float64_meta_step_on_cuda_equals_cpu(name):
    snapshots = [meta_step_snapshot(LEARNERS[name](small_conv_net().to(device)),
                                    tasks_to(image_tasks(), device)) for device in ("cpu", "cuda")]
    assert_same_meta_step(snapshots[1], snapshots[0], tol=1e-10)


@pytest.mark.cuda
@pytest.mark.parametrize("vectorize", [False, True])
@pytest.mark.parametrize("name", ["maml", "fomaml", "reptile", "imaml"])
def test_a_meta_step_on_cuda_synchronises_once(name, vectorize):
    """What the CPU counts (``count_host_syncs``, issue 26 item 3), CUDA's own sync detector
    confirms: a meta-step waits for the device once (the read of the fault flags, the means and
    the step's finite check), however many tasks."""
    import warnings

    model = small_conv_net().to("cuda")
    learner = LEARNERS[name](model)
    learner.vectorize = vectorize
    tasks = tasks_to(image_tasks(4), "cuda")
    learner.meta_step(tasks)  # warm-up: cuDNN's algorithm choice may synchronise
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            learner.meta_step(tasks)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs
