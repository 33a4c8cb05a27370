"""The one exception type for problems a user can fix (bad input, missing files)."""


class RGError(Exception):
    """A user-facing error: its message is one line naming the problem and the fix."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (library errors can span many), or its type's name."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
