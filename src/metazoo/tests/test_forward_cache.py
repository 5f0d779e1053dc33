"""forward() caches what it learns about a module tree; changes to the tree must be seen."""

import gc
import weakref

import pytest
import torch
from torch import nn

import metazoo
from metazoo import functional


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()


def _call(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    buffers = metazoo.initial_buffers(net, "batch")
    return metazoo.forward(net, metazoo.params_of(net), buffers, x)[0]


def test_repeated_calls_reuse_the_cached_structure() -> None:
    net, x = _net(), torch.randn(5, 3, dtype=torch.float64)
    first = _call(net, x)
    cached = functional._STRUCTURES[net]
    torch.testing.assert_close(_call(net, x), first, rtol=0, atol=0)
    assert functional._STRUCTURES[net] is cached
    torch.testing.assert_close(first, net.train()(x), rtol=0, atol=0)


def test_replaced_submodule_is_seen() -> None:
    net, x = _net(), torch.randn(5, 3, dtype=torch.float64)
    _call(net, x)
    net[3] = nn.Linear(4, 6, bias=False).double()  # "3.bias" is gone
    out = _call(net, x)
    assert out.shape == (5, 6)
    torch.testing.assert_close(out, net.train()(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="missing"):
        metazoo.forward(net, {k: v for k, v in metazoo.params_of(net).items() if k != "3.weight"},
                        metazoo.initial_buffers(net, "batch"), x)


def test_tying_weights_after_a_call_is_seen() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False)).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    metazoo.forward(net, metazoo.params_of(net), {}, x)
    net[1].weight = net[0].weight  # now one parameter with two slots
    params = metazoo.params_of(net)
    assert list(params) == ["0.weight"]
    swapped = {"0.weight": params["0.weight"] * 2}
    out, _ = metazoo.forward(net, swapped, {}, x)
    torch.testing.assert_close(out, x @ swapped["0.weight"].T @ swapped["0.weight"].T)
    # The module's own parameter is restored afterwards.
    assert net[1].weight is net[0].weight is params["0.weight"]


def test_training_flags_are_restored_per_module() -> None:
    net = _net()
    net.train()
    net[1].eval()
    metazoo.forward(net, metazoo.params_of(net), metazoo.initial_buffers(net, "running"),
                    torch.randn(5, 3, dtype=torch.float64), bn_mode="running", training=False)
    assert [m.training for m in net.modules()] == [True, True, False, True, True]


def test_cache_does_not_keep_the_module_alive() -> None:
    net = _net()
    _call(net, torch.randn(5, 3, dtype=torch.float64))
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None
