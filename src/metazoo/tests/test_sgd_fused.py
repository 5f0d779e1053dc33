"""SGD with a float learning rate takes the fused ``torch.add(p, d, alpha=-lr)`` path."""

import torch
from torch import nn

import metazoo


def test_float_rate_matches_torch_optim_bit_for_bit() -> None:
    torch.manual_seed(0)
    params = {"a": torch.randn(4, 3, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    grads = {n: torch.randn_like(p) for n, p in params.items()}
    new, _ = metazoo.SGD(0.37).step(params, grads, metazoo.SGD(0.37).init(params))
    reference = [nn.Parameter(p.clone()) for p in params.values()]
    for p, g in zip(reference, grads.values()):
        p.grad = g.clone()
    torch.optim.SGD(reference, lr=0.37, foreach=False).step()
    for p, r in zip(new.values(), reference):
        assert torch.equal(p, r.detach())


def test_float_and_tensor_rates_give_the_same_second_order_gradient() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    loss_fn = metazoo.make_loss_fn(net, nn.functional.mse_loss)
    batches = [(torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 1, dtype=torch.float64))
               for _ in range(3)]
    meta_grads = []
    for lr in (0.3, torch.tensor(0.3, dtype=torch.float64)):
        params = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
        result = metazoo.unroll(loss_fn, params, metazoo.SGD(lr), batches)
        query = loss_fn(result.params, {}, batches[0])[0]
        meta_grads.append(torch.autograd.grad(query, list(params.values())))
    for fused, unfused in zip(*meta_grads):
        assert fused.abs().max() > 0
        torch.testing.assert_close(fused, unfused, rtol=1e-12, atol=1e-14)
