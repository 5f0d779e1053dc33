"""wrapper.py: every learner builds through the MetaLearner interface; the FineTune and NoMeta
baselines against plain autograd / torch.optim loops in float64."""

import copy

import pytest
import torch
import torch.nn.functional as F
import wrapper
from model import multi_head_loss

import leap
import maml
import metazoo
import warpgrad

EXPECTED = {"warp_leap": wrapper._WarpGrad, "leap": leap.LeapLearner, "reptile": maml.Reptile,
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
    assert isinstance(warp.inner.updater, warpgrad.DualUpdater)
    assert any(isinstance(m, warpgrad.ChannelScale) for m in warp.model.modules())
    fomaml = wrapper.build_learner(cfg("fomaml", efficient=True, outer_opt="adam",
                                       outer_kwargs={"lr": 1e-3}))
    assert fomaml.first_order and isinstance(fomaml.meta_optimizer, torch.optim.Adam)
    assert not wrapper.build_learner(cfg("maml")).first_order


def test_validation_messages_name_the_flag():
    with pytest.raises(ValueError, match="--meta_model 'warp_maml'"):
        wrapper.build_learner(cfg("warp_maml"))
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
