"""Reads the Omniglot experiment's logs back, plots them, and compares runs side by side.

``FileHandler(log_path)`` has the reference's attributes: ``train_train_data``,
``train_eval_data``, ``val_train_data``/``val_eval_data`` and ``test_train_data``/
``test_eval_data`` (lists with one dict per task), ``agg_val``/``agg_test`` and ``plot_train``,
``plot_val``, ``plot_test``. Each dict holds ``step``, ``loss``, ``acc``, ``loss_curve``,
``acc_curve`` and, where written, ``meta_loss``.

Compare command (writes an image: validation learning curves and final test accuracy, mean and
standard deviation over seeds)::

    python src/omniglot/monitor.py compare logs/cpu_preset/*/n4_s* --out cmp.png

Runs are grouped by method (the parent folder's name, ``<log_dir>/<meta_model>/<suffix>``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metazoo.cli import ArgumentParser, UsageError, run_command, user_input

__all__ = ["FileHandler", "compare", "load_args", "load_results", "summarize"]

_EVAL_FILE = re.compile(r"^results_(\d+)_(val|test)_(train|val)\.log$")


def load_args(log_path: str | os.PathLike) -> str:
    """The ``args.log`` text of a run."""
    return (Path(log_path) / "args.log").read_text()


def load_results(file: str | os.PathLike) -> dict[str, list[Any]]:
    """One log file as ``{step, meta_loss, loss, acc, loss_curve, acc_curve}`` lists.

    A last line without its newline that does not parse is being written by a running
    ``main.py`` and is left out; any other malformed line raises ``ValueError`` naming the file
    and the line.
    """
    out: dict[str, list[Any]] = {"step": [], "meta_loss": [], "loss": [], "acc": [],
                                 "loss_curve": [], "acc_curve": []}
    with open(file) as f:
        lines = f.read().split("\n")
    unterminated = lines.pop()  # "" when the file ends with a newline
    for number, line in enumerate([*lines, unterminated], 1):
        if number > len(lines) and not line:
            break
        try:
            step, meta_loss, loss, acc, losses, accs = _fields(line)
            parsed = (int(step), float(meta_loss), float(loss), float(acc),
                      [float(v) for v in losses.split(";")[:-1]],
                      [float(v) for v in accs.split(";")[:-1]])
        except ValueError as err:
            if number > len(lines):
                break  # still being written
            raise ValueError(f"{file}:{number} is not a log line ({err}): {line[:80]!r}; "
                             "expected step,meta_loss,loss,acc,losses;...;,accs;...;") from None
        for key, value in zip(out, parsed):
            out[key].append(value)
    return out


def _fields(line: str) -> list[str]:
    fields = line.split(",")
    if len(fields) != 6:
        raise ValueError(f"{len(fields)} comma-separated fields, expected 6")
    return fields


class FileHandler:
    """Loads one run's logs for plotting and analysis.

    Args:
        log_path: the run folder (``<log_dir>/<meta_model>/<suffix>``).
        name: label in plots (default: ``<meta_model>/<suffix>``).
    """

    def __init__(self, log_path: str | os.PathLike, name: str | None = None) -> None:
        path = Path(log_path)
        if not path.is_dir():
            raise ValueError(f"run folder {str(path)!r} does not exist; run folders are "
                             "<log_dir>/<meta_model>/<suffix>")
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
        # The machine kind the run started on (``machine.json``; runs older than the record
        # have none): CPU runs repeat bit for bit only on the same kind.
        machine = path / "machine.json"
        records = json.loads(machine.read_text()) if machine.exists() else None
        self.machine: dict[str, Any] | None = records[0] if records else None

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

    def setting(self, flag: str) -> str | None:
        """The value of a ``main.py`` flag as ``args.log`` records it (``None`` if absent)."""
        match = re.search(rf"\b{re.escape(flag)}=('([^']*)'|[^,)]*)", self.args)
        if match is None:
            return None
        return match.group(2) if match.group(2) is not None else match.group(1)

    @property
    def chance(self) -> float | None:
        """Accuracy of guessing: 1 / classes per task (``--ways`` for few-shot runs)."""
        ways = self.setting("ways" if self.setting("protocol") == "fewshot" else "classes")
        return 1.0 / int(ways) if ways and ways.isdigit() and int(ways) > 0 else None

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
        _label(ax, metric, "meta-training tasks", type)
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
        role = "validation" if holdout == "val" else "test"
        _label(ax, metric, f"mean over {y.shape[1]} {role} task{'s' * (y.shape[1] > 1)}", type)
        return ax


def _label(ax: Any, metric: str, tasks: str, type: str) -> None:
    """Axis labels, unless the caller's axes already have them."""
    images = "adaptation images" if type == "train" else "held-out drawings"
    if not ax.get_xlabel():
        ax.set_xlabel("meta-step")
    if not ax.get_ylabel():
        ax.set_ylabel(f"{'accuracy' if metric == 'acc' else metric} ({tasks}, {images})")


def _axes(ax: Any) -> Any:
    if ax is None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        _, ax = plt.subplots(1)
    return ax


def summarize(runs: Sequence[str | os.PathLike | FileHandler]) -> dict[str, list[float]]:
    """``{method: [final test accuracy per run]}`` for runs with test logs."""
    out: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        handler = run if isinstance(run, FileHandler) else FileHandler(run)
        if handler.test_eval_data is not None:
            out[handler.method].append(handler.final_test_acc())
    return dict(out)


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _scale(handlers: Sequence[FileHandler]) -> str:
    """The runs' common scale from their ``args.log`` (values that differ read ``mixed``)."""

    def value(flag: str) -> str:
        values = {h.setting(flag) for h in handlers}
        return "?" if values == {None} else values.pop() if len(values) == 1 else "mixed"

    if value("protocol") == "fewshot":
        return (f"{value('ways')}-way {value('shots')}-shot episodes, "
                f"{value('meta_train_steps')} meta-steps x {value('meta_batch_size')} episodes, "
                f"{value('task_train_steps')} inner steps ({value('task_val_steps')} at test)")
    return (f"{value('classes')}-way alphabet tasks, {value('num_pretrain')} meta-training "
            f"alphabets, {value('meta_train_steps')} meta-steps x {value('meta_batch_size')} "
            f"tasks, {value('task_train_steps')} inner steps ({value('task_val_steps')} at test), "
            f"{value('num_filters')} filters")


def _warp_setting(handlers: Sequence[FileHandler]) -> str | None:
    """What sets a warped method's warp layers apart, from the runs' ``args.log``: their
    initialisation and meta-learning rate (``--meta_kwargs warp_lr``, else the one
    ``--outer_kwargs lr`` they share with the initialisation), e.g. ``"identity warp init, warp
    lr 1.0"``; ``None`` for methods without warp layers."""
    notes = set()
    for h in handlers:
        if not (h.setting("meta_model") or "").startswith("warp_"):
            return None
        warp_lr = re.search(r"meta_kwargs=\{[^}]*'warp_lr': ([^,}]+)", h.args)
        outer_lr = re.search(r"outer_kwargs=\{[^}]*'lr': ([^,}]+)", h.args)
        lr = (f"warp lr {warp_lr.group(1)}" if warp_lr else
              f"one meta-lr {outer_lr.group(1) if outer_lr else '?'}")
        notes.add(f"{h.setting('warp_init') or 'random'} warp init, {lr}")
    return notes.pop() if len(notes) == 1 else "mixed settings"


def machine_kind(handlers: Sequence[FileHandler]) -> str:
    """One line naming the machine kind the runs started on (``machine.json``): CPU runs repeat
    bit for bit only on the same kind, so numbers from several kinds are said to be mixed."""
    kinds = {None if h.machine is None else
             (h.machine.get("cpu"), h.machine.get("cpu_capability"), h.machine.get("torch"),
              h.machine.get("threads"), tuple(h.machine.get("cuda") or ()))
             for h in handlers}
    missing = None in kinds
    kinds.discard(None)
    if not kinds:
        return "machine: not recorded (runs older than machine.json)"
    if len(kinds) > 1:
        return (f"machines: {len(kinds)} kinds{' and unrecorded' if missing else ''} "
                "(machine.json): these numbers do not all come from one machine kind")
    cpu, capability, version, threads, cuda = kinds.pop()
    gpus = f", {', '.join(cuda)}" if cuda else ""
    return (f"machine: {cpu} ({capability}), {threads} thread{'s' * (threads != 1)}, torch "
            f"{version}{gpus}{'; some runs unrecorded' if missing else ''}")


def compare(runs: Sequence[str | os.PathLike | FileHandler], out: str | os.PathLike,
            title: str = "Omniglot") -> dict[str, tuple[float, float, int]]:
    """Writes a figure comparing runs; returns ``{method: (mean, std, runs)}`` of test accuracy.

    Left: mean validation accuracy (held-out drawings) over meta-steps per method (mean over
    seeds, shaded standard deviation where there are two seeds or more). Right: final test
    accuracy per method, each run a dot, the standard deviation over seeds where there are two
    or more. The number of seeds is in the legend and under each bar, the runs' scale (from
    ``args.log``) under the title, chance (1 / classes) a dotted line. The file is replaced
    only once written completely.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    handlers = [r if isinstance(r, FileHandler) else FileHandler(r) for r in runs]
    by_method: dict[str, list[FileHandler]] = defaultdict(list)
    for h in handlers:
        by_method[h.method].append(h)
    # the test panel is the wider one: its ticks name each method (and a warped one's setting)
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5), width_ratios=(1, 1.5))
    table: dict[str, tuple[float, float, int]] = {}
    ticks: list[str] = []
    for i, (method, hs) in enumerate(sorted(by_method.items())):
        color = f"C{i % 10}"
        warp = _warp_setting(hs)  # e.g. warp_leap and warp_leap_tuned: say which is which
        named = method if warp is None else f"{method} [{warp}]"
        curves = [h.agg_val("acc", "eval").mean(axis=1) for h in hs
                  if h.val_eval_data is not None]
        if curves:
            length = min(len(c) for c in curves)
            steps = np.asarray(next(h for h in hs if h.val_eval_data is not None)
                               .val_eval_data[0]["step"][:length])
            stack = np.stack([c[:length] for c in curves])
            mean, dev = stack.mean(0), stack.std(0)
            label = f"{named} ({_seeds(len(curves))})"
            if length == 1:  # not meta-trained (``no``): a reference level
                left.axhline(mean[0], color=color, linestyle="--", label=f"{label}, step 0")
            else:
                left.plot(steps, mean, color=color, label=label)
                if len(curves) > 1:
                    left.fill_between(steps, mean - dev, mean + dev, color=color, alpha=0.15,
                                      linewidth=0)
        finals = [h.final_test_acc() for h in hs if h.test_eval_data is not None]
        if finals:
            table[method] = (float(np.mean(finals)), float(np.std(finals)), len(finals))
            x = len(ticks)
            setting = "" if warp is None else "\n" + warp.replace(" warp init, ", "\nwarp init,\n")
            ticks.append(f"{method}{setting}\n{_seeds(len(finals))}")
            # one seed has no spread: no error bar that would read as zero
            right.bar(x, table[method][0], color=color, alpha=0.8,
                      yerr=table[method][1] if len(finals) > 1 else None, capsize=4)
            right.plot([x] * len(finals), finals, "o", color="black", markersize=3)
    chances = {h.chance for h in handlers}
    if len(chances) == 1 and None not in chances:
        chance = chances.pop()
        for ax in (left, right):
            ax.axhline(chance, color="grey", linestyle=":", linewidth=1,
                       label=f"chance (1/{round(1 / chance)})")
    seeds = sorted({n for *_, n in table.values()})
    fig.suptitle(f"{title}\n{_scale(handlers)}; "
                 f"{' or '.join(map(str, seeds)) if seeds else 0} seed(s) per method\n"
                 f"{machine_kind(handlers)}", fontsize=9)
    left.set(xlabel="meta-step", ylabel="validation accuracy (held-out drawings)",
             title="validation tasks: mean over seeds")
    left.legend(fontsize=7)
    right.set_xticks(range(len(ticks)), ticks, fontsize=7)
    right.set(ylabel="test accuracy (held-out drawings)",
              title="test tasks: mean, runs as dots, std over seeds")
    right.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    _save_figure(fig, Path(out))
    plt.close(fig)
    return table


def _save_figure(fig: Any, out: Path) -> None:
    """Writes the figure beside ``out`` and renames it into place: all or nothing."""
    handle, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.",
                                         suffix=out.suffix)
    os.close(handle)
    try:
        fig.savefig(temporary, dpi=80, format=out.suffix[1:].lower())
        os.chmod(temporary, 0o644)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _check_out(out: str) -> None:
    """``--out``: a file in an existing folder, in a format matplotlib writes."""
    from matplotlib.figure import Figure

    formats = sorted(Figure().canvas.get_supported_filetypes())
    path = Path(out)
    if path.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as {path / 'cmp.png'}")
    if not path.parent.is_dir():
        raise UsageError(f"--out {out}: folder {path.parent} does not exist; create it first")
    if path.suffix[1:].lower() not in formats:
        raise UsageError(f"--out {out}: unknown image format {path.suffix or '(none)'!r}; end "
                         f"the name with one of .{', .'.join(formats)}")


def _run_folders(paths: Sequence[str]) -> list[str]:
    """The run folders among ``paths``: a missing path is an error (a typo would otherwise
    drop a run from the comparison); run_multi's ``<suffix>.out`` files, which shell globs
    such as ``logs/*/n4_s*`` also match, are skipped."""
    folders = []
    for text in paths:
        path = Path(text)
        if path.is_dir():
            folders.append(text)
        elif not path.exists():
            raise UsageError(f"run folder {text} does not exist; run folders are "
                             "<log_dir>/<meta_model>/<suffix>")
        elif path.suffix != ".out":
            raise UsageError(f"{text} is a file; give run folders <log_dir>/<meta_model>/<suffix>")
    if not folders:
        raise UsageError("no run folders given; run folders are <log_dir>/<meta_model>/<suffix>")
    return folders


def make_parser() -> argparse.ArgumentParser:
    """``monitor.py compare RUN... --out PNG`` and ``monitor.py summary RUN...``."""
    parser = ArgumentParser("monitor.py", description="Omniglot log tools")
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser("compare", help="plot runs side by side into an image")
    cmp.add_argument("runs", nargs="+", help="run folders <log_dir>/<meta_model>/<suffix>")
    cmp.add_argument("--out", required=True,
                     help="image file (.png, .pdf, .svg, ...) in an existing folder")
    cmp.add_argument("--title", default="Omniglot", help="figure title")
    summ = sub.add_parser("summary", help="print final test accuracy per method")
    summ.add_argument("runs", nargs="+", help="run folders <log_dir>/<meta_model>/<suffix>")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """``monitor.py compare RUN... --out PNG`` and ``monitor.py summary RUN...``."""
    args = make_parser().parse_args(argv)
    with user_input():  # the folders and files named on the command line
        runs = _run_folders(args.runs)
        if args.command == "compare":
            _check_out(args.out)
        handlers = [FileHandler(r) for r in runs]
        for h in handlers:
            if h.test_eval_data is not None:
                h.final_test_acc()  # incomplete test logs fail here, as bad input
    if args.command == "compare":
        table = compare(handlers, args.out, args.title)
    else:
        table = {m: (float(np.mean(v)), float(np.std(v)), len(v))
                 for m, v in summarize(handlers).items()}
    print(machine_kind(handlers))
    print(f"{'method':>10} {'test acc':>9} {'std':>7} {'runs':>5}")
    for method, (mean, dev, n) in sorted(table.items(), key=lambda kv: -kv[1][0]):
        spread = f"{dev:7.4f}" if n > 1 else f"{'-':>7}"  # one run has no spread to show
        print(f"{method:>10} {mean:9.4f} {spread} {n:5d}" if math.isfinite(mean) else method)


if __name__ == "__main__":
    run_command(main)
