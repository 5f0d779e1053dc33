"""``Leap``: the reference implementation's stateful API, fixed for PyTorch 2.x.

Scripts written for the original ``leap`` package (github.com/amzn/metalearn-leap, also
flennerhag/leap) run unchanged::

    leap = Leap(model)
    meta_optimizer = torch.optim.Adam(leap.parameters(), lr=...)
    for meta_step in range(...):
        for task in meta_batch:
            leap.init_task()
            leap.to(model)                       # copy the initialisation into the model
            opt = torch.optim.SGD(model.parameters(), lr=...)
            for x, y in task:
                loss = criterion(model(x), y)
                loss.backward()
                leap.update(loss, model)         # after backward, before the inner step
                opt.step()
                opt.zero_grad()
            # optional: leap.finish(criterion(model(x_next), y_next), model)
        leap.normalize()                         # average over the meta-batch
        meta_optimizer.step()
        meta_optimizer.zero_grad()               # sets .grad to None: handled

The update rule is in ``leap.trajectory``. Differences from the reference:

- Gradients set to ``None`` by ``zero_grad()`` are handled (the reference crashed at the second
  meta-step).
- The trajectory's last segment, from the point of the last ``update`` to the parameters after
  the last inner step, is included (the reference dropped it, so K inner steps gave K - 1
  segments). Its end point is obtained in one of two ways:

  * ``leap.finish(loss, model)`` after the inner loop, with the loss at the final parameters
    (no ``backward`` needed): exact.
  * Otherwise the trajectory is closed lazily by the next ``init_task``, ``to`` (of the same
    model) or ``normalize``, reading the final parameters from the model given to the last
    ``update``. No loss was observed there, so with ``loss=True`` the final loss is the
    first-order estimate ``L_K = L_{K-1} + grad L(theta_{K-1}) . (theta_K - theta_{K-1})``;
    with ``loss=False`` the lazy segment is exact. Do not modify the model between its last
    inner step and that call.

- A task whose trajectory is not finite (a NaN batch, an inf learning rate) never reaches the
  meta-gradient: each task's increments are summed apart and added to ``.grad`` when its
  trajectory closes, after one finiteness check (one host transfer per task). With
  ``on_nonfinite="raise"`` (default) that raises ``metazoo.NonFiniteError`` (``where=
  "trajectory"``, the task's index since the last ``normalize``); with ``"skip"`` the task is
  left out of the meta-gradient and of ``normalize``'s count, which returns how many were
  skipped. (The reference averaged NaN into the initialisation.) In ``meta_step_fn``, step the
  meta-optimizer with ``metazoo.checked_step(meta_optimizer, leap.named_parameters())`` to have
  a non-finite meta-update (an lr of nan or inf) undone and reported too.
- Points are stored as detached flat vectors (one parameter copy, and with ``loss=True`` one
  gradient copy, for the previous point only); the loss is kept as a detached tensor, so
  ``update`` never synchronises with the device and never keeps a graph alive.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any, final

import torch
from torch import Tensor, nn

import metazoo
from leap.trajectory import Point, add_to_grad, flatten, segment_increment

__all__ = ["Leap"]

Hook = Callable[[Tensor], object]


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


@final
class Leap:
    """The meta-learned initialisation of ``model`` and its Leap meta-gradient.

    Args:
        model: the network whose parameters Leap meta-learns. Its parameters and buffers are
            copied: the copies (``leap.state``) are the meta-parameters.
        norm: length metric d1 (divide each segment's increment by its length); ``False`` gives
            the energy metric d2.
        loss: include the loss in the task manifold; ``False`` uses parameter distances only.
        stabilizer: use ``-|L_{i+1} - L_i|`` as the loss difference (only with ``loss=True``).
        on_nonfinite: ``"raise"`` (default) or ``"skip"`` a task whose trajectory holds NaN or
            inf values (see the module docstring).

    Attributes:
        state: the initialisation, an ``OrderedDict`` like ``model.state_dict()``; entries that
            require grad are the meta-parameters (``parameters()``), the rest are buffers that
            ``to`` copies into the model with them.
    """

    def __init__(self, model: nn.Module, *, norm: bool = True, loss: bool = True,
                 stabilizer: bool = True, on_nonfinite: str = "raise") -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, value in (("norm", norm), ("loss", loss), ("stabilizer", stabilizer)):
            _check_flag(name, value)
        self.norm = norm
        self.loss = loss
        self.stabilizer = stabilizer
        self.on_nonfinite = metazoo.check_on_nonfinite(on_nonfinite)
        # Tied weights appear in the state dict once per name but are one tensor: copy each
        # tensor once, so the copy stays tied and its first name is its parameter name (as in
        # model.named_parameters()).
        copies: dict[int, Tensor] = {}
        self.state: OrderedDict[str, Tensor] = OrderedDict()
        self._names: list[str] = []
        for name, t in model.state_dict(keep_vars=True).items():
            if id(t) not in copies:
                copies[id(t)] = t.detach().clone().requires_grad_(t.requires_grad)
                if t.requires_grad:
                    self._names.append(name)
            self.state[name] = copies[id(t)]
        if not self._names:
            raise ValueError("model has no parameters that require grad; Leap has nothing to "
                             "meta-learn")
        params = [self.state[name] for name in self._names]
        kinds = {(p.dtype, p.device) for p in params}
        if len(kinds) > 1 or not params[0].is_floating_point():
            raise ValueError(f"Leap needs every trainable parameter to share one floating-point "
                             f"dtype and device, got {sorted(map(str, kinds))}; convert the "
                             f"model with model.to(dtype, device) before Leap(model)")
        self._task_counter = 0
        self._tasks_started = 0  # since the last normalize: names a task in errors
        self._task_counted = False  # whether the current task was counted by init_task
        self._skipped = 0
        self._pending: Tensor | None = None  # the current task's summed increments
        self._finite_flags: list[Tensor] = []  # per segment, on the device
        self._previous: Point | None = None
        self._live: list[Tensor] | None = None  # the model's own parameters, for a lazy close
        self._hook: Hook | None = None
        self.zero()

    def named_parameters(self) -> Iterator[tuple[str, Tensor]]:
        """``(name, tensor)`` of every meta-parameter (the initialisation's trainable part)."""
        for name in self._names:
            yield name, self.state[name]

    def parameters(self) -> Iterator[Tensor]:
        """The meta-parameters, to hand to a ``torch.optim`` meta-optimizer."""
        for _, param in self.named_parameters():
            yield param

    def zero(self) -> None:
        """Sets the meta-gradient to zeros (allocating it where it is ``None``)."""
        for param in self.parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            else:
                param.grad.zero_()

    def to(self, model: nn.Module) -> None:
        """Copies the initialisation (parameters and buffers) into ``model`` in place.

        If ``model`` holds a trajectory that has not been closed yet, it is closed first (see
        the module docstring), since its final parameters are about to be overwritten.
        """
        if self._live is not None:
            named = dict(model.named_parameters())
            if all(named.get(name) is p for name, p in zip(self._names, self._live, strict=True)):
                self._close()
        with torch.no_grad():
            model.load_state_dict(self.state)

    def init_task(self, increment: bool = True) -> None:
        """Starts a new task's trajectory, closing the previous one.

        Args:
            increment: count the task for ``normalize`` (default True).
        """
        self._close()
        if increment:
            self._task_counter += 1
        self._task_counted = increment
        self._tasks_started += 1

    def update(self, loss: Tensor | float, model: nn.Module, hook: Hook | None = None) -> None:
        """Adds the segment ending at ``model``'s current parameters to the meta-gradient.

        Call after ``loss.backward()`` and before the inner optimizer's step: the point's
        gradient (needed when ``loss=True``) is read from the parameters' ``.grad``.

        Args:
            loss: the loss at the model's current parameters (a one-element tensor or float).
            model: the model being trained on the task.
            hook: optional callable modifying each parameter's increment in place before it is
                added to the meta-gradient; a lazily closed last segment uses the hook of the
                task's last ``update``.
        """
        params = self._model_params(model)
        grad = None
        if self.loss:
            grads = [p.grad for p in params]
            if all(g is None for g in grads):
                raise RuntimeError("leap.update(loss, model) found no gradients on the model's "
                                   "parameters: call loss.backward() before leap.update and "
                                   "the inner opt.zero_grad() after it")
            grad = flatten(grads, like=params)
        point = Point(flatten(params), self._loss_value(loss, params[0]), grad)
        if self._previous is not None:
            self._add(segment_increment(self._previous, point, norm=self.norm, loss=self.loss,
                                        stabilizer=self.stabilizer), hook)
        self._previous, self._live, self._hook = point, params, hook

    def finish(self, loss: Tensor | float, model: nn.Module, hook: Hook | None = None) -> None:
        """Closes the task's trajectory exactly with the loss at the final parameters.

        Call after the last inner step, with the loss of ``model`` at its final parameters
        (typically on the next batch); ``backward`` is not needed. Without it the trajectory
        is closed lazily with an estimated final loss (see the module docstring).

        Args:
            loss: the loss at the model's final parameters.
            model: the model being trained on the task.
            hook: as in ``update``.
        """
        if self._previous is None:
            raise RuntimeError("leap.finish needs at least one leap.update(loss, model) in the "
                               "current task; call init_task(), to(model) and update() first")
        params = self._model_params(model)
        end = Point(flatten(params), self._loss_value(loss, params[0]))
        self._add(segment_increment(self._previous, end, norm=self.norm, loss=self.loss,
                                    stabilizer=self.stabilizer), hook)
        self._commit()

    def normalize(self, reset_count: bool = True) -> int:
        """Divides the meta-gradient by the number of tasks since the last ``normalize``.

        Closes the current task's trajectory first. Tasks skipped for non-finite values
        (``on_nonfinite="skip"``) are not counted; when every task was skipped the
        meta-gradient is left as it is (nothing was added).

        Args:
            reset_count: reset the task counter (default True).

        Returns:
            The number of tasks skipped since the last ``normalize``.
        """
        self._close()
        skipped = self._skipped
        if reset_count:
            self._skipped = self._tasks_started = 0
        if self._task_counter == 0 and skipped:
            return skipped
        if self._task_counter == 0:
            raise RuntimeError("leap.normalize: the task counter is 0; call leap.init_task() "
                               "at the start of every task")
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            torch._foreach_div_(grads, float(self._task_counter))
        if reset_count:
            self._task_counter = 0
        return skipped

    def state_dict(self) -> dict[str, Any]:
        """The initialisation and the task counter (tensors and plain values only)."""
        return {"state": OrderedDict((k, v.detach().clone()) for k, v in self.state.items()),
                "task_counter": self._task_counter}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores ``state_dict()`` in place, so a meta-optimizer keeps its parameters."""
        missing = sorted({"state", "task_counter"} - set(state))
        if missing:
            raise ValueError(f"state dict lacks {missing}; was it written by Leap.state_dict()?")
        if list(state["state"]) != list(self.state):
            raise ValueError(f"checkpoint entries {list(state['state'])} do not match this "
                             f"Leap's {list(self.state)}")
        with torch.no_grad():
            for name, value in state["state"].items():
                self.state[name].copy_(value)
        self._task_counter = int(state["task_counter"])
        self._reset_trajectory()

    # -- internals -----------------------------------------------------------------------------

    def _model_params(self, model: nn.Module) -> list[Tensor]:
        named = dict(model.named_parameters())
        missing = [name for name in self._names if name not in named]
        if missing:
            raise ValueError(f"model lacks the parameters {missing} that Leap was built with; "
                             f"pass the model given to Leap(model)")
        return [named[name] for name in self._names]

    def _loss_value(self, loss: Tensor | float, like: Tensor) -> Tensor | None:
        if not self.loss:
            return None
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(f"loss must hold one value, got shape {tuple(loss.shape)}; "
                                 f"reduce it (e.g. loss.mean()) first")
            return loss.detach().reshape(()).to(like.device).clone()
        if isinstance(loss, (int, float)) and not isinstance(loss, bool):
            return torch.tensor(float(loss), device=like.device)
        raise ValueError(f"loss must be a tensor or a float, got {type(loss).__name__}")

    def _add(self, increment: Tensor, hook: Hook | None) -> None:
        """Adds one segment's increment (after ``hook``) to the current task's sum."""
        if hook is not None:
            params = list(self.parameters())
            for piece, p in zip(increment.split([p.numel() for p in params]), params,
                                strict=True):
                hook(piece.view_as(p))  # a view: the hook edits ``increment`` in place
        self._finite_flags.append(torch.isfinite(increment).all())
        self._pending = increment if self._pending is None else self._pending.add_(increment)

    def _commit(self) -> None:
        """Ends the trajectory: adds the task's sum to ``.grad`` if it is finite."""
        pending, flags = self._pending, self._finite_flags
        self._reset_trajectory()
        if pending is None:
            return
        finite = torch.stack(flags)
        if bool(finite.all()):  # the one host transfer of the task
            add_to_grad(list(self.parameters()), pending)
            return
        if self._task_counted:
            self._task_counter -= 1
            self._task_counted = False
        if self.on_nonfinite == "raise":
            first = int((~finite).nonzero()[0, 0])
            raise metazoo.NonFiniteError(task=self._tasks_started - 1, inner_step=first,
                                         where="trajectory")
        self._skipped += 1

    def _close(self) -> None:
        """Adds the pending last segment, ending at the live parameters (lazy close)."""
        if self._previous is not None and self._live is not None:
            start = self._previous
            end_params = flatten(self._live)
            end_loss = None
            if self.loss:
                assert start.loss is not None and start.grad is not None
                end_loss = start.loss + torch.dot(start.grad, end_params - start.params).to(
                    start.loss.dtype)
            self._add(segment_increment(start, Point(end_params, end_loss), norm=self.norm,
                                        loss=self.loss, stabilizer=self.stabilizer), self._hook)
        self._commit()

    def _reset_trajectory(self) -> None:
        self._previous, self._live, self._hook = None, None, None
        self._pending, self._finite_flags = None, []
