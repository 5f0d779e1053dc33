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
# # MAML against first-order MAML on your own model
#
# Second-order MAML differentiates the query loss through the whole inner loop: its
# meta-gradient holds products of Hessians with vectors, one per inner step. First-order MAML
# (`first_order=True`) drops them and takes the query-loss gradient at the adapted parameters.
# It is cheaper; how much cheaper depends on the model, the inner loop and the machine, so this
# notebook measures it here: the time and the peak memory of one meta-step of each, side by
# side in one process, and what each reaches after the same number of meta-steps.
#
# Everything below is your own code except the learner: a model class, a task family, and
# `maml.MAML` built twice from the same initialisation, once with `first_order=True`.

# %%
import copy
import ctypes
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import metazoo
from maml import MAML

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
torch.manual_seed(0)
print(f"device {device}, torch {torch.__version__}")

# %% [markdown]
# ## Your model and your tasks
#
# A small convolutional classifier written as its own `nn.Module`, and 5-way tasks of 16x16
# images: each task draws 5 random class prototypes; an image is its class's prototype, shifted
# by a few pixels, plus noise. The support set has 1 image per class, the query set 5.

# %%
class SmallConvNet(nn.Module):
    def __init__(self, classes: int = 5, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.MaxPool2d(2))
        self.head = nn.Linear(width * 4 * 4, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def make_task(shots: int = 1, queries: int = 5, ways: int = 5) -> metazoo.Task:
    prototypes = torch.randn(ways, 1, 16, 16)

    def draw(per_class: int):
        labels = torch.arange(ways).repeat(per_class)
        images = prototypes[labels]
        shifts = torch.randint(-2, 3, (2,))
        images = torch.roll(images, shifts=tuple(shifts.tolist()), dims=(2, 3))
        return (images + 0.5 * torch.randn_like(images)).to(device), labels.to(device)

    return metazoo.Task(support=[draw(shots)], query=draw(queries))


held_out = [make_task() for _ in range(20)]
print(f"{len(held_out)} held-out tasks; support {tuple(held_out[0].support[0][0].shape)}, "
      f"query {tuple(held_out[0].query[0].shape)}")

# %% [markdown]
# ## Two learners from one initialisation
#
# The same keywords; only `first_order` differs.

# %%
INNER_STEPS = 5
model = SmallConvNet().to(device)


def build(first_order: bool) -> MAML:
    return MAML(model=copy.deepcopy(model), criterion=F.cross_entropy,
                inner_optimizer=metazoo.SGD(0.4), inner_steps=INNER_STEPS,
                meta_optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
                first_order=first_order)


learners = {"second order": build(False), "first order": build(True)}
for name, learner in learners.items():
    print(f"{name:>12}: held-out accuracy before meta-training "
          f"{learner.evaluate(held_out).accuracy:.3f}")

# %% [markdown]
# ## The cost of the second-order term, measured here
#
# Time: the median of several meta-steps of each, alternating between the two so that a busy
# machine slows both alike, after a warm-up. Memory: the peak above the level before one
# meta-step (`torch.cuda.max_memory_allocated` on a GPU; on a Linux CPU the peak resident
# memory, with glibc told to return freed tensors to the system; not measured elsewhere).

# %%
LINUX = sys.platform.startswith("linux")
if LINUX and device.type == "cpu":
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: a fixed threshold, freed tensors go back


def _resident_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field))
    return int(line.split()[1]) / 1024


def peak_mib(fn):
    """Peak memory in MiB above the level before ``fn()``, or None where unknown."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    if not LINUX:
        fn()
        return None
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets the peak resident size (VmHWM) to the current one
    before = _resident_mib("VmRSS")
    fn()
    return _resident_mib("VmHWM") - before


def seconds(fn) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


batch = [make_task() for _ in range(4)]
# Timed on throw-away copies, so that the learners below start meta-training untouched.
timed = {name: copy.deepcopy(learner) for name, learner in learners.items()}
for learner in timed.values():
    learner.meta_step(batch)  # warm-up
times: dict[str, list[float]] = {name: [] for name in timed}
for _ in range(3):
    for name, learner in timed.items():
        times[name].append(seconds(lambda learner=learner: learner.meta_step(batch)))
memory = {name: peak_mib(lambda learner=learner: learner.meta_step(batch))
          for name, learner in reversed(timed.items())}  # first order first

median = {name: statistics.median(values) for name, values in times.items()}
print(f"{'':>12} {'s/meta-step':>12} {'peak MiB':>9}")
for name in timed:
    shown = "n/a" if memory[name] is None else f"{memory[name]:.1f}"
    print(f"{name:>12} {median[name]:12.4f} {shown:>9}")
print(f"second order / first order: time {median['second order'] / median['first order']:.2f}x",
      end="")
if memory["second order"] and memory["first order"]:
    print(f", memory {memory['second order'] / memory['first order']:.2f}x")
else:
    print()

# %% [markdown]
# ## What each reaches
#
# The same meta-batches for both, then the held-out accuracy after `INNER_STEPS` inner steps.
# With few meta-steps the two are often close: first-order MAML is a good approximation when
# the inner learning rate times the curvature is small. Where the second-order term matters, it
# shows after longer runs (the Omniglot 5-way 1-shot results on
# [the experiment's page](../../experiments/omniglot/) compare them at a larger budget).

# %%
META_STEPS = 25
for _ in range(META_STEPS):
    batch = [make_task() for _ in range(4)]
    for learner in learners.values():
        learner.meta_step(batch)
for name, learner in learners.items():
    result = learner.evaluate(held_out)
    print(f"{name:>12}: held-out accuracy after {META_STEPS} meta-steps {result.accuracy:.3f} "
          f"(query loss {result.loss:.3f})")
