"""Gradient correctness of unroll (finite differences) and exactness of checkpointing."""

import gc
import importlib

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import metazoo


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3))


def _convnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.AvgPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 3),
    )


def _data(model_name: str, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 3) if model_name == "mlp" else (n, 1, 8, 8)
    return torch.randn(shape, generator=g), torch.randint(0, 3, (n,), generator=g)


def _setup(model_name: str, bn_mode: str = "batch", seed: int = 0):
    torch.manual_seed(seed)
    model = _mlp() if model_name == "mlp" else _convnet()
    support = [_data(model_name, 9, seed + k) for k in range(3)]
    query = _data(model_name, 7, seed + 100)
    loss_fn = metazoo.make_loss_fn(model, F.cross_entropy, bn_mode=bn_mode)
    return model, support, query, loss_fn


def _meta_loss(model, loss_fn, init, optimizer, support, query, *, steps, bn_mode="batch",
               **unroll_kwargs):
    buffers = metazoo.initial_buffers(model, bn_mode)
    result = metazoo.unroll(loss_fn, init, optimizer, support, steps=steps, buffers=buffers,
                            **unroll_kwargs)
    full = {**unroll_kwargs.get("static", {}), **result.params}
    output, _ = metazoo.forward(model, full, result.buffers, query[0], bn_mode=bn_mode,
                                training=False)
    return F.cross_entropy(output, query[1]), result


OPTIMIZERS = {
    "sgd_momentum": lambda lr: metazoo.SGD(lr, momentum=0.9, weight_decay=0.01),
    "sgd_nesterov": lambda lr: metazoo.SGD(lr, momentum=0.5, nesterov=True),
    "adam": lambda lr: metazoo.Adam(lr, betas=(0.8, 0.9)),
    "adam_amsgrad": lambda lr: metazoo.Adam(lr, amsgrad=True),
    "rmsprop": lambda lr: metazoo.RMSprop(lr, momentum=0.5, centered=True),
}
BASE_LR = {"sgd_momentum": 0.3, "sgd_nesterov": 0.3, "adam": 0.05, "adam_amsgrad": 0.05,
           "rmsprop": 0.02}


def _central_difference(f, tensors, vs, eps):
    with torch.no_grad():
        for t, v in zip(tensors, vs):
            t.add_(eps * v)
        plus = f().item()
        for t, v in zip(tensors, vs):
            t.sub_(2 * eps * v)
        minus = f().item()
        for t, v in zip(tensors, vs):
            t.add_(eps * v)
    return (plus - minus) / (2 * eps)


def _directional_check(f, tensors, grads, seed, eps=1e-5, directions=2):
    """Finite differences of f along random directions vs <grad, direction>.

    Richardson extrapolation of two central differences cancels the eps^2 truncation term,
    which matters for the strongly curved Adam/RMSprop updates (error then ~eps^4).
    """
    g = torch.Generator().manual_seed(seed)
    for _ in range(directions):
        vs = [torch.randn(t.shape, generator=g) for t in tensors]
        coarse = _central_difference(f, tensors, vs, eps)
        fine = _central_difference(f, tensors, vs, eps / 2)
        numeric = (4 * fine - coarse) / 3
        analytic = sum((gr * v).sum() for gr, v in zip(grads, vs)).item()
        assert abs(numeric - analytic) <= 1e-6 * max(abs(analytic), 1e-3), (numeric, analytic)


@pytest.mark.parametrize("model_name", ["mlp", "conv_bn"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("steps", [1, 3])
def test_meta_gradient_matches_finite_differences(model_name, opt_name, steps):
    model, support, query, loss_fn = _setup(model_name)
    init = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    lr = torch.tensor(BASE_LR[opt_name], requires_grad=True)
    optimizer = OPTIMIZERS[opt_name](lr)

    def f():
        return _meta_loss(model, loss_fn, init, optimizer, support, query, steps=steps)[0]

    tensors = [*init.values(), lr]
    grads = torch.autograd.grad(f(), tensors)
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[-1].abs() > 0  # the learning rate does receive a meta-gradient
    _directional_check(f, list(init.values()), grads[:-1], seed=steps)
    _directional_check(f, [lr], grads[-1:], seed=steps + 1)


@pytest.mark.parametrize("bn_mode", ["batch", "running"])
def test_meta_gradient_matches_finite_differences_with_static_params(bn_mode):
    """Static (non-adapted) parameters get second-order meta-gradients through the unroll."""
    model, support, query, loss_fn = _setup("conv_bn", bn_mode=bn_mode)
    all_params = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    head, body = metazoo.split_params(all_params, lambda n: n.startswith("9."))
    optimizer = metazoo.SGD(0.5, momentum=0.9)

    def f():
        return _meta_loss(model, loss_fn, head, optimizer, support, query, steps=3,
                          bn_mode=bn_mode, static=body)[0]

    grads = torch.autograd.grad(f(), list(body.values()))
    _directional_check(f, list(body.values()), grads, seed=7)


def _meta_grads(model_name, opt_name, steps, checkpoint, bn_mode="batch", **kwargs):
    model, support, query, loss_fn = _setup(model_name, bn_mode=bn_mode)
    lr = torch.tensor(BASE_LR[opt_name], requires_grad=True)
    optimizer = OPTIMIZERS[opt_name](lr)
    init = dict(model.named_parameters())
    loss, result = _meta_loss(model, loss_fn, init, optimizer, support, query, steps=steps,
                              bn_mode=bn_mode, checkpoint=checkpoint, **kwargs)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()] + [lr.grad.clone()]
    model.zero_grad(set_to_none=True)  # nothing carries over into the other run
    return grads, result, loss.detach()


def _assert_grads_equal(a, b, tol=1e-10):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x is not None and y is not None
        torch.testing.assert_close(x, y, rtol=0, atol=tol)


@pytest.mark.parametrize("model_name, bn_mode", [("mlp", "batch"), ("conv_bn", "batch"),
                                                 ("conv_bn", "running")])
@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("steps", [1, 5, 20])
@pytest.mark.parametrize("segment", [1, 3])
def test_checkpointed_equals_plain(model_name, bn_mode, opt_name, steps, segment):
    plain, plain_result, plain_loss = _meta_grads(model_name, opt_name, steps, None, bn_mode)
    ckpt, ckpt_result, ckpt_loss = _meta_grads(model_name, opt_name, steps, segment, bn_mode)
    assert plain[0].abs().sum() > 0
    _assert_grads_equal(plain, ckpt)
    torch.testing.assert_close(plain_loss, ckpt_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(plain_result.losses, ckpt_result.losses, rtol=0, atol=1e-12)
    # Running statistics after the checkpointed unroll (forward once, recomputed in backward)
    # equal those of the plain unroll: recomputation never updates them twice.
    for name, buffer in plain_result.buffers.items():
        torch.testing.assert_close(ckpt_result.buffers[name], buffer, rtol=0, atol=1e-12)


def test_running_statistics_are_per_task_and_updated_once_per_step():
    model, support, _, loss_fn = _setup("conv_bn", bn_mode="running")
    buffers = metazoo.initial_buffers(model, "running")
    init = dict(model.named_parameters())
    for checkpoint in (None, 2):
        result = metazoo.unroll(loss_fn, init, metazoo.SGD(0.1), support, steps=5,
                                buffers=buffers, checkpoint=checkpoint)
        assert result.buffers["1.num_batches_tracked"].item() == 5
        assert buffers["1.num_batches_tracked"].item() == 0  # the caller's dict is untouched
    assert model[1].num_batches_tracked.item() == 0  # the module is untouched


@pytest.mark.parametrize("checkpoint", [2, metazoo.Checkpoint(snapshots=1)])
def test_checkpointed_static_and_hyperparameter_gradients_equal_plain(checkpoint):
    def run(checkpoint):
        model, support, query, loss_fn = _setup("conv_bn")
        params = dict(model.named_parameters())
        head, body = metazoo.split_params(params, lambda n: n.startswith("9."))
        lrs = [{n: torch.full_like(p, 0.2, requires_grad=True) for n, p in head.items()}
               for _ in range(6)]  # Meta-SGD learning rates, one set per step (MAML++ LSLR)
        loss, _ = _meta_loss(model, loss_fn, head, metazoo.SGD(lrs, momentum=0.5), support,
                             query, steps=6, static=body, checkpoint=checkpoint)
        tensors = [*params.values(), *(t for step in lrs for t in step.values())]
        return torch.autograd.grad(loss, tensors)

    _assert_grads_equal(run(None), run(checkpoint))


@pytest.mark.parametrize("checkpoint", [3, metazoo.Checkpoint(snapshots=2)])
def test_trajectory_gradients_equal_plain(checkpoint):
    """A multi-step loss over intermediate points (MAML++ MSL) is exact under checkpointing."""
    def run(checkpoint):
        model, support, query, loss_fn = _setup("conv_bn")
        params = dict(model.named_parameters())
        buffers = metazoo.initial_buffers(model, "batch")
        result = metazoo.unroll(loss_fn, params, metazoo.Adam(0.05), support, steps=7,
                                buffers=buffers, checkpoint=checkpoint, keep_trajectory=True)
        assert len(result.trajectory) == 8
        total = 0.0
        for k, point in enumerate(result.trajectory):
            output, _ = metazoo.forward(model, point, buffers, query[0])
            total = total + (k + 1) * F.cross_entropy(output, query[1])
        return torch.autograd.grad(total, list(params.values()))

    _assert_grads_equal(run(None), run(checkpoint))


@pytest.mark.parametrize("checkpoint", [2, metazoo.Checkpoint(snapshots=1)])
@pytest.mark.parametrize("first_order", [False, True])
def test_buffer_trajectory_gradients_equal_plain(first_order, checkpoint):
    """Running statistics at every point (multi-step loss in running mode) are exact too."""
    def run(checkpoint):
        model, support, query, loss_fn = _setup("conv_bn", bn_mode="running")
        params = dict(model.named_parameters())
        result = metazoo.unroll(loss_fn, params, metazoo.SGD(0.3, momentum=0.9), support,
                                steps=5, buffers=metazoo.initial_buffers(model, "running"),
                                checkpoint=checkpoint, keep_trajectory=True,
                                first_order=first_order)
        assert len(result.buffer_trajectory) == 6
        assert result.buffer_trajectory[-1] is result.buffers or all(
            result.buffer_trajectory[-1][k] is v for k, v in result.buffers.items())
        counts = [b["1.num_batches_tracked"].item() for b in result.buffer_trajectory]
        assert counts == [0, 1, 2, 3, 4, 5]
        total = 0.0
        for point, point_buffers in zip(result.trajectory, result.buffer_trajectory):
            output, _ = metazoo.forward(model, point, point_buffers, query[0],
                                        bn_mode="running", training=False)
            total = total + F.cross_entropy(output, query[1])
        return torch.autograd.grad(total, list(params.values()))

    _assert_grads_equal(run(None), run(checkpoint))


def test_backward_grad_clip_limits_each_step_and_is_exact_under_checkpointing():
    def run(checkpoint, clip):
        model, support, query, loss_fn = _setup("mlp")
        params = dict(model.named_parameters())
        seen = []
        loss, _ = _meta_loss(model, loss_fn, params, metazoo.SGD(1.0), support, query, steps=6,
                             checkpoint=checkpoint, backward_grad_clip=clip)
        grads = torch.autograd.grad(loss * 1000.0, list(params.values()))
        seen.append(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
        return grads, seen[0]

    clipped, norm = run(None, 0.01)
    assert norm <= 0.01 + 1e-9  # the gradient into params_0 passed through step 0's clip
    _, big = run(None, None)
    assert big > 1.0
    _assert_grads_equal(clipped, run(2, 0.01)[0])


def test_inner_grad_clip_matches_torch_clip_grad_norm():
    model, support, _, loss_fn = _setup("mlp")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = metazoo.unroll(loss_fn, params, metazoo.SGD(1.0), support, steps=1,
                            inner_grad_clip=0.05)
    reference = _mlp()
    reference.load_state_dict(model.state_dict())
    F.cross_entropy(reference(support[0][0]), support[0][1]).backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(result.params[name], p.detach() - p.grad, rtol=0, atol=1e-12)


def test_first_order_meta_gradient_is_query_gradient_at_adapted_params():
    model, support, query, loss_fn = _setup("mlp")
    params = dict(model.named_parameters())
    loss, result = _meta_loss(model, loss_fn, params, metazoo.SGD(0.4), support, query,
                              steps=3, first_order=True)
    meta = torch.autograd.grad(loss, list(params.values()))
    adapted = {n: p.detach().requires_grad_() for n, p in result.params.items()}
    output, _ = metazoo.forward(model, adapted, {}, query[0], training=False)
    expected = torch.autograd.grad(F.cross_entropy(output, query[1]), list(adapted.values()))
    _assert_grads_equal(meta, expected, tol=1e-14)
    # First-order keeps no second-order graph: the inner gradients were constants.
    second = _meta_loss(model, loss_fn, params, metazoo.SGD(0.4), support, query, steps=3)[0]
    assert not torch.allclose(torch.autograd.grad(second, list(params.values()))[0], meta[0])


def test_first_order_running_statistics_are_constants_of_the_meta_gradient():
    """FOMAML with per-task running statistics: the query pass uses the adapted statistics,
    the meta-gradient is the query gradient at the adapted parameters with those statistics
    held fixed (backpropagating used to hit the freed inner graphs)."""
    model, support, query, loss_fn = _setup("conv_bn", bn_mode="running")
    params = dict(model.named_parameters())
    loss, result = _meta_loss(model, loss_fn, params, metazoo.SGD(0.3), support, query,
                              steps=3, bn_mode="running", first_order=True)
    assert not any(b.requires_grad for b in result.buffers.values())
    assert result.buffers["1.num_batches_tracked"].item() == 3
    meta = torch.autograd.grad(loss, list(params.values()))
    adapted = {n: p.detach().requires_grad_() for n, p in result.params.items()}
    output, _ = metazoo.forward(model, adapted, result.buffers, query[0], bn_mode="running",
                                training=False)
    expected = torch.autograd.grad(F.cross_entropy(output, query[1]), list(adapted.values()))
    _assert_grads_equal(meta, expected, tol=1e-14)


def test_each_step_uses_its_own_batch():
    model, support, _, loss_fn = _setup("mlp")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = metazoo.unroll(loss_fn, params, metazoo.SGD(0.0), support, steps=4)
    expected = [loss_fn(params, {}, support[k % 3])[0] for k in range(4)]
    torch.testing.assert_close(result.losses, torch.stack(expected))


@pytest.mark.parametrize("checkpoint", [2, metazoo.Checkpoint(snapshots=1)])
def test_dropout_is_replayed_exactly_under_checkpointing(checkpoint):
    def run(checkpoint):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 3))
        support = [_data("mlp", 9, k) for k in range(3)]
        loss_fn = metazoo.make_loss_fn(model, F.cross_entropy)
        params = dict(model.named_parameters())
        torch.manual_seed(1)
        result = metazoo.unroll(loss_fn, params, metazoo.SGD(0.3), support, steps=6,
                                checkpoint=checkpoint)
        output, _ = metazoo.forward(model, result.params, {}, support[0][0], training=False)
        return torch.autograd.grad(F.cross_entropy(output, support[0][1]),
                                   list(params.values()))

    _assert_grads_equal(run(None), run(checkpoint))


def test_no_graph_when_nothing_requires_grad():
    model, support, _, loss_fn = _setup("mlp")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = metazoo.unroll(loss_fn, params, metazoo.SGD(0.1), support, steps=3, checkpoint=1)
    assert all(not p.requires_grad for p in result.params.values())
    with torch.no_grad():
        result = metazoo.unroll(loss_fn, dict(model.named_parameters()), metazoo.SGD(0.1),
                                support, steps=3)
    assert all(not p.requires_grad for p in result.params.values())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), "steps must be an int >= 1"),
        (dict(checkpoint=0), "checkpoint must be"),
        (dict(checkpoint="binomial"), "checkpoint must be"),
        (dict(inner_grad_clip=-1.0), "inner_grad_clip"),
        (dict(backward_grad_clip=0.0), "backward_grad_clip"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, match):
    model, support, _, loss_fn = _setup("mlp")
    with pytest.raises(ValueError, match=match):
        metazoo.unroll(loss_fn, dict(model.named_parameters()), metazoo.SGD(0.1), support,
                       **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(snapshots=-1), r"Checkpoint\(snapshots=...\) must be an int >= 0, got -1"),
    (dict(segment=0), r"Checkpoint\(segment=...\) must be an int >= 1, got 0"),
    (dict(snapshots=2.5), "must be an int"),
    (dict(snapshots=2, segment=3), "not both"),
])
def test_bad_checkpoint_schedules_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        metazoo.Checkpoint(**kwargs)


def test_single_batch_instead_of_a_list_is_a_clear_error():
    model, support, _, loss_fn = _setup("mlp")
    with pytest.raises(ValueError, match=r"\[batch\]"):
        metazoo.unroll(loss_fn, dict(model.named_parameters()), metazoo.SGD(0.1),
                       support[0][0], steps=2)


def test_overlapping_static_and_adapted_names_are_a_clear_error():
    model, support, _, loss_fn = _setup("mlp")
    params = dict(model.named_parameters())
    with pytest.raises(ValueError, match="both adapted and static"):
        metazoo.unroll(loss_fn, params, metazoo.SGD(0.1), support, static=params)


class _FakeAccelerator:
    """Stands in for ``torch.cuda``: one generator state per device index."""

    def __init__(self) -> None:
        self.states = {0: torch.tensor([0], dtype=torch.uint8),
                       1: torch.tensor([1], dtype=torch.uint8)}

    def get_rng_state(self, device="cuda"):
        return self.states[torch.device(device).index or 0].clone()

    def set_rng_state(self, state, device="cuda"):
        self.states[torch.device(device).index or 0] = state.clone()


def test_checkpoint_rng_state_is_that_of_the_parameters_device(monkeypatch):
    # Parameters on cuda:1 while the process's current device is cuda:0 (index None -> 0 above):
    # recomputation must replay cuda:1's generator, and put every generator back afterwards.
    from metazoo.unroll import _RngState

    fake = _FakeAccelerator()
    monkeypatch.setattr(torch, "get_device_module", lambda device_type=None: fake)
    saved = _RngState.capture(torch.device("cuda", 1))
    assert saved.device == torch.device("cuda", 1) and saved.device_state.item() == 1
    fake.states[1] = torch.tensor([7], dtype=torch.uint8)  # the forward pass drew from cuda:1
    with saved.restored():
        assert fake.states[1].item() == 1 and fake.states[0].item() == 0
        fake.states[1] = torch.tensor([9], dtype=torch.uint8)  # the recomputation draws
    assert fake.states[1].item() == 7 and fake.states[0].item() == 0


# -- binomial (revolve) checkpointing: exactness, stored states, recomputed steps -------------

unroll_module = importlib.import_module("metazoo.unroll")  # the module, not the function


@pytest.mark.parametrize("model_name, bn_mode", [("mlp", "batch"), ("conv_bn", "running")])
@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("steps", [1, 2, 7, 13])
@pytest.mark.parametrize("snapshots", [0, 1, 3, 20])
def test_binomial_checkpointing_equals_plain(model_name, bn_mode, opt_name, steps, snapshots):
    """Every budget (none, fewer than K, at least K) and K (1, prime, not a multiple of
    anything), with optimizer state and a learned learning rate (the last gradient), BatchNorm
    running statistics updated exactly once per step."""
    checkpoint = metazoo.Checkpoint(snapshots=snapshots)
    plain, plain_result, plain_loss = _meta_grads(model_name, opt_name, steps, None, bn_mode)
    ckpt, ckpt_result, ckpt_loss = _meta_grads(model_name, opt_name, steps, checkpoint,
                                               bn_mode)
    assert plain[0].abs().sum() > 0 and plain[-1].abs() > 0
    _assert_grads_equal(plain, ckpt)
    torch.testing.assert_close(plain_loss, ckpt_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(plain_result.losses, ckpt_result.losses, rtol=0, atol=1e-12)
    for name, buffer in plain_result.buffers.items():
        torch.testing.assert_close(ckpt_result.buffers[name], buffer, rtol=0, atol=1e-12)
    if bn_mode == "running":
        assert ckpt_result.buffers["1.num_batches_tracked"].item() == steps


@pytest.mark.parametrize("snapshots", [1, 2, 10])
def test_binomial_checkpointing_equals_plain_on_long_unrolls(snapshots):
    """K = 150: deep recursion of the schedule (up to 16 recomputed steps per step with one
    stored state, states dropped and stored again many times), SGD with momentum, float64."""
    checkpoint = metazoo.Checkpoint(snapshots=snapshots)
    plain, plain_result, plain_loss = _meta_grads("mlp", "sgd_momentum", 150, None)
    ckpt, ckpt_result, ckpt_loss = _meta_grads("mlp", "sgd_momentum", 150, checkpoint)
    assert checkpoint.plan(150).recomputed_steps > 150
    _assert_grads_equal(plain, ckpt)
    torch.testing.assert_close(plain_loss, ckpt_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(plain_result.losses, ckpt_result.losses, rtol=0, atol=1e-12)


@pytest.mark.parametrize("checkpoint", [metazoo.Checkpoint(snapshots=3),
                                        metazoo.Checkpoint(segment=4)])
def test_checkpointed_forward_keeps_no_tensor_per_step(checkpoint):
    """The forward sweep copies each step's loss into one [K] tensor. Keeping per-step 0-d
    losses (a list stacked every 256 steps, before) pinned one small allocation per step among
    the step's transient ones and fragmented the heap: RSS grew with K while the stored states
    did not. Counted: the tensors alive at the forward sweep's last step are as many at K = 300
    as at K = 30 (with the stored states of the same budget)."""
    def tensors_alive_at_the_last_forward_step(steps):
        model, support, _, loss_fn = _setup("mlp")
        alive = []

        def counting(params, buffers, batch):
            if len(alive) == steps - 1:
                gc.collect()
                alive.append(sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects()))
            elif len(alive) < steps:
                alive.append(None)
            return loss_fn(params, buffers, batch)

        params = dict(model.named_parameters())
        result = metazoo.unroll(counting, params, metazoo.SGD(0.1), support, steps=steps,
                                checkpoint=checkpoint)
        assert result.losses.shape == (steps,) and result.losses.isfinite().all()
        return alive[-1]

    short, long = (tensors_alive_at_the_last_forward_step(k) for k in (30, 300))
    segment_states = 0 if checkpoint.segment is None else (300 - 30) // checkpoint.segment
    # Fixed segments store a state every S steps: a tensor per parameter (four here) and the
    # generator's state.
    assert long - short == 5 * segment_states


def test_checkpoint_true_is_the_default_binomial_schedule():
    assert metazoo.check_checkpoint(True) == metazoo.Checkpoint(
        snapshots=metazoo.DEFAULT_SNAPSHOTS) == metazoo.Checkpoint()
    assert metazoo.check_checkpoint(4) == metazoo.Checkpoint(segment=4)
    assert metazoo.check_checkpoint(None) is None and metazoo.check_checkpoint(False) is None
    steps = 2 * metazoo.DEFAULT_SNAPSHOTS + 3  # more steps than stored states: recomputation
    assert metazoo.Checkpoint().plan(steps).recomputed_steps > 0
    plain, _, _ = _meta_grads("mlp", "adam", steps, None)
    _assert_grads_equal(plain, _meta_grads("mlp", "adam", steps, True)[0])


def test_binomial_recomputations_is_the_optimum_of_the_recursion():
    """The closed form equals the best schedule found by trying every split (advance m steps
    and store; reverse the right part with one slot less; then the left part)."""
    best: dict[tuple[int, int], int] = {}
    for free in range(5):
        for steps in range(1, 40):
            if steps == 1:
                value = 0
            elif free == 0:
                value = steps * (steps - 1) // 2  # advance from the start for every step
            else:
                value = min(m + best[steps - m, free - 1] + best[m, free]
                            for m in range(1, steps))
            best[steps, free] = value
            assert metazoo.binomial_recomputations(steps, free) == value, (steps, free)


class _Counted:
    """A loss function that counts its calls, and the stored states alive at each call."""

    def __init__(self, loss_fn, monkeypatch) -> None:
        import weakref

        self.loss_fn, self.calls, self.most_stored = loss_fn, 0, 0
        live: weakref.WeakSet = weakref.WeakSet()

        class Tracked(unroll_module._Snapshot):
            __hash__ = object.__hash__  # identity, for the weak set

            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, **kwargs)
                live.add(self)

        self.live = live
        monkeypatch.setattr(unroll_module, "_Snapshot", Tracked)

    def __call__(self, params, buffers, batch):
        self.calls += 1
        # Alive besides the initial state (step 0, the unroll's input).
        self.most_stored = max(self.most_stored, sum(1 for s in self.live if s.step > 0))
        return self.loss_fn(params, buffers, batch)


@pytest.mark.parametrize("steps", [2, 5, 13, 40])
@pytest.mark.parametrize("checkpoint", [metazoo.Checkpoint(snapshots=s) for s in (0, 1, 3, 10)]
                         + [metazoo.Checkpoint(segment=3)])
def test_stored_states_never_exceed_the_budget_and_recomputation_follows_the_formula(
        steps, checkpoint, monkeypatch):
    """Counted, not assumed: the loss-function calls of the forward pass (K), of the backward
    pass (K taped + the recomputed steps), the stored states alive at every call."""
    model, support, query, loss_fn = _setup("mlp")
    plan = checkpoint.plan(steps)
    counted = _Counted(loss_fn, monkeypatch)
    params = dict(model.named_parameters())
    loss, _ = _meta_loss(model, counted, params, metazoo.Adam(0.05), support, query,
                         steps=steps, checkpoint=checkpoint)
    assert counted.calls == steps
    loss.backward()
    assert counted.calls - steps == steps + plan.recomputed_steps
    if checkpoint.segment is None:
        # Griewank's count for the whole schedule, less the steps the forward pass (which
        # stores its first states on the way) has already advanced.
        stores = unroll_module._Binomial(checkpoint.snapshots).forward_stores(steps)
        assert plan.recomputed_steps == metazoo.binomial_recomputations(
            steps, checkpoint.snapshots) - (stores[-1] if stores else 0)
        assert counted.most_stored == plan.stored_states == min(checkpoint.snapshots,
                                                                steps - 1)
        assert plan.longest_taped_run == 1
    else:
        assert plan.recomputed_steps == 0
        assert counted.most_stored == plan.stored_states == (steps - 1) // 3
        assert plan.longest_taped_run == min(3, steps)
    assert counted.most_stored <= (checkpoint.snapshots if checkpoint.segment is None
                                   else steps)
    assert not any(s.step > 0 for s in counted.live)  # all dropped after the backward


def test_a_ten_thousand_step_plan_stays_in_budget():
    plan = metazoo.Checkpoint(snapshots=10).plan(10_000)
    assert plan.stored_states == 10 and plan.longest_taped_run == 1
    assert plan.recomputed_steps <= 6 * 10_000
