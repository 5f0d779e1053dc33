"""PyTorch Lightning integration: any metazoo learner as a ``LightningModule``, task streams as
``LightningDataModule``s (install with ``pip install "metazoo[lightning]"``).

``import metazoo`` never imports this subpackage (nor Lightning); import it explicitly:
``from metazoo.lightning import MetaLearnerModule, SinusoidDataModule``.
"""

from metazoo.lightning.data import (
    IMAGE_SUFFIXES,
    FixedMetaBatches,
    ImageFolderDataModule,
    MetaBatch,
    MetaBatchStream,
    SinusoidDataModule,
    TaskDataModule,
    task_generator,
)
from metazoo.lightning.module import CHECKPOINT_KEY, MetaLearnerModule

__all__ = [
    "CHECKPOINT_KEY",
    "IMAGE_SUFFIXES",
    "FixedMetaBatches",
    "ImageFolderDataModule",
    "MetaBatch",
    "MetaBatchStream",
    "MetaLearnerModule",
    "SinusoidDataModule",
    "TaskDataModule",
    "task_generator",
]
