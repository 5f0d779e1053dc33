"""Differentiable inner-loop optimizers: pure, out of place, optax style.

``state = opt.init(params)`` then ``params, state = opt.step(params, grads, state)``. Nothing is
modified in place, so the whole inner loop stays differentiable and can be recomputed for
gradient checkpointing. Each optimizer reproduces the update of its ``torch.optim`` namesake
(``foreach=False``), including SGD's first-step momentum buffer and Adam's bias correction.

Every hyperparameter may be given as
- a Python float (a constant),
- a tensor (scalar or broadcastable to each parameter) that may require grad, so gradients
  reach it with no extra machinery (Meta-SGD learning rates, WarpGrad's meta-learned momentum),
- a dict from parameter name to float or tensor (per-parameter values),
- a list or tuple of any of the above, indexed by inner step (MAML++ per-step learning rates).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from metazoo.functional import Params

OptState = dict[str, Any]
Hyperparameter = Any  # float | Tensor | Mapping[str, float | Tensor] | Sequence[...]

__all__ = ["SGD", "Adam", "InnerOptimizer", "OptState", "RMSprop", "safe_sqrt"]


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` whose derivative at ``x == 0`` is 0 instead of inf (which becomes NaN).

    Adam and RMSprop take the square root of second-moment estimates that are exactly zero for
    parameters whose gradient is zero; differentiating through the update must not produce NaN.
    The double ``where`` keeps every derivative order finite.
    """
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), 0.0)


# Adam and RMSprop divide by sqrt(second moment) + eps, and the second moment of a parameter
# whose gradients were all exactly zero is zero: eps=0 makes its step 0/0 = NaN.
_EPS_WHY = ("; eps must be > 0 because the step divides by sqrt(second moment) + eps, which "
            "is 0 where every gradient so far was exactly zero (0/0 = NaN); the usual value is "
            "1e-8")


def _is_zero(value: Hyperparameter) -> bool:
    """True only for hyperparameters given as the plain number 0 (a tensor is never 'off')."""
    return isinstance(value, (int, float)) and value == 0


def _validate_number(name: str, value: Hyperparameter, low: float, high: float = math.inf,
                     *, high_inclusive: bool = True, low_inclusive: bool = True,
                     why: str = "") -> None:
    """Checks every number inside a hyperparameter (tensors once, at construction)."""
    leaves = pytree.tree_leaves(value)
    if not leaves:
        raise ValueError(f"{name} is empty; give a float, a tensor or a non-empty dict/list")
    for leaf in leaves:
        if isinstance(leaf, Tensor):
            if not torch.is_floating_point(leaf):
                raise ValueError(f"{name} tensor must be floating point, got {leaf.dtype}")
            lo, hi = leaf.detach().min().item(), leaf.detach().max().item()
        elif isinstance(leaf, (int, float)) and not isinstance(leaf, bool):
            lo = hi = float(leaf)
        else:
            raise ValueError(
                f"{name} must be a float, a tensor, a dict of those by parameter name, or a "
                f"per-step list of those; got {type(leaf).__name__}"
            )
        too_high = hi > high if high_inclusive else hi >= high
        too_low = not lo >= low if low_inclusive else not lo > low
        if too_low or too_high:
            bounds = f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
            raise ValueError(f"{name}={leaf!r} is outside {bounds}{why}")


class InnerOptimizer(ABC):
    """A pure optimizer: ``init(params) -> state`` and ``step(params, grads, state)``.

    Hyperparameters live in ``self.hyperparameters`` (a dict of the forms listed in the module
    docstring). ``hyperparameter_tensors`` and ``with_hyperparameter_tensors`` expose the tensor
    leaves so an unroll can differentiate with respect to them.
    """

    def __init__(self, **hyperparameters: Hyperparameter) -> None:
        self.hyperparameters = dict(hyperparameters)

    @abstractmethod
    def init(self, params: Params) -> OptState:
        """Returns the initial state for ``params``."""

    @abstractmethod
    def step(self, params: Params, grads: Params, state: OptState) -> tuple[Params, OptState]:
        """Returns ``(new_params, new_state)``; nothing is modified in place."""

    def hyperparameter_tensors(self) -> list[Tensor]:
        """The tensor leaves of the hyperparameters, in a fixed order."""
        return [leaf for leaf in pytree.tree_leaves(self.hyperparameters)
                if isinstance(leaf, Tensor)]

    def with_hyperparameter_tensors(self, tensors: Sequence[Tensor]) -> InnerOptimizer:
        """A copy of this optimizer whose tensor hyperparameters are replaced by ``tensors``."""
        leaves, spec = pytree.tree_flatten(self.hyperparameters)
        replacements = iter(tensors)
        new_leaves = [next(replacements) if isinstance(leaf, Tensor) else leaf for leaf in leaves]
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.hyperparameters = pytree.tree_unflatten(new_leaves, spec)
        return clone

    def with_hyperparameters(self, **overrides: Hyperparameter) -> InnerOptimizer:
        """A copy of this optimizer with some hyperparameters replaced, in any accepted form.

        For example ``opt.with_hyperparameters(lr=[{name: tensor, ...}, ...])`` turns a float
        learning rate into learned per-step, per-parameter rates (MAML++ LSLR, Meta-SGD).
        """
        unknown = sorted(set(overrides) - set(self.hyperparameters))
        if unknown:
            raise ValueError(f"{type(self).__name__} has no hyperparameters {unknown}; it has "
                             f"{sorted(self.hyperparameters)}")
        for key, value in overrides.items():
            _validate_number(key, value, 0.0)
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.hyperparameters = {**self.hyperparameters, **overrides}
        return clone

    def _get(self, key: str, name: str, step: int) -> Any:
        """The value of hyperparameter ``key`` for parameter ``name`` at inner step ``step``."""
        value = self.hyperparameters[key]
        if isinstance(value, (list, tuple)):
            if step >= len(value):
                raise ValueError(
                    f"{key} has {len(value)} per-step values but inner step {step} was reached; "
                    f"give at least as many values as inner steps"
                )
            value = value[step]
        if isinstance(value, Mapping):
            if name not in value:
                raise ValueError(f"{key} has no value for parameter {name!r}")
            value = value[name]
        return value

    def __repr__(self) -> str:
        def show(v: Any) -> str:
            return f"tensor{tuple(v.shape)}" if isinstance(v, Tensor) else repr(v)

        args = ", ".join(
            f"{k}={pytree.tree_map(show, v)}" for k, v in self.hyperparameters.items()
        )
        return f"{type(self).__name__}({args})"


_LARGEST: dict[torch.dtype, float] = {}


def _largest(t: Tensor) -> float:
    """The largest finite value of ``t``'s dtype (cached: ``torch.finfo`` costs a microsecond)."""
    largest = _LARGEST.get(t.dtype)
    if largest is None:
        largest = _LARGEST[t.dtype] = (float(torch.finfo(t.dtype).max)
                                       if t.dtype.is_floating_point else math.inf)
    return largest


def _zeros_like(params: Params) -> Params:
    return {name: torch.zeros_like(p) for name, p in params.items()}


class SGD(InnerOptimizer):
    """Stochastic gradient descent with momentum, dampening, Nesterov and weight decay.

    Matches ``torch.optim.SGD``: on the first step the momentum buffer is the gradient itself.
    """

    def __init__(self, lr: Hyperparameter = 0.1, *, momentum: Hyperparameter = 0.0,
                 dampening: Hyperparameter = 0.0, weight_decay: Hyperparameter = 0.0,
                 nesterov: bool = False) -> None:
        _validate_number("lr", lr, 0.0)
        _validate_number("momentum", momentum, 0.0)
        _validate_number("dampening", dampening, 0.0, 1.0)
        _validate_number("weight_decay", weight_decay, 0.0)
        if nesterov and (_is_zero(momentum) or not _is_zero(dampening)):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0")
        super().__init__(lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay)
        self.nesterov = nesterov

    def init(self, params: Params) -> OptState:
        state: OptState = {"step": 0}
        if not _is_zero(self.hyperparameters["momentum"]):
            state["momentum_buffer"] = _zeros_like(params)
        return state

    def step(self, params: Params, grads: Params, state: OptState) -> tuple[Params, OptState]:
        k = state["step"]
        new_params, new_buffers = {}, {}
        for name, p in params.items():
            d = grads[name]
            wd = self._get("weight_decay", name, k)
            if not _is_zero(wd):
                d = d + wd * p
            if "momentum_buffer" in state:
                momentum = self._get("momentum", name, k)
                if k == 0:
                    buf = d
                else:
                    dampening = self._get("dampening", name, k)
                    buf = momentum * state["momentum_buffer"][name] + (1 - dampening) * d
                new_buffers[name] = buf
                d = d + momentum * buf if self.nesterov else buf
            lr = self._get("lr", name, k)
            # A float rate fuses the scale into the subtraction (one autograd node instead of
            # two; the same arithmetic as torch.optim.SGD's ``add_(d, alpha=-lr)``). A rate the
            # parameters' dtype cannot hold (1e300 for float32) makes torch refuse ``alpha``
            # outright; unfused it overflows to inf, which the task's fault check names.
            new_params[name] = (p - lr * d if isinstance(lr, Tensor) or abs(lr) > _largest(p)
                                else torch.add(p, d, alpha=-lr))
        new_state: OptState = {"step": k + 1}
        if "momentum_buffer" in state:
            new_state["momentum_buffer"] = new_buffers
        return new_params, new_state


class Adam(InnerOptimizer):
    """Adam with bias correction, L2 weight decay and optional AMSGrad (``torch.optim.Adam``).

    The square root of the second moment uses ``safe_sqrt`` so second derivatives stay finite
    where a gradient is exactly zero.
    """

    def __init__(self, lr: Hyperparameter = 1e-3, *, betas: tuple[Hyperparameter, Hyperparameter]
                 = (0.9, 0.999), eps: Hyperparameter = 1e-8, weight_decay: Hyperparameter = 0.0,
                 amsgrad: bool = False) -> None:
        _validate_number("lr", lr, 0.0)
        _validate_number("betas[0]", betas[0], 0.0, 1.0, high_inclusive=False)
        _validate_number("betas[1]", betas[1], 0.0, 1.0, high_inclusive=False)
        _validate_number("eps", eps, 0.0, low_inclusive=False, why=_EPS_WHY)
        _validate_number("weight_decay", weight_decay, 0.0)
        super().__init__(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps,
                         weight_decay=weight_decay)
        self.amsgrad = amsgrad

    def init(self, params: Params) -> OptState:
        state: OptState = {"step": 0, "exp_avg": _zeros_like(params),
                           "exp_avg_sq": _zeros_like(params)}
        if self.amsgrad:
            state["max_exp_avg_sq"] = _zeros_like(params)
        return state

    def step(self, params: Params, grads: Params, state: OptState) -> tuple[Params, OptState]:
        k = state["step"]
        t = k + 1
        new_params: Params = {}
        new_state: OptState = {"step": t, "exp_avg": {}, "exp_avg_sq": {}}
        if self.amsgrad:
            new_state["max_exp_avg_sq"] = {}
        for name, p in params.items():
            g = grads[name]
            wd = self._get("weight_decay", name, k)
            if not _is_zero(wd):
                g = g + wd * p
            beta1, beta2 = self._get("beta1", name, k), self._get("beta2", name, k)
            m = torch.lerp(state["exp_avg"][name], g, 1 - beta1)
            v = beta2 * state["exp_avg_sq"][name] + (1 - beta2) * g * g
            new_state["exp_avg"][name], new_state["exp_avg_sq"][name] = m, v
            if self.amsgrad:
                v = torch.maximum(state["max_exp_avg_sq"][name], v)
                new_state["max_exp_avg_sq"][name] = v
            bias_correction1 = 1 - beta1**t
            bias_correction2_sqrt = (1 - beta2**t) ** 0.5
            denom = safe_sqrt(v) / bias_correction2_sqrt + self._get("eps", name, k)
            step_size = self._get("lr", name, k) / bias_correction1
            new_params[name] = p - step_size * m / denom
        return new_params, new_state


class RMSprop(InnerOptimizer):
    """RMSprop with optional momentum, centring and L2 weight decay (``torch.optim.RMSprop``)."""

    def __init__(self, lr: Hyperparameter = 1e-2, *, alpha: Hyperparameter = 0.99,
                 eps: Hyperparameter = 1e-8, weight_decay: Hyperparameter = 0.0,
                 momentum: Hyperparameter = 0.0, centered: bool = False) -> None:
        _validate_number("lr", lr, 0.0)
        _validate_number("alpha", alpha, 0.0, 1.0)
        _validate_number("eps", eps, 0.0, low_inclusive=False, why=_EPS_WHY)
        _validate_number("weight_decay", weight_decay, 0.0)
        _validate_number("momentum", momentum, 0.0)
        super().__init__(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                         momentum=momentum)
        self.centered = centered

    def init(self, params: Params) -> OptState:
        state: OptState = {"step": 0, "square_avg": _zeros_like(params)}
        if self.centered:
            state["grad_avg"] = _zeros_like(params)
        if not _is_zero(self.hyperparameters["momentum"]):
            state["momentum_buffer"] = _zeros_like(params)
        return state

    def step(self, params: Params, grads: Params, state: OptState) -> tuple[Params, OptState]:
        k = state["step"]
        new_params: Params = {}
        new_state: OptState = {"step": k + 1, "square_avg": {}}
        for key in ("grad_avg", "momentum_buffer"):
            if key in state:
                new_state[key] = {}
        for name, p in params.items():
            g = grads[name]
            wd = self._get("weight_decay", name, k)
            if not _is_zero(wd):
                g = g + wd * p
            alpha = self._get("alpha", name, k)
            square_avg = alpha * state["square_avg"][name] + (1 - alpha) * g * g
            new_state["square_avg"][name] = square_avg
            if self.centered:
                grad_avg = torch.lerp(state["grad_avg"][name], g, 1 - alpha)
                new_state["grad_avg"][name] = grad_avg
                avg = safe_sqrt(square_avg - grad_avg * grad_avg)
            else:
                avg = safe_sqrt(square_avg)
            avg = avg + self._get("eps", name, k)
            lr = self._get("lr", name, k)
            if "momentum_buffer" in state:
                buf = self._get("momentum", name, k) * state["momentum_buffer"][name] + g / avg
                new_state["momentum_buffer"][name] = buf
                new_params[name] = p - lr * buf
            else:
                new_params[name] = p - lr * g / avg
        return new_params, new_state
