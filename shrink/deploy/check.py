"""The ONNX graph check: which nodes belong to which block, and that removed attention is gone."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

from shrink.blocks.parts import removed_names
from shrink.deploy.metadata import require_deploy_extra
from shrink.errors import ShrinkError

__all__ = ["ATTENTION_OPS", "attention_nodes", "check_attention_free"]

ATTENTION_OPS = ("Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention")


def _scopes(node: Any) -> list[str]:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                return [str(s) for s in json.loads(p.value.replace("'", '"'))]
            except json.JSONDecodeError:
                return re.findall(r"'([^']*)'", p.value)
    return []


_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)(?:\.(\w+))?")


def attention_nodes(model_proto: Any, layers: Sequence[int] | None = None) -> dict[int, list[str]]:
    """Attention nodes per block of an exported ONNX graph: ``{block: ["OpType name", ...]}``.

    A node counts as attention of block i when its module scope is inside ``blocks.i.attn`` /
    ``.norm1`` / ``.ls1`` (the removed sublayer), or when it is an attention operator (Softmax,
    Attention, MultiHeadAttention) anywhere in ``blocks.i``. ``layers`` limits the blocks reported.
    A graph whose nodes carry no module scopes raises (the check would pass vacuously).
    """
    nodes = list(model_proto.graph.node)
    if nodes and not any(_scopes(n) for n in nodes):
        raise ShrinkError("the ONNX graph carries no module scopes (pkg.torch.onnx.name_scopes): cannot "
                          "attribute nodes to blocks")
    wanted = None if layers is None else {int(i) for i in layers}
    out: dict[int, list[str]] = {i: [] for i in sorted(wanted)} if wanted is not None else {}
    removed = removed_names()  # what the block contract removes, every registered family
    for n in nodes:
        block, part = None, None
        for s in _scopes(n):
            m = _BLOCK_RE.search(s)
            if m:
                block = int(m.group(1))
                part = m.group(2) or part
        if block is None or (wanted is not None and block not in wanted):
            continue
        if part in removed or n.op_type in ATTENTION_OPS:
            out.setdefault(block, []).append(f"{n.op_type} {n.name}")
    return out


def summarise(found: dict[int, list[str]]) -> str:
    return "; ".join(f"blocks.{i}: {len(v)} ({', '.join(sorted(set(s.split()[0] for s in v)))})"
                     for i, v in found.items() if v)


def check_attention_free(model_proto: Any, layers: Sequence[int]) -> None:
    """Raise a ShrinkError if any of ``layers`` still has attention nodes in the ONNX graph."""
    if isinstance(model_proto, (str, os.PathLike)):
        require_deploy_extra(("onnx",))
        import onnx

        model_proto = onnx.load(str(model_proto))
    found = attention_nodes(model_proto, layers)
    if any(found.values()):
        raise ShrinkError(f"attention nodes remain in layers meant to be attention-free: {summarise(found)}")
