"""Omniglot meta-learning through PyTorch Lightning: ``main.py``'s experiment on a ``Trainer``.

The same flags as ``main.py`` where they overlap (the protocol, data, network, learner and its
optimizers, ``--seed``, ``--meta_train_steps``, ``--test_ival``, ``--save_ival``, ...), the same
learner (``wrapper.build_learner``), the same meta-batches, validation and test tasks
(``lightning_data.OmniglotDataModule``, ``main.py``'s own samplers): with the same flags, the
meta-parameters and the test accuracy equal ``main.py``'s. Training runs in
``metazoo.lightning.MetaLearnerModule``; Lightning owns the loop, logging, checkpoints and the
processes. Lightning-only flags: ``--devices``, ``--accelerator``, ``--strategy``, ``--logger``
and ``--ckpt_path``.

Example (few-shot MAML, 5-way 1-shot, a few CPU seconds on the real archives in ``data/``)::

    python src/omniglot/lightning_main.py --protocol fewshot --meta_model maml --root data \\
        --num_pretrain 4 --num_val 1 --num_test 2 --ways 5 --shots 1 --queries 5 \\
        --meta_batch_size 4 --meta_train_steps 20 --task_train_steps 1 --task_val_steps 3 \\
        --num_filters 16 --test_episodes 100 --val_episodes 20 --test_ival 10 --no_cuda

Logs and checkpoints go to ``<log_dir>/lightning/<meta_model>/<suffix>/`` (Lightning's layout);
the test result is printed and written to ``fewshot_test.json``/``done.json`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

import main
from lightning_data import OmniglotDataModule
from metazoo import atomic_write_text, fp32_precision
from metazoo.cli import UsageError, run_command, user_input
from metazoo.lightning import MetaLearnerModule
from metazoo.runs import path_inside
from wrapper import build_learner

LOGGERS = ("csv", "tensorboard", "wandb", "none")
# main.py flags that Lightning replaces: resume with --ckpt_path last, select the best model
# with a ModelCheckpoint(monitor="val/accuracy") of your own.
NOT_HERE = {"resume": "--ckpt_path last", "evaluate": "trainer.test(ckpt_path=...)",
            "overwrite": "another --suffix (Lightning adds version folders)"}


def make_parser() -> argparse.ArgumentParser:
    """Lightning's own flags; every other flag is ``main.py``'s."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--devices", type=int, default=1, help="processes (one per device)")
    p.add_argument("--accelerator", choices=("cpu", "gpu", "auto"), default=None,
                   help="default: cpu with --no_cuda, else auto")
    p.add_argument("--strategy", default="auto",
                   help="auto, ddp (gloo on CPUs, nccl on GPUs), ddp_spawn, ...")
    p.add_argument("--logger", choices=LOGGERS, default="csv",
                   help="csv, tensorboard, wandb (offline: WANDB_MODE=offline) or none")
    p.add_argument("--ckpt_path", default=None,
                   help="resume from this Lightning checkpoint ('last': the run's last.ckpt)")
    return p


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(Lightning's flags, ``main.py``'s flags)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(make_parser().format_help().replace("usage: ", "Lightning flags: ", 1))
    own, rest = make_parser().parse_known_args(argv)
    args = main.parse_args(rest)
    for flag, instead in NOT_HERE.items():
        if getattr(args, flag):
            raise UsageError(f"--{flag} is main.py's; through Lightning use {instead}")
    if args.select == "best":
        raise UsageError("--select best is main.py's; through Lightning add a "
                         "ModelCheckpoint(monitor='val/accuracy', mode='max') and test its "
                         "best_model_path")
    if own.devices < 1:
        raise UsageError(f"--devices {own.devices}: give at least 1")
    return own, args


def make_logger(kind: str, folder: Path) -> Any:
    """The ``--logger``'s Lightning logger writing under ``folder/logs/version_<n>`` (a resumed
    run logs into a new version folder; earlier ones are kept)."""
    from lightning.pytorch import loggers

    if kind == "csv":
        return loggers.CSVLogger(folder, name="logs")
    if kind == "tensorboard":
        return loggers.TensorBoardLogger(folder, name="logs")
    if kind == "wandb":  # WANDB_MODE=offline writes to folder/wandb; `wandb sync` uploads
        return loggers.WandbLogger(save_dir=folder, project="metazoo-omniglot")
    return False


def main_lightning(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Runs the experiment through Lightning; returns the test metrics (``test/accuracy``,
    ``test/loss``) and the number of meta-steps."""
    with user_input():
        own, args = parse_args(argv)
        # main.py's meta_train and few-shot evaluation run these; Lightning's loop does not
        for flag, default in (("outer_lr_schedule", "constant"), ("eval_inner_batch", None)):
            if getattr(args, flag) != default:
                raise UsageError(f"--{flag} {getattr(args, flag)} (set by --preset "
                                 f"reptile_authors too): lightning_main.py does not run it; "
                                 f"use main.py, or drop the flag")
    if args.threads:
        torch.set_num_threads(args.threads)
    accelerator = own.accelerator or ("cpu" if args.no_cuda else "auto")
    # --suffix stays inside --log_dir (docs/runs.md); Lightning owns the folder's layout
    folder = path_inside(Path(args.log_dir) / "lightning", args.meta_model, args.suffix,
                         flags=("--meta_model", "--suffix"))
    # main.py's seeding, then its experiment and learner, built on the CPU (Lightning moves
    # the module to each process's device).
    torch.manual_seed(args.seed)
    np.random.seed(args.seed % 2**32)
    random.seed(args.seed)
    with user_input():
        exp = main.make_experiment(args, torch.device("cpu"))
        learner = build_learner(main.learner_config(args))
    if not getattr(learner, "meta_learns", True):
        raise UsageError(f"--meta_model {args.meta_model} does not meta-learn; run main.py")
    data = OmniglotDataModule(exp, learner, args)
    module = MetaLearnerModule(learner, eval_inner_steps=args.task_val_steps)
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = []
    if args.save_ival:
        callbacks.append(ModelCheckpoint(dirpath=folder / "checkpoints", save_last=True,
                                         every_n_train_steps=args.save_ival, save_top_k=0))
    validate = bool(args.test_ival and exp.has_validation)
    trainer = L.Trainer(
        max_steps=args.meta_train_steps, accelerator=accelerator, devices=own.devices,
        strategy=own.strategy, logger=make_logger(own.logger, folder), callbacks=callbacks,
        enable_checkpointing=bool(args.save_ival), default_root_dir=folder,
        log_every_n_steps=max(args.write_ival, 1), enable_progress_bar=args.log_ival > 0,
        enable_model_summary=False, num_sanity_val_steps=0,
        val_check_interval=args.test_ival if validate else None,
        limit_val_batches=None if validate else 0, check_val_every_n_epoch=None)
    ckpt = own.ckpt_path
    if ckpt == "last":
        ckpt = str(folder / "checkpoints" / "last.ckpt")
    with fp32_precision(args.precision), warnings.catch_warnings():
        # ModelCheckpoint(every_n_train_steps) warns that under manual optimization it saves
        # the state after the optimizer step: the state a resume needs.
        warnings.filterwarnings("ignore", "Using ModelCheckpoint with manual optimization")
        trainer.fit(module, datamodule=data, ckpt_path=ckpt)
        (metrics,) = trainer.test(module, datamodule=data, verbose=False)
    result = {"test/accuracy": metrics.get("test/accuracy", float("nan")),
              "test/loss": metrics["test/loss"], "step": trainer.global_step}
    if trainer.is_global_zero:
        folder.mkdir(parents=True, exist_ok=True)
        record = {"meta_model": args.meta_model, "seed": args.seed, "protocol": args.protocol,
                  **result}
        atomic_write_text(json.dumps(record, indent=1, sort_keys=True) + "\n",
                          folder / "done.json")
        if args.log_ival:
            print(f"[test step {trainer.global_step}] acc {result['test/accuracy']:.4f} "
                  f"loss {result['test/loss']:.4f} over {data.test_meta_batches} meta-batches "
                  f"({folder})", flush=True)
    return result


if __name__ == "__main__":
    run_command(main_lightning)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()  # as main.py under torchrun: gloo may abort a finished process
        sys.stderr.flush()
        os._exit(0)
