"""One mapping from failures to a message line and an exit status, applied by the `sdq`
group to every command (the table is in docs/cli.md)."""
from __future__ import annotations

import click

from sdq.core.errors import CheckFailed, InvalidInput, NotFound, Refused, Unavailable

OK = 0
FAILED = 1
"""The command ran and something failed or was refused (an image failed, a check did not
pass, a name is taken), or an error no command expected."""
BAD_INPUT = 2
"""Bad usage or input: options, prompt files, checkpoints, the config file (Click's own
usage errors exit 2 too)."""
NOT_FOUND = 3
"""A job, item, schedule or model named on the command line does not exist."""
UNAVAILABLE = 4
"""The database, image store or broker cannot be reached or has the wrong schema: trying
again later, or fixing the setting, may help."""

_KINDS: tuple[tuple[type[Exception], int], ...] = (
    (InvalidInput, BAD_INPUT), (NotFound, NOT_FOUND), (Unavailable, UNAVAILABLE),
    (Refused, FAILED), (CheckFailed, FAILED))


def _unreachable_service(exc: Exception) -> bool:
    """Database and broker client errors that no layer turned into `Unavailable` (imported
    here, on the error path only, so that starting a command never pays for them)."""
    from kombu.exceptions import OperationalError
    from sqlalchemy.exc import SQLAlchemyError

    return isinstance(exc, (SQLAlchemyError, OperationalError))


def exit_code_of(exc: Exception) -> int | None:
    """The exit status of an expected failure; None for an error no command expected."""
    for kind, code in _KINDS:
        if isinstance(exc, kind):
            return code
    return UNAVAILABLE if _unreachable_service(exc) else None


class CommandFailed(click.ClickException):
    """A failure as one line, `Error: ...`, with the exit status of its kind."""

    def __init__(self, message: str, exit_code: int = FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    @classmethod
    def of(cls, exc: Exception, context: str | None = None, *,
           code: int | None = None) -> CommandFailed:
        """`exc` as one line (prefixed by `context`, e.g. the option it came from), with the
        exit status of its kind, else `code` (a command that expects it), else that of an
        unexpected error, whose line says so and points at `--debug`."""
        detail = str(getattr(exc, "orig", None) or exc).strip()
        line = detail.splitlines()[0] if detail else type(exc).__name__
        known = exit_code_of(exc)
        if known is None and code is None:
            line += f" (unexpected {type(exc).__name__}; `sdq --debug ...` shows the traceback)"
        line = f"{context}: {line}" if context else line
        return cls(line, known if known is not None else FAILED if code is None else code)


class Reported(click.exceptions.Exit):
    """`cause`, which the command has reported already in its own lines (each problem of a
    prompt file, the checks that did not pass, the images that failed): no `Error:` line is
    added, and the exit status is that of `cause`'s kind."""

    def __init__(self, cause: Exception) -> None:
        code = exit_code_of(cause)
        super().__init__(FAILED if code is None else code)
        self.cause = cause
