"""Differentiable inner loops: K optimizer steps folded from one pure inner step.

Step k evaluates ``loss_fn(params_k, buffers_k, batch_k)``, takes its gradient with respect to
the adapted parameters and applies the inner optimizer. With ``first_order=False`` (the default)
the gradient is taken with ``create_graph=True``, so the result is differentiable to second order
with respect to the initial parameters, the static parameters and every tensor hyperparameter.

Checkpointing (``checkpoint=``, a ``Checkpoint`` schedule) runs the inner loop forward without a
second-order graph, stores a few intermediate states (parameters, optimizer state, buffers, RNG
state), and during the backward pass recomputes steps from a stored state with
``create_graph=True`` and backpropagates through them; the meta-gradient equals the plain
unroll's exactly. The default schedule is binomial ("revolve", Griewank 1992; Griewank and
Walther 2000): at most ``DEFAULT_SNAPSHOTS`` stored states and one step's graph at a time, so
memory is flat in K, for the fewest recomputed steps that budget allows
(``binomial_recomputations``). ``checkpoint=S`` (an int) keeps the fixed-segment schedule: every
S-th state stored, a segment of S steps recomputed at a time (memory grows by one state per
segment). One reverse sweep (``_reverse``) drives both schedules, here and in
``metazoo.vectorize``. (``torch.utils.checkpoint`` around each step is exact too but re-runs the
inner ``autograd.grad`` repeatedly and costs more than no checkpointing at all; see
ARCHITECTURE.md.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from metazoo.functional import Buffers, Params
from metazoo.optim import InnerOptimizer, OptState

Batch = Any
LossFn = Callable[[Params, Buffers, Batch], tuple[Tensor, Buffers]]

#: The segment length ``checkpoint=True`` used before binomial schedules (issue 26);
#: ``Checkpoint(segment=DEFAULT_SEGMENT)`` (or ``checkpoint=5``) still selects that schedule.
DEFAULT_SEGMENT = 5

#: Stored states of ``checkpoint=True`` / ``Checkpoint()``: the binomial schedule reverses up to
#: 1,365 steps with at most 4 recomputed steps per step, up to 12,376 with 6
#: (``benchmarks/unroll_memory.py``).
DEFAULT_SNAPSHOTS = 10

__all__ = ["DEFAULT_SEGMENT", "DEFAULT_SNAPSHOTS", "Checkpoint", "CheckpointPlan", "LossFn",
           "UnrollResult", "binomial_recomputations", "check_checkpoint", "clip_grad_norm",
           "unroll"]


@dataclass(frozen=True)
class UnrollResult:
    """What an unroll returns.

    Attributes:
        params: the adapted parameters after the last step (differentiable).
        state: the optimizer state after the last step.
        buffers: the buffers after the last step; BatchNorm running statistics in ``"running"``
            mode are differentiable with respect to the parameters that produced them.
        losses: the inner loss of each step, evaluated before the step, detached, shape [K].
        trajectory: ``[params_0, ..., params_K]`` when ``keep_trajectory=True``, else ``None``;
            each point is differentiable.
        buffer_trajectory: ``[buffers_0, ..., buffers_K]`` alongside ``trajectory`` (the
            BatchNorm statistics each point was reached with), else ``None``.
    """

    params: Params
    state: OptState
    buffers: Buffers
    losses: Tensor
    trajectory: list[Params] | None = None
    buffer_trajectory: list[Buffers] | None = None


def clip_grad_norm(grads: Sequence[Tensor], max_norm: float) -> list[Tensor]:
    """Scales ``grads`` so their global 2-norm is at most ``max_norm`` (out of place).

    Same rule as ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + 1e-6)``,
    capped at 1), written with differentiable tensor operations and no host synchronisation.
    """
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return [g * coefficient for g in grads]


class _ClipBackward(torch.autograd.Function):
    """Identity forward; the backward clips the global norm of the incoming gradients.

    In the ``setup_context`` form with ``generate_vmap_rule`` so that it also runs under
    ``torch.func`` transforms (``metazoo.vectorize.functional_unroll``): under ``vmap`` forward
    and backward run per task, so each task's gradients are clipped by their own norm, as in
    the per-task loop.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(max_norm: float, *tensors: Tensor) -> tuple[Tensor, ...]:
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.max_norm = inputs[0]
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        present = [g for g in grads if g is not None]
        if not present:
            return (None, *grads)
        clipped = iter(clip_grad_norm(present, ctx.max_norm))
        return (None, *(None if g is None else next(clipped) for g in grads))


@dataclass
class _Run:
    """Everything about one unroll that is not a differentiable tensor."""

    loss_fn: LossFn
    optimizer: InnerOptimizer
    batches: Sequence[Batch]
    steps: int
    inner_grad_clip: float | None
    backward_grad_clip: float | None
    final_state: OptState | None = None  # set by the checkpointed forward pass

    def step(self, k: int, params: Params, static: Params, buffers: Buffers, state: OptState,
             optimizer: InnerOptimizer, *, create_graph: bool
             ) -> tuple[Params, OptState, Buffers, Tensor]:
        """One inner step; ``create_graph`` makes it differentiable to second order."""
        names = list(params)
        inputs = list(params.values())
        if (self.backward_grad_clip is not None and torch.is_grad_enabled()
                and any(p.requires_grad for p in inputs)):
            inputs = list(_ClipBackward.apply(self.backward_grad_clip, *inputs))
        with torch.enable_grad():
            if create_graph:
                leaves = [p if p.requires_grad else p.detach().requires_grad_() for p in inputs]
                full = {**static, **dict(zip(names, leaves))}
            else:
                # First-order: the inner gradient is a constant, so build its graph on
                # detached copies and keep nothing that links back to the meta-parameters.
                leaves = [p.detach().requires_grad_() for p in inputs]
                full = {**{n: s.detach() for n, s in static.items()}, **dict(zip(names, leaves))}
            loss, new_buffers = self.loss_fn(full, buffers, self.batches[k % len(self.batches)])
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else ""
                raise ValueError("loss_fn must return (scalar loss tensor, buffers); got a loss "
                                 f"of type {type(loss).__name__}{shape}")
            grads = list(torch.autograd.grad(loss, leaves, create_graph=create_graph))
        if self.inner_grad_clip is not None:
            grads = clip_grad_norm(grads, self.inner_grad_clip)
        step_params = dict(zip(names, leaves)) if create_graph else dict(zip(names, inputs))
        if not create_graph:
            # The running statistics were computed on the detached copies, whose graph the
            # autograd.grad above has freed: to first order they are constants, like the
            # inner gradient (backpropagating into them would fail).
            new_buffers = {n: b.detach() for n, b in new_buffers.items()}
        new_params, new_state = optimizer.step(step_params, dict(zip(names, grads)), state)
        return new_params, new_state, new_buffers, loss.detach()


def _tensor_leaves(tree: Any) -> list[Tensor]:
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, Tensor)]


def _replace_tensor_leaves(tree: Any, tensors: Sequence[Tensor]) -> Any:
    leaves, spec = pytree.tree_flatten(tree)
    replacements = iter(tensors)
    return pytree.tree_unflatten(
        [next(replacements) if isinstance(leaf, Tensor) else leaf for leaf in leaves], spec)


@dataclass(frozen=True)
class _RngState:
    """The CPU generator's state and, for parameters on an accelerator, that device's."""

    cpu: Tensor
    device: torch.device | None = None
    device_state: Tensor | None = None

    @staticmethod
    def capture(device: torch.device) -> _RngState:
        if device.type in ("cpu", "meta"):
            return _RngState(torch.get_rng_state())
        # The state of the parameters' own device, named explicitly: the current device of
        # the process may be another one (several GPUs in one process).
        module = torch.get_device_module(device.type)
        return _RngState(torch.get_rng_state(), device, module.get_rng_state(device))

    @contextmanager
    def restored(self) -> Iterator[None]:
        """Runs the block from this state; the generators are put back afterwards."""
        if self.device is None:
            with torch.random.fork_rng(devices=[]):
                torch.set_rng_state(self.cpu)
                yield
            return
        with torch.random.fork_rng(devices=[self.device], device_type=self.device.type):
            torch.set_rng_state(self.cpu)
            torch.get_device_module(self.device.type).set_rng_state(self.device_state,
                                                                    self.device)
            yield


@dataclass
class _Boundary:
    params: Params
    state: OptState
    buffers: Buffers
    rng: _RngState


# -- schedules: which states a checkpointed unroll stores, which steps it recomputes -----------


def binomial_recomputations(steps: int, snapshots: int) -> int:
    """The fewest untaped steps that reverse ``steps`` inner steps with ``snapshots`` stored states.

    Griewank's binomial bound ("Algorithm 799: revolve", Griewank and Walther, ACM TOMS 2000)
    in this module's terms: the initial state is held (it is the unroll's input) and at most
    ``snapshots`` further states are stored at once. With ``r`` the smallest integer such that
    ``steps <= C(snapshots + 1 + r, snapshots + 1)``, the count is
    ``r * steps - C(snapshots + r + 1, snapshots + 2)``; with no snapshot it is
    ``steps * (steps - 1) / 2``, with ``snapshots >= steps - 1`` it is zero.
    """
    if steps <= 1:
        return 0
    if snapshots == 0:
        return steps * (steps - 1) // 2
    repetitions = 0
    while math.comb(snapshots + 1 + repetitions, snapshots + 1) < steps:
        repetitions += 1
    return repetitions * steps - math.comb(snapshots + repetitions + 1, snapshots + 2)


def _binomial_split(steps: int, free: int) -> int:
    """Where to store the next state when reversing ``steps`` steps with ``free`` slots.

    The offset ``m`` minimising ``m + cost(steps - m, free - 1) + cost(m, free)`` (advance m
    steps and store, reverse the right part with one slot less, then the left part): the
    optimal binomial split. The cost is convex in ``m``, so a bisection on its slope finds the
    largest minimiser (the largest keeps the forward sweep's last stored state nearest the end).
    """
    def cost(m: int) -> int:
        return (m + binomial_recomputations(steps - m, free - 1)
                + binomial_recomputations(m, free))

    best, low, high = 1, 2, steps - 1
    while low <= high:
        middle = (low + high) // 2
        if cost(middle) <= cost(middle - 1):
            best, low = middle, middle + 1
        else:
            high = middle - 1
    return best


class _Schedule:
    """A checkpointing schedule: the states the forward sweep stores and, in the reverse sweep,
    whether to store another state or which run of steps to tape (recompute with a graph)
    next. ``budget``: most stored states at once besides the initial one (``None``: unbounded).
    """

    budget: int | None = None

    def forward_stores(self, steps: int) -> list[int]:
        raise NotImplementedError

    def next(self, top: int, end: int, free: int) -> tuple[str, int]:
        """``("store", m)`` or ``("tape", start)``, given the last stored state ``top``, the
        steps ``top..end-1`` still to reverse and ``free`` slots."""
        raise NotImplementedError


class _Segments(_Schedule):
    """Every ``length``-th state stored; each segment taped whole (``length`` steps' graphs)."""

    def __init__(self, length: int) -> None:
        self.length = length

    def forward_stores(self, steps: int) -> list[int]:
        return list(range(self.length, steps, self.length))

    def next(self, top: int, end: int, free: int) -> tuple[str, int]:
        return "tape", top


class _Binomial(_Schedule):
    """The binomial (revolve) schedule: at most ``budget`` stored states, one step taped at a
    time, the fewest recomputed steps for that budget (``binomial_recomputations``)."""

    def __init__(self, snapshots: int) -> None:
        self.budget = snapshots

    def forward_stores(self, steps: int) -> list[int]:
        # The states the reverse sweep would store first (before taping anything): storing
        # them during the forward sweep, which passes them anyway, saves recomputing them.
        stores, top, free = [], 0, self.budget or 0
        while free > 0 and steps - top > 1:
            top += _binomial_split(steps - top, free)
            stores.append(top)
            free -= 1
        return stores

    def next(self, top: int, end: int, free: int) -> tuple[str, int]:
        if end - top == 1:
            return "tape", top
        if free <= 0:
            return "tape", end - 1
        return "store", top + _binomial_split(end - top, free)


class _Losses:
    """The detached inner losses of a long unroll, copied into one ``[K]`` tensor as they come.

    Keeping each step's 0-d loss until the end (or even for a few hundred steps before stacking
    them) costs more than its four bytes: it pins a small allocation made in the middle of that
    step's transient ones, so after thousands of steps the heap is fragmented around the pinned
    losses and the process's RSS grows with K while its live tensors do not (the small MLP of
    ``benchmarks/unroll_memory.py`` at K=1000: the forward sweep's RSS rose by 9.8 MiB for 5.2
    MiB of live allocations with a list stacked every 256 steps, by 6.8 MiB with this buffer).
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.values: Tensor | None = None

    def put(self, k: int, loss: Tensor) -> None:
        if self.values is None:  # the first loss says the dtype and the device
            self.values = loss.new_empty(self.steps)
        self.values[k] = loss

    def stacked(self) -> Tensor:
        assert self.values is not None, "an unroll has at least one step"
        return self.values


@dataclass
class _Snapshot:
    """A stored state: the step it is the state before, and the path's own representation."""

    step: int
    payload: Any


def _reverse(schedule: _Schedule, steps: int, stack: list[_Snapshot],
             advance: Callable[[_Snapshot, int], Any],
             tape: Callable[[_Snapshot, int, int], None]) -> int:
    """Walks ``schedule`` backwards from step ``steps``: the one reverse sweep of both paths.

    ``stack`` holds the initial state (step 0) and the forward sweep's stored states in order;
    it is consumed: a stored state is dropped as soon as the step it starts has been taped,
    freeing its slot. ``advance(snapshot, m)`` recomputes (without a graph) the state before
    step ``m``; ``tape(snapshot, start, end)`` recomputes up to ``start`` without a graph, then
    steps ``start..end-1`` with one, and backpropagates through them.

    Returns:
        The most states stored at once besides the initial one.
    """
    end, most = steps, len(stack) - 1
    while end > 0:
        top = stack[-1]
        free = (1 << 62) if schedule.budget is None else schedule.budget - (len(stack) - 1)
        action, position = schedule.next(top.step, end, free)
        if action == "store":
            stack.append(_Snapshot(position, advance(top, position)))
            most = max(most, len(stack) - 1)
            continue
        tape(top, position, end)
        if position == top.step and top.step > 0:
            stack.pop()
        del top
        end = position
    return most


@dataclass(frozen=True)
class CheckpointPlan:
    """What a checkpointing schedule costs for a number of inner steps (``Checkpoint.plan``).

    Attributes:
        steps: the number of inner steps K.
        stored_states: the most states held at once besides the initial one (each a copy of the
            adapted parameters, the optimizer state and the buffers).
        recomputed_steps: steps recomputed without a graph during the backward pass, on top of
            the K steps of the forward pass and the K steps recomputed with a graph.
        longest_taped_run: the most steps whose second-order graph is alive at once.
    """

    steps: int
    stored_states: int
    recomputed_steps: int
    longest_taped_run: int


@dataclass(frozen=True)
class Checkpoint:
    """A checkpointing schedule for ``unroll(..., checkpoint=...)`` and the learners.

    A checkpointed unroll runs the K inner steps forward without a second-order graph, keeps a
    few intermediate states (adapted parameters, optimizer state, buffers, RNG state), and in
    the backward pass recomputes each step from a stored state with a graph and backpropagates
    through it. The meta-gradient equals the plain unroll's (float64, to 1e-10). Memory is the
    stored states plus the graph of the steps taped at once.

    Give one of:

    - ``snapshots=s`` (the default, ``s = DEFAULT_SNAPSHOTS``): the binomial ("revolve")
      schedule. At most ``s`` states are stored at once, whatever K is, and one step is taped
      at a time, so memory is flat in K. The price is recomputation, the fewest possible for
      ``s`` states (``binomial_recomputations``): none while ``s >= K - 1``; about ``r`` extra
      steps per step when ``K <= C(s + 1 + r, s + 1)`` (with ``s = 10``: 2 up to K = 78, 3 up to
      364, 4 up to 1,365, 6 up to 12,376).
    - ``segment=S``: the fixed-segment schedule (``checkpoint=S`` with an int): every S-th
      state stored (K / S states, growing with K), each segment of S steps taped whole (S
      steps' graphs alive at once), no extra recomputation.

    ``plan(K)`` says what a schedule costs for K steps before running it.

    Example:
        >>> metazoo.Checkpoint(snapshots=4).plan(100)
        CheckpointPlan(steps=100, stored_states=4, recomputed_steps=..., longest_taped_run=1)
    """

    snapshots: int | None = None
    segment: int | None = None

    def __post_init__(self) -> None:
        if self.snapshots is not None and self.segment is not None:
            raise ValueError(f"Checkpoint takes snapshots= (the binomial schedule) or segment= "
                             f"(fixed segments), not both; got snapshots={self.snapshots!r}, "
                             f"segment={self.segment!r}")
        for name, value, least in (("snapshots", self.snapshots, 0),
                                   ("segment", self.segment, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < least):
                raise ValueError(f"Checkpoint({name}=...) must be an int >= {least}, got "
                                 f"{value!r}")
        if self.snapshots is None and self.segment is None:
            object.__setattr__(self, "snapshots", DEFAULT_SNAPSHOTS)  # the default schedule

    def _schedule(self) -> _Schedule:
        if self.segment is not None:
            return _Segments(self.segment)
        assert self.snapshots is not None
        return _Binomial(self.snapshots)

    def plan(self, steps: int, *, vectorized: bool = False) -> CheckpointPlan:
        """The schedule's cost for ``steps`` inner steps, by walking it without computing.

        Args:
            steps: the number of inner steps K.
            vectorized: the cost in ``metazoo.vectorize.functional_unroll``, whose binomial
                forward sweep stores nothing (see there), so the backward pass recomputes the
                states the loop's forward sweep stores.
        """
        schedule = self._schedule()
        stores = _forward_stores(schedule, steps, vectorized=vectorized)
        counts = {"recomputed": 0, "longest": 0}

        def advance(snapshot: _Snapshot, stop: int) -> None:
            counts["recomputed"] += stop - snapshot.step

        def tape(snapshot: _Snapshot, start: int, end: int) -> None:
            counts["recomputed"] += start - snapshot.step
            counts["longest"] = max(counts["longest"], end - start)

        stack = [_Snapshot(k, None) for k in (0, *stores)]
        stored = _reverse(schedule, steps, stack, advance, tape)
        return CheckpointPlan(steps, stored, counts["recomputed"], counts["longest"])


def _forward_stores(schedule: _Schedule, steps: int, *, vectorized: bool) -> list[int]:
    if vectorized and isinstance(schedule, _Binomial):
        return []
    return schedule.forward_stores(steps)


def check_checkpoint(checkpoint: Any) -> Checkpoint | None:
    """Validates a ``checkpoint`` option and returns its schedule (``None``: no checkpointing).

    ``None``/``False``: keep the whole graph. ``True``: ``Checkpoint()`` (binomial schedule,
    ``DEFAULT_SNAPSHOTS`` stored states). An int S: ``Checkpoint(segment=S)`` (fixed segments of
    S steps, the meaning ``checkpoint=S`` has always had). A ``Checkpoint``: itself.
    """
    if checkpoint is None or checkpoint is False:
        return None
    if checkpoint is True:
        return Checkpoint()
    if isinstance(checkpoint, Checkpoint):
        return checkpoint
    if isinstance(checkpoint, int) and checkpoint >= 1:
        return Checkpoint(segment=checkpoint)
    raise ValueError(f"checkpoint must be None, True or a segment length >= 1, or "
                     f"metazoo.Checkpoint(snapshots=N) for a budget of N stored states (True "
                     f"is Checkpoint(snapshots={DEFAULT_SNAPSHOTS})); got {checkpoint!r}")


@dataclass(frozen=True)
class _Layout:
    """How the flat tensor inputs of ``_CheckpointedUnroll`` map back to dicts."""

    names: list[str]
    static_names: list[str]
    num_hyper: int
    state_template: OptState
    buffer_names: list[str]

    def split(self, tensors: Sequence[Tensor]) -> tuple[list[Tensor], ...]:
        sizes = [len(self.names), len(self.static_names), self.num_hyper,
                 len(_tensor_leaves(self.state_template)), len(self.buffer_names)]
        parts, offset = [], 0
        for size in sizes:
            parts.append(list(tensors[offset:offset + size]))
            offset += size
        return tuple(parts)


def _carried(params: Params, state: OptState, buffers: Buffers) -> list[Tensor]:
    """The tensors one step hands to the next: parameters, optimizer state, buffers."""
    return [*params.values(), *_tensor_leaves(state), *buffers.values()]


class _CheckpointedUnroll(torch.autograd.Function):
    """The unroll as one autograd node that recomputes steps during its backward pass.

    Inputs (after the non-tensor ``run``, ``schedule``, ``keep_trajectory`` and ``layout``):
    adapted parameters, static parameters, hyperparameter tensors, initial optimizer-state
    tensors and initial buffers, flattened. Outputs: the points of the trajectory (parameters
    then buffers of each; only the final point without ``keep_trajectory``), the final
    optimizer-state tensors, and the detached losses.
    Optimizer state and buffers (differentiable BatchNorm running statistics) are carried
    through the backward pass like the parameters; recomputation starts from a stored state's
    own buffers and RNG state, so running statistics are never updated twice.
    """

    @staticmethod
    def forward(ctx: Any, run: _Run, schedule: _Schedule, keep_trajectory: bool,
                layout: _Layout, *tensors: Tensor) -> tuple[Tensor, ...]:
        params_t, static_t, hyper, state_t, buffers_t = layout.split(
            [t.detach() for t in tensors])
        params = dict(zip(layout.names, params_t))
        static = dict(zip(layout.static_names, static_t))
        state = _replace_tensor_leaves(layout.state_template, state_t)
        buffers = dict(zip(layout.buffer_names, buffers_t))
        optimizer = run.optimizer.with_hyperparameter_tensors(hyper)
        device = tensors[0].device

        stores = set(schedule.forward_stores(run.steps))
        snapshots = [_Snapshot(0, _Boundary(params, state, buffers, _RngState.capture(device)))]
        losses = _Losses(run.steps)
        # Point 0 is cloned: an input returned as an output would alias it.
        points = ([[t.clone() for t in (*params.values(), *buffers.values())]]
                  if keep_trajectory else [])
        for k in range(run.steps):
            if k in stores:
                snapshots.append(_Snapshot(k, _Boundary(params, state, buffers,
                                                        _RngState.capture(device))))
            params, state, buffers, loss = run.step(k, params, static, buffers, state, optimizer,
                                                    create_graph=False)
            losses.put(k, loss)
            if keep_trajectory:
                points.append([*params.values(), *buffers.values()])
        if not keep_trajectory:
            points = [[*params.values(), *buffers.values()]]

        ctx.run, ctx.schedule, ctx.keep_trajectory = run, schedule, keep_trajectory
        ctx.layout, ctx.device = layout, device
        ctx.snapshots = snapshots
        ctx.static_tensors, ctx.hyper_tensors = static_t, hyper
        run.final_state = state
        losses_tensor = losses.stacked()
        ctx.mark_non_differentiable(losses_tensor)
        ctx.set_materialize_grads(False)
        return (*(t for point in points for t in point), *_tensor_leaves(state), losses_tensor)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: Tensor | None) -> tuple[Tensor | None, ...]:
        run: _Run = ctx.run
        layout: _Layout = ctx.layout
        n, m, num_hyper = len(layout.names), len(layout.static_names), layout.num_hyper
        num_state = len(_tensor_leaves(layout.state_template))
        width = n + len(layout.buffer_names)  # tensors per trajectory point
        needs_static, needs_hyper = (any(ctx.needs_input_grad[4 + n:4 + n + m]),
                                     any(ctx.needs_input_grad[4 + n + m:4 + n + m + num_hyper]))
        # Gradients arriving at each kept point of the trajectory (parameters, then buffers).
        points = range(run.steps + 1) if ctx.keep_trajectory else [run.steps]
        point_grads = {k: list(grad_outputs[i * width:(i + 1) * width])
                       for i, k in enumerate(points)}
        final = point_grads.pop(run.steps)
        state_grads = grad_outputs[len(points) * width:-1]  # losses have no gradient
        carry: list[Tensor | None] = [*final[:n], *state_grads, *final[n:]]
        static_grads: list[Tensor | None] = [None] * m
        hyper_grads: list[Tensor | None] = [None] * num_hyper
        constant_optimizer = run.optimizer.with_hyperparameter_tensors(ctx.hyper_tensors)
        constant_static = dict(zip(layout.static_names, ctx.static_tensors))

        def advance_from(boundary: _Boundary, start: int, stop: int) -> _Boundary:
            # Inside the caller's ``boundary.rng.restored()``: the steps draw the same random
            # numbers as in the forward sweep.
            params, state, buffers = boundary.params, boundary.state, boundary.buffers
            with torch.no_grad():
                for k in range(start, stop):
                    params, state, buffers, _ = run.step(k, params, constant_static, buffers,
                                                         state, constant_optimizer,
                                                         create_graph=False)
            return _Boundary(params, state, buffers, _RngState.capture(ctx.device))

        def advance(snapshot: _Snapshot, stop: int) -> _Boundary:
            with snapshot.payload.rng.restored():
                return advance_from(snapshot.payload, snapshot.step, stop)

        def tape(snapshot: _Snapshot, start: int, end: int) -> None:
            nonlocal carry, static_grads, hyper_grads
            with torch.enable_grad(), snapshot.payload.rng.restored():
                boundary = advance_from(snapshot.payload, snapshot.step, start)
                leaves = [t.detach().requires_grad_(t.is_floating_point())
                          for t in _carried(boundary.params, boundary.state, boundary.buffers)]
                params = dict(zip(layout.names, leaves[:n]))
                state = _replace_tensor_leaves(boundary.state, leaves[n:n + num_state])
                buffers = dict(zip(layout.buffer_names, leaves[n + num_state:]))
                static_leaves = [t.detach().requires_grad_(needs_static)
                                 for t in ctx.static_tensors]
                hyper_leaves = [t.detach().requires_grad_(needs_hyper)
                                for t in ctx.hyper_tensors]
                optimizer = run.optimizer.with_hyperparameter_tensors(hyper_leaves)
                static = dict(zip(layout.static_names, static_leaves))

                # (output, incoming gradient) pairs: intermediate trajectory points with
                # gradients, then everything the taped run hands to the next step.
                pairs: list[tuple[Tensor, Tensor | None]] = []
                for k in range(start, end):
                    params, state, buffers, _ = run.step(k, params, static, buffers, state,
                                                         optimizer, create_graph=True)
                    if k + 1 < end and k + 1 in point_grads:
                        pairs += zip([*params.values(), *buffers.values()],
                                     point_grads.pop(k + 1))
                pairs += zip(_carried(params, state, buffers), carry)
                pairs = [(t, g) for t, g in pairs if g is not None and t.requires_grad]
                outputs = [t for t, _ in pairs]
                output_grads = [g for _, g in pairs]

                inputs = [t for t in leaves if t.requires_grad]
                if needs_static:
                    inputs += static_leaves
                if needs_hyper:
                    inputs += hyper_leaves
                grads = list(torch.autograd.grad(outputs, inputs, output_grads, allow_unused=True)
                             if outputs else [None] * len(inputs))

            carry = [grads.pop(0) if t.requires_grad else None for t in leaves]
            if needs_static:
                static_grads = [_add(a, b) for a, b in zip(static_grads, grads[:m])]
                del grads[:m]
            if needs_hyper:
                hyper_grads = [_add(a, b) for a, b in zip(hyper_grads, grads[:num_hyper])]
            if start in point_grads:
                arriving = point_grads.pop(start)
                carry[:n] = [_add(a, b) for a, b in zip(carry[:n], arriving[:n])]
                carry[n + num_state:] = [_add(a, b)
                                         for a, b in zip(carry[n + num_state:], arriving[n:])]

        stack, ctx.snapshots = ctx.snapshots, None  # consumed: states dropped once passed
        _reverse(ctx.schedule, run.steps, stack, advance, tape)
        return (None, None, None, None, *carry[:n], *static_grads, *hyper_grads, *carry[n:])


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _validate(params: Params, static: Params, batches: Sequence[Batch], steps: int,
              checkpoint: Checkpoint | int | bool | None, inner_grad_clip: float | None,
              backward_grad_clip: float | None) -> None:
    if not isinstance(params, dict) or not params:
        raise ValueError("params must be a non-empty dict of name -> tensor (metazoo.params_of)")
    for name, p in params.items():
        if not isinstance(p, Tensor) or not p.is_floating_point():
            raise ValueError(f"adapted param {name!r} must be a floating-point tensor")
    overlap = sorted(set(params) & set(static))
    if overlap:
        raise ValueError(f"names {overlap} are both adapted and static; pass each name once")
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Sequence) or not batches:
        raise ValueError(
            "batches must be a non-empty sequence (list/tuple) of batches; step k uses "
            "batches[k % len(batches)]. For one batch reused every step pass [batch]."
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    check_checkpoint(checkpoint)
    for name, value in (("inner_grad_clip", inner_grad_clip),
                        ("backward_grad_clip", backward_grad_clip)):
        if value is not None and not (isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{name} must be None or a positive number, got {value!r}")


def unroll(
    loss_fn: LossFn,
    params: Params,
    optimizer: InnerOptimizer,
    batches: Sequence[Batch],
    *,
    steps: int | None = None,
    static: Params | None = None,
    buffers: Buffers | None = None,
    state: OptState | None = None,
    first_order: bool = False,
    checkpoint: Checkpoint | int | bool | None = None,
    inner_grad_clip: float | None = None,
    backward_grad_clip: float | None = None,
    keep_trajectory: bool = False,
) -> UnrollResult:
    """Runs ``steps`` differentiable inner steps of ``optimizer`` on ``loss_fn``.

    Args:
        loss_fn: ``loss_fn(params, buffers, batch) -> (loss, buffers)``. ``params`` holds the
            adapted and static parameters merged. Everything that should receive a
            meta-gradient must come in through ``params``, ``static`` or a tensor hyperparameter
            of ``optimizer``; tensors the function closes over are constants under checkpointing.
        params: the parameters to adapt (the initialisation); usually requiring grad.
        optimizer: a ``metazoo.optim`` optimizer; tensor hyperparameters receive gradients.
        batches: step k uses ``batches[k % len(batches)]``; ``[batch]`` reuses one batch.
        steps: number of inner steps K (default ``len(batches)``).
        static: parameters the loss uses but the inner loop does not adapt (frozen body, warp
            layers). They receive meta-gradients through the unroll.
        buffers: explicit buffers passed to ``loss_fn`` (default empty).
        state: initial optimizer state (default ``optimizer.init(params)``).
        first_order: use inner gradients as constants (no second-order terms, no second-order
            graph); running statistics updated in the loop are constants too (detached).
        checkpoint: ``None``/``False`` keeps the whole graph. ``True`` or ``Checkpoint()``: the
            binomial schedule with ``DEFAULT_SNAPSHOTS`` stored states, memory flat in K;
            ``Checkpoint(snapshots=s)`` chooses the budget. An int S (``Checkpoint(segment=S)``)
            stores every S-th state and recomputes S-step segments. Exact: the same
            meta-gradients as the plain unroll. Ignored (plain unroll) with ``first_order``, for
            one step, or when nothing requires grad.
        inner_grad_clip: clip the global norm of each inner gradient before the step.
        backward_grad_clip: clip the global norm of the gradient flowing back into each step's
            parameters during the meta-backward pass ("max grad-grad norm").
        keep_trajectory: also return every intermediate point and its buffers (e.g. for a
            multi-step loss).

    Returns:
        An ``UnrollResult``.
    """
    static = dict(static or {})
    buffers = dict(buffers or {})
    steps = len(batches) if steps is None and isinstance(batches, Sequence) else steps
    _validate(params, static, batches, steps, checkpoint, inner_grad_clip,  # type: ignore[arg-type]
              backward_grad_clip)
    assert steps is not None
    if state is None:
        state = optimizer.init(params)
    run = _Run(loss_fn, optimizer, batches, steps, inner_grad_clip, backward_grad_clip)

    hyper = optimizer.hyperparameter_tensors()
    differentiable = torch.is_grad_enabled() and any(
        t.requires_grad for t in (*params.values(), *static.values(), *hyper,
                                  *_tensor_leaves(state), *buffers.values()))
    schedule = check_checkpoint(checkpoint)
    if differentiable and not first_order and schedule is not None and steps > 1:
        return _checkpointed(run, params, static, buffers, state, hyper, schedule._schedule(),
                             keep_trajectory)

    create_graph = differentiable and not first_order
    trajectory, buffer_trajectory = [params], [buffers]
    losses = []
    for k in range(steps):
        params, state, buffers, loss = run.step(k, params, static, buffers, state, optimizer,
                                                create_graph=create_graph)
        losses.append(loss)
        if keep_trajectory:
            trajectory.append(params)
            buffer_trajectory.append(buffers)
    if not keep_trajectory:
        return UnrollResult(params, state, buffers, torch.stack(losses))
    return UnrollResult(params, state, buffers, torch.stack(losses), trajectory,
                        buffer_trajectory)


def _checkpointed(run: _Run, params: Params, static: Params, buffers: Buffers, state: OptState,
                  hyper: list[Tensor], schedule: _Schedule, keep_trajectory: bool
                  ) -> UnrollResult:
    names, static_names = list(params), list(static)
    for batch in run.batches:
        if any(t.requires_grad for t in _tensor_leaves(batch)):
            raise ValueError("checkpointed unrolls treat batches as constants; detach batch "
                             "tensors or use checkpoint=None")
    state_tensors = _tensor_leaves(state)
    layout = _Layout(names, static_names, len(hyper), state, list(buffers))
    outputs = _CheckpointedUnroll.apply(run, schedule, keep_trajectory, layout,
                                        *params.values(), *static.values(), *hyper,
                                        *state_tensors, *buffers.values())
    n, width = len(names), len(names) + len(buffers)
    num_points = run.steps + 1 if keep_trajectory else 1
    flat_points = [outputs[i * width:(i + 1) * width] for i in range(num_points)]
    points = [dict(zip(names, point[:n])) for point in flat_points]
    point_buffers = [dict(zip(buffers, point[n:])) for point in flat_points]
    final_state = _replace_tensor_leaves(run.final_state, outputs[num_points * width:-1])
    losses = outputs[-1]
    return UnrollResult(points[-1], final_state, point_buffers[-1], losses,
                        points if keep_trajectory else None,
                        point_buffers if keep_trajectory else None)
