"""The core's tests run in float64, where gradient checks are meaningful."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def float64_default():
    """float64 by default in each core test module (module scope, so it also precedes the
    modules' own module-scoped fixtures), restored afterwards so other suites are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
