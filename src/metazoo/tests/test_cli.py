"""The command-line error convention: bad input is one line and exit 2, bugs keep tracebacks."""

import pytest

from metazoo import NonFiniteError
from metazoo.cli import UsageError, run_command, user_input


def test_user_input_turns_value_errors_into_usage_errors():
    with pytest.raises(UsageError, match="--lr 'x'") as info, user_input():
        raise ValueError("--lr 'x' is not a number; pass a float")
    assert isinstance(info.value.__cause__, ValueError)


def test_user_input_leaves_other_errors_alone():
    with pytest.raises(RuntimeError, match="bug") as info, user_input():
        raise RuntimeError("bug")
    assert not isinstance(info.value, UsageError)


@pytest.mark.parametrize("error", [UsageError("--seed 'x': pass an integer"),
                                   NonFiniteError(task=1, inner_step=2, where="inner")])
def test_run_command_prints_one_line_and_exits_2(error, capsys):
    def main():
        raise error

    with pytest.raises(SystemExit) as info:
        run_command(main)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: {error}\n"
    assert "Traceback" not in err


def test_run_command_reports_a_lost_peer_in_one_line_with_exit_1(capsys):
    from metazoo.distributed import PeerLostError

    def main():
        try:
            raise RuntimeError("[pair.cc:561] Connection closed by peer [127.0.0.1]:41152")
        except RuntimeError as gloo:
            raise PeerLostError("rank 0: another process of the distributed run exited") \
                from gloo

    with pytest.raises(SystemExit) as info:
        run_command(main)
    assert info.value.code == 1
    assert capsys.readouterr().err == ("error: rank 0: another process of the distributed run "
                                       "exited\n")


def test_run_command_keeps_internal_errors_and_returns_results():
    def broken():
        raise RuntimeError("Expected all tensors to be on the same device")

    with pytest.raises(RuntimeError, match="same device"):
        run_command(broken)
    assert run_command(lambda x, *, y: x + y, 1, y=2) == 3


def test_argument_parser_errors_are_one_line_naming_flag_and_value(capsys):
    from metazoo.cli import ArgumentParser

    parser = ArgumentParser("tool.py")
    parser.add_argument("--seed", type=int, default=1)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("plot").add_argument("--window", type=int, default=3)
    for argv, named in ((["--seed", "x"], "--seed: invalid int value: 'x'"),
                        (["plot", "--window", "y"], "--window: invalid int value: 'y'")):
        with pytest.raises(SystemExit) as info:
            parser.parse_args(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: argument ") and named in err
        assert "usage:" not in err and "-h lists every flag" in err
    assert "(default: 1)" in parser.format_help()


@pytest.mark.parametrize("value", ["-inf", "-Infinity", "-nan", "-1e-3", "-2.5E+4", "-.5", "-7"])
def test_negative_numbers_of_every_form_are_values_not_flag_names(value, capsys):
    """Issue 28 item 8: '--lr -inf' failed with 'expected one argument' (argparse took -inf
    for a flag), so the check naming the value and the fix never ran."""
    from metazoo.cli import ArgumentParser

    parser = ArgumentParser("tool.py")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--kwargs", nargs="+")
    assert str(parser.parse_args(["--lr", value]).lr) == str(float(value))
    assert parser.parse_args(["--kwargs", "lr", value]).kwargs == ["lr", value]
    with pytest.raises(SystemExit):
        parser.parse_args(["--lr", "-x"])  # still a (unknown) flag
    assert "argument --lr: expected one argument" in capsys.readouterr().err
