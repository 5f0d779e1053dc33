"""Warp-MAML: warp layers by the warp (replay) objective, initialisation by MAML's.

Update rule (Flennerhag et al., "Meta-Learning with Warped Gradient Descent", ICLR 2020,
Warp-MAML): with warp parameters phi fixed during adaptation, the initialisation theta0 gets
the MAML meta-gradient d/dtheta0 of the mean query loss after the K warped inner steps (second
order through the unroll, phi static), and phi gets WarpGrad's warp-objective gradient over the
replayed trajectories. It is composed of two learners, unchanged:

* ``warp``: a ``warpgrad.WarpGrad`` whose updater has ``init_objective="none"``; it adapts (from
  ``Warp``'s initialisation tensors) and gives the warp parameters their gradient.
* ``maml``: the registry's ``"maml"`` learner (``metazoo.build_learner``; this package does not
  import the ``maml`` package, so Warp-MAML needs ``metazoo-maml`` installed) over the same
  network with the warp parameters ``frozen`` (static in the unroll). Before each use the
  network's adaptable parameters are set to the initialisation; its meta-gradient on them is
  moved to the initialisation tensors, and what it gives the warp parameters is dropped (they
  keep the warp objective only).

The meta-parameters and the one meta-optimizer are ``warp``'s (warp layers, initialisation), so
each tensor is stepped exactly once; ``maml``'s own meta-optimizer is never stepped. Both adapt
identically (SGD from the initialisation with fixed warp layers), so ``adapt``/``evaluate`` use
``warp``'s.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

import metazoo
from metazoo import Adapted, EvalResult, MetaLearner, MetaStepResult, Task
from warpgrad.learner import WarpGrad

__all__ = ["WarpMAML", "warp_maml"]


class WarpMAML(MetaLearner):
    """Warp-MAML around a ``WarpGrad`` whose updater learns no initialisation.

    Args:
        warp: the ``WarpGrad`` learner (``init_objective="none"``, fixed inner learning rates).
        inner_optimizer: the ``metazoo`` optimizer of the MAML unroll (the same SGD as
            ``warp``'s adaptation; default ``metazoo.SGD`` at ``warp``'s initial rate and
            momentum).
        checkpoint: the MAML unroll's exact checkpointing (``maml.MAML``'s ``checkpoint``).
    """

    def __init__(self, warp: WarpGrad, *, inner_optimizer: metazoo.InnerOptimizer | None = None,
                 checkpoint: metazoo.Checkpoint | int | bool | None = None) -> None:
        if not isinstance(warp, WarpGrad):
            raise ValueError(f"warp must be a warpgrad.WarpGrad, got {type(warp).__name__}")
        if warp.updater.init_objective is not None:
            raise ValueError(f"WarpMAML learns the initialisation with MAML's objective; the "
                             f"WarpGrad updater's init_objective must be 'none', got "
                             f"{warp.updater.init_objective}")
        if warp.warp.learn_optimizer:
            raise ValueError("WarpMAML does not learn inner learning rates (MAML would not see "
                             "them); build it with learn_optimizer=False")
        if inner_optimizer is None:
            rates = warp.warp.optimizer_parameter_container
            inner_optimizer = metazoo.SGD(rates.default_lr, momentum=rates.default_momentum)
        if "maml" not in metazoo.available_learners():
            raise ValueError("Warp-MAML takes its initialisation gradient from the 'maml' "
                             "learner, which is not installed; install metazoo-maml "
                             "(scripts/setup.sh maml warpgrad)")
        self.warp = warp
        self.model = warp.model
        self.meta_optimizer = warp.meta_optimizer
        self.bn_mode = warp.bn_mode
        self.inner_steps = warp.inner_steps
        self.eval_inner_steps = warp.eval_inner_steps
        warp_names = {n for n, _ in warp.warp.named_warp_parameters()}
        # Never stepped: WarpGrad's meta-optimizer owns every tensor (SGD lr 0 has no state).
        self.maml = metazoo.build_learner(
            "maml", model=self.model, criterion=warp.updater.criterion,
            inner_optimizer=inner_optimizer, inner_steps=warp.inner_steps,
            eval_inner_steps=warp.eval_inner_steps, bn_mode=warp.bn_mode,
            frozen=sorted(warp_names), checkpoint=checkpoint,
            meta_optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0),
            on_nonfinite=warp.on_nonfinite, channels_last=warp.channels_last,
            vectorize=warp.vectorize)

    def named_meta_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``warp``'s: warp layers and initialisation."""
        return self.warp.named_meta_parameters()

    def _sync(self) -> dict[str, nn.Parameter]:
        """Copies the initialisation into the network's adaptable parameters."""
        adapt = dict(self.warp.warp.named_adapt_parameters())
        with torch.no_grad():
            for n, p in self.warp.warp.named_init_parameters():
                adapt[n].copy_(p)
        return adapt

    def adapt(self, task: Task, *, steps: int | None = None) -> Adapted:
        """``warp``'s adaptation (default ``eval_inner_steps``)."""
        return self.warp.adapt(task, steps=steps)

    def meta_backward(self, tasks: Sequence[Task]) -> MetaStepResult:
        """MAML meta-gradient into the initialisation, then WarpGrad's warp gradient."""
        tasks = metazoo.check_tasks(tasks)
        adapt = self._sync()
        named = dict(self.model.named_parameters())
        # Keep whatever .grad already holds (meta_backward accumulates); MAML's contribution to
        # the network's own tensors is removed again below.
        saved = {n: None if p.grad is None else p.grad.clone() for n, p in named.items()}
        for p in named.values():
            p.grad = None
        result = self.maml.meta_backward(tasks)
        init = dict(self.warp.warp.named_init_parameters())
        for n, p in adapt.items():
            if p.grad is not None:
                target = init[n]
                target.grad = p.grad.clone() if target.grad is None else target.grad + p.grad
        for n, p in named.items():
            p.grad = saved[n]
        warp_result = self.warp.meta_backward(tasks)
        return MetaStepResult(result.meta_loss, result.inner_loss, result.accuracy,
                              result.inner_losses, result.num_tasks,
                              result.seconds + warp_result.seconds, result.skipped_tasks)

    def evaluate(self, tasks: Sequence[Task], *, steps: int | None = None) -> EvalResult:
        """``warp``'s evaluation (default ``eval_inner_steps``)."""
        return self.warp.evaluate(tasks, steps=steps)

    def state_dict(self) -> dict[str, Any]:
        """``warp``'s state."""
        return self.warp.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict()``."""
        self.warp.load_state_dict(state)
        self._sync()


def warp_maml(*, checkpoint: metazoo.Checkpoint | int | bool | None = None,
              **keywords: Any) -> WarpMAML:
    """Warp-MAML built like every learner: ``WarpGrad``'s keywords (``model``,
    ``warp_modules``, ``criterion``, ``inner_optimizer``, ...) with ``init_objective="none"``,
    plus MAML's ``checkpoint``."""
    if "init_objective" in keywords or "learn_optimizer" in keywords:
        raise ValueError("warp_maml sets init_objective='none' and learn_optimizer=False "
                         "itself (MAML learns the initialisation); drop them")
    if "warp" in keywords:
        raise ValueError("warp_maml builds its own Warp; pass model=, warp_modules=, ... "
                         "or WarpMAML(WarpGrad(warp, ...)) for a prebuilt one")
    warp = WarpGrad(init_objective="none", **keywords)
    inner = keywords.get("inner_optimizer")
    # An OptimizerParameters instance: MAML's unroll takes SGD at its initial rates.
    inner = inner if isinstance(inner, metazoo.InnerOptimizer) else None
    return WarpMAML(warp, inner_optimizer=inner, checkpoint=checkpoint)
