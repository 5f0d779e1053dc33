"""Test-wide settings for every package's suite."""

import torch

# The suites use tiny tensors, where intra-op threads only add synchronisation: on a loaded
# 2-core machine a 6x4 batch_norm took 95 ms with 2 threads and 10 us with 1.
torch.set_num_threads(1)
