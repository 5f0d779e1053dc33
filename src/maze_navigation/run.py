"""Train a maze agent with A2C: ``python src/maze_navigation/run.py --agent warp|arnn|lstm|...``.

Writes into ``--out`` (default ``logs/maze_navigation/<agent>_seed<seed>``):

* ``rewards.csv``: one line per episode (episode, mean reward over mazes, loss, meta update);
* ``checkpoint.pt``: trainer state dict (atomic writes, every ``--save_every`` episodes and at
  the end); ``--resume`` continues from it bit-for-bit;
* ``summary.json``: config, the random policy's mean episode reward measured in this run, the
  mean reward over the last 10% of episodes, and the wall time.

Options have spelled-out names and the reference's short aliases (``--rngseed``, ``--rew``,
``--wp``, ``--bent``, ``--blossv``, ``--msize``, ``--gr``, ``--gc``, ``--eplen``, ``--hs``,
``--bs``, ``--nbiter``, ``--pe``).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from metazoo import PRECISIONS, set_fp32_precision
from metazoo.cli import ArgumentParser, UsageError, run_command, user_input
from metazoo.runs import FLAGS_KEY, RunFolder, flag_differences

sys.path.insert(0, str(Path(__file__).resolve().parent))

from agents import AGENTS
from train import (
    ConfigError,
    TrainConfig,
    Trainer,
    last_fraction_mean,
)

logger = logging.getLogger("maze_navigation")

CSV_FIELDS = ("episode", "mean_reward", "loss", "meta_update")


DEFAULT_OUT = Path("logs/maze_navigation/<agent>_seed<seed>")


def build_parser() -> argparse.ArgumentParser:
    """Command-line options; defaults are those of ``TrainConfig``."""
    d = TrainConfig()
    p = ArgumentParser(
        description="A2C on the Miconi grid maze with a warped recurrent or a plain LSTM agent "
                    "(the warp split and update from the warpgrad package).")
    a = p.add_argument
    a("--agent", choices=tuple(AGENTS), default=d.agent,
      help="warp: warped recurrent network (WarpGrad); arnn: the reference code's warped aRNN "
           "agent with five independent sub-policies; arnn_tied: the same agent with the "
           "sub-policies sliced as the reference's code runs them (three of them one slice); "
           "lstm: plain LSTM baseline")
    a("--seed", "--rngseed", type=int, default=d.seed, dest="seed",
      help="seed of the initialisation, the mazes and the sampled actions")
    a("--reward", "--rew", type=float, default=d.reward, dest="reward",
      help="reward for reaching the reward cell")
    a("--wall_penalty", "--wp", type=float, default=d.wall_penalty, dest="wall_penalty",
      help="cost of bumping into a wall (>= 0)")
    a("--concentration", "--bent", type=float, default=d.concentration, dest="concentration",
      help="policy concentration penalty (coefficient of sum pi^2)")
    a("--value_coef", "--blossv", type=float, default=d.value_coef, dest="value_coef",
      help="coefficient of the value loss")
    a("--maze_size", "--msize", type=int, default=d.maze_size, dest="maze_size",
      help="side of the maze (odd, >= 5)")
    a("--discount", "--gr", type=float, default=d.discount, dest="discount",
      help="discount factor gamma, in [0, 1]")
    a("--grad_clip", "--gc", type=float, default=d.grad_clip, dest="grad_clip",
      help="maximum gradient norm of each optimizer's parameters (0: no clipping)")
    a("--episode_length", "--eplen", type=int, default=d.episode_length, dest="episode_length",
      help="steps per episode")
    a("--hidden_size", "--hs", type=int, default=d.hidden_size, dest="hidden_size",
      help="size of the recurrent cell")
    a("--batch_size", "--bs", type=int, default=d.batch_size, dest="batch_size",
      help="mazes per episode, stepped together")
    a("--num_episodes", "--nbiter", type=int, default=d.num_episodes, dest="num_episodes",
      help="training episodes (a --resume may raise it to extend a run)")
    a("--save_every", type=int, default=100, help="episodes between checkpoints")
    a("--print_every", "--pe", type=int, default=50, dest="print_every",
      help="episodes between progress lines")
    a("--learning_rate", type=float, default=d.learning_rate,
      help="Adam step size of the adaptable parameters (every episode)")
    a("--meta_learning_rate", type=float, default=d.meta_learning_rate,
      help="Adam step size of the warp parameters")
    a("--meta_update_ival", type=int, default=d.meta_update_ival,
      help="episodes between warp updates")
    a("--burn_in", type=int, default=d.burn_in,
      help="initial episodes during which the warp parameters do not learn")
    a("--random_episodes", type=int, default=d.random_episodes,
      help="episodes of a uniformly random policy measured as the baseline")
    a("--dtype", choices=("float32", "float64"), default=d.dtype, help="floating-point type")
    a("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    a("--precision", choices=PRECISIONS, default="exact",
      help="float32 on a GPU: exact (TF32 off) or tf32 (TF32 matmuls and RNNs: faster, less "
           "exact); no effect on CPUs")
    a("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    a("--out", type=Path, default=DEFAULT_OUT, help="run folder")
    a("--resume", action="store_true",
      help="continue from <out>/checkpoint.pt (the same options; --num_episodes, "
           "--save_every, --print_every, --threads and --device may change); a run that "
           "stopped before its first checkpoint starts again")
    a("--trust_checkpoint", action="store_true",
      help="--resume from a checkpoint that does not record the options that produced it "
           "(an older version's), trusting that these options are its")
    return p


def _config(args: argparse.Namespace) -> TrainConfig:
    keys = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in keys})


def _flag(parser: argparse.ArgumentParser, dest: str) -> str:
    """``--hidden_size (--hs)``: the option strings of ``dest``."""
    for action in parser._actions:
        if action.dest == dest and action.option_strings:
            first, *aliases = action.option_strings
            return f"{first} ({', '.join(aliases)})" if aliases else first
    return dest


def _usage_config(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of the flags; a bad value is a ``UsageError`` naming its flag."""
    try:
        return _config(args)
    except ConfigError as err:
        raise UsageError(f"{_flag(parser, err.field)} {err.value!r}: {err.requirement}"
                         ) from None


def _read_rewards(path: Path, upto: int) -> list[dict[str, str]]:
    """The logged rows of the episodes before ``upto``.

    A run killed mid-write can leave a torn last line (``"2"`` of ``"25,..."``); only lines
    that end with a newline are complete, so only those are read.
    """
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    complete = [line for line in lines if line.endswith("\n")]
    return [row for row in csv.DictReader(complete) if int(row["episode"]) < upto]


RUN_FILES = ("checkpoint.pt", "rewards.csv", "summary.json")
PROGRAM = "maze_navigation"
# Options that may differ between a run and its --resume: how long it runs, how often it logs
# and saves, where it runs and where its files are. Every other option is the experiment.
RESUME_MAY_CHANGE = frozenset({"num_episodes", "save_every", "print_every", "threads", "device",
                               "precision", "out", "resume", "trust_checkpoint"})


def main(argv: list[str] | None = None) -> dict:
    """Run training; returns the summary written to ``summary.json``.

    Bad input (a value, a run folder that does not fit the flags) raises ``UsageError`` before
    anything is written; ``run_command`` turns it into one ``error:`` line and exit code 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("save_every", "print_every"):
        if getattr(args, name) < 1:
            raise UsageError(f"{_flag(parser, name)} {getattr(args, name)}: must be >= 1")
    if args.threads < 0:
        raise UsageError(f"--threads {args.threads}: must be >= 0 (0: torch's default)")
    config = _usage_config(parser, args)
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        raise UsageError(f"--device {args.device!r}: {err}; e.g. --device cpu") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    set_fp32_precision(args.precision)  # for the process: main() is the command
    out = args.out
    if out == DEFAULT_OUT:
        out = Path("logs/maze_navigation") / f"{config.agent}_seed{config.seed}"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; pass a folder for the run")
    flags = run_flags(args)
    folder = RunFolder(out, program=PROGRAM, resume_hint="run the same command with --resume")
    with folder:  # locked until the run ends (or its process dies)
        return _run(args, config, device, folder, flags)


def run_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed flags as ``flags.json`` and the checkpoint record them."""
    return {key: str(value) if isinstance(value, Path) else value
            for key, value in vars(args).items()}


def _resume(args: argparse.Namespace, folder: RunFolder, trainer: Trainer,
            flags: dict[str, Any]) -> None:
    """Checks everything first (checkpoint: checksum, producer, flags, config; every line of
    rewards.csv), then trims the log to the checkpoint."""
    ckpt_path = folder.file("checkpoint.pt")
    fix = "nothing was changed. Resume with the run's options, or choose another --out"
    if not folder.owns("checkpoint.pt"):
        raise UsageError(f"--resume: {ckpt_path} is not recorded in {folder.manifest_path} (an "
                         f"older version's run folder, or a copied file); {fix}")
    state = folder.load_checkpoint("checkpoint.pt", flags, may_change=RESUME_MAY_CHANGE,
                                   trust_unrecorded=args.trust_checkpoint, fix=fix)
    state.pop(FLAGS_KEY, None)
    with user_input():
        try:
            trainer.load_state_dict(state)
        except ValueError as err:
            raise ValueError(f"--resume {ckpt_path}: {err}") from None
    upto = trainer.episode

    def keep(line: str) -> bool:  # the header, and the episodes before the checkpoint
        return line.startswith(f"{CSV_FIELDS[0]},") or int(line.split(",", 1)[0]) < upto

    plan = folder.plan_rewrite(["rewards.csv"], keep, fix=fix)
    folder.discard_temporaries()  # validated: now the folder changes
    folder.rewrite(plan)
    logger.info("resumed %s at episode %d", ckpt_path, trainer.episode)
    note = folder.record_machine(f"resume at episode {trainer.episode}")
    if note:
        logger.info("%s", note)


def _start(args: argparse.Namespace, folder: RunFolder, flags: dict[str, Any]) -> None:
    """Prepares a fresh run; a run that stopped before its first checkpoint (nothing of value
    in it) is started again on --resume, with the same options."""
    out = folder.path
    if folder.files:
        own = [name for name in RUN_FILES if folder.exists(name)]
        if not args.resume:
            raise UsageError(f"--out {out} already holds a run ({', '.join(own)}); pass "
                             "--resume to continue it or choose another --out")
        if folder.exists("summary.json"):
            raise UsageError(f"--resume: {out} has no checkpoint.pt to continue from (it holds "
                             f"{', '.join(own)}); nothing was changed. Choose another --out "
                             "to start a new run")
        if folder.exists("flags.json"):
            stored = json.loads(folder.file("flags.json").read_text())
            differences = flag_differences(stored, flags, RESUME_MAY_CHANGE)
            if differences:
                raise UsageError(f"--resume: {out} is a run with other options "
                                 f"({'; '.join(differences)}); nothing was changed. Pass its "
                                 "options, or choose another --out")
        logger.info("%s stopped before its first checkpoint: starting it again", out)
        folder.clear()
    taken = [name for name in (*RUN_FILES, "flags.json") if (out / name).exists()]
    if taken:
        raise UsageError(f"--out {out} holds {', '.join(taken)}, not written by a run of this "
                         "version (no manifest.json records them); they are left alone. Choose "
                         "another --out")
    folder.write_text("flags.json", json.dumps(flags, indent=1, sort_keys=True) + "\n")
    folder.record_machine("start")


def _csv_rows(rows: list[dict[str, Any]], header: bool = False) -> str:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS)
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def _run(args: argparse.Namespace, config: TrainConfig, device: torch.device,
         folder: RunFolder, flags: dict[str, Any]) -> dict:
    ckpt_path, csv_path = folder.file("checkpoint.pt"), folder.file("rewards.csv")
    with user_input():
        trainer = Trainer(config=config, device=device)
    if args.resume and (ckpt_path.exists() or ckpt_path.is_symlink()):
        _resume(args, folder, trainer, flags)
    else:
        _start(args, folder, flags)
        folder.write_text("rewards.csv", _csv_rows([], header=True))
    rows = _read_rewards(csv_path, trainer.episode)
    rewards = [float(r["mean_reward"]) for r in rows]

    if trainer.random_reward is None:
        trainer.measure_random_policy()
        logger.info(
            "random policy: mean episode reward %.3f over %d episodes x %d mazes",
            trainer.random_reward,
            config.random_episodes,
            config.batch_size,
        )

    start = time.time()
    while trainer.episode < config.num_episodes:
        r = trainer.train_episode()
        rewards.append(r.mean_reward)
        row = {
            "episode": r.episode,
            "mean_reward": f"{r.mean_reward:.6g}",
            "loss": f"{r.loss:.6g}",
            "meta_update": int(r.meta_updated),
        }
        folder.append_text("rewards.csv", _csv_rows([row]))
        done = trainer.episode
        if done % args.print_every == 0:
            recent = rewards[-args.print_every :]
            logger.info(
                "episode %d  mean reward (last %d) %.3f  loss %.3f  grad norm %.2f  "
                "meta updates %d  %.1f s",
                done,
                len(recent),
                sum(recent) / len(recent),
                r.loss,
                r.adapt_grad_norm,
                trainer.meta_updates,
                time.time() - start,
            )
        if done % args.save_every == 0 or done == config.num_episodes:
            folder.save_checkpoint("checkpoint.pt", trainer.state_dict(), flags)
    if trainer.episode == 0 or not ckpt_path.exists():
        folder.save_checkpoint("checkpoint.pt", trainer.state_dict(), flags)

    summary = {
        "config": asdict(config),
        "episodes": trainer.episode,
        "meta_updates": trainer.meta_updates,
        "random_policy_reward": trainer.random_reward,
        "last_10pct_reward": last_fraction_mean(rewards) if rewards else None,
        "wall_seconds_this_invocation": round(time.time() - start, 1),
    }
    folder.write_text("summary.json", json.dumps(summary, indent=2) + "\n")
    logger.info(
        "done: last 10%% mean reward %s, random policy %.3f",
        summary["last_10pct_reward"],
        trainer.random_reward,
    )
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    run_command(main)
