"""Put the experiment folder on sys.path: it is an experiment, not an installed package."""

import sys
from pathlib import Path

_FOLDER = str(Path(__file__).resolve().parents[1])
if _FOLDER not in sys.path:
    sys.path.insert(0, _FOLDER)

import torch  # noqa: E402

# Small float64 models: one thread is faster than several on a shared CPU.
torch.set_num_threads(1)
