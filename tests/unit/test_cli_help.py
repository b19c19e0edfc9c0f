"""Every command's --help explains every argument: none is left without a line of help."""

from __future__ import annotations

import argparse

import pytest

from headscope.cli import build_parser


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) for every command and sub-command."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


def test_every_argument_of_every_command_has_help():
    missing = [
        f"headscope {' '.join(path)} {action.option_strings[-1] if action.option_strings else action.dest}"
        for path, parser in _commands(build_parser())
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction | argparse._SubParsersAction)
        and not action.help
    ]
    assert not missing, "arguments without help:\n" + "\n".join(missing)


@pytest.mark.parametrize("words", [("demo",), ("serve",), ("export", "static"), ("precompute",)])
def test_help_shows_defaults_once(words, capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*words, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "(default: None)" not in out
    for line in out.splitlines():
        assert line.count("(default:") <= 1, line
