"""Timing the parts: each part of a block as a module, the runtimes that run a module (eager,
``torch.compile``, ONNX Runtime), a whole model's runner, and the interleaved timer (every repeat
visits every timer, the order rotating; the median is kept)."""
from __future__ import annotations

import contextlib
import copy
import io
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from shrink.blocks.attention_free import export
from shrink.blocks.contract import AttentionFreeBlock, block_family, get_blocks
from shrink.blocks.dilution import dilute
from shrink.errors import ShrinkError, first_line
from shrink.merging.kernels import AttentionCall, attention_kernel
from shrink.merging.merge import bipartite_soft_matching, merge_wavg
from shrink.plan.cost.key import CostKey
from shrink.precision import dtype_of

__all__ = ["AttnHalf", "CompiledRuntime", "Keep", "MergeStep", "MlpHalf", "OrtRuntime", "Plain", "Runtime",
           "edges_model", "free_block", "interleaved", "runtime_for", "torch_threads", "whole_runner"]


class Plain(nn.Module):
    """A whole block as timm runs it."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class AttnHalf(nn.Module):
    """x + attention branch, proportional attention on ``size``, and the keys metric (a merging block's first half)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fam = block_family(self.block)
        metrics: list[torch.Tensor] = []

        def call(attn: nn.Module, h: torch.Tensor, _ctx: dict) -> torch.Tensor:
            kernel = attention_kernel(attn)  # the family's ToMe kernel (no positions: cost, not values)
            if kernel is None:
                raise ShrinkError(f"no ToMe attention kernel for {type(attn).__name__}: cannot time its merging")
            y, metric = kernel(attn, h, AttentionCall(size, True, 0, {}, None))
            metrics.append(metric)
            return y

        return x + fam.attention_branch(self.block, x, {}, attn_call=call), metrics[0]


class MlpHalf(nn.Module):
    """x + MLP branch (a merging block's second half)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + block_family(self.block).mlp_branch(self.block, x, {})


class MergeStep(nn.Module):
    """Bipartite soft matching of ``r`` on ``metric`` and the size-weighted merge of ``x`` and the sizes."""

    def __init__(self, r: int, num_protected: int, hidden_block: nn.Module | None = None):
        super().__init__()
        self.r, self.p = int(r), int(num_protected)
        self.block = hidden_block  # policy "hidden": the metric is the block's norm2(x)

    def forward(self, x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.block is not None:
            metric = block_family(self.block).merge_input(self.block, x)
        m = bipartite_soft_matching(metric, self.r, self.p)
        if m is None:
            return x, size
        return merge_wavg(m, x, size)


class Keep(nn.Module):
    """Stands for the blocks in the edges model: keeps the first ``n`` tokens."""

    def __init__(self, n: int | None = None):
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # Eva passes rope=, BEiT a bias
        return x if self.n is None else x[:, : self.n]


def edges_model(model: nn.Module, n: int | None) -> nn.Module:
    """``model`` (shallow copy) with its blocks replaced by :class:`Keep`: stem + head on ``n`` tokens."""
    blocks = get_blocks(model)
    m = copy.copy(model)
    m._modules = dict(model._modules)
    name = next(k for k, v in model._modules.items() if v is blocks)
    m._modules[name] = nn.Sequential(Keep(n))
    return m


def free_block(model: nn.Module, index: int) -> nn.Module:
    """Block ``index`` of a copy of ``model`` with its attention removed (dilute at 0 + export)."""
    m = copy.deepcopy(model)
    dilute(m, [index], lam=0.0)
    m = export(m, inplace=True)
    blk = get_blocks(m)[index]
    if not isinstance(blk, AttentionFreeBlock):
        raise ShrinkError(f"block {index} did not export attention-free ({type(blk).__name__})")
    return blk


class Runtime:
    """Eager PyTorch on the key's device and dtype; the base of the other runtimes."""

    def __init__(self, key: CostKey):
        self.key = key
        self.device = torch.device(key.device)
        self.dtype = dtype_of(key.dtype)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def prepare(self, module: nn.Module, n_min: int) -> Callable[[tuple[torch.Tensor, ...]], Callable[[], Any]]:
        """``module`` ready to run; returns ``bind(inputs) -> run()`` (inputs at any token count >= n_min)."""
        module = module.to(self.device, self.dtype).eval()

        def bind(inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
            inputs = tuple(t.to(self.device, self.dtype if t.is_floating_point() else t.dtype) for t in inputs)

            def run() -> Any:
                with torch.inference_mode():
                    return module(*inputs)
            return run
        return bind


class CompiledRuntime(Runtime):
    """``torch.compile(dynamic=False)``: one compilation per part and shape."""

    def __init__(self, key: CostKey):
        super().__init__(key)
        # one compilation per part and shape: dynamo's per-code recompile limit would silently fall back to eager
        import torch._dynamo

        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 100_000))

    def prepare(self, module, n_min):
        module = module.to(self.device, self.dtype).eval()
        compiled = torch.compile(module, dynamic=False)

        def bind(inputs):
            inputs = tuple(t.to(self.device, self.dtype) for t in inputs)

            def run():
                with torch.inference_mode():
                    return compiled(*inputs)
            return run
        return bind


class OrtRuntime(Runtime):
    """Each part exported once to ONNX with a dynamic token axis (every input's dim 1), one session."""

    def prepare(self, module, n_min):
        module = module.float().cpu().eval()
        state: dict[str, Any] = {}

        def bind(inputs):
            if "session" not in state:
                state["session"] = self._export(module, inputs, n_min)
            session = state["session"]
            names = [i.name for i in session.get_inputs()]
            feed = {nm: t.float().cpu().numpy() for nm, t in zip(names, inputs, strict=True)}

            def run():
                return session.run(None, feed)
            return run
        return bind

    def _export(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], n_min: int) -> Any:
        import onnxruntime as ort

        from shrink.bench.ort import providers, session_options
        from shrink.deploy import require_deploy_extra
        from shrink.deploy.onnx_export import translation_table

        require_deploy_extra()
        n = torch.export.Dim("n", min=max(n_min, 2), max=self.key.num_tokens)
        dyn = tuple({1: n} if t.dim() == 3 else None for t in inputs)
        try:
            with torch.no_grad():
                ep = torch.export.export(module, tuple(t.float().cpu() for t in inputs), dynamic_shapes=dyn)
            with contextlib.redirect_stdout(io.StringIO()):
                proto = torch.onnx.export(ep, (), dynamo=True, optimize=True, verbose=False,
                                          custom_translation_table=translation_table()).model_proto
        except Exception as e:  # noqa: BLE001 - the exporters raise many types
            raise ShrinkError(f"cost table: ONNX export of part {type(module).__name__} failed: {first_line(e)}") from e
        return ort.InferenceSession(proto.SerializeToString(), sess_options=session_options(self.key.threads),
                                    providers=providers(self.device))


def runtime_for(key: CostKey) -> Runtime:
    """The runtime the key names."""
    return {"eager": Runtime, "compile": CompiledRuntime, "onnxruntime": OrtRuntime}[key.runtime](key)


def whole_runner(model: nn.Module, key: CostKey, rt: Runtime) -> Callable[[], Any]:
    """A callable running one batch through the whole ``model`` (an ONNX Runtime session under that runtime)."""
    x = torch.randn(key.batch_size, *key.input_size, generator=torch.Generator().manual_seed(1))
    if key.runtime == "onnxruntime":
        from shrink.bench.ort import build_session

        session, _ = build_session(model, key.input_size, torch.device(key.device), key.threads,
                                   example_batch=max(2, key.batch_size))
        name = session.get_inputs()[0].name
        feed = {name: x.numpy()}
        return lambda: session.run(None, feed)
    return rt.prepare(model, 1)((x,))


def interleaved(timers: dict[Any, Callable[[], Any]], warmup: int, repeats: int, sync: Callable[[], None],
                 progress: bool, desc: str, stat: Callable[[list[float]], float] = statistics.median) -> dict[Any, float]:
    """``stat`` (median) of the ms of each timer: every repeat runs every timer once, the order rotating."""
    from tqdm.auto import tqdm

    keys = list(timers)
    got: dict[Any, list[float]] = {k: [] for k in keys}
    with tqdm(total=(warmup + repeats) * len(keys), desc=desc, unit="call", disable=not progress, leave=False) as bar:
        for rep in range(warmup + repeats):
            shift = rep % len(keys)
            for k in keys[shift:] + keys[:shift]:
                sync()
                t0 = time.perf_counter()
                timers[k]()
                sync()
                if rep >= warmup:
                    got[k].append((time.perf_counter() - t0) * 1e3)
                bar.update()
    return {k: stat(v) for k, v in got.items()}


@contextlib.contextmanager
def torch_threads(n: int | None):
    """torch's intra-op threads set to ``n`` (None: unchanged) for the block, restored after."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
