"""shrink.precision: precision names (and their aliases) to torch dtypes."""
from __future__ import annotations

import pytest
import torch

from shrink.errors import ShrinkError
from shrink.precision import DTYPES, dtype_of


@pytest.mark.parametrize("name, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16),
                                         ("no", torch.float32), ("off", torch.float32)])
def test_names_and_aliases(name, dtype):
    assert dtype_of(name) is dtype


def test_the_table_lists_the_three_precisions():
    assert set(DTYPES) == {"fp32", "bf16", "fp16"}


def test_unknown_name_is_a_one_line_error_listing_the_choices():
    with pytest.raises(ShrinkError, match="unknown precision 'fp8'; choose from fp32, bf16, fp16"):
        dtype_of("fp8")
