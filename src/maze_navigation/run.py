"""Train a maze agent with A2C: ``python src/maze_navigation/run.py --agent warp|lstm [options]``.

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

import torch

from metazoo import PRECISIONS, atomic_write_text, set_fp32_precision

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import (
    TrainConfig,
    Trainer,
    last_fraction_mean,
    load_checkpoint,
    save_checkpoint,
)

logger = logging.getLogger("maze_navigation")

CSV_FIELDS = ("episode", "mean_reward", "loss", "meta_update")


def build_parser() -> argparse.ArgumentParser:
    """Command-line options; defaults are those of ``TrainConfig``."""
    d = TrainConfig()
    p = argparse.ArgumentParser(
        description="A2C on the Miconi grid maze with a warped recurrent or a plain LSTM agent.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--agent", choices=("warp", "lstm"), default=d.agent)
    p.add_argument("--seed", "--rngseed", type=int, default=d.seed, dest="seed")
    p.add_argument("--reward", "--rew", type=float, default=d.reward, dest="reward")
    p.add_argument(
        "--wall_penalty", "--wp", type=float, default=d.wall_penalty, dest="wall_penalty"
    )
    p.add_argument(
        "--concentration",
        "--bent",
        type=float,
        default=d.concentration,
        dest="concentration",
        help="policy concentration penalty (coefficient of sum pi^2)",
    )
    p.add_argument("--value_coef", "--blossv", type=float, default=d.value_coef, dest="value_coef")
    p.add_argument("--maze_size", "--msize", type=int, default=d.maze_size, dest="maze_size")
    p.add_argument("--discount", "--gr", type=float, default=d.discount, dest="discount")
    p.add_argument("--grad_clip", "--gc", type=float, default=d.grad_clip, dest="grad_clip")
    p.add_argument(
        "--episode_length", "--eplen", type=int, default=d.episode_length, dest="episode_length"
    )
    p.add_argument("--hidden_size", "--hs", type=int, default=d.hidden_size, dest="hidden_size")
    p.add_argument("--batch_size", "--bs", type=int, default=d.batch_size, dest="batch_size")
    p.add_argument(
        "--num_episodes", "--nbiter", type=int, default=d.num_episodes, dest="num_episodes"
    )
    p.add_argument("--save_every", type=int, default=100, help="episodes between checkpoints")
    p.add_argument(
        "--print_every",
        "--pe",
        type=int,
        default=50,
        dest="print_every",
        help="episodes between progress lines",
    )
    p.add_argument("--learning_rate", type=float, default=d.learning_rate)
    p.add_argument("--meta_learning_rate", type=float, default=d.meta_learning_rate)
    p.add_argument("--meta_update_ival", type=int, default=d.meta_update_ival)
    p.add_argument("--burn_in", type=int, default=d.burn_in)
    p.add_argument("--random_episodes", type=int, default=d.random_episodes)
    p.add_argument("--dtype", choices=("float32", "float64"), default=d.dtype)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=PRECISIONS, default="exact",
                   help="float32 on a GPU: exact (TF32 off) or tf32 (TF32 matmuls and RNNs: "
                        "faster, less exact); no effect on CPUs")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--out", type=Path, default=None, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from <out>/checkpoint.pt")
    return p


def _config(args: argparse.Namespace) -> TrainConfig:
    keys = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in keys})


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


def main(argv: list[str] | None = None) -> dict:
    """Run training; returns the summary written to ``summary.json``."""
    args = build_parser().parse_args(argv)
    for name in ("save_every", "print_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    set_fp32_precision(args.precision)  # for the process: main() is the command
    config = _config(args)
    out = args.out or Path("logs/maze_navigation") / f"{config.agent}_seed{config.seed}"
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, csv_path = out / "checkpoint.pt", out / "rewards.csv"

    trainer = Trainer(config=config, device=args.device)
    if ckpt_path.exists() and not args.resume:
        raise RuntimeError(
            f"{ckpt_path} exists; pass --resume to continue that run or choose another --out"
        )
    if args.resume and ckpt_path.exists():
        trainer.load_state_dict(load_checkpoint(ckpt_path))
        logger.info("resumed %s at episode %d", ckpt_path, trainer.episode)
    # Episodes logged after the checkpoint are replayed identically, so drop them.
    # The rewrite is atomic: a kill during it must not lose the rows before the checkpoint.
    rows = _read_rewards(csv_path, trainer.episode)
    kept = io.StringIO(newline="")
    writer = csv.DictWriter(kept, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(kept.getvalue(), csv_path)
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
    with csv_path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        while trainer.episode < config.num_episodes:
            r = trainer.train_episode()
            rewards.append(r.mean_reward)
            writer.writerow(
                {
                    "episode": r.episode,
                    "mean_reward": f"{r.mean_reward:.6g}",
                    "loss": f"{r.loss:.6g}",
                    "meta_update": int(r.meta_updated),
                }
            )
            f.flush()
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
                save_checkpoint(trainer.state_dict(), ckpt_path)
    if trainer.episode == 0 or not ckpt_path.exists():
        save_checkpoint(trainer.state_dict(), ckpt_path)

    summary = {
        "config": asdict(config),
        "episodes": trainer.episode,
        "meta_updates": trainer.meta_updates,
        "random_policy_reward": trainer.random_reward,
        "last_10pct_reward": last_fraction_mean(rewards) if rewards else None,
        "wall_seconds_this_invocation": round(time.time() - start, 1),
    }
    atomic_write_text(json.dumps(summary, indent=2) + "\n", out / "summary.json")
    logger.info(
        "done: last 10%% mean reward %s, random policy %.3f",
        summary["last_10pct_reward"],
        trainer.random_reward,
    )
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    main()
