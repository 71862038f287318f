"""Argument checks that the fake kernels share: the Python side of ``csrc/common/checks.h``.

With any meta argument the dispatcher runs an op's fake kernel (``register_fake`` is also the op's Meta kernel)
instead of its C++ body, so the device rule of ``checks.h`` must hold here too: every tensor argument lives on the
device of the op's first tensor argument, meta included. Without it, ``ve_perturb(cpu_x, t, noise=meta_z)`` would
return ``x.new_empty(...)``: uninitialised CPU memory, no error. Messages match the C++ ones.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
from torch import Tensor


def _named_tensors(schema: torch.FunctionSchema, args: tuple, kwargs: dict) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of every tensor argument in schema order; ``xs[i]`` for the elements of a list."""
    for i, arg in enumerate(schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if isinstance(value, Tensor):
            yield arg.name, value
        elif isinstance(value, (list, tuple)):
            for j, item in enumerate(value):
                if isinstance(item, Tensor):
                    yield f"{arg.name}[{j}]", item


def check_devices(
    op: str,
    schema: torch.FunctionSchema,
    args: tuple,
    kwargs: dict,
    *,
    host_ok: tuple[str, ...] = (),
    host_scalar_ok: tuple[str, ...] = (),
) -> None:
    """Raise unless every tensor argument is on the first tensor argument's device.

    ``host_ok``: arguments read on the host, which may also be CPU tensors of any shape (dialogue lengths).
    ``host_scalar_ok``: arguments that may also be 0-d CPU tensors (per-sample parameters: a 0-d CPU tensor is read
    on the host, as PyTorch lets CPU scalars mix with tensors of any device).
    """
    first: tuple[str, Tensor] | None = None
    for name, t in _named_tensors(schema, args, kwargs):
        if first is None:
            first = (name, t)
            continue
        ref_name, ref = first
        if t.device == ref.device:
            continue
        if t.device.type == "cpu":
            if name in host_ok:
                continue
            if name in host_scalar_ok and t.dim() == 0:
                continue
        if name in host_ok:
            hint = f"pass {name} (read on the host) on the CPU or on {ref_name}'s device"
        elif name in host_scalar_ok:
            hint = f"use a Python float, a 0-d CPU tensor or a tensor on {ref_name}'s device"
        else:
            hint = "move them to one device"
        raise RuntimeError(f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; {hint}")


def register_fake(
    qualname: str,
    *,
    op_name: str | None = None,
    host_ok: tuple[str, ...] = (),
    host_scalar_ok: tuple[str, ...] = (),
) -> Callable[[Callable], Callable]:
    """``torch.library.register_fake`` whose kernel first applies :func:`check_devices`.

    ``op_name``: the name in messages (default ``mmer_ext.<name>``, e.g. the public op of a private forward op).
    """
    namespace, name = qualname.split("::")
    schema = getattr(getattr(torch.ops, namespace), name).default._schema
    label = op_name or f"{namespace}.{name}"

    def decorate(fake: Callable) -> Callable:
        @functools.wraps(fake)
        def checked(*args, **kwargs):
            check_devices(label, schema, args, kwargs, host_ok=host_ok, host_scalar_ok=host_scalar_ok)
            return fake(*args, **kwargs)

        # _stacklevel: torch checks that the fake kernel is registered from the module the C++ library names
        # (m.set_python_module), i.e. the caller of this decorator, not this file.
        torch.library.register_fake(qualname, checked, _stacklevel=2)
        return fake

    return decorate


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def check_dense(op: str, **tensors: object) -> None:
    """Raise unless every tensor given is a dense (strided) one: the kernels read raw strided memory, and a sparse,
    nested or MKL-DNN tensor would otherwise fail in the dispatcher with a message that names no argument."""
    for name, value in tensors.items():
        items = value if isinstance(value, (list, tuple)) else [value]
        for i, t in enumerate(items):
            if isinstance(t, Tensor) and (t.layout != torch.strided or t.is_nested):
                label = name if not isinstance(value, (list, tuple)) else f"{name}[{i}]"
                kind = "nested" if t.is_nested else str(t.layout).removeprefix("torch.")
                raise ValueError(f"{op}: {label} must be a dense (strided) tensor, got a {kind} tensor")


def check_int64(op: str, name: str, value: object) -> None:
    """A Python int beyond int64 fails the schema with "expected int, found int": say what is wrong instead."""
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{op}: {name} must fit in int64, got {value}")
