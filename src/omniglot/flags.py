"""The Omniglot experiment's command line: flags, presets, their checks, and the record of
the flags that a run folder and its checkpoints keep (``run_flags``, ``flag_differences``).

``main.py`` wires these into a run; ``run_multi.py`` and ``evaluate_oneshot.py`` parse the same
flags with ``make_parser``/``parse_args``.
"""

from __future__ import annotations

import argparse
import ast
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from data import RESIZE_MODES
from episodes import CHANNELS
from metazoo import PRECISIONS
from metazoo.cli import ArgumentParser, UsageError
from metazoo.runs import flag_differences as _differences
from model import DOWNSAMPLE
from warpgrad.layers import ABLATIONS, WARP_INITS
from wrapper import HEAD_POLICIES, LearnerConfig
from wrapper import METHODS as LEARNER_METHODS

PROTOCOLS = ("alphabet", "fewshot")
# --bn_eval in few-shot terms -> the learners' bn_mode
BN_EVAL = {"transductive": "batch", "inductive": "running"}
# Flags that may differ between a run and its --resume (or --evaluate): how long it runs, how
# often it logs and saves, where and at which float32 precision it runs (a checkpoint moves
# between devices), where its files are, and --preset (its values are compared as the flags it
# set). Every other flag must equal
# the one in the run's args.log and checkpoint, or the resumed run would be another experiment.
RESUME_MAY_CHANGE = frozenset({
    "meta_train_steps", "log_ival", "write_ival", "save_ival", "threads", "workers", "device",
    "no_cuda", "precision", "preset", "resume", "overwrite", "evaluate", "root", "log_dir",
    "suffix", "trust_checkpoint"})
# Meta-optimizer and inner-optimizer hyperparameters that must be non-negative numbers.
NUMERIC_KWARGS = frozenset({"lr", "momentum", "dampening", "weight_decay", "eps", "alpha",
                            "betas", "meta_lr"})
SEED_MAX = 2**32 - 1
# --preset NAME sets these flags' defaults; flags given explicitly win. "paper": the WarpGrad
# paper's Omniglot configuration (also this command's defaults); "gpu_short": the COMP6248
# replication's budget (250 meta-steps of 5 tasks), the paper's inner loop otherwise.
# "reptile_authors": Reptile on 5-way 1-shot Omniglot as its authors' code and paper command
# ran it (openai/supervised-reptile, README: run_omniglot.py --shots 1 --inner-batch 10
# --inner-iters 5 --meta-step 1 --meta-batch 5 --meta-iters 100000 --eval-batch 5 --eval-iters
# 50 --learning-rate 0.001 --meta-step-final 0 --train-shots 10 --transductive; Adam beta1 0,
# its Adam state carried on, OmniglotModel: stride-2 convolutions, rotated classes).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"meta_batch_size": 20, "task_batch_size": 128, "task_train_steps": 100,
              "task_val_steps": 100, "meta_train_steps": 1000},
    "gpu_short": {"meta_batch_size": 5, "task_batch_size": 128, "task_train_steps": 100,
                  "task_val_steps": 100, "meta_train_steps": 250},
    "reptile_authors": {
        "meta_model": "reptile", "protocol": "fewshot", "ways": 5, "shots": 1, "queries": 1,
        "train_shots": 10, "train_queries": 1, "rotations": True, "bn_eval": "transductive",
        "downsample": "stride", "num_filters": 64, "meta_batch_size": 5,
        "meta_train_steps": 100000, "task_train_steps": 5, "inner_batch": 10,
        "task_val_steps": 50, "eval_inner_batch": 5, "inner_opt": "adam",
        "inner_kwargs": ["lr", "1e-3", "betas", "0:0.999"], "reptile_inner_state": "carry",
        "outer_opt": "sgd", "outer_kwargs": ["lr", "1.0"], "outer_lr_schedule": "linear"},
}
OUTER_LR_SCHEDULES = ("constant", "linear")
# --meta_model names that are a method of wrapper.py with its settings changed: NAME -> (the
# method, the flags' defaults it sets; flags given explicitly win). The run folder, args.log and
# the plots carry NAME, so the two settings of one method are told apart.
# "warp_leap_tuned": the setting that puts warp_leap ahead of leap in the README's ordering
# investigation (tables (d), (e)): identity warp layers, warp meta-learning rate 1.0.
METHOD_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "warp_leap_tuned": ("warp_leap", {"warp_init": "identity",
                                      "meta_kwargs": ["warp_lr", "1.0"]}),
}
METHODS = LEARNER_METHODS + tuple(METHOD_PRESETS)


def learner_method(meta_model: str) -> str:
    """The ``wrapper.py`` method a ``--meta_model`` builds (itself, or a ``METHOD_PRESETS``
    name's method)."""
    return METHOD_PRESETS[meta_model][0] if meta_model in METHOD_PRESETS else meta_model


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
           "--meta_batch_size 5 --meta_train_steps 250; reptile_authors: Reptile's 5-way "
           "1-shot Omniglot protocol as its authors ran it (--meta_model reptile --protocol "
           "fewshot --shots 1 --queries 1 --train_shots 10 --train_queries 1 --rotations "
           "--downsample stride --meta_batch_size 5 --meta_train_steps 100000 "
           "--task_train_steps 5 --inner_batch 10 --task_val_steps 50 --eval_inner_batch 5 "
           "--inner_opt adam --inner_kwargs lr 1e-3 betas 0:0.999 --reptile_inner_state carry "
           "--outer_opt sgd --outer_kwargs lr 1.0 --outer_lr_schedule linear). Flags given "
           "explicitly win")
    a("--log_dir", default="logs", help="logs go to <log_dir>/<meta_model>/<suffix>/")
    a("--suffix", default="tmp", help="run name")
    a("--overwrite", action="store_true", help="replace an existing run of the same name")
    a("--resume", action="store_true",
      help="continue a stopped run from its checkpoint, with the run's flags (only "
           "--meta_train_steps, --log_ival, --write_ival, --save_ival, --threads, --workers, "
           "--device, --no_cuda, --root, --log_dir and --suffix may differ)")
    a("--trust_checkpoint", action="store_true",
      help="--resume/--evaluate a checkpoint that does not record the flags that produced it "
           "(written by an older version), trusting that these flags are its; without it such "
           "a checkpoint is refused")
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
    a("--meta_model", default="warp_leap", choices=METHODS,
      help="the method; warp_leap_tuned is warp_leap with --warp_init identity --meta_kwargs "
           "warp_lr 1.0 (flags given explicitly win)")
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
    a("--outer_lr_schedule", choices=OUTER_LR_SCHEDULES, default="constant",
      help="the meta-optimizer's learning rate: constant (--outer_kwargs lr, default) or "
           "linear: annealed from it to 0, lr * (1 - i / --meta_train_steps) at meta-step "
           "i = 0, 1, ... (the Reptile authors' --meta-step-final 0)")
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
    a("--inner_batch", type=_pos_int, default=None,
      help="fewshot: meta-training inner steps on mini-batches of this many support images, "
           "drawn without replacement as the Reptile authors' code does (default: the whole "
           "support every step)")
    a("--eval_inner_batch", type=_pos_int, default=None,
      help="fewshot: the same for the inner steps on evaluation episodes (default: the whole "
           "support every step)")
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
    known = parser.parse_known_args(argv)[0]
    if known.preset is not None:
        parser.set_defaults(**PRESETS[known.preset])
    if known.meta_model in METHOD_PRESETS:
        parser.set_defaults(**METHOD_PRESETS[known.meta_model][1])
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
        for flag in ("inner_batch", "eval_inner_batch"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag} {getattr(args, flag)}: the alphabet protocol's "
                                 "inner batches are --task_batch_size; use --protocol fewshot "
                                 "or drop the flag")
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
        meta_model=learner_method(args.meta_model),
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


# -- the record of a run's flags ---------------------------------------------------------

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
    return _differences(stored, run_flags(args), RESUME_MAY_CHANGE)


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

