"""metazoo.strict_devices: host tensors meeting device tensors raise where CUDA would fail."""

import numpy as np
import pytest
import torch

import metazoo
from metazoo import DeviceMixError, strict_devices


def test_cat_of_a_host_tensor_with_a_device_tensor_names_where_it_was_made():
    loss = torch.tensor(1.0)  # made before: a device tensor
    with strict_devices(), pytest.raises(DeviceMixError) as error:
        inner = torch.tensor([0.5, 0.25])
        torch.cat([inner, loss.reshape(1)])
    assert "cat combines a host tensor (shape (2,)" in str(error.value)
    assert "test_devices.py" in str(error.value) and "inner = torch.tensor" in str(error.value)


def test_what_cuda_allows_passes():
    x = torch.randn(3, 2)
    with strict_devices():
        assert torch.equal(x * torch.tensor(2.0), x * 2)  # a 0-dim host tensor: a scalar
        assert x[torch.tensor([0, 2])].shape == (2, 2)  # host indices into a device tensor
        x.new_zeros(3).copy_(torch.ones(3))  # copies across devices
        host = torch.arange(3)
        assert (host * 2 + host).tolist() == [0, 3, 6]  # host with host
        torch.cat([torch.zeros(2, device=x.device), x[:, 0]])  # made on the device
        torch.cat([torch.zeros_like(x[:, 0]), x[:, 0]])  # *_like follows its input
        moved = torch.tensor([1.0, 2.0]).to(x.device)  # moved to the device
        torch.cat([moved, x[:, 0]])
        torch.cat([torch.tensor([1.0]).to(x), x[:, 0]])  # moved like another tensor


@pytest.mark.parametrize("make", [
    lambda x: torch.arange(3, dtype=x.dtype),
    lambda x: torch.ones(3, dtype=x.dtype),
    lambda x: torch.randn(3, generator=torch.Generator().manual_seed(0)),
    lambda x: x.cpu() + 0,
    lambda x: x.to("cpu"),
    lambda x: torch.from_numpy(np.ones(3)),
    lambda x: torch.tensor([1.0, 2.0, 3.0]).to(torch.float64),  # a dtype change stays on host
])
def test_host_tensors_of_every_origin_raise_against_device_tensors(make):
    x = torch.randn(3, dtype=torch.float64)
    with strict_devices(), pytest.raises(DeviceMixError):
        _ = x + make(x)


def test_a_0_dim_host_tensor_in_stack_raises():
    x = torch.randn(())
    with strict_devices(), pytest.raises(DeviceMixError, match="stack"):
        torch.stack([x, torch.tensor(1.0)])


def test_a_default_device_block_makes_factories_device_tensors():
    x = torch.randn(3)
    with strict_devices():
        with torch.device("cpu"):  # what main.py does with the run's device
            made = torch.arange(3)
        assert (x + made).shape == (3,)
        with pytest.raises(DeviceMixError):
            _ = made + torch.arange(3)  # made outside the block: host


def test_torch_load_to_the_cpu_gives_host_tensors_and_is_restored(tmp_path):
    x = torch.randn(2)
    torch.save({"a": torch.ones(2)}, tmp_path / "s.pt")
    load, from_numpy = torch.load, torch.from_numpy
    with strict_devices():
        loaded = torch.load(tmp_path / "s.pt", map_location="cpu", weights_only=True)
        with pytest.raises(DeviceMixError):
            _ = loaded["a"] + x
        on_device = torch.load(tmp_path / "s.pt", map_location=x.device, weights_only=True)
        _ = on_device["a"] + x
    assert torch.load is load and torch.from_numpy is from_numpy


def test_task_fault_and_mean_results_accept_losses_from_two_devices():
    # The reported crash: WarpGrad's inner losses on the host, its query loss on the GPU.
    query = torch.tensor(0.5)
    with strict_devices():
        inner = torch.tensor([1.0, float("nan")])
        fault = metazoo.task_fault(3, inner, query)
        assert fault is not None and fault.task == 3 and fault.inner_step == 1
        assert metazoo.task_fault(0, torch.tensor([1.0, 2.0]), query) is None
        loss, acc, curve = metazoo.mean_results([(query, None, torch.tensor([1.0, 3.0]))])
    assert (loss, acc, curve) == (0.5, None, (1.0, 3.0))


def test_host_list_reads_host_tensors_uncounted_and_refuses_device_ones():
    from metazoo.testing import count_host_syncs

    order = torch.randperm(6, generator=torch.Generator().manual_seed(0))
    with count_host_syncs() as syncs:
        values = metazoo.host_list(order)
    assert values == order.tolist() and syncs.count == 0
    with pytest.raises(ValueError, match="host_list reads host tensors only, got one on meta"):
        metazoo.host_list(torch.empty(3, device="meta"))
