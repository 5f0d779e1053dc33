"""Command-line conventions shared by the experiments' entry points.

Bad input from the person at the keyboard (a flag's value, a missing file, a run folder that
does not match the flags) is reported as one ``error: ...`` line naming the flag, the value and
the fix, with exit code 2. Everything else is a bug or a fault and keeps its traceback. The two
are told apart by type, not by guessing from ``ValueError``/``RuntimeError``: commands raise
``UsageError`` for bad input, or validate their input inside ``user_input()``, which turns the
library's ``ValueError`` (its constructors' argument checks) into ``UsageError`` while the run
is being set up. This module is the one place in the core that prints.
"""

from __future__ import annotations

import argparse
import copy
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from metazoo.distributed import PeerLostError
from metazoo.faults import NonFiniteError

__all__ = ["ArgumentParser", "HelpFormatter", "UsageError", "fail_usage", "run_command",
           "user_input"]


class UsageError(ValueError):
    """Bad input to a command: printed as one ``error:`` line, exit code 2, no traceback.

    A ``ValueError``, so callers of a command's ``main`` that catch bad values still do.
    """


def fail_usage(message: str) -> NoReturn:
    """Prints ``error: message`` to stderr and exits with code 2 (argparse's convention)."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


@contextmanager
def user_input() -> Iterator[None]:
    """Treats a ``ValueError`` raised inside the block as bad input (``UsageError``).

    Wrap the set-up that only depends on the user's flags (building the data set and the
    learner from them), not training: a ``ValueError`` in a training step is a bug.
    """
    try:
        yield
    except UsageError:
        raise
    except ValueError as err:
        raise UsageError(str(err)) from err


def run_command(main: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Calls a command's ``main``; bad input and non-finite runs end in one line and exit 2.

    ``NonFiniteError`` is reported the same way: it names the meta-step, the task and the fix
    (lower the learning rates, or skip such tasks), and a traceback would add nothing to that.
    ``distributed.PeerLostError`` (another process of a torchrun run died) is one line with exit
    code 1: the cause and its traceback are in that other process's log. Every other exception
    propagates with its traceback.
    """
    try:
        return main(*args, **kwargs)
    except (UsageError, NonFiniteError) as err:
        fail_usage(str(err))
    except PeerLostError as err:
        # Another rank's failure, not this process's: its log has the traceback that matters.
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``-h`` with every flag's default: argparse's defaults formatter skips flags without help
    text; this one shows their default too (``--num_filters NUM_FILTERS  (default: 64)``). A
    ``None`` default (the help says what applies) and the ``False`` of an on/off switch are not
    shown."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings:
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or (action.default is False and action.nargs == 0):
            return action.help
        return super()._get_help_string(action)


_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$",
                              re.IGNORECASE)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser with one-line errors and every default in ``-h``.

    argparse prints the whole usage (dozens of lines for an experiment's flags) before its error;
    here a bad flag or value is the ``error:`` line alone, naming the flag and value, and points
    to ``-h``. Sub-commands (``add_subparsers``) get the same parser class.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        # argparse takes "-inf", "-1e-3" and "-nan" for flag names (its pattern only knows
        # "-1" and "-.5"), so "--lr -inf" failed with "expected one argument" instead of
        # reaching the check that names the value and the fix.
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message: str) -> NoReturn:
        fail_usage(f"{message} ({self.prog} -h lists every flag)")
