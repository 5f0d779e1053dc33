"""FlatLayout: one flat tensor per state, views back with shapes, dtypes and memory layout."""

from __future__ import annotations

import pytest
import torch

from warpgrad import FlatLayout


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(4, 3, 2, 2, generator=g, dtype=torch.float64)
    return {"conv": conv.contiguous(memory_format=torch.channels_last),
            "t": torch.randn(3, 5, generator=g, dtype=torch.float64).t(),
            "b": torch.randn(5, generator=g, dtype=torch.float64),
            "s": torch.randn((), generator=g, dtype=torch.float64)}


def test_round_trip_gives_views_with_the_original_strides():
    tensors = _tensors()
    layout = FlatLayout.of(tensors)
    flat = layout.flatten(tensors)
    assert flat.shape == (layout.numel,) == (48 + 15 + 5 + 1,)
    back = layout.unflatten(flat)
    assert list(back) == list(tensors)
    for name, t in tensors.items():
        assert torch.equal(back[name], t)
        assert back[name].stride() == t.stride(), name  # channels-last stays channels-last
        assert back[name].untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    # The flat vector holds each tensor in its memory order: flattening reads it once.
    assert torch.equal(flat[:48], tensors["conv"].permute(0, 2, 3, 1).reshape(-1))


def test_batched_flatten_equals_stacked_flattens_and_unflatten_keeps_batch_dims():
    tensors = [_tensors(), {n: t * 2 for n, t in _tensors().items()}]
    layout = FlatLayout.of(tensors[0])
    stacked = {n: torch.stack([t[n] for t in tensors]) for n in tensors[0]}
    flat = layout.flatten(stacked, batch_dims=1)
    assert torch.equal(flat, torch.stack([layout.flatten(t) for t in tensors]))
    back = layout.unflatten(flat)
    for n in stacked:
        assert torch.equal(back[n], stacked[n])


def test_mixed_float_dtypes_are_stored_promoted_and_read_back_exactly():
    tensors = {"half": torch.randn(3).half(), "single": torch.randn(2)}
    layout = FlatLayout.of(tensors)
    assert layout.dtype == torch.float32
    back = layout.unflatten(layout.flatten(tensors))
    assert back["half"].dtype == torch.float16 and torch.equal(back["half"], tensors["half"])
    assert torch.equal(back["single"], tensors["single"])
    with pytest.raises(ValueError, match="cannot store tensors of dtypes"):
        FlatLayout.of({"i": torch.ones(2, dtype=torch.long), "f": torch.ones(2)})


def test_equal_structures_share_one_layout_and_spread_is_differentiable():
    a, b = _tensors(), {n: t + 1 for n, t in _tensors().items()}
    assert FlatLayout.of(a) is FlatLayout.of(b)
    layout = FlatLayout.of(a)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64, requires_grad=True)
    spread = layout.spread(values)
    assert spread.tolist() == [1.0] * 48 + [2.0] * 15 + [3.0] * 5 + [4.0]
    (grad,) = torch.autograd.grad(spread.sum(), values)
    assert grad.tolist() == [48.0, 15.0, 5.0, 1.0]
