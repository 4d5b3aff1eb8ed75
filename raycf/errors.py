"""The one exception type that means "the user gave us bad input".

Everything that validates input raises :class:`UserError` with a single line
naming the file, field or value and what was expected.  The command line turns
it into exit code 2 and that line on stderr, with no traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: a missing file, a malformed study, an unknown architecture, ...

    The message is one line, shown to the user as is.
    """

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def find_user_error(error: BaseException) -> UserError | None:
    """Return the :class:`UserError` behind ``error``, looking through Ray's wrappers.

    Ray re-raises a worker's exception wrapped (``RayTaskError``, Train's
    ``WorkerGroupError`` keeps a dict of per-rank errors, ``TuneError`` chains
    the cause).  Bad input found inside a worker (a corrupt image in a shard)
    should still reach the user as exit code 2 and one line.
    """
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, UserError):
            return current
        worker_failures = getattr(current, "worker_failures", None)
        if isinstance(worker_failures, dict):
            pending.extend(e for e in worker_failures.values() if isinstance(e, BaseException))
        for attribute in ("cause", "__cause__", "__context__"):
            linked = getattr(current, attribute, None)
            if isinstance(linked, BaseException):
                pending.append(linked)
    return None
