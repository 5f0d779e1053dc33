"""Builds a ``metazoo.MetaLearner`` for the Omniglot experiment from a ``--meta_model`` name.

Methods (all through the core interface: ``adapt``, ``meta_step``, ``evaluate``,
``state_dict``); the meta-learners are built by name from the installed packages
(``metazoo.build_learner``, the same names), the baselines ``ft`` and ``no`` here:

=============  ===============================================================================
``warp_leap``  ``warpgrad.WarpGrad``: warp blocks after every conv block, initialisation learned
               with the simplified-Leap objective (``meta_kwargs``: ``warp_objective``,
               ``init_objective``, ``warp_lr``: the warp layers' meta-learning rate)
``warp_maml``  ``warpgrad.WarpMAML``: the same warped net; warp layers learned with the warp
               (replay) objective of ``warpgrad.WarpGrad``, the initialisation with MAML's
               objective (``maml.MAML`` with the warp layers frozen); Flennerhag et al. 2020,
               "Warp-MAML" (``meta_kwargs``: ``warp_objective``, ``warp_lr``)
``leap``       ``leap.LeapLearner`` (``meta_kwargs``: ``norm``, ``loss``, ``stabilizer``)
``reptile``    ``maml.Reptile``
``fomaml``     ``maml.MAML(first_order=True)`` (``maml.fomaml``)
``maml``       ``maml.MAML`` (second order; ``--efficient`` turns on the core's checkpointing)
``imaml``      ``maml.iMAML`` (``meta_kwargs``: ``lam``, ``cg_steps``, ``damping``)
``anil``       ``maml.MAML(frozen=<all but the head>)`` (``maml.anil(head="head")``)
``ft``         ``FineTune`` (below): multi-head pretraining on the meta-training tasks, then a
               fresh head fine-tuned per task
``no``         ``NoMeta`` (below): a fresh random initialisation trained on each task
=============  ===============================================================================

``FineTune`` and ``NoMeta`` live here because they are baselines of this experiment, not
meta-learning algorithms.

Head policy (``LearnerConfig.head_policy``, ``--head_policy``):

* ``"meta"`` (default), one policy for every method: a method that meta-learns an
  initialisation meta-learns the head with it; ``ft`` (whose pretraining heads belong to the
  training tasks) starts each task from a zero head and ``no`` from a fresh random network.
* ``"reference"``, the reference code's per-method behaviour (flennerhag/warpgrad,
  ``src/omniglot``): its ``init_adaptation`` called ``head.reset_parameters()`` before every
  task's adaptation, which the WarpGrad wrapper then overwrote with the meta-learned
  initialisation and ``MAMLWrapper`` never called. So ``warp_leap``, ``maml`` keep a
  meta-learned head; ``leap``, ``reptile``, ``fomaml`` start every task (meta-training and
  evaluation) from a fresh random head, whose meta-gradient is dropped (``RandomHead``); ``no``
  reuses one fixed random body with a fresh random head per task; ``ft`` pretrains one head
  shared by all training tasks (the reference's ``ModuleList([linear] * 50)`` holds one module
  50 times) and starts test tasks from it. Methods the reference lacks keep the default.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import metazoo
from metazoo import Adapted, EvalResult, MetaLearner, MetaStepResult, Task
from model import MultiHeadOmniConv, OmniConv, WarpedOmniConv, multi_head_accuracy, multi_head_loss

__all__ = ["HEAD_POLICIES", "METHODS", "FineTune", "LearnerConfig", "NoMeta", "RandomHead",
           "build_learner", "score"]

METHODS = ("warp_leap", "warp_maml", "leap", "reptile", "fomaml", "maml", "imaml", "anil", "ft",
           "no")

HEAD_POLICIES = ("meta", "reference")

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
    head_policy: str = "meta"
    in_channels: int = 1
    image_size: int = 28
    downsample: str = "pool"
    on_nonfinite: str = "raise"
    channels_last: bool = False
    vectorize: bool | int | str = False
    reptile_inner_state: str = "reset"


VECTORIZE_METHODS = ("maml", "fomaml", "anil", "reptile", "leap", "imaml", "warp_leap",
                     "warp_maml")
CHANNELS_LAST_METHODS = ("warp_leap", "warp_maml", "maml", "fomaml", "anil", "reptile", "leap",
                         "imaml")


def _check_options(flag: str, choice_flag: str, choice: str, cls: type,
                   kwargs: Mapping[str, Any]) -> None:
    """An option that ``cls`` does not take is one line naming it and the accepted ones (the
    constructor's own ``TypeError`` would end the run with a traceback)."""
    accepted = [name for name, p in inspect.signature(cls.__init__).parameters.items()
                if name not in ("self", "params")
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(f"{flag} {', '.join(unknown)}: not an option of {choice_flag} {choice} "
                         f"({cls.__module__}.{cls.__qualname__}); accepted: "
                         f"{', '.join(accepted)}")


def _inner_optimizer(cfg: LearnerConfig) -> metazoo.InnerOptimizer:
    if cfg.inner_opt not in _INNER:
        raise ValueError(f"--inner_opt {cfg.inner_opt!r} is not one of {sorted(_INNER)}")
    _check_options("--inner_kwargs", "--inner_opt", cfg.inner_opt, _INNER[cfg.inner_opt],
                   cfg.inner_kwargs)
    return _INNER[cfg.inner_opt](**cfg.inner_kwargs)


def _outer_class(cfg: LearnerConfig) -> type[torch.optim.Optimizer]:
    if cfg.outer_opt not in _OUTER:
        raise ValueError(f"--outer_opt {cfg.outer_opt!r} is not one of {sorted(_OUTER)}")
    cls = _OUTER[cfg.outer_opt]
    _check_options("--outer_kwargs", "--outer_opt", cfg.outer_opt, cls, cfg.outer_kwargs)
    return cls


def _meta_optimizer(cfg: LearnerConfig) -> Callable[[Iterable[nn.Parameter]],
                                                     torch.optim.Optimizer]:
    cls, kwargs = _outer_class(cfg), dict(cfg.outer_kwargs)
    return lambda params: cls(list(params), **kwargs)


def _warp_meta_optimizer(cfg: LearnerConfig, warp_params: Sequence[nn.Parameter]
                         ) -> Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]:
    """``--outer_opt`` for a warped learner: with ``--meta_kwargs warp_lr X`` two parameter
    groups, the warp parameters at lr X and every other meta-parameter at ``--outer_kwargs``'s
    (other hyperparameters shared); without it one group, as for every other method."""
    if "warp_lr" not in cfg.meta_kwargs:
        return _meta_optimizer(cfg)
    warp_lr = cfg.meta_kwargs["warp_lr"]
    if isinstance(warp_lr, bool) or not isinstance(warp_lr, (int, float)) or not (
            0 < warp_lr < math.inf):
        raise ValueError(f"--meta_kwargs warp_lr {warp_lr!r}: must be a finite number > 0, "
                         f"e.g. --meta_kwargs warp_lr 0.01")
    if not warp_params:
        raise ValueError(f"--meta_kwargs warp_lr {warp_lr}: --warp_layer {cfg.warp_layer} has no "
                         f"warp parameters to give it; drop warp_lr or use another --warp_layer")
    cls, kwargs = _outer_class(cfg), dict(cfg.outer_kwargs)
    warp_ids = {id(p) for p in warp_params}

    def build(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        params = list(params)
        return cls([{"params": [p for p in params if id(p) in warp_ids], "lr": float(warp_lr)},
                    {"params": [p for p in params if id(p) not in warp_ids]}], **kwargs)
    return build


def _net_kwargs(cfg: LearnerConfig) -> dict[str, Any]:
    return {"classes": cfg.classes, "num_layers": cfg.num_layers,
            "num_filters": cfg.num_filters, "kernel_size": cfg.kernel_size,
            "padding": cfg.padding, "batch_norm": cfg.batch_norm,
            "in_channels": cfg.in_channels, "image_size": cfg.image_size,
            "downsample": cfg.downsample}


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
    if cfg.head_policy not in HEAD_POLICIES:
        raise ValueError(f"--head_policy {cfg.head_policy!r} is not one of {list(HEAD_POLICIES)}")
    reference = cfg.head_policy == "reference"
    metazoo.check_on_nonfinite(cfg.on_nonfinite)
    if cfg.on_nonfinite != "raise" and name in ("ft", "no"):
        raise ValueError(f"--on_nonfinite {cfg.on_nonfinite} is not supported by --meta_model "
                         f"{name} (it has no per-task meta-objective to skip); use raise")
    # ft and no have no per-task check: the experiment loop stops on a non-finite meta-loss.
    nonfinite = {} if name in ("ft", "no") else {"on_nonfinite": cfg.on_nonfinite}
    if cfg.channels_last and name not in CHANNELS_LAST_METHODS:
        raise ValueError(f"--channels_last is supported by --meta_model "
                         f"{', '.join(CHANNELS_LAST_METHODS)}, not {name}; drop the flag")
    layout = {"channels_last": cfg.channels_last}
    if cfg.vectorize is not False and name not in VECTORIZE_METHODS:
        raise ValueError(f"--vectorize is supported by --meta_model "
                         f"{', '.join(VECTORIZE_METHODS)}, not {name}; drop the flag")
    vectorize = {} if name not in VECTORIZE_METHODS else {"vectorize": cfg.vectorize}
    if cfg.reptile_inner_state != "reset" and name != "reptile":
        raise ValueError(f"--reptile_inner_state {cfg.reptile_inner_state} is an option of "
                         f"--meta_model reptile, not {name}; drop the flag")
    common = {"criterion": F.cross_entropy, "inner_optimizer": _inner_optimizer(cfg),
              "inner_steps": cfg.task_train_steps, "eval_inner_steps": cfg.task_val_steps,
              "meta_optimizer": _meta_optimizer(cfg), "bn_mode": cfg.bn_mode}
    # The meta-learners come from the installed packages by name (metazoo.build_learner); only
    # the experiment's own baselines (ft, no) and head policy live here.
    if name in ("warp_leap", "warp_maml"):
        _unused(cfg, ("warp_objective", "init_objective", "warp_lr") if name == "warp_leap"
                else ("warp_objective", "warp_lr"))
        if cfg.inner_opt != "sgd" or set(cfg.inner_kwargs) - {"lr", "momentum"}:
            raise ValueError(f"{name} adapts with SGD (lr, momentum) from "
                             f"warpgrad.OptimizerParameters; got --inner_opt {cfg.inner_opt} "
                             f"--inner_kwargs {cfg.inner_kwargs}")
        if cfg.vectorize is not False and cfg.bn_mode != "batch":
            raise ValueError(f"--vectorize with --meta_model {name} needs --bn_mode batch (the "
                             f"replay maps states with batch statistics); drop --vectorize or "
                             f"--bn_mode {cfg.bn_mode}")
        net = WarpedOmniConv(**_net_kwargs(cfg), warp_layer=cfg.warp_layer,
                             warp_final_head=cfg.warp_final_head, warp_kwargs=cfg.warp_kwargs)
        warp_modules = net.warp_modules()
        objectives = {"warp_objective": cfg.meta_kwargs.get("warp_objective", "stop_gradient")}
        if name == "warp_leap":
            objectives["init_objective"] = cfg.meta_kwargs.get("init_objective",
                                                               "simplified_leap")
        else:
            objectives["checkpoint"] = True if cfg.efficient else None
        return metazoo.build_learner(
            name, model=net, warp_modules=warp_modules, adapt_modules=net.adapt_modules(),
            **{**common, "meta_optimizer": _warp_meta_optimizer(
                cfg, [p for m in warp_modules for p in m.parameters()])},
            **objectives, **nonfinite, **layout, **vectorize)
    if name == "leap":
        _unused(cfg, ("norm", "loss", "stabilizer"))
        learner = metazoo.build_learner("leap", model=OmniConv(**_net_kwargs(cfg)), **common,
                                        **cfg.meta_kwargs, **nonfinite, **layout, **vectorize)
        return RandomHead(learner) if reference else learner
    if name == "reptile":
        _unused(cfg, ())
        learner = metazoo.build_learner("reptile", model=OmniConv(**_net_kwargs(cfg)), **common,
                                        **nonfinite, **layout, **vectorize,
                                        inner_state=cfg.reptile_inner_state)
        return RandomHead(learner) if reference else learner
    if name in ("maml", "fomaml", "anil"):
        _unused(cfg, ("learn_inner_lr", "per_step_inner_lr", "inner_grad_clip",
                      "backward_grad_clip"))
        head = {"head": "head"} if name == "anil" else {}
        learner = metazoo.build_learner(name, model=OmniConv(**_net_kwargs(cfg)), **common,
                                        checkpoint=True if cfg.efficient else None, **head,
                                        **cfg.meta_kwargs, **nonfinite, **layout, **vectorize)
        return RandomHead(learner) if reference and name == "fomaml" else learner
    if name == "imaml":
        _unused(cfg, ("lam", "cg_steps", "damping", "inner_grad_clip"))
        return metazoo.build_learner("imaml", model=OmniConv(**_net_kwargs(cfg)), **common,
                                     **cfg.meta_kwargs, **nonfinite, **layout, **vectorize)
    if name == "ft":
        _unused(cfg, ())
        return FineTune(model=MultiHeadOmniConv(**_net_kwargs(cfg),
                                                num_heads=1 if reference else cfg.num_train_tasks),
                        eval_model=OmniConv(**_net_kwargs(cfg)), shared_head=reference,
                        **common)
    if name == "no":
        _unused(cfg, ())
        common.pop("inner_steps")
        return NoMeta(model=OmniConv(**_net_kwargs(cfg)), fixed_body=reference, **common)
    raise ValueError(f"--meta_model {name!r} is not one of {list(METHODS)}")


class RandomHead(MetaLearner):
    """The reference's head policy for Leap, Reptile and FOMAML: a random head per task.

    Before each task's adaptation (meta-training and evaluation) the network's ``head`` is
    redrawn with ``reset_parameters()`` (global torch RNG), as the reference's
    ``OmniConv.init_adaptation`` did; the body stays the meta-learned initialisation. Tasks go
    through ``inner`` one at a time so each gets its own head; the meta-gradient of the mean
    (all three objectives are means of per-task terms) is the sum of the per-task gradients
    over the number of tasks. The head's meta-gradient is dropped: its initialisation is never
    used.
    """

    def __init__(self, inner: MetaLearner) -> None:
        head = getattr(inner.model, "head", None)
        if not isinstance(head, nn.Linear):
            raise ValueError(f"RandomHead needs a model with a linear .head, got "
                             f"{type(inner.model).__name__}")
        self.inner = inner
        self.model = inner.model
        self.meta_optimizer = inner.meta_optimizer
        self.bn_mode = getattr(inner, "bn_mode", "batch")

    def named_meta_parameters(self):  # type: ignore[no-untyped-def]
        return self.inner.named_meta_parameters()

    def draw_head(self) -> None:
        """Redraws the head in place, as ``nn.Linear.reset_parameters`` initialises it."""
        with torch.no_grad():
            self.model.head.reset_parameters()

    def adapt(self, task: Task, *, steps: int | None = None) -> Adapted:
        self.draw_head()
        return self.inner.adapt(task, steps=steps)

    def meta_backward(self, tasks: Sequence[Task]) -> MetaStepResult:
        if not tasks:
            raise ValueError("meta_backward needs at least one task, got an empty list")
        start = time.perf_counter()
        params = [p for _, p in self.named_meta_parameters()]
        saved = [None if p.grad is None else p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        results = []
        for task in tasks:
            self.draw_head()
            results.append(self.inner.meta_backward([task]))
        with torch.no_grad():
            for p, old in zip(params, saved, strict=True):
                new = None if p.grad is None else p.grad / len(tasks)
                p.grad = old if new is None else new if old is None else old + new
        for p in self.model.head.parameters():
            # Never used as an initialisation, so never stepped (None: optimizers skip it).
            p.grad = None
        n = len(results)
        accs = [r.accuracy for r in results]
        curve = tuple(sum(c) / n for c in zip(*(r.inner_losses for r in results), strict=True))
        return MetaStepResult(sum(r.meta_loss for r in results) / n,
                              sum(r.inner_loss for r in results) / n,
                              None if any(a is None for a in accs) else sum(accs) / n,
                              curve, len(tasks), time.perf_counter() - start,
                              sum(r.skipped_tasks for r in results))

    def evaluate(self, tasks: Sequence[Task], *, steps: int | None = None) -> EvalResult:
        if not tasks:
            raise ValueError("evaluate needs at least one task, got an empty list")
        results = []
        for task in tasks:
            self.draw_head()
            results.append(self.inner.evaluate([task], steps=steps))
        n = len(results)
        accs = [r.accuracy for r in results]
        curve = tuple(sum(c) / n for c in zip(*(r.inner_losses for r in results), strict=True))
        return EvalResult(sum(r.loss for r in results) / n,
                          None if any(a is None for a in accs) else sum(accs) / n, curve, n,
                          tuple(r.per_task[0] for r in results))

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
                 bn_mode: str = "batch", shared_head: bool = False) -> None:
        if not isinstance(model, MultiHeadOmniConv):
            raise ValueError(f"model must be a MultiHeadOmniConv, got {type(model).__name__}")
        del criterion  # the pretraining loss is the multi-head cross-entropy
        if shared_head and len(model.heads) != 1:
            raise ValueError(f"shared_head=True needs a MultiHeadOmniConv with num_heads=1, got "
                             f"{len(model.heads)}")
        self.shared_head = shared_head
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
        return multi_head_loss(self.model(x), self._targets(y))

    def _targets(self, y: Tensor) -> Tensor:
        # One shared head: every task's labels go to head 0.
        return y % self.model.classes if self.shared_head else y

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
            # Undone and reported if the gradient or the step is non-finite (as in meta_step).
            metazoo.checked_step(self.meta_optimizer, self.model.named_parameters())
            losses.append(loss.detach())
        with torch.no_grad():
            x = torch.cat([t.query[0] for t in tasks])
            y = self._targets(torch.cat([t.query[1] for t in tasks]))
            out = self.model(x)
            query_loss, query_acc = multi_head_loss(out, y), multi_head_accuracy(out, y)
        curve = tuple(torch.stack(losses).tolist())
        return MetaStepResult(float(query_loss), curve[-1], float(query_acc), curve, len(tasks),
                              time.perf_counter() - start)

    def adapt(self, task: Task, *, steps: int | None = None) -> Adapted:
        """Body from pretraining, a zero head (the shared head with ``shared_head``), ``steps``
        inner steps on the task."""
        body = {n: p.detach() for n, p in self.model.named_parameters()
                if not n.startswith("heads.")}
        if self.shared_head:
            head = self.model.heads[0]
            body.update({"head." + n: p.detach() for n, p in head.named_parameters()})
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

    With ``fixed_body`` (the reference's ``no``) every task starts from the model's own body,
    one fixed random initialisation, and only the head is redrawn per task.

    ``meta_learns = False`` tells ``main.py`` to skip meta-training; ``meta_backward`` adapts
    and scores the tasks but writes no gradient.
    """

    meta_learns = False

    def __init__(self, *, model: nn.Module, criterion: Callable[[Tensor, Tensor], Tensor],
                 inner_optimizer: metazoo.InnerOptimizer, eval_inner_steps: int,
                 meta_optimizer: Callable[..., torch.optim.Optimizer],
                 bn_mode: str = "batch", fixed_body: bool = False) -> None:
        del criterion
        self.fixed_body = fixed_body
        self.model = model
        self.inner_optimizer = inner_optimizer
        self.eval_inner_steps = eval_inner_steps
        self.bn_mode = str(metazoo.BatchNormMode(bn_mode))
        self.meta_optimizer = meta_optimizer(self.model.parameters())

    def _fresh(self) -> dict[str, Tensor]:
        net = copy.deepcopy(self.model)
        # fixed_body: the reference reloaded one fixed random network and then redrew its head.
        for m in [net.head] if self.fixed_body else net.modules():
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
