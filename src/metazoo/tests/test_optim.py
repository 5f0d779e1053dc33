"""Parity of the pure inner optimizers with torch.optim, and their hyperparameter forms."""

import itertools

import pytest
import torch
from torch import nn

import metazoo
from metazoo.optim import safe_sqrt

STEPS = 4  # covers SGD's first-step momentum buffer and Adam's bias correction


def _problem(seed: int = 0) -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    grads = [
        {name: torch.randn_like(p) for name, p in model.named_parameters()} for _ in range(STEPS)
    ]
    # Exact zeros exercise safe_sqrt's value path and Adam/RMSprop's zero second moment.
    grads[0]["2.bias"] = torch.zeros_like(grads[0]["2.bias"])
    return model, grads


def _run_torch(model: nn.Module, grads: list[dict], factory) -> dict[str, torch.Tensor]:
    reference = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    opt = factory(list(reference.values()))
    for g in grads:
        for name, p in reference.items():
            p.grad = g[name].clone()
        opt.step()
    return {n: p.detach() for n, p in reference.items()}


def _run_pure(model: nn.Module, grads: list[dict], opt: metazoo.InnerOptimizer):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = opt.init(params)
    for g in grads:
        params, state = opt.step(params, g, state)
    return params


def _assert_close(a: dict, b: dict) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-12)


SGD_GRID = [
    dict(lr=lr, momentum=m, dampening=d, weight_decay=wd, nesterov=n)
    for lr, m, d, wd, n in itertools.product([0.1, 0.7], [0.0, 0.9], [0.0, 0.3], [0.0, 0.05],
                                             [False, True])
    if not (n and (m == 0 or d != 0))
]


ADAM_GRID = [
    dict(lr=lr, betas=b, eps=e, weight_decay=wd, amsgrad=a)
    for lr, b, e, wd, a in itertools.product([1e-3, 0.1], [(0.9, 0.999), (0.5, 0.8)],
                                             [1e-8, 1e-3], [0.0, 0.1], [False, True])
]


RMSPROP_GRID = [
    dict(lr=lr, alpha=a, eps=e, weight_decay=wd, momentum=m, centered=c)
    for lr, a, e, wd, m, c in itertools.product([1e-2, 0.1], [0.99, 0.5], [1e-8, 1e-2],
                                                [0.0, 0.1], [0.0, 0.9], [False, True])
]


@pytest.mark.parametrize(
    "name, hp",
    [("SGD", hp) for hp in SGD_GRID] + [("Adam", hp) for hp in ADAM_GRID]
    + [("RMSprop", hp) for hp in RMSPROP_GRID],
    ids=str,
)
def test_matches_torch_optim(name, hp):
    """One step after another, each pure optimizer equals its torch.optim namesake."""
    model, grads = _problem()
    expected = _run_torch(model, grads,
                          lambda p: getattr(torch.optim, name)(p, foreach=False, **hp))
    hp = dict(hp)
    lr = hp.pop("lr")
    _assert_close(_run_pure(model, grads, getattr(metazoo, name)(lr, **hp)), expected)


def test_hyperparameter_forms_agree():
    """Float, scalar tensor, per-parameter dict and per-step list give the same update."""
    model, grads = _problem()
    names = [n for n, _ in model.named_parameters()]
    forms = [
        0.3,
        torch.tensor(0.3, dtype=torch.float64),
        {n: torch.tensor(0.3, dtype=torch.float64) for n in names},
        [0.3] * STEPS,
        [{n: 0.3 for n in names}] * STEPS,
    ]
    results = [_run_pure(model, grads, metazoo.SGD(lr, momentum=0.5)) for lr in forms]
    for other in results[1:]:
        _assert_close(other, results[0])


def test_per_step_learning_rates_are_used_in_order():
    model, grads = _problem()
    lrs = [0.1, 0.2, 0.3, 0.4]
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = {n: p - sum(lr * g[n] for lr, g in zip(lrs, grads)) for n, p in params.items()}
    _assert_close(_run_pure(model, grads, metazoo.SGD(lrs)), expected)


def test_per_step_list_too_short_is_a_clear_error():
    model, grads = _problem()
    with pytest.raises(ValueError, match="per-step values"):
        _run_pure(model, grads, metazoo.SGD([0.1, 0.2]))


def test_step_is_out_of_place():
    model, grads = _problem()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = {n: p.clone() for n, p in params.items()}
    opt = metazoo.Adam(0.1)
    state = opt.init(params)
    state_before = {n: t.clone() for n, t in state["exp_avg"].items()}
    opt.step(params, grads[1], state)
    _assert_close(params, before)
    _assert_close(state["exp_avg"], state_before)


def test_tensor_hyperparameters_receive_gradients():
    model, grads = _problem()
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    momentum = torch.tensor(0.9, dtype=torch.float64, requires_grad=True)
    params = _run_pure(model, grads, metazoo.SGD(lr, momentum=momentum))
    lr_grad, momentum_grad = torch.autograd.grad(sum(p.sum() for p in params.values()),
                                                 [lr, momentum])
    assert lr_grad.abs() > 0 and momentum_grad.abs() > 0


def test_with_hyperparameter_tensors_replaces_only_tensors():
    lr = torch.tensor(0.1)
    opt = metazoo.Adam(lr, betas=(0.9, torch.tensor(0.99)))
    assert [t.item() for t in opt.hyperparameter_tensors()] == pytest.approx([0.1, 0.99])
    new = opt.with_hyperparameter_tensors([torch.tensor(0.5), torch.tensor(0.7)])
    assert new.hyperparameters["lr"].item() == 0.5
    assert new.hyperparameters["beta1"] == 0.9
    assert opt.hyperparameters["lr"] is lr  # the original is untouched


def test_safe_sqrt_has_finite_derivatives_at_zero():
    x = torch.tensor([0.0, 4.0], dtype=torch.float64, requires_grad=True)
    y = safe_sqrt(x)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    assert y.tolist() == [0.0, 2.0]
    assert g.tolist() == [0.0, 0.25]
    assert torch.isfinite(gg).all()
    # Plain sqrt gives inf here, which turns into NaN through a zero gradient downstream.
    assert torch.isinf(torch.autograd.grad(torch.sqrt(x).sum(), x)[0][0])


def test_adam_second_order_through_zero_gradient_is_finite():
    """A parameter with exactly zero gradient must not poison the meta-gradient with NaN."""
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    opt = metazoo.Adam(0.1)
    params = {"w": w}
    state = opt.init(params)
    for _ in range(2):
        loss = (params["w"][0] ** 2).sum()  # no dependence on w[1]: its gradient is exactly 0
        (g,) = torch.autograd.grad(loss, params["w"], create_graph=True)
        params, state = opt.step(params, {"w": g}, state)
    (meta,) = torch.autograd.grad(params["w"].sum(), w)
    assert torch.isfinite(meta).all()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: metazoo.SGD(-0.1), "lr"),
        (lambda: metazoo.SGD(0.1, momentum=-1), "momentum"),
        (lambda: metazoo.SGD(0.1, nesterov=True), "nesterov"),
        (lambda: metazoo.Adam(0.1, betas=(1.0, 0.9)), r"betas\[0\]"),
        (lambda: metazoo.Adam(0.1, eps=-1.0), "eps"),
        # Issue 28 item 8: accepted, then 0/0 = NaN where a gradient was exactly zero.
        (lambda: metazoo.Adam(0.1, eps=0), r"eps=0 is outside \(0.0, inf\]; eps must be > 0"),
        (lambda: metazoo.Adam(0.1, eps=torch.tensor(0.0)), r"eps=.* is outside \(0.0"),
        (lambda: metazoo.RMSprop(0.1, eps=0.0), r"eps=0.0 is outside \(0.0, inf\]"),
        (lambda: metazoo.RMSprop(0.1, alpha=2.0), "alpha"),
        (lambda: metazoo.SGD("fast"), "lr must be a float"),
        (lambda: metazoo.SGD(torch.tensor([0.1, -0.2])), "lr"),
    ],
)
def test_bad_hyperparameters_are_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_with_hyperparameters_changes_form_and_validates():
    model, grads = _problem()
    names = [n for n, _ in model.named_parameters()]
    opt = metazoo.SGD(0.3, momentum=0.5)
    learned = opt.with_hyperparameters(lr=[{n: torch.tensor(0.3, dtype=torch.float64)
                                            for n in names}] * STEPS)
    _assert_close(_run_pure(model, grads, learned), _run_pure(model, grads, opt))
    assert opt.hyperparameters["lr"] == 0.3  # the original is untouched
    with pytest.raises(ValueError, match=r"has no hyperparameters \['betas'\]"):
        opt.with_hyperparameters(betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="lr"):
        opt.with_hyperparameters(lr=-1.0)


def test_a_float_lr_beyond_the_parameters_dtype_overflows_to_inf_instead_of_raising():
    """Found by the issue 28 probe: SGD(1e300) on float32 parameters raised torch's raw 'value
    cannot be converted to type float without overflow' from the fused update, where Adam's
    overflowed to inf and the learners named the task and the inner step."""
    p = {"w": torch.tensor([1.0, -2.0], dtype=torch.float32)}
    g = {"w": torch.tensor([0.5, 0.0], dtype=torch.float32)}
    opt = metazoo.SGD(1e300)
    new, _ = opt.step(p, g, opt.init(p))
    assert new["w"][0] == float("-inf") and torch.isnan(new["w"][1])  # 0 * inf: NaN
    # float64 holds the rate: the fused path, exactly torch.optim.SGD's arithmetic.
    p64 = {"w": p["w"].double()}
    new64, _ = opt.step(p64, {"w": g["w"].double()}, opt.init(p64))
    assert torch.equal(new64["w"], torch.add(p64["w"], g["w"].double(), alpha=-1e300))
