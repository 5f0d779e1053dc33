"""Any ``metazoo.MetaLearner`` as a ``LightningModule``.

``training_step`` takes this process's share of a meta-batch (``data.MetaBatch``) and makes
one meta-step, ``metazoo.distributed.meta_step(learner, tasks)``: exactly
``learner.meta_step(tasks)`` in one process; under a Lightning DDP strategy, the same call
with the all-reduce of ``metazoo.distributed`` over the process group Lightning created (the
meta-gradient of the whole meta-batch, weighted by tasks). Optimization is manual because the
learner owns its meta-step; ``configure_optimizers`` returns the learner's own
meta-optimizer, so Lightning checkpoints its state and drives an LR scheduler on it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from metazoo import distributed
from metazoo.learner import EvalResult, MetaLearner, MetaStepResult, Task
from metazoo.lightning.data import MetaBatch
from metazoo.registry import build_learner

__all__ = ["CHECKPOINT_KEY", "MetaLearnerModule"]

#: Where ``on_save_checkpoint`` puts the learner's ``state_dict`` and each process's random
#: number generator states in a Lightning checkpoint.
CHECKPOINT_KEY = "metazoo"

SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


def _rng_state() -> dict[str, Any]:
    """This process's generators as tensors, ints and tuples (a ``weights_only`` load)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": (str(kind), torch.from_numpy(np.asarray(keys, np.int64)),
                                       int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetaLearnerModule(L.LightningModule):
    """A ``LightningModule`` that meta-trains ``learner`` with its own meta-step.

    Logged through ``self.log`` (so every Lightning logger receives them), means over the
    tasks of the whole meta-batch, the same on every process: ``train/meta_loss`` (also on the
    progress bar), ``train/inner_loss``, ``train/accuracy`` (classification),
    ``train/skipped_tasks``; ``val/loss``, ``val/accuracy``, ``test/loss``, ``test/accuracy``
    after adapting to each task (``learner.evaluate``).

    Checkpoints: Lightning's own (model parameters, meta-optimizer, LR scheduler, loops) plus,
    under ``CHECKPOINT_KEY``, ``learner.state_dict()`` (the learner's extra state: learned
    inner learning rates, Reptile's carried inner optimizer state, ...) and every process's
    random number generator states, so ``trainer.fit(ckpt_path=...)`` continues exactly.

    Args:
        learner: any ``metazoo.MetaLearner`` (built on the CPU; Lightning moves the module,
            its model and every meta-parameter, to the device).
        eval_inner_steps: inner steps in validation and test (default: the learner's).
        meta_lr_scheduler: optional factory ``optimizer -> torch LR scheduler`` on the
            meta-optimizer, stepped once per meta-step.

    Raises:
        ValueError: ``learner`` is not a ``MetaLearner``, or a meta-parameter outside
            ``learner.model`` is not an ``nn.Parameter`` (it could not move with the module).
    """

    def __init__(self, learner: MetaLearner, *, eval_inner_steps: int | None = None,
                 meta_lr_scheduler: SchedulerFactory | None = None) -> None:
        super().__init__()
        if not isinstance(learner, MetaLearner):
            raise ValueError(f"learner must be a metazoo.MetaLearner, got "
                             f"{type(learner).__name__}; build one with metazoo.build_learner "
                             f"or an algorithm class (maml.MAML, warpgrad.WarpGrad, ...)")
        if eval_inner_steps is not None and (isinstance(eval_inner_steps, bool) or not isinstance(
                eval_inner_steps, int) or eval_inner_steps < 1):
            raise ValueError(f"eval_inner_steps={eval_inner_steps!r} must be None (the "
                             f"learner's) or an integer >= 1")
        # The learner steps its own meta-optimizer (MetaLearner.meta_step).
        self.automatic_optimization = False
        self.learner = learner
        self.eval_inner_steps = eval_inner_steps
        self.meta_lr_scheduler = meta_lr_scheduler
        self.model = learner.model
        # Meta-parameters that live outside the model (WarpGrad's initialisation, learned inner
        # learning rates) are registered too, as the same tensors, so that Lightning moves them
        # to the device, DDP broadcasts them at start and the module's state_dict holds them.
        in_model = {id(p) for p in learner.model.parameters()}
        outside: list[nn.Parameter] = []
        for name, p in learner.named_meta_parameters():
            if id(p) in in_model or any(p is q for q in outside):
                continue
            if not isinstance(p, nn.Parameter):
                raise ValueError(f"meta-parameter {name!r} of {type(learner).__name__} is a "
                                 f"{type(p).__name__}, not an nn.Parameter outside the model; "
                                 f"MetaLearnerModule can only move nn.Parameters with the "
                                 f"module")
            outside.append(p)
        self.extra_meta_parameters = nn.ParameterList(outside)
        self._rng_to_restore: dict[str, Any] | None = None

    @classmethod
    def from_name(cls, name: str, *, eval_inner_steps: int | None = None,
                  meta_lr_scheduler: SchedulerFactory | None = None,
                  **keywords: Any) -> MetaLearnerModule:
        """The module around ``metazoo.build_learner(name, **keywords)``.

        Example:
            ``MetaLearnerModule.from_name("maml", model=net, criterion=F.cross_entropy,
            inner_optimizer=metazoo.SGD(0.4), inner_steps=5, meta_optimizer=factory)``
        """
        return cls(build_learner(name, **keywords), eval_inner_steps=eval_inner_steps,
                   meta_lr_scheduler=meta_lr_scheduler)

    # -- optimizers ---------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        """The learner's meta-optimizer (and the scheduler built on it, stepped every
        meta-step)."""
        optimizer = self.learner.meta_optimizer
        if self.meta_lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self.meta_lr_scheduler(optimizer),
                                 "interval": "step"}}

    def _meta_parameters(self) -> list[Tensor]:
        seen: set[int] = set()
        params = []
        for group in self.learner.meta_optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        return params

    # -- steps --------------------------------------------------------------------------------

    def training_step(self, batch: MetaBatch, batch_idx: int) -> Tensor:
        """One meta-step over this process's share of the meta-batch; returns the meta-loss."""
        if not isinstance(batch, MetaBatch):
            raise ValueError(f"MetaLearnerModule.training_step takes a metazoo.lightning."
                             f"MetaBatch (from a TaskDataModule), got {type(batch).__name__}")
        optimizer = self.optimizers()
        results: list[MetaStepResult] = []
        params = self._meta_parameters()
        grads: list[Tensor | None] = []

        def meta_step() -> Tensor:
            # The learner's own meta-step (it steps the meta-optimizer once, checked for
            # non-finite values). Lightning's optimizer.step, which calls this closure, then
            # finds no gradient and leaves every parameter as it is; going through it keeps
            # Lightning's step count (global_step, max_steps) and its hooks.
            results.append(distributed.meta_step(self.learner, batch.tasks))
            grads.extend(p.grad for p in params)
            for p in params:
                p.grad = None
            return torch.tensor(results[0].meta_loss)

        optimizer.step(closure=meta_step)  # type: ignore[union-attr]
        for p, grad in zip(params, grads):  # .grad as learner.meta_step leaves it
            p.grad = grad
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()  # type: ignore[union-attr]
        result = results[0]
        self._log_step(result)
        return torch.tensor(result.meta_loss)

    def _log_step(self, result: MetaStepResult) -> None:
        size = max(result.num_tasks, 1)
        self.log("train/meta_loss", result.meta_loss, prog_bar=True, batch_size=size)
        self.log("train/inner_loss", result.inner_loss, batch_size=size)
        if result.accuracy is not None:
            self.log("train/accuracy", result.accuracy, batch_size=size)
        self.log("train/skipped_tasks", float(result.skipped_tasks), batch_size=size)

    def _evaluate(self, tasks: list[Task]) -> EvalResult:
        # Lightning validates under torch.inference_mode; adaptation needs autograd, and
        # tensors moved to the device under inference mode cannot be saved for backward.
        # Tasks drawn or moved during validation are inference tensors: cloned out of it.
        def usable(t: Tensor) -> Tensor:
            return t.clone() if t.is_inference() else t

        with torch.inference_mode(False), torch.enable_grad():
            tasks = [Task([(usable(x), usable(y)) for x, y in t.support],
                          (usable(t.query[0]), usable(t.query[1]))) for t in tasks]
            return distributed.evaluate(self.learner, tasks, steps=self.eval_inner_steps)

    def _log_eval(self, split: str, batch: MetaBatch) -> EvalResult:
        result = self._evaluate(batch.tasks)
        # The result is over the whole meta-batch on every process already; sync_dist
        # averages identical values (what Lightning expects of epoch-level logs under DDP).
        sync = dist.is_available() and dist.is_initialized()
        self.log(f"{split}/loss", result.loss, prog_bar=split == "val",
                 batch_size=result.num_tasks, sync_dist=sync)
        if result.accuracy is not None:
            self.log(f"{split}/accuracy", result.accuracy, prog_bar=split == "val",
                     batch_size=result.num_tasks, sync_dist=sync)
        return result

    def validation_step(self, batch: MetaBatch, batch_idx: int) -> None:
        """Adapts to each task of the meta-batch and logs ``val/loss``, ``val/accuracy``."""
        self._log_eval("val", batch)

    def test_step(self, batch: MetaBatch, batch_idx: int) -> None:
        """Adapts to each task of the meta-batch and logs ``test/loss``, ``test/accuracy``."""
        self._log_eval("test", batch)

    # -- processes and checkpoints ----------------------------------------------------------

    def on_fit_start(self) -> None:
        # A precision plugin would cast the model or autocast the meta-step: the learner's update
        # would no longer be its own. The learner's dtype is its model's and its tasks'.
        precision = str(self.trainer.precision)
        if precision != "32-true":
            raise ValueError(f"Trainer(precision={precision!r}) would cast or autocast the "
                             f"learner's meta-step; keep the default '32-true' and build the "
                             f"model and tasks in the dtype to train in (e.g. .double())")

    def on_train_start(self) -> None:
        # Every process continues from rank 0's learner (a no-op in one process); a resumed
        # run takes its random number generators back here, after the sanity validation.
        processes = distributed.world_size()
        if processes > 1 and getattr(self.learner, "inner_state", None) == "carry":
            # Each process would carry its own state through its own tasks: not the
            # single-process sequence (metazoo's omniglot main.py refuses it too).
            raise ValueError(f"Reptile(inner_state='carry') runs a meta-batch's tasks one "
                             f"after another in one process, not across {processes} "
                             f"processes; train it on one device, or use inner_state='reset'")
        distributed.broadcast_learner(self.learner)
        if self._rng_to_restore is not None:
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Adds the learner's ``state_dict`` and each process's RNG states."""
        rng = [_rng_state()]
        if dist.is_available() and dist.is_initialized():
            # Called on every process; rank 0 writes the file with everyone's generators.
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, _rng_state())
            rng = gathered
        checkpoint[CHECKPOINT_KEY] = {"learner": self.learner.state_dict(), "rng": rng}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restores the learner's ``state_dict``; the RNG states follow at ``on_train_start``."""
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            raise ValueError(f"checkpoint has no {CHECKPOINT_KEY!r} entry: it was not written "
                             f"by a MetaLearnerModule; resume from one of its checkpoints")
        self.learner.load_state_dict(saved["learner"])
        rng = saved["rng"]
        rank = distributed.rank()
        if len(rng) != distributed.world_size():
            raise ValueError(f"checkpoint was written by {len(rng)} processes, this run has "
                             f"{distributed.world_size()}; resume with the same devices")
        self._rng_to_restore = rng[rank]
