"""maml: MAML, first-order MAML, Meta-SGD, MAML++, ANIL, Reptile and iMAML on the metazoo core.

Every learner implements ``metazoo.MetaLearner`` (``adapt``, ``meta_step``, ``evaluate``,
``state_dict``); ``meta_train`` runs meta-training for any of them.
"""

from maml.imaml import conjugate_gradient, iMAML
from maml.maml import MAML, multi_step_loss_weights
from maml.presets import anil, fomaml, metasgd
from maml.reptile import Reptile
from maml.train import Evaluation, TrainHistory, meta_train

__version__ = "0.1.0"

__all__ = [
    "MAML",
    "Evaluation",
    "Reptile",
    "TrainHistory",
    "anil",
    "conjugate_gradient",
    "fomaml",
    "iMAML",
    "meta_train",
    "metasgd",
    "multi_step_loss_weights",
]
