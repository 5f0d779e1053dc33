"""Gradient correctness of the warp objective modes and the init objectives (float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import warpgrad
from warpgrad import (
    DualUpdater,
    Leap,
    OptimizerParameters,
    ReplayState,
    SimplifiedLeap,
    Warp,
    WarpObjective,
    resolve_init_objective,
    resolve_warp_objective,
)


def _warp(model, mode="exact", lr=0.3, momentum=0.5, trainable=True):
    updater = DualUpdater(F.cross_entropy, warp_objective=mode, init_objective="none")
    params = OptimizerParameters(trainable=trainable, default_lr=lr, default_momentum=momentum)
    return Warp(model, model.adapt_modules(), model.warp_modules(), updater,
                optimizer_parameters=params)


def _state(warp, seed=3, momentum=True):
    g = torch.Generator().manual_seed(seed)
    params = {n: p.detach() + 0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype)
              for n, p in warp.named_adapt_parameters()}
    buf = ({n: 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
           if momentum else None)
    return ReplayState(4, params, buf)


def _batches(seed=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (6,), generator=g)) for _ in range(2)]


def _objective_value(objective, warp, state, batches):
    ctx = warp.replay_context(F.cross_entropy)
    return objective.loss(ctx, state, batches).item()


def _analytic(objective, warp, state, batches):
    ctx = warp.replay_context(F.cross_entropy)
    leaves = list(ctx.warp.values()) + list(warp.optimizer_parameters())
    loss = objective.loss(ctx, state, batches)
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def _central_differences(objective, warp, state, batches, eps=1e-6):
    tensors = list(warp.warp_parameters()) + list(warp.optimizer_parameters())
    out = []
    for t in tensors:
        grad = torch.zeros_like(t)
        flat = grad.view(-1)
        for i in range(t.numel()):
            with torch.no_grad():
                original = t.view(-1)[i].item()
                t.view(-1)[i] = original + eps
            plus = _objective_value(objective, warp, state, batches)
            with torch.no_grad():
                t.view(-1)[i] = original - eps
            minus = _objective_value(objective, warp, state, batches)
            with torch.no_grad():
                t.view(-1)[i] = original
            flat[i] = (plus - minus) / (2 * eps)
        out.append(grad)
    return out


@pytest.mark.parametrize("momentum", [True, False])
def test_exact_mode_matches_central_finite_differences(make_model, momentum):
    warp = _warp(make_model(width=3), mode="exact", momentum=0.5 if momentum else 0.0)
    state, batches = _state(warp, momentum=momentum), _batches()
    objective = WarpObjective("exact")
    analytic = _analytic(objective, warp, state, batches)
    numeric = _central_differences(objective, warp, state, batches)
    assert len(analytic) == len(numeric)
    learned = list(warp.optimizer_parameters())
    assert len(learned) == (16 if momentum else 8)  # one lr (and momentum) per tensor
    for a, n in zip(analytic, numeric, strict=True):
        assert a is not None
        torch.testing.assert_close(a, n, rtol=1e-6, atol=1e-8)
    # The learning rates and momenta really are in the objective.
    assert all(g.abs().sum() > 0 for g in analytic[-len(learned):])


def test_stop_gradient_equals_its_analytic_value(make_model):
    warp = _warp(make_model(width=3), mode="stop_gradient")
    state, (b1, b2) = _state(warp), _batches()
    ctx = warp.replay_context(F.cross_entropy)
    # Analytic Eq. 12: the step is a constant for the warp parameters.
    theta = {n: state.params[n].clone().requires_grad_(True) for n in ctx.adapt_names}
    inner = ctx.loss(theta, b1)
    g = torch.autograd.grad(inner, list(theta.values()))
    lr = {n: v.detach() for n, v in warp.optimizer_parameter_container.lr.items()}
    mom = {n: v.detach() for n, v in warp.optimizer_parameter_container.momentum.items()}
    stepped = {n: (theta[n] - lr[n] * (mom[n] * state.momentum[n] + gi)).detach()
               for (n, gi) in zip(ctx.adapt_names, g, strict=True)}
    warp_leaves = list(ctx.warp.values())
    expected = torch.autograd.grad(ctx.loss(stepped, b2), warp_leaves)
    got = _analytic(WarpObjective("stop_gradient"), warp, state, [b1, b2])
    for a, e in zip(got[:len(warp_leaves)], expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-14)
    # The optimizer parameters do not depend on the inner gradient's phi-dependence: their
    # gradients are identical in both modes (and equal finite differences).
    exact = _analytic(WarpObjective("exact"), warp, state, [b1, b2])
    for a, e in zip(got[len(warp_leaves):], exact[len(warp_leaves):], strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-14)
    # ... while the warp gradients differ (the second-order term is dropped).
    assert not torch.allclose(got[0], exact[0], rtol=1e-3)


def _toy(w=0.7, a=1.3, lr=0.25):
    adapt = nn.Linear(1, 1, bias=False).double()
    warp_layer = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        adapt.weight.fill_(w)
        warp_layer.weight.fill_(a)
    model = nn.Sequential(adapt, warp_layer)

    def half_squared(out, target):
        return 0.5 * ((out - target) ** 2).sum()

    updater = DualUpdater(half_squared, init_objective="none")
    params = OptimizerParameters(trainable=True, default_lr=lr)
    return Warp(model, [adapt], [warp_layer], updater, optimizer_parameters=params), \
        half_squared


def test_toy_where_exact_and_stop_gradient_differ_matches_hand_computation():
    w, a, lr = 0.7, 1.3, 0.25
    x1, y1, x2, y2 = 0.9, 0.2, -0.4, 0.5
    warp, criterion = _toy(w, a, lr)
    state = ReplayState(0, {"0.weight": torch.tensor([[w]], dtype=torch.float64)})
    batches = [(torch.tensor([[x1]], dtype=torch.float64), torch.tensor([[y1]],
                                                                        dtype=torch.float64)),
               (torch.tensor([[x2]], dtype=torch.float64), torch.tensor([[y2]],
                                                                        dtype=torch.float64))]
    # By hand: r1 = w a x1 - y1, g = r1 a x1, w' = w - lr g, r2 = w' a x2 - y2.
    g = (w * a * x1 - y1) * a * x1
    w1 = w - lr * g
    r2 = w1 * a * x2 - y2
    dw1_da = -lr * x1 * (2 * w * a * x1 - y1)
    exact_da = r2 * (w1 * x2 + a * x2 * dw1_da)
    stop_da = r2 * w1 * x2
    dloglr = r2 * a * x2 * (-g) * lr  # d/d(log lr) = lr * d/d(lr)
    results = {}
    for mode in ("exact", "stop_gradient"):
        ctx = warp.replay_context(criterion)
        loss = WarpObjective(mode).loss(ctx, state, batches)
        da, dlr = torch.autograd.grad(loss, [ctx.warp["1.weight"],
                                             *warp.optimizer_parameters()])
        results[mode] = (da.item(), dlr.item())
        assert loss.item() == pytest.approx(0.5 * r2**2, rel=1e-12)
    assert results["exact"][0] == pytest.approx(exact_da, rel=1e-12)
    assert results["stop_gradient"][0] == pytest.approx(stop_da, rel=1e-12)
    assert results["exact"][1] == pytest.approx(dloglr, rel=1e-12)
    assert results["stop_gradient"][1] == pytest.approx(dloglr, rel=1e-12)
    assert abs(exact_da - stop_da) > 0.05  # the toy separates the two modes


def test_approx_mode_is_the_loss_at_the_stored_state():
    w, a = 0.7, 1.3
    warp, criterion = _toy(w, a)
    state = ReplayState(0, {"0.weight": torch.tensor([[w]], dtype=torch.float64)})
    x1, y1 = 0.9, 0.2
    batch = (torch.tensor([[x1]], dtype=torch.float64), torch.tensor([[y1]],
                                                                    dtype=torch.float64))
    ctx = warp.replay_context(criterion)
    objective = WarpObjective("approx")
    assert objective.num_batches == 1
    loss = objective.loss(ctx, state, [batch])
    (da,) = torch.autograd.grad(loss, [ctx.warp["1.weight"]])
    assert da.item() == pytest.approx((w * a * x1 - y1) * w * x1, rel=1e-12)


def _ctx_for_linear():
    model = nn.Linear(2, 1).double()
    updater = DualUpdater(F.mse_loss)
    warp = Warp(model, [model], [], updater)
    return warp.replay_context(F.mse_loss)


def _point(w0, w1, b):
    return {"weight": torch.tensor([[w0, w1]], dtype=torch.float64),
            "bias": torch.tensor([b], dtype=torch.float64)}


def test_simplified_leap_equals_hand_computation_last_segment_included():
    ctx = _ctx_for_linear()
    # Task 1: segments (3, 0, 4) of length 5 then (0, 1, 0) of length 1 (the last one, from
    # the state before the final step to the adapted parameters).
    task1 = [_point(0, 0, 0), _point(3, 0, 4), _point(3, 1, 4)]
    # Task 2: one segment (0, -2, 0) then (1, 0, 0).
    task2 = [_point(1, 1, 1), _point(1, -1, 1), _point(2, -1, 1)]
    grads = SimplifiedLeap(norm=True).gradient(ctx, [task1, task2], [None, None])
    # Per task sum of (theta_i - theta_{i+1}) / norm, averaged over the 2 tasks.
    t1_w, t1_b = [-0.6 + 0.0, 0.0 - 1.0], -0.8 + 0.0
    t2_w, t2_b = [0.0 - 1.0, 1.0 + 0.0], 0.0
    expected_w = [(t1_w[0] + t2_w[0]) / 2, (t1_w[1] + t2_w[1]) / 2]
    torch.testing.assert_close(grads["weight"], torch.tensor([expected_w], dtype=torch.float64))
    torch.testing.assert_close(grads["bias"], torch.tensor([(t1_b + t2_b) / 2],
                                                           dtype=torch.float64))
    unnormed = SimplifiedLeap(norm=False).gradient(ctx, [task1], [None])
    torch.testing.assert_close(unnormed["weight"], torch.tensor([[-3.0, -1.0]],
                                                                dtype=torch.float64))
    torch.testing.assert_close(unnormed["bias"], torch.tensor([-4.0], dtype=torch.float64))


def test_simplified_leap_zero_segment_gives_zero_not_nan():
    ctx = _ctx_for_linear()
    grads = SimplifiedLeap().gradient(ctx, [[_point(1, 1, 1), _point(1, 1, 1)]], [None])
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())


def test_leap_equals_hand_computation():
    ctx = _ctx_for_linear()
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(5, 2, generator=g, dtype=torch.float64),
             torch.randn(5, 1, generator=g, dtype=torch.float64))
    trajectory = [_point(0.1, 0.2, 0.0), _point(0.4, -0.1, 0.3), _point(0.5, 0.0, 0.2)]

    def loss_and_grad(p):
        w = p["weight"].clone().requires_grad_(True)
        b = p["bias"].clone().requires_grad_(True)
        loss = F.mse_loss(batch[0] @ w.T + b, batch[1])
        gw, gb = torch.autograd.grad(loss, [w, b])
        return loss.item(), gw, gb

    expected_w = torch.zeros(1, 2, dtype=torch.float64)
    expected_b = torch.zeros(1, dtype=torch.float64)
    for i in range(2):
        l0, gw, gb = loss_and_grad(trajectory[i])
        l1, _, _ = loss_and_grad(trajectory[i + 1])
        dw = trajectory[i + 1]["weight"] - trajectory[i]["weight"]
        db = trajectory[i + 1]["bias"] - trajectory[i]["bias"]
        dl = l1 - l0
        # the documented eps keeps zero-length segments finite
        d = math.sqrt(dw.pow(2).sum().item() + db.pow(2).sum().item() + dl**2) + 1e-9
        expected_w -= (dw + dl * gw) / d
        expected_b -= (db + dl * gb) / d
    grads = Leap().gradient(ctx, [trajectory], [batch])
    torch.testing.assert_close(grads["weight"], expected_w, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads["bias"], expected_b, rtol=1e-12, atol=1e-14)


def test_objective_resolution_by_name_object_and_reference_code():
    assert resolve_warp_objective(1).mode == "stop_gradient"
    assert resolve_warp_objective(0) is None
    assert resolve_warp_objective("exact").mode == "exact"
    assert resolve_warp_objective(1, approx=True).mode == "approx"
    custom = WarpObjective("approx")
    assert resolve_warp_objective(custom) is custom
    assert isinstance(resolve_init_objective(1), SimplifiedLeap)
    assert resolve_init_objective(0) is None
    assert isinstance(resolve_init_objective("leap", norm=False), Leap)
    assert resolve_init_objective("leap", norm=False).norm is False
    with pytest.raises(ValueError, match="approx=True contradicts"):
        resolve_warp_objective("exact", approx=True)
    with pytest.raises(ValueError, match="warp_objective=2"):
        resolve_warp_objective(2)
    with pytest.raises(ValueError, match="init_objective='nope'"):
        resolve_init_objective("nope")
    with pytest.raises(ValueError, match="mode='second'"):
        WarpObjective("second")
    assert warpgrad.objectives.NORM_EPS > 0


@pytest.mark.parametrize("mode", ["exact", "stop_gradient", "approx"])
def test_batched_loss_of_replay_states_equals_the_per_state_loss(make_model, mode):
    """``batched_loss`` on ``ReplayState`` objects (stacked flat inside, one without momentum:
    a zero buffer) gives each state's ``loss`` and its derivatives (float64)."""
    warp = _warp(make_model(), mode=mode)
    states = [_state(warp, seed=3), _state(warp, seed=4, momentum=False)]
    batches = [_batches(5), _batches(6)]
    ctx = warp.replay_context(F.cross_entropy)
    leaves = list(ctx.warp.values()) + list(warp.optimizer_parameters())
    batched = WarpObjective(mode).batched_loss(ctx, states, batches)
    looped = torch.stack([WarpObjective(mode).loss(ctx, s, b)
                          for s, b in zip(states, batches, strict=True)])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-14)
    got = torch.autograd.grad(batched.sum(), leaves, allow_unused=True)
    expected = torch.autograd.grad(looped.sum(), leaves, allow_unused=True)
    for g, e in zip(got, expected, strict=True):
        if e is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-13)
