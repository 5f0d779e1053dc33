"""metazoo.precision: the exact / TF32 switch sets the three backend flags and restores them."""

import pytest
import torch

import metazoo

NAMES = {"cuda.matmul", "cudnn.conv", "cudnn.rnn"}


def _read() -> dict[str, str]:
    # Read straight from torch, not through the module under test.
    return {"cuda.matmul": torch.backends.cuda.matmul.fp32_precision,
            "cudnn.conv": torch.backends.cudnn.conv.fp32_precision,
            "cudnn.rnn": torch.backends.cudnn.rnn.fp32_precision}


@pytest.mark.parametrize("precision, value", [("exact", "ieee"), ("tf32", "tf32")])
def test_the_context_sets_every_flag_and_restores_the_previous_ones(precision, value):
    before = _read()
    assert metazoo.fp32_precision_flags() == before and set(before) == NAMES
    with metazoo.fp32_precision(precision):
        assert _read() == dict.fromkeys(NAMES, value)
        with metazoo.fp32_precision("tf32" if precision == "exact" else "exact"):
            assert _read() != dict.fromkeys(NAMES, value)
        assert _read() == dict.fromkeys(NAMES, value)
    assert _read() == before


def test_flags_come_back_when_the_block_raises():
    before = _read()
    with pytest.raises(KeyError), metazoo.fp32_precision("exact"):
        raise KeyError("boom")
    assert _read() == before


def test_set_returns_the_previous_flags():
    before = _read()
    try:
        previous = metazoo.set_fp32_precision("exact")
        assert previous == before and _read() == dict.fromkeys(NAMES, "ieee")
    finally:
        for name, backend in (("cuda.matmul", torch.backends.cuda.matmul),
                              ("cudnn.conv", torch.backends.cudnn.conv),
                              ("cudnn.rnn", torch.backends.cudnn.rnn)):
            backend.fp32_precision = before[name]
    assert _read() == before


def test_unknown_precision_names_the_choices():
    before = _read()
    with pytest.raises(ValueError, match=r"precision='fp16' must be one of \['exact', 'tf32'\]"):
        metazoo.set_fp32_precision("fp16")
    assert _read() == before


def test_exact_float32_on_the_cpu_is_unchanged():
    # TF32 does not exist on CPUs: the switch must not change CPU results.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(33, 17, generator=g), torch.randn(17, 9, generator=g)
    w = torch.randn(4, 3, 3, 3, generator=g)
    x = torch.randn(2, 3, 8, 8, generator=g)
    plain = (a @ b, torch.nn.functional.conv2d(x, w))
    for precision in metazoo.PRECISIONS:
        with metazoo.fp32_precision(precision):
            assert torch.equal(a @ b, plain[0])
            assert torch.equal(torch.nn.functional.conv2d(x, w), plain[1])
