"""-h of main.py, run_multi.py and monitor.py: every flag says what it is or its default."""

import argparse

import pytest

import main
import monitor
import run_multi


def _parsers():
    yield "main.py", main.make_parser()
    yield "run_multi.py", run_multi.make_parser()
    top = monitor.make_parser()
    yield "monitor.py", top
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    yield from ((f"monitor.py {name}", p) for name, p in sub.choices.items())


@pytest.mark.parametrize(("name", "parser"), list(_parsers()), ids=lambda v: str(v)[:20])
def test_every_flag_shows_help_and_default(name, parser):
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        text = " ".join(formatter._format_action(action).split())
        invocation = " ".join(formatter._format_action_invocation(action).split())
        assert text.startswith(invocation) and text[len(invocation):].strip(), (
            f"{name} {invocation}: no help text")
        if action.default not in (None, False) and action.option_strings:
            assert f"(default: {action.default})" in text, f"{name} {action.dest}: {text}"


def test_defaults_the_issue_named_are_shown():
    help_text = " ".join(main.make_parser().format_help().split())
    assert "meta-training alphabets (default: 30)" in help_text
    assert "meta-steps (default: 1000)" in help_text
    assert "--num_filters NUM_FILTERS (default: 64)" in help_text
