"""Builds a ``metazoo.MetaLearner`` for the Omniglot experiment from a ``--meta_model`` name.

Methods (all through the core interface: ``adapt``, ``meta_step``, ``evaluate``,
``state_dict``):

=============  ===============================================================================
``warp_leap``  ``warpgrad.WarpGrad``: warp blocks after every conv block, initialisation learned
               with the simplified-Leap objective (``meta_kwargs``: ``warp_objective``,
               ``init_objective``)
``leap``       ``leap.LeapLearner`` (``meta_kwargs``: ``norm``, ``loss``, ``stabilizer``)
``reptile``    ``maml.Reptile``
``fomaml``     ``maml.MAML(first_order=True)``
``maml``       ``maml.MAML`` (second order; ``--efficient`` turns on the core's checkpointing)
``imaml``      ``maml.iMAML`` (``meta_kwargs``: ``lam``, ``cg_steps``, ``damping``)
``anil``       ``maml.MAML(frozen=<all but the head>)``
``ft``         ``FineTune`` (below): multi-head pretraining on the meta-training tasks, then a
               fresh head fine-tuned per task
``no``         ``NoMeta`` (below): a fresh random initialisation trained on each task
=============  ===============================================================================

``FineTune`` and ``NoMeta`` live here because they are baselines of this experiment, not
meta-learning algorithms.

Head policy: every method that meta-learns an initialisation meta-learns the head too (the
reference's behaviour for all of them); ``ft`` cannot (its pretraining heads belong to the
training tasks) and starts each task from a zero head; ``no`` starts from a random one.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from model import MultiHeadOmniConv, OmniConv, WarpedOmniConv, multi_head_accuracy, multi_head_loss
from torch import Tensor, nn

import leap
import maml
import metazoo
import warpgrad
from metazoo import Adapted, EvalResult, MetaLearner, MetaStepResult, Task

__all__ = ["METHODS", "FineTune", "LearnerConfig", "NoMeta", "build_learner", "score"]

METHODS = ("warp_leap", "leap", "reptile", "fomaml", "maml", "imaml", "anil", "ft", "no")

_INNER = {"sgd": metazoo.SGD, "adam": metazoo.Adam, "rmsprop": metazoo.RMSprop}
_OUTER = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop}


@dataclass
class LearnerConfig:
    """Everything ``build_learner`` needs (``main.py`` fills it from its flags)."""

    meta_model: str
    classes: int
    num_train_tasks: int = 1
    task_train_steps: int = 100
    task_val_steps: int = 100
    num_layers: int = 4
    num_filters: int = 64
    kernel_size: int = 3
    padding: int = 1
    batch_norm: bool = True
    inner_opt: str = "sgd"
    outer_opt: str = "sgd"
    inner_kwargs: dict[str, Any] = field(default_factory=lambda: {"lr": 0.1})
    outer_kwargs: dict[str, Any] = field(default_factory=lambda: {"lr": 0.1})
    meta_kwargs: dict[str, Any] = field(default_factory=dict)
    warp_layer: str = "3x3"
    warp_kwargs: dict[str, Any] = field(default_factory=dict)
    warp_final_head: bool = False
    bn_mode: str = "batch"
    efficient: bool = False


def _inner_optimizer(cfg: LearnerConfig) -> metazoo.InnerOptimizer:
    if cfg.inner_opt not in _INNER:
        raise ValueError(f"--inner_opt {cfg.inner_opt!r} is not one of {sorted(_INNER)}")
    return _INNER[cfg.inner_opt](**cfg.inner_kwargs)


def _meta_optimizer(cfg: LearnerConfig) -> Callable[[Iterable[nn.Parameter]],
                                                     torch.optim.Optimizer]:
    if cfg.outer_opt not in _OUTER:
        raise ValueError(f"--outer_opt {cfg.outer_opt!r} is not one of {sorted(_OUTER)}")
    cls, kwargs = _OUTER[cfg.outer_opt], dict(cfg.outer_kwargs)
    return lambda params: cls(list(params), **kwargs)


def _net_kwargs(cfg: LearnerConfig) -> dict[str, Any]:
    return {"classes": cfg.classes, "num_layers": cfg.num_layers,
            "num_filters": cfg.num_filters, "kernel_size": cfg.kernel_size,
            "padding": cfg.padding, "batch_norm": cfg.batch_norm}


def _unused(cfg: LearnerConfig, allowed: Sequence[str]) -> None:
    extra = sorted(set(cfg.meta_kwargs) - set(allowed))
    if extra:
        raise ValueError(f"--meta_kwargs {extra} are not options of --meta_model "
                         f"{cfg.meta_model} (allowed: {sorted(allowed)})")


def build_learner(cfg: LearnerConfig) -> MetaLearner:
    """The learner named by ``cfg.meta_model``, built on a freshly initialised network.

    Raises:
        ValueError: for an unknown name or an option the method does not have.
    """
    name = cfg.meta_model
    common = {"criterion": F.cross_entropy, "inner_optimizer": _inner_optimizer(cfg),
              "inner_steps": cfg.task_train_steps, "eval_inner_steps": cfg.task_val_steps,
              "meta_optimizer": _meta_optimizer(cfg), "bn_mode": cfg.bn_mode}
    if name == "warp_leap":
        _unused(cfg, ("warp_objective", "init_objective"))
        if cfg.inner_opt != "sgd" or set(cfg.inner_kwargs) - {"lr", "momentum"}:
            raise ValueError(f"warp_leap adapts with SGD (lr, momentum) from "
                             f"warpgrad.OptimizerParameters; got --inner_opt {cfg.inner_opt} "
                             f"--inner_kwargs {cfg.inner_kwargs}")
        net = WarpedOmniConv(**_net_kwargs(cfg), warp_layer=cfg.warp_layer,
                             warp_final_head=cfg.warp_final_head, warp_kwargs=cfg.warp_kwargs)
        updater = warpgrad.DualUpdater(
            F.cross_entropy, warp_objective=cfg.meta_kwargs.get("warp_objective",
                                                                "stop_gradient"),
            init_objective=cfg.meta_kwargs.get("init_objective", "simplified_leap"),
            bn_mode=cfg.bn_mode)
        params = warpgrad.OptimizerParameters(
            default_lr=float(cfg.inner_kwargs.get("lr", 0.1)),
            default_momentum=float(cfg.inner_kwargs.get("momentum", 0.0)))
        warp = warpgrad.Warp(net, net.adapt_modules(), net.warp_modules(), updater,
                             warpgrad.ReplayBuffer(), optimizer_parameters=params)
        return _WarpGrad(warpgrad.WarpGrad(warp, inner_steps=cfg.task_train_steps,
                                           meta_optimizer=common["meta_optimizer"],
                                           bn_mode=cfg.bn_mode), cfg.task_val_steps)
    if name == "leap":
        _unused(cfg, ("norm", "loss", "stabilizer"))
        return leap.LeapLearner(model=OmniConv(**_net_kwargs(cfg)), **common, **cfg.meta_kwargs)
    if name == "reptile":
        _unused(cfg, ())
        return maml.Reptile(model=OmniConv(**_net_kwargs(cfg)), **common)
    if name in ("maml", "fomaml", "anil"):
        _unused(cfg, ("learn_inner_lr", "per_step_inner_lr", "inner_grad_clip",
                      "backward_grad_clip"))
        frozen = (lambda n: not n.startswith("head.")) if name == "anil" else None
        return maml.MAML(model=OmniConv(**_net_kwargs(cfg)), **common,
                         first_order=name == "fomaml", frozen=frozen,
                         checkpoint=True if cfg.efficient else None, **cfg.meta_kwargs)
    if name == "imaml":
        _unused(cfg, ("lam", "cg_steps", "damping", "inner_grad_clip"))
        return maml.iMAML(model=OmniConv(**_net_kwargs(cfg)), **common, **cfg.meta_kwargs)
    if name == "ft":
        _unused(cfg, ())
        return FineTune(model=MultiHeadOmniConv(**_net_kwargs(cfg),
                                                num_heads=cfg.num_train_tasks),
                        eval_model=OmniConv(**_net_kwargs(cfg)), **common)
    if name == "no":
        _unused(cfg, ())
        common.pop("inner_steps")
        return NoMeta(model=OmniConv(**_net_kwargs(cfg)), **common)
    raise ValueError(f"--meta_model {name!r} is not one of {list(METHODS)} (warp_maml is not "
                     "available: warpgrad.WarpGrad has no MAML init objective)")


class _WarpGrad(MetaLearner):
    """``warpgrad.WarpGrad`` with a default number of evaluation steps (it has none)."""

    def __init__(self, inner: warpgrad.WarpGrad, eval_inner_steps: int) -> None:
        self.inner = inner
        self.model = inner.model
        self.meta_optimizer = inner.meta_optimizer
        self.bn_mode = inner.bn_mode
        self.eval_inner_steps = eval_inner_steps

    def named_meta_parameters(self):  # type: ignore[no-untyped-def]
        return self.inner.named_meta_parameters()

    def adapt(self, task: Task, *, steps: int | None = None) -> Adapted:
        return self.inner.adapt(task, steps=self.eval_inner_steps if steps is None else steps)

    def meta_backward(self, tasks: Sequence[Task]) -> MetaStepResult:
        return self.inner.meta_backward(tasks)

    def evaluate(self, tasks: Sequence[Task], *, steps: int | None = None) -> EvalResult:
        return self.inner.evaluate(tasks,
                                   steps=self.eval_inner_steps if steps is None else steps)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(state)


def scoring_model(learner: MetaLearner) -> nn.Module:
    """The module that ``learner.adapt``'s parameters belong to."""
    return getattr(learner, "eval_model", learner.model)


def score(learner: MetaLearner, adapted: Adapted, batch: tuple[Tensor, Tensor]
          ) -> tuple[float, float]:
    """``(loss, accuracy)`` of an adapted model on ``batch`` (cross-entropy, no gradient)."""
    x, y = batch
    with torch.no_grad():
        out, _ = metazoo.forward(scoring_model(learner), adapted.params, adapted.buffers, x,
                                 bn_mode=getattr(learner, "bn_mode", "batch"), training=False)
        acc = metazoo.accuracy(out, y)
        return float(F.cross_entropy(out, y)), float("nan") if acc is None else float(acc)


def _fine_tune(module: nn.Module, params: dict[str, Tensor], optimizer: metazoo.InnerOptimizer,
               task: Task, steps: int, bn_mode: str) -> Adapted:
    loss_fn = metazoo.make_loss_fn(module, F.cross_entropy, bn_mode=bn_mode)
    with torch.no_grad():
        result = metazoo.unroll(loss_fn, params, optimizer, list(task.support), steps=steps,
                                buffers=metazoo.initial_buffers(module, bn_mode))
    return Adapted({n: p.detach() for n, p in result.params.items()}, result.buffers,
                   tuple(result.losses.tolist()))


def _evaluate(learner: MetaLearner, tasks: Sequence[Task], steps: int | None) -> EvalResult:
    per_task = [score(learner, learner.adapt(t, steps=steps), t.query) for t in tasks]
    losses = [p[0] for p in per_task]
    accs = [p[1] for p in per_task]
    return EvalResult(sum(losses) / len(losses), sum(accs) / len(accs), (), len(tasks),
                      tuple(per_task))


class FineTune(MetaLearner):
    """Multi-head pretraining on the meta-training tasks, then fine-tuning a fresh head.

    A "meta-step" trains the shared body and each task's own head jointly for ``inner_steps``
    optimizer steps (step k on every task's support batch k, one forward pass over all of
    them); meta-training tasks' targets are ``head * classes + label`` (``multi_head = True``
    tells ``main.py`` to encode them). ``adapt`` copies the body into a single-head network with
    a zero head and trains all of it with the inner optimizer.
    """

    multi_head = True

    def __init__(self, *, model: MultiHeadOmniConv, eval_model: OmniConv,
                 criterion: Callable[[Tensor, Tensor], Tensor],
                 inner_optimizer: metazoo.InnerOptimizer, inner_steps: int,
                 eval_inner_steps: int, meta_optimizer: Callable[..., torch.optim.Optimizer],
                 bn_mode: str = "batch") -> None:
        if not isinstance(model, MultiHeadOmniConv):
            raise ValueError(f"model must be a MultiHeadOmniConv, got {type(model).__name__}")
        del criterion  # the pretraining loss is the multi-head cross-entropy
        self.model = model
        self.eval_model = eval_model
        self.inner_optimizer = inner_optimizer
        self.inner_steps = inner_steps
        self.eval_inner_steps = eval_inner_steps
        self.bn_mode = str(metazoo.BatchNormMode(bn_mode))
        self.meta_optimizer = meta_optimizer(self.model.parameters())

    def _loss(self, tasks: Sequence[Task], k: int) -> Tensor:
        x = torch.cat([t.support[k % len(t.support)][0] for t in tasks])
        y = torch.cat([t.support[k % len(t.support)][1] for t in tasks])
        return multi_head_loss(self.model(x), y)

    def meta_backward(self, tasks: Sequence[Task]) -> MetaStepResult:
        """Gradient of the mean multi-head loss on every task's first support batch."""
        start = time.perf_counter()
        self.model.train()
        loss = self._loss(tasks, 0)
        loss.backward()
        return MetaStepResult(float(loss), float(loss), None, (float(loss),), len(tasks),
                              time.perf_counter() - start)

    def meta_step(self, tasks: Sequence[Task], *, grad_hook: Any = None) -> MetaStepResult:
        """``inner_steps`` pretraining updates; ``grad_hook`` runs before each."""
        if not tasks:
            raise ValueError("meta_step needs at least one task")
        start = time.perf_counter()
        self.model.train()
        losses = []
        for k in range(self.inner_steps):
            self.meta_optimizer.zero_grad(set_to_none=True)
            loss = self._loss(tasks, k)
            loss.backward()
            if grad_hook is not None:
                grad_hook(self)
            self.meta_optimizer.step()
            losses.append(loss.detach())
        with torch.no_grad():
            x = torch.cat([t.query[0] for t in tasks])
            y = torch.cat([t.query[1] for t in tasks])
            out = self.model(x)
            query_loss, query_acc = multi_head_loss(out, y), multi_head_accuracy(out, y)
        curve = tuple(torch.stack(losses).tolist())
        return MetaStepResult(float(query_loss), curve[-1], float(query_acc), curve, len(tasks),
                              time.perf_counter() - start)

    def adapt(self, task: Task, *, steps: int | None = None) -> Adapted:
        """Body from pretraining, a zero head, ``steps`` inner steps on the task."""
        body = {n: p.detach() for n, p in self.model.named_parameters()
                if not n.startswith("heads.")}
        params = {n: body[n].clone() if n in body else torch.zeros_like(p)
                  for n, p in self.eval_model.named_parameters()}
        missing = sorted(n for n in body if n not in params)
        if missing:
            raise RuntimeError(f"eval_model lacks body parameters {missing}")
        return _fine_tune(self.eval_model, params, self.inner_optimizer, task,
                          self.eval_inner_steps if steps is None else steps, self.bn_mode)

    def evaluate(self, tasks: Sequence[Task], *, steps: int | None = None) -> EvalResult:
        return _evaluate(self, tasks, steps)


class NoMeta(MetaLearner):
    """No meta-learning: each task trains a freshly initialised network (global torch RNG).

    ``meta_learns = False`` tells ``main.py`` to skip meta-training; ``meta_backward`` adapts
    and scores the tasks but writes no gradient.
    """

    meta_learns = False

    def __init__(self, *, model: nn.Module, criterion: Callable[[Tensor, Tensor], Tensor],
                 inner_optimizer: metazoo.InnerOptimizer, eval_inner_steps: int,
                 meta_optimizer: Callable[..., torch.optim.Optimizer],
                 bn_mode: str = "batch") -> None:
        del criterion
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.eval_inner_steps = eval_inner_steps
        self.bn_mode = str(metazoo.BatchNormMode(bn_mode))
        self.meta_optimizer = meta_optimizer(self.model.parameters())

    def _fresh(self) -> dict[str, Tensor]:
        net = copy.deepcopy(self.model)
        for m in net.modules():
            if m is not net and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        return {n: p.detach() for n, p in net.named_parameters()}

    def adapt(self, task: Task, *, steps: int | None = None) -> Adapted:
        return _fine_tune(self.model, self._fresh(), self.inner_optimizer, task,
                          self.eval_inner_steps if steps is None else steps, self.bn_mode)

    def meta_backward(self, tasks: Sequence[Task]) -> MetaStepResult:
        start = time.perf_counter()
        result = _evaluate(self, tasks, None)
        return MetaStepResult(result.loss, float("nan"), result.accuracy, (), len(tasks),
                              time.perf_counter() - start)

    def evaluate(self, tasks: Sequence[Task], *, steps: int | None = None) -> EvalResult:
        return _evaluate(self, tasks, steps)
