"""leap: Leap (Flennerhag et al., ICLR 2019) on the metazoo core.

Two ways to drive it, sharing one update rule (``leap.trajectory``):

- ``Leap``: the reference implementation's stateful API (``init_task``, ``to``, ``update``,
  ``normalize``, ``parameters``), fixed for PyTorch 2.x and including the trajectory's last
  segment.
- ``LeapLearner``: the ``metazoo.MetaLearner`` interface that experiments use.
"""

from leap.leap import Leap
from leap.learner import LeapLearner
from leap.trajectory import Point, add_to_grad, flatten, segment_increment

__version__ = "0.1.0"

__all__ = ["Leap", "LeapLearner", "Point", "add_to_grad", "flatten", "segment_increment"]
