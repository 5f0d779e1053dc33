"""Calling an ``nn.Module`` as a pure function of explicit parameters and buffers.

Adaptation never mutates a module: parameters travel as ``Params`` dicts and BatchNorm
statistics travel as ``Buffers`` dicts. A forward pass returns the output together with the
buffers it produced, so a recomputed step (gradient checkpointing) yields the same statistics
again instead of updating them twice.
"""

from __future__ import annotations

import enum
import functools
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

Params = dict[str, Tensor]
Buffers = dict[str, Tensor]

__all__ = [
    "BatchNormMode",
    "Buffers",
    "Params",
    "check_params",
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
    """The cached ``_Structure`` of ``module`` (recomputed if the tree changed) and its modules."""
    cached = _STRUCTURES.get(module)
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


def _batchnorm_forward(bn: _BatchNorm, prefix: str, bn_mode: BatchNormMode, training: bool,
                       updates: Buffers, x: Tensor) -> Tensor:
    """BatchNorm whose running statistics are updated out of place and differentiably.

    ``nn.BatchNorm`` writes its running statistics in place, outside autograd. In RUNNING mode
    the statistics a task accumulates during adaptation depend on the parameters, and the query
    pass normalises with them, so the meta-gradient must flow through them.
    """
    bn._check_input_dim(x)
    running_mean, running_var = bn.running_mean, bn.running_var
    if bn_mode is BatchNormMode.BATCH or running_mean is None or running_var is None or training:
        output = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        if bn_mode is BatchNormMode.RUNNING and running_mean is not None and training:
            assert running_var is not None and bn.num_batches_tracked is not None
            dims = [0, *range(2, x.dim())]
            count = bn.num_batches_tracked + 1
            factor = (1.0 / count).to(x.dtype) if bn.momentum is None else bn.momentum
            updates[prefix + "running_mean"] = torch.lerp(running_mean, x.mean(dims), factor)
            updates[prefix + "running_var"] = torch.lerp(
                running_var, x.var(dims, correction=1), factor)
            updates[prefix + "num_batches_tracked"] = count
        return output
    shape = [1, -1] + [1] * (x.dim() - 2)
    output = (x - running_mean.view(shape)) * torch.rsqrt(running_var + bn.eps).view(shape)
    if bn.weight is not None and bn.bias is not None:
        output = output * bn.weight.view(shape) + bn.bias.view(shape)
    return output


@contextmanager
def _functional_batchnorm(batchnorms: list[tuple[str, _BatchNorm]], bn_mode: BatchNormMode,
                          training: bool, updates: Buffers) -> Iterator[None]:
    patched = []
    try:
        for prefix, bn in batchnorms:
            bn.forward = functools.partial(  # type: ignore[method-assign]
                _batchnorm_forward, bn, f"{prefix}." if prefix else "", bn_mode, training,
                updates)
            patched.append(bn)
        yield
    finally:
        for bn in patched:
            del bn.forward


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
    batchnorms = [(prefix, modules[i]) for prefix, i in structure.batchnorms]
    slots = _slots(module, structure, params, buffers)
    with _training_flags(modules, training), _functional_batchnorm(
            batchnorms, bn_mode, training, updates):  # type: ignore[arg-type]
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
