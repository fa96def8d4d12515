"""A second device on a CPU-only machine, for tests that must see a tensor on the wrong device.

A GPU run fails the moment an op combines a tensor on the GPU with one on the CPU ("Expected all
tensors to be on the same device"); on a CPU-only machine every tensor is on the CPU and no test
can see that mistake. Under `FakeDevice()`, tensors moved or made on the meta device keep real
CPU data but report `device='meta'` (`OnFake`, a wrapper subclass), and every op checks its
inputs as CUDA would: an op that mixes a fake-device tensor with a CPU tensor of one or more
dimensions raises. As on CUDA, a 0-dim CPU tensor is allowed (a scalar) and so are CPU index
tensors (`x[idx]`). Autograd, optimisers and `.item()` work: the code under test runs its real
numbers, only its devices are checked. Stricter than CUDA in one way: nothing is on the device
unless moved or made there, which is exactly what the platform promises.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

DEVICE = torch.device("meta")
INDEXING = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
            torch.ops.aten._index_put_impl_.default}


class OnFake(torch.Tensor):
    """A CPU tensor that says it is on the fake device."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, elem.shape, strides=elem.stride(), storage_offset=elem.storage_offset(), dtype=elem.dtype,
            layout=elem.layout, device=DEVICE, requires_grad=elem.requires_grad)

    def __init__(self, elem: torch.Tensor):
        self.elem = elem

    def __repr__(self):
        return f"OnFake({self.elem!r})"

    def tolist(self):  # a copy to the host, as on CUDA (torch refuses it for subclasses)
        return self.elem.tolist()

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on a fake-device tensor outside FakeDevice()")


def _on_fake(device) -> bool:
    return device is not None and torch.device(device).type == DEVICE.type


class _FromData(TorchFunctionMode):
    """`torch.tensor(data, device=...)` / `torch.as_tensor`: made without the dispatcher seeing a
    device argument, so they are made on the CPU here and moved, as the code asked."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.tensor, torch.as_tensor) and _on_fake(kwargs.get("device")):
            kwargs.pop("device")
            return func(*args, **kwargs).to(DEVICE)
        return func(*args, **kwargs)


class FakeDevice(TorchDispatchMode):
    """Run the code inside with `DEVICE` standing for an accelerator (module docstring)."""

    def __enter__(self):
        self._from_data = _FromData()
        self._from_data.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._from_data.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.ops.aten._to_copy.default:
            return self._copy(func, args[0], kwargs)
        to_fake = _on_fake(kwargs.get("device"))
        if to_fake:
            kwargs["device"] = torch.device("cpu")  # a factory asked for the device
        fake, host = [], []

        def unwrap(x):
            if isinstance(x, OnFake):
                fake.append(x)
                return x.elem
            if isinstance(x, torch.Tensor) and x.dim() > 0:
                host.append(x)
            return x
        args, kwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        if fake and host and func not in INDEXING:
            shapes = ", ".join(str(tuple(h.shape)) for h in host)
            raise RuntimeError(f"{func}: expected all tensors on the same device, got tensors on "
                               f"{DEVICE} and on cpu (cpu shapes {shapes})")
        out = func(*args, **kwargs)
        if fake or to_fake:
            return tree_map(lambda x: OnFake(x) if isinstance(x, torch.Tensor) else x, out)
        return out

    @staticmethod
    def _copy(func, src, kwargs):
        target = kwargs.pop("device", None)
        fake_target = _on_fake(target) if target is not None else isinstance(src, OnFake)
        out = func(src.elem if isinstance(src, OnFake) else src, **kwargs)
        return OnFake(out) if fake_target else out
