"""Tests of the A2C loss, the two-clock optimisation, burn-in and checkpoints."""

import os

import pytest
import torch

import warpgrad
from train import (
    Rollout,
    TrainConfig,
    Trainer,
    a2c_loss,
    config_from_dict,
    discounted_returns,
    last_fraction_mean,
    load_checkpoint,
    save_checkpoint,
)

TINY = {
    "hidden_size": 6,
    "batch_size": 3,
    "episode_length": 12,
    "maze_size": 7,
    "dtype": "float64",
    "random_episodes": 2,
}


def trainer(**kw):
    return Trainer(config=TrainConfig(**{**TINY, **kw}))


def snapshot(params):
    return [p.detach().clone() for p in params]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_discounted_returns_match_explicit_sum():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(7, 3, dtype=torch.float64, generator=gen)
    gamma = 0.9
    expected = torch.stack(
        [sum(gamma ** (k - t) * rewards[k] for k in range(t, 7)) for t in range(7)]
    )
    torch.testing.assert_close(discounted_returns(rewards, gamma), expected)


def test_a2c_loss_gradients_match_the_analytic_formula():
    """Policy term uses the detached advantage R - v; value and concentration terms as stated."""
    gen = torch.Generator().manual_seed(1)
    T, B, A = 5, 3, 4
    logits = torch.randn(T, B, A, dtype=torch.float64, generator=gen, requires_grad=True)
    values = torch.randn(T, B, dtype=torch.float64, generator=gen, requires_grad=True)
    actions = torch.randint(A, (T, B, 1), generator=gen)
    rewards = torch.randn(T, B, dtype=torch.float64, generator=gen)
    log_probs = torch.log_softmax(logits, -1).gather(2, actions).squeeze(2)
    probs = torch.softmax(logits, -1)
    c_v, c_p, gamma = 0.1, 0.03, 0.9
    loss = a2c_loss(
        Rollout(log_probs=log_probs, values=values, probs=probs, rewards=rewards),
        discount=gamma,
        value_coef=c_v,
        concentration=c_p,
    )
    returns = discounted_returns(rewards, gamma)
    adv = returns - values.detach()
    with torch.no_grad():
        expected_total = (
            -(log_probs * adv).sum()
            + c_v * ((values - returns) ** 2).sum()
            + c_p * (probs**2).sum()
        ) / B
    torch.testing.assert_close(loss.total, expected_total)
    g_logits, g_values = torch.autograd.grad(loss.total, (logits, values))
    # d/dv: only the value term (the advantage is a constant for the policy term).
    torch.testing.assert_close(g_values, 2 * c_v * (values - returns).detach() / B)
    # d/dlogits of -A log p(a) + c_p sum p^2 with softmax Jacobian diag(p) - p p^T.
    p = probs.detach()
    onehot = torch.zeros_like(p).scatter_(2, actions, 1.0)
    g_policy = -adv[..., None] * (onehot - p)
    q = 2 * c_p * p
    g_conc = p * (q - (q * p).sum(-1, keepdim=True))
    torch.testing.assert_close(g_logits, (g_policy + g_conc) / B)


def adapt_step_grad_norms(tr, monkeypatch) -> list[float]:
    """The norm of the adaptable gradients each time the adaptable optimizer steps (a list
    that fills as the trainer runs)."""
    seen = []
    original = tr.adapt_optimizer.step

    def spy(*args, **kwargs):
        seen.append(float(torch.cat([p.grad.reshape(-1) for p in tr.adapt_params]).norm()))
        return original(*args, **kwargs)

    monkeypatch.setattr(tr.adapt_optimizer, "step", spy)
    return seen


def test_gradient_clipping_applies_to_the_adaptable_step(monkeypatch):
    tr = trainer(agent="lstm", grad_clip=1e-3)
    seen = adapt_step_grad_norms(tr, monkeypatch)
    result = tr.train_episode()
    assert result.adapt_grad_norm > 1e-3  # clipping was needed ...
    assert seen == [pytest.approx(1e-3, rel=1e-3)]  # ... and the optimizer saw clipped grads
    assert all(p.grad is None for p in tr.adapt_params)


def capture_warp(tr, monkeypatch):
    """Record per-episode warp gradients (those the updater collects) and the gradient the
    warp optimizer steps with."""
    episodes, steps = [], []
    accumulate = tr.warp.accumulate_warp_gradients

    def spy_accumulate():
        if tr.warp.collecting:
            episodes.append([p.grad.clone() for p in tr.warp_params])
        accumulate()

    step = tr.warp_optimizer.step

    def spy_step(*args, **kwargs):
        steps.append([p.grad.clone() for p in tr.warp_params])
        return step(*args, **kwargs)

    monkeypatch.setattr(tr.warp, "accumulate_warp_gradients", spy_accumulate)
    monkeypatch.setattr(tr.warp_optimizer, "step", spy_step)
    return episodes, steps


def warp_sums(tr):
    return tr.updater.state_dict()["sums"]


def test_the_split_and_the_warp_update_come_from_warpgrad():
    """The trainer wraps the agent in warpgrad.Warp with a ContinualUpdater: its groups are
    the agent's adapt/warp modules, and the warp gradient reaches the meta-optimizer only
    through Warp.backward."""
    tr = trainer(agent="warp", meta_update_ival=1)
    assert isinstance(tr.warp, warpgrad.Warp)
    assert isinstance(tr.warp.updater, warpgrad.ContinualUpdater)
    module_params = lambda mods: [p for m in mods for p in m.parameters()]  # noqa: E731
    assert {id(p) for p in tr.adapt_params} == {
        id(p) for p in module_params(tr.agent.adapt_modules())}
    assert {id(p) for p in tr.warp_params} == {
        id(p) for p in module_params(tr.agent.warp_modules())}
    calls = []
    original = tr.warp.backward
    tr.warp.backward = lambda step: calls.append(original(step))
    assert tr.train_episode().meta_updated
    assert len(calls) == 1 and calls[0].num_points == 1 and calls[0].num_meta_steps == 1


@pytest.mark.parametrize("agent", ["warp", "lstm"])
def test_grad_clip_zero_turns_clipping_off(monkeypatch, agent):
    """--gc 0: both optimizers step with the raw (mean) gradients, as the reference (it parsed
    --gc and never clipped); the same run with a tiny clip steps with other gradients."""
    tr = trainer(agent=agent, grad_clip=0.0, meta_update_ival=1)
    seen = adapt_step_grad_norms(tr, monkeypatch)
    if agent == "warp":
        episodes, steps = capture_warp(tr, monkeypatch)
    result = tr.train_episode()
    assert seen == [pytest.approx(result.adapt_grad_norm, rel=1e-12)]
    assert result.adapt_grad_norm > 0.1  # a clip at 0 would have zeroed it
    if agent == "warp":
        for g, e in zip(steps[0], episodes[0], strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=0)
        norm = float(torch.cat([g.reshape(-1) for g in steps[0]]).norm())
        assert norm > 1e-3
    with pytest.raises(ValueError, match="grad_clip must be >= 0"):
        TrainConfig(grad_clip=-1.0)


def test_warp_gradients_are_averaged_over_the_meta_update_interval(monkeypatch):
    tr = trainer(agent="warp", meta_update_ival=3, grad_clip=1e9)
    episodes, steps = capture_warp(tr, monkeypatch)
    warp0 = snapshot(tr.warp_params)
    for i in range(2):
        adapt_before = snapshot(tr.adapt_params)
        assert not tr.train_episode().meta_updated
        assert not same(adapt_before, tr.adapt_params)  # adaptable step every episode
        assert same(warp0, tr.warp_params)  # no warp step yet
        assert all(p.grad is None for p in tr.warp_params)
        assert tr.updater.count == i + 1
    assert tr.train_episode().meta_updated
    assert not same(warp0, tr.warp_params)
    assert len(episodes) == 3 and len(steps) == 1
    for k, g in enumerate(steps[0]):
        expected = sum(e[k] for e in episodes) / 3
        torch.testing.assert_close(g, expected, rtol=1e-12, atol=0)
    assert tr.updater.count == 0 and all(a.abs().sum() == 0 for a in warp_sums(tr))
    assert tr.meta_updates == 1


def test_warp_step_is_clipped(monkeypatch):
    tr = trainer(agent="warp", meta_update_ival=1, grad_clip=1e-4)
    _, steps = capture_warp(tr, monkeypatch)
    tr.train_episode()
    norm = float(torch.cat([g.reshape(-1) for g in steps[0]]).norm())
    assert norm == pytest.approx(1e-4, rel=1e-3)


def test_burn_in_discards_warp_gradients(monkeypatch):
    tr = trainer(agent="warp", burn_in=2, meta_update_ival=2, grad_clip=1e9)
    episodes, steps = capture_warp(tr, monkeypatch)
    warp0 = snapshot(tr.warp_params)
    for _ in range(2):
        assert not tr.train_episode().meta_updated
        assert all(p.grad is None for p in tr.warp_params)
        assert tr.updater.count == 0 and all(a.abs().sum() == 0 for a in warp_sums(tr))
    assert same(warp0, tr.warp_params) and episodes == []
    assert not tr.train_episode().meta_updated
    assert tr.train_episode().meta_updated
    # The first warp step averages exactly the two post-burn-in episodes.
    assert len(episodes) == 2
    for k, g in enumerate(steps[0]):
        torch.testing.assert_close(g, (episodes[0][k] + episodes[1][k]) / 2, rtol=1e-12, atol=0)
        assert g.abs().sum() > 0


def test_lstm_agent_has_a_single_optimizer():
    tr = trainer(agent="lstm")
    assert tr.warp_optimizer is None and tr.warp_params == []
    result = tr.train_episode()
    assert not result.meta_updated and tr.meta_updates == 0


@pytest.mark.parametrize("agent", ["warp", "arnn", "arnn_tied", "lstm"])
def test_smoke_training_few_episodes(agent):
    tr = trainer(agent=agent, meta_update_ival=2)
    before = snapshot(tr.agent.parameters())
    results = [tr.train_episode() for _ in range(4)]
    assert [r.episode for r in results] == [0, 1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r.loss)) for r in results)
    assert all(r.mean_reward >= 0 for r in results)
    assert all(not torch.equal(a, b) for a, b in zip(before, tr.agent.parameters(), strict=True))
    assert tr.meta_updates == (0 if agent == "lstm" else 2)


def test_random_policy_measurement_leaves_training_unchanged():
    a, b = trainer(agent="lstm"), trainer(agent="lstm")
    value = a.measure_random_policy()
    assert value == a.random_reward and value >= 0
    assert a.train_episode() == b.train_episode()


def test_random_policy_reward_is_an_episode_total():
    """A random walker on a 5x5 maze (8 free cells) finds the reward many times in 200 steps."""
    tr = trainer(agent="lstm", maze_size=5, episode_length=200, random_episodes=5)
    assert tr.measure_random_policy() > 10.0


@pytest.mark.parametrize("agent", ["warp", "arnn", "lstm"])
def test_resume_from_checkpoint_is_exact(tmp_path, agent):
    """2 episodes, save, load into a fresh trainer, 3 more == 5 straight (mid-interval)."""
    straight = trainer(agent=agent, meta_update_ival=3)
    ref = [straight.train_episode() for _ in range(5)]
    first = trainer(agent=agent, meta_update_ival=3)
    first.measure_random_policy()
    got = [first.train_episode() for _ in range(2)]
    save_checkpoint(first.state_dict(), tmp_path / "ckpt.pt")
    resumed = trainer(agent=agent, meta_update_ival=3)
    resumed.load_state_dict(load_checkpoint(tmp_path / "ckpt.pt"))
    assert resumed.random_reward == first.random_reward
    got += [resumed.train_episode() for _ in range(3)]
    assert got == ref
    assert same(list(straight.agent.parameters()), list(resumed.agent.parameters()))


def test_load_rejects_a_different_config(tmp_path):
    save_checkpoint(trainer(agent="lstm").state_dict(), tmp_path / "c.pt")
    other = trainer(agent="lstm", learning_rate=0.5)
    with pytest.raises(ValueError, match="learning_rate"):
        other.load_state_dict(load_checkpoint(tmp_path / "c.pt"))
    longer = trainer(agent="lstm", num_episodes=5000)
    longer.load_state_dict(load_checkpoint(tmp_path / "c.pt"))  # extending a run is fine


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"x": torch.ones(2)}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"x": torch.zeros(2)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["x"], torch.ones(2))
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_config_validation_and_roundtrip():
    with pytest.raises(ValueError, match="discount"):
        TrainConfig(discount=1.5)
    with pytest.raises(ValueError, match="meta_update_ival"):
        TrainConfig(meta_update_ival=0)
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(dtype="float16")
    with pytest.raises(ValueError, match="grad_clip"):
        TrainConfig(grad_clip=float("inf"))
    config = TrainConfig(agent="lstm", seed=3)
    assert config_from_dict({**vars(config), "unknown": 1}) == config


def test_last_fraction_mean():
    assert last_fraction_mean(list(range(20))) == 18.5
    assert last_fraction_mean([3.0]) == 3.0
    with pytest.raises(ValueError, match="empty"):
        last_fraction_mean([])


def test_trainer_leaves_the_global_random_state_alone():
    state = torch.random.get_rng_state()
    a = trainer(agent="warp", seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = trainer(agent="warp", seed=7)
    assert same(list(a.agent.parameters()), list(b.agent.parameters()))


@pytest.mark.parametrize("where", ["adapt", "warp"])
def test_nonfinite_parameters_stop_the_episode_before_any_update(where):
    """Issue 28 item 7: the rollout's raw 'probability tensor contains either inf, nan or
    element < 0' becomes one line naming the episode; nothing is updated."""
    from metazoo import NonFiniteError

    tr = trainer(agent="warp")
    tr.train_episode()
    params = tr.adapt_params if where == "adapt" else tr.warp_params
    with torch.no_grad():
        params[0].fill_(float("nan"))
    adapt, warp = snapshot(tr.adapt_params), snapshot(tr.warp_params)
    state = {k: v.clone() for k, v in tr.adapt_optimizer.state_dict()["state"][0].items()}
    with pytest.raises(NonFiniteError, match=r"^episode 1: the policy's action probabilities "
                       r"are not finite at step 0 .*--learning_rate \(0\.001\)"):
        tr.train_episode()
    assert all(torch.equal(a, b) or torch.isnan(a).all() for a, b in zip(
        adapt, tr.adapt_params))
    assert all(torch.equal(a, b) or torch.isnan(a).all() for a, b in zip(
        warp, tr.warp_params))
    assert all(torch.equal(v, tr.adapt_optimizer.state_dict()["state"][0][k])
               for k, v in state.items())
    assert tr.episode == 1 and tr.updater.count == 1


def test_a_nonfinite_loss_is_refused_before_the_adaptable_step(monkeypatch):
    import train

    tr = trainer(agent="warp", reward=1.0)
    real = train.a2c_loss

    def poisoned(rollout, **kwargs):
        loss = real(rollout, **kwargs)
        return train.A2CLoss(loss.total * float("inf"), loss.policy * float("inf"), loss.value,
                             loss.concentration)

    monkeypatch.setattr(train, "a2c_loss", poisoned)
    adapt = snapshot(tr.adapt_params)
    with pytest.raises(train.NonFiniteEpisode, match=r"^episode 0: the A2C loss is not finite "
                       r"\(policy"):
        tr.train_episode()
    assert same(adapt, tr.adapt_params) and tr.updater.count == 0 and tr.episode == 0
    assert all(p.grad is None for p in tr.adapt_params + tr.warp_params)
