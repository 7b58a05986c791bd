"""The one exception type for errors a user can cause (bad flags, bad files, wrong model)."""


class ShrinkError(Exception):
    """A user-facing error with a one-line message; the CLIs print it and exit with code 2."""
