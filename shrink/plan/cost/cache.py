"""The cost table cache: one JSON file per key in a folder; a file for another key is rebuilt."""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from torch import nn

from shrink.errors import ShrinkError
from shrink.plan.cost.build import build_cost_table
from shrink.plan.cost.key import CostKey, cost_key_for
from shrink.plan.cost.table import SCHEMA, CostTable
from shrink.plan.cost.timing import torch_threads

__all__ = ["cache_path", "cached_cost_table"]

_logger = logging.getLogger(__name__)


def cache_path(cache_dir: str | Path, key: CostKey) -> Path:
    """One file per model, input, device, dtype, batch, threads and runtime (versions are checked inside)."""
    raw = (f"{key.model}_{'x'.join(map(str, key.input_size))}_{key.device}_{key.dtype}_b{key.batch_size}_"
           f"t{key.threads or 'default'}_{key.runtime}")
    return Path(cache_dir) / (re.sub(r"[^A-Za-z0-9._-]+", "-", raw) + ".json")


def _older_schema(path: Path) -> str | None:
    """The schema of a cost table file written in another (earlier) layout, else None."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    schema = d.get("schema") if isinstance(d, dict) else None
    ours = SCHEMA.split("/")[0] + "/"
    return schema if isinstance(schema, str) and schema.startswith(ours) and schema != SCHEMA else None


def cached_cost_table(model: nn.Module, model_name: str, *, cache_dir: str | Path, device: str = "cpu",
                      dtype: str = "fp32", batch_size: int = 16, threads: int | None = None, runtime: str = "eager",
                      img_size: int | None = None, rebuild: bool = False, token_step: int = 8, repeats: int = 5,
                      warmup: int = 2, progress: bool = True, smooth: bool = True) -> CostTable:
    """The table for these settings from ``cache_dir``, or built and saved there.

    A cached file for another key (other library versions, another CPU) is never used: its one-line
    reason is logged and the table is rebuilt; an unreadable or corrupt file is a ShrinkError (delete
    it or pass ``rebuild=True``)."""
    key = cost_key_for(model, model_name, device=device, dtype=dtype, batch_size=batch_size, threads=threads,
                       runtime=runtime, img_size=img_size)
    path = cache_path(cache_dir, key)
    older = _older_schema(path) if path.exists() and not rebuild else None
    if older:
        _logger.warning("cost table %s was written by another version of shrink (%s): rebuilding it", path, older)
    elif path.exists() and not rebuild:
        try:
            table = CostTable.load(path, expect=None)
        except ShrinkError as e:
            raise ShrinkError(f"{e} (delete it or rebuild the table)") from None
        diff = table.key.differences(key)
        if not diff:
            _logger.info("cost table: using %s", path)
            return table
        _logger.warning("cost table %s was measured for another setting (%s): rebuilding it", path, "; ".join(diff))
    with torch_threads(threads):
        table = build_cost_table(model, key, token_step=token_step, repeats=repeats, warmup=warmup, progress=progress,
                                 smooth=smooth)
    table.save(path)
    _logger.info("cost table: built in %.0f s, saved to %s", table.info["build_s"], path)
    return table
