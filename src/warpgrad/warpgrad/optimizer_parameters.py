"""Per-parameter-tensor inner learning rates and momenta, optionally meta-learned.

Each adaptable parameter tensor gets its own scalar learning rate and (when momentum is used)
momentum. They are positive by construction: the stored, optimised quantities are
``log_lr`` (``lr = exp(log_lr)``) and ``momentum_logit`` (``momentum = sigmoid(momentum_logit)``,
so ``0 < momentum < 1``). Nothing is clamped when the values are read, so the value used by the
task learner is exactly the value the meta-gradient was computed for. (The reference clamped
negative values to 1e-6 in place on every read.)

Momentum 0 means plain SGD: no momentum tensor exists and none is learned (a sigmoid cannot
reach 0; the reference silently replaced 0 by 1e-4 when learning).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from metazoo import SGD
from warpgrad.flat import FlatLayout

__all__ = ["OptimizerParameters"]


class OptimizerParameters:
    """Container of the task learner's per-tensor learning rates and momenta.

    Args:
        trainable: meta-learn the learning rates and momenta (they then receive gradients from
            the warp objective and belong to ``Warp.meta_parameters()``).
        default_lr: initial learning rate of every tensor, > 0.
        default_momentum: initial momentum of every tensor, in [0, 1); 0 means no momentum.
    """

    def __init__(self, *, trainable: bool = False, default_lr: float = 0.1,
                 default_momentum: float = 0.0) -> None:
        if (isinstance(default_lr, bool) or not isinstance(default_lr, (int, float))
                or not 0 < default_lr < math.inf):
            raise ValueError(f"default_lr={default_lr!r} must be a finite positive number")
        if not isinstance(default_momentum, (int, float)) or not 0 <= default_momentum < 1:
            raise ValueError(f"default_momentum={default_momentum!r} must be in [0, 1); "
                             "use 0 for plain SGD")
        self._trainable = bool(trainable)
        self.default_lr = float(default_lr)
        self.default_momentum = float(default_momentum)
        self._names: list[str] = []
        self._log_lr: dict[str, nn.Parameter] = {}
        self._momentum_logit: dict[str, nn.Parameter] = {}
        self._template: SGD | None = None
        self._flat_template: SGD | None = None
        # (version counters of the stored tensors, lr values, momentum values) read to the host
        # once for inner_optimizer(detach=True, stacked=True) while they are not learned.
        self._host: tuple[tuple[Any, ...], list[float], list[float]] | None = None

    def init(self, named_parameters: Iterable[tuple[str, Tensor]]) -> None:
        """Creates one learning rate (and momentum) per named tensor, at the defaults."""
        self._names, self._log_lr, self._momentum_logit = [], {}, {}
        self._template = None
        self._host = None
        log_lr = math.log(self.default_lr)
        m = self.default_momentum
        for name, p in named_parameters:
            self._names.append(name)
            self._log_lr[name] = nn.Parameter(
                torch.tensor(log_lr, dtype=p.dtype, device=p.device),
                requires_grad=self._trainable)
            if m > 0:
                self._momentum_logit[name] = nn.Parameter(
                    torch.tensor(math.log(m / (1 - m)), dtype=p.dtype, device=p.device),
                    requires_grad=self._trainable)
        lr = {n: v.detach() for n, v in self.lr.items()}
        momentum = {n: v.detach() for n, v in self.momentum.items()}
        self._template = SGD(lr, momentum=momentum) if momentum else SGD(lr)
        # The flat optimizer's template: one tensor per hyperparameter (values set per call).
        one = torch.ones((), dtype=torch.float64)
        self._flat_template = (SGD(one, momentum=one / 2) if momentum else SGD(one))

    @property
    def names(self) -> list[str]:
        """Names of the parameter tensors covered, in order."""
        return list(self._names)

    @property
    def has_momentum(self) -> bool:
        """Whether the inner optimizer uses momentum."""
        return self.default_momentum > 0

    @property
    def lr(self) -> dict[str, Tensor]:
        """Learning rate of each tensor, ``exp(log_lr)`` (differentiable if trainable)."""
        return {n: p.exp() for n, p in self._log_lr.items()}

    @property
    def momentum(self) -> dict[str, Tensor]:
        """Momentum of each tensor, ``sigmoid(logit)``; empty without momentum."""
        return {n: torch.sigmoid(p) for n, p in self._momentum_logit.items()}

    @property
    def trainable(self) -> bool:
        """Whether learning rates and momenta are meta-learned."""
        return self._trainable

    @trainable.setter
    def trainable(self, trainable: bool) -> None:
        self._trainable = bool(trainable)
        for p in self.parameters():
            p.requires_grad_(self._trainable)

    def parameters(self) -> Iterator[nn.Parameter]:
        """The stored tensors (``log_lr`` then ``momentum_logit``)."""
        for _, p in self.named_parameters():
            yield p

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name + '.log_lr' | '.momentum_logit', tensor)`` pairs."""
        for n, p in self._log_lr.items():
            yield f"{n}.log_lr", p
        for n, p in self._momentum_logit.items():
            yield f"{n}.momentum_logit", p

    def inner_optimizer(self, *, detach: bool = False, stacked: bool = False) -> SGD:
        """The differentiable ``metazoo.SGD`` with these per-tensor hyperparameters.

        Args:
            detach: use detached values (no meta-gradient), e.g. for evaluation.
            stacked: compute all learning rates (and all momenta) in one ``exp`` (``sigmoid``)
                of their stack instead of one per tensor, equal to rounding (the vectorized
                path; the loop keeps the per-tensor form, so its float32 results stay bit for
                bit what they were). With ``detach`` and values that are not learned
                (``trainable=False``), the values are Python floats, read to the host once and
                again only after the stored tensors changed (``load_state_dict``, in-place
                writes): ``metazoo.SGD`` then fuses each parameter's update ``p - lr * d`` into
                one operation.
        """
        if self._template is None:
            raise RuntimeError("OptimizerParameters.init(named_parameters) must run first "
                               "(Warp does it)")
        if stacked and detach and not self._trainable and self._names:
            lr, momentum = self._host_values()
            return SGD(dict(zip(self._names, lr, strict=True)),
                       momentum=dict(zip(self._names, momentum, strict=True))
                       if momentum else 0.0)
        if stacked and self._names:
            tensors = list(torch.stack(list(self._log_lr.values())).exp().unbind())
            if self._momentum_logit:
                tensors += torch.sigmoid(torch.stack(list(self._momentum_logit.values()))
                                         ).unbind()
        else:
            tensors = [*self.lr.values(), *self.momentum.values()]
        if detach:
            tensors = [t.detach() for t in tensors]
        # The template was validated once in init(); swapping its tensor leaves skips the
        # per-call validation, which reads every tensor back to the host (two device syncs
        # per tensor and replayed state on an accelerator). The values are in range by
        # construction.
        optimizer = self._template.with_hyperparameter_tensors(tensors)
        assert isinstance(optimizer, SGD)
        return optimizer

    def _host_values(self) -> tuple[list[float], list[float]]:
        """The learning rates and momenta as floats (one host transfer when they changed)."""
        # A value can only change through an in-place write (which bumps the version counter)
        # or by replacing the tensor's data (a new data pointer or dtype).
        versions = tuple((p._version, p.data_ptr(), p.dtype) for p in self.parameters())
        if self._host is None or self._host[0] != versions:
            values = [torch.stack(list(self._log_lr.values())).exp()]
            if self._momentum_logit:
                values.append(torch.sigmoid(torch.stack(list(self._momentum_logit.values()))))
            both = torch.cat(values).tolist()
            count = len(self._names)
            self._host = (versions, both[:count], both[count:])
        return self._host[1], self._host[2]

    def flat_inner_optimizer(self, layout: FlatLayout, *, detach: bool = False) -> SGD:
        """``inner_optimizer`` for flat states: one SGD over a single tensor in ``layout``.

        Its learning rate (and momentum) is a vector over the flat state, each parameter
        tensor's value repeated over its elements, so one step of a whole state is one
        operation per rule term instead of one per parameter tensor; the rule is
        ``metazoo.SGD``'s, the same as ``inner_optimizer``'s. Step it on ``{"flat": state}``.

        Args:
            layout: the layout of the flat states (its ``names`` must be covered).
            detach: use detached values (no meta-gradient).
        """
        if self._flat_template is None:
            raise RuntimeError("OptimizerParameters.init(named_parameters) must run first "
                               "(Warp does it)")
        missing = sorted(set(layout.names) - set(self._log_lr))
        if missing:
            raise ValueError(f"parameters {missing} have no learning rate; OptimizerParameters "
                             f"covers {self._names}")
        log_lr = torch.stack([self._log_lr[n] for n in layout.names])
        tensors = [layout.spread(log_lr.exp())]
        if self.has_momentum:
            logits = torch.stack([self._momentum_logit[n] for n in layout.names])
            tensors.append(layout.spread(torch.sigmoid(logits)))
        if detach:
            tensors = [t.detach() for t in tensors]
        optimizer = self._flat_template.with_hyperparameter_tensors(tensors)
        assert isinstance(optimizer, SGD)
        return optimizer

    def groups(self, named_parameters: Iterable[tuple[str, Tensor]]) -> list[dict[str, Any]]:
        """``torch.optim`` parameter groups, one per tensor, with its current lr and momentum.

        Args:
            named_parameters: the tensors the task optimizer trains, by the names given to
                ``init``.
        """
        lr, momentum = self.lr, self.momentum
        groups = []
        for name, p in named_parameters:
            if name not in lr:
                raise ValueError(f"parameter {name!r} has no learning rate; OptimizerParameters "
                                 f"covers {self._names}")
            group: dict[str, Any] = {"params": [p], "lr": float(lr[name].item())}
            if self.has_momentum:
                group["momentum"] = float(momentum[name].item())
            groups.append(group)
        return groups

    def state_dict(self) -> dict[str, Tensor]:
        """The stored tensors by name (detached copies)."""
        return {n: p.detach().clone() for n, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restores ``state_dict()`` in place; mismatched names raise."""
        own = dict(self.named_parameters())
        if set(own) != set(state):
            raise ValueError(f"optimizer-parameter state does not match: missing "
                             f"{sorted(set(own) - set(state))}, unexpected "
                             f"{sorted(set(state) - set(own))}")
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(state[n])
        self._host = None

    def __repr__(self) -> str:
        return (f"OptimizerParameters(trainable={self._trainable}, default_lr={self.default_lr}, "
                f"default_momentum={self.default_momentum}, tensors={len(self._names)})")
