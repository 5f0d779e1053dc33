# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # WarpGrad on your own model: from nothing to a meta-trained warp
#
# WarpGrad (Flennerhag et al., ICLR 2020) interleaves *warp layers* with the layers a task
# learner adapts. The warp layers are shared by all tasks and held fixed while a task adapts;
# because the gradient of every adapted layer flows through them, they act as a learned
# preconditioner. They are meta-learned from states replayed out of the tasks' trajectories, so
# meta-learning never backpropagates through a whole adaptation.
#
# This notebook takes a network of your own, marks which of its layers warp, and meta-trains
# the warp on a family of regression tasks, printing how well a task learner adapts in a few
# steps before and after.

# %%
import torch
from torch import nn

import metazoo
from warpgrad import WarpGrad

torch.manual_seed(0)
print(f"torch {torch.__version__}")

# %% [markdown]
# ## Your model
#
# Any `nn.Module`. Here the `warp*` layers will be the warp layers; `inp`, `hidden` and `out`
# adapt to each task. A warp layer can be any module: a linear layer here, convolutions or the
# blocks of `warpgrad.layers` in a convolutional net.

# %%
class WarpedNet(nn.Module):
    def __init__(self, width: int = 40):
        super().__init__()
        self.inp = nn.Linear(1, width)
        self.warp1 = nn.Linear(width, width)
        self.hidden = nn.Linear(width, width)
        self.warp2 = nn.Linear(width, width)
        self.out = nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.warp1(torch.relu(self.inp(x)))
        h = self.warp2(torch.relu(self.hidden(h)))
        return self.out(h)


net = WarpedNet()
warp_count = sum(p.numel() for name, p in net.named_parameters() if name.startswith("warp"))
print(f"{sum(p.numel() for p in net.parameters()) - warp_count} parameters adapt to each task, "
      f"{warp_count} warp")

# %% [markdown]
# ## Your tasks
#
# Sine waves of random amplitude and phase, as `metazoo.Task`s: the task learner takes one SGD
# step per support batch, and the adapted model is scored on the query batch.

# %%
INNER_STEPS = 5


def sine_task(size: int = 10) -> metazoo.Task:
    amplitude, phase = 0.1 + 4.9 * torch.rand(1), 3.1416 * torch.rand(1)
    batches = []
    for _ in range(INNER_STEPS + 1):
        x = 10 * torch.rand(size, 1) - 5
        batches.append((x, amplitude * torch.sin(x + phase)))
    return metazoo.Task(support=batches[:-1], query=batches[-1])


held_out = [sine_task() for _ in range(20)]
print(f"{len(held_out)} held-out tasks of {INNER_STEPS} support batches and 1 query batch")

# %% [markdown]
# ## The learner
#
# Built like every metazoo learner (the same keywords as `maml.MAML` or `maml.Reptile`, see
# [the quickstart](../../quickstart/)), plus WarpGrad's own: which modules warp, here by a
# predicate over the module names. The other layers adapt. WarpGrad's task learner is SGD, one
# learning rate (and momentum) per tensor, which `learn_optimizer=True` would meta-learn too.

# %%
learner = WarpGrad(
    model=net,
    warp_modules=lambda name: name.startswith("warp"),
    criterion=nn.MSELoss(),
    inner_optimizer=metazoo.SGD(0.02),
    inner_steps=INNER_STEPS,
    meta_optimizer=lambda params: torch.optim.Adam(params, lr=3e-3),
)
before = learner.evaluate(held_out).loss
print(f"before meta-training: held-out query MSE after {INNER_STEPS} steps {before:.3f}")

# %% [markdown]
# ## Meta-train the warp
#
# Each meta-step adapts a few tasks while their states are recorded into the replay buffer,
# then replays them: the warp layers get the gradient of the warp objective (Algorithm 2 of
# the paper: from each stored state, one differentiable step on one batch, the loss on
# another), the initialisation the init objective's (it shortens each task's path), and the
# meta-optimizer steps both.

# %%
for meta_step in range(1, 101):
    learner.meta_step([sine_task() for _ in range(4)])
    if meta_step % 25 == 0:
        print(f"meta-step {meta_step}: held-out query MSE after {INNER_STEPS} steps "
              f"{learner.evaluate(held_out).loss:.3f}")

after = learner.evaluate(held_out).loss
print(f"from {before:.3f} to {after:.3f} ({after / before:.2f}x) with the meta-trained warp "
      f"and initialisation")

# %% [markdown]
# ## What the warp learned
#
# The warp layers started as PyTorch's random linear layers; meta-training moved them.
# `init_objective="none"` keeps the initialisation fixed, to see the warp's part alone, and
# the reference-style API (`warpgrad.Warp`, `DualUpdater`, your own task loop) builds the same
# learner piece by piece: see [WarpGrad](../../algorithms/warpgrad/).

# %%
torch.manual_seed(0)  # the seed `net` was built with: `fresh` is net's starting point
fresh = WarpedNet()
for name in ("warp1", "warp2"):
    moved = (getattr(net, name).weight - getattr(fresh, name).weight).norm()
    print(f"{name}: weight moved by {moved:.3f} (norm {getattr(net, name).weight.norm():.3f})")
