"""shrink.errors: the user-error type and the first line of a message."""
from __future__ import annotations

import pytest

from shrink.errors import ShrinkError, first_line


def test_first_line_of_a_multi_line_message():
    assert first_line(ValueError("  bad value\nmore detail\n")) == "bad value"


def test_empty_message_gives_the_type_name():
    assert first_line(RuntimeError()) == "RuntimeError"
    assert first_line(ShrinkError("   ")) == "ShrinkError"


def test_shrink_error_is_an_exception_with_its_message():
    with pytest.raises(Exception, match="one line") as info:
        raise ShrinkError("one line")
    assert isinstance(info.value, ShrinkError)
