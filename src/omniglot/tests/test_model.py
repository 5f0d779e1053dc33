"""model.py: shapes, every warp-layer variant, and the multi-head loss (float64)."""

import pytest
import torch
import torch.nn.functional as F

import model
import warpgrad


def test_conv_net_shapes_and_blocks():
    net = model.OmniConv(classes=5, num_filters=8).double()
    assert net(torch.randn(3, 1, 28, 28, dtype=torch.float64)).shape == (3, 5)
    kinds = [type(m).__name__ for m in net.blocks[0]]
    assert kinds == ["Conv2d", "MaxPool2d", "BatchNorm2d", "ReLU"]
    plain = model.OmniConv(classes=5, num_filters=8, batch_norm=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    assert model.feature_size(num_layers=4, num_filters=8, kernel_size=3, padding=1) == 8
    with pytest.raises(ValueError, match="num_layers=6"):
        model.OmniConv(classes=5, num_layers=6)
    with pytest.raises(ValueError, match="classes"):
        model.OmniConv(classes=0)


@pytest.mark.parametrize("row", list(warpgrad.ABLATIONS))
def test_every_warp_variant_builds_and_starts_near_the_plain_net(row):
    torch.manual_seed(0)
    net = model.WarpedOmniConv(classes=4, num_filters=6, warp_layer=row).double()
    out = net(torch.randn(5, 1, 28, 28, dtype=torch.float64))
    assert out.shape == (5, 4)
    warp_names = {n for m in net.warp_modules() for n, _ in m.named_parameters()}
    adapt = {id(p) for m in net.adapt_modules() for p in m.parameters()}
    warp = {id(p) for m in net.warp_modules() for p in m.parameters()}
    assert not adapt & warp
    assert bool(warp_names) == (row != "none")
    assert len(adapt) + len(warp) == len(list(net.parameters()))


def test_warp_flags_and_final_head():
    net = model.WarpedOmniConv(classes=4, num_filters=6, warp_layer="3x3",
                               warp_kwargs={"num_layers": 2, "activation": "relu",
                                            "residual": True, "batch_norm": True,
                                            "hidden_channels": 3},
                               warp_final_head=True).double()
    assert len(net.warps[0]) == 2 and net.warps[0][0].op.out_channels == 3
    x = torch.randn(2, 4, dtype=torch.float64)
    assert torch.equal(net.warp_head(x), x)  # identity at initialisation
    assert net.warp_head in net.warp_modules()


def test_multi_head_loss_is_each_samples_own_head_cross_entropy():
    torch.manual_seed(0)
    net = model.MultiHeadOmniConv(classes=3, num_heads=4, num_filters=4).double()
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    heads = torch.tensor([0, 0, 2, 2, 2, 0])
    labels = torch.tensor([1, 2, 0, 1, 2, 0])
    out = net(x)
    assert out.shape == (6, 4, 3)
    loss = model.multi_head_loss(out, heads * 3 + labels)
    expected = torch.stack([F.cross_entropy(out[i, heads[i]][None], labels[i][None])
                            for i in range(6)]).mean()
    assert torch.allclose(loss, expected, atol=1e-14)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    named = dict(zip([n for n, _ in net.named_parameters()], grads))
    # heads 1 and 3 have no sample: exactly zero gradient; heads 0 and 2 and the body do
    for h in (1, 3):
        assert named[f"heads.{h}.weight"].abs().max() == 0
    for h in (0, 2):
        assert named[f"heads.{h}.weight"].abs().max() > 0
    # against plain autograd on a separately built per-head objective
    body = net.blocks(x).flatten(1)
    manual = sum(F.cross_entropy(net.heads[h](body[heads == h]), labels[heads == h],
                                 reduction="sum") for h in (0, 2)) / 6
    for g, m in zip(grads, torch.autograd.grad(manual, list(net.parameters()),
                                                allow_unused=True, materialize_grads=True)):
        assert torch.allclose(g, m, atol=1e-12)
    acc = model.multi_head_accuracy(out, heads * 3 + labels)
    expected_acc = (out[torch.arange(6), heads].argmax(1) == labels).sum().item() / 6
    assert acc.item() == pytest.approx(expected_acc)


@pytest.mark.parametrize("downsample", ["pool", "stride"])
@pytest.mark.parametrize("image_size, channels", [(28, 1), (84, 3), (17, 3), (16, 1)])
def test_few_shot_nets_both_downsampling_options_any_image_size(downsample, image_size,
                                                                 channels):
    torch.manual_seed(0)
    net = model.OmniConv(classes=5, num_filters=4, in_channels=channels, image_size=image_size,
                         downsample=downsample).double()
    x = torch.randn(2, channels, image_size, image_size, dtype=torch.float64)
    assert net(x).shape == (2, 5)
    width = net.blocks(x).flatten(1).shape[1]
    assert width == model.feature_size(num_layers=4, num_filters=4, kernel_size=3, padding=1,
                                       image_size=image_size, downsample=downsample)
    assert net.head.in_features == width
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 4 and convs[0].in_channels == channels
    assert all(c.stride == ((2, 2) if downsample == "stride" else (1, 1)) for c in convs)
    pools = [m for m in net.modules() if isinstance(m, torch.nn.MaxPool2d)]
    assert len(pools) == (4 if downsample == "pool" else 0)
    for cls in (model.WarpedOmniConv, model.MultiHeadOmniConv):
        extra = {"num_heads": 2} if cls is model.MultiHeadOmniConv else {}
        other = cls(classes=5, num_filters=4, in_channels=channels, image_size=image_size,
                    downsample=downsample, **extra).double()
        assert other(x).shape[-1] == 5


def test_stride_block_is_conv_bn_relu_of_the_maml_net():
    net = model.OmniConv(classes=5, downsample="stride")
    assert [type(m).__name__ for m in net.blocks[0]] == ["Conv2d", "BatchNorm2d", "ReLU"]
    conv = net.blocks[0][0]
    assert (conv.kernel_size, conv.stride, conv.padding, conv.out_channels) == (
        (3, 3), (2, 2), (1, 1), 64)
    # 28 -> 14 -> 7 -> 4 -> 2: 64 * 2 * 2 features; the pool net: 28 -> 14 -> 7 -> 3 -> 1
    assert net.head.in_features == 256
    assert model.OmniConv(classes=5).head.in_features == 64
    with pytest.raises(ValueError, match="downsample='avg'"):
        model.OmniConv(classes=5, downsample="avg")
    with pytest.raises(ValueError, match="in_channels=0"):
        model.OmniConv(classes=5, in_channels=0)
    # 9 -> 4 -> 2 -> 1 -> 0 with pooling; strided convs keep 1x1: 9 -> 5 -> 3 -> 2 -> 1
    with pytest.raises(ValueError, match="shrink a 9x9 image to nothing"):
        model.OmniConv(classes=5, image_size=9)
    assert model.OmniConv(classes=5, image_size=9, downsample="stride").head.in_features == 64
    with pytest.raises(ValueError, match="image_size=0"):
        model.feature_size(num_layers=4, num_filters=4, kernel_size=3, padding=1, image_size=0)


def test_identity_warp_init_gives_the_plain_net_with_the_same_adaptable_parameters():
    # --warp_init identity: the same adaptable parameters as the random init of the same seed,
    # and at initialisation the warped net computes what the unwarped OmniConv computes with them
    torch.manual_seed(4)
    warped = model.WarpedOmniConv(classes=3, num_filters=4, warp_kwargs={"init": "identity"})
    torch.manual_seed(4)
    random = model.WarpedOmniConv(classes=3, num_filters=4)
    adapt = [p for m in warped.adapt_modules() for p in m.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(
        adapt, [p for m in random.adapt_modules() for p in m.parameters()], strict=True))
    plain = model.OmniConv(classes=3, num_filters=4)
    with torch.no_grad():
        for p, a in zip(plain.parameters(), adapt, strict=True):
            p.copy_(a)
    x = torch.randn(5, 1, 28, 28)
    assert torch.equal(warped(x), plain(x))
    assert not torch.allclose(random(x), plain(x), atol=1e-3)
