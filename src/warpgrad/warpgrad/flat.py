"""Flat parameter states: one tensor per state and a shared layout of views into it.

The replay buffer stores every recorded state (a task's adaptable parameters, the inner
optimizer's momentum) as one 1-D tensor instead of one tensor per parameter, and the vectorized
paths compute on those flat tensors directly: copying, stacking, checking or stepping a state is
then one operation (one kernel launch on an accelerator) instead of one per parameter tensor.
A ``FlatLayout`` says where each named tensor lives in the flat vector; ``unflatten`` gives the
tensors back as views with their original shapes, dtypes and memory layout (a channels-last
tensor comes back channels-last), so nothing that reads a state can tell it was stored flat.

Tensors are laid out in their memory order (``permute`` to the order of decreasing strides,
then ``reshape``), so flattening a dense tensor reads it once and its view has its strides.
Tensors of different floating dtypes are stored in the promoted dtype (float16 and bfloat16 in
float32, float32 in float64), which holds every value exactly; their views are converted back
(a copy, the only case in which reading a state copies).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from metazoo import Params

__all__ = ["FlatLayout"]


def _memory_order(t: Tensor) -> tuple[int, ...]:
    """The permutation of dimensions that makes ``t`` contiguous (identity when it is, or when
    it is not dense: then ``reshape`` copies it in logical order)."""
    if t.dim() < 2 or t.is_contiguous():
        return tuple(range(t.dim()))
    strides = t.stride()
    order = tuple(sorted(range(t.dim()), key=lambda d: (-strides[d], d)))
    if t.permute(order).is_contiguous():
        return order
    return tuple(range(t.dim()))


_LAYOUTS: dict[tuple, FlatLayout] = {}
_MAX_LAYOUTS = 256


@dataclass(frozen=True)
class FlatLayout:
    """Where each named tensor of a state lives in its flat vector.

    Build one with ``FlatLayout.of(tensors)``; equal structures give equal layouts.

    Attributes:
        names: tensor names, in storage order.
        shapes: each tensor's shape.
        dtypes: each tensor's dtype.
        orders: each tensor's dimensions in memory order (see ``unflatten``).
        dtype: the flat vector's dtype (the promoted dtype of ``dtypes``).
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    orders: tuple[tuple[int, ...], ...]
    dtype: torch.dtype
    offsets: tuple[int, ...] = field(init=False, repr=False, compare=False)
    numel: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        offsets, total = [], 0
        for shape in self.shapes:
            offsets.append(total)
            total += shape.numel()
        object.__setattr__(self, "offsets", tuple(offsets))
        object.__setattr__(self, "numel", total)

    @classmethod
    def of(cls, tensors: Mapping[str, Tensor]) -> FlatLayout:
        """The layout of ``tensors`` (their names in order, shapes, dtypes, memory orders).

        Raises:
            ValueError: a tensor is not floating point while others are, or the dtypes cannot
                share one flat vector exactly.
        """
        key = tuple((n, t.shape, t.dtype, _memory_order(t)) for n, t in tensors.items())
        cached = _LAYOUTS.get(key)
        if cached is not None:
            return cached
        dtypes = tuple(t.dtype for t in tensors.values())
        dtype = dtypes[0] if dtypes else torch.float32
        for other in set(dtypes[1:]) - {dtype}:
            dtype = torch.promote_types(dtype, other)
        if len(set(dtypes)) > 1 and not all(d.is_floating_point for d in dtypes):
            raise ValueError(f"cannot store tensors of dtypes {sorted(map(str, set(dtypes)))} "
                             "in one flat state exactly; give floating-point tensors (or one "
                             "dtype)")
        layout = cls(tuple(tensors), tuple(t.shape for t in tensors.values()), dtypes,
                     tuple(order for *_, order in key), dtype)
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout  # one object per structure: its gather indices are made once
        return layout

    def flatten(self, tensors: Mapping[str, Tensor], *, batch_dims: int = 0) -> Tensor:
        """One new tensor ``[*batch, numel]`` holding ``tensors`` in this layout (differentiable:
        ``cat`` of their memory-order reshapes).

        Args:
            tensors: by name, each ``[*batch, *shape]``.
            batch_dims: leading dimensions shared by every tensor (kept in front).
        """
        lead = list(range(batch_dims))
        parts = []
        for name, order in zip(self.names, self.orders, strict=True):
            t = tensors[name]
            if order != tuple(range(len(order))):
                t = t.permute(*lead, *(batch_dims + d for d in order))
            parts.append(t.reshape(*t.shape[:batch_dims], -1).to(self.dtype))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: Tensor) -> Params:
        """The tensors of ``flat`` (``[*batch, numel]``) by name: views, except where a tensor's
        dtype differs from the flat vector's (then converted copies)."""
        lead = tuple(flat.shape[:-1])
        batch = len(lead)
        out: Params = {}
        for name, shape, dtype, order, offset in zip(self.names, self.shapes, self.dtypes,
                                                     self.orders, self.offsets, strict=True):
            part = flat.narrow(-1, offset, shape.numel())
            if order == tuple(range(len(order))):
                t = part.view((*lead, *shape))
            else:
                stored = part.view((*lead, *(shape[d] for d in order)))
                inverse = sorted(range(len(order)), key=order.__getitem__)
                t = stored.permute(*range(batch), *(batch + d for d in inverse))
            out[name] = t if dtype == self.dtype else t.to(dtype)
        return out

    def owners(self, device: torch.device | str) -> Tensor:
        """``[numel]`` indices: which tensor (by position in ``names``) owns each element."""
        key = (str(device),)
        cache = self.__dict__.setdefault("_owners", {})
        if key not in cache:
            sizes = torch.tensor([s.numel() for s in self.shapes], dtype=torch.long)
            cache[key] = torch.repeat_interleave(torch.arange(len(self.names)), sizes).to(device)
        return cache[key]

    def spread(self, values: Tensor) -> Tensor:
        """Per-tensor values ``[..., len(names)]`` repeated over each tensor's elements,
        ``[..., numel]`` (one differentiable gather)."""
        return values.index_select(-1, self.owners(values.device))
