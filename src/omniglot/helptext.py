"""``-h`` of the Omniglot commands: every flag with its default."""

from __future__ import annotations

import argparse
import copy

__all__ = ["HelpFormatter"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, which skips flags without help text; this one shows their
    default too (``--num_filters NUM_FILTERS  (default: 64)``). A ``None`` default (the help
    says what applies) and the ``False`` of an on/off switch are not shown."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings:
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or (action.default is False and action.nargs == 0):
            return action.help
        return super()._get_help_string(action)
