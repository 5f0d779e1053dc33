"""Omniglot meta-learning experiment (Leap, ICLR 2019; WarpGrad, ICLR 2020 protocol).

Each alphabet is a task: ``--classes``-way classification of that many of its characters, 15
drawings per character for adaptation (augmented) and 5 held out. Every method is built by
``wrapper.build_learner`` and driven through the ``metazoo.MetaLearner`` interface.

Logs (the reference's files and format) go to ``<log_dir>/<meta_model>/<suffix>/``:
``results_train_train.log`` and ``results_train_val.log`` (meta-training tasks: adaptation
curve and held-out drawings), ``results_<i>_<val|test>_<train|val>.log`` (each evaluation
task i), one line per write: ``step,meta_loss,loss,acc,loss curve;...;,acc curve;...;``.
Beside them: ``args.log``, ``split.json``, ``checkpoint.pt`` (``--resume``), ``best.pt``
(``--select best``) and ``done.json`` (final test summary).

Example (the paper's protocol needs the full archives; see README.md for the CPU preset)::

    python src/omniglot/main.py --meta_model leap --root data --suffix s1 --seed 1

``--protocol fewshot`` (``FewShotExperiment``, ``episodes.py``) is the episodic N-way K-shot
protocol of the MAML paper instead: meta-training episodes from the characters of the
meta-training alphabets (or ``--dataset folder``: ``--root/train``), a fixed seeded set of test
episodes reported as mean accuracy +- 95% CI (``results_fewshot_<case>_ci.log``,
``fewshot_test.json``). Both protocols give ``meta_train`` the same small interface
(``ExperimentLike``: ``meta_batch``, ``evaluate``, ``has_validation``), so the loop, checkpoints,
``--resume`` and torchrun are shared.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from data import RESIZE_MODES, TaskSampler, load_alphabets, make_split
from episodes import (
    CHANNELS,
    EpisodeIndices,
    EpisodeSampler,
    FewShotSplit,
    LabelledImages,
    MeanCI,
    load_image_folder,
    mean_ci,
    split_alphabets,
)
from metazoo import (
    PRECISIONS,
    MetaLearner,
    MetaStepResult,
    NonFiniteError,
    Task,
    atomic_write_text,
    distributed,
    fp32_precision,
)
from metazoo.cli import ArgumentParser, UsageError, run_command, user_input
from metazoo.serialization import load_checked, save_checked
from model import DOWNSAMPLE
from progress import estimate_lines, format_duration
from warpgrad.layers import ABLATIONS, WARP_INITS
from wrapper import HEAD_POLICIES, METHODS, LearnerConfig, build_learner, score

PROTOCOLS = ("alphabet", "fewshot")
# --bn_eval in few-shot terms -> the learners' bn_mode
BN_EVAL = {"transductive": "batch", "inductive": "running"}
LOG_LINE = re.compile(r"^(results_.*|nonfinite)\.log$")
# Every file main.py (and evaluate_oneshot.py) writes into a run folder, and the temporaries
# of their atomic writes (".<name>.<random>.tmp"): --overwrite removes these and nothing else.
RUN_FILE = re.compile(r"^(args\.log|split\.json|checkpoint\.pt|best\.pt|done\.json|"
                      r"fewshot_test\.json|oneshot\.json|nonfinite\.log|results_[^/]*\.log)$")
RUN_TEMPORARY = re.compile(r"^\.(?P<name>[^/]+)\.[A-Za-z0-9_]+\.tmp$")
# Flags that may differ between a run and its --resume (or --evaluate): how long it runs, how
# often it logs and saves, where and at which float32 precision it runs (a checkpoint moves
# between devices), where its files are, and --preset (its values are compared as the flags it
# set). Every other flag must equal
# the one in the run's args.log and checkpoint, or the resumed run would be another experiment.
RESUME_MAY_CHANGE = frozenset({
    "meta_train_steps", "log_ival", "write_ival", "save_ival", "threads", "workers", "device",
    "no_cuda", "precision", "preset", "resume", "overwrite", "evaluate", "root", "log_dir",
    "suffix"})
# Meta-optimizer and inner-optimizer hyperparameters that must be non-negative numbers.
NUMERIC_KWARGS = frozenset({"lr", "momentum", "dampening", "weight_decay", "eps", "alpha",
                            "betas", "meta_lr"})
SEED_MAX = 2**32 - 1
# --preset NAME sets these flags' defaults; flags given explicitly win. "paper": the WarpGrad
# paper's Omniglot configuration (also this command's defaults); "gpu_short": the COMP6248
# replication's budget (250 meta-steps of 5 tasks), the paper's inner loop otherwise.
PRESETS: dict[str, dict[str, int]] = {
    "paper": {"meta_batch_size": 20, "task_batch_size": 128, "task_train_steps": 100,
              "task_val_steps": 100, "meta_train_steps": 1000},
    "gpu_short": {"meta_batch_size": 5, "task_batch_size": 128, "task_train_steps": 100,
                  "task_val_steps": 100, "meta_train_steps": 250},
}


# -- flags ------------------------------------------------------------------------------------

def convert_arg(value: str) -> Any:
    """``"none"``/``"true"``/``"false"`` and numbers (``1e-3`` included) to Python values."""
    low = value.lower()
    if low == "none":
        return None
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def build_kwargs(pairs: Sequence[str], flag: str) -> dict[str, Any]:
    """``["lr", "0.1", "betas", "0.9:0.99"]`` -> ``{"lr": 0.1, "betas": (0.9, 0.99)}``."""
    if len(pairs) % 2:
        raise ValueError(f"{flag} {' '.join(pairs)!r} must be key value pairs, e.g. "
                         f"{flag} lr 0.1 momentum 0.9")
    out: dict[str, Any] = {}
    for key, value in zip(pairs[::2], pairs[1::2]):
        out[key] = (tuple(convert_arg(v) for v in value.split(":")) if ":" in value
                    else convert_arg(value))
    return out


def _nonneg_int(text: str) -> int:
    try:
        number = float(text)  # "1e3" is a valid count
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if number < 0 or not number.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} must be a non-negative integer")
    return int(number)


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer from 0 to {SEED_MAX}")
    return value


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_kwargs(kwargs: dict[str, Any], flag: str) -> None:
    """Rejects non-finite numbers anywhere, and non-numbers or negative numbers for the
    optimizers' numeric hyperparameters (``NUMERIC_KWARGS``), naming the flag and the fix."""
    for key, value in kwargs.items():
        values = value if isinstance(value, tuple) else (value,)
        text = ":".join(str(v) for v in values)
        for v in values:
            number = isinstance(v, (int, float)) and not isinstance(v, bool)
            if number and not math.isfinite(v):
                raise ValueError(f"{flag} {key} {text}: must be a finite number; a NaN or "
                                 f"infinite value makes the parameters NaN (e.g. {flag} "
                                 f"{key} 0.1)")
            if number and abs(v) > FLOAT32_MAX:  # torch cannot even apply it to float32
                raise ValueError(f"{flag} {key} {text}: too large, beyond float32's largest "
                                 f"number ({FLOAT32_MAX:.3g}) that the parameters hold (e.g. "
                                 f"{flag} {key} 0.1)")
            if key in NUMERIC_KWARGS and not number:
                raise ValueError(f"{flag} {key} {text!r}: must be a number, e.g. {flag} "
                                 f"{key} {'0.9:0.999' if key == 'betas' else '0.1'}")
            if key in NUMERIC_KWARGS and v < 0:
                raise ValueError(f"{flag} {key} {text}: must be >= 0")
            if key == "eps" and v <= 0:  # Adam/RMSprop: a zero gradient would give 0/0 = NaN
                raise ValueError(f"{flag} eps {text}: must be > 0, e.g. {flag} eps 1e-8")


def _pos_int(text: str) -> int:
    value = _nonneg_int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value


def _vectorize(text: str) -> bool | int | str:
    """``--vectorize``: off, on, auto or a chunk size (tasks per batched computation)."""
    named: dict[str, bool | str] = {"off": False, "on": True, "auto": "auto"}
    if text in named:
        return named[text]
    try:
        return _pos_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be off, on, auto or a positive number of tasks per chunk") from None


def make_parser() -> argparse.ArgumentParser:
    """The command line (the reference's flags keep their names and meaning)."""
    p = ArgumentParser("main.py", description="Omniglot meta-learning experiment")
    a = p.add_argument
    a("--root", default="data", help="folder holding the extracted Omniglot archives")
    a("--seed", type=_seed, default=8879, help="the seed: fixes the split, batches and init")
    a("--workers", type=_nonneg_int, default=0,
      help="data-loading parallelism of the reference; accepted and unused (tensors in memory)")
    a("--threads", type=_nonneg_int, default=0, help="torch CPU threads (0: torch default)")
    a("--num_pretrain", type=_nonneg_int, default=30, help="meta-training alphabets")
    a("--num_val", type=_nonneg_int, default=0, help="meta-validation alphabets")
    a("--num_test", type=_nonneg_int, default=10, help="meta-test alphabets")
    a("--classes", type=_pos_int, default=20, help="classes (characters) per task")
    a("--train_images", type=_pos_int, default=15, help="drawings per character to adapt on")
    a("--resize", choices=RESIZE_MODES, default="area",
      help="28x28 resize: area (grey, default) or nearest (the reference's binary images)")
    a("--no_augment", action="store_true", help="no affine augmentation")
    a("--meta_batch_size", type=_pos_int, default=20, help="tasks per meta-batch")
    a("--task_batch_size", type=_pos_int, default=128, help="images per inner batch")
    a("--meta_train_steps", type=_nonneg_int, default=1000, help="meta-steps")
    a("--task_train_steps", type=_pos_int, default=100, help="inner steps, meta-training")
    a("--task_val_steps", type=_pos_int, default=100, help="inner steps, evaluation tasks")
    a("--log_ival", type=_nonneg_int, default=1,
      help="meta-steps between progress lines (0: never)")
    a("--write_ival", type=_nonneg_int, default=1,
      help="meta-steps between train log lines (0: never)")
    a("--test_ival", type=_nonneg_int, default=20, help="meta-steps between validations (0: never)")
    a("--save_ival", type=_nonneg_int, default=1, help="meta-steps between checkpoints (0: never)")
    a("--no_cuda", action="store_true", help="run on the CPU even if CUDA is available")
    a("--device", type=int, default=0, help="CUDA device index")
    a("--precision", choices=PRECISIONS, default="exact",
      help="float32 on the GPU: exact (TF32 off; MAML meta-gradients of four implementations "
           "agreed to 3e-6) or tf32 (TF32 convolutions and matmuls: faster; they disagreed by "
           "1-80%%). No effect on CPUs")
    a("--preset", choices=tuple(PRESETS), default=None,
      help="paper: --meta_batch_size 20 --task_batch_size 128 --task_train_steps 100 "
           "--task_val_steps 100 --meta_train_steps 1000; gpu_short: the same with "
           "--meta_batch_size 5 --meta_train_steps 250 (flags given explicitly win)")
    a("--log_dir", default="logs", help="logs go to <log_dir>/<meta_model>/<suffix>/")
    a("--suffix", default="tmp", help="run name")
    a("--overwrite", action="store_true", help="replace an existing run of the same name")
    a("--resume", action="store_true",
      help="continue a stopped run from its checkpoint, with the run's flags (only "
           "--meta_train_steps, --log_ival, --write_ival, --save_ival, --threads, --workers, "
           "--device, --no_cuda, --root, --log_dir and --suffix may differ)")
    a("--evaluate", action="store_true", help="only evaluate the saved model on the test tasks")
    a("--select", choices=("last", "best"), default="last",
      help="model for the final test: last, or best on validation (needs --num_val, --test_ival)")
    a("--kernel_size", type=_pos_int, default=3)
    a("--padding", type=_nonneg_int, default=1)
    a("--num_layers", type=_pos_int, default=4)
    a("--num_filters", type=_pos_int, default=64)
    a("--no_batch_norm", action="store_true")
    a("--bn_mode", choices=("batch", "running"), default=None,
      help="BatchNorm statistics: batch (transductive, reference; default) or per-task running "
           "(--bn_eval says the same in few-shot terms)")
    a("--meta_model", default="warp_leap", choices=METHODS)
    a("--head_policy", default="meta", choices=HEAD_POLICIES,
      help="meta: every method meta-learns its head (default); reference: the reference "
           "code's per-method heads (see wrapper.py)")
    a("--efficient", action="store_true", help="checkpointed unrolls (MAML through 100 steps)")
    a("--channels_last", action="store_true",
      help="run warp_leap, warp_maml, maml, fomaml, anil, reptile and leap in channels-last "
           "memory format (faster on a CPU; results equal up to rounding)")
    a("--vectorize", type=_vectorize, default=False,
      help="maml, fomaml, anil, reptile, leap, imaml, warp_leap, warp_maml: run the tasks of a "
           "meta-batch as one batched computation (on), N tasks at a time (a number), or on "
           "CUDA only (auto); the same "
           "results as the per-task loop (off, default), faster on a GPU, slower on a CPU")
    a("--reptile_inner_state", choices=("reset", "carry"), default="reset",
      help="reptile: a fresh inner optimizer state per task (reset, default), or one state "
           "(Adam's moments and step count) carried across tasks and meta-steps and used, "
           "unchanged, by every evaluation task, as the Reptile authors' code does (carry; "
           "not with --vectorize)")
    a("--on_nonfinite", choices=("raise", "skip"), default="raise",
      help="a NaN/inf loss: raise (stop, naming the meta-step, task and inner step) or skip "
           "the task (counted in nonfinite.log and the progress line)")
    a("--inner_opt", default="sgd", help="sgd | adam | rmsprop")
    a("--outer_opt", default="sgd", help="sgd | adam | rmsprop")
    a("--inner_kwargs", nargs="+", default=["lr", "0.1"], help="e.g. lr 0.1 momentum 0.9")
    a("--outer_kwargs", nargs="+", default=["lr", "0.1"], help="e.g. lr 1e-3")
    a("--meta_kwargs", nargs="+", default=[], help="method options, e.g. norm false")
    a("--warp_layer", default="3x3", choices=tuple(ABLATIONS),
      help="warp block variant: none, scaling, 1x1, 3x3, 3x3+relu, 3x3+relu+bn, residual, 2-layer")
    a("--warp_num_layers", type=_pos_int, default=None, help="layers per warp block")
    a("--warp_num_filters", type=_pos_int, default=None, help="hidden width of warp blocks")
    a("--warp_act_fun", default=None, help="warp activation (None, relu, leakyrelu, tanh, ...)")
    a("--warp_residual", action="store_true", help="residual warp layers")
    a("--warp_batch_norm", action="store_true", help="BatchNorm in warp layers")
    a("--warp_final_head", action="store_true", help="linear warp layer after the head")
    a("--warp_init", choices=WARP_INITS, default="random",
      help="warp-layer initialisation: random (PyTorch's default conv init, the reference's) "
           "or identity (each linear warp layer the identity map at initialisation)")
    # few-shot protocol (episodes.py; README "Few-shot protocol")
    a("--protocol", choices=PROTOCOLS, default="alphabet",
      help="alphabet: each alphabet a task (default); fewshot: N-way K-shot episodes")
    a("--dataset", choices=("omniglot", "folder"), default="omniglot",
      help="fewshot data: Omniglot alphabets under --root, or an image folder "
           "--root/{train,val,test}/<class>/*.png|jpg|jpeg")
    a("--ways", type=_pos_int, default=5, help="fewshot: classes per episode (N)")
    a("--shots", type=_pos_int, default=1, help="fewshot: support images per class (K)")
    a("--queries", type=_pos_int, default=15, help="fewshot: query images per class (Q)")
    a("--train_shots", type=_pos_int, default=None,
      help="fewshot: support images per class in meta-training episodes (default --shots; "
           "the Reptile paper meta-trains 1-shot Omniglot with 10)")
    a("--train_queries", type=_pos_int, default=None,
      help="fewshot: query images per class in meta-training episodes (default --queries)")
    a("--test_episodes", type=_pos_int, default=600,
      help="fewshot: fixed, seeded test episodes (mean accuracy +- 95%% CI)")
    a("--val_episodes", type=_nonneg_int, default=100,
      help="fewshot: fixed, seeded validation episodes every --test_ival steps (0: none)")
    a("--rotations", action="store_true",
      help="fewshot: meta-training classes rotated by 90/180/270 degrees as new classes")
    a("--bn_eval", choices=tuple(BN_EVAL), default=None,
      help="BatchNorm at evaluation: transductive (batch statistics of the evaluated batch, "
           "= --bn_mode batch, the MAML paper's protocol; default) or inductive (per-task "
           "running statistics from the support set, = --bn_mode running)")
    a("--image_size", type=_pos_int, default=None,
      help="fewshot image height = width (default 28 for omniglot, 84 for folder)")
    a("--channels", choices=CHANNELS, default="rgb", help="folder images: rgb or grey")
    a("--norm_mean", type=float, nargs="+", default=None,
      help="fewshot normalisation (x/255 - mean) / std, one value or one per channel")
    a("--norm_std", type=float, nargs="+", default=None, help="see --norm_mean")
    a("--downsample", choices=DOWNSAMPLE, default="pool",
      help="conv blocks: pool (conv, 2x2 max-pool) or stride (stride-2 conv, the MAML net)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parses and validates the flags."""
    parser = make_parser()
    preset = parser.parse_known_args(argv)[0].preset
    if preset is not None:
        parser.set_defaults(**PRESETS[preset])
    args = parser.parse_args(argv)
    args.inner_kwargs = build_kwargs(args.inner_kwargs, "--inner_kwargs")
    args.outer_kwargs = build_kwargs(args.outer_kwargs, "--outer_kwargs")
    args.meta_kwargs = build_kwargs(args.meta_kwargs, "--meta_kwargs")
    for flag in ("--inner_kwargs", "--outer_kwargs", "--meta_kwargs"):
        check_kwargs(getattr(args, flag[2:]), flag)
    if args.select == "best" and not (args.num_val and args.test_ival):
        raise ValueError("--select best needs validation tasks: set --num_val >= 1 and "
                         "--test_ival >= 1")
    check_protocol(args)
    return args


def check_protocol(args: argparse.Namespace) -> None:
    """Resolves ``--bn_eval``/``--bn_mode`` and ``--image_size``; rejects combinations that the
    protocol has no meaning for."""
    if args.bn_eval is not None:
        mode = BN_EVAL[args.bn_eval]
        if args.bn_mode is not None and args.bn_mode != mode:
            raise ValueError(f"--bn_eval {args.bn_eval} means --bn_mode {mode}, but --bn_mode "
                             f"{args.bn_mode} was given; pass one of them")
        args.bn_mode = mode
    args.bn_mode = args.bn_mode or "batch"
    args.bn_eval = {v: k for k, v in BN_EVAL.items()}[args.bn_mode]
    if args.image_size is None:
        args.image_size = 84 if args.dataset == "folder" else 28
    if args.protocol == "alphabet":
        if args.dataset != "omniglot":
            raise ValueError(f"--dataset {args.dataset} needs --protocol fewshot (the alphabet "
                             "protocol is Omniglot's)")
        if args.image_size != 28:
            raise ValueError(f"--image_size {args.image_size}: the alphabet protocol uses the "
                             "28x28 images; drop the flag or use --protocol fewshot")
    elif args.meta_model == "ft":
        raise ValueError("--meta_model ft pretrains one head per alphabet task, which episodes "
                         "with shuffled labels do not have; use --protocol alphabet or "
                         "another --meta_model")


def in_channels(args: argparse.Namespace) -> int:
    """Input channels of the net: 3 for RGB image folders, else 1."""
    return 3 if args.protocol == "fewshot" and args.dataset == "folder" and \
        args.channels == "rgb" else 1


def learner_config(args: argparse.Namespace) -> LearnerConfig:
    """Flags -> ``wrapper.LearnerConfig``."""
    warp: dict[str, Any] = {}
    if args.warp_num_layers is not None:
        warp["num_layers"] = args.warp_num_layers
    if args.warp_num_filters is not None:
        warp["hidden_channels"] = args.warp_num_filters
    if args.warp_act_fun is not None and args.warp_act_fun.lower() != "none":
        warp["activation"] = args.warp_act_fun.lower()
    if args.warp_residual:
        warp["residual"] = True
    if args.warp_batch_norm:
        warp["batch_norm"] = True
    warp["init"] = args.warp_init
    return LearnerConfig(
        meta_model=args.meta_model,
        classes=args.ways if args.protocol == "fewshot" else args.classes,
        num_train_tasks=max(args.num_pretrain, 1), task_train_steps=args.task_train_steps,
        task_val_steps=args.task_val_steps, num_layers=args.num_layers,
        num_filters=args.num_filters, kernel_size=args.kernel_size, padding=args.padding,
        batch_norm=not args.no_batch_norm, inner_opt=args.inner_opt.lower(),
        outer_opt=args.outer_opt.lower(), inner_kwargs=args.inner_kwargs,
        outer_kwargs=args.outer_kwargs, meta_kwargs=args.meta_kwargs,
        warp_layer=args.warp_layer, warp_kwargs=warp, warp_final_head=args.warp_final_head,
        bn_mode=args.bn_mode, efficient=args.efficient, head_policy=args.head_policy,
        in_channels=in_channels(args), image_size=args.image_size, downsample=args.downsample,
        on_nonfinite=args.on_nonfinite, channels_last=args.channels_last,
        vectorize=args.vectorize, reptile_inner_state=args.reptile_inner_state)


# -- logs -------------------------------------------------------------------------------------

def auc(values: Sequence[float]) -> float:
    """The reference's area under a curve (composite trapezoidal rule over ``len`` points)."""
    n = len(values)
    return sum(((values[i] - values[i - 1]) / 2 + values[i - 1]) / n for i in range(1, n))


def write_line(path: Path, step: int, meta_loss: float, loss: float, acc: float,
               losses: Sequence[float], accs: Sequence[float]) -> None:
    """Appends one line in the reference's format."""
    curve = "".join(f"{v:f};" for v in losses)
    acc_curve = "".join(f"{v:f};" for v in accs)
    with open(path, "a") as f:
        f.write(f"{step:d},{meta_loss:f},{loss:f},{acc:f},{curve},{acc_curve}\n")


def truncate_logs(log_dir: Path, step: int, *, drop_test: bool) -> None:
    """Drops log lines written after the checkpoint at ``step`` (and all test lines)."""
    for path in sorted(log_dir.iterdir()):
        if not LOG_LINE.match(path.name):
            continue
        if drop_test and "_test_" in path.name:
            path.unlink()
            continue
        lines = path.read_text().splitlines(keepends=True)
        kept = [ln for ln in lines if ln.endswith("\n") and int(ln.split(",", 1)[0]) <= step]
        atomic_write_text("".join(kept), path)  # a kill mid-rewrite keeps the old lines


# -- state ------------------------------------------------------------------------------------

@dataclass
class RunState:
    """What a checkpoint holds besides the learner."""

    step: int
    data_generator: torch.Generator
    task_rng: random.Random
    best_acc: float = -math.inf
    best_step: int = -1

    def rng_state(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)),
                          "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                          "cached": float(np_state[4])},
                "python": list(random.getstate()[1]),
                "data": self.data_generator.get_state(),
                "tasks": list(self.task_rng.getstate()[1])}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["cached"]))
        random.setstate((3, tuple(state["python"]), None))
        self.data_generator.set_state(state["data"])
        self.task_rng.setstate((3, tuple(state["tasks"]), None))


def nonfinite_entries(state: Any, prefix: str = "") -> list[str]:
    """Names (``a.b.0``) of the floating tensors in a nested state dict that hold NaN/inf."""
    if isinstance(state, torch.Tensor):
        finite = not state.is_floating_point() or bool(torch.isfinite(state).all())
        return [] if finite else [prefix or "tensor"]
    if isinstance(state, dict):
        items: Any = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return []
    return [name for key, value in items
            for name in nonfinite_entries(value, f"{prefix}.{key}" if prefix else str(key))]


def _plain(value: Any) -> Any:
    """``value`` as numbers, strings and containers of them (anything else as its ``repr``)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


def run_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags as the checkpoint records them (what produced it)."""
    return {key: _plain(value) for key, value in vars(args).items()}


def flag_differences(stored: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """``--flag stored -> now`` for every flag outside ``RESUME_MAY_CHANGE`` that differs
    (flags the stored record does not know, from an older version, are not compared)."""
    now = run_flags(args)
    return [f"--{key} {stored[key]!r} -> {now[key]!r}" for key in sorted(stored)
            if key in now and key not in RESUME_MAY_CHANGE and stored[key] != now[key]]


def read_args_log(path: Path) -> dict[str, Any]:
    """The flags in a run's ``args.log`` (``repr`` of the parsed ``argparse.Namespace``);
    values that are not Python literals (``inf``, objects) are left out.

    Raises:
        UsageError: if the file is not such a record.
    """
    try:
        node = ast.parse(path.read_text().strip(), mode="eval").body
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id == "Namespace" and not node.args):
            raise ValueError("not a Namespace(...) record")
        flags = {}
        for keyword in node.keywords:
            try:
                if keyword.arg:
                    flags[keyword.arg] = ast.literal_eval(keyword.value)
            except ValueError:
                continue
        return flags
    except (OSError, SyntaxError, ValueError) as err:
        raise UsageError(f"{path} cannot be read ({err}), so the flags of that run are not "
                         "known; nothing was changed. Restore the file, or start again with "
                         "--overwrite or another --suffix") from None


def save_checkpoint(path: Path, learner: MetaLearner, run: RunState,
                    flags: dict[str, Any] | None = None) -> None:
    """Learner (model, meta-optimizer and any extra state), RNG states, step, the flags that
    produced it and a checksum (``metazoo.serialization.save_checked``).

    Raises:
        RuntimeError: if the learner's state is not finite (nothing is written: a checkpoint
            is only ever a state that can be resumed).
    """
    state = {"learner": learner.state_dict(), "step": run.step, "rng": run.rng_state(),
             "best_acc": run.best_acc, "best_step": run.best_step}
    if flags is not None:
        state["flags"] = flags
    bad = nonfinite_entries(state["learner"])
    if bad:
        raise RuntimeError(f"the learner's state at meta-step {run.step} is not finite in "
                           f"{bad[:5]}{' ...' if len(bad) > 5 else ''}; {path.name} was not "
                           "written. Lower --outer_kwargs lr / --inner_kwargs lr")
    save_checked(state, path)


def load_checkpoint(path: Path, learner: MetaLearner, run: RunState | None = None,
                    args: argparse.Namespace | None = None) -> int:
    """Restores a checkpoint (``weights_only=True``); returns its step.

    Everything is checked before anything changes: the checksum, finite weights and, with
    ``args``, that the flags which produced it match (``flag_differences``); then the learner
    (and ``run``) are restored. No file is touched.

    Raises:
        UsageError: a damaged or non-finite checkpoint, one written under other flags, or one
            that does not fit the learner built from these flags.
    """
    fix = ("nothing was changed. Resume with the run's flags, or start again with --overwrite "
           "or another --suffix")
    try:
        state = load_checked(path)
    except ValueError as err:
        raise UsageError(f"{err}; {fix}") from None
    bad = nonfinite_entries(state.get("learner"))
    if bad:
        raise UsageError(f"{path} holds non-finite weights ({', '.join(bad[:5])}"
                         f"{' ...' if len(bad) > 5 else ''}) and cannot be used; {fix}")
    if args is not None and "flags" in state:
        differences = flag_differences(state["flags"], args)
        if differences:
            raise UsageError(f"{path} was written by a run with other flags "
                             f"({'; '.join(differences)}); {fix}")
    try:
        learner.load_state_dict(state["learner"])
    except (KeyError, RuntimeError) as err:  # torch's missing keys / size mismatch
        raise UsageError(f"{path} does not fit the learner built from these flags "
                         f"(--meta_model {getattr(args, 'meta_model', '?')}; "
                         f"{str(err).splitlines()[0]}); {fix}") from None
    if run is not None:
        run.set_rng_state(state["rng"])
        run.step = state["step"]
        run.best_acc, run.best_step = state["best_acc"], state["best_step"]
    return int(state["step"])


def check_run_folder(log_dir: Path, args: argparse.Namespace, split_json: str | None) -> None:
    """Refuses to continue a run folder whose ``args.log`` (or ``split.json``) says it was
    another experiment than these flags give, naming the differences. Touches nothing."""
    args_log = log_dir / "args.log"
    if args_log.exists():
        differences = flag_differences(read_args_log(args_log), args)
        if differences:
            raise UsageError(f"{log_dir} is a run with other flags than these "
                             f"({'; '.join(differences)}; see its args.log); nothing was "
                             "changed. Pass the run's flags (only "
                             f"{', '.join('--' + f for f in sorted(RESUME_MAY_CHANGE))} may "
                             "change), or start a new run with another --suffix")
    split_path = log_dir / "split.json"
    if split_json is not None and split_path.exists() and \
            split_path.read_text().strip() != split_json.strip():
        raise UsageError(f"the alphabets under --root {args.root} give another split than "
                         f"{split_path} records; nothing was changed. Point --root at the "
                         "run's data")


def remove_own_temporaries(log_dir: Path) -> None:
    """Deletes what a killed run left of its atomic writes (``.<run file>.<random>.tmp``)."""
    for path in log_dir.iterdir():
        match = RUN_TEMPORARY.match(path.name)
        if match and RUN_FILE.match(match["name"]) and path.is_file():
            path.unlink()


# -- tasks and evaluation ---------------------------------------------------------------------

class Experiment:
    """Data, split and task construction for one run."""

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.notes: list[str] = []  # logged at the start of the run (which cache was used)
        images = load_alphabets(args.root, resize=args.resize, notes=self.notes)
        self.split = make_split({a: len(c) for a, c in images.items()},
                                {a: [t.shape[0] for t in c] for a, c in images.items()},
                                seed=args.seed, num_train=args.num_pretrain,
                                num_val=args.num_val, num_test=args.num_test,
                                classes=args.classes, train_images=args.train_images)
        self.sampler = TaskSampler(images, self.split, device=device,
                                   augment_images=not args.no_augment)
        self.args = args

    def task(self, name: str, steps: int, generator: torch.Generator, head: int | None = None
             ) -> Task:
        """Adaptation batches (augmented) and the held-out drawings as the query."""
        support = self.sampler.batches(name, steps=steps, batch_size=self.args.task_batch_size,
                                       generator=generator)
        query = self.sampler.held_out(name)
        if head is not None:  # multi-head pretraining: target = head * classes + label
            offset = head * self.args.classes
            support = [(x, y + offset) for x, y in support]
            query = (query[0], query[1] + offset)
        return Task(support, query)

    def eval_generator(self, case: str, index: int) -> torch.Generator:
        """The same augmented batches for task ``index`` at every evaluation, for every
        method."""
        code = {"val": 1, "test": 2}[case]
        return torch.Generator().manual_seed(self.args.seed * 1_000_003 + code * 10_007 + index)

    @property
    def has_validation(self) -> bool:
        """Whether there are validation tasks."""
        return bool(self.split.val)

    def meta_batch(self, learner: MetaLearner, run: RunState) -> list[Task]:
        """The next meta-batch: reshuffled passes over the training alphabets
        (``run.task_rng``), augmented batches from ``run.data_generator``."""
        args = self.args
        multi_head = getattr(learner, "multi_head", False)
        heads = {name: i for i, name in enumerate(self.split.train)}
        names = self.sampler.meta_batch(self.split.train, args.meta_batch_size, run.task_rng)
        return [self.task(n, args.task_train_steps, run.data_generator,
                          heads[n] if multi_head else None) for n in names]

    def evaluate(self, learner: MetaLearner, case: str, step: int, log_dir: Path | None,
                 printer: Callable[[str], None]) -> float:
        """Mean held-out accuracy over the ``case`` alphabets (module-level ``evaluate``)."""
        return evaluate(learner, self, case, step, log_dir, printer)


@dataclass(frozen=True)
class FewShotResult:
    """One few-shot evaluation (what ``main`` returns and ``fewshot_test.json`` holds).

    Attributes:
        accuracy: mean query accuracy over the episodes with its 95% confidence interval.
        loss: mean query loss.
        support_accuracy: mean accuracy on the support images after adaptation.
        episodes, ways, shots, queries: the episodes.
        bn_eval: ``"transductive"`` or ``"inductive"`` (``--bn_eval``).
        inner_steps: adaptation steps per episode.
        step: meta-step of the evaluated model.
        seconds: wall time of the evaluation.
    """

    accuracy: MeanCI
    loss: float
    support_accuracy: float
    episodes: int
    ways: int
    shots: int
    queries: int
    bn_eval: str
    inner_steps: int
    step: int
    seconds: float


class FewShotExperiment:
    """The few-shot protocol: N-way K-shot episodes for meta-training and evaluation.

    Meta-training classes are every character of the meta-training alphabets (Omniglot; the
    seeded alphabet split of the alphabet protocol, ``episodes.split_alphabets``) or the classes
    of ``root/train`` (image folder), optionally with rotated copies (``--rotations``); each
    meta-batch draws ``--meta_batch_size`` episodes from ``run.data_generator``. Validation
    and test episodes are drawn once from generators seeded by ``--seed`` and the case alone,
    so every evaluation and every method sees the same episodes.
    """

    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.notes: list[str] = []
        data: dict[str, LabelledImages] = {}
        if args.dataset == "omniglot":
            images = load_alphabets(args.root, resize=args.resize, notes=self.notes)
            train, val, test = split_alphabets(list(images), seed=args.seed,
                                               num_train=args.num_pretrain,
                                               num_val=args.num_val, num_test=args.num_test)
            for role, names in (("train", train), ("val", val), ("test", test)):
                if names:
                    data[role] = LabelledImages.from_alphabets(images, names).resized(
                        args.image_size)
            seed: int | None = args.seed
        else:
            root = Path(args.root)
            train, val, test = ["train"], ["val"] if (root / "val").is_dir() else [], ["test"]
            for role in ("train", *val, "test"):
                data[role] = load_image_folder(root, role, image_size=args.image_size,
                                               channels=args.channels, notes=self.notes)
            seed = None
        for role in ("train", "test"):
            if role not in data:
                raise ValueError(f"the few-shot protocol needs {role} classes; set "
                                 f"--{'num_pretrain' if role == 'train' else 'num_test'} >= 1")
        self.split = FewShotSplit(seed, tuple(train), tuple(val), tuple(test),
                                  {role: d.num_classes for role, d in data.items()})
        self.samplers: dict[str, EpisodeSampler] = {}
        for role, d in data.items():
            training = role == "train"
            shots = args.train_shots if training and args.train_shots else args.shots
            queries = args.train_queries if training and args.train_queries else args.queries
            try:
                self.samplers[role] = EpisodeSampler(
                    d, ways=args.ways, shots=shots, queries=queries,
                    rotations=args.rotations and training, device=device,
                    mean=args.norm_mean, std=args.norm_std, exclude_small=True)
            except ValueError as err:
                raise ValueError(f"{role} classes ({', '.join(getattr(self.split, role))}): "
                                 f"{err}") from None
            for name, count in self.samplers[role].excluded.items():
                self.notes.append(f"{role} class {name!r} left out: {count} images < shots + "
                                  f"queries = {shots + queries}")
        self.indices: dict[str, EpisodeIndices] = {}
        for code, (case, count) in enumerate((("val", args.val_episodes),
                                              ("test", args.test_episodes)), start=1):
            if case in self.samplers and count:
                gen = torch.Generator().manual_seed(args.seed * 1_000_003 + code * 10_007)
                self.indices[case] = self.samplers[case].draw(count, gen)
        self.results: dict[str, FewShotResult] = {}

    @property
    def has_validation(self) -> bool:
        """Whether there are validation episodes."""
        return "val" in self.indices

    def meta_batch(self, learner: MetaLearner, run: RunState) -> list[Task]:
        """``--meta_batch_size`` training episodes drawn from ``run.data_generator``."""
        del learner
        return self.samplers["train"].sample(self.args.meta_batch_size, run.data_generator)

    def evaluate(self, learner: MetaLearner, case: str, step: int, log_dir: Path | None,
                 printer: Callable[[str], None]) -> float:
        """Adapts to each fixed ``case`` episode and scores its query; logs the mean accuracy
        with its 95% CI; returns the mean accuracy (the full result in ``results[case]``).

        Logs: ``results_0_<case>_train.log`` and ``results_0_<case>_val.log`` hold the episodes'
        means in the reference format (the episode set read as one task by ``monitor``), and
        ``results_fewshot_<case>_ci.log`` one line per evaluation:
        ``step,mean_acc,ci95,std,episodes,mean_loss,bn_eval``.
        """
        args, sampler, indices = self.args, self.samplers[case], self.indices[case]
        steps = args.task_val_steps
        start = time.perf_counter()
        losses, accs, support_accs, curves = [], [], [], []
        for i in range(len(indices)):
            task = sampler.task(indices, i)
            adapted = learner.adapt(task, steps=steps)
            support_accs.append(score(learner, adapted, task.support[0])[1])
            loss, acc = score(learner, adapted, task.query)
            losses.append(loss)
            accs.append(acc)
            curves.append(adapted.inner_losses)
        ci = mean_ci(accs)
        loss = sum(losses) / len(losses)
        support_acc = sum(support_accs) / len(support_accs)
        curve = [sum(c) / len(c) for c in zip(*curves)]
        result = FewShotResult(ci, loss, support_acc, ci.n, args.ways, args.shots, args.queries,
                               args.bn_eval, steps, step, time.perf_counter() - start)
        self.results[case] = result
        if log_dir is not None:
            write_line(log_dir / f"results_0_{case}_train.log", step, auc(curve),
                       sum(curve) / max(len(curve), 1), support_acc, curve, [support_acc])
            write_line(log_dir / f"results_0_{case}_val.log", step, loss, loss, ci.mean, [loss],
                       [ci.mean])
            with open(log_dir / f"results_fewshot_{case}_ci.log", "a") as f:
                f.write(f"{step:d},{ci.mean:f},{ci.ci95:f},{ci.std:f},{ci.n:d},{loss:f},"
                        f"{args.bn_eval}\n")
        printer(f"[{case} step {step}] {args.ways}-way {args.shots}-shot acc {ci.mean:.4f} "
                f"+- {ci.ci95:.4f} (95% CI, {ci.n} episodes, BN {args.bn_eval}, {steps} inner "
                f"steps) loss {loss:.4f} support acc {support_acc:.3f} "
                f"{result.seconds:.1f}s")
        return ci.mean


class ExperimentLike(Protocol):
    """What ``meta_train`` and ``_run`` need from a protocol (``Experiment``: alphabets as
    tasks; ``FewShotExperiment``: episodes)."""

    args: argparse.Namespace

    @property
    def has_validation(self) -> bool: ...

    def meta_batch(self, learner: MetaLearner, run: RunState) -> list[Task]: ...

    def evaluate(self, learner: MetaLearner, case: str, step: int, log_dir: Path | None,
                 printer: Callable[[str], None]) -> float: ...


def make_experiment(args: argparse.Namespace, device: torch.device
                    ) -> Experiment | FewShotExperiment:
    """The ``--protocol``'s experiment."""
    if args.protocol == "fewshot":
        return FewShotExperiment(args, device)
    return Experiment(args, device)


def evaluate(learner: MetaLearner, exp: Experiment, case: str, step: int, log_dir: Path | None,
             printer: Callable[[str], None]) -> float:
    """Adapts to every ``case`` task and writes its two log files; returns mean held-out acc."""
    names = exp.split.val if case == "val" else exp.split.test
    accs = []
    steps = exp.args.task_val_steps
    for i, name in enumerate(names):
        start = time.perf_counter()
        task = exp.task(name, steps, exp.eval_generator(case, i))
        adapted = learner.adapt(task, steps=steps)
        _, train_acc = score(learner, adapted, exp.sampler.train_images(name))
        held_loss, held_acc = score(learner, adapted, task.query)
        accs.append(held_acc)
        curve = adapted.inner_losses
        if log_dir is not None:
            write_line(log_dir / f"results_{i}_{case}_train.log", step, auc(curve),
                       sum(curve) / len(curve), train_acc, curve, [train_acc])
            write_line(log_dir / f"results_{i}_{case}_val.log", step, held_loss, held_loss,
                       held_acc, [held_loss], [held_acc])
        printer(f"[{case} task {i} {name}] {time.perf_counter() - start:.1f}s inner "
                f"{curve[0]:.3f}->{curve[-1]:.3f} train acc {train_acc:.3f} held-out loss "
                f"{held_loss:.3f} acc {held_acc:.3f}")
    mean = sum(accs) / len(accs) if accs else float("nan")
    printer(f"[{case} step {step}] mean held-out acc {mean:.4f} over {len(accs)} tasks")
    return mean


def meta_train(learner: MetaLearner, exp: ExperimentLike, run: RunState, log_dir: Path,
               printer: Callable[[str], None]) -> None:
    """The meta-training loop: one meta-step per iteration, logs, validation, checkpoints.

    Under torchrun every process draws the same meta-batch from the seed (so a run equals the
    single-process one) and adapts its shard of it; the meta-gradients are averaged over all
    tasks by one all-reduce, and only the main process validates, logs and checkpoints.
    """
    args = exp.args
    main_process = distributed.is_main_process()
    start, first = time.perf_counter(), run.step
    while run.step < args.meta_train_steps:
        tasks = exp.meta_batch(learner, run)  # the protocol's tasks (the same on every rank)
        try:
            result: MetaStepResult = distributed.meta_step(learner, distributed.shard(tasks))
        except NonFiniteError as err:  # the meta-parameters were not updated
            raise err.with_meta_step(run.step + 1) from None
        run.step += 1
        if result.skipped_tasks < result.num_tasks and not math.isfinite(result.meta_loss):
            raise RuntimeError(f"meta_loss is {result.meta_loss} at step {run.step}; lower "
                               "--outer_kwargs lr or --inner_kwargs lr")
        if not main_process:
            continue
        if result.skipped_tasks:
            with open(log_dir / "nonfinite.log", "a") as f:
                f.write(f"{run.step:d},{result.skipped_tasks:d},{result.num_tasks:d}\n")
            printer(f"[step {run.step}] skipped {result.skipped_tasks} of {result.num_tasks} "
                    "tasks with a non-finite loss (--on_nonfinite skip)")
        if args.write_ival and run.step % args.write_ival == 0:
            curve = result.inner_losses
            acc = float("nan") if result.accuracy is None else result.accuracy
            write_line(log_dir / "results_train_train.log", run.step, auc(curve),
                       sum(curve) / max(len(curve), 1), float("nan"), curve, [])
            write_line(log_dir / "results_train_val.log", run.step, result.meta_loss,
                       result.meta_loss, acc, [result.meta_loss], [acc])
        if args.test_ival and run.step % args.test_ival == 0 and exp.has_validation:
            acc = exp.evaluate(learner, "val", run.step, log_dir, printer)
            if acc > run.best_acc:
                run.best_acc, run.best_step = acc, run.step
                if args.select == "best":
                    save_checkpoint(log_dir / "best.pt", learner, run, run_flags(args))
        if args.save_ival and (run.step % args.save_ival == 0
                               or run.step == args.meta_train_steps):
            save_checkpoint(log_dir / "checkpoint.pt", learner, run, run_flags(args))
        rate = (time.perf_counter() - start) / (run.step - first)
        if run.step == first + 1 < args.meta_train_steps:  # warn before hours are spent
            param = next(learner.meta_parameters(), None)
            estimate, *warning = estimate_lines(rate, args.meta_train_steps - first,
                                                param is None or param.device.type == "cpu")
            printer(estimate)
            for line in warning:  # shown even with --log_ival 0
                print(line, file=sys.stderr, flush=True)
        if args.log_ival and run.step % args.log_ival == 0:
            eta = rate * (args.meta_train_steps - run.step)
            acc_text = "nan" if result.accuracy is None else f"{result.accuracy:.3f}"
            printer(f"[step {run.step}/{args.meta_train_steps}] meta_loss "
                    f"{result.meta_loss:.4f} inner {result.inner_loss:.4f} acc {acc_text} | "
                    f"{rate:.2f} s/step, eta {format_duration(eta)}")


# -- entry point ------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> float | FewShotResult:
    """Runs the experiment; returns the mean held-out test accuracy (alphabet protocol) or the
    ``FewShotResult`` of the test episodes (``--protocol fewshot``; ``nan`` on ranks > 0).

    Launched by ``torchrun --nproc_per_node N``, the processes share each meta-step (gloo on
    CPU, NCCL on CUDA with one GPU per local rank); a plain ``python`` run needs no setup.
    """
    with user_input():
        args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = torch.cuda.is_available() and not args.no_cuda
    device = torch.device(f"cuda:{args.device}" if use_cuda else "cpu")
    context = distributed.setup(device=None if use_cuda else "cpu")
    if context.world_size > 1:
        device = context.device
    try:
        if context.world_size > 1 and args.reptile_inner_state == "carry":
            # Each process would carry its own state on its own tasks; rank 0 saves only its own.
            raise UsageError(f"--reptile_inner_state carry runs a meta-batch's tasks one after "
                             f"another in one process, not across {context.world_size} "
                             f"processes; run it without torchrun, or use reset")
        with fp32_precision(args.precision):
            result = _run(args, device, distributed.is_main_process())
        # The other ranks wait for rank 0's final evaluation: a rank that tears its process
        # group down while a peer still holds connections aborts in gloo.
        distributed.barrier()
        return result
    finally:
        distributed.teardown()


def _test(exp: Experiment | FewShotExperiment, learner: MetaLearner, step: int, log_dir: Path,
          printer: Callable[[str], None]) -> float | FewShotResult:
    """The final test; the few-shot result also goes to ``fewshot_test.json``."""
    acc = exp.evaluate(learner, "test", step, log_dir, printer)
    if not isinstance(exp, FewShotExperiment):
        return acc
    result = exp.results["test"]
    args = exp.args
    record = {"meta_model": args.meta_model, "seed": args.seed, "dataset": args.dataset,
              "rotations": args.rotations, "downsample": args.downsample,
              "train_shots": args.train_shots or args.shots,
              "train_queries": args.train_queries or args.queries, **asdict(result)}
    atomic_write_text(json.dumps(record, indent=1, sort_keys=True) + "\n",
                      log_dir / "fewshot_test.json")
    return result


def _run(args: argparse.Namespace, device: torch.device, main_process: bool
         ) -> float | FewShotResult:
    log_dir = Path(args.log_dir) / args.meta_model / args.suffix

    def printer(msg: str) -> None:
        if args.log_ival and main_process:
            print(msg, flush=True)

    torch.manual_seed(args.seed)
    np.random.seed(args.seed % 2**32)
    random.seed(args.seed)
    # Set-up depends on the flags alone: a ValueError here is bad input, later it is a bug.
    with user_input():
        # The data stays out of the default-device block: its index bookkeeping (episode
        # offsets and counts) lives on the CPU, where the sampling generators draw.
        exp = make_experiment(args, device)
        with device:  # every parameter (warp copies included) is made on the device
            learner = build_learner(learner_config(args))
    ckpt = log_dir / "checkpoint.pt"

    if args.evaluate:
        source = log_dir / ("best.pt" if args.select == "best" else "checkpoint.pt")
        if not source.exists():
            raise UsageError(f"--evaluate needs a saved model at {source}; train first")
        check_run_folder(log_dir, args, None)
        step = load_checkpoint(source, learner, args=args)
        for path in log_dir.glob("results_*_test_*.log"):  # replaced; training logs are kept
            path.unlink()
        return _test(exp, learner, step, log_dir, printer)

    run = RunState(0, torch.Generator().manual_seed(args.seed), random.Random(args.seed))
    if args.resume and ckpt.exists():
        # Validated (flags, split, checksum, finite weights) and loaded before any file is
        # touched: a refused resume leaves a finished run's results as they were.
        check_run_folder(log_dir, args, exp.split.to_json())
        load_checkpoint(ckpt, learner, run, args)
        if main_process:
            remove_own_temporaries(log_dir)
            truncate_logs(log_dir, run.step, drop_test=True)
            (log_dir / "done.json").unlink(missing_ok=True)
        printer(f"resumed {log_dir} at step {run.step}")
    elif main_process:
        if log_dir.exists() and any(log_dir.iterdir()):
            if args.resume and not args.overwrite:
                raise UsageError(f"--resume: {log_dir} has no checkpoint.pt to continue from "
                                 "(a run with --save_ival 0, or not a run folder); nothing was "
                                 "changed. Pass --overwrite to start that run again (it "
                                 "replaces the run's files), or another --suffix")
            if not args.overwrite:
                raise UsageError(f"{log_dir} exists; pass --overwrite to replace it, "
                                   "--resume to continue it, or another --suffix")
            for path in log_dir.iterdir():  # the run's own files; anything else stays
                match = RUN_TEMPORARY.match(path.name)
                if path.is_file() and (RUN_FILE.match(path.name)
                                       or (match and RUN_FILE.match(match["name"]))):
                    path.unlink()
        log_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(repr(args) + "\n", log_dir / "args.log")
        atomic_write_text(exp.split.to_json() + "\n", log_dir / "split.json")
        printer(f"split: train {list(exp.split.train)} val {list(exp.split.val)} test "
                f"{list(exp.split.test)}")
        for note in getattr(exp, "notes", ()):
            printer(note)
        if args.test_ival and exp.has_validation:
            acc = exp.evaluate(learner, "val", 0, log_dir, printer)
            run.best_acc, run.best_step = acc, 0
            if args.select == "best":
                save_checkpoint(log_dir / "best.pt", learner, run, run_flags(args))
        if args.save_ival:
            save_checkpoint(ckpt, learner, run, run_flags(args))

    if getattr(learner, "meta_learns", True):
        distributed.broadcast_learner(learner)
        meta_train(learner, exp, run, log_dir, printer)
        if not main_process:
            return float("nan")
    else:
        printer(f"{args.meta_model}: no meta-training")
    if args.select == "best" and (log_dir / "best.pt").exists():
        load_checkpoint(log_dir / "best.pt", learner, args=args)
        printer(f"testing the best model on validation (step {run.best_step})")
    bad = nonfinite_entries(learner.state_dict())
    if bad:  # never a test accuracy of NaN weights in done.json
        raise RuntimeError(f"the learner's state after meta-step {run.step} is not finite in "
                           f"{bad[:5]}; not tested. Lower --outer_kwargs lr / --inner_kwargs lr")
    result = _test(exp, learner, run.step, log_dir, printer)
    acc = result.accuracy.mean if isinstance(result, FewShotResult) else result
    summary = {"meta_model": args.meta_model, "seed": args.seed, "step": run.step,
               "test_acc": acc, "best_step": run.best_step}
    atomic_write_text(json.dumps(summary, sort_keys=True) + "\n", log_dir / "done.json")
    return result


if __name__ == "__main__":
    run_command(main)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun, gloo's worker threads can still hold tensors while the interpreter
        # finalises, which aborts a process that finished cleanly ("terminate called without
        # an active exception", pytorch/pytorch#190489). Logs and checkpoints are written and
        # the process group is destroyed by now, so leave without finalising.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
