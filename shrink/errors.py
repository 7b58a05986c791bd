"""The one exception type for errors a user can cause (bad flags, bad files, wrong model), and its message."""


class ShrinkError(Exception):
    """A user-facing error with a one-line message; the CLIs print it and exit with code 2."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
