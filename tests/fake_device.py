"""A fake accelerator for CPU-only machines: catches tensors that never reach ``accelerator.device``.

On a CPU, ``accelerator.device`` is the CPU and a tensor that was never moved there is already
there, so a forgotten ``.to(device)`` passes every CPU test and breaks on the first GPU. Inside
:class:`FakeDevice` each tensor is either *host* (created without an explicit device, like a CPU
tensor on a GPU machine) or *device* (moved with ``.to(device)`` / ``Module.to`` / Accelerate's
``prepare``, or created with ``device=``), the kind propagates through every torch operation, and
an operation that mixes a non-scalar host tensor with a device tensor raises, as CUDA does.
Cross-device copies (``copy_``, ``.data =``, indexing with host indices) are allowed, as on CUDA.

The kind is an attribute on the tensor object; ``nn.Parameter.__new__`` and ``__deepcopy__`` are
wrapped so that a parameter keeps the kind of its data and a deep copy of a host model (an EMA or
a teacher built before the model moved) stays host.
"""
from __future__ import annotations

import functools

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves, tree_map

_HOST = "_fake_device_host"
_ALLOWED_MIX = {"copy_", "__setitem__", "__getitem__", "index_put_", "index_select", "masked_fill_", "where",
                "_has_compatible_shallow_copy_type", "set_"}


class DeviceMismatch(RuntimeError):
    """A host tensor met a device tensor (on a GPU: 'Expected all tensors to be on the same device')."""


def is_host(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _HOST, False)


def _tag(obj, host: bool):
    for t in tree_leaves(obj):
        if isinstance(t, torch.Tensor):
            try:
                if host:
                    setattr(t, _HOST, True)
                elif getattr(t, _HOST, False):
                    delattr(t, _HOST)
            except (AttributeError, RuntimeError):
                pass
    return obj


def _func_name(func) -> str:
    owner = getattr(func, "__self__", None)  # getset_descriptor.__get__ / __set__: the attribute's name
    if owner is not None and type(owner).__name__ == "getset_descriptor":
        return f"{owner.__name__}.{func.__name__}"
    return getattr(func, "__name__", str(func))


def _is_move(name: str, args, kwargs) -> bool:
    """``t.to(device, ...)``, ``t.to(other)``, ``t.cuda()``: a transfer to the (only) real device."""
    if name == "cuda":
        return True
    if name != "to":
        return False
    rest = list(args[1:]) + [kwargs.get("device"), kwargs.get("other")]
    return any(isinstance(a, (torch.device, str)) or (isinstance(a, torch.Tensor) and not is_host(a))
               for a in rest if a is not None)


class FakeDevice(TorchFunctionMode):
    """Context manager: inside it, host and device tensors are told apart (see the module docstring)."""

    def __init__(self, record: list[str] | None = None):
        super().__init__()
        self.record = record

    def __enter__(self):
        self._orig_new = torch.nn.Parameter.__new__
        self._orig_deepcopy = torch.nn.Parameter.__deepcopy__
        orig_new = self._orig_new

        def new(cls, data=None, requires_grad=True):  # a Parameter is a new object: it keeps its data's kind
            param = orig_new(cls, data, requires_grad)
            return _tag(param, data is None or is_host(data))

        torch.nn.Parameter.__new__ = new

        @functools.wraps(self._orig_deepcopy)
        def deepcopy(param, memo):
            result = self._orig_deepcopy(param, memo)
            return _tag(result, True) if is_host(param) else result

        torch.nn.Parameter.__deepcopy__ = deepcopy
        return super().__enter__()

    def __exit__(self, *exc):
        torch.nn.Parameter.__deepcopy__ = self._orig_deepcopy
        torch.nn.Parameter.__new__ = self._orig_new
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _func_name(func)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if name == "data.__set__":  # param.data = value: the parameter takes the value's place
            out = func(*args, **kwargs)
            _tag(args[0], is_host(args[1]))
            return out
        if _is_move(name, args, kwargs):
            out = func(*args, **kwargs)
            return _tag(out, False)
        host = [t for t in tensors if is_host(t)]
        dev = [t for t in tensors if not is_host(t)]
        base = name.rsplit(".", 1)[-1] if "." in name and not name.endswith(("__get__", "__set__")) else name
        if host and dev and base not in _ALLOWED_MIX and any(t.dim() > 0 for t in host):
            shapes = [tuple(t.shape) for t in host if t.dim() > 0][:3]
            raise DeviceMismatch(f"{name}: host tensor(s) {shapes} used with tensors on the device "
                                 f"(a .to(accelerator.device) or accelerator.prepare is missing)")
        out = func(*args, **kwargs)
        if not tensors:  # a factory: host unless it was given a device
            return _tag(out, kwargs.get("device") is None)
        if base.endswith("_") and not base.startswith("__") and args and args[0] is out:
            return out  # in place: the tensor keeps its kind
        return _tag(out, bool(host) and not dev)


def check_on_device(what: str, obj) -> None:
    """Raise if ``obj`` (a tensor, a module, or a nest of tensors) holds a host tensor."""
    if isinstance(obj, torch.nn.Module):
        bad = [n for n, t in list(obj.named_parameters()) + list(obj.named_buffers()) if is_host(t)]
    else:
        bad = []
        tree_map(lambda t: bad.append(tuple(t.shape)) if is_host(t) else None, obj)
    if bad:
        raise DeviceMismatch(f"{what} is not on the device: {bad[:3]}")


__all__ = ["DeviceMismatch", "FakeDevice", "check_on_device", "is_host"]
