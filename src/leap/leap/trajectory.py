"""The Leap update rule: the meta-gradient contributed by one segment of a learning trajectory.

Leap (Flennerhag, Moreno, Lawrence and Damianou, "Transferring Knowledge across Learning
Processes", ICLR 2019, https://arxiv.org/abs/1812.01054) meta-learns an initialisation
``theta_0`` that shortens the path every task's training takes. A task's inner loop visits
points ``theta_0, theta_1, ..., theta_K`` with losses ``L_0, ..., L_K``. The path lives on the
task manifold, the graph ``(theta, L(theta))``; segment ``i`` joins ``(theta_i, L_i)`` to
``(theta_{i+1}, L_{i+1})``. Holding the end of each segment fixed and pulling its start forward
gives the per-segment increment

    d      = L_{i+1} - L_i                 (stabilizer: d := -|d|)
    inc_i  = (theta_i - theta_{i+1}) - d * grad L(theta_i)
    len_i  = sqrt(d**2 + ||theta_{i+1} - theta_i||**2)
    norm=True  (length metric d1):  inc_i / len_i
    norm=False (energy metric d2):  inc_i

and ``loss=False`` drops ``d`` from both ``inc_i`` and ``len_i`` (the path in parameter space
only). ``inc_i`` is exactly the gradient of ``len_i`` (d1) or ``len_i**2 / 2`` (d2) with respect
to ``theta_i`` when ``theta_{i+1}`` and ``L_{i+1}`` are held constant; without the stabilizer
this is what the tests check against autograd. The stabilizer keeps a loss *increase* from
pushing the initialisation towards higher loss. The meta-gradient of one task is the sum of
``inc_i`` over all K segments (the last one included, unlike the reference implementation), and
a meta-batch averages it over tasks. With ``norm=False, loss=False`` the sum telescopes to
``theta_0 - theta_K``: Reptile's meta-gradient.

Points are stored as detached flat vectors, so no autograd graph outlives the inner step that
made it and the increment is a handful of fused vector operations whatever the number of
parameter tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Point", "add_to_grad", "flatten", "segment_increment"]


@dataclass(frozen=True)
class Point:
    """One point of a learning trajectory, detached from every graph.

    Attributes:
        params: the parameters, flattened into one vector.
        loss: the loss at ``params`` as a 0-dim tensor, or ``None`` when the loss term is off.
        grad: the loss gradient at ``params`` flattened like ``params``, or ``None`` when it is
            not needed (loss term off, or the last point of a trajectory: a segment only uses
            the gradient at its start).
    """

    params: Tensor
    loss: Tensor | None = None
    grad: Tensor | None = None


def flatten(tensors: Sequence[Tensor | None], like: Sequence[Tensor] | None = None) -> Tensor:
    """Detached copy of ``tensors`` as one flat vector; ``None`` entries count as zeros.

    Args:
        tensors: e.g. parameters or their ``.grad`` (which is ``None`` for an unused parameter).
        like: tensors giving the shape of each ``None`` entry (required if any entry is None).
    """
    parts = []
    for i, t in enumerate(tensors):
        if t is None:
            if like is None:
                raise ValueError("flatten got a None tensor but no `like` to size it; pass the "
                                 "parameters as `like`")
            parts.append(torch.zeros(like[i].numel(), dtype=like[i].dtype,
                                     device=like[i].device))
        else:
            parts.append(t.detach().reshape(-1))
    return torch.cat(parts)


def segment_increment(start: Point, end: Point, *, norm: bool = True, loss: bool = True,
                      stabilizer: bool = True) -> Tensor:
    """Leap meta-gradient increment of the segment from ``start`` to ``end`` (module docstring).

    Args:
        start: ``theta_i`` with its loss and loss gradient (both needed when ``loss=True``).
        end: ``theta_{i+1}`` with its loss (needed when ``loss=True``; its gradient is unused).
        norm: divide by the segment length (d1); ``False`` gives the energy metric (d2).
        loss: include the loss dimension of the task manifold.
        stabilizer: use ``-|L_{i+1} - L_i|`` as the loss difference (only with ``loss=True``).

    Returns:
        A flat vector shaped like ``start.params``.
    """
    delta = start.params - end.params
    squared_length = torch.dot(delta, delta)
    if loss:
        if start.loss is None or end.loss is None or start.grad is None:
            raise ValueError("segment_increment with loss=True needs start.loss, start.grad and "
                             "end.loss; record them or pass loss=False")
        d = (end.loss - start.loss).to(delta.dtype)
        if stabilizer:
            d = -d.abs()
        increment = torch.addcmul(delta, d, start.grad, value=-1.0)
        squared_length = squared_length + d * d
    else:
        increment = delta
    if norm:
        # A zero-length segment has a zero numerator too; any positive floor makes it add 0
        # instead of 0/0 = NaN, without a host synchronisation.
        length = squared_length.sqrt().clamp_min(torch.finfo(delta.dtype).tiny)
        increment = increment / length
    return increment


def add_to_grad(params: Sequence[Tensor], flat: Tensor,
                hook: Callable[[Tensor], object] | None = None) -> None:
    """Adds the flat vector ``flat`` into ``.grad`` of ``params``, creating missing gradients.

    A meta-optimizer's ``zero_grad()`` sets gradients to ``None`` under PyTorch 2.x (the
    reference implementation crashed on that at its second meta-step), so ``None`` starts from
    zero.

    Args:
        params: the meta-parameters, in the order ``flat`` was built.
        flat: the increment, as returned by ``segment_increment``.
        hook: optional callable applied in place to each parameter's share of ``flat`` before it
            is added (the reference implementation's ``hook``).
    """
    sizes = [p.numel() for p in params]
    if flat.dim() != 1 or flat.numel() != sum(sizes):
        raise ValueError(f"flat has shape {tuple(flat.shape)} but params hold {sum(sizes)} "
                         f"values; build it with flatten(params) in the same order")
    pieces = [piece.view_as(p) for piece, p in zip(flat.split(sizes), params, strict=True)]
    if hook is not None:
        for piece in pieces:
            hook(piece)
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    torch._foreach_add_([p.grad for p in params], pieces)  # type: ignore[misc]
