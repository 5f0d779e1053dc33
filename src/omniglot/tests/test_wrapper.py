"""wrapper.py: every learner builds through the MetaLearner interface; the FineTune and NoMeta
baselines against plain autograd / torch.optim loops in float64."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import leap
import maml
import metazoo
import warpgrad
import wrapper
from model import multi_head_loss

EXPECTED = {"warp_leap": warpgrad.WarpGrad, "warp_maml": warpgrad.WarpMAML,
            "leap": leap.LeapLearner, "reptile": maml.Reptile,
            "fomaml": maml.MAML, "maml": maml.MAML, "imaml": maml.iMAML, "anil": maml.MAML,
            "ft": wrapper.FineTune, "no": wrapper.NoMeta}


def cfg(method, **kw):
    base = {"meta_model": method, "classes": 3, "num_train_tasks": 2, "task_train_steps": 2,
            "task_val_steps": 3, "num_filters": 4}
    return wrapper.LearnerConfig(**{**base, **kw})


def tasks(n=2, steps=3, heads=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        off = 3 * i if heads else 0
        support = [(torch.randn(6, 1, 28, 28, generator=g, dtype=torch.float64),
                    torch.randint(0, 3, (6,), generator=g) + off) for _ in range(steps)]
        query = (torch.randn(6, 1, 28, 28, generator=g, dtype=torch.float64),
                 torch.randint(0, 3, (6,), generator=g) + off)
        out.append(metazoo.Task(support, query))
    return out


@pytest.mark.parametrize("method", wrapper.METHODS)
def test_every_method_builds_a_meta_learner(method):
    learner = wrapper.build_learner(cfg(method))
    assert isinstance(learner, metazoo.MetaLearner)
    assert isinstance(learner, EXPECTED[method])
    assert set(learner.state_dict()) >= {"meta_optimizer"}


def test_method_options_reach_the_learner():
    anil = wrapper.build_learner(cfg("anil"))
    anil.model.double()
    adapted = anil.adapt(tasks(1)[0])
    body = dict(anil.model.named_parameters())
    assert torch.equal(adapted.params["blocks.0.0.weight"], body["blocks.0.0.weight"])
    assert not torch.equal(adapted.params["head.weight"], body["head.weight"])
    warp = wrapper.build_learner(cfg("warp_leap", warp_layer="scaling",
                                     meta_kwargs={"warp_objective": "approx"}))
    assert isinstance(warp.updater, warpgrad.DualUpdater)
    assert any(isinstance(m, warpgrad.ChannelScale) for m in warp.model.modules())
    fomaml = wrapper.build_learner(cfg("fomaml", efficient=True, outer_opt="adam",
                                       outer_kwargs={"lr": 1e-3}))
    assert fomaml.first_order and isinstance(fomaml.meta_optimizer, torch.optim.Adam)
    assert not wrapper.build_learner(cfg("maml")).first_order


def test_validation_messages_name_the_flag():
    with pytest.raises(ValueError, match="--meta_model 'bogus'"):
        wrapper.build_learner(cfg("bogus"))
    with pytest.raises(ValueError, match="--meta_kwargs \\['bogus'\\]"):
        wrapper.build_learner(cfg("leap", meta_kwargs={"bogus": 1}))
    with pytest.raises(ValueError, match="--inner_opt"):
        wrapper.build_learner(cfg("reptile", inner_opt="lbfgs"))
    with pytest.raises(ValueError, match="warp_leap adapts with SGD"):
        wrapper.build_learner(cfg("warp_leap", inner_opt="adam"))


def test_warp_leap_evaluates_with_task_val_steps_by_default():
    learner = wrapper.build_learner(cfg("warp_leap"))
    task = metazoo.Task([(x.float(), y) for x, y in tasks(1)[0].support],
                        (tasks(1)[0].query[0].float(), tasks(1)[0].query[1]))
    assert len(learner.adapt(task).inner_losses) == 3
    assert len(learner.adapt(task, steps=1).inner_losses) == 1
    result = learner.meta_step([task])
    assert len(result.inner_losses) == 2


def test_fine_tune_meta_step_equals_a_torch_optim_loop_on_the_multi_head_loss():
    torch.manual_seed(0)
    learner = wrapper.build_learner(cfg("ft", task_train_steps=3))
    learner.model.double()
    reference = copy.deepcopy(learner.model)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    batch = tasks(2, steps=3, heads=True)
    result = learner.meta_step(batch)
    for k in range(3):
        opt.zero_grad()
        x = torch.cat([t.support[k][0] for t in batch])
        y = torch.cat([t.support[k][1] for t in batch])
        multi_head_loss(reference(x), y).backward()
        opt.step()
    for (n, p), q in zip(learner.model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-12), n
    assert len(result.inner_losses) == 3 and result.accuracy is not None


def test_fine_tune_adapt_trains_the_body_and_a_zero_head():
    torch.manual_seed(0)
    learner = wrapper.build_learner(cfg("ft", task_val_steps=3))
    learner.model.double()
    learner.eval_model.double()
    task = tasks(1, steps=3)[0]
    adapted = learner.adapt(task)
    net = copy.deepcopy(learner.eval_model)
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(torch.zeros_like(p) if n.startswith("head.")
                    else dict(learner.model.named_parameters())[n])
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for k in range(3):
        opt.zero_grad()
        F.cross_entropy(net(task.support[k][0]), task.support[k][1]).backward()
        opt.step()
    for n, p in net.named_parameters():
        assert torch.allclose(adapted.params[n], p, atol=1e-12), n
    loss, acc = wrapper.score(learner, adapted, task.query)
    with torch.no_grad():
        out = net(task.query[0])
    assert loss == pytest.approx(F.cross_entropy(out, task.query[1]).item(), abs=1e-10)
    assert acc == pytest.approx((out.argmax(1) == task.query[1]).double().mean().item())


def test_no_meta_starts_every_task_from_a_fresh_init_and_never_meta_learns():
    learner = wrapper.build_learner(cfg("no"))
    learner.model.double()
    before = {n: p.clone() for n, p in learner.model.named_parameters()}
    task = tasks(1)[0]
    torch.manual_seed(1)
    a = learner.adapt(task, steps=1)
    b = learner.adapt(task, steps=1)
    assert not torch.equal(a.params["blocks.0.0.weight"], b.params["blocks.0.0.weight"])
    torch.manual_seed(1)
    assert torch.equal(learner.adapt(task, steps=1).params["head.weight"],
                       a.params["head.weight"])
    learner.meta_step(tasks(2))
    assert all(p.grad is None for p in learner.model.parameters())
    for n, p in learner.model.named_parameters():
        assert torch.equal(p, before[n])
    assert learner.meta_learns is False


def test_warp_maml_gradients_equal_maml_for_the_init_and_warpgrad_for_the_warp():
    torch.manual_seed(0)
    c = cfg("warp_maml", num_layers=2, task_train_steps=2, warp_layer="3x3",
            inner_kwargs={"lr": 0.1})
    learner = wrapper.build_learner(c)
    assert isinstance(learner, warpgrad.WarpMAML)
    learner.model.double()
    for p in learner.warp.warp.init_parameters():
        p.data = p.data.double()
    # Move the initialisation away from the network's own tensors: the init must be used.
    with torch.no_grad():
        for p in learner.warp.warp.init_parameters():
            p.add_(0.01 * torch.randn_like(p))
    init = {n: p.detach().clone() for n, p in learner.warp.warp.named_init_parameters()}
    warp_names = [n for n, _ in learner.warp.warp.named_warp_parameters()]
    batch = tasks(2, steps=2)
    # MAML on a copy of the network with the initialisation loaded and the warp layers frozen.
    net = copy.deepcopy(learner.model)
    with torch.no_grad():
        for n, p in net.named_parameters():
            if n in init:
                p.copy_(init[n])
    reference = maml.MAML(model=net, criterion=F.cross_entropy,
                          inner_optimizer=metazoo.SGD(0.1), inner_steps=2, frozen=warp_names)
    reference.meta_backward(batch)
    # WarpGrad with no init objective on another copy: its warp-only gradient.
    other = wrapper.build_learner(c)
    other.model.double()
    other.model.load_state_dict(net.state_dict())
    with torch.no_grad():
        for n, p in other.warp.warp.named_init_parameters():
            p.data = init[n].clone()
    other.warp.meta_backward(batch)
    result = learner.meta_backward(batch)
    assert result.num_tasks == 2 and len(result.inner_losses) == 2
    ref = dict(net.named_parameters())
    for n, p in learner.warp.warp.named_init_parameters():
        assert torch.allclose(p.grad, ref[n].grad, atol=1e-10), n
    theirs = dict(other.model.named_parameters())
    for n, p in learner.warp.warp.named_warp_parameters():
        assert theirs[n].grad is not None and theirs[n].grad.abs().sum() > 0, n
        assert torch.allclose(p.grad, theirs[n].grad, atol=1e-10), n
    # The network's own adaptable tensors get nothing: the initialisation tensors own the step.
    model_params = dict(learner.model.named_parameters())
    assert all(model_params[n].grad is None for n in init)
    stepped = {id(p) for g in learner.meta_optimizer.param_groups for p in g["params"]}
    assert len(stepped) == len(list(learner.meta_parameters()))
    assert {id(p) for p in learner.warp.warp.init_parameters()} <= stepped
    assert not {id(model_params[n]) for n in init} & stepped


def test_warp_maml_state_dict_round_trips():
    torch.manual_seed(0)
    c = cfg("warp_maml", num_layers=2, outer_opt="adam", outer_kwargs={"lr": 1e-2})
    learner = wrapper.build_learner(c)
    batch = [metazoo.Task([(x.float(), y) for x, y in t.support], (t.query[0].float(),
                                                                  t.query[1]))
             for t in tasks(2)]
    learner.meta_step(batch)
    state = copy.deepcopy(learner.state_dict())
    clone = wrapper.build_learner(c)
    clone.load_state_dict(state)
    torch.manual_seed(1)  # the replay objective samples states from the global RNG
    learner.meta_step(batch)
    torch.manual_seed(1)
    clone.meta_step(batch)
    for (n, p), (_, q) in zip(learner.named_meta_parameters(), clone.named_meta_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(ValueError, match="init_objective"):
        wrapper.build_learner(cfg("warp_maml", meta_kwargs={"init_objective": "leap"}))


def test_reference_head_policy_changes_only_the_reference_methods():
    with pytest.raises(ValueError, match="--head_policy 'bogus'"):
        wrapper.build_learner(cfg("maml", head_policy="bogus"))
    for method in ("leap", "reptile", "fomaml"):
        learner = wrapper.build_learner(cfg(method, head_policy="reference"))
        assert isinstance(learner, wrapper.RandomHead)
        assert isinstance(learner.inner, EXPECTED[method])
        assert learner.meta_optimizer is learner.inner.meta_optimizer
    for method in ("warp_leap", "warp_maml", "maml", "imaml", "anil"):
        assert type(wrapper.build_learner(cfg(method, head_policy="reference"))) is \
            EXPECTED[method]
    assert wrapper.build_learner(cfg("no", head_policy="reference")).fixed_body
    assert not wrapper.build_learner(cfg("no")).fixed_body
    assert len(wrapper.build_learner(cfg("ft", head_policy="reference")).model.heads) == 1
    assert len(wrapper.build_learner(cfg("ft")).model.heads) == 2


def _sgd_from(net, task, steps, lr=0.1):
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for k in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(task.support[k % len(task.support)][0]),
                        task.support[k % len(task.support)][1]).backward()
        opt.step()
    return net


def test_random_head_fomaml_draws_a_head_per_task_and_drops_its_meta_gradient():
    torch.manual_seed(0)
    learner = wrapper.build_learner(cfg("fomaml", head_policy="reference", num_layers=2))
    learner.model.double()
    batch = tasks(2, steps=2)
    start = copy.deepcopy(learner.model)
    torch.manual_seed(5)
    result = learner.meta_backward(batch)
    # Plain autograd: per task, the body from the initialisation, a head drawn from the same
    # RNG stream, two SGD steps, then the query-loss gradient at the adapted weights; the mean.
    torch.manual_seed(5)
    expected = {n: torch.zeros_like(p) for n, p in start.named_parameters()}
    for task in batch:
        net = copy.deepcopy(start)
        net.head.reset_parameters()
        _sgd_from(net, task, 2)
        net.zero_grad()
        F.cross_entropy(net(task.query[0]), task.query[1]).backward()
        for n, p in net.named_parameters():
            expected[n] += p.grad / len(batch)
    for n, p in learner.model.named_parameters():
        if n.startswith("head."):
            assert p.grad is None, n
        else:
            assert torch.allclose(p.grad, expected[n], atol=1e-10), n
    assert result.num_tasks == 2 and len(result.inner_losses) == 2
    # adapt and evaluate redraw the head too: the same RNG state gives the same head.
    task = batch[0]
    torch.manual_seed(7)
    a = learner.adapt(task, steps=1)
    torch.manual_seed(7)
    net = copy.deepcopy(learner.model)
    net.head.reset_parameters()
    _sgd_from(net, task, 1)
    for n, p in net.named_parameters():
        assert torch.allclose(a.params[n], p, atol=1e-12), n
    b = learner.adapt(task, steps=1)
    assert not torch.equal(a.params["head.weight"], b.params["head.weight"])
    torch.manual_seed(7)
    ev = learner.evaluate([task], steps=1)
    assert ev.loss == pytest.approx(wrapper.score(learner, a, task.query)[0], abs=1e-10)


def test_reference_no_reuses_one_fixed_body_with_a_fresh_head():
    learner = wrapper.build_learner(cfg("no", head_policy="reference"))
    learner.model.double()
    task = tasks(1)[0]
    torch.manual_seed(3)
    a = learner.adapt(task, steps=1)
    b = learner.adapt(task, steps=1)
    assert not torch.equal(a.params["head.weight"], b.params["head.weight"])
    torch.manual_seed(3)
    net = copy.deepcopy(learner.model)
    net.head.reset_parameters()
    _sgd_from(net, task, 1)
    for n, p in net.named_parameters():
        assert torch.allclose(a.params[n], p, atol=1e-12), n


def test_reference_ft_pretrains_one_shared_head_and_fine_tunes_from_it():
    torch.manual_seed(0)
    learner = wrapper.build_learner(cfg("ft", head_policy="reference", task_train_steps=2,
                                        task_val_steps=2, num_layers=2))
    learner.model.double()
    learner.eval_model.double()
    batch = tasks(2, steps=2, heads=True)  # targets head * classes + label, as main.py writes
    reference = copy.deepcopy(learner.model)
    learner.meta_step(batch)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for k in range(2):
        opt.zero_grad()
        x = torch.cat([t.support[k][0] for t in batch])
        y = torch.cat([t.support[k][1] for t in batch]) % 3
        F.cross_entropy(reference(x)[:, 0], y).backward()
        opt.step()
    for (n, p), q in zip(learner.model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-12), n
    task = tasks(1, steps=2)[0]
    adapted = learner.adapt(task)
    net = copy.deepcopy(learner.eval_model)
    trained = dict(learner.model.named_parameters())
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(trained[n.replace("head.", "heads.0.")])
    _sgd_from(net, task, 2)
    for n, p in net.named_parameters():
        assert torch.allclose(adapted.params[n], p, atol=1e-12), n


@pytest.mark.parametrize("method", ["warp_leap", "warp_maml"])
@pytest.mark.parametrize("outer_opt", ["sgd", "adam"])
def test_warp_lr_gives_the_warp_parameters_their_own_meta_learning_rate(method, outer_opt):
    default = wrapper.build_learner(cfg(method, outer_opt=outer_opt))
    assert [g["lr"] for g in default.meta_optimizer.param_groups] == [0.1]  # unchanged
    learner = wrapper.build_learner(cfg(method, outer_opt=outer_opt,
                                        meta_kwargs={"warp_lr": 0.01}))
    groups = learner.meta_optimizer.param_groups
    assert [g["lr"] for g in groups] == [0.01, 0.1]
    inner = learner if method == "warp_leap" else learner.warp
    warp = {id(p) for p in inner.warp.warp_parameters()}
    meta = {id(p) for _, p in learner.named_meta_parameters()}
    assert {id(p) for p in groups[0]["params"]} == warp and warp
    assert {id(p) for p in groups[1]["params"]} == meta - warp
    if outer_opt == "sgd":  # one meta-step moves each group by its lr times its gradient
        task = tasks(1)[0]
        task = metazoo.Task([(x.float(), y) for x, y in task.support],
                            (task.query[0].float(), task.query[1]))
        before = [[p.detach().clone() for p in g["params"]] for g in groups]
        learner.meta_optimizer.zero_grad()
        learner.meta_backward([task])
        grads = [[p.grad.clone() for p in g["params"]] for g in groups]
        learner.meta_optimizer.step()
        for g, b, gr, lr in zip(groups, before, grads, (0.01, 0.1), strict=True):
            for p, p0, dp in zip(g["params"], b, gr, strict=True):
                torch.testing.assert_close(p.detach(), p0 - lr * dp)


@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf"), True, "fast"])
def test_warp_lr_must_be_a_finite_positive_number(value):
    with pytest.raises(ValueError, match=f"--meta_kwargs warp_lr {value!r}: must be a finite "
                                         "number > 0, e.g. --meta_kwargs warp_lr 0.01"):
        wrapper.build_learner(cfg("warp_leap", meta_kwargs={"warp_lr": value}))
    with pytest.raises(ValueError, match="--warp_layer none has no warp parameters"):
        wrapper.build_learner(cfg("warp_leap", warp_layer="none", meta_kwargs={"warp_lr": 0.1}))
    with pytest.raises(ValueError, match="--meta_kwargs \\['warp_lr'\\]"):
        wrapper.build_learner(cfg("leap", meta_kwargs={"warp_lr": 0.1}))


def test_an_unknown_optimizer_option_is_one_line_naming_it_and_the_accepted_ones():
    with pytest.raises(ValueError, match=r"^--inner_kwargs momentun: not an option of --inner_opt "
                                         r"sgd \(metazoo\.optim\.SGD\); accepted: lr, momentum, "
                                         r"dampening, weight_decay, nesterov$"):
        wrapper.build_learner(cfg("maml", inner_kwargs={"lr": 0.1, "momentun": 0.9}))
    with pytest.raises(ValueError, match=r"^--outer_kwargs bettas: not an option of --outer_opt "
                                         r"adam \(torch\.optim\.adam\.Adam\); accepted: lr, betas"):
        wrapper.build_learner(cfg("warp_leap", outer_opt="adam", outer_kwargs={"bettas": 0.9}))
    with pytest.raises(ValueError, match=r"^--meta_kwargs \['nrom'\] are not options of "
                                         r"--meta_model leap \(allowed: \['loss', 'norm', "):
        wrapper.build_learner(cfg("leap", meta_kwargs={"nrom": False}))


@pytest.mark.parametrize("flag,key", [("--inner_kwargs", "momentun"), ("--outer_kwargs", "mom"),
                                      ("--meta_kwargs", "nrom")])
def test_an_unknown_kwargs_key_on_the_command_line_exits_2_with_one_line(
        tiny, omniglot_root, tmp_path, flag, key):
    """Issue 25: ``--inner_kwargs momentun 0.9`` ended in a 15-line TypeError, exit 1."""
    main = Path(wrapper.__file__).with_name("main.py")
    argv = [*tiny(omniglot_root, tmp_path, "leap"), flag, key, "0.9"]
    if flag == "--inner_kwargs":  # the tiny flags already name --inner_kwargs lr 0.1
        argv = [*argv[:-3], flag, "lr", "0.1", key, "0.9"]
    done = subprocess.run([sys.executable, str(main), *argv], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag} ") and key in lines[0]
    assert "accepted" in lines[0] or "allowed" in lines[0]
