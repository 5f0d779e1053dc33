"""``metazoo.registry``: learners found by name through entry points, without importing the
algorithm packages (a distribution made up in a temporary folder stands in for them)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import metazoo

LEARNER_MODULE = '''
import torch
import metazoo


class Toy(metazoo.MetaLearner):
    def __init__(self, *, model, criterion, meta_optimizer=None, **options):
        self.model = model
        self.criterion = metazoo.check_criterion(criterion)
        self.options = options
        self.meta_optimizer = metazoo.build_meta_optimizer(
            meta_optimizer, self.named_meta_parameters(),
            lambda params: torch.optim.SGD(params, lr=0.1))

    def adapt(self, task, *, steps=None):
        raise NotImplementedError

    def meta_backward(self, tasks):
        raise NotImplementedError

    def evaluate(self, tasks, *, steps=None):
        raise NotImplementedError


def toy_preset(**keywords):
    return Toy(preset=True, **keywords)


def not_a_learner(**keywords):
    return object()
'''


@pytest.fixture
def toy_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed distribution ``toyzoo`` declaring three learners."""
    (tmp_path / "toyzoo_learners.py").write_text(LEARNER_MODULE)
    info = tmp_path / "toyzoo-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyzoo\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[metazoo.learners]\ntoy = toyzoo_learners:Toy\ntoy_preset = toyzoo_learners:toy_preset\n"
        "broken = toyzoo_learners:not_a_learner\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("toyzoo_learners", None)


def test_installed_learners_are_listed_and_built_by_name(toy_distribution):
    names = metazoo.available_learners()
    assert {"toy", "toy_preset", "broken"} <= set(names) and names == sorted(names)
    model = nn.Linear(2, 1)
    learner = metazoo.build_learner("toy", model=model, criterion=F.mse_loss, width=3)
    assert isinstance(learner, metazoo.MetaLearner) and learner.options == {"width": 3}
    assert learner.model is model
    assert metazoo.build_learner("toy_preset", model=model,
                                 criterion=nn.MSELoss()).options == {"preset": True}
    # The factory's own checks apply: the shared meta-optimizer check, unknown keywords.
    with pytest.raises(ValueError, match="leaves out the meta-parameters"):
        metazoo.build_learner("toy", model=model, criterion=F.mse_loss,
                              meta_optimizer=torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=1))
    with pytest.raises(TypeError, match=r"returned object, not a metazoo\.MetaLearner"):
        metazoo.build_learner("broken", model=model, criterion=F.mse_loss)


def test_an_unknown_name_is_one_line_listing_the_installed_learners(toy_distribution):
    with pytest.raises(ValueError) as error:
        metazoo.build_learner("tyo", model=nn.Linear(2, 1), criterion=F.mse_loss)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("unknown learner 'tyo'; installed learners: ")
    assert "broken, " in message and "toy, toy_preset" in message


def test_no_learner_installed(monkeypatch):
    monkeypatch.setattr(metazoo.registry, "entry_points", lambda group: [])
    assert metazoo.available_learners() == []
    with pytest.raises(ValueError, match=r"no metazoo learner is installed.*pip install"):
        metazoo.build_learner("maml")


def test_the_core_imports_no_algorithm_package():
    """The registry reads metadata only: the core's source never imports an algorithm
    package (the dependency direction is algorithms -> core)."""
    source = "\n".join(p.read_text() for p in Path(metazoo.__file__).parent.glob("*.py"))
    for package in ("maml", "leap", "warpgrad"):
        assert f"import {package}" not in source and f"from {package}" not in source
