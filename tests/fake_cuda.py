"""A second device on a machine without one: find host/device mix-ups without a GPU.

CI has no GPU, and code that works on the CPU can still fail on one: a mask, an index or an
accumulator created on the host meets a pattern that lives on the GPU ("Expected all tensors to
be on the same device"). Inside :func:`fake_cuda`, ``cuda`` is a real place for tensors: a tensor
moved there (``.to("cuda")``, ``.cuda()``, a factory with ``device="cuda"``, a module's ``.to``)
becomes a :class:`DeviceTensor` (CPU memory underneath, so every number is the CPU's own) whose
``.device`` says ``cuda``; whatever an operation computes from one is on the device too, and
``.cpu()`` / ``.to("cpu")`` / ``.tolist()`` / ``.item()`` come back to the host. An operation that
mixes device and host tensors raises :class:`DeviceMix` where PyTorch on a GPU would raise, with
the same exceptions PyTorch makes: 0-dim host tensors (scalars), indexing a device tensor with
host indices, and copies between the two.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)


class DeviceMix(RuntimeError):
    """An operation mixed tensors on the (fake) GPU with tensors on the host."""


class DeviceTensor(torch.Tensor):
    """CPU memory that says it lives on the GPU (see the module's docstring)."""

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return CUDA

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    __torch_function__ = torch._C._disabled_torch_function_impl


class DeviceParameter(DeviceTensor, torch.nn.Parameter):
    """A module's parameter on the fake device."""


def _on_device(t: Any) -> bool:
    return isinstance(t, DeviceTensor)


def _is_cuda(d: Any) -> bool | None:
    """True / False for a device argument, None if ``d`` names no device."""
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str) and (d.startswith("cuda") or d == "cpu" or d.startswith("cpu:")):
        return d.startswith("cuda")
    if isinstance(d, int) and not isinstance(d, bool):
        return True  # .to(0), .cuda(0)
    return None


def _host_device(d: Any) -> Any:
    return torch.device("cpu") if _is_cuda(d) else d


def _plain(t: Any) -> Any:
    if isinstance(t, torch.Tensor) and type(t) is not torch.Tensor:
        if isinstance(t, torch.nn.Parameter) and not _on_device(t):
            return t
        return t.as_subclass(torch.Tensor)
    return t


def _device_tensor(t: Any) -> Any:
    if isinstance(t, torch.Tensor) and not isinstance(t, DeviceTensor):
        return t.as_subclass(DeviceTensor)
    return t


def _host_tensor(t: Any) -> Any:
    if isinstance(t, DeviceTensor):
        return t.as_subclass(torch.Tensor)
    return t


_TO_HOST = {torch.Tensor.cpu, torch.Tensor.numpy}
_KEEP_MIX = {  # PyTorch allows these across devices
    torch.Tensor.copy_,
    torch.Tensor.__getitem__,
    torch.Tensor.__setitem__,
    torch.Tensor.to,
    torch.Tensor.cuda,
    torch.Tensor.cpu,
    torch.Tensor.__format__,
    torch.Tensor.__repr__,
}


class _Mode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        leaves, _ = tree_flatten((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        on_dev = any(_on_device(t) for t in tensors)
        # where the result lives: an explicit target, else with its inputs
        target: bool | None = None
        if func in (torch.Tensor.cpu, torch.Tensor.numpy):
            if func is torch.Tensor.numpy and on_dev:
                raise DeviceMix("can't convert a cuda tensor to numpy: call .cpu() first")
            target = False
        elif func is torch.Tensor.cuda:
            target = True
        elif func is torch.Tensor.to:
            for a in [*args[1:], kwargs.get("device")]:
                if isinstance(a, torch.Tensor):
                    target = _on_device(a)
                elif _is_cuda(a) is not None:
                    target = _is_cuda(a)
        elif "device" in kwargs and _is_cuda(kwargs["device"]) is not None:
            target = _is_cuda(kwargs["device"])  # a factory, or *_like(..., device=)
        if target is None and on_dev and func not in _KEEP_MIX:
            host = [t for t in tensors if not _on_device(t) and t.dim() > 0]
            if host:
                shapes = ", ".join(str(tuple(t.shape)) for t in host[:3])
                raise DeviceMix(
                    f"{getattr(func, '__qualname__', func)}: device tensors mixed with host "
                    f"tensors of shape {shapes}"
                )
        if func is torch.Tensor.__getitem__ and not _on_device(args[0]) and on_dev:
            raise DeviceMix("indexing a host tensor with device indices")
        if "device" in kwargs:
            kwargs["device"] = _host_device(kwargs["device"])
        args = tuple(_host_device(a) if _is_cuda(a) and not isinstance(a, int) else a for a in args)
        if func is torch.Tensor.cuda:
            func, args = torch.Tensor.clone, args[:1]
        out = func(*tree_map(_plain, args), **tree_map(_plain, kwargs))
        if func in (torch.Tensor.tolist, torch.Tensor.item):
            return out
        if func is torch.Tensor.to and target is None:
            target = on_dev
        if target is None:
            target = on_dev
        return tree_map(_device_tensor if target else _host_tensor, out)


def _module_to(self: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
    """``Module.to`` for the fake device: parameters and buffers become device tensors."""
    device = kwargs.get("device", args[0] if args else None)
    dtype = kwargs.get("dtype")
    for a in args:
        if isinstance(a, torch.dtype):
            dtype = a
    wrap = _device_tensor if _is_cuda(device) else _host_tensor
    for module in self.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                data = p.data if dtype is None or not p.is_floating_point() else p.data.to(dtype)
                new = torch.nn.Parameter(_plain(data), requires_grad=p.requires_grad)
                if wrap is _device_tensor:
                    new.__class__ = DeviceParameter
                module._parameters[name] = new
        for name, b in list(module._buffers.items()):
            if b is not None:
                data = b if dtype is None or not b.is_floating_point() else b.to(dtype)
                module._buffers[name] = wrap(_plain(data))
    return self


def _transform(real):
    """``torch.func.jvp`` / ``vjp`` for the fake device: the function transform runs on plain
    tensors with the checks off (their inputs are checked at the door), its outputs (and a vjp's
    pull-back) are on the device if any input was."""

    is_vjp = real is torch.func.vjp

    def wrapped(f, *args, **kwargs):
        leaves = [t for t in tree_flatten(args)[0] if isinstance(t, torch.Tensor)]
        dev = any(_on_device(t) for t in leaves)
        if dev and any(not _on_device(t) and t.dim() > 0 for t in leaves):
            raise DeviceMix(f"{real.__name__}: device and host inputs")
        put = _device_tensor if dev else _host_tensor
        with torch.overrides._pop_mode_temporarily():  # this file's mode off
            out = real(f, *tree_map(_plain, args), **kwargs)
        if is_vjp:
            value, pull = out[0], out[1]

            def pull_back(*cot):
                with torch.overrides._pop_mode_temporarily():  # this file's mode off
                    return tree_map(put, pull(*tree_map(_plain, cot)))

            return (tree_map(put, value), pull_back, *out[2:])
        return tree_map(put, out)

    return wrapped


@contextlib.contextmanager
def fake_cuda() -> Iterator[None]:
    """Run the block with a fake GPU (see the module's docstring)."""
    real_to = torch.nn.Module.to

    def module_to(self, *args, **kwargs):
        device = kwargs.get("device", args[0] if args else None)
        if _is_cuda(device) is None:
            return real_to(self, *args, **kwargs)
        return _module_to(self, *args, **kwargs)

    with (
        mock.patch.object(torch.nn.Module, "to", module_to),
        mock.patch("torch.cuda.is_available", lambda: True),
        mock.patch("torch.cuda.is_bf16_supported", lambda *a, **k: True),
        mock.patch("torch.cuda.synchronize", lambda *a, **k: None),
        mock.patch("torch.cuda.empty_cache", lambda: None),
        mock.patch("torch.func.jvp", _transform(torch.func.jvp)),
        mock.patch("torch.func.vjp", _transform(torch.func.vjp)),
        _Mode(),
    ):
        yield
