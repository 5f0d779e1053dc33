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

import warpgrad

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
adapt_layers = [net.inp, net.hidden, net.out]
warp_layers = [net.warp1, net.warp2]
print(f"adapted: {sum(p.numel() for m in adapt_layers for p in m.parameters())} parameters, "
      f"warp: {sum(p.numel() for m in warp_layers for p in m.parameters())}")

# %% [markdown]
# ## Your tasks
#
# Sine waves of random amplitude and phase. A task is any re-iterable of `(x, y)` batches: the
# task learner takes one SGD step per batch. Held-out tasks get a separate query batch.

# %%
INNER_STEPS, INNER_LR = 5, 0.02


def sine_batches(count: int, size: int = 10):
    amplitude, phase = 0.1 + 4.9 * torch.rand(1), 3.1416 * torch.rand(1)
    batches = []
    for _ in range(count):
        x = 10 * torch.rand(size, 1) - 5
        batches.append((x, amplitude * torch.sin(x + phase)))
    return batches


held_out = [sine_batches(INNER_STEPS + 1) for _ in range(20)]  # the last batch is the query
print(f"{len(held_out)} held-out tasks of {INNER_STEPS} support batches and 1 query batch")

# %% [markdown]
# ## Wrap it
#
# `warpgrad.Warp` splits the parameters into the adapted ones (with a meta-learned
# initialisation) and the warp parameters; the `DualUpdater` holds the meta-objectives (Algorithm
# 2 of the paper: the warp objective replays stored states, the init objective shortens each
# task's path) and the replay buffer stores the states. `OptimizerParameters` tells the replay
# which inner step the task learner takes.

# %%
criterion = nn.MSELoss()
model = warpgrad.Warp(net, adapt_layers, warp_layers,
                      warpgrad.DualUpdater(criterion=criterion), warpgrad.ReplayBuffer(),
                      warpgrad.OptimizerParameters(trainable=False, default_lr=INNER_LR,
                                                   default_momentum=0.0))
meta_optimizer = torch.optim.Adam(model.warp_parameters(), lr=1e-3)


def adapt(task, collect: bool) -> None:
    """The task learner: plain SGD on the adapted layers, from the meta-learned init."""
    model.init_adaptation()
    model.train()
    if collect:
        model.register_task(task)
        model.collect()
    optimizer = torch.optim.SGD(model.adapt_parameters(), lr=INNER_LR)
    for x, y in task:
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    if collect:
        model.no_collect()


def held_out_loss() -> float:
    total = 0.0
    for task in held_out:
        adapt(task[:-1], collect=False)
        with torch.no_grad():
            x, y = task[-1]
            total += criterion(model(x), y).item()
    return total / len(held_out)


before = held_out_loss()
print(f"before meta-training: held-out query MSE after {INNER_STEPS} steps {before:.3f}")

# %% [markdown]
# ## Meta-train the warp
#
# Each meta-step adapts a few tasks while the states are recorded, then `model.backward`
# replays them, steps the warp parameters with `meta_optimizer` and the initialisation with
# the init objective, and clears the buffer.

# %%
def meta_step_fn():
    meta_optimizer.step()
    meta_optimizer.zero_grad()


for meta_step in range(1, 101):
    for task in [sine_batches(INNER_STEPS) for _ in range(4)]:
        adapt(task, collect=True)
    model.backward(meta_step_fn)
    if meta_step % 25 == 0:
        print(f"meta-step {meta_step}: held-out query MSE after {INNER_STEPS} steps "
              f"{held_out_loss():.3f}")

after = held_out_loss()
print(f"from {before:.3f} to {after:.3f} ({after / before:.2f}x) with the meta-trained warp "
      f"and initialisation")

# %% [markdown]
# ## What the warp learned
#
# The warp layers started as PyTorch's random linear layers; meta-training moved them. The
# initialisation of the adapted layers is meta-learned too (`DualUpdater(init_lr=0.1)` by
# default; `init_objective="none"` keeps it fixed, to see the warp's part alone).

# %%
torch.manual_seed(0)  # the seed `net` was built with: `fresh` is net's starting point
fresh = WarpedNet()
for name in ("warp1", "warp2"):
    moved = (getattr(net, name).weight - getattr(fresh, name).weight).norm()
    print(f"{name}: weight moved by {moved:.3f} (norm {getattr(net, name).weight.norm():.3f})")
