"""User-facing errors.

Every mistake a user can make in a recipe (a misspelled backbone, a domain that does not exist, an output
directory that holds another run) is raised as :class:`DGZooError` with a one-line message that names the
problem and the fix. The command line prints that line and exits with status 2, before any training starts.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import os
import shutil
from collections.abc import Iterable, Iterator


class DGZooError(Exception):
    """A problem with the user's input, reported as one line that says how to fix it."""

    exit_code = 2  # what the command line exits with

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def suggest(word: str, choices: Iterable[str], n: int = 3) -> str:
    """Return a ' (did you mean: a, b?)' hint for ``word`` among ``choices``, or '' when nothing is close."""
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(word), choices, n=n, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in choices}
        close = [lowered[c] for c in difflib.get_close_matches(str(word).lower(), list(lowered), n=n, cutoff=0.6)]
    return f" (did you mean: {', '.join(close)}?)" if close else ""


class Interrupted(DGZooError):
    """The user stopped a command (Ctrl-C); the message says how to continue where it stopped."""

    exit_code = 130  # the shell's convention for SIGINT


# Operating-system write errors a user can fix (space, permissions, a read-only mount, a too-long name), with the
# cause in words and what to do. Any other OSError is a bug or a hardware fault and keeps its traceback.
_WRITE_CAUSES = {
    errno.ENOSPC: ("no space left on the device", "free space there or write somewhere else"),
    errno.EDQUOT: ("disk quota exceeded", "free space there or write somewhere else"),
    errno.EROFS: ("the file system is read-only", "write to a writable directory"),
    errno.EACCES: ("permission denied", "write to a directory you may write to"),
    errno.EPERM: ("operation not permitted", "write to a directory you may write to"),
    errno.ENAMETOOLONG: ("a name in the path is too long", "use a shorter directory or file name"),
}


class WriteFailed(DGZooError):
    """The operating system refused to write a file (no space, read-only, permission, name too long)."""

    exit_code = 1  # not a mistake in the command: the same command works once the cause is fixed


def write_error(error: BaseException, path: str | os.PathLike | None = None) -> WriteFailed | None:
    """The one-line :class:`WriteFailed` for an OS write error (naming the path and the cause), or None when
    ``error`` is not one a user can fix."""
    if not isinstance(error, OSError) or error.errno not in _WRITE_CAUSES:
        return None
    cause, fix = _WRITE_CAUSES[error.errno]
    where = path if path is not None else error.filename  # the file meant, rather than its temporary name
    return WriteFailed(
        f"cannot write {where if where is not None else 'a file'}: {cause}; {fix}, then run the command again"
    )


@contextlib.contextmanager
def writing(path: str | os.PathLike, cleanup: Iterable[str | os.PathLike] = ()) -> Iterator[None]:
    """Turn an OS write error inside the block into one line naming ``path`` (:func:`write_error`), after removing
    the temporary files or directories ``cleanup`` so that a failed write leaves nothing half-written behind."""
    try:
        yield
    except OSError as e:
        failed = write_error(e, path)
        if failed is None:
            raise
        for leftover in cleanup:
            if os.path.isdir(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.remove(leftover)
        raise failed from None
