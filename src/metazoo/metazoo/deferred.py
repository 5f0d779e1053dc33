"""Results whose values are still on the device: read later, together, in one host transfer.

Reading a value computed on a GPU makes the host wait for the device (a synchronisation). A
meta-step needs a few such values: the fault flags of its tasks, the means it reports, and
the meta-optimizer step's own finite check. ``DeferredRead`` lets the code that computes them
hand them on unread, so that ``MetaLearner.meta_step`` reads all of them with one transfer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from torch import Tensor

__all__ = ["DeferredRead"]

T = TypeVar("T")
U = TypeVar("U")


@dataclass(frozen=True)
class DeferredRead(Generic[T]):
    """A result computed from ``values`` once they are read.

    Attributes:
        values: a 1-D floating-point tensor on the device, or ``None`` when nothing is left to
            read.
        finish: turns the values read (a list of floats, bit for bit what ``values.tolist()``
            gives) into the result; it may raise (a faulty task's ``NonFiniteError``).
    """

    values: Tensor | None
    finish: Callable[[list[float]], T]

    @staticmethod
    def ready(result: T) -> DeferredRead[T]:
        """A result that needs no read."""
        return DeferredRead(None, lambda _: result)

    def read(self) -> T:
        """Reads ``values`` (one host transfer) and finishes."""
        return self.finish([] if self.values is None else self.values.tolist())

    def then(self, function: Callable[[T], U]) -> DeferredRead[U]:
        """This read, with ``function`` applied to its result."""
        finish = self.finish

        def finished(read: list[float]) -> U:
            return function(finish(read))

        return DeferredRead(self.values, finished)
