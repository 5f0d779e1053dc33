"""Pure functional calls and BatchNorm modes."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import metazoo


def _net(momentum=0.1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, momentum=momentum), nn.ReLU(),
                         nn.Flatten(), nn.Linear(3 * 4 * 4, 2))


def _x(seed=0, n=5):
    return torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed))


def test_forward_equals_module_call_and_leaves_module_untouched():
    net = _net()
    state_before = {k: v.clone() for k, v in net.state_dict().items()}
    out, _ = metazoo.forward(net, metazoo.params_of(net), dict(net.named_buffers()), _x())
    net.train()
    torch.testing.assert_close(out, net(_x()))  # the module's own train-mode output
    net.load_state_dict(state_before)
    metazoo.forward(net, metazoo.params_of(net), dict(net.named_buffers()), _x(),
                    bn_mode="running", training=True)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, state_before[k], rtol=0, atol=0)
    assert net.training  # flags restored


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_mode_matches_torch_batchnorm(momentum):
    """Statistics and eval outputs equal nn.BatchNorm's own in-place bookkeeping."""
    net = _net(momentum)
    reference = _net(momentum)
    params = metazoo.params_of(net)
    buffers = metazoo.initial_buffers(net, "running")
    reference[1].reset_running_stats()
    reference.train()
    for seed in range(3):
        _, buffers = metazoo.forward(net, params, buffers, _x(seed), bn_mode="running")
        reference(_x(seed))
    for name, value in reference.named_buffers():
        torch.testing.assert_close(buffers[name], value, rtol=0, atol=1e-12)
    reference.eval()
    out, after = metazoo.forward(net, params, buffers, _x(9), bn_mode="running", training=False)
    torch.testing.assert_close(out, reference(_x(9)), rtol=0, atol=1e-12)
    assert after["1.num_batches_tracked"].item() == 3  # evaluation does not update


def test_batch_mode_uses_batch_statistics_in_evaluation_and_never_updates():
    net = _net()
    buffers = metazoo.initial_buffers(net, "batch")
    out, after = metazoo.forward(net, metazoo.params_of(net), buffers, _x(), bn_mode="batch",
                                 training=False)
    net.train()
    torch.testing.assert_close(out, net(_x()))
    for name in buffers:
        assert after[name] is buffers[name]


def test_running_statistics_are_differentiable():
    net = _net()
    params = {k: v.detach().requires_grad_() for k, v in metazoo.params_of(net).items()}
    _, buffers = metazoo.forward(net, params, metazoo.initial_buffers(net, "running"), _x(),
                                 bn_mode="running")
    (grad,) = torch.autograd.grad(buffers["1.running_mean"].sum(), params["0.bias"])
    torch.testing.assert_close(grad, torch.full((3,), 0.1))  # momentum * d mean / d bias


def test_initial_buffers_reset_per_task_in_running_mode():
    net = _net()
    net.train()
    net(_x())  # pollute the module's running statistics
    running = metazoo.initial_buffers(net, "running")
    assert running["1.running_mean"].abs().sum() == 0
    assert (running["1.running_var"] == 1).all()
    assert running["1.num_batches_tracked"].item() == 0
    batch = metazoo.initial_buffers(net, "batch")
    torch.testing.assert_close(batch["1.running_mean"], net[1].running_mean)
    assert batch["1.running_mean"] is not net[1].running_mean  # a copy


def test_split_params_and_check_params():
    net = _net()
    params = metazoo.params_of(net)
    head, body = metazoo.split_params(params, lambda n: n.startswith("4."))
    assert list(head) == ["4.weight", "4.bias"]
    assert list(body) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    metazoo.check_params(net, params)
    with pytest.raises(ValueError, match=r"missing \['4.bias', '4.weight'\]"):
        metazoo.check_params(net, body)
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        metazoo.check_params(net, {**params, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        metazoo.check_params(net, {**params, "4.bias": torch.zeros(3)})


def test_make_loss_fn():
    net = _net()
    loss_fn = metazoo.make_loss_fn(net, F.cross_entropy, bn_mode="running")
    y = torch.tensor([0, 1, 0, 1, 1])
    loss, buffers = loss_fn(metazoo.params_of(net), metazoo.initial_buffers(net, "running"),
                            (_x(), y))
    net.train()
    net[1].reset_running_stats()
    torch.testing.assert_close(loss, F.cross_entropy(net(_x()), y))
    assert buffers["1.num_batches_tracked"].item() == 1


def test_bad_bn_mode_is_an_error():
    with pytest.raises(ValueError, match="'transductive' is not a valid BatchNormMode"):
        metazoo.initial_buffers(_net(), "transductive")


def test_shared_module_and_tied_weights_are_called_correctly_and_left_untouched():
    shared = nn.Linear(3, 3)
    net = nn.Sequential(shared, nn.Tanh(), shared)
    weight = shared.weight
    params = {n: p.detach() * 2 for n, p in net.named_parameters()}
    x = torch.randn(4, 3)
    out, _ = metazoo.forward(net, params, {}, x)
    expected = F.linear(torch.tanh(F.linear(x, params["0.weight"], params["0.bias"])),
                        params["0.weight"], params["0.bias"])
    torch.testing.assert_close(out, expected)
    assert net[0].weight is weight and net[2].weight is weight

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 3, bias=False), nn.Linear(3, 3, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    tied = Tied()
    w = torch.randn(3, 3)
    out, _ = metazoo.forward(tied, {"a.weight": w}, {}, x)
    torch.testing.assert_close(out, torch.tanh(x @ w.T) @ w.T)
    assert tied.a.weight is tied.b.weight and isinstance(tied.b.weight, nn.Parameter)


def test_forward_with_wrong_names_is_a_clear_error():
    net = _net()
    params = metazoo.params_of(net)
    with pytest.raises(ValueError, match=r"params do not match Sequential: missing \['4.bias'\]"):
        metazoo.forward(net, {k: v for k, v in params.items() if k != "4.bias"},
                        dict(net.named_buffers()), _x())
    with pytest.raises(ValueError, match=r"buffers do not match .* missing \['1.num_batches"):
        metazoo.forward(net, params, {}, _x())
