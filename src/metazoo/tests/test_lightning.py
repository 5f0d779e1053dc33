"""metazoo.lightning: every learner through Lightning's Trainer against its own meta_step.

Exactness (float64): N meta-steps of ``Trainer(max_steps=N)`` on one CPU process equal N direct
``learner.meta_step`` calls on the same meta-batches, for every learner kind; two processes on
Lightning's DDP strategy (gloo) equal one process; a run killed with SIGKILL after a checkpoint
and resumed with ``trainer.fit(ckpt_path=...)`` equals an uninterrupted one. Loggers: the CSV
and TensorBoard files hold the meta-losses of the meta-steps.

This file is also the script that the multi-process and kill tests run in a subprocess
(``python test_lightning.py ddp|kill OUT KIND...``): Lightning's ``strategy="ddp"`` starts
rank 1 by running the same command again, so the learners are built by the same code in the
test, in rank 0 and in rank 1. The algorithm packages are test-only dependencies here.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lightning", reason="the [lightning] extra is not installed")

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F

import metazoo
from leap import LeapLearner
from maml import MAML, Reptile, iMAML
from metazoo import Task
from metazoo.lightning import (
    CHECKPOINT_KEY,
    ImageFolderDataModule,
    MetaBatch,
    MetaLearnerModule,
    SinusoidDataModule,
    TaskDataModule,
    task_generator,
)
from metazoo.testing import WarpedMLP, small_mlp
from warpgrad import DualUpdater, OptimizerParameters, Warp, WarpGrad

# Lightning 2.6 on torch 2.14 flattens its loaders with a deprecated torch pytree class; the
# warning is about Lightning's code, raised on every fit, and says nothing about this module.
LIGHTNING_WARNINGS = [
    r"ignore:`isinstance\(treespec, LeafSpec\)` is deprecated:FutureWarning",
]
# ModelCheckpoint(every_n_train_steps) under manual optimization warns that it saves the state
# after the optimizer step: what a resume needs (the meta-step is taken, global_step counts it).
AFTER_STEP_WARNING = ("ignore:Using ModelCheckpoint with manual optimization and "
                      "every_n_train_steps:UserWarning")
pytestmark = [pytest.mark.filterwarnings(w) for w in LIGHTNING_WARNINGS]

HERE = Path(__file__).resolve()
STEPS = 3
LAUNCH_LIMIT = 240.0  # seconds a subprocess run may take before the test fails


# -- learners and tasks, built identically by the test and by every subprocess -----------------


def _adam(lr: float) -> Callable[..., torch.optim.Optimizer]:
    return lambda params: torch.optim.Adam(params, lr=lr)


def _sgd(lr: float) -> Callable[..., torch.optim.Optimizer]:
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9)


def _warpgrad() -> metazoo.MetaLearner:
    model = WarpedMLP(batch_norm=False).double()
    warp = Warp(model, [model.fc1, model.fc2, model.head], [model.warp1, model.warp2],
                DualUpdater(F.cross_entropy),
                optimizer_parameters=OptimizerParameters(trainable=True, default_lr=0.3,
                                                         default_momentum=0.5))
    return WarpGrad(warp, inner_steps=2, meta_optimizer=_adam(0.01))


LEARNERS: dict[str, Callable[[], metazoo.MetaLearner]] = {
    # second order, BatchNorm, learned per-step inner learning rates (meta-parameters outside
    # the model), Adam meta-optimizer
    "maml": lambda: MAML(model=small_mlp(batch_norm=True), criterion=F.cross_entropy,
                         inner_optimizer=metazoo.SGD(0.3, momentum=0.5), inner_steps=2,
                         learn_inner_lr="per_tensor", per_step_inner_lr=True,
                         meta_optimizer=_adam(0.01)),
    "fomaml": lambda: MAML(model=small_mlp(), criterion=F.cross_entropy,
                           inner_optimizer=metazoo.SGD(0.3), inner_steps=2, first_order=True,
                           meta_optimizer=_sgd(0.5)),
    "reptile": lambda: Reptile(model=small_mlp(), criterion=F.cross_entropy,
                               inner_optimizer=metazoo.SGD(0.2), inner_steps=3,
                               meta_optimizer=_sgd(0.5)),
    # Adam's moments and step count carried across tasks and meta-steps
    "reptile_carry": lambda: Reptile(model=small_mlp(), criterion=F.cross_entropy,
                                     inner_optimizer=metazoo.Adam(0.05), inner_steps=3,
                                     inner_state="carry", meta_optimizer=_sgd(0.5)),
    "imaml": lambda: iMAML(model=small_mlp(), criterion=F.cross_entropy, lam=1.0, cg_steps=3,
                           inner_optimizer=metazoo.SGD(0.2), inner_steps=3,
                           meta_optimizer=_adam(0.01)),
    "leap": lambda: LeapLearner(model=small_mlp(), criterion=F.cross_entropy,
                                inner_optimizer=metazoo.SGD(0.2), inner_steps=3,
                                meta_optimizer=_sgd(0.5)),
    "warpgrad": _warpgrad,
}


def build(kind: str, seed: int = 0) -> metazoo.MetaLearner:
    torch.manual_seed(seed)
    return LEARNERS[kind]()


class ClassificationTasks(TaskDataModule):
    """3-way classification of 3-d inputs: one 6-point support batch, a 5-point query."""

    def _tasks(self, generator: torch.Generator, count: int) -> list[Task]:
        def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.randn(n, 3, generator=generator, dtype=torch.float64),
                    torch.randint(0, 3, (n,), generator=generator))

        return [Task([batch(6)], batch(5)) for _ in range(count)]

    def meta_batch(self, index: int) -> list[Task]:
        return self._tasks(task_generator(self.seed, 0, index), self.meta_batch_size)

    def eval_meta_batch(self, split: str, index: int) -> list[Task]:
        return self._tasks(task_generator(self.seed, 1 if split == "val" else 2, index),
                           self.eval_meta_batch_size)


def datamodule(size: int = 4, val: int = 1) -> ClassificationTasks:
    """With ``val=0`` the trainer needs ``limit_val_batches=0`` (no validation)."""
    return ClassificationTasks(meta_batch_size=size, seed=7, val_meta_batches=val)


def trainer(steps: int, **keywords: Any) -> L.Trainer:
    options: dict[str, Any] = dict(max_steps=steps, accelerator="cpu", devices=1, logger=False,
                                   enable_checkpointing=False, enable_progress_bar=False,
                                   enable_model_summary=False, val_check_interval=2,
                                   num_sanity_val_steps=1)
    options.update(keywords)
    return L.Trainer(**options)


def snapshot(learner: metazoo.MetaLearner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.named_meta_parameters()}


def direct(kind: str, steps: int, size: int = 4) -> metazoo.MetaLearner:
    """``steps`` direct ``learner.meta_step`` calls on the data module's meta-batches."""
    learner = build(kind)
    data = datamodule(size)
    for index in range(steps):
        learner.meta_step(data.meta_batch(index))
    return learner


def assert_same_state(actual: metazoo.MetaLearner | dict, expected: metazoo.MetaLearner,
                      tol: float = 1e-10) -> None:
    got = actual if isinstance(actual, dict) else snapshot(actual)
    want = snapshot(expected)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=0, atol=tol), (
            name, (got[name] - want[name]).abs().max().item())


# -- one process --------------------------------------------------------------------------------


def test_an_endless_stream_needs_max_steps():
    with pytest.raises(ValueError, match=r"without end.*Trainer\(max_steps=N\)"):
        trainer(-1, max_epochs=1, limit_val_batches=0).fit(
            MetaLearnerModule(build("fomaml")), datamodule=datamodule(val=0))


def test_precision_plugins_are_refused():
    with pytest.raises(ValueError, match=r"precision='bf16-mixed'.*keep the default '32-true'"):
        trainer(1, precision="bf16-mixed", limit_val_batches=0).fit(
            MetaLearnerModule(build("fomaml")), datamodule=datamodule(val=0))


@pytest.mark.parametrize("kind", sorted(LEARNERS))
def test_trainer_takes_the_learners_own_meta_steps(kind):
    learner = build(kind)
    module = MetaLearnerModule(learner)
    fit = trainer(STEPS)
    fit.fit(module, datamodule=datamodule())  # with a sanity check and a validation between
    expected = direct(kind, STEPS)
    assert fit.global_step == STEPS
    assert_same_state(learner, expected)
    # the meta-optimizer's state too (Adam's moments, SGD's momentum buffers)
    got, want = learner.meta_optimizer.state_dict(), expected.meta_optimizer.state_dict()
    for key, state in want["state"].items():
        for name, value in state.items():
            assert torch.allclose(torch.as_tensor(got["state"][key][name]),
                                  torch.as_tensor(value), rtol=0, atol=1e-10), (key, name)
    assert "train/meta_loss" in fit.progress_bar_metrics


def test_meta_parameters_outside_the_model_move_with_the_module():
    learner = build("warpgrad")
    module = MetaLearnerModule(learner)
    outside = {id(p) for p in module.extra_meta_parameters}
    assert outside == {id(p) for n, p in learner.named_meta_parameters()
                       if not n.startswith("warp.")}
    assert outside  # the initialisation and the learned inner learning rates
    # the optimizer Lightning sees is the learner's own
    assert module.configure_optimizers() is learner.meta_optimizer


def test_logged_values_are_the_meta_step_results():
    learner = build("fomaml")
    module = MetaLearnerModule(learner)
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(trainer.callback_metrics["train/meta_loss"]))

    trainer(2, callbacks=[Record()], limit_val_batches=0).fit(
        module, datamodule=datamodule(val=0))
    reference = build("fomaml")
    data = datamodule()
    expected = [reference.meta_step(data.meta_batch(i)).meta_loss for i in range(2)]
    assert losses == pytest.approx(expected, rel=1e-6)  # logged as float32


def test_validation_and_test_log_the_learners_evaluation():
    learner = build("reptile")
    data = datamodule(val=2)
    fit = trainer(2, val_check_interval=2, num_sanity_val_steps=0)
    fit.fit(MetaLearnerModule(learner, eval_inner_steps=4), datamodule=data)
    tasks = [t for i in range(2) for t in data.eval_meta_batch("val", i)]
    expected = learner.evaluate(tasks, steps=4)
    assert float(fit.callback_metrics["val/loss"]) == pytest.approx(expected.loss, rel=1e-6)
    assert float(fit.callback_metrics["val/accuracy"]) == pytest.approx(expected.accuracy,
                                                                        rel=1e-6)
    (result,) = fit.test(MetaLearnerModule(learner, eval_inner_steps=4), datamodule=data,
                         verbose=False)
    expected = learner.evaluate(data.eval_meta_batch("test", 0), steps=4)
    assert result["test/loss"] == pytest.approx(expected.loss, rel=1e-6)


def test_a_meta_lr_scheduler_is_stepped_every_meta_step_and_seen_by_lightning():
    learner = build("fomaml")
    module = MetaLearnerModule(
        learner, meta_lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, 0.5))
    fit = trainer(3, limit_val_batches=0)
    fit.fit(module, datamodule=datamodule(val=0))
    assert learner.meta_optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * 0.5 ** 3)
    assert len(fit.lr_scheduler_configs) == 1
    reference = build("fomaml")
    scheduler = torch.optim.lr_scheduler.StepLR(reference.meta_optimizer, 1, 0.5)
    for i in range(3):
        reference.meta_step(datamodule().meta_batch(i))
        scheduler.step()
    assert_same_state(learner, reference)


def test_bad_input_is_one_line_naming_the_argument():
    with pytest.raises(ValueError, match=r"learner must be a metazoo\.MetaLearner"):
        MetaLearnerModule(nn.Linear(2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eval_inner_steps=0"):
        MetaLearnerModule(build("fomaml"), eval_inner_steps=0)
    with pytest.raises(ValueError, match="meta_batch_size=0"):
        datamodule(size=0)
    with pytest.raises(ValueError, match=r"takes a metazoo\.lightning\.MetaBatch"):
        MetaLearnerModule(build("fomaml")).training_step([], 0)  # type: ignore[arg-type]


def test_from_name_builds_through_the_registry():
    torch.manual_seed(0)
    module = MetaLearnerModule.from_name(
        "fomaml", model=small_mlp(), criterion=F.cross_entropy, inner_optimizer=metazoo.SGD(0.3),
        inner_steps=2, meta_optimizer=_sgd(0.5))
    trainer(STEPS, limit_val_batches=0).fit(module, datamodule=datamodule(val=0))
    assert_same_state(module.learner, direct("fomaml", STEPS))
    with pytest.raises(ValueError, match="unknown learner 'mamll'"):
        MetaLearnerModule.from_name("mamll", model=small_mlp())


def test_import_metazoo_does_not_import_lightning():
    code = ("import sys, metazoo; "
            "assert not [m for m in sys.modules if m.split('.')[0] in "
            "('lightning', 'pytorch_lightning', 'tensorboard')], sorted(sys.modules)")
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True,
                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
                   timeout=LAUNCH_LIMIT)


# -- data modules -----------------------------------------------------------------------------


def test_meta_batches_depend_on_seed_and_index_and_are_sharded_over_processes(monkeypatch):
    data = SinusoidDataModule(meta_batch_size=5, seed=3, dtype=torch.float64)
    again = SinusoidDataModule(meta_batch_size=5, seed=3, dtype=torch.float64)
    first, second = data.meta_batch(4), again.meta_batch(4)
    assert all(torch.equal(a.query[0], b.query[0]) for a, b in zip(first, second))
    assert not torch.equal(first[0].query[0], data.meta_batch(5)[0].query[0])
    # two processes: blocks of 3 and 2 tasks, together the meta-batch, each task once
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(metazoo.distributed, "_rank", lambda group=None, r=rank: r)
        monkeypatch.setattr(metazoo.distributed, "_world_size", lambda group=None: 2)
        shares.append(data.shard(4, data.meta_batch(4)))
    assert [len(s.tasks) for s in shares] == [3, 2]
    assert all(s.size == 5 and s.index == 4 for s in shares)
    together = [t for s in shares for t in s.tasks]
    assert all(torch.equal(a.query[0], b.query[0]) for a, b in zip(together, first))


def test_the_stream_starts_at_the_trainers_global_step():
    data = datamodule()

    class Trainer:
        global_step, max_steps = 5, 10

    data.trainer = Trainer()  # type: ignore[assignment]
    batch = next(iter(data.train_dataloader()))
    assert isinstance(batch, MetaBatch) and batch.index == 5
    assert torch.equal(batch.tasks[0].query[0], data.meta_batch(5)[0].query[0])


def test_sinusoid_tasks_follow_the_protocol():
    (task,) = SinusoidDataModule(meta_batch_size=1, shots=10, queries=7).meta_batch(0)
    (x, y), (xq, _) = task.support[0], task.query
    assert x.shape == (10, 1) and xq.shape == (7, 1)
    assert float(x.abs().max()) <= 5 and float(y.abs().max()) <= 5


def test_image_folder_episodes(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for c in range(4):
            folder = tmp_path / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = torch.randint(0, 255, (10, 10), generator=g, dtype=torch.uint8)
                Image.fromarray(pixels.numpy(), mode="L").save(folder / f"{i}.png")
    data = ImageFolderDataModule(tmp_path, ways=3, shots=1, queries=2, image_size=8,
                                 channels="grey", meta_batch_size=2, dtype=torch.float64)
    tasks = data.meta_batch(0)
    x, y = tasks[0].support[0]
    assert x.shape == (3, 1, 8, 8) and y.tolist() == [0, 1, 2]
    assert tasks[0].query[0].shape == (6, 1, 8, 8)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    again = ImageFolderDataModule(tmp_path, ways=3, shots=1, queries=2, image_size=8,
                                  channels="grey", meta_batch_size=2, dtype=torch.float64)
    assert torch.equal(again.meta_batch(0)[1].query[0], tasks[1].query[0])
    assert data.eval_meta_batch("test", 0)[0].query[0].shape == (6, 1, 8, 8)
    with pytest.raises(ValueError, match="only 0 classes have shots"):
        ImageFolderDataModule(tmp_path, ways=3, shots=2, queries=2, image_size=8,
                              meta_batch_size=1).meta_batch(0)
    with pytest.raises(ValueError, match="is not a directory"):
        ImageFolderDataModule(tmp_path / "missing", meta_batch_size=1).meta_batch(0)


# -- loggers --------------------------------------------------------------------------------


def test_csv_and_tensorboard_loggers_receive_the_meta_losses(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    learner = build("fomaml")
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    trainer(3, logger=loggers, log_every_n_steps=1, val_check_interval=3,
            num_sanity_val_steps=0).fit(MetaLearnerModule(learner), datamodule=datamodule())
    reference = build("fomaml")
    expected = [reference.meta_step(datamodule().meta_batch(i)).meta_loss for i in range(3)]

    import csv
    (metrics,) = (tmp_path / "csv").rglob("metrics.csv")
    with metrics.open() as f:
        rows = list(csv.DictReader(f))
    logged = [float(r["train/meta_loss"]) for r in rows if r.get("train/meta_loss")]
    assert logged == pytest.approx(expected, rel=1e-6)
    assert any(r.get("val/loss") for r in rows)

    (events,) = (tmp_path / "tb").rglob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    scalars = accumulator.Scalars("train/meta_loss")
    assert [s.step for s in scalars] == [0, 1, 2]
    assert [s.value for s in scalars] == pytest.approx(expected, rel=1e-6)
    assert "val/loss" in accumulator.Tags()["scalars"]


# -- subprocess runs: Lightning's DDP on two CPU processes, a killed run ----------------------


def _run_script(*args: str, timeout: float = LAUNCH_LIMIT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(HERE), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


# Reptile's carried inner state runs the tasks in sequence in one process: refused below.
DDP_KINDS = ["leap", "maml", "reptile", "warpgrad"]  # every update rule; all kinds: one process


def test_a_carried_reptile_state_is_refused_over_several_processes(monkeypatch):
    monkeypatch.setattr(metazoo.distributed, "_world_size", lambda group=None: 2)
    with pytest.raises(ValueError, match=r"inner_state='carry'.*across 2 processes"):
        MetaLearnerModule(build("reptile_carry")).on_train_start()


def test_two_processes_on_lightnings_ddp_take_the_single_process_meta_steps(tmp_path):
    # 3 tasks over 2 processes: uneven shards (2 and 1 tasks), weighted by tasks, not ranks
    done = _run_script("ddp", str(tmp_path), *DDP_KINDS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    for kind in DDP_KINDS:
        expected = direct(kind, STEPS, size=3)
        for rank in (0, 1):
            state = torch.load(tmp_path / f"{kind}.rank{rank}.pt", weights_only=True)
            assert state["world_size"] == 2 and state["global_step"] == STEPS
            assert state["backend"] == "gloo"
            assert state["tasks"] == ([2] * STEPS if rank == 0 else [1] * STEPS)
            assert_same_state(state["params"], expected)
    checkpoint = torch.load(tmp_path / "warpgrad" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == STEPS
    assert len(checkpoint[CHECKPOINT_KEY]["rng"]) == 2  # both processes' generators


KILL_KINDS = ["maml", "reptile_carry", "warpgrad"]
KILL_STEPS, KILL_AT = 5, 3


@pytest.mark.filterwarnings(AFTER_STEP_WARNING)
def test_a_killed_run_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_one(tmp_path):
    done = _run_script("kill", str(tmp_path), *KILL_KINDS)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    for kind in KILL_KINDS:
        folder = tmp_path / kind
        assert (folder / "killed").exists()  # the child was killed (SIGKILL) mid-run
        last = folder / "last.ckpt"
        checkpoint = torch.load(last, weights_only=True)
        assert checkpoint["global_step"] == KILL_AT
        assert CHECKPOINT_KEY in checkpoint
        torch.manual_seed(12345)  # another random state: the checkpoint's must win
        learner = build(kind, seed=99)  # other initial weights: the checkpoint's must win
        fit = trainer(KILL_STEPS, num_sanity_val_steps=0, val_check_interval=2,
                      enable_checkpointing=True, callbacks=[every_step(folder)])
        fit.fit(MetaLearnerModule(learner), datamodule=datamodule(), ckpt_path=str(last))
        assert fit.global_step == KILL_STEPS
        torch.manual_seed(0)
        expected = direct(kind, KILL_STEPS)
        assert_same_state(learner, expected)
        if kind == "reptile_carry":  # the carried inner Adam state went on from the checkpoint
            assert_same_tree(learner.state_dict()["inner_optimizer_state"],
                             expected.state_dict()["inner_optimizer_state"])


def assert_same_tree(got: Any, want: Any) -> None:
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            assert_same_tree(got[key], want[key])
    elif isinstance(want, torch.Tensor):
        assert torch.allclose(got, want, rtol=0, atol=1e-10)
    else:
        assert got == want


def every_step(folder: Path) -> L.Callback:
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_last=True, save_top_k=0)


def _ddp_main(out: Path, kinds: list[str]) -> None:
    for kind in kinds:
        learner = build(kind)
        module = MetaLearnerModule(learner)
        tasks: list[int] = []

        class Count(L.Callback):
            def __init__(self, counts: list[int]) -> None:
                self.counts = counts

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                self.counts.append(len(batch.tasks))

        # What users write; on CPUs Lightning's DDP strategy takes the gloo backend. One learner
        # also writes checkpoints (every process's generators gathered into rank 0's file).
        saving = kind == "warpgrad"
        callbacks = [Count(tasks), *([every_step(out / kind)] if saving else [])]
        fit = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=STEPS,
                        logger=False, enable_checkpointing=saving, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=2,
                        num_sanity_val_steps=1, callbacks=callbacks)
        fit.fit(module, datamodule=datamodule(size=3))
        torch.save({"params": snapshot(learner), "world_size": fit.world_size,
                    "backend": str(torch.distributed.get_backend()),
                    "global_step": fit.global_step, "tasks": tasks},
                   out / f"{kind}.rank{fit.global_rank}.pt")


def _kill_main(out: Path, kinds: list[str]) -> None:
    for kind in kinds:
        folder = out / kind
        folder.mkdir()
        pid = os.fork()
        if pid == 0:  # the run that is killed: a fresh process per learner
            class Kill(L.Callback):
                def __init__(self, mark: Path) -> None:
                    self.mark = mark

                def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                    if trainer.global_step == KILL_AT:  # after step KILL_AT's checkpoint
                        self.mark.touch()
                        os.kill(os.getpid(), signal.SIGKILL)

            torch.manual_seed(0)
            learner = build(kind)
            callbacks = [every_step(folder), Kill(folder / "killed")]
            trainer(KILL_STEPS, enable_checkpointing=True, callbacks=callbacks,
                    num_sanity_val_steps=0, val_check_interval=2).fit(
                MetaLearnerModule(learner), datamodule=datamodule())
            os._exit(3)  # not reached: killed
        _, status = os.waitpid(pid, 0)
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            raise SystemExit(f"{kind}: the run was not killed (status {status})")


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_default_dtype(torch.float64)
    mode, out, *names = sys.argv[1:]
    {"ddp": _ddp_main, "kill": _kill_main}[mode](Path(out), names)
    sys.stdout.flush()
    sys.exit(0)
