"""The kinds of failure a user can cause and fix, shared by every layer (importable without
torch). Library errors derive from one kind; the CLI maps each kind to one exit status in one
place (`sdq.cli.errors`), so the same mistake exits the same way in every command."""
from __future__ import annotations


class SdqError(Exception):
    """A failure whose message, one line, tells the user what to fix."""


class InvalidInput(SdqError, ValueError):
    """A value, a file or a setting that sdq cannot use as it is."""


class NotFound(SdqError, LookupError):
    """A name or id that names nothing: a job, an item, a schedule, a model."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


class Unavailable(SdqError, RuntimeError):
    """The database, the image store or the broker cannot be reached or used as it is now."""


class Refused(SdqError, ValueError):
    """A request that contradicts the recorded state (a name taken, a job still running)."""


class CheckFailed(SdqError):
    """What was run, checked or waited for did not all succeed: an image failed, a check did
    not pass, an image is not there yet, a wait was stopped."""
