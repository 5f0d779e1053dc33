"""``WarpedModel``: what an updater reads from the ``Warp`` it updates.

The updaters (``warpgrad.updaters``) compute meta-gradients from a ``Warp``'s replay buffer and
parameter groups, and ``Warp`` holds an updater: a dependency both ways. The updaters depend on
this protocol instead of the class, so imports go one way only:
``warp -> updaters -> warped`` (``Warp`` satisfies the protocol structurally).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from torch import Tensor, nn

from warpgrad.buffer import ReplayBuffer
from warpgrad.objectives import ReplayContext

__all__ = ["WarpedModel"]


class WarpedModel(Protocol):
    """The part of ``warpgrad.Warp`` that ``DualUpdater`` and ``OnlineUpdater`` use."""

    model: nn.Module
    buffer: ReplayBuffer

    @property
    def learn_optimizer(self) -> bool:
        """Whether the inner learning rates and momenta are meta-learned."""

    def named_warp_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Warp-layer parameters, by model name."""

    def named_init_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The meta-learned initialisation of the adaptable parameters, by model name."""

    def optimizer_parameters(self) -> Iterator[nn.Parameter]:
        """The inner optimizer's ``log_lr`` / ``momentum_logit`` tensors."""

    def named_meta_parameters(self, include_warp: bool = True, include_init: bool | None = None,
                              include_optimizer: bool = True
                              ) -> Iterator[tuple[str, nn.Parameter]]:
        """Meta-parameters, prefixed ``warp.``, ``init.``, ``optimizer.``."""

    def replay_context(self, criterion: Callable[[Tensor, Tensor], Tensor], *,
                       bn_mode: str = "batch") -> ReplayContext:
        """Fresh leaves for the warp parameters and detached views of everything else."""
