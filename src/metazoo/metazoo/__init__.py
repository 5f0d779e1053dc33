"""metazoo: the shared core of the meta-learning zoo.

Pure functional models (``forward``, ``params_of``), differentiable inner optimizers
(``SGD``, ``Adam``, ``RMSprop``), exact checkpointed unrolls (``unroll``) and the
``MetaLearner`` interface every algorithm implements.
"""

from metazoo import batchnorm, cli, distributed, layers, registry, runs, vectorize
from metazoo.devices import DeviceMixError, strict_devices
from metazoo.faults import (
    CheckedCriterion,
    NonFiniteError,
    TaskFaults,
    all_finite,
    check_on_nonfinite,
    checked_step,
    task_fault,
)
from metazoo.functional import (
    BatchNormMode,
    Buffers,
    Params,
    check_params,
    closed_form_batch_norm,
    forward,
    initial_buffers,
    make_loss_fn,
    params_of,
    split_params,
)
from metazoo.layout import (
    accumulate_grad,
    check_channels_last,
    params_to_channels_last,
    task_to_channels_last,
    to_channels_last,
)
from metazoo.learner import (
    Adapted,
    Batch,
    Criterion,
    EvalResult,
    MetaLearner,
    MetaOptimizerFactory,
    MetaStepResult,
    Task,
    accuracy,
    build_meta_optimizer,
    check_criterion,
    check_task,
    check_tasks,
    mean_results,
    trainable_parameters,
)
from metazoo.optim import SGD, Adam, InnerOptimizer, OptState, RMSprop, safe_sqrt
from metazoo.precision import (
    PRECISIONS,
    fp32_precision,
    fp32_precision_flags,
    set_fp32_precision,
)
from metazoo.registry import available_learners, build_learner
from metazoo.runs import RunFolder, RunFolderError, RunLockedError
from metazoo.serialization import atomic_save, atomic_write_text
from metazoo.unroll import (
    DEFAULT_SEGMENT,
    DEFAULT_SNAPSHOTS,
    Checkpoint,
    CheckpointPlan,
    LossFn,
    UnrollResult,
    binomial_recomputations,
    check_checkpoint,
    clip_grad_norm,
    unroll,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SEGMENT",
    "DEFAULT_SNAPSHOTS",
    "PRECISIONS",
    "SGD",
    "Adam",
    "Adapted",
    "Batch",
    "BatchNormMode",
    "Buffers",
    "CheckedCriterion",
    "Checkpoint",
    "CheckpointPlan",
    "Criterion",
    "DeviceMixError",
    "EvalResult",
    "InnerOptimizer",
    "LossFn",
    "MetaLearner",
    "MetaOptimizerFactory",
    "MetaStepResult",
    "NonFiniteError",
    "OptState",
    "Params",
    "RMSprop",
    "RunFolder",
    "RunFolderError",
    "RunLockedError",
    "Task",
    "TaskFaults",
    "UnrollResult",
    "accumulate_grad",
    "accuracy",
    "all_finite",
    "atomic_save",
    "atomic_write_text",
    "available_learners",
    "batchnorm",
    "binomial_recomputations",
    "build_learner",
    "build_meta_optimizer",
    "check_channels_last",
    "check_checkpoint",
    "check_criterion",
    "check_on_nonfinite",
    "check_params",
    "check_task",
    "check_tasks",
    "checked_step",
    "cli",
    "clip_grad_norm",
    "closed_form_batch_norm",
    "distributed",
    "forward",
    "fp32_precision",
    "fp32_precision_flags",
    "initial_buffers",
    "layers",
    "make_loss_fn",
    "mean_results",
    "params_of",
    "params_to_channels_last",
    "registry",
    "runs",
    "safe_sqrt",
    "set_fp32_precision",
    "split_params",
    "strict_devices",
    "task_fault",
    "task_to_channels_last",
    "to_channels_last",
    "trainable_parameters",
    "unroll",
    "vectorize",
]
