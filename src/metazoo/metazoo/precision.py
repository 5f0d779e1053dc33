"""float32 precision on NVIDIA GPUs: exact (IEEE) or TF32 convolutions, RNNs and matmuls.

On Ampere and later GPUs PyTorch may compute float32 convolutions and matrix products in TF32
(10-bit mantissa inputs). By default it does so for cuDNN convolutions (and RNNs), not for
cuBLAS matmuls. Second-order meta-gradients amplify that rounding: on the MAML Omniglot net
(5 inner SGD steps at lr 0.4) four implementations of the same meta-gradient disagreed by 1% to
80% with PyTorch's defaults, and by 3e-6 with TF32 off (one H200, torch 2.11; see
``ARCHITECTURE.md``). ``"exact"`` turns TF32 off everywhere; ``"tf32"`` turns it on everywhere
(convolutions, RNNs and matmuls: the fastest float32 setting).

What is set (the per-operation ``fp32_precision`` API of torch >= 2.9; torch 2.11 and 2.14
accept it without deprecation warnings, while setting the legacy ``allow_tf32`` flags warns on
torch 2.9-2.11):

- ``torch.backends.cuda.matmul.fp32_precision``: cuBLAS matmuls (``nn.Linear``, ``@``),
- ``torch.backends.cudnn.conv.fp32_precision``: cuDNN convolutions,
- ``torch.backends.cudnn.rnn.fp32_precision``: cuDNN RNNs (``nn.LSTM``),

each to ``"ieee"`` (exact) or ``"tf32"``. The settings are process-wide and have no effect on
CPUs or on float64. Do not mix this with the legacy flags in one process: once the new API has
set a value, reading ``torch.backends.cudnn.allow_tf32`` or
``torch.backends.cuda.matmul.allow_tf32`` can raise a RuntimeError (torch 2.14).

Example:
    >>> with metazoo.fp32_precision("exact"):
    ...     learner.meta_step(tasks)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch

__all__ = ["PRECISIONS", "fp32_precision", "fp32_precision_flags", "set_fp32_precision"]

#: The precision modes: ``"exact"`` (IEEE float32) and ``"tf32"``.
PRECISIONS = ("exact", "tf32")

_VALUES = {"exact": "ieee", "tf32": "tf32"}


def _backends() -> dict[str, object]:
    return {"cuda.matmul": torch.backends.cuda.matmul,
            "cudnn.conv": torch.backends.cudnn.conv,  # type: ignore[attr-defined]
            "cudnn.rnn": torch.backends.cudnn.rnn}


def fp32_precision_flags() -> dict[str, str]:
    """The current ``fp32_precision`` of cuBLAS matmuls and cuDNN convolutions and RNNs
    (``"ieee"``, ``"tf32"`` or ``"none"``: inherited from the backend's default)."""
    return {name: str(backend.fp32_precision)  # type: ignore[attr-defined]
            for name, backend in _backends().items()}


def _apply(flags: Mapping[str, str]) -> None:
    backends = _backends()
    for name, value in flags.items():
        backends[name].fp32_precision = value  # type: ignore[attr-defined]


def set_fp32_precision(precision: str) -> dict[str, str]:
    """Sets float32 convolutions, RNNs and matmuls on the GPU to ``"exact"`` or ``"tf32"``.

    Args:
        precision: ``"exact"`` (IEEE float32, TF32 off) or ``"tf32"`` (TF32 on).

    Returns:
        The previous flags (``fp32_precision_flags()``), to restore with
        ``fp32_precision``'s context or by passing them back to the backends.

    Raises:
        ValueError: ``precision`` is not one of ``PRECISIONS``.
    """
    if precision not in _VALUES:
        raise ValueError(f"precision={precision!r} must be one of {list(PRECISIONS)}: 'exact' "
                         f"turns TF32 off (float32 meta-gradients agree across implementations), "
                         f"'tf32' turns it on (faster on Ampere and later GPUs)")
    previous = fp32_precision_flags()
    _apply(dict.fromkeys(previous, _VALUES[precision]))
    return previous


@contextmanager
def fp32_precision(precision: str) -> Iterator[None]:
    """Runs the block with ``set_fp32_precision(precision)``; the previous flags come back
    afterwards, also when the block raises."""
    previous = set_fp32_precision(precision)
    try:
        yield
    finally:
        _apply(previous)
