"""How the Omniglot commands report progress: durations that stay readable past a day, the
estimate (and the warning) ``main.py`` prints after its first meta-step, and the reading of
``main.py``'s progress lines that ``run_multi.py`` shows on its console.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["LONG_RUN_SECONDS", "StepProgress", "estimate_lines", "format_duration",
           "parse_step_line"]

# Meta-training on a CPU estimated above this gets a warning naming the presets that fit.
LONG_RUN_SECONDS = 3 * 3600
_DAY = 86400

# main.py's progress line: "[step 40/100] meta_loss ... | 1.23 s/step, eta 0:01:14"
_STEP_LINE = re.compile(r"^\[step (\d+)/(\d+)\].*\|\s*([0-9.]+) s/step, eta (.+?)\s*$")


def format_duration(seconds: float) -> str:
    """``HH:MM:SS`` below a day, ``D d H h`` from a day on (``time.strftime('%H:%M:%S',
    time.gmtime(s))`` wraps: 36.5 h printed as 12:30:00); ``?`` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    whole = int(seconds + 0.5)
    if whole < _DAY:
        hours, rest = divmod(whole, 3600)
        return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"
    days, rest = divmod(whole, _DAY)
    hours = int(rest / 3600 + 0.5)
    if hours == 24:
        days, hours = days + 1, 0
    return f"{days} d {hours} h"


def estimate_lines(seconds_per_step: float, steps: int, on_cpu: bool) -> list[str]:
    """What ``main.py`` prints after its first meta-step: the estimated meta-training time and,
    for a CPU run estimated above ``LONG_RUN_SECONDS``, a warning naming what fits instead."""
    total = seconds_per_step * steps
    lines = [f"estimated meta-training time: {format_duration(total)} ({seconds_per_step:.2f} "
             f"s/step from the first meta-step x {steps} steps; validation and test add to it)"]
    if on_cpu and total > LONG_RUN_SECONDS:
        lines.append(
            f"warning: at this speed meta-training takes about {format_duration(total)} on this "
            "CPU. On a CPU, run the scaled-down preset (README.md, 'Two commands': every "
            "method, minutes per run); the full protocol needs a GPU (src/omniglot/README.md, 'Set "
            "up and run'). Ctrl-C stops this run; --resume continues it from its checkpoint.")
    return lines


@dataclass(frozen=True)
class StepProgress:
    """One progress line of ``main.py``."""

    step: int
    steps: int
    seconds_per_step: float
    eta: str


def parse_step_line(line: str) -> StepProgress | None:
    """The step, total, rate and ETA of a ``main.py`` progress line; ``None`` for other lines."""
    match = _STEP_LINE.match(line.strip())
    if match is None:
        return None
    step, steps, rate, eta = match.groups()
    return StepProgress(int(step), int(steps), float(rate), eta)
