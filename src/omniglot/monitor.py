"""Reads the Omniglot experiment's logs back, plots them, and compares runs side by side.

``FileHandler(log_path)`` has the reference's attributes: ``train_train_data``,
``train_eval_data``, ``val_train_data``/``val_eval_data`` and ``test_train_data``/
``test_eval_data`` (lists with one dict per task), ``agg_val``/``agg_test`` and ``plot_train``,
``plot_val``, ``plot_test``. Each dict holds ``step``, ``loss``, ``acc``, ``loss_curve``,
``acc_curve`` and, where written, ``meta_loss``.

Compare command (writes a PNG: validation learning curves and final test accuracy, mean and
standard deviation over seeds)::

    python src/omniglot/monitor.py compare logs/leap/s1 logs/leap/s2 logs/no/s1 --out cmp.png

Runs are grouped by method (the parent folder's name, ``<log_dir>/<meta_model>/<suffix>``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FileHandler", "compare", "load_args", "load_results", "summarize"]

_EVAL_FILE = re.compile(r"^results_(\d+)_(val|test)_(train|val)\.log$")


def load_args(log_path: str | os.PathLike) -> str:
    """The ``args.log`` text of a run."""
    return (Path(log_path) / "args.log").read_text()


def load_results(file: str | os.PathLike) -> dict[str, list[Any]]:
    """One log file as ``{step, meta_loss, loss, acc, loss_curve, acc_curve}`` lists."""
    out: dict[str, list[Any]] = {"step": [], "meta_loss": [], "loss": [], "acc": [],
                                 "loss_curve": [], "acc_curve": []}
    with open(file) as f:
        for number, line in enumerate(f, 1):
            fields = line.rstrip("\n").split(",")
            if len(fields) != 6:
                raise ValueError(f"{file}:{number} has {len(fields)} comma-separated fields, "
                                 "expected 6 (step,meta_loss,loss,acc,losses;,accs;)")
            step, meta_loss, loss, acc, losses, accs = fields
            out["step"].append(int(step))
            out["meta_loss"].append(float(meta_loss))
            out["loss"].append(float(loss))
            out["acc"].append(float(acc))
            out["loss_curve"].append([float(v) for v in losses.split(";")[:-1]])
            out["acc_curve"].append([float(v) for v in accs.split(";")[:-1]])
    return out


class FileHandler:
    """Loads one run's logs for plotting and analysis.

    Args:
        log_path: the run folder (``<log_dir>/<meta_model>/<suffix>``).
        name: label in plots (default: ``<meta_model>/<suffix>``).
    """

    def __init__(self, log_path: str | os.PathLike, name: str | None = None) -> None:
        path = Path(log_path)
        if not (path / "results_train_train.log").exists() and not any(
                _EVAL_FILE.match(p.name) for p in path.glob("results_*.log")):
            raise ValueError(f"no results_*.log files in {str(path)!r}; is it a run folder "
                             "<log_dir>/<meta_model>/<suffix>?")
        self.log_path = str(path)
        self.name = name if name is not None else f"{path.parent.name}/{path.name}"
        self.method = path.parent.name
        self.args = load_args(path) if (path / "args.log").exists() else ""
        self.log_files = sorted(str(p) for p in path.glob("*"))
        self.train_train_data = self.train_eval_data = None
        if (path / "results_train_train.log").exists():
            self.train_train_data = load_results(path / "results_train_train.log")
            self.train_eval_data = load_results(path / "results_train_val.log")
        self.val_train_data, self.val_eval_data = self._load_eval(path, "val")
        self.test_train_data, self.test_eval_data = self._load_eval(path, "test")
        done = path / "done.json"
        self.summary = json.loads(done.read_text()) if done.exists() else None

    @staticmethod
    def _load_eval(path: Path, case: str) -> tuple[list[dict] | None, list[dict] | None]:
        tasks: dict[int, dict[str, Path]] = defaultdict(dict)
        for p in path.glob("results_*.log"):
            m = _EVAL_FILE.match(p.name)
            if m and m.group(2) == case:
                tasks[int(m.group(1))][m.group(3)] = p
        if not tasks:
            return None, None
        order = sorted(tasks)
        if order != list(range(len(order))) or any(len(tasks[i]) != 2 for i in order):
            raise ValueError(f"{case} logs in {path} are not complete train/val pairs per task: "
                             f"{ {i: sorted(tasks[i]) for i in order} }")
        return ([load_results(tasks[i]["train"]) for i in order],
                [load_results(tasks[i]["val"]) for i in order])

    def _agg(self, holdout: str, metric: str, type: str) -> np.ndarray:
        data = getattr(self, f"{holdout}_{type}_data")
        if data is None:
            raise ValueError(f"run {self.name} has no {holdout} logs")
        return np.stack([np.asarray(task[metric]) for task in data], axis=1)

    def agg_val(self, metric: str = "acc", type: str = "eval") -> np.ndarray:
        """``(evaluations, tasks)`` array of ``metric`` (``loss``/``acc``) on validation tasks;
        ``type`` is ``train`` (adaptation images) or ``eval`` (held-out drawings)."""
        return self._agg("val", metric, type)

    def agg_test(self, metric: str = "acc", type: str = "eval") -> np.ndarray:
        """Like ``agg_val`` for the test tasks."""
        return self._agg("test", metric, type)

    def final_test_acc(self) -> float:
        """Mean held-out accuracy over test tasks at the last test evaluation."""
        return float(self.agg_test("acc", "eval")[-1].mean())

    def plot_train(self, metric: str = "acc", type: str = "eval", ax: Any = None,
                   **kwargs: Any) -> Any:
        """Meta-training tasks' ``metric`` over meta-steps (``type``: train or eval)."""
        if self.train_train_data is None:
            raise ValueError(f"run {self.name} has no meta-training logs")
        data = getattr(self, f"train_{type}_data")
        ax = _axes(ax)
        ax.plot(data["step"], data[metric], label=kwargs.pop("label", self.name), **kwargs)
        return ax

    def plot_val(self, metric: str = "acc", type: str = "eval", std: float = 1.0,
                 ax: Any = None, **kwargs: Any) -> Any:
        """Validation tasks' mean ``metric`` over meta-steps, shaded by ``std`` deviations."""
        return self._plot_holdout("val", metric, type, std, ax, **kwargs)

    def plot_test(self, metric: str = "acc", type: str = "eval", std: float = 1.0,
                  ax: Any = None, **kwargs: Any) -> Any:
        """Test tasks' mean ``metric``, shaded by ``std`` deviations."""
        return self._plot_holdout("test", metric, type, std, ax, **kwargs)

    def _plot_holdout(self, holdout: str, metric: str, type: str, std: float, ax: Any,
                      **kwargs: Any) -> Any:
        label = kwargs.pop("label", self.name)
        x = getattr(self, f"{holdout}_{type}_data")[0]["step"]
        y = self._agg(holdout, metric, type)
        mean, dev = y.mean(axis=1), y.std(axis=1)
        ax = _axes(ax)
        alpha, color = kwargs.pop("alpha", 0.1), kwargs.pop("color", None)
        (line,) = ax.plot(x, mean, label=label, color=color, marker="o" if len(x) == 1 else None,
                          **kwargs)
        if std:
            ax.fill_between(x, mean - std * dev, mean + std * dev, linewidth=0.0, alpha=alpha,
                            color=line.get_color())
        return ax


def _axes(ax: Any) -> Any:
    if ax is None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        _, ax = plt.subplots(1)
    return ax


def summarize(runs: Sequence[str | os.PathLike]) -> dict[str, list[float]]:
    """``{method: [final test accuracy per run]}`` for runs with test logs."""
    out: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        handler = FileHandler(run)
        if handler.test_eval_data is not None:
            out[handler.method].append(handler.final_test_acc())
    return dict(out)


def compare(runs: Sequence[str | os.PathLike], out: str | os.PathLike,
            title: str = "Omniglot") -> dict[str, tuple[float, float, int]]:
    """Writes a PNG comparing runs; returns ``{method: (mean, std, runs)}`` of test accuracy.

    Left: mean validation accuracy (held-out drawings) over meta-steps per method (mean over
    seeds, shaded standard deviation over seeds). Right: final test accuracy per method with
    the standard deviation over seeds.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    handlers = [FileHandler(r) for r in runs]
    by_method: dict[str, list[FileHandler]] = defaultdict(list)
    for h in handlers:
        by_method[h.method].append(h)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    table: dict[str, tuple[float, float, int]] = {}
    for i, (method, hs) in enumerate(sorted(by_method.items())):
        color = f"C{i % 10}"
        curves = [h.agg_val("acc", "eval").mean(axis=1) for h in hs
                  if h.val_eval_data is not None]
        if curves:
            length = min(len(c) for c in curves)
            steps = np.asarray(next(h for h in hs if h.val_eval_data is not None)
                               .val_eval_data[0]["step"][:length])
            stack = np.stack([c[:length] for c in curves])
            mean, dev = stack.mean(0), stack.std(0)
            if length == 1:  # not meta-trained (``no``): a reference level
                left.axhline(mean[0], color=color, linestyle="--", label=f"{method} (step 0)")
            else:
                left.plot(steps, mean, color=color, label=method)
                left.fill_between(steps, mean - dev, mean + dev, color=color, alpha=0.15,
                                  linewidth=0)
        finals = [h.final_test_acc() for h in hs if h.test_eval_data is not None]
        if finals:
            table[method] = (float(np.mean(finals)), float(np.std(finals)), len(finals))
            right.bar(method, table[method][0], yerr=table[method][1], color=color, capsize=4)
    fig.suptitle(title)
    left.set(xlabel="meta-step", ylabel="validation accuracy (held-out drawings)",
             title="validation tasks")
    left.legend(fontsize=8)
    right.set(ylabel="test accuracy", title="test tasks: mean and std over seeds")
    right.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return table


def main(argv: Sequence[str] | None = None) -> None:
    """``monitor.py compare RUN... --out PNG`` and ``monitor.py summary RUN...``."""
    parser = argparse.ArgumentParser("Omniglot log tools")
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare", help="plot runs side by side into a PNG")
    cmp.add_argument("runs", nargs="+", help="run folders <log_dir>/<meta_model>/<suffix>")
    cmp.add_argument("--out", required=True, help="PNG path")
    cmp.add_argument("--title", default="Omniglot")
    summ = sub.add_parser("summary", help="print final test accuracy per method")
    summ.add_argument("runs", nargs="+")
    args = parser.parse_args(argv)
    # shell globs such as logs/*/n4_s* also match run_multi's <suffix>.out files
    args.runs = [r for r in args.runs if Path(r).is_dir()]
    if not args.runs:
        parser.error("no run folders given")
    if args.command == "compare":
        table = compare(args.runs, args.out, args.title)
    else:
        table = {m: (float(np.mean(v)), float(np.std(v)), len(v))
                 for m, v in summarize(args.runs).items()}
    print(f"{'method':>10} {'test acc':>9} {'std':>7} {'runs':>5}")
    for method, (mean, dev, n) in sorted(table.items(), key=lambda kv: -kv[1][0]):
        print(f"{method:>10} {mean:9.4f} {dev:7.4f} {n:5d}" if math.isfinite(mean) else method)


if __name__ == "__main__":
    sys.exit(main())
