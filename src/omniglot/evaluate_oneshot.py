"""Scores a meta-trained Omniglot model on Lake et al.'s official one-shot benchmark.

Pass the flags the model was trained with (``main.py``'s: ``--meta_model``, ``--log_dir``,
``--suffix``, the network and inner-loop flags, ``--bn_mode``, ``--resize``, ...) plus:

``--runs DIR``            the extracted ``all_runs.zip`` (default ``<--root>_oneshot``, beside
                          ``--root``, where ``make_omniglot.sh -d`` puts it)
``--oneshot_head MODE``   ``checkpoint`` (default): use the meta-trained head, which must be
                          20-way; ``zero``: rebuild the learner with a 20-way head, load every
                          other parameter from the checkpoint and start the head at zero (every
                          class equal before adaptation), for models meta-trained N-way

The model is ``<log_dir>/<meta_model>/<suffix>/checkpoint.pt`` (``best.pt`` with
``--select best``). Each run adapts for ``--task_val_steps`` inner steps on its 20 training
drawings; BatchNorm follows ``--bn_mode`` (``batch``: transductive, ``running``: inductive).
The command prints the error rate per run and overall and writes ``oneshot.json`` beside the
logs. See ``oneshot.py`` for the protocol.

Example::

    python src/omniglot/evaluate_oneshot.py --meta_model maml --root data --suffix s1 \\
        --task_val_steps 10 --oneshot_head zero
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import main
from metazoo import MetaLearner, fp32_precision
from metazoo.cli import ArgumentParser, UsageError, run_command, user_input
from metazoo.serialization import load_checked
from oneshot import OneShotResult, evaluate_oneshot, load_runs
from wrapper import RandomHead, build_learner, scoring_model

__all__ = ["HEAD_MODES", "ZERO_HEAD_METHODS", "LoadedModel", "default_runs_folder",
           "load_model", "main_oneshot", "make_parser", "parse_args"]

HEAD_MODES = ("checkpoint", "zero")
RUNS_DEFAULT = "<--root>_oneshot"
# Learners whose state dict is {"model": OmniConv state, "meta_optimizer", ["inner_lr"]} and
# whose adaptation starts from the model's own parameters: their head can be replaced.
ZERO_HEAD_METHODS = ("maml", "fomaml", "reptile", "leap", "anil", "imaml")


def _add_own(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--runs", default=RUNS_DEFAULT,
                   help="folder holding run01 ... run20 (or all_runs/); the default is where "
                        "make_omniglot.sh -d puts them, beside --root")
    p.add_argument("--oneshot_head", choices=HEAD_MODES, default="checkpoint",
                   help="checkpoint: the meta-trained head (must be 20-way); zero: a 20-way head "
                        "started at zero, every other parameter from the checkpoint")
    return p


def make_parser() -> argparse.ArgumentParser:
    """``main.py``'s flags plus ``--runs`` and ``--oneshot_head`` (for ``--help``)."""
    p = _add_own(main.make_parser())
    p.prog = "evaluate_oneshot.py"
    p.description = "Lake et al. (2015) one-shot benchmark of a trained model"
    return p


def parse_args(argv: Sequence[str] | None = None
               ) -> tuple[argparse.Namespace, argparse.Namespace]:
    """``(main.py's parsed flags, this command's flags)``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    make_parser().parse_args(argv)  # validates every flag together (and handles --help)
    own, rest = _add_own(ArgumentParser(add_help=False, allow_abbrev=False)
                         ).parse_known_args(argv)
    return main.parse_args(rest), own


@dataclass(frozen=True)
class LoadedModel:
    """A learner ready for the benchmark.

    Attributes:
        learner: the learner with the checkpoint's parameters.
        checkpoint: the file read.
        step: the meta-step it was saved at.
        trained_ways: output width of the checkpoint's head.
        head: ``"checkpoint"`` or ``"zero"``.
    """

    learner: MetaLearner
    checkpoint: Path
    step: int
    trained_ways: int
    head: str


def default_runs_folder(root: str | Path) -> Path:
    """Where ``make_omniglot.sh -d --root ROOT`` extracts the benchmark: ``ROOT_oneshot``,
    beside ``ROOT`` (``data.find_alphabets`` walks all of ``ROOT`` and would take each ``runNN``
    for an alphabet)."""
    text = str(root)
    return Path((text[:-1] if text.endswith("/") and len(text) > 1 else text) + "_oneshot")


def _head(learner: MetaLearner) -> nn.Linear:
    head = getattr(scoring_model(learner), "head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(learner).__name__}'s model has no linear .head; the one-shot "
                         f"benchmark needs a classifier whose width can be checked")
    return head


def _ways_flag(args: argparse.Namespace) -> str:
    return "--ways" if args.protocol == "fewshot" else "--classes"


def _body_state(learner: MetaLearner, saved: Mapping[str, Any], source: Path
                ) -> dict[str, Any]:
    """``saved`` (a learner state dict) with the head replaced by zeros of this learner's
    width and the meta-optimizer state replaced by this learner's (evaluation never steps
    it)."""
    fresh = learner.state_dict()
    missing = sorted({"model", "meta_optimizer"} - set(saved))
    if missing:
        raise ValueError(f"{source} lacks {missing}: not a checkpoint of a learner whose head "
                         f"can be replaced ({', '.join(ZERO_HEAD_METHODS)})")
    model = {k: v for k, v in saved["model"].items() if not k.startswith("head.")}
    model.update({k: torch.zeros_like(v) for k, v in fresh["model"].items()
                  if k.startswith("head.")})
    state = {**saved, "model": model, "meta_optimizer": fresh["meta_optimizer"]}
    if "inner_lr" in saved:  # MAML's learned inner learning rates
        rates = []
        for mine, theirs in zip(fresh["inner_lr"], saved["inner_lr"], strict=False):
            step_rates = {}
            for name, rate in theirs.items():
                if name in mine and rate.shape != mine[name].shape:
                    raise ValueError(f"{source} has per-element learned inner learning rates "
                                     f"for {name} of shape {tuple(rate.shape)}; a "
                                     f"{tuple(mine[name].shape)} head cannot use them. Use "
                                     f"--oneshot_head checkpoint with a 20-way model, or learn "
                                     f"per_tensor rates")
                step_rates[name] = rate
            rates.append(step_rates)
        state["inner_lr"] = rates
    return state


def load_model(args: argparse.Namespace, *, head: str = "checkpoint", ways: int = 20,
               device: torch.device | str = "cpu") -> LoadedModel:
    """Builds the learner from ``main.py``'s flags and loads the trained model.

    Args:
        args: ``main.parse_args`` output (the flags the model was trained with).
        head: ``"checkpoint"`` (the meta-trained head; it must have ``ways`` outputs) or
            ``"zero"`` (a ``ways``-wide head started at zero, everything else loaded).
        ways: classes per benchmark run.
        device: where the learner lives.

    Raises:
        UsageError: if there is no checkpoint.
        ValueError: for a head of the wrong width without ``head="zero"``, ``"zero"`` with
            a method whose head cannot be replaced, a damaged or non-finite checkpoint, or one
            of another ``--meta_model``.
    """
    if head not in HEAD_MODES:
        raise ValueError(f"head={head!r} must be one of {HEAD_MODES}")
    log_dir = Path(args.log_dir) / args.meta_model / args.suffix
    source = log_dir / ("best.pt" if args.select == "best" else "checkpoint.pt")
    if not source.exists():
        raise UsageError(f"no trained model at {source}; train it with main.py and the same "
                           f"--meta_model/--log_dir/--suffix (and --save_ival >= 1), or pick "
                           f"another with --select")
    cfg = main.learner_config(args)
    device = torch.device(device)
    with device:
        learner = build_learner(cfg)
    trained = _head(learner).out_features
    if head == "checkpoint":
        if trained != ways:
            raise ValueError(
                f"the model was meta-trained {trained}-way (its head has {trained} outputs, "
                f"{_ways_flag(args)} {trained}) but the one-shot benchmark is {ways}-way. Pass "
                f"--oneshot_head zero to evaluate it with a {ways}-way head started at zero "
                f"(every other parameter from {source}), or meta-train with "
                f"{_ways_flag(args)} {ways}")
        saved = _checked_state(source, args)
        try:
            learner.load_state_dict(saved["learner"])
        except RuntimeError as err:  # torch's size mismatch: other network flags than in training
            raise ValueError(f"{source} does not fit the network built from these flags; pass "
                             f"the flags it was trained with ({err})") from None
        return LoadedModel(learner, source, int(saved["step"]), trained, head)
    if args.meta_model not in ZERO_HEAD_METHODS or isinstance(learner, RandomHead):
        raise ValueError(f"--oneshot_head zero supports --meta_model "
                         f"{', '.join(ZERO_HEAD_METHODS)} with --head_policy meta (the reference "
                         f"policy redraws the head before every task); got --meta_model "
                         f"{args.meta_model} --head_policy {args.head_policy}. Meta-train it "
                         f"{ways}-way and use --oneshot_head checkpoint")
    with device:
        learner = build_learner(dataclasses.replace(cfg, classes=ways))
    if _head(learner).out_features != ways:
        raise RuntimeError(f"rebuilding --meta_model {args.meta_model} with classes={ways} gave "
                           f"a {_head(learner).out_features}-way head; main.learner_config no "
                           f"longer maps the width to LearnerConfig.classes")
    saved = _checked_state(source, args)
    try:
        learner.load_state_dict(_body_state(learner, saved["learner"], source))
    except RuntimeError as err:  # torch's size mismatch: other network flags than in training
        raise ValueError(f"{source} does not fit the network built from these flags; pass the "
                         f"flags it was trained with ({err})") from None
    return LoadedModel(learner, source, int(saved["step"]), trained, head)


def _checked_state(source: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The checkpoint, checked: its checksum, finite weights and the ``--meta_model`` that
    wrote it (checkpoints record their flags)."""
    saved = load_checked(source)
    bad = main.nonfinite_entries(saved.get("learner"))
    if bad:
        raise ValueError(f"{source} holds non-finite weights ({', '.join(bad[:5])}); it cannot "
                         "be evaluated")
    trained_with = saved.get("flags", {}).get("meta_model", args.meta_model)
    if trained_with != args.meta_model:
        raise ValueError(f"{source} was written by --meta_model {trained_with}, not "
                         f"--meta_model {args.meta_model}; pass the flags it was trained with")
    return saved


def _table(result: OneShotResult) -> str:
    lines = [f"{'run':<8}{'errors':>8}{'error rate':>12}   inner loss first -> last"]
    for r in result.runs:
        curve = (f"{r.inner_losses[0]:.3f} -> {r.inner_losses[-1]:.3f}" if r.inner_losses
                 else "-")
        lines.append(f"{r.name:<8}{f'{r.errors}/{r.tests}':>8}{r.error_rate:>12.2%}   {curve}")
    return "\n".join(lines)


def main_oneshot(argv: Sequence[str] | None = None) -> OneShotResult:
    """Runs the command; returns the result (also printed and written to ``oneshot.json``).

    Bad input (flags, a missing or damaged model, unreadable runs) raises ``UsageError``."""
    with user_input():
        args, own = parse_args(argv)
    run_folder = main.run_folder(args)  # checked now: --suffix stays inside --log_dir
    if args.threads:
        torch.set_num_threads(args.threads)
    use_cuda = torch.cuda.is_available() and not args.no_cuda
    device = torch.device(f"cuda:{args.device}" if use_cuda else "cpu")
    # Methods that draw a random head or network per task (--head_policy reference, no) use
    # the global RNGs: seed them like main.py does.
    torch.manual_seed(args.seed)
    np.random.seed(args.seed % 2**32)
    random.seed(args.seed)
    folder = Path(own.runs) if own.runs != RUNS_DEFAULT else default_runs_folder(args.root)
    with user_input():  # the runs and the model are the user's files and flags
        runs = load_runs(folder, resize=args.resize)
        ways = {r.ways for r in runs}
        if len(ways) != 1:
            raise ValueError(f"the runs in {folder} mix {sorted(ways)}-way tasks; the "
                             f"benchmark's runs are all 20-way")
        if main.in_channels(args) != 1:
            raise ValueError("the one-shot benchmark's drawings have one channel; this model "
                             "takes RGB images (--dataset folder --channels rgb)")
        loaded = load_model(args, head=own.oneshot_head, ways=ways.pop(), device=device)
    # Pixels as the model saw them in training: the few-shot protocol's size and normalisation.
    fewshot = args.protocol == "fewshot"
    with fp32_precision(args.precision):
        result = evaluate_oneshot(loaded.learner, runs, steps=args.task_val_steps,
                                  image_size=args.image_size,
                                  mean=args.norm_mean if fewshot else None,
                                  std=args.norm_std if fewshot else None)
    bn = "transductive" if result.transductive else "inductive"
    print(f"one-shot benchmark: {len(runs)} runs from {folder}, {runs[0].ways}-way, "
          f"{args.meta_model} step {loaded.step} ({loaded.checkpoint}), head {loaded.head} "
          f"(meta-trained {loaded.trained_ways}-way), {result.steps} inner steps, "
          f"BatchNorm {result.bn_mode} ({bn})")
    print(_table(result))
    print(f"overall error rate {result.error_rate:.2%} (mean over {len(runs)} runs; accuracy "
          f"{1 - result.error_rate:.2%}), BatchNorm {result.bn_mode} ({bn})")
    summary = {**json.loads(result.to_json()), "meta_model": args.meta_model,
               "checkpoint": str(loaded.checkpoint), "step": loaded.step,
               "head": loaded.head, "trained_ways": loaded.trained_ways,
               "runs_folder": str(folder), "resize": args.resize, "seed": args.seed,
               "protocol": args.protocol, "image_size": args.image_size}
    with run_folder:  # locked: not while a run writes the folder
        run_folder.write_text("oneshot.json", json.dumps(summary, indent=1, sort_keys=True) + "\n")
    print(f"wrote {run_folder.file('oneshot.json')}")
    return result


if __name__ == "__main__":
    run_command(main_oneshot)
