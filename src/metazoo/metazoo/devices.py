"""A CPU-side check for device bugs: host tensors that would meet accelerator tensors on a GPU.

On a machine without a GPU every tensor lives on the CPU, so code that builds a tensor without
``device=`` and then combines it with the model's tensors runs fine in every CPU test and fails
on the first GPU (``torch.cat`` of a CPU tensor with a CUDA loss: "Expected all tensors to be on
the same device"). ``strict_devices()`` finds that class of bug on a CPU. Inside it, every tensor
that existed before (the model, the data: what a GPU run would have moved to the accelerator)
counts as a *device* tensor, and a tensor counts as a *host* tensor when it comes from

- a factory call without ``device=`` (``torch.tensor``, ``zeros``, ``ones``, ``empty``, ``full``,
  ``arange``, ``linspace``, ``eye``, ``rand``, ``randn``, ``randint``, ``randperm``, ...),
- ``Tensor.cpu()``, or any operation whose tensor inputs are all host tensors.

``Tensor.to(device)``, ``.to(other_tensor)``, ``.cuda()``, ``new_*`` methods, ``*_like``
factories and factories given ``device=`` give device tensors, as they would on a GPU, except
that a literal string ``"cpu"`` (``.to("cpu")``, ``device="cpu"``) names the host. An
operation that combines a host tensor with a device tensor raises ``DeviceMixError`` naming the
operation and the line that created the host tensor, where CUDA would raise (or, for a 0-dim
host tensor, where CUDA would silently copy it on every call): ``cat``/``stack`` with any host
tensor, every other operation with a host tensor of one or more dimensions. Indexing a device
tensor with a host index and ``copy_`` across devices are allowed, as on CUDA.

``torch.from_numpy`` and ``torch.load`` (with ``map_location`` None or ``"cpu"``) give host
tensors too.

What it cannot catch: tensors created in C++ or by other libraries (not visible to
``__torch_function__``); a ``torch.device("cpu")`` object (it reads as "the
compute device", the only one a CPU has, since code derives it from tensors); generators whose
device differs from the tensors they fill (``torch.Generator()`` is not a tensor operation);
numerical differences between devices (TF32, non-deterministic kernels); and code paths the
test does not run. The tests under ``tests/test_cuda.py`` on a real GPU cover those.

Example:
    >>> with metazoo.strict_devices():
    ...     learner.meta_step(tasks)      # raises DeviceMixError where a GPU run would fail
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["DeviceMixError", "host_list", "strict_devices"]

# torch.* functions that create a tensor on the default (CPU) device unless given ``device=``.
_FACTORIES = frozenset({
    "tensor", "as_tensor", "asarray", "scalar_tensor", "zeros", "ones", "empty", "empty_strided",
    "full", "arange", "range", "linspace", "logspace", "eye", "rand", "randn", "randint",
    "randperm", "tril_indices", "triu_indices", "bernoulli", "normal", "poisson", "multinomial",
})
# Random factories that take tensors (``normal(mean, std)``) draw on the tensors' device.
_INHERITING_WITH_TENSOR_ARGS = frozenset({"bernoulli", "normal", "poisson", "multinomial",
                                          "tensor", "as_tensor", "asarray"})
# Operations where any host tensor among device tensors fails on CUDA, 0-dim ones included.
_STRICT = frozenset({"cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack"})
# Operations CUDA allows across devices.
_CROSS_DEVICE = frozenset({"__getitem__", "copy_"})


class DeviceMixError(RuntimeError):
    """An operation combined a host (CPU) tensor with device tensors; see ``strict_devices``."""


def _origin() -> str:
    """The innermost frame outside torch and this module: where the host tensor was made."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and frame.filename != __file__:
            return f"{frame.filename}:{frame.lineno} ({frame.line})"
    return "unknown"


def _is_host_name(value: Any) -> bool:
    """A literal ``"cpu"`` (string) is a deliberate choice of the host."""
    return isinstance(value, str) and value.split(":")[0] == "cpu"


class _StrictDevices(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.host: WeakIdKeyDictionary = WeakIdKeyDictionary()  # host tensor -> origin

    def _target(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool | None:
        """For ``.to``/``.cuda``/``.cpu``: True (host), False (device) or None (no move)."""
        if name == "cpu":
            return True
        if name == "cuda":
            return False
        for value in [*args[1:], kwargs.get("device"), kwargs.get("other")]:
            if isinstance(value, Tensor):
                return value in self.host
            if _is_host_name(value):
                return True
            if isinstance(value, torch.device | str | int) and not isinstance(value, bool):
                return False
        return None  # a dtype change keeps the device

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        moving = name in ("to", "cuda", "cpu")
        inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        host = [t for t in inputs if t in self.host]
        on_device = [t for t in inputs if t not in self.host]
        if host and on_device and not moving and name not in _CROSS_DEVICE:
            offending = host if name in _STRICT else [t for t in host if t.dim() > 0]
            if offending:
                raise DeviceMixError(
                    f"{name} combines a host tensor (shape {tuple(offending[0].shape)}, created "
                    f"at {self.host[offending[0]]}) with device tensors: on a GPU this fails "
                    f"with 'Expected all tensors to be on the same device'; create it with "
                    f"device=<the model's device> or move it with .to(device)")
        out = func(*args, **kwargs)
        if moving:
            target = self._target(name, args, kwargs)
            is_host = bool(host) if target is None else target
            if out is args[0] and not is_host:
                # ``.to`` returned its input (already on the CPU): on a GPU this would be a
                # device copy, so the tensor counts as one from here on.
                self.host.pop(out, None)
            elif out is args[0] and target and args[0] not in self.host:
                # ``.cpu()`` of a "device" tensor returned it unchanged: on a GPU it would be a
                # host copy, so hand out an alias that can carry the host mark.
                out = out.view_as(out)
        elif (getattr(func, "__qualname__", "").startswith("_VariableFunctionsClass.")
              and name in _FACTORIES
              and not (name in _INHERITING_WITH_TENSOR_ARGS and inputs)):
            device = kwargs.get("device")
            is_host = device is None or _is_host_name(device)
        else:
            is_host = bool(host) and not on_device
        if is_host:
            origin = self.host[host[0]] if host and name != "cpu" else _origin()
            for t in pytree.tree_leaves(out):
                if isinstance(t, Tensor) and not any(t is i for i in inputs):
                    self.host[t] = origin
        return out


@contextmanager
def strict_devices() -> Iterator[None]:
    """Raises ``DeviceMixError`` where code would mix CPU and accelerator tensors on a GPU.

    Tensors that exist on entry are treated as accelerator tensors; see the module docstring for
    what becomes a host tensor and what the check cannot see. While it is active,
    ``torch.from_numpy`` and ``torch.load`` are wrapped so that their tensors count as host
    tensors (``torch.load`` only with ``map_location`` None or ``"cpu"``), as they are on a GPU
    machine. Meant for tests: it adds Python overhead to every tensor operation.
    """
    mode = _StrictDevices()
    from_numpy, load = torch.from_numpy, torch.load

    def host_from_numpy(array: Any) -> Tensor:
        tensor = from_numpy(array)
        mode.host[tensor] = _origin()
        return tensor

    def host_load(*args: Any, **kwargs: Any) -> Any:
        loaded = load(*args, **kwargs)
        location = kwargs.get("map_location", args[1] if len(args) > 1 else None)
        if location is None or _is_host_name(location):
            origin = _origin()
            for t in pytree.tree_leaves(loaded):
                if isinstance(t, Tensor):
                    mode.host[t] = origin
        return loaded

    torch.from_numpy, torch.load = host_from_numpy, host_load  # type: ignore[assignment]
    try:
        with mode:
            yield
    finally:
        torch.from_numpy, torch.load = from_numpy, load  # type: ignore[assignment]


def host_list(tensor: Tensor) -> list[Any]:
    """The values of a tensor that lives on the host by construction, as a list.

    For tensors the code itself makes on the CPU (a permutation drawn with a CPU
    ``torch.Generator``): reading them never waits for an accelerator, on any machine. The read
    goes through NumPy, so ``benchmarks/launches.py``, which counts ``Tensor.tolist`` and
    ``.item()`` as device synchronisations, does not count it.

    Raises:
        ValueError: ``tensor`` is not on the CPU (its read would synchronise with the device;
            use ``tolist()`` where that is meant).
    """
    if tensor.device.type != "cpu":
        raise ValueError(f"host_list reads host tensors only, got one on {tensor.device}; "
                         f"reading it synchronises with the device: call .tolist() if meant")
    result: list[Any] = tensor.detach().numpy().tolist()
    return result
