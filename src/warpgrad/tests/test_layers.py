"""Warp-layer building blocks: every ablation row, shapes, structure and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from warpgrad import ABLATIONS, ChannelScale, WarpBlock, WarpHead, WarpLayer, warp_block


def test_every_ablation_row_builds_and_keeps_the_shape():
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    for row in ABLATIONS:
        block = warp_block(row, 4)
        if row == "none":
            assert block is None
            continue
        block = block.double()
        out = block(x)
        assert out.shape == x.shape, row
        out.sum().backward()
        assert all(p.grad is not None for p in block.parameters()), row


def test_rows_have_the_documented_structure():
    assert isinstance(warp_block("scaling", 4)[0].op, ChannelScale)
    one = warp_block("1x1", 4)[0].op
    assert isinstance(one, nn.Conv2d) and one.kernel_size == (1, 1)
    three = warp_block("3x3", 4)[0]
    assert three.op.kernel_size == (3, 3) and three.act is None and three.bn_in is None
    assert isinstance(warp_block("3x3+relu", 4)[0].act, nn.ReLU)
    bn = warp_block("3x3+relu+bn", 4)[0]
    assert isinstance(bn.bn_in, nn.BatchNorm2d) and bn.bn_out is None and not bn.residual
    res = warp_block("residual", 4)[0]
    assert res.residual and isinstance(res.bn_out, nn.BatchNorm2d) and res.proj is None
    two = warp_block("2-layer", 4, hidden_channels=8)
    assert len(two) == 2 and two[0].op.out_channels == 8 and two[1].op.out_channels == 4
    assert two[0].proj is not None and two[0].proj.kernel_size == (1, 1)  # widths differ


def test_channel_scale_is_identity_at_init_and_scales_per_channel():
    layer = ChannelScale(3).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert torch.equal(layer(x), x)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        layer.bias.copy_(torch.tensor([0.0, 1.0, 0.0]))
    out = layer(x)
    torch.testing.assert_close(out[:, 1], 2 * x[:, 1] + 1)
    torch.testing.assert_close(out[:, 2], 3 * x[:, 2])


def test_residual_layer_computes_its_formula():
    torch.manual_seed(0)
    layer = WarpLayer(3, 5, activation="relu", residual=True).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    expected = torch.relu(layer.op(x)) + layer.proj(x)
    torch.testing.assert_close(layer(x), expected)


def test_warp_head_and_validation():
    head = WarpHead(4, 2).double()
    assert head(torch.randn(3, 4, dtype=torch.float64)).shape == (3, 2)
    with pytest.raises(ValueError, match="kind='scale' keeps the width"):
        WarpLayer(3, 4, kind="scale")
    with pytest.raises(ValueError, match="kind='dense'"):
        WarpLayer(3, kind="dense")
    with pytest.raises(ValueError, match="activation='gelu'"):
        WarpLayer(3, activation="gelu")
    with pytest.raises(ValueError, match="num_layers=0"):
        WarpBlock(3, num_layers=0)
    with pytest.raises(ValueError, match="row='5x5'"):
        warp_block("5x5", 3)
    with pytest.raises(ValueError, match="in_channels=0"):
        WarpLayer(0)


@pytest.mark.parametrize("row", ["1x1", "3x3", "scaling"])
def test_identity_init_makes_the_linear_rows_the_identity_map(row):
    block = warp_block(row, 4, init="identity", num_layers=2).double()
    x = torch.randn(2, 4, 7, 5, dtype=torch.float64)
    assert torch.equal(block(x), x)  # exactly: one 1.0 tap and zero biases
    layer = WarpLayer(3, kernel_size=5, init="identity")
    x32 = torch.randn(1, 3, 6, 6)
    assert torch.equal(layer(x32), x32)


def test_random_init_is_the_default_and_unchanged():
    # "random" (the default) is PyTorch's conv initialisation from the same random stream
    torch.manual_seed(3)
    expected = nn.Conv2d(4, 4, 3, padding=1)
    for build in (lambda: WarpLayer(4), lambda: WarpLayer(4, init="random"),
                  lambda: warp_block("3x3", 4)[0]):
        torch.manual_seed(3)
        layer = build()
        assert torch.equal(layer.op.weight, expected.weight)
        assert torch.equal(layer.op.bias, expected.bias)
    x = torch.randn(1, 4, 3, 3)
    assert not torch.equal(expected(x), x)


def test_identity_init_draws_the_same_random_numbers_as_random():
    # so a net built from one seed differs only in its warp layers between the two inits
    after = []
    for init in ("random", "identity"):
        torch.manual_seed(5)
        warp_block("3x3", 4, init=init, num_layers=2)
        after.append(torch.rand(3))
    assert torch.equal(after[0], after[1])


@pytest.mark.parametrize("kwargs,message", [
    ({"activation": "relu"}, "activation='relu'"),
    ({"batch_norm": True}, "batch_norm=True"),
    ({"residual": True}, "residual=True"),
    ({"out_channels": 5}, "in_channels=4 != out_channels=5"),
    ({"kernel_size": 4}, "kernel_size=4 with padding=2"),
    ({"padding": 0}, "kernel_size=3 with padding=0"),
])
def test_identity_init_is_refused_where_it_is_not_the_identity(kwargs, message):
    with pytest.raises(ValueError, match=f"init='identity' needs a linear.*{message}"):
        WarpLayer(4, init="identity", **kwargs)
    WarpLayer(4, **kwargs)  # the same layer with the random init builds
    for row in ("3x3+relu", "3x3+relu+bn", "residual", "2-layer"):
        with pytest.raises(ValueError, match="init='identity'"):
            warp_block(row, 4, init="identity")
    with pytest.raises(ValueError, match="init='zeros' is not one of"):
        WarpLayer(4, init="zeros")
