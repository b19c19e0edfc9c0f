"""The ``headscope`` command line.

Thin: every live operation's subcommand is generated from the operation table
(:mod:`headscope.operations`, see :mod:`.live`) — its flags from the request model's fields, its
text from the operation's formatter — and each other subcommand (:mod:`.runs`,
:mod:`.research`) parses its flags and calls one library function. Every expected failure is a
:class:`~headscope.errors.HeadscopeError` and ends as one line on stderr with the error's exit
code; so do Ctrl-C (exit 130) and a closed pipe.
"""

from __future__ import annotations

import argparse
import os
import sys

from headscope.cli.common import GROUPS, command, model_args
from headscope.cli.experiments import add_experiment_commands
from headscope.cli.live import live_parser
from headscope.cli.research import add_research_commands
from headscope.cli.runs import add_run_commands, info
from headscope.errors import HeadscopeError
from headscope.operations import OPERATIONS

INTERRUPTED = {
    "precompute": "the run resumes from its last checkpoint when you run the same command again",
    "demo": "run it again to resume",
}


def build_parser() -> argparse.ArgumentParser:
    GROUPS.clear()
    p = argparse.ArgumentParser(
        prog="headscope",
        description="See what every attention head of a transformer language model does, "
        "across a whole dataset, and why.",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    model_args(command(sub, "info", info, "architecture summary of a model"))
    for op in OPERATIONS:
        if op.cli:
            live_parser(sub, op)
    add_run_commands(sub)
    add_research_commands(sub)
    add_experiment_commands(sub)
    return p


def _command_name(args: argparse.Namespace) -> str:
    sub = getattr(args, f"{args.cmd}_cmd", None)
    return f"{args.cmd} {sub}" if sub else args.cmd


def _quiet_stdout() -> None:
    """After a closed pipe (``headscope ... | head``): send the rest to /dev/null, no traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    name = _command_name(args)
    try:
        args.handler(args)
        sys.stdout.flush()
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except HeadscopeError as err:
        print(f"headscope {name}: error: {err}", file=sys.stderr)
        return err.exit_code
    except (OSError, ValueError) as err:  # a path or value the library refused
        print(f"headscope {name}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = INTERRUPTED.get(name)
        print(f"\nheadscope {name}: interrupted{'; ' + hint if hint else ''}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
