"""The cost key: everything a cost table's timings depend on (model, input, device, dtype, batch,
threads, runtime, library versions), and :func:`cost_key_for`, the key of a model as it runs here."""
from __future__ import annotations

import contextlib
import platform
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrink.bench.measure import set_allocator
from shrink.blocks.contract import block_family, get_blocks
from shrink.errors import ShrinkError
from shrink.introspect import input_size as model_input_size
from shrink.merging.kernels import protected_tokens
from shrink.precision import dtype_of

__all__ = ["RUNTIMES", "TIMED_FAMILIES", "CostKey", "cost_key_for"]

RUNTIMES = ("eager", "compile", "onnxruntime")


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


@dataclass
class CostKey:
    """Everything the timings depend on; two tables are interchangeable only when their keys are equal."""

    model: str
    input_size: tuple[int, int, int]
    num_tokens: int
    num_protected: int
    depth: int
    device: str
    dtype: str
    batch_size: int
    threads: int | None
    runtime: str
    versions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.input_size = tuple(int(v) for v in self.input_size)
        if self.runtime not in RUNTIMES:
            raise ShrinkError(f"unknown runtime {self.runtime!r}; choose from {', '.join(RUNTIMES)}")
        dtype_of(self.dtype)
        if self.batch_size < 1 or self.depth < 1 or self.num_tokens < 1 or not 0 <= self.num_protected < self.num_tokens:
            raise ShrinkError(f"bad cost key: batch {self.batch_size}, depth {self.depth}, tokens {self.num_tokens}, "
                              f"protected {self.num_protected}")
        if self.threads is not None and self.threads < 1:
            raise ShrinkError(f"threads must be >= 1, got {self.threads}")

    def __str__(self) -> str:
        v = " ".join(f"{k} {self.versions[k]}" for k in sorted(self.versions))
        return (f"{self.model} {'x'.join(map(str, self.input_size))} ({self.num_tokens} tokens, {self.depth} blocks) "
                f"on {self.device} {self.dtype}, batch {self.batch_size}, "
                f"{'default' if self.threads is None else self.threads} threads, {self.runtime}; {v}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> CostKey:
        if not isinstance(d, dict):
            raise ShrinkError("cost key is not a mapping")
        want = {f for f in cls.__dataclass_fields__}
        if set(d) != want:
            raise ShrinkError(f"cost key fields {sorted(d)} differ from {sorted(want)}")
        ints = ("num_tokens", "num_protected", "depth", "batch_size")
        if not all(isinstance(d[k], int) and not isinstance(d[k], bool) for k in ints) or not (
                d["threads"] is None or isinstance(d["threads"], int)):
            raise ShrinkError("cost key: token counts, depth, batch size and threads must be integers")
        if not (isinstance(d["input_size"], list) and len(d["input_size"]) == 3
                and all(isinstance(v, int) for v in d["input_size"])):
            raise ShrinkError("cost key: input_size must be 3 integers")
        if not all(isinstance(d[k], str) for k in ("model", "device", "dtype", "runtime")) or not (
                isinstance(d["versions"], dict) and all(isinstance(v, str) for v in d["versions"].values())):
            raise ShrinkError("cost key: model, device, dtype, runtime and versions must be strings")
        return cls(**{**d, "input_size": tuple(d["input_size"])})

    def differences(self, other: CostKey) -> list[str]:
        """``field: table X, wanted Y`` (self is the table's key) for every field that differs, versions one by one."""
        a, b = self.to_dict(), other.to_dict()
        out = [f"{k}: table {a[k]}, wanted {b[k]}" for k in a if k != "versions" and a[k] != b[k]]
        va, vb = a["versions"], b["versions"]
        out += [f"{k}: table {va.get(k)}, wanted {vb.get(k)}" for k in sorted(set(va) | set(vb)) if va.get(k) != vb.get(k)]
        return out


def _count_tokens(model: nn.Module, size: Sequence[int]) -> int:
    blocks = get_blocks(model)
    seen: list[int] = []
    hook = blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(int(args[0].shape[1])))
    p = next(model.parameters())
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, *size, device=p.device, dtype=p.dtype))
    finally:
        hook.remove()
    return seen[0]


# block families whose parts (attention half with sizes, MLP half, merge) run on their own
TIMED_FAMILIES = frozenset({"vit", "respost", "parallel-things", "eva", "eva-postnorm"})


def cost_key_for(model: nn.Module, model_name: str, *, device: str | torch.device = "cpu", dtype: str = "fp32",
                 batch_size: int = 16, threads: int | None = None, runtime: str = "eager",
                 img_size: int | None = None) -> CostKey:
    """The key of ``model`` (a dense timm ViT) measured under these settings, with the installed versions."""
    size = model_input_size(model, img_size)
    depth = len(get_blocks(model))
    families = {getattr(block_family(b), "name", type(b).__name__) for b in get_blocks(model)}
    if not families <= TIMED_FAMILIES:
        raise ShrinkError(f"the cost model times {', '.join(sorted(TIMED_FAMILIES))} blocks; this model has "
                          f"{', '.join(sorted(families - TIMED_FAMILIES))} (its merging needs the model's positions "
                          "or biases, not timed yet)")
    versions = {"python": platform.python_version(), "torch": torch.__version__, "timm": _version("timm") or "?",
                "shrink": _version("shrink") or "?", "allocator": set_allocator("steady", keep=True)}
    if runtime == "onnxruntime":
        versions["onnxruntime"] = _version("onnxruntime") or "?"
        versions["onnxscript"] = _version("onnxscript") or "?"
    dev = torch.device(device)
    if dev.type == "cuda":
        versions["gpu"] = torch.cuda.get_device_name(dev)
    else:
        versions["cpu"] = _cpu_name()
    return CostKey(model=model_name, input_size=tuple(size), num_tokens=_count_tokens(model, size),
                   num_protected=protected_tokens(model), depth=depth, device=str(dev),
                   dtype=dtype, batch_size=int(batch_size), threads=threads, runtime=runtime, versions=versions)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"
