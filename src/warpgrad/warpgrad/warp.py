"""``Warp``: a model partitioned into task-adaptable layers and meta-learned warp layers.

WarpGrad (Flennerhag et al., ICLR 2020) interleaves *warp layers* between the layers a task
learner adapts. Warp layers are shared across tasks and fixed during adaptation; their Jacobians
precondition the task gradients. They are meta-learned from states replayed out of the task
learners' trajectories (``DualUpdater``) or on the fly (``OnlineUpdater``), never by
backpropagating through an adaptation process. The initialisation of the adaptable layers and,
optionally, the inner learning rates and momenta (``OptimizerParameters``) are meta-learned too.

The task learner is ordinary PyTorch: it trains ``adapt_parameters()`` with any ``torch.optim``
optimizer, calling the wrapper as it would call the model. While collecting, each call records
the adaptable parameters first, so the buffer holds the state before every step.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from metazoo import NonFiniteError, Params, check_on_nonfinite
from warpgrad.buffer import ReplayBuffer, ReplayState
from warpgrad.objectives import ReplayContext
from warpgrad.optimizer_parameters import OptimizerParameters
from warpgrad.updaters import ContinualUpdater, DualUpdater, OnlineUpdater, UpdateResult

__all__ = ["Warp"]

Updater = DualUpdater | OnlineUpdater | ContinualUpdater


def _as_modules(name: str, modules: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    mods = [modules] if isinstance(modules, nn.Module) else list(modules)
    for m in mods:
        if not isinstance(m, nn.Module):
            raise ValueError(f"{name} must be nn.Modules of the model, got {type(m).__name__}")
    return mods


def _names_of(model: nn.Module, modules: Sequence[nn.Module], what: str) -> list[str]:
    ids = {id(p) for m in modules for p in m.parameters()}
    names = [n for n, p in model.named_parameters() if id(p) in ids]
    if len(names) != len(ids):
        raise ValueError(f"some {what} parameters are not parameters of the model; pass "
                         f"sub-modules of the wrapped model as {what}")
    return names


class Warp:
    """Model wrapper for WarpGrad.

    The first five arguments may be positional, as in the reference README.

    Args:
        model: the full network.
        adapt_modules: sub-modules trained by the task learner (and whose initialisation is
            meta-learned).
        warp_modules: sub-modules meta-learned as warp layers (may be empty: no warping).
        updater: ``DualUpdater``, ``OnlineUpdater`` or ``ContinualUpdater`` (a learner that is
            never reset: the warp gradient is its own loss's, see
            ``accumulate_warp_gradients``).
        buffer: where trajectories are recorded (default: a fresh in-memory ``ReplayBuffer``).
        optimizer_parameters: the inner learning rates and momenta. Default: fixed
            (not meta-learned) lr 0.1 and no momentum; the replay's inner step uses these, so
            pass one matching the task optimizer (``optimizer_parameter_groups()`` builds
            ``torch.optim`` groups from it).
        on_nonfinite: what ``backward`` does with a task whose recorded trajectory holds NaN
            or inf values (a NaN batch or an inf learning rate in its inner loop): ``"raise"``
            (default) ``metazoo.NonFiniteError`` naming the task (``where="trajectory"``)
            before any meta-parameter changes, or ``"skip"`` the task (its trajectory is
            discarded; ``UpdateResult.skipped_tasks`` counts it). A non-finite replayed
            gradient (e.g. a NaN batch drawn again from the task's data) always raises
            (``where="meta_gradient"``) before it is written, since it cannot be traced to one
            task; ``OnlineUpdater`` records no trajectory and raises that way too.

    Parameters in neither group, and parameters with ``requires_grad=False`` when the ``Warp``
    is built (in either group), are held fixed: neither adapted by the replay nor
    meta-learned. ``init_adaptation`` resets per-task state itself (BatchNorm statistics, then
    the model's own ``init_adaptation()`` if it defines one); the model needs no hook.
    """

    def __init__(self, model: nn.Module, adapt_modules: nn.Module | Iterable[nn.Module],
                 warp_modules: nn.Module | Iterable[nn.Module], updater: Updater,
                 buffer: ReplayBuffer | None = None,
                 optimizer_parameters: OptimizerParameters | None = None, *,
                 on_nonfinite: str = "raise") -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(updater, (DualUpdater, OnlineUpdater, ContinualUpdater)):
            raise ValueError(f"updater={updater!r} must be a warpgrad.DualUpdater, "
                             "OnlineUpdater or ContinualUpdater")
        if buffer is not None and not isinstance(buffer, ReplayBuffer):
            raise ValueError(f"buffer={buffer!r} must be a warpgrad.ReplayBuffer or None")
        self.model = model
        self.adapt_modules = _as_modules("adapt_modules", adapt_modules)
        self.warp_modules = _as_modules("warp_modules", warp_modules)
        adapt_names = _names_of(model, self.adapt_modules, "adapt_modules")
        warp_names = _names_of(model, self.warp_modules, "warp_modules")
        if not adapt_names:
            raise ValueError("adapt_modules hold no parameters; give the layers the task "
                             "learner trains")
        overlap = sorted(set(adapt_names) & set(warp_names))
        if overlap:
            raise ValueError(f"parameters {overlap} are in both adapt_modules and warp_modules; "
                             "each layer is either adapted or a warp layer")
        covered = set(adapt_names) | set(warp_names)
        orphans = [n for n, p in model.named_parameters() if p.requires_grad and n not in covered]
        if orphans:
            # Such a parameter would be used but neither adapted nor meta-learned: almost always
            # a layer left out of both lists.
            raise ValueError(f"parameters {orphans} are in neither adapt_modules nor "
                             "warp_modules; add their layers to one of them, or set "
                             "requires_grad=False on them to keep them fixed")
        # The rule of every metazoo learner: requires_grad=False (read here, once: Warp itself
        # toggles the flag of warp layers while a task adapts) means frozen, neither adapted
        # nor meta-learned.
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self._adapt_names = [n for n in adapt_names if n in trainable]
        self._warp_names = [n for n in warp_names if n in trainable]
        if not self._adapt_names:
            raise ValueError("adapt_modules hold no parameters with requires_grad=True; give "
                             "the layers the task learner trains (requires_grad=False freezes "
                             "a parameter)")
        self.updater = updater
        self.on_nonfinite = check_on_nonfinite(on_nonfinite)
        self.buffer = buffer if buffer is not None else ReplayBuffer()
        self._optimizer_parameters = optimizer_parameters or OptimizerParameters()
        self._optimizer_parameters.init(self.named_adapt_parameters())
        self._init = {n: nn.Parameter(p.detach().clone())
                      for n, p in self.named_adapt_parameters()}
        self._task: str | None = None
        self._step = 0
        self._open = False  # the current task still expects its terminal state
        self._collect = False
        self._optimizer: torch.optim.Optimizer | None = None

    # -- parameter groups ------------------------------------------------------------------

    def named_adapt_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Task-adaptable parameters, by model name."""
        params = dict(self.model.named_parameters())
        for n in self._adapt_names:
            yield n, params[n]

    def adapt_parameters(self) -> Iterator[nn.Parameter]:
        """Task-adaptable parameters (give these to the task optimizer)."""
        for _, p in self.named_adapt_parameters():
            yield p

    def named_warp_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Warp-layer parameters, by model name."""
        params = dict(self.model.named_parameters())
        for n in self._warp_names:
            yield n, params[n]

    def warp_parameters(self) -> Iterator[nn.Parameter]:
        """Warp-layer parameters (give these to the meta-optimizer)."""
        for _, p in self.named_warp_parameters():
            yield p

    def named_init_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The meta-learned initialisation of the adaptable parameters, by model name."""
        yield from self._init.items()

    def init_parameters(self) -> Iterator[nn.Parameter]:
        """The meta-learned initialisation of the adaptable parameters."""
        yield from self._init.values()

    def named_optimizer_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The inner optimizer's ``log_lr`` / ``momentum_logit`` tensors."""
        return self._optimizer_parameters.named_parameters()

    def optimizer_parameters(self) -> Iterator[nn.Parameter]:
        """The inner optimizer's ``log_lr`` / ``momentum_logit`` tensors."""
        return self._optimizer_parameters.parameters()

    @property
    def optimizer_parameter_container(self) -> OptimizerParameters:
        """The ``OptimizerParameters`` instance."""
        return self._optimizer_parameters

    @property
    def learn_optimizer(self) -> bool:
        """Whether the inner learning rates and momenta are meta-learned."""
        return self._optimizer_parameters.trainable

    @learn_optimizer.setter
    def learn_optimizer(self, value: bool) -> None:
        self._optimizer_parameters.trainable = value

    def named_meta_parameters(self, include_warp: bool = True, include_init: bool | None = None,
                              include_optimizer: bool = True
                              ) -> Iterator[tuple[str, nn.Parameter]]:
        """Meta-parameters for a meta-optimizer, prefixed ``warp.``, ``init.``, ``optimizer.``.

        Args:
            include_warp: the warp parameters.
            include_init: the initialisation; by default only when the updater leaves its step
                to the meta-optimizer (``init_lr=None``), so it is never updated twice, and
                never for a ``ContinualUpdater`` (it learns no initialisation).
            include_optimizer: learning rates and momenta, when ``learn_optimizer``.
        """
        if include_init is None:
            include_init = self.updater.learns_init and self.updater.init_lr is None
        if include_warp:
            for n, p in self.named_warp_parameters():
                yield f"warp.{n}", p
        if include_init:
            for n, p in self.named_init_parameters():
                yield f"init.{n}", p
        if include_optimizer and self.learn_optimizer:
            for n, p in self.named_optimizer_parameters():
                yield f"optimizer.{n}", p

    def meta_parameters(self, include_warp: bool = True, include_init: bool | None = None,
                        include_optimizer: bool = True) -> Iterator[nn.Parameter]:
        """See ``named_meta_parameters``."""
        for _, p in self.named_meta_parameters(include_warp, include_init, include_optimizer):
            yield p

    def parameters(self) -> Iterator[nn.Parameter]:
        """All parameters of the wrapped model."""
        return self.model.parameters()

    def optimizer_parameter_groups(self) -> list[dict[str, Any]]:
        """``torch.optim`` groups for ``adapt_parameters()`` with the current per-tensor lr and
        momentum of ``OptimizerParameters`` (use them when those are meta-learned)."""
        return self._optimizer_parameters.groups(self.named_adapt_parameters())

    # -- task adaptation -------------------------------------------------------------------

    def init_adaptation(self, reset_adapt_parameters: bool = True) -> None:
        """Prepares the model for a new task.

        Resets every BatchNorm layer's running statistics, calls the model's own
        ``init_adaptation()`` if it has one, copies the meta-learned initialisation into the
        adaptable layers (a copy under ``no_grad``: the task learner then trains the model's
        own parameters), freezes the warp parameters (``requires_grad=False``, so task training
        does not accumulate gradients into them) and puts the model in train mode.

        Args:
            reset_adapt_parameters: copy the initialisation in (default). ``False`` continues
                from the current adaptable parameters.
        """
        self._close_task()
        for m in self.model.modules():
            if isinstance(m, _BatchNorm):
                m.reset_running_stats()
        hook = getattr(self.model, "init_adaptation", None)
        if callable(hook):
            hook()
        if reset_adapt_parameters:
            with torch.no_grad():
                for n, p in self.named_adapt_parameters():
                    p.copy_(self._init[n])
        for p in self.warp_parameters():
            p.requires_grad_(False)
        for p in self.adapt_parameters():
            p.requires_grad_(True)
        self.model.train()

    def register_task(self, data: Iterable[Any]) -> str:
        """Opens a new task in the buffer.

        Args:
            data: a re-iterable of ``(inputs, targets)`` batches (a list, a DataLoader); the
                replay draws fresh batches from it.

        Returns:
            The task's slot id in the buffer.
        """
        self._close_task()
        if isinstance(data, Iterator):
            raise ValueError("register_task needs a re-iterable (a list or a DataLoader), not "
                             "a one-shot iterator: the replay iterates over the task again")
        self._task = uuid.uuid4().hex
        self.buffer.init(self._task, data)
        self._step = 0
        self._open = True
        return self._task

    def register_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Records the task optimizer's momentum buffers with every state (for the replay's
        momentum step; needed when ``OptimizerParameters`` has momentum)."""
        self._optimizer = optimizer

    def unregister_optimizer(self) -> None:
        """Stops recording optimizer state."""
        self._optimizer = None

    def collect(self) -> None:
        """Switches recording of states on (needs a registered task, except with a
        ``ContinualUpdater``, for which it switches the accumulation of warp gradients on)."""
        if self._task is None and self.updater.records_states:
            raise RuntimeError("collect() needs a task; call register_task(data) first")
        self._collect = True

    def no_collect(self) -> None:
        """Switches recording off; the current adaptable parameters close the task's path."""
        self._close_task()
        self._collect = False

    @property
    def collecting(self) -> bool:
        """Whether calls record states."""
        return self._collect

    def train(self, mode: bool = True) -> Warp:
        """Train mode for the wrapped model."""
        self.model.train(mode)
        return self

    def eval(self) -> Warp:
        """Eval mode for the wrapped model."""
        self.model.eval()
        return self

    def _momentum(self) -> Params | None:
        if self._optimizer is None:
            return None
        momentum: Params = {}
        for n, p in self.named_adapt_parameters():
            buf = self._optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is None:
                return None
            momentum[n] = buf
        return momentum

    def _adapt_state(self) -> Params:
        return {n: p.detach() for n, p in self.named_adapt_parameters()}

    def __call__(self, *inputs: Any, cache_parameters: bool | None = None, **kwargs: Any) -> Any:
        """Runs the model; while collecting, first records the adaptable state.

        Args:
            *inputs: model inputs.
            cache_parameters: override the collecting flag for this call.
            **kwargs: keyword inputs of the model.
        """
        record = self._collect if cache_parameters is None else cache_parameters
        if record and self.updater.records_states:
            if self._task is None:
                raise RuntimeError("no task to record into; call register_task(data) first")
            params, momentum = self._adapt_state(), self._momentum()
            if self.updater.uses_buffer:
                self.buffer.update(self._task, params, momentum)
            self.updater.on_record(self, self._task, ReplayState(self._step, params, momentum))
            self._step += 1
            self._open = True
        return self.model(*inputs, **kwargs)

    def _close_task(self) -> None:
        if self._task is not None and self._open and self._collect:
            params = self._adapt_state()
            if self.updater.uses_buffer:
                self.buffer.finalize(self._task, params)
            self.updater.on_finalize(self, self._task, params)
        self._open = False

    # -- meta-learning ---------------------------------------------------------------------

    def replay_context(self, criterion: Callable[[Tensor, Tensor], Tensor], *,
                       bn_mode: str = "batch") -> ReplayContext:
        """Fresh leaves for the warp parameters and detached views of everything else."""
        params = dict(self.model.named_parameters())
        adapt, warp = set(self._adapt_names), set(self._warp_names)
        device = next(iter(params.values())).device
        return ReplayContext(
            model=self.model,
            criterion=criterion,
            adapt_names=list(self._adapt_names),
            warp={n: params[n].detach().requires_grad_(True) for n in self._warp_names},
            static={n: p.detach() for n, p in params.items() if n not in adapt | warp},
            buffers={n: b.detach() for n, b in self.model.named_buffers()},
            optimizer_parameters=self._optimizer_parameters,
            bn_mode=bn_mode,
            device=device,
        )

    def backward(self, meta_step_fn: Callable[[], Any], *, retain_trajectories: bool = False,
                 retain_optimizer: bool = False) -> UpdateResult:
        """Computes the meta-gradients of every meta-parameter group, calling ``meta_step_fn``.

        Args:
            meta_step_fn: steps the meta-optimizer and zeroes its gradients.
            retain_trajectories: keep the buffer (default: cleared), also when a non-finite
                value stops the meta-step.
            retain_optimizer: keep the registered task optimizer.

        Returns:
            ``UpdateResult`` (replay and init timings, meta-steps taken, mean warp loss).

        Raises:
            NonFiniteError: a recorded trajectory (``on_nonfinite="raise"``) or a meta-gradient
                is not finite. Nothing was updated; the meta-batch's trajectories (and a
                ``ContinualUpdater``'s running sum) are dropped, unless
                ``retain_trajectories=True`` keeps them for inspection (then call
                ``clear()``), so the next meta-batch's ``backward`` works; the message says
                which.
        """
        collecting = self._collect
        self.no_collect()
        try:
            skipped = self._drop_nonfinite_tasks()
            result = self.updater.backward(self, meta_step_fn)
            if skipped:
                result = dataclasses.replace(result, skipped_tasks=skipped)
        except NonFiniteError as error:
            # Replaying the same trajectories would fail the same way: unless they are wanted
            # for inspection, drop them (and a continual updater's non-finite sum) so that the
            # next meta-batch starts clean, and say so.
            if retain_trajectories:
                self._collect = collecting and self._can_collect()
                then = ("The trajectories were kept (retain_trajectories=True) for inspection "
                        "in warp.buffer; call warp.clear() before recording the next meta-batch")
            else:
                self.clear()
                if isinstance(self.updater, ContinualUpdater):
                    self.updater.reset()
                then = ("This meta-batch's trajectories were dropped and nothing was updated: "
                        "record the next meta-batch and call backward() again (pass "
                        "retain_trajectories=True to keep them for inspection)")
            raise NonFiniteError(task=error.task, inner_step=error.inner_step,
                                 where=error.where, meta_step=error.meta_step,
                                 names=error.names, then=then) from None
        except BaseException:
            # Keep the trajectories for a retry (an interrupt, a failing meta_step_fn); only
            # the flag is restored.
            self._collect = collecting and self._can_collect()
            raise
        if not retain_trajectories:
            self.clear()
        if not retain_optimizer:
            self._optimizer = None
        if collecting and self._can_collect():
            self._collect = True
        return result

    def _can_collect(self) -> bool:
        return self._task is not None or not self.updater.records_states

    def accumulate_warp_gradients(self) -> None:
        """After the task learner's ``loss.backward()`` (``ContinualUpdater`` only): moves the
        warp parameters' gradients into the updater's running sum when collecting, or discards
        them when not (``no_collect()``, e.g. a burn-in), leaving their ``.grad`` ``None``.

        The warp parameters must keep ``requires_grad=True`` for the learner's backward to
        reach them, so a continual learner does not call ``init_adaptation`` (which freezes
        them and resets the adaptable parameters).

        Raises:
            ValueError: with another updater (they compute warp gradients themselves).
        """
        if not isinstance(self.updater, ContinualUpdater):
            raise ValueError(f"accumulate_warp_gradients() needs a warpgrad.ContinualUpdater; "
                             f"this Warp has {type(self.updater).__name__}, which computes "
                             "the warp gradients itself in backward()")
        self.updater.accumulate(self, collect=self._collect)

    def _drop_nonfinite_tasks(self) -> int:
        """Raises on, or discards, tasks whose recorded trajectory is not finite."""
        if not self.updater.uses_buffer:
            return 0
        bad = self.buffer.nonfinite_slots()  # one host transfer for the whole buffer
        if not bad:
            return 0
        slots = self.buffer.slots()
        if self.on_nonfinite == "raise":
            first = min(bad, key=slots.index)
            raise NonFiniteError(task=slots.index(first), inner_step=bad[first],
                                 where="trajectory")
        for slot in bad:
            self.buffer.discard(slot)
        return len(bad)

    def clear(self) -> None:
        """Clears the replay buffer (the current task is forgotten too)."""
        self.buffer.clear()
        self._task = None
        self._open = False
        self._collect = False

    # -- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Model, initialisation and optimizer parameters (and a ``ContinualUpdater``'s
        running sum, under ``"updater"``; the generators of a seeded ``DualUpdater`` and
        ``ReplayBuffer``, under ``"random"``, so that a resumed run replays and samples as an
        uninterrupted one)."""
        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "init": {n: p.detach().clone() for n, p in self._init.items()},
            "optimizer_parameters": self._optimizer_parameters.state_dict()}
        if isinstance(self.updater, ContinualUpdater):
            state["updater"] = self.updater.state_dict()
        random = {name: generator for name, generator in (
            ("updater", getattr(self.updater, "random_state", lambda: None)()),
            ("buffer", self.buffer.random_state())) if generator is not None}
        if random:  # only seeded parts: unseeded ones draw from torch's global generator
            state["random"] = random
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores ``state_dict()``."""
        missing = sorted({"model", "init", "optimizer_parameters"} - set(state))
        if missing:
            raise ValueError(f"state dict lacks {missing}; was it written by Warp.state_dict()?")
        self.model.load_state_dict(state["model"])
        if set(state["init"]) != set(self._init):
            raise ValueError("the initialisation in the checkpoint does not match this model's "
                             "adaptable parameters")
        with torch.no_grad():
            for n, p in self._init.items():
                p.copy_(state["init"][n])
        self._optimizer_parameters.load_state_dict(state["optimizer_parameters"])
        if isinstance(self.updater, ContinualUpdater):
            if "updater" not in state:
                raise ValueError("state dict lacks the ContinualUpdater's running sum "
                                 "('updater'); load a state written by a Warp with a "
                                 "ContinualUpdater")
            self.updater.load_state_dict(state["updater"])
        # A checkpoint from before the generators were saved has none: the replay order then
        # starts again from the seed, as it did then.
        random = state.get("random", {})
        if hasattr(self.updater, "set_random_state"):
            self.updater.set_random_state(random.get("updater"))
        self.buffer.set_random_state(random.get("buffer"))

    def __repr__(self) -> str:
        return (f"Warp(adapt={len(self._adapt_names)} tensors, warp={len(self._warp_names)} "
                f"tensors, updater={self.updater!r}, buffer={self.buffer!r})")
