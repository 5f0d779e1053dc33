"""iMAML: implicit meta-gradients against the closed form on a quadratic inner loss, against
finite differences on a small network, and conjugate gradient on its own (float64)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metazoo
from maml import conjugate_gradient, iMAML

DTYPE = torch.float64
DIM = 6


def linear_regression_tasks(count: int, seed: int = 0) -> list[metazoo.Task]:
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for _ in range(count):
        w = torch.randn(DIM, 1, generator=g, dtype=DTYPE)
        x, xq = (torch.randn(n, DIM, generator=g, dtype=DTYPE) for n in (12, 8))
        y = x @ w + 0.1 * torch.randn(12, 1, generator=g, dtype=DTYPE)
        tasks.append(metazoo.Task([(x, y)], (xq, xq @ w)))
    return tasks


def linear_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(DIM, 1, bias=False).to(DTYPE)


def quadratic(task: metazoo.Task) -> tuple[torch.Tensor, torch.Tensor]:
    """Hessian A and linear term b of the support MSE: L(w) = w'Aw/2 - b'w + const."""
    x, y = task.support[0]
    return 2 * x.T @ x / len(x), (2 * x.T @ y / len(x)).squeeze(1)


def closed_form(theta: torch.Tensor, task: metazoo.Task, lam: float, damping: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The proximal solution phi* and ((1 + damping) I + A / lam)^{-1} grad L_query(phi*)."""
    a, b = quadratic(task)
    eye = torch.eye(DIM, dtype=DTYPE)
    phi = torch.linalg.solve(a + lam * eye, b + lam * theta)
    xq, yq = task.query
    query_grad = 2 * xq.T @ (xq @ phi - yq.squeeze(1)) / len(xq)
    return phi, torch.linalg.solve((1 + damping) * eye + a / lam, query_grad)


def converging_sgd(tasks: list[metazoo.Task], lam: float) -> metazoo.SGD:
    """Gradient descent with step 1 / L on the proximal problem: contracts every task."""
    largest = max(torch.linalg.eigvalsh(quadratic(t)[0]).max().item() for t in tasks)
    return metazoo.SGD(1.0 / (largest + lam))


@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_meta_gradient_matches_closed_form_on_a_quadratic(damping):
    lam = 1.5
    model = linear_model()
    tasks = linear_regression_tasks(2)
    learner = iMAML(model=model, criterion=F.mse_loss, lam=lam, cg_steps=DIM, damping=damping,
                    inner_optimizer=converging_sgd(tasks, lam), inner_steps=120)
    learner.meta_optimizer.zero_grad()
    result = learner.meta_backward(tasks)

    theta = model.weight.detach().squeeze(0)
    solutions = [closed_form(theta, t, lam, damping) for t in tasks]
    for task, (phi, _) in zip(tasks, solutions, strict=True):  # the inner problem is solved
        torch.testing.assert_close(learner.adapt(task).params["weight"].squeeze(0), phi,
                                   atol=1e-12, rtol=0)
    expected = sum(g for _, g in solutions) / len(tasks)
    assert (model.weight.grad.squeeze(0) - expected).abs().max().item() < 1e-6
    torch.testing.assert_close(model.weight.grad.squeeze(0), expected, atol=1e-10, rtol=1e-10)
    expected_loss = sum(F.mse_loss(t.query[0] @ phi, t.query[1].squeeze(1)).item()
                        for t, (phi, _) in zip(tasks, solutions, strict=True)) / 2
    assert result.meta_loss == pytest.approx(expected_loss, rel=1e-10)
    # not simply the query gradient (first-order): the Hessian term matters here
    query_grads = sum(closed_form(theta, t, 1e12)[1] for t in tasks) / 2
    assert (expected - query_grads).abs().max() > 1e-2


def test_meta_gradient_approaches_closed_form_as_cg_steps_grow():
    lam = 0.5
    model = linear_model()
    tasks = linear_regression_tasks(1, seed=4)
    theta = model.weight.detach().squeeze(0)
    _, exact = closed_form(theta, tasks[0], lam)
    system = torch.eye(DIM, dtype=DTYPE) + quadratic(tasks[0])[0] / lam
    errors = []
    for cg_steps in range(1, DIM + 1):
        learner = iMAML(model=model, criterion=F.mse_loss, lam=lam, cg_steps=cg_steps,
                        inner_optimizer=converging_sgd(tasks, lam), inner_steps=200)
        learner.meta_optimizer.zero_grad()
        learner.meta_backward(tasks)
        error = model.weight.grad.squeeze(0) - exact
        errors.append(torch.sqrt(error @ system @ error).item())  # CG's monotone error norm
    assert errors[0] > 1e-2
    for before, after in itertools.pairwise(errors):
        assert after < before or after < 1e-10
    assert errors[-1] < 1e-10


def test_meta_gradient_matches_finite_differences_on_a_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).to(DTYPE)
    g = torch.Generator().manual_seed(5)
    x, xq = torch.randn(8, 2, generator=g, dtype=DTYPE), torch.randn(6, 2, generator=g,
                                                                      dtype=DTYPE)
    task = metazoo.Task([(x, torch.sin(2 * x[:, :1]))], (xq, torch.sin(2 * xq[:, :1])))
    learner = iMAML(model=model, criterion=F.mse_loss, lam=4.0, cg_steps=20,
                    inner_optimizer=metazoo.SGD(0.15), inner_steps=150)
    learner.meta_optimizer.zero_grad()
    learner.meta_backward([task])
    params = dict(model.named_parameters())
    for _ in range(2):
        direction = {n: torch.randn(p.shape, generator=g, dtype=DTYPE) for n, p in params.items()}
        values = []
        with torch.no_grad():
            for sign in (1, -1):
                for n, p in params.items():
                    p.add_(sign * 1e-5 * direction[n])
                values.append(learner.evaluate([task]).loss)
                for n, p in params.items():
                    p.sub_(sign * 1e-5 * direction[n])
        numeric = (values[0] - values[1]) / 2e-5
        analytic = sum((params[n].grad * direction[n]).sum() for n in params).item()
        assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-10)


def test_conjugate_gradient_solves_spd_systems():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(8, 8, generator=g, dtype=DTYPE)
    a = m @ m.T + 0.5 * torch.eye(8, dtype=DTYPE)
    b = [torch.randn(5, generator=g, dtype=DTYPE), torch.randn(3, generator=g, dtype=DTYPE)]

    def matvec(v: list[torch.Tensor]) -> list[torch.Tensor]:
        out = a @ torch.cat(v)
        return [out[:5], out[5:]]

    exact = torch.linalg.solve(a, torch.cat(b))
    torch.testing.assert_close(torch.cat(conjugate_gradient(matvec, b, 8)), exact)
    # more iterations than dimensions: the converged residual must not turn into NaN
    solution = torch.cat(conjugate_gradient(matvec, b, 30))
    assert torch.isfinite(solution).all()
    torch.testing.assert_close(solution, exact)
    assert torch.cat(conjugate_gradient(matvec, [torch.zeros(5, dtype=DTYPE),
                                                 torch.zeros(3, dtype=DTYPE)], 3)).abs().max() == 0


class NetWithUnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
        self.unused = nn.Linear(2, 2)  # e.g. a head another experiment uses

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("bn_mode", ["batch", "running"])
def test_batchnorm_network_with_an_unused_layer(bn_mode):
    torch.manual_seed(0)
    model = NetWithUnusedLayer().to(DTYPE)
    g = torch.Generator().manual_seed(0)
    tasks = [metazoo.Task([(torch.randn(6, 3, generator=g, dtype=DTYPE),
                            torch.tensor([0, 1] * 3))],
                          (torch.randn(4, 3, generator=g, dtype=DTYPE), torch.tensor([0, 1] * 2)))
             for _ in range(2)]
    learner = iMAML(model=model, criterion=F.cross_entropy, lam=2.0, inner_steps=3,
                    bn_mode=bn_mode, inner_optimizer=metazoo.SGD(0.1))
    result = learner.meta_step(tasks)
    assert result.accuracy is not None and result.num_tasks == 2
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.unused.weight.grad.abs().max() == 0
    assert model.body[3].weight.grad.abs().max() > 1e-4
    # with batch statistics everywhere, BatchNorm cancels the first bias: no meta-gradient
    first_bias = model.body[0].bias.grad.abs().max()
    assert first_bias < 1e-12 if bn_mode == "batch" else first_bias > 1e-4


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"lam": 0.0}, "lam must be a positive number"),
    ({"lam": -1.0}, r"lam must be a positive number \(the proximal strength\), got -1.0"),
    ({"cg_steps": 0}, "cg_steps must be an int >= 1, got 0"),
    ({"damping": -0.1}, "damping must be a number >= 0, got -0.1"),
    ({"lam": float("inf")}, "lam must be a positive number .*got inf; use a finite value"),
    ({"lam": float("nan")}, "lam must be a positive number .*got nan"),
    ({"damping": float("inf")}, "damping must be a number >= 0, got inf; use a finite"),
    ({"inner_steps": 0}, "inner_steps must be an int >= 1, got 0"),
])
def test_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        iMAML(model=linear_model(), criterion=F.mse_loss, **kwargs)
