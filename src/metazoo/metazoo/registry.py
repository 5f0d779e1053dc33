"""Learners by name: the algorithm packages that are installed, found through entry points.

Each algorithm package declares its learners in its ``pyproject.toml``::

    [project.entry-points."metazoo.learners"]
    maml = "maml.maml:MAML"
    fomaml = "maml.presets:fomaml"

An entry point's object is a factory ``(**keywords) -> metazoo.MetaLearner`` that takes the
shared construction keywords (``model``, ``criterion``, ``inner_optimizer``, ``inner_steps``,
``eval_inner_steps``, ``meta_optimizer``) plus the algorithm's own options. The core reads the
installed metadata (``importlib.metadata``) and never imports an algorithm package until a
learner of it is built, so the dependency direction stays experiments -> algorithms -> core.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

from metazoo.learner import MetaLearner

__all__ = ["ENTRY_POINT_GROUP", "available_learners", "build_learner"]

#: The entry-point group the algorithm packages register their learners in.
ENTRY_POINT_GROUP = "metazoo.learners"


def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        # The first distribution on sys.path wins, as for imports.
        found.setdefault(point.name, point)
    return found


def available_learners() -> list[str]:
    """Sorted names of the installed learners (``build_learner`` builds each)."""
    return sorted(_entry_points())


def build_learner(name: str, **keywords: Any) -> MetaLearner:
    """Builds the installed learner called ``name``.

    Args:
        name: one of ``available_learners()``, e.g. ``"maml"``, ``"fomaml"``, ``"reptile"``,
            ``"leap"``, ``"warp_leap"``.
        **keywords: the shared construction keywords (``model=``, ``criterion=``,
            ``inner_optimizer=``, ``inner_steps=``, ``eval_inner_steps=``,
            ``meta_optimizer=``) and the learner's own options, passed to its factory.

    Returns:
        The learner, a ``metazoo.MetaLearner``.

    Raises:
        ValueError: ``name`` is not installed (one line listing the installed names and how to
            install more), or the factory refused a keyword.
        TypeError: an unknown keyword (the factory's own error, naming it), or a factory that
            does not return a ``MetaLearner``.
    """
    points = _entry_points()
    if not isinstance(name, str) or name not in points:
        installed = sorted(points)
        if not installed:
            raise ValueError(f"no metazoo learner is installed, so {name!r} cannot be built; "
                             f"install an algorithm package, e.g. pip install -e src/maml "
                             f"(scripts/setup.sh maml leap warpgrad)")
        raise ValueError(f"unknown learner {name!r}; installed learners: "
                         f"{', '.join(installed)} (install more with scripts/setup.sh "
                         f"maml leap warpgrad)")
    factory = points[name].load()
    learner = factory(**keywords)
    if not isinstance(learner, MetaLearner):
        raise TypeError(f"the entry point {points[name].value!r} of learner {name!r} returned "
                        f"{type(learner).__name__}, not a metazoo.MetaLearner")
    return learner
