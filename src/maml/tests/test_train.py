"""meta_train: runs any MetaLearner over a stream of meta-batches and records a typed history."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metazoo
from maml import MAML, Evaluation, Reptile, TrainHistory, iMAML, meta_train

DTYPE = torch.float64


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1)).to(DTYPE)


def batches(seed: int = 0, size: int = 2):
    g = torch.Generator().manual_seed(seed)
    while True:
        tasks = []
        for _ in range(size):
            w = torch.randn(2, 1, generator=g, dtype=DTYPE)
            x, xq = torch.randn(5, 2, generator=g, dtype=DTYPE), torch.randn(5, 2, generator=g,
                                                                              dtype=DTYPE)
            tasks.append(metazoo.Task([(x, x @ w)], (xq, xq @ w)))
        yield tasks


@pytest.mark.parametrize("make", [
    lambda m: MAML(model=m, criterion=F.mse_loss, inner_optimizer=metazoo.SGD(0.1),
                   meta_optimizer=lambda p: torch.optim.Adam(p, lr=0.01)),
    lambda m: Reptile(model=m, criterion=F.mse_loss, inner_optimizer=metazoo.SGD(0.1)),
    lambda m: iMAML(model=m, criterion=F.mse_loss, inner_optimizer=metazoo.SGD(0.1),
                    inner_steps=3, meta_optimizer=lambda p: torch.optim.Adam(p, lr=0.01)),
], ids=["MAML", "Reptile", "iMAML"])
def test_history_records_every_step_and_evaluation(make):
    learner = make(model())
    eval_tasks = next(batches(seed=9, size=4))
    steps, evaluations = [], []
    history = meta_train(learner, batches(), meta_steps=7, eval_tasks=eval_tasks, eval_every=3,
                         on_step=lambda i, r: steps.append(i), on_eval=evaluations.append)
    assert isinstance(history, TrainHistory)
    assert len(history.meta_losses) == len(history.steps) == 7 and steps == list(range(7))
    assert [e.meta_step for e in history.evaluations] == [3, 6, 7]
    assert list(history.evaluations) == evaluations
    assert all(isinstance(e, Evaluation) for e in evaluations)
    assert history.meta_losses == tuple(r.meta_loss for r in history.steps)
    # the learner was trained: meta-training moves the held-out loss down from the start
    assert history.evaluations[-1].result.loss < make(model()).evaluate(eval_tasks).loss


def test_same_seed_same_history():
    runs = [meta_train(MAML(model=model(), criterion=F.mse_loss), batches(), meta_steps=3)
            for _ in range(2)]
    assert runs[0].meta_losses == runs[1].meta_losses
    assert runs[0].evaluations == ()


def test_validation():
    learner = MAML(model=model(), criterion=F.mse_loss)
    with pytest.raises(ValueError, match="ran out after 2 meta-batches but meta_steps=3"):
        meta_train(learner, itertools.islice(batches(), 2), meta_steps=3)
    with pytest.raises(ValueError, match="meta_steps must be an int >= 1, got 0"):
        meta_train(learner, batches(), meta_steps=0)
    with pytest.raises(ValueError, match="eval_every > 0 needs eval_tasks"):
        meta_train(learner, batches(), meta_steps=1, eval_every=2)
    with pytest.raises(ValueError, match="eval_every must be an int >= 0"):
        meta_train(learner, batches(), meta_steps=1, eval_every=-1)
    with pytest.raises(ValueError, match=r"learner must be a metazoo\.MetaLearner"):
        meta_train(object(), batches(), meta_steps=1)
