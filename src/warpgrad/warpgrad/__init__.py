"""warpgrad: Warped Gradient Descent on the metazoo core.

WarpGrad (Flennerhag et al., "Meta-Learning with Warped Gradient Descent", ICLR 2020) meta-learns
warp layers interleaved with a task learner's adaptable layers, from states replayed out of the
task learners' trajectories. ``Warp`` wraps the model, ``ReplayBuffer`` stores trajectories,
``DualUpdater`` (Algorithm 2) and ``OnlineUpdater`` (Algorithm 1) compute and apply the
meta-gradients (``ContinualUpdater``: Algorithm 1 for a learner that is never reset, as in the
maze experiment), ``OptimizerParameters`` holds the (optionally meta-learned) inner learning
rates and momenta, ``warpgrad.layers`` has warp-layer building blocks and ``WarpGrad`` exposes it
all through the core ``MetaLearner`` interface (``WarpMAML``: warp layers by the warp objective,
the initialisation by MAML's).
"""

from warpgrad.buffer import FlatStates, ReplayBuffer, ReplayState
from warpgrad.flat import FlatLayout
from warpgrad.layers import (
    ABLATIONS,
    WARP_INITS,
    ChannelScale,
    WarpBlock,
    WarpHead,
    WarpLayer,
    warp_block,
)
from warpgrad.learner import WarpGrad
from warpgrad.objectives import (
    InitObjective,
    Leap,
    ReplayContext,
    SimplifiedLeap,
    WarpObjective,
    resolve_init_objective,
    resolve_warp_objective,
)
from warpgrad.optimizer_parameters import OptimizerParameters
from warpgrad.updaters import ContinualUpdater, DualUpdater, OnlineUpdater, UpdateResult
from warpgrad.warp import Warp
from warpgrad.warp_maml import WarpMAML, warp_maml

__version__ = "0.1.0"

__all__ = [
    "ABLATIONS",
    "WARP_INITS",
    "ChannelScale",
    "ContinualUpdater",
    "DualUpdater",
    "FlatLayout",
    "FlatStates",
    "InitObjective",
    "Leap",
    "OnlineUpdater",
    "OptimizerParameters",
    "ReplayBuffer",
    "ReplayContext",
    "ReplayState",
    "SimplifiedLeap",
    "UpdateResult",
    "Warp",
    "WarpBlock",
    "WarpGrad",
    "WarpHead",
    "WarpLayer",
    "WarpMAML",
    "WarpObjective",
    "resolve_init_objective",
    "resolve_warp_objective",
    "warp_block",
    "warp_maml",
]
