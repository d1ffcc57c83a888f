"""Pre-flight refusals shared by the command lines: one line on stderr, exit code 2.

A refusal is an error the user can fix by changing the command: a bad input file (`InputError`),
a config key that does not exist or has the wrong type (`ConfigError`), an output that exists
(`FileExistsError`, or an `InputError` naming the output), a file that is missing, a checkpoint
written by another config (`CheckpointMismatch`) or a value out of range (`ValueError`). Each
launcher runs its work through `run_cli`, so the process prints `error: <message>` and exits 2
instead of a traceback; any other exception is a bug and keeps its traceback.

Usage in a launcher:
    def main(argv=None) -> int:
        args = build_parser().parse_args(argv)
        return run_cli(lambda: job(args.input, args.out, ...))
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from engine.io.errors import InputError

EXIT_BAD_INPUT = 2  # argparse uses 2 for a bad command line too


def refusal_types() -> tuple[type[BaseException], ...]:
    """The exception types that mean "refused input" rather than "bug"."""
    from engine.config import ConfigError
    from engine.runtime.checkpoint import (
        CheckpointMismatch,  # lazy: it imports torch (every launcher does)
    )

    return (InputError, ConfigError, CheckpointMismatch, FileExistsError, FileNotFoundError, ValueError)


def refusal_message(error: BaseException) -> str:
    """`error: <message>`; one line except a checkpoint refusal, whose config diff follows it."""
    from engine.runtime.checkpoint import CheckpointMismatch

    text = str(error).strip() or type(error).__name__
    if not isinstance(error, CheckpointMismatch):
        text = " ".join(text.split("\n"))
    return f"error: {text}"


def run_cli(work: Callable[[], int | None], stream: TextIO | None = None) -> int:
    """Run `work()`; a refusal (see `refusal_types`) prints one line and returns EXIT_BAD_INPUT.

    Returns `work()`'s exit code (None counts as 0). Other exceptions propagate with a traceback.
    """
    try:
        code = work()
    except refusal_types() as error:
        print(refusal_message(error), file=stream or sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return 0 if code is None else int(code)


__all__ = ["EXIT_BAD_INPUT", "refusal_message", "refusal_types", "run_cli"]
