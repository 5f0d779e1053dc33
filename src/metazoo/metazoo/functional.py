"""Calling an ``nn.Module`` as a pure function of explicit parameters and buffers.

Adaptation never mutates a module: parameters travel as ``Params`` dicts and BatchNorm
statistics travel as ``Buffers`` dicts. A forward pass returns the output together with the
buffers it produced, so a recomputed step (gradient checkpointing) yields the same statistics
again instead of updating them twice.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from metazoo import layers as _layers
from metazoo.batchnorm import batch_norm as _closed_form_batch_norm

Params = dict[str, Tensor]
Buffers = dict[str, Tensor]

__all__ = [
    "BatchNormMode",
    "Buffers",
    "Params",
    "check_params",
    "closed_form_batch_norm",
    "forward",
    "initial_buffers",
    "make_loss_fn",
    "params_of",
    "split_params",
]


class BatchNormMode(enum.StrEnum):
    """How BatchNorm layers compute and keep statistics during meta-learning.

    Attributes:
        BATCH: transductive; every forward pass (support and query) normalises with the
            statistics of its own batch, as in the MAML paper's protocol. Running statistics are
            neither used nor updated.
        RUNNING: inductive; each task starts from fresh running statistics (mean 0, var 1),
            inner training steps normalise with batch statistics and update the task's running
            statistics, and evaluation (``training=False``) normalises with them. The statistics
            are updated out of place and are differentiable with respect to the parameters, so
            meta-gradients include their dependence on the initialisation.
    """

    BATCH = "batch"
    RUNNING = "running"


def params_of(module: nn.Module, *, detach: bool = False) -> Params:
    """Returns the module's parameters as a ``Params`` dict (the tensors themselves, not copies).

    Args:
        module: any ``nn.Module``.
        detach: return detached views instead of the parameters.
    """
    return {name: (p.detach() if detach else p) for name, p in module.named_parameters()}


def split_params(params: Params, predicate: Callable[[str], bool]) -> tuple[Params, Params]:
    """Splits ``params`` by name into ``(selected, rest)``, keeping the original order."""
    selected = {name: p for name, p in params.items() if predicate(name)}
    rest = {name: p for name, p in params.items() if name not in selected}
    return selected, rest


def check_params(module: nn.Module, params: Params) -> None:
    """Raises ``ValueError`` naming missing, extra or misshapen entries of ``params``.

    Args:
        module: the module the parameters are meant for.
        params: the full parameter dict (adapted and static parts merged).
    """
    expected = dict(module.named_parameters())
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if missing or extra:
        raise ValueError(
            f"params do not match {type(module).__name__}: missing {missing}, unexpected {extra}. "
            "Build them with metazoo.params_of(module) (and split_params to partition them)."
        )
    for name, p in params.items():
        if p.shape != expected[name].shape:
            raise ValueError(
                f"param {name!r} has shape {tuple(p.shape)} but the module expects "
                f"{tuple(expected[name].shape)}"
            )


def _batchnorm_modules(module: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, _BatchNorm)]


def _batchnorm_buffer_names(module: nn.Module) -> set[str]:
    names = set()
    for prefix, bn in _batchnorm_modules(module):
        for buffer_name, _ in bn.named_buffers(recurse=False):
            names.add(f"{prefix}.{buffer_name}" if prefix else buffer_name)
    return names


def initial_buffers(module: nn.Module, bn_mode: BatchNormMode | str) -> Buffers:
    """The buffers a task starts from: copies of the module's, BatchNorm statistics reset.

    In ``RUNNING`` mode each task gets fresh statistics (running mean 0, running var 1, count 0),
    so evaluation on one task never sees statistics of another. In ``BATCH`` mode the statistics
    are not used, and the module's own values are copied unchanged.
    """
    bn_mode = BatchNormMode(bn_mode)
    buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
    if bn_mode is BatchNormMode.RUNNING:
        for name in _batchnorm_buffer_names(module):
            if name not in buffers:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_mean" or leaf == "num_batches_tracked":
                buffers[name].zero_()
            elif leaf == "running_var":
                buffers[name].fill_(1.0)
    return buffers


@dataclass(frozen=True)
class _Structure:
    """What ``forward`` needs to know about a module tree, computed once per tree shape.

    Recomputing the slot names (``named_parameters(remove_duplicate=False)`` plus
    ``get_submodule`` per name) and walking ``modules()`` on every call cost about as much as
    the network's own Python overhead; ``forward`` runs hundreds of times per meta-step.
    ``key`` records every module's child, parameter and buffer slots (names and tensor ids), so
    any change to the tree (a new or replaced submodule, parameter or buffer, weights tied or
    untied) gives another key and a recomputation. Modules are held by position, never the root
    itself, so the cache (keyed weakly by the root) does not keep the root alive.
    """

    key: tuple[Any, ...]
    submodules: list[nn.Module]  # module.modules() without the root, in order
    param_slots: dict[str, list[str]]
    buffer_slots: dict[str, list[str]]
    batchnorms: list[tuple[str, int]]  # (prefix, index into [root, *submodules])


_STRUCTURES: weakref.WeakKeyDictionary[nn.Module, _Structure] = weakref.WeakKeyDictionary()


def _structure_key(modules: list[nn.Module]) -> tuple[Any, ...]:
    return tuple(
        (id(m), tuple(m._modules), tuple(map(id, m._modules.values())),
         tuple(m._parameters), tuple(map(id, m._parameters.values())),
         tuple(m._buffers), tuple(map(id, m._buffers.values())))
        for m in modules)


def _structure(module: nn.Module) -> tuple[_Structure, list[nn.Module]]:
    """The cached ``_Structure`` of ``module`` (recomputed if the tree changed) and its modules.

    Under ``torch.compile`` the cache is bypassed: Dynamo would guard on the weak dictionary's
    keys, which change as other models come and go (guard errors, recompilations); the
    structure is traced afresh instead, and the compiled graph guards on the modules."""
    cached = None if torch.compiler.is_compiling() else _STRUCTURES.get(module)
    if cached is not None:
        modules = [module, *cached.submodules]
        if _structure_key(modules) == cached.key:
            return cached, modules
    modules = list(module.modules())
    index = {id(m): i for i, m in enumerate(modules)}
    structure = _Structure(
        key=_structure_key(modules), submodules=modules[1:],
        param_slots=_slot_names(module, module.named_parameters),
        buffer_slots=_slot_names(module, module.named_buffers),
        batchnorms=[(name, index[id(m)]) for name, m in _batchnorm_modules(module)])
    if not torch.compiler.is_compiling():
        _STRUCTURES[module] = structure
    return structure, modules


@contextmanager
def _training_flags(modules: list[nn.Module], training: bool) -> Iterator[None]:
    # Setting ``training`` goes through ``nn.Module.__setattr__``: skip modules already right.
    changed = [m for m in modules if m.training != training]
    try:
        for m in changed:
            m.training = training
        yield
    finally:
        for m in changed:
            m.training = not training


class _BatchNormCalls(TorchFunctionMode):
    """Routes the ``F.batch_norm`` calls of BatchNorm modules during ``forward``.

    ``forward`` swaps ``None`` into the modules' ``num_batches_tracked`` slots (and in BATCH mode
    into their running statistics), so a module's own ``forward`` neither updates statistics in
    place nor reads them, and calls ``F.batch_norm`` with batch statistics (``training=True``)
    or, in RUNNING evaluation passes, with its running statistics. Here the call normalises:
    batch statistics through ``F.batch_norm`` or ``metazoo.batchnorm.batch_norm`` (the closed-form
    double backward, see ``closed_form_batch_norm``), RUNNING statistics updated out of place and
    differentiably into ``updates``. No module attribute is changed, so ``torch.compile`` can
    trace it. With ``closed_form`` it also routes ``F.conv2d`` and ``F.max_pool2d`` on 4-d inputs
    through ``metazoo.layers`` (the same values and first derivatives; vmap rules that keep the
    tasks' layout and a double backward of few operations).

    Args:
        running: RUNNING mode only: ``id`` of each running-mean tensor swapped in -> (buffer name
            prefix, the module, its ``num_batches_tracked`` tensor or ``None``).
        updates: receives the new running statistics.
        closed_form: normalise with ``metazoo.batchnorm.batch_norm``, convolve and pool with
            ``metazoo.layers``.
    """

    def __init__(self, running: dict[int, tuple[str, _BatchNorm, Tensor | None]],
                 updates: Buffers, closed_form: bool) -> None:
        super().__init__()
        self.running, self.updates, self.closed_form = running, updates, closed_form

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return self.batch_norm(*args, **kwargs)
        if self.closed_form and not torch.compiler.is_compiling():
            # Dynamo cannot trace an autograd.Function under vmap (torch 2.14).
            if func is F.conv2d:
                return _conv2d(*args, **kwargs)
            if func is F.max_pool2d:
                return _max_pool2d(*args, **kwargs)
        return func(*args, **kwargs)

    def batch_norm(self, x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                   weight: Tensor | None = None, bias: Tensor | None = None,
                   training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
        if running_mean is not None and running_var is not None and not training:
            shape = [1, -1] + [1] * (x.dim() - 2)
            output = (x - running_mean.view(shape)) * torch.rsqrt(running_var + eps).view(shape)
            if weight is not None and bias is not None:
                output = output * weight.view(shape) + bias.view(shape)
            return output
        if self.closed_form and not torch.compiler.is_compiling():
            # Dynamo cannot trace an autograd.Function under vmap (torch 2.14); compiled code
            # has its double backward fused by the compiler instead.
            output = _closed_form_batch_norm(x, weight, bias, eps)
        else:
            output = F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
        if running_mean is not None and running_var is not None:
            prefix, bn, tracked = self.running[id(running_mean)]
            dims = [0, *range(2, x.dim())]
            count = (tracked if tracked is not None else x.new_zeros((), dtype=torch.long)) + 1
            factor = (1.0 / count).to(x.dtype) if bn.momentum is None else bn.momentum
            self.updates[prefix + "running_mean"] = torch.lerp(running_mean, x.mean(dims),
                                                               factor)
            self.updates[prefix + "running_var"] = torch.lerp(
                running_var, x.var(dims, correction=1), factor)
            self.updates[prefix + "num_batches_tracked"] = count
        return output


def _conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1,
            padding: Any = 0, dilation: Any = 1, groups: int = 1) -> Any:
    if x.dim() != 4 or isinstance(padding, str):
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return _layers.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _max_pool2d(x: Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0,
                dilation: Any = 1, ceil_mode: bool = False, return_indices: bool = False
                ) -> Any:
    if x.dim() != 4 or return_indices:
        return F.max_pool2d(x, kernel_size, stride, padding, dilation,  # type: ignore[call-overload]
                            ceil_mode=ceil_mode, return_indices=return_indices)
    return _layers.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)


_closed_form = False


@contextmanager
def closed_form_batch_norm(enabled: bool = True) -> Iterator[None]:
    """Within the block, ``forward`` normalises with ``metazoo.batchnorm.batch_norm``.

    Its forward pass and first derivatives are bit-identical to ``F.batch_norm``'s; its second
    derivative is a closed form of 22 operations per layer instead of PyTorch's 114, equal
    to rounding (float64: 1e-16 relative). ``F.conv2d`` and ``F.max_pool2d`` go through
    ``metazoo.layers`` inside the block (bit-identical forward and first derivatives too; vmap
    rules that keep the tasks folded). The vectorized meta-batches always use it; the
    per-task loops use PyTorch's functions unless run inside this block, so second-order
    float32 results of the loops (published runs) stay bit for bit what they were.

    Args:
        enabled: ``False`` restores ``F.batch_norm`` inside the block.
    """
    global _closed_form
    previous, _closed_form = _closed_form, enabled
    try:
        yield
    finally:
        _closed_form = previous


def forward(
    module: nn.Module,
    params: Params,
    buffers: Buffers,
    *args: Any,
    bn_mode: BatchNormMode | str = BatchNormMode.BATCH,
    training: bool = True,
    **kwargs: Any,
) -> tuple[Any, Buffers]:
    """Runs ``module`` as a pure function of ``params`` and ``buffers``.

    Args:
        module: the network; its own parameters and buffers are neither read nor written
            (every parameter and buffer must be in ``params`` / ``buffers``).
        params: all parameters of the module by name.
        buffers: all buffers of the module by name (see ``initial_buffers``).
        *args: inputs to the module.
        bn_mode: see ``BatchNormMode``.
        training: train-mode behaviour (dropout, and in ``RUNNING`` mode whether BatchNorm uses
            and updates batch statistics or normalises with the running ones).
        **kwargs: keyword inputs to the module.

    Returns:
        ``(output, new_buffers)``: ``new_buffers`` is a new dict; in ``RUNNING`` training passes
        its BatchNorm statistics are new tensors, differentiable with respect to ``params``.
        The input dict and its tensors are left untouched.
    """
    bn_mode = BatchNormMode(bn_mode)
    updates: Buffers = {}
    structure, modules = _structure(module)
    slots = _slots(module, structure, params, buffers)
    running: dict[int, tuple[str, _BatchNorm, Tensor | None]] = {}
    for prefix, index in structure.batchnorms:
        bn = modules[index]
        dotted = f"{prefix}." if prefix else ""
        names = {leaf: dotted + leaf for leaf in ("running_mean", "running_var",
                                                    "num_batches_tracked")}
        # The module's own forward must neither update statistics in place nor (BATCH) use
        # them: it sees None and calls F.batch_norm, which _BatchNormCalls handles.
        tracked = buffers.get(names["num_batches_tracked"])
        for leaf, name in names.items():
            unused = leaf == "num_batches_tracked" or bn_mode is BatchNormMode.BATCH
            if name in structure.buffer_slots and unused:
                for slot in structure.buffer_slots[name]:
                    slots[slot] = None  # type: ignore[assignment]
        mean = slots.get(names["running_mean"])
        if bn_mode is BatchNormMode.RUNNING and mean is not None:
            running[id(mean)] = (dotted, bn, tracked)  # type: ignore[assignment]
    with _training_flags(modules, training), _BatchNormCalls(running, updates, _closed_form):
        output = functional_call(module, slots, args, kwargs, tie_weights=False, strict=False)
    return output, {**buffers, **updates}


def _slot_names(module: nn.Module, named: Callable[..., Iterator[tuple[str, Tensor]]]
                ) -> dict[str, list[str]]:
    """Canonical name -> every name that is a distinct (owner module, attribute) slot of it.

    A module used twice (``nn.Sequential(shared, act, shared)``) has one slot under two names;
    weights tied across modules (``b.weight = a.weight``) have two slots. Swapping each slot
    exactly once matters: ``torch.func.functional_call`` restores a slot swapped twice to the
    swapped-in tensor (torch 2.14), silently replacing the module's own parameter.
    """
    canonical = {id(t): name for name, t in named()}
    slots: dict[str, list[str]] = {name: [] for name in canonical.values()}
    seen: set[tuple[int, str]] = set()
    for name, tensor in named(remove_duplicate=False):
        owner_name, _, attribute = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if (id(owner), attribute) not in seen:
            seen.add((id(owner), attribute))
            slots[canonical[id(tensor)]].append(name)
    return slots


def _slots(module: nn.Module, structure: _Structure, params: Params, buffers: Buffers
           ) -> dict[str, Tensor]:
    """The tensors to swap into ``module``: each slot once, with a clear error on bad names."""
    swapped: dict[str, Tensor] = {}
    for kind, given, slots in (("params", params, structure.param_slots),
                               ("buffers", buffers, structure.buffer_slots)):
        if given.keys() != slots.keys():
            missing, extra = sorted(set(slots) - set(given)), sorted(set(given) - set(slots))
            raise ValueError(
                f"{kind} do not match {type(module).__name__}: missing {missing}, unexpected "
                f"{extra}. Pass every {kind[:-1]} by its name in module.named_{kind[:-1]}"
                f"{'eters' if kind == 'params' else 's'}() (params_of / initial_buffers).")
        for name, names in slots.items():
            tensor = given[name]
            for slot in names:
                swapped[slot] = tensor
    return swapped


def make_loss_fn(
    module: nn.Module,
    criterion: Callable[[Tensor, Tensor], Tensor],
    *,
    bn_mode: BatchNormMode | str = BatchNormMode.BATCH,
) -> Callable[[Params, Buffers, tuple[Tensor, Tensor]], tuple[Tensor, Buffers]]:
    """The usual inner loss for ``unroll``: ``criterion(module(x), y)`` on a training pass.

    Args:
        module: the network, called through ``forward``.
        criterion: e.g. ``torch.nn.functional.cross_entropy``.
        bn_mode: see ``BatchNormMode``.

    Returns:
        ``loss_fn(params, buffers, (x, y)) -> (loss, new_buffers)``.
    """
    bn_mode = BatchNormMode(bn_mode)

    def loss_fn(params: Params, buffers: Buffers,
                batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Buffers]:
        inputs, targets = batch
        output, new_buffers = forward(module, params, buffers, inputs, bn_mode=bn_mode,
                                      training=True)
        return criterion(output, targets), new_buffers

    return loss_fn
