"""How every `fedcare` command reports a FedcareError, and the exit code it ends with.

One convention for all subcommands (README, "Exit codes"):

* 0 -- done: the data is ready, the run finished, the check passed;
* 1 -- the data, the run or what was checked has a problem the user must fix (a table a node could
  not train on, a hospital's refusal, an exhausted budget, a log that does not verify);
* 2 -- a usage error: the command line or a settings file is wrong (click's own usage errors exit 2).

The problem and hint name the user's paths, column names and schema sections, so they are printed
as plain text (a rich ``Text``), never parsed as markup: ``[/x]`` in a folder name neither crashes
rich nor is ``[numeric.age]`` eaten. One line on stderr, never a traceback.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import typer
from rich.console import Console
from rich.text import Text

from fedcare.errors import FedcareError

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2


def stderr_console() -> Console:
    """A console on stderr, wide enough not to wrap a one-line error in a log file or CI."""
    return Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def error_text(error: FedcareError) -> Text:
    """``error: PROBLEM -> HINT`` as styled plain text (the user's text is never markup)."""
    text = Text.assemble(("error:", "bold red"), " ", error.problem)
    if error.hint:
        text.append_text(Text.assemble(" ", ("->", "yellow"), " ", error.hint))
    return text


def print_error(error: FedcareError) -> None:
    """Print ``error`` as one line on stderr."""
    stderr_console().print(error_text(error), soft_wrap=True, highlight=False)


def fail(error: FedcareError, code: int = EXIT_PROBLEM) -> NoReturn:
    """Print ``error`` and end the command with ``code`` (EXIT_PROBLEM unless it is a usage error)."""
    print_error(error)
    raise typer.Exit(code)


def usage_error(problem: str, hint: str = "") -> NoReturn:
    """End the command with EXIT_USAGE: the command line or a settings file is wrong."""
    fail(FedcareError(problem, hint), EXIT_USAGE)
