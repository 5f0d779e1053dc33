"""The named variants of ``MAML`` that the learner registry builds (``metazoo.build_learner``).

Each is ``MAML`` with one option set, so a variant is a name, not a subclass: ``fomaml`` is
``first_order=True``, ``anil`` freezes everything but the head in the inner loop, ``metasgd``
learns one inner learning rate per parameter entry. Every other keyword is ``MAML``'s.
"""

from __future__ import annotations

from typing import Any

from maml.maml import MAML

__all__ = ["anil", "fomaml", "metasgd"]


def _preset(variant: str, keywords: dict[str, Any], **options: Any) -> MAML:
    clash = sorted(set(options) & set(keywords))
    if clash:
        raise ValueError(f"learner {variant!r} sets {clash} itself; build 'maml' to choose "
                         f"{', '.join(clash)} freely")
    return MAML(**keywords, **options)


def fomaml(**keywords: Any) -> MAML:
    """First-order MAML: ``MAML(first_order=True, **keywords)``."""
    return _preset("fomaml", keywords, first_order=True)


def metasgd(**keywords: Any) -> MAML:
    """Meta-SGD (Li et al. 2017): ``MAML(learn_inner_lr="per_element", **keywords)``, one
    learned inner learning rate per parameter entry, initialised to the inner optimizer's."""
    return _preset("metasgd", keywords, learn_inner_lr="per_element")


def anil(*, head: str = "head", **keywords: Any) -> MAML:
    """ANIL (Raghu et al. 2020): only the head adapts in the inner loop; the body is still
    meta-learned. ``MAML(frozen=<every parameter outside head>, **keywords)``.

    Args:
        head: the name of the head module in ``model.named_modules()`` (default ``"head"``).
        **keywords: ``MAML``'s keywords.
    """
    model = keywords.get("model")
    if model is not None and hasattr(model, "named_modules"):
        modules = [n for n, _ in model.named_modules() if n]
        if head not in modules:
            raise ValueError(f"anil adapts the module head={head!r}, which the model does not "
                             f"have; pass head= one of {modules[-10:]}")
    prefix = head + "."
    return _preset("anil", keywords, frozen=lambda name: not name.startswith(prefix))
