"""OptimizerParameters: positivity by construction, torch.optim parity, learnability."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from warpgrad import OptimizerParameters


def _named(seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(3, 2).double()
    return layer, list(layer.named_parameters())


def test_defaults_and_per_tensor_values():
    _, named = _named()
    params = OptimizerParameters(default_lr=0.2, default_momentum=0.9)
    params.init(named)
    assert params.names == ["weight", "bias"]
    for v in params.lr.values():
        assert v.item() == pytest.approx(0.2, rel=1e-12)
    for v in params.momentum.values():
        assert v.item() == pytest.approx(0.9, rel=1e-12)
    assert not any(p.requires_grad for p in params.parameters())
    assert [n for n, _ in params.named_parameters()] == [
        "weight.log_lr", "bias.log_lr", "weight.momentum_logit", "bias.momentum_logit"]


def test_no_momentum_means_plain_sgd_and_nothing_learned():
    _, named = _named()
    params = OptimizerParameters(trainable=True, default_lr=0.1)
    params.init(named)
    assert not params.has_momentum and params.momentum == {}
    assert len(list(params.parameters())) == 2
    assert "momentum_buffer" not in params.inner_optimizer().init(dict(named))


def test_positive_by_construction_after_any_meta_step():
    _, named = _named()
    params = OptimizerParameters(trainable=True, default_lr=0.01, default_momentum=0.5)
    params.init(named)
    meta = torch.optim.SGD(params.parameters(), lr=1.0)
    for p in params.parameters():
        p.grad = torch.full_like(p, 50.0)  # a step that would make raw values negative
    meta.step()
    for v in params.lr.values():
        assert v.item() > 0 and v.item() == pytest.approx(0.01 * math.exp(-50), rel=1e-9)
    for v in params.momentum.values():
        assert 0 < v.item() < 0.5


def test_inner_optimizer_matches_torch_optim_sgd_with_groups():
    layer, named = _named()
    params = OptimizerParameters(default_lr=0.3, default_momentum=0.7)
    params.init(named)
    reference = torch.optim.SGD(params.groups(named), lr=123.0)
    assert [g["lr"] for g in reference.param_groups] == pytest.approx([0.3, 0.3])
    inner = params.inner_optimizer(detach=True)
    functional = {n: p.detach().clone() for n, p in named}
    state = inner.init(functional)
    x = torch.randn(4, 3, dtype=torch.float64)
    for _ in range(3):
        reference.zero_grad()
        layer(x).pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in named}
        reference.step()
        functional, state = inner.step(functional, grads, state)
        for n, p in named:
            torch.testing.assert_close(functional[n], p.detach(), rtol=1e-12, atol=1e-14)
        functional = {n: p.detach().clone() for n, p in named}


def test_trainable_toggle_and_gradients_reach_log_lr():
    _, named = _named()
    params = OptimizerParameters(default_lr=0.5)
    params.init(named)
    params.trainable = True
    assert all(p.requires_grad for p in params.parameters())
    total = sum(v for v in params.lr.values())
    total.backward()
    for p in params.parameters():
        assert p.grad.item() == pytest.approx(0.5, rel=1e-12)  # d exp(x)/dx = exp(x)


def test_state_dict_round_trip_and_validation():
    _, named = _named()
    params = OptimizerParameters(default_lr=0.5, default_momentum=0.3)
    params.init(named)
    state = params.state_dict()
    other = OptimizerParameters(default_lr=0.1, default_momentum=0.6)
    other.init(named)
    other.load_state_dict(state)
    for (_, a), (_, b) in zip(params.named_parameters(), other.named_parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="default_lr=0"):
        OptimizerParameters(default_lr=0)
    with pytest.raises(ValueError, match="default_lr=inf must be a finite positive"):
        OptimizerParameters(default_lr=float("inf"))
    with pytest.raises(ValueError, match="default_momentum=1"):
        OptimizerParameters(default_momentum=1)
    with pytest.raises(ValueError, match="no learning rate"):
        params.groups([("other", torch.zeros(1))])
    with pytest.raises(TypeError):
        OptimizerParameters(True, 0.1, 0.0)  # type: ignore[misc]
