"""The core on a GPU (``pytest -m cuda``; skipped, with the reason, without one).

- A checkpointed unroll with dropout recomputes each segment from the GPU generator's saved
  state: its meta-gradient equals the plain unroll's (float64).
- An unroll on CUDA equals the same unroll on the CPU (float64, no randomness).
- ``fp32_precision("exact")`` brings a float32 second-order meta-gradient on a conv net within
  1e-4 (relative) of the float64 one (TF32 would not; ``benchmarks/precision.py`` prints both).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metazoo

pytestmark = pytest.mark.cuda


def _conv_net(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Dropout(dropout), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(16 * 4 * 4, 5))


def _batches(device: str, dtype: torch.dtype, n: int = 4) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(10, 1, 8, 8, generator=g, dtype=torch.float64).to(device, dtype),
             (torch.arange(10) % 5).to(device)) for _ in range(n)]


def _meta_gradient(model: nn.Module, batches, *, steps: int, lr: float = 0.4,
                   **unroll_kwargs) -> list[torch.Tensor]:
    loss_fn = metazoo.make_loss_fn(model, F.cross_entropy)
    params = dict(model.named_parameters())
    result = metazoo.unroll(loss_fn, params, metazoo.SGD(lr), batches[:-1], steps=steps,
                            buffers=metazoo.initial_buffers(model, "batch"), **unroll_kwargs)
    output, _ = metazoo.forward(model, result.params, result.buffers, batches[-1][0])
    loss = F.cross_entropy(output, batches[-1][1])
    return [g.cpu() for g in torch.autograd.grad(loss, list(params.values()))]


def test_dropout_is_replayed_from_the_gpu_generator_under_checkpointing():
    model = _conv_net(dropout=0.5).double().cuda()
    batches = _batches("cuda", torch.float64)

    def run(checkpoint):
        torch.cuda.manual_seed(7)
        torch.manual_seed(7)
        return _meta_gradient(model, batches, steps=6, checkpoint=checkpoint)

    for plain, ckpt in zip(run(None), run(2)):
        torch.testing.assert_close(ckpt, plain, rtol=0, atol=1e-10)


def test_an_unroll_on_cuda_equals_the_cpu_one_in_float64():
    on_cpu = _meta_gradient(_conv_net().double(), _batches("cpu", torch.float64), steps=5,
                            checkpoint=2)
    on_cuda = _meta_gradient(_conv_net().double().cuda(), _batches("cuda", torch.float64),
                             steps=5, checkpoint=2)
    for a, b in zip(on_cuda, on_cpu):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_exact_precision_brings_float32_within_1e_4_of_float64():
    reference = torch.cat([g.reshape(-1) for g in _meta_gradient(
        _conv_net().double().cuda(), _batches("cuda", torch.float64), steps=5)])
    # .float(): the core's tests default to float64 (conftest), which would compare float64
    # with itself.
    with metazoo.fp32_precision("exact"):
        exact = torch.cat([g.reshape(-1).double() for g in _meta_gradient(
            _conv_net().float().cuda(), _batches("cuda", torch.float32), steps=5)])
    assert float((exact - reference).norm() / reference.norm()) < 1e-4
