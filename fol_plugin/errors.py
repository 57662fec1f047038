"""Errors meant for the user, and what a user sees of them: one line naming the value and the
fix, without the traceback that torch's DataLoader wraps around an error raised in one of its
workers. The command line and the benchmark's table rows use these; no heavy imports."""
from __future__ import annotations


class UserError(Exception):
    """An error the user can fix (a setting, an input, the disk): one line naming the value and
    the fix, no traceback. Every error class of fol-plugin meant for the user derives from it."""


# What a user can fix: our errors, and the built-in ones raised for bad settings and inputs
# (``ValueError`` with the value and the fix, a missing or unwritable file). Anything else is a bug
# and keeps its traceback in the log (a CUDA failure, a RuntimeError of torch).
USER_ERROR_TYPES = (UserError, ValueError, FileNotFoundError, FileExistsError, PermissionError)


def is_user_error(error: BaseException) -> bool:
    return isinstance(error, USER_ERROR_TYPES)

WORKER_TRACEBACK = "Original Traceback"  # how torch's DataLoader wraps an error raised in a worker


def user_message(error: BaseException) -> str:
    """One line for the user: an OSError names its file, and an error re-raised from a DataLoader
    worker (whose message carries the worker's traceback) keeps its last line only."""
    if isinstance(error, OSError) and error.filename and str(error.filename) not in str(error.args[-1]):
        hint = "; check its permissions, or choose another path" if isinstance(error, PermissionError) else ""
        return f"{error.strerror or error}: {error.filename}{hint}"
    message = str(error)
    if WORKER_TRACEBACK in message:
        last = message.strip().splitlines()[-1]
        names = {type(error).__name__, f"{type(error).__module__}.{type(error).__qualname__}"}
        kind, separator, rest = last.partition(": ")
        return rest if separator and kind in names else last
    return message
