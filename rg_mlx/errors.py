"""The one exception type for problems a user can fix (bad input, missing files)."""


class RGError(Exception):
    """A user-facing error: its message is one line naming the problem and the fix."""
