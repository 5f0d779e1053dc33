"""Plot reward curves of maze runs, comparing agents and seeds.

``python src/maze_navigation/plot.py RUN_DIR [RUN_DIR ...] --out rewards.png [--window 50]``

Each run folder is one written by ``run.py`` (``rewards.csv`` and ``summary.json``). Per agent,
every seed is drawn thin and the mean over seeds bold (moving average over ``--window``
episodes); the dashed line is the random policy's mean episode reward measured in the runs.
The tables of the README are printed to standard output (``summary_tables``): per agent and
seed, the mean reward over the last 10% of episodes, and the mean over seeds in ``--bins``
equal windows of episodes.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt
import numpy as np

from metazoo.cli import ArgumentParser, UsageError, run_command, user_input
from train import last_fraction_mean, load_checkpoint

__all__ = ["RunCurve", "load_run", "main", "moving_average", "plot_runs", "summary_tables"]

_COLOURS = {"warp": "tab:blue", "lstm": "tab:orange", "arnn": "tab:green"}


@dataclass(frozen=True)
class RunCurve:
    """Per-episode mean rewards of one run."""

    agent: str
    seed: int
    rewards: np.ndarray
    random_reward: float | None


def load_run(folder: str | Path) -> RunCurve:
    """Read ``rewards.csv`` and the config from ``summary.json`` or ``checkpoint.pt``.

    Only complete lines are read: a run still writing may have a torn last line.

    Raises:
        ValueError: if the folder is not a run folder written by ``run.py`` (no or an
            unreadable ``rewards.csv``, neither ``summary.json`` nor ``checkpoint.pt``).
    """
    folder = Path(folder)
    csv_path = folder / "rewards.csv"
    if not csv_path.is_file():
        raise ValueError(f"run folder {folder} has no rewards.csv; pass folders written by run.py")
    lines = [line for line in csv_path.read_text().splitlines(keepends=True)
             if line.endswith("\n")]
    try:
        rewards = np.array([float(r["mean_reward"]) for r in csv.DictReader(lines)])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{csv_path} is not a rewards log written by run.py ({err!r}); pass "
                         "folders written by run.py") from None
    summary_path, ckpt_path = folder / "summary.json", folder / "checkpoint.pt"
    try:
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            config, random_reward = summary["config"], summary["random_policy_reward"]
        elif ckpt_path.exists():  # a run still in progress: read what its checkpoint knows
            state = load_checkpoint(ckpt_path)
            config, random_reward = state["config"], state["random_reward"]
        else:
            raise ValueError("neither summary.json nor checkpoint.pt is there")
        agent, seed = config["agent"], int(config["seed"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"run folder {folder}: cannot read its agent and seed ({err}); pass "
                         "folders written by run.py") from None
    return RunCurve(
        agent=agent,
        seed=seed,
        rewards=rewards,
        random_reward=random_reward,
    )


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average; the first points average over what exists so far."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    csum = np.cumsum(np.insert(values.astype(float), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    start = np.maximum(idx - window, 0)
    return (csum[idx] - csum[start]) / (idx - start)


def plot_runs(runs: list[RunCurve], out: str | Path, *, window: int = 50) -> Path:
    """Draw the curves of ``runs`` into the PNG ``out`` and return its path."""
    if not runs:
        raise ValueError("runs is empty; pass at least one run folder")
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=90)
    for agent in sorted({r.agent for r in runs}):
        group = [r for r in runs if r.agent == agent]
        colour = _COLOURS.get(agent)
        curves = [moving_average(r.rewards, window) for r in group]
        for c in curves:
            ax.plot(c, color=colour, alpha=0.35, lw=0.8)
        n = min(len(c) for c in curves)
        mean = np.mean([c[:n] for c in curves], axis=0)
        ax.plot(mean, color=colour, lw=1.8, label=f"{agent} ({len(group)} seed(s))")
    randoms = [r.random_reward for r in runs if r.random_reward is not None]
    if randoms:
        level = float(np.mean(randoms))
        ax.axhline(level, color="k", ls="--", lw=1, label=f"random policy ({level:.1f})")
    ax.set_xlabel("episode")
    ax.set_ylabel(f"reward per episode\n(mean over mazes, {window}-episode average)", fontsize=8)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def summary_tables(runs: list[RunCurve], *, bins: int = 6) -> str:
    """Markdown tables of ``runs``: the last 10% per seed, and the mean over seeds in windows.

    The last 10% is ``train.last_fraction_mean``, as in ``summary.json``. The windows split the
    episodes every run has (the shortest run's count ``n``) into ``bins`` equal parts; the
    remainder of ``n / bins`` is left out at the end.
    """
    if not runs:
        raise ValueError("runs is empty; pass at least one run folder")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    agents = sorted({r.agent for r in runs})
    lines = ["| agent | seeds | last 10% per seed | mean | std over seeds |",
             "|---|---|---|---|---|"]
    for agent in agents:
        group = sorted((r for r in runs if r.agent == agent), key=lambda r: r.seed)
        tails = [last_fraction_mean(r.rewards.tolist()) for r in group]
        std = float(np.std(tails, ddof=1)) if len(tails) > 1 else float("nan")
        seeds = ", ".join(str(r.seed) for r in group)
        per_seed = " / ".join(f"{t:.2f}" for t in tails)
        lines.append(f"| {agent} | {seeds} | {per_seed} | {np.mean(tails):.2f} | {std:.2f} |")
    n = min(len(r.rewards) for r in runs)
    width = n // bins
    if width == 0:
        return "\n".join(lines)
    edges = [(b * width, (b + 1) * width) for b in range(bins)]
    lines += ["", "| episodes | " + " | ".join(f"{a}-{b}" for a, b in edges) + " |",
              "|---" * (bins + 1) + "|"]
    for agent in agents:
        group = [r for r in runs if r.agent == agent]
        means = [np.mean([r.rewards[a:b].mean() for r in group]) for a, b in edges]
        lines.append(f"| {agent} | " + " | ".join(f"{m:.1f}" for m in means) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Path:
    """Command line: run folders, ``--out`` PNG path, ``--window``, ``--bins``.

    Bad input (a folder that is not a run, a window < 1, an ``--out`` that cannot be written)
    raises ``UsageError`` before the figure is written.
    """
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders written by run.py")
    p.add_argument("--out", type=Path, default=Path("maze_rewards.png"),
                   help="PNG file to write")
    p.add_argument("--window", type=int, default=50, help="moving-average window (episodes)")
    p.add_argument("--bins", type=int, default=6,
                   help="equal windows of episodes in the printed table")
    args = p.parse_args(argv)
    if args.window < 1:
        raise UsageError(f"--window {args.window}: must be >= 1 (episodes)")
    if args.bins < 1:
        raise UsageError(f"--bins {args.bins}: must be >= 1 (windows)")
    if args.out.is_dir():
        raise UsageError(f"--out {args.out} is a folder; pass a file name, e.g. --out "
                         f"{args.out / 'maze_rewards.png'}")
    with user_input():
        runs = [load_run(r) for r in args.runs]
    try:
        out = plot_runs(runs, args.out, window=args.window)
    except OSError as err:
        raise UsageError(f"--out {args.out}: cannot write it ({err.strerror or err}); pass "
                         "a writable path") from None
    print(summary_tables(runs, bins=args.bins))
    return out


if __name__ == "__main__":
    run_command(main)
